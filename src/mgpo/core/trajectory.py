"""What a rollout hands over: per-trajectory records and the padded token batch.

Split out of ``mgpo.core.rollout`` (which re-exports every name here) so the turn loops stay
short; nothing in this module runs a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass
class TurnRecord:
    """One assistant turn of a K-turn conversation (``mgpo_k``)."""

    text: str
    """The turn's text as kept in the conversation (cut after the box when it zooms)."""
    tokens: int
    """Tokens kept and trained (the closing ``<|im_end|>`` included)."""
    truncated: bool
    """The turn hit its token limit."""
    action: str
    """"zoom" (a valid box: the next user turn shows its crop), "fallback" (no usable box: the
    previous image again), "answer" (a ``\\boxed{}`` answer ended the conversation), "final" (the last
    turn, forced to answer, which wrote no readable answer)."""
    box_input: list[float] | None = None
    """The box as written, on the image the model was looking at, in its family's convention
    (Qwen2.5-VL: that image's pixels; Qwen3-VL: its 0-1000 grid)."""
    box_original: list[float] | None = None
    """The box mapped to original-image pixels (valid boxes only)."""
    valid: bool = False
    box_problem: str | None = None
    nested: bool = False
    """The box was drawn on a crop (its region is inside an earlier crop)."""
    crop_size: tuple[int, int] | None = None
    """Size of the crop shown next, as enlarged into the pixel budget."""
    capped: bool = False
    """A valid box whose crop would have passed ``rollout.max_image_tokens``: no crop, answer now."""


@dataclass
class Trajectory:
    """What happened in one sampled conversation (metadata only; tensors live in Rollout)."""

    sample_id: str
    group: int
    """Index of the prompt within the batch; a group's trajectories are consecutive."""
    answer: str
    options: tuple[str, ...]
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    turns: int = 2
    """Assistant turns of the template (the reward reads the last one); for ``mgpo_k``, the turns used."""
    bare_letter: bool = False
    """The template asks for a bare option letter (``direct``), not ``\\boxed{}``."""
    turn1_text: str = ""
    turn2_text: str = ""
    box_input: list[float] | None = None
    box_original: list[float] | None = None
    valid: bool = False
    box_problem: str | None = "no box"
    crop_size: tuple[int, int] | None = None
    turn1_truncated: bool = False
    """Turn 1 hit its token limit (in two turns: without a box, so the original is shown again)."""
    turn2_truncated: bool = False
    """Turn 2 hit its token limit; the reward is taken from what exists."""
    turn1_tokens: int = 0
    turn2_tokens: int = 0
    turn_log: list[TurnRecord] = field(default_factory=list)
    """K-turn templates (``mgpo_k``): one record per assistant turn, in order; ``turns`` is
    then the number of turns used. Empty for the paper's templates (the fields above say it all)."""
    target_boxes: tuple = ()
    """The record's annotated target boxes in original pixels, when it has any: never shown to
    the model or the reward, only to the grounding figures (IoU, crop holds the target)."""

    @property
    def final_text(self) -> str:
        """The template's final assistant turn, the one the answer reward reads."""
        if self.turn_log:
            return self.turn_log[-1].text
        return self.turn2_text if self.turns == 2 else self.turn1_text

    @property
    def texts(self) -> list[str]:
        """Every assistant turn's text, in order."""
        if self.turn_log:
            return [r.text for r in self.turn_log]
        return [self.turn1_text, self.turn2_text][: self.turns]

    @property
    def crops(self) -> int:
        """Crops shown to the model (what ``rollout.turn_cost`` charges for)."""
        if self.turn_log:
            return sum(r.crop_size is not None for r in self.turn_log)
        return int(self.crop_size is not None)


@dataclass
class ImagePatches:
    """One image as the model reads it."""

    pixel_values: torch.Tensor  # [P, D] patches
    grid: torch.Tensor  # [1, 3] (t, h, w) in patches


@dataclass
class Rollout:
    """A batch of finished trajectories, ready for the training forward.

    Shapes: N trajectories, T tokens (right-padded). Each distinct image is stored once
    (a group shares its first image); ``image_index[i]`` lists trajectory i's images in
    the order they appear in its tokens.
    """

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    loss_mask: torch.Tensor  # [N, T] 1.0 on tokens the model produced, every turn
    mm_token_type_ids: torch.Tensor  # [N, T] 1 on image tokens (mRoPE needs it)
    images: list[ImagePatches]
    image_index: list[list[int]]
    trajectories: list[Trajectory]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(sample id, reason) for prompts dropped before generation (e.g. unreadable image)."""
    sample_logp: torch.Tensor | None = None  # [N, T] generation-time log-probs, NaN elsewhere

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def images_per_trajectory(self) -> list[int]:
        return [len(ix) for ix in self.image_index]

    @property
    def pixel_values(self) -> torch.Tensor:
        """[P, D] every trajectory's image patches, trajectory by trajectory (the model's layout)."""
        return torch.cat([self.images[j].pixel_values for ix in self.image_index for j in ix])

    @property
    def image_grid_thw(self) -> torch.Tensor:
        """[I, 3] the grids in the same order as ``pixel_values``."""
        return torch.cat([self.images[j].grid for ix in self.image_index for j in ix])

    def select(self, index) -> Rollout:
        """A sub-batch holding only the images its trajectories use."""
        index = [int(i) for i in index]
        used = sorted({j for i in index for j in self.image_index[i]})
        new = {j: k for k, j in enumerate(used)}
        width = int(self.attention_mask[index].sum(dim=1).max())  # trim shared right padding
        return Rollout(
            input_ids=self.input_ids[index, :width],
            attention_mask=self.attention_mask[index, :width],
            loss_mask=self.loss_mask[index, :width],
            mm_token_type_ids=self.mm_token_type_ids[index, :width],
            images=[self.images[j] for j in used],
            image_index=[[new[j] for j in self.image_index[i]] for i in index],
            trajectories=[self.trajectories[i] for i in index],
            sample_logp=None if self.sample_logp is None else self.sample_logp[index, :width],
        )

    def state(self) -> dict:
        """Tensors and plain values only (what ``torch.load(weights_only=True)`` reads back)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("images", "trajectories", "skipped", "image_index")}
        return {**tensors, "images": [(im.pixel_values, im.grid) for im in self.images],
                "image_index": self.image_index, "skipped": [list(x) for x in self.skipped],
                "trajectories": [asdict(traj) for traj in self.trajectories]}

    @classmethod
    def from_state(cls, state: dict) -> Rollout:
        def trajectory(d: dict) -> Trajectory:
            tuples = {k: tuple(d[k]) for k in ("options", "original_size", "input_size") if d[k] is not None}
            if d["crop_size"] is not None:
                tuples["crop_size"] = tuple(d["crop_size"])
            tuples["target_boxes"] = tuple(tuple(b) for b in d["target_boxes"])
            log = [TurnRecord(**{**r, "crop_size": tuple(r["crop_size"]) if r["crop_size"] else None})
                   for r in d["turn_log"]]
            return Trajectory(**{**d, **tuples, "turn_log": log})

        return cls(**{k: v for k, v in state.items() if k not in ("images", "trajectories", "skipped")},
                   images=[ImagePatches(px, grid) for px, grid in state["images"]],
                   trajectories=[trajectory(d) for d in state["trajectories"]],
                   skipped=[tuple(x) for x in state["skipped"]])

    def model_inputs(self, device=None) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward (mm_token_type_ids included)."""
        out = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }
        out = {k: v for k, v in out.items() if v is not None}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out
