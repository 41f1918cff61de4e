"""Conversations the model did not sample: supervised targets in the rollout's own format.

``teacher_forced`` builds the conversation the rollout would have built had the model
written the given text in each assistant turn (SFT, the crop-answerability judge);
``chat_forced`` encodes a user's own chat messages piece by piece. Both end in the same
`assemble` as a rollout, so SFT's loss mask is the rollout's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import RolloutConfig
from ..data.images import image_size, load_image
from ..data.samples import BadImageError, Sample
from ..runtime.family import processor_family
from .conversation import Context, Conversation, Piece, assemble, encode_prompts
from .generation import special_ids
from .grounding import input_size_from_grid, smart_resize
from .prompts import chat_pieces, get_template
from .rollout import rollout_groups
from .trajectory import ImagePatches, Rollout, Trajectory


@torch.no_grad()
def teacher_forced(processor, samples: list[Sample], texts: list[tuple[str, ...]], cfg: RolloutConfig, *,
                   min_pixels: int, max_pixels: int, images: list | None = None, model=None) -> Rollout:
    """The conversations the rollout would build had the model written ``texts[i]`` (one
    string per assistant turn) for ``samples[i]``: SFT's batches, with the rollout's own
    box parsing, crop, token concatenation and loss mask. One trajectory per sample.

    With ``model``, ``texts`` may script turn 1 only: ``model`` then writes turn 2 greedily
    (the crop-answerability measure: given this box, does the model answer?)."""
    template = get_template(cfg.template)
    if not template.zoom_loop:  # (mgpo_k scripts end where their answer is)
        if any(len(script) != len(texts[0]) for script in texts) or not 0 < len(texts[0]) <= template.turns:
            raise ValueError(f"teacher_forced: every sample needs the same number of scripted turns, 1 to "
                             f"{template.turns} for the {cfg.template!r} template")
        if len(texts[0]) < template.turns and model is None:
            raise ValueError("teacher_forced: the texts script turn 1 only, and no model is given to write turn 2")
    ctx = Context(processor, template, replace(cfg, group_size=1, continue_turn2=False), special_ids(processor),
                   greedy=True, record_logprobs=False, min_pixels=min_pixels, max_pixels=max_pixels,
                   synced_gpus=False)
    prompts, skipped = encode_prompts(ctx, samples, images, texts)
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        trajectories, conversations = rollout_groups(model, ctx, prompts, first_group=0)
    finally:
        if was_training:
            model.train()
    return assemble(ctx, conversations, trajectories, skipped)


def chat_images(sample: Sample, first=None) -> list:
    """Every image of a chat record, decoded, in order (``first``: its first, already decoded)."""
    if first is None:
        return sample.load_images()
    paths = [value for _, parts in sample.messages for kind, value in parts if kind == "image"]
    return [first] + [load_image(p, sample.id) for p in paths[1:]]


def chat_forced(processor, samples: list[Sample], *, min_pixels: int, max_pixels: int,
                images: list | None = None, reserve: Sample | None = None) -> Rollout:
    """SFT on ``chat`` records (``Sample.messages``): each conversation encoded piece by piece
    as a rollout is, the text between assistant messages (system, user blocks, their images)
    untrained, each assistant message and its closing ``<|im_end|>`` trained; the same
    `assemble` builds the loss mask. ``images[i]``, when given, is sample i's first image
    decoded. A sample with an unreadable image is listed as skipped and replaced by
    ``reserve`` (a record whose images decode), so the batch keeps its size; without a
    reserve it is left out."""
    ctx = Context(processor, get_template("mgpo"), RolloutConfig(group_size=1), special_ids(processor),
                   greedy=True, record_logprobs=False, min_pixels=min_pixels, max_pixels=max_pixels,
                   synced_gpus=False)
    tok, im_end = processor.tokenizer, ctx.ids["<|im_end|>"]
    trajectories, conversations, skipped = [], [], []
    for k, sample in enumerate(samples):
        try:
            loaded = chat_images(sample, images[k] if images is not None else None)
        except BadImageError as e:
            skipped.append((sample.id, str(e)))
            if reserve is None:
                continue
            sample, loaded = reserve, chat_images(reserve)
        pieces, shown, targets = [], [], []
        for text, target in chat_pieces(processor, sample.messages):
            if target:
                pieces.append(Piece(torch.tensor(tok.encode(text, add_special_tokens=False) + [im_end]), True))
                targets.append(text)
                continue
            block = loaded[len(shown): len(shown) + text.count("<|vision_start|>")]
            out = processor(text=[text], images=block or None, return_tensors="pt")
            if block:  # one ImagePatches per image: the processor returns them concatenated
                grids = out["image_grid_thw"]
                for pixels, grid in zip(out["pixel_values"].split(grids.prod(-1).tolist()), grids.split(1)):
                    shown.append(ctx.add_image(ImagePatches(pixels, grid)))
            pieces.append(Piece(out["input_ids"][0], False))
        traj = Trajectory(sample.id, len(conversations), "", (), loaded[0].size,
                       input_size_from_grid(ctx.images[shown[0]].grid[0], ctx.family.patch), turns=len(targets))
        traj.turn1_text, traj.turn2_text = targets[0], targets[-1] if len(targets) > 1 else ""
        trajectories.append(traj)
        conversations.append(Conversation(pieces, shown))
    if not conversations:
        raise BadImageError("every conversation of the batch was skipped: " + "; ".join(r for _, r in skipped))
    return assemble(ctx, conversations, trajectories, skipped)


def chat_tokens(processor, sample: Sample, *, min_pixels: int, max_pixels: int) -> int:
    """Length of a ``chat`` record's whole conversation as `chat_forced` encodes it, without
    decoding an image: the text's tokens with each image placeholder expanded to the tokens
    of the header size resized by Qwen's rule. Lets training drop over-long records at load."""
    pieces = chat_pieces(processor, sample.messages)
    n_text = sum(len(processor.tokenizer.encode(text, add_special_tokens=False)) + int(target)  # (+ <|im_end|>)
                 for text, target in pieces)
    paths = [value for _, parts in sample.messages for kind, value in parts if kind == "image"]
    sizes = [(sample.width, sample.height)] + [image_size(path, sample.id) for path in paths[1:]]
    n_image, factor = 0, processor_family(processor).factor
    for w, h in sizes:
        rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels)  # as the processor resizes it
        n_image += (rh // factor) * (rw // factor) - 1  # (the placeholder token is in n_text)
    return n_text + n_image
