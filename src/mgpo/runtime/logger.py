"""Run logging: TensorBoard, a metrics.jsonl to plot without it, a progress bar.

``metrics.jsonl`` holds one row per logged optimizer step (every ``train.log_every`` steps):
that step's ``train/*`` figures (loss, KL, entropy, clip fraction, gradient norm, rate) and
the figures of the rollout batch it trained on (``reward/*``, ``grounding/*``, ``length/*``,
``time/*``), repeated on each step of that batch, so every row reads alone. Only the main
process writes. ``train.report_to`` picks where else the rows go: TensorBoard (written here) and
Weights & Biases (through accelerate's tracker, imported only when asked for). The rollout figures a step logs are computed from the
trajectories in ``mgpo.core.metrics``, so every logged figure has one definition.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import ImageDraw

from ..config import ConfigError
from . import distributed as D

log = logging.getLogger("mgpo")


def setup_logging() -> None:
    level = logging.INFO if D.is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def draw_box(image, box, color=(255, 0, 0), width: int = 6):
    img = image.copy()
    ImageDraw.Draw(img).rectangle(box, outline=color, width=width)
    return img


METRICS = "metrics.jsonl"  # in the run folder: one JSON object per logged row, with its "step"


def metric_rows(path: Path, upto: int) -> list[dict]:
    """The rows of ``metrics.jsonl`` logged up to step ``upto`` (a line cut by a kill is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= upto:
                rows.append(row)
    return rows


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


def external_trackers(report_to: str) -> list[str]:
    """accelerate's trackers for ``train.report_to`` (TensorBoard is written by RunLogger itself).

    >>> external_trackers("tensorboard"), external_trackers("none")
    ([], [])
    """
    names = ["wandb"] if report_to in ("wandb", "all") else []
    for name in names:  # accelerate silently drops a tracker whose package is missing
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to={report_to} needs the {name} package: pip install {name} "
                              "(or train.report_to=tensorboard)")
    return names


def start_trackers(accelerator, names: list[str], project: str, run_name: str, config: dict) -> None:
    """Start accelerate's trackers (every process calls it; only the main one logs)."""
    if names:
        accelerator.init_trackers(project, config=config, init_kwargs={"wandb": {"name": run_name}})


def pick_examples(trajectories, k: int) -> list:
    """Up to ``k`` trajectories, the first of each prompt (group) first, so the examples show
    different prompts where the batch has several; then further samples in order."""
    firsts = {}
    for t in trajectories:
        firsts.setdefault(t.group, t)
    chosen = list(firsts.values())[:k]
    rest = [t for t in trajectories if all(t is not c for c in chosen)]
    return chosen + rest[: k - len(chosen)]


CONSOLE = (("reward/mean", "reward", "{:.3f}"), ("grounding/valid_box_share", "valid-box", "{:.2f}"),
           ("grounding/iou", "IoU", "{:.2f}"), ("grounding/box_holds_target", "holds-target", "{:.2f}"),
           ("train/loss", "loss", "{:+.4f}"), ("train/kl", "kl", "{:.4f}"), ("time/step_s", "", "{:.1f}s/step"))
"""The figures of a training step's console line, in order: each shown only when the step logged it
(SFT has no reward or KL; IoU and holds-target need records with target boxes)."""


def console_figures(metrics: dict[str, float]) -> str:
    """
    >>> console_figures({"train/loss": 0.5, "train/nll": 0.5, "time/step_s": 2.0})
    'loss +0.5000  2.0s/step'
    """
    return "  ".join(((name + " ") if name else "") + form.format(metrics[key])
                     for key, name, form in CONSOLE if key in metrics)


class RunLogger:
    def __init__(self, output_dir: str | Path, total_steps: int, enabled: bool | None = None,
                 resume_step: int | None = None, tensorboard: bool = True, accelerator=None):
        """``resume_step``: the step of the checkpoint a run resumes from (None: a new run, step 0);
        rows logged after it by an interrupted run are dropped (metrics.jsonl) or hidden
        (TensorBoard's purge_step). A new run thus starts clean after one killed before its
        first checkpoint. ``accelerator``: one whose trackers (``start_trackers``) get every row too."""
        self.enabled = D.is_main() if enabled is None else enabled
        self.dir = Path(output_dir)
        self.writer = None
        self.bar = None
        self.accelerator = accelerator
        self.start = time.time()
        if not self.enabled:
            return
        start = resume_step or 0
        if dropped := drop_rows_after(self.dir / METRICS, start):
            log.info("metrics.jsonl: dropped %d row(s) logged after step %d by an interrupted run", dropped, start)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start + 1)
        self.jsonl = open(self.dir / METRICS, "a")  # noqa: SIM115 - closed in close()
        if sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns >= 40:
            from tqdm import tqdm

            # a resumed run's bar starts at its step; off a terminal (or in one too narrow to show
            # the figures) each logged step is a log line instead
            self.bar = tqdm(total=total_steps, initial=start, desc="mgpo", dynamic_ncols=True)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if self.accelerator is not None:
            self.accelerator.log(metrics, step=step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        key = f"step {step}: " + console_figures(metrics)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(key.split(": ", 1)[1])
            self.bar.refresh()
        else:
            log.info(key)

    def examples(self, trajectories, images: dict, step: int, k: int = 2) -> None:
        """A few rollouts, from different prompts where the batch has several: the original with
        the policy's box (red) and the record's target boxes (green) drawn, the crop, the texts.
        ``images`` (the batch's originals, shared with the rollout) are never modified."""
        if not self.enabled or self.writer is None:
            return
        for i, t in enumerate(pick_examples(trajectories, k)):
            original = images.get(t.sample_id)
            if original is not None:
                shown = original.copy()  # thumbnail() resizes in place
                for target in t.target_boxes:
                    shown = draw_box(shown, list(target), color=(0, 200, 0))
                if t.box_original:
                    shown = draw_box(shown, t.box_original)
                shown.thumbnail((512, 512))
                self.writer.add_image(f"rollout{i}/original_with_box", np.asarray(shown), step, dataformats="HWC")
                if t.box_original:
                    crop = original.crop([int(v) for v in t.box_original])
                    crop.thumbnail((512, 512))
                    self.writer.add_image(f"rollout{i}/crop", np.asarray(crop), step, dataformats="HWC")
            self.writer.add_text(f"rollout{i}/text",
                                 f"**{t.sample_id}** answer {t.answer}, valid box {t.valid} {t.box_input}, "
                                 f"target {[list(b) for b in t.target_boxes] or '-'}\n\n"
                                 + "\n\n".join(f"turn {j + 1}: `{x}`" for j, x in enumerate(t.texts)), step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.accelerator is not None:
            self.accelerator.end_training()
        self.jsonl.close()
