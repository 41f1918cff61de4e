"""Run logging: TensorBoard, a metrics.jsonl to plot without it, a progress bar.

Only the main process writes. The scalars a step produces are computed in
``rollout_metrics`` from the trajectories, so every logged figure has one definition.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import ImageDraw

from . import distributed as D
from .grounding import area_share, target_fit
from .reward import predicted_letter, zero_variance_share

log = logging.getLogger("mgpo")


def setup_logging() -> None:
    level = logging.INFO if D.is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def rollout_metrics(trajectories, rewards, group_size: int) -> dict[str, float]:
    """Per-rollout figures: accuracy, the valid-box share (paper Fig. 7), crop area, lengths."""
    n = len(trajectories)
    rewards = np.asarray(rewards, dtype=float)
    crop_share = [area_share(t.box_original, t.original_size) for t in trajectories if t.box_original]
    return {
        "reward/mean": float(rewards.mean()),
        # the answer's correctness, not reward > 0 (a format bonus must not count as right)
        "reward/accuracy": float(np.mean([predicted_letter(t) == t.answer for t in trajectories])),
        "reward/zero_variance_groups": zero_variance_share(torch.as_tensor(rewards), group_size),
        "grounding/valid_box_share": float(np.mean([t.valid for t in trajectories])),
        "grounding/any_box_share": float(np.mean([t.box_input is not None for t in trajectories])),
        "grounding/crop_area_share": float(np.mean(crop_share)) if crop_share else 0.0,
        "length/turn1_tokens": float(np.mean([t.turn1_tokens for t in trajectories])),
        "length/turn2_tokens": float(np.mean([t.turn2_tokens for t in trajectories])),
        "length/turn1_truncated": float(np.mean([t.turn1_truncated for t in trajectories])),
        "length/turn2_truncated": float(np.mean([t.turn2_truncated for t in trajectories])),
        "rollout/trajectories": float(n),
    } | target_metrics(trajectories) | turn_metrics(trajectories)


def target_metrics(trajectories) -> dict[str, float]:
    """How close the boxes come to the records' annotated targets (records that have one): mean
    IoU with the box around every target (0 without a valid box) and the share of boxes that hold
    every target. Nothing in training sees these; they show whether grounding emerges."""
    grounded = [t for t in trajectories if t.target_boxes]
    if not grounded:
        return {}
    ious, holds = zip(*(target_fit(_original_box(t), t.target_boxes) for t in grounded))
    return {"grounding/iou": float(np.mean(ious)), "grounding/box_holds_target": float(np.mean(holds))}


def _original_box(t) -> list[float] | None:
    """The first valid box, in original pixels."""
    if t.turn_log:
        return next((r.box_original for r in t.turn_log if r.valid and r.box_original), None)
    return t.box_original if t.valid else None


def turn_metrics(trajectories) -> dict[str, float]:
    """K-turn rollouts (``mgpo_k``): turns and crops per trajectory, the share answering at each
    turn (the turns-used histogram), nested zooms, and the valid-box share of each turn among
    the trajectories that wrote that turn without answering. Empty for the paper's templates."""
    logs = [t.turn_log for t in trajectories if t.turn_log]
    if not logs:
        return {}
    out = {"turns/used": float(np.mean([len(log) for log in logs])),
           "turns/crops": float(np.mean([sum(r.crop_size is not None for r in log) for log in logs])),
           "turns/nested_zoom_share": float(np.mean([any(r.nested for r in log) for log in logs])),
           "turns/capped_share": float(np.mean([any(r.capped for r in log) for log in logs]))}
    for k in range(1, max(len(log) for log in logs) + 1):
        out[f"turns/answer_at_turn{k}"] = float(np.mean([len(log) == k for log in logs]))
        asked = [log[k - 1] for log in logs if len(log) > k]  # turns that zoomed or fell back
        if asked:
            out[f"turns/valid_box_share_turn{k}"] = float(np.mean([r.valid for r in asked]))
    return out


def draw_box(image, box, color=(255, 0, 0), width: int = 6):
    img = image.copy()
    ImageDraw.Draw(img).rectangle(box, outline=color, width=width)
    return img


def drop_rows_after(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``step``; return how many were dropped.

    A run killed between a log write and its next checkpoint resumes from that checkpoint and
    logs the same steps again: without this they would appear twice. A line cut by the kill goes too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and row.get("step", 0) <= step
        except ValueError:
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


class RunLogger:
    def __init__(self, output_dir: str | Path, total_steps: int, enabled: bool | None = None,
                 resume_step: int | None = None):
        """``resume_step``: the step of the checkpoint a run resumes from (None: a new run, step 0);
        rows logged after it by an interrupted run are dropped (metrics.jsonl) or hidden
        (TensorBoard's purge_step). A new run thus starts clean after one killed before its
        first checkpoint."""
        self.enabled = D.is_main() if enabled is None else enabled
        self.dir = Path(output_dir)
        self.writer = None
        self.bar = None
        self.start = time.time()
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        start = resume_step or 0
        if dropped := drop_rows_after(self.dir / "metrics.jsonl", start):
            log.info("metrics.jsonl: dropped %d row(s) logged after step %d by an interrupted run", dropped, start)
        self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start + 1)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="mgpo", dynamic_ncols=True)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        key = (f"step {step}: reward {metrics.get('reward/mean', 0):.3f}  valid-box "
               f"{metrics.get('grounding/valid_box_share', 0):.2f}  loss {metrics.get('train/loss', 0):+.4f}  "
               f"kl {metrics.get('train/kl', 0):.4f}  {metrics.get('time/step_s', 0):.1f}s/step")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(key.split(": ", 1)[1])
            self.bar.refresh()
        else:
            log.info(key)

    def examples(self, trajectories, images: dict, step: int, k: int = 2) -> None:
        """A few rollouts: the original with its box drawn, the crop, and the texts."""
        if not self.enabled:
            return
        for i, t in enumerate(trajectories[:k]):
            original = images.get(t.sample_id)
            if original is not None:
                shown = draw_box(original, t.box_original) if t.box_original else original
                shown.thumbnail((512, 512))
                self.writer.add_image(f"rollout{i}/original_with_box", np.asarray(shown), step, dataformats="HWC")
                if t.box_original:
                    crop = original.crop([int(v) for v in t.box_original])
                    crop.thumbnail((512, 512))
                    self.writer.add_image(f"rollout{i}/crop", np.asarray(crop), step, dataformats="HWC")
            self.writer.add_text(f"rollout{i}/text",
                                 f"**{t.sample_id}** answer {t.answer}, valid box {t.valid} {t.box_input}\n\n"
                                 + "\n\n".join(f"turn {j + 1}: `{x}`" for j, x in enumerate(t.texts)), step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()
