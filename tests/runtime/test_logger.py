"""RunLogger on resume: rows an interrupted run logged after its last checkpoint are not repeated."""

import json

import pytest

from mgpo.runtime.logger import RunLogger


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_drops_rows_past_the_checkpoint(tmp_path):
    first = RunLogger(tmp_path, total_steps=6, enabled=True)
    for step in range(1, 6):
        first.scalars({"reward/mean": float(step)}, step)
    first.jsonl.write('{"step": 6, "reward/me')  # a line cut by the kill
    first.close()
    # the checkpoint is at step 3: steps 4 and 5 are trained and logged again
    again = RunLogger(tmp_path, total_steps=6, enabled=True, resume_step=3)
    for step in (4, 5):
        again.scalars({"reward/mean": 10.0 + step}, step)
    again.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["reward/mean"] for r in rows] == [1.0, 2.0, 3.0, 14.0, 15.0]


def test_new_run_after_one_killed_before_its_first_checkpoint_starts_clean(tmp_path):
    """No checkpoint: the run starts again at step 1, so the killed run's rows would repeat."""
    killed = RunLogger(tmp_path, total_steps=3, enabled=True)
    for step in (1, 2):
        killed.scalars({"x": 1.0}, step)
    killed.close()
    again = RunLogger(tmp_path, total_steps=3, enabled=True)
    for step in (1, 2, 3):
        again.scalars({"x": 2.0}, step)
    again.close()
    assert [(r["step"], r["x"]) for r in _rows(tmp_path / "metrics.jsonl")] == [(1, 2.0), (2, 2.0), (3, 2.0)]


def test_resume_hides_tensorboard_points_past_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLogger(tmp_path, total_steps=6, enabled=True)
    for step in range(1, 6):
        first.scalars({"reward/mean": float(step)}, step)
    first.close()
    again = RunLogger(tmp_path, total_steps=6, enabled=True, resume_step=3)
    for step in (4, 5):
        again.scalars({"reward/mean": 10.0 + step}, step)
    again.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("reward/mean")]
    assert points == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]


def _examples_case():
    """Two prompts' originals (2000 x 1000): a red square at x 1000-1400, y 400-800 in the first."""
    import numpy as np
    from PIL import Image

    from mgpo.core.trajectory import Trajectory

    pixels = np.full((1000, 2000, 3), 128, dtype=np.uint8)
    pixels[400:800, 1000:1400] = (255, 0, 0)
    images = {"a": Image.fromarray(pixels), "b": Image.fromarray(np.zeros((600, 900, 3), dtype=np.uint8))}

    def traj(sid, group, box=None, targets=()):
        return Trajectory(sid, group, "A", ("x", "y"), images[sid].size, (448, 224), box_original=box,
                          valid=box is not None, target_boxes=targets)
    return images, traj


class _Recorder:
    def __init__(self):
        self.images, self.texts = {}, {}

    def add_image(self, tag, array, step, dataformats):
        self.images[tag] = array

    def add_text(self, tag, text, step):
        self.texts[tag] = text


def test_examples_leave_the_shared_original_alone_and_crop_it_at_full_size(tmp_path):
    """Two samples of one prompt, the first without a valid box: the second's crop is still cut
    from the full-size original (it used to be cut from the first example's 512-px thumbnail)."""
    images, traj = _examples_case()
    logger = RunLogger(tmp_path, total_steps=1, enabled=True)
    logger.writer.close()
    logger.writer = recorder = _Recorder()
    logger.examples([traj("a", 0), traj("a", 0, box=[1000, 400, 1400, 800])], images, step=1)
    assert images["a"].size == (2000, 1000)
    crop = recorder.images["rollout1/crop"]
    assert crop.shape[:2] == (400, 400) and (crop.reshape(-1, 3) == (255, 0, 0)).all()


def test_examples_come_from_different_prompts_and_draw_the_target(tmp_path):
    images, traj = _examples_case()
    logger = RunLogger(tmp_path, total_steps=1, enabled=True)
    logger.writer.close()
    logger.writer = recorder = _Recorder()
    batch = [traj("a", 0, targets=((1000.0, 400.0, 1400.0, 800.0),)), traj("a", 0), traj("b", 1), traj("b", 1)]
    logger.examples(batch, images, step=1)
    assert "**a**" in recorder.texts["rollout0/text"] and "**b**" in recorder.texts["rollout1/text"]
    shown = recorder.images["rollout0/original_with_box"]  # 512 x 256: the target's outline in green
    assert shown.shape[:2] == (256, 512)
    green = (shown[..., 1] > 150) & (shown[..., 0] < 100)
    ys, xs = green.nonzero()
    assert green.any() and 250 <= xs.min() <= 258 and 354 <= xs.max() <= 360 and 100 <= ys.min() <= 104


# ---- train.report_to

def test_report_to_is_checked_at_load():
    import pytest

    from mgpo.config import ConfigError, load_config

    assert load_config(None).train.report_to == "tensorboard"
    with pytest.raises(ConfigError, match="train.report_to must be one of .*'wandb'.*got 'tensorbord'"):
        load_config(None, ["train.report_to=tensorbord"])


def test_a_tracker_whose_package_is_missing_is_refused_not_dropped():
    import importlib.util

    import pytest

    from mgpo.config import ConfigError
    from mgpo.runtime.logger import external_trackers

    assert external_trackers("tensorboard") == external_trackers("none") == []
    if importlib.util.find_spec("wandb") is not None:
        assert external_trackers("wandb") == external_trackers("all") == ["wandb"]
    else:  # accelerate itself would drop it with a debug message and log nowhere
        with pytest.raises(ConfigError, match="pip install wandb"):
            external_trackers("wandb")


def test_rows_go_to_accelerates_trackers_and_tensorboard_only_when_asked(tmp_path):
    class FakeAccelerator:
        def __init__(self):
            self.rows, self.ended = [], False

        def log(self, values, step):
            self.rows.append((step, values))

        def end_training(self):
            self.ended = True

    acc = FakeAccelerator()
    logger = RunLogger(tmp_path, total_steps=2, enabled=True, tensorboard=False, accelerator=acc)
    logger.scalars({"train/loss": 0.5}, 1)
    logger.close()
    assert acc.rows == [(1, {"train/loss": 0.5})] and acc.ended
    assert not (tmp_path / "tensorboard").exists() and _rows(tmp_path / "metrics.jsonl") == [
        {"step": 1, "train/loss": 0.5}]


@pytest.mark.parametrize("report_to", ["none", "tensorboard"])
def test_report_to_tensorboard_or_none_never_imports_wandb(tmp_path, report_to):
    import subprocess
    import sys

    code = f"""
import sys
from mgpo.runtime.distributed import make_accelerator
from mgpo.runtime.logger import RunLogger, external_trackers, start_trackers
names = external_trackers({report_to!r})
acc = make_accelerator(1, 1, 1.0, log_with=names)
start_trackers(acc, names, "mgpo", "run", {{}})
logger = RunLogger({str(tmp_path)!r}, 1, enabled=True, tensorboard={report_to == "tensorboard"},
                   accelerator=acc if names else None)
logger.scalars({{"train/loss": 1.0}}, 1)
logger.close()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("wandb", "comet_ml", "mlflow", "aim", "clearml")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "tensorboard").exists() == (report_to == "tensorboard")


def test_the_progress_bar_starts_at_the_resumed_step_and_only_on_a_real_terminal(tmp_path, monkeypatch, caplog):
    """After a resume the bar started at 0 and jumped; on a terminal without a width it hid the
    step lines."""
    import os
    import shutil
    import sys

    from mgpo.runtime.logger import RunLogger

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((120, 40)))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    resumed = RunLogger(tmp_path / "a", total_steps=30, enabled=True, resume_step=20, tensorboard=False)
    assert resumed.bar is not None and resumed.bar.n == 20 and resumed.bar.total == 30
    resumed.close()
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((0, 0)))
    narrow = RunLogger(tmp_path / "b", total_steps=30, enabled=True, tensorboard=False)
    assert narrow.bar is None
    with caplog.at_level("INFO", logger="mgpo"):
        narrow.scalars({"train/loss": 0.5, "reward/mean": 0.25, "grounding/iou": 0.75, "time/step_s": 1.0}, 1)
    narrow.close()
    assert "step 1: reward 0.250  IoU 0.75  loss +0.5000  1.0s/step" in caplog.text
