"""RunLogger on resume: rows an interrupted run logged after its last checkpoint are not repeated."""

import json

from mgpo.logger import RunLogger


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


def test_fresh_run_appends(tmp_path):
    for steps in ((1, 2), (3,)):
        lg = RunLogger(tmp_path, total_steps=3, enabled=True)
        for s in steps:
            lg.scalars({"x": 1.0}, s)
        lg.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]


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
