"""RunLogger on resume: rows an interrupted run logged after its last checkpoint are not repeated."""

import json

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


def test_turn_metrics_of_k_turn_rollouts():
    """Turns used, crops, answer-at-turn shares, nested zooms, per-turn valid boxes (mgpo_k);
    the paper's two-turn trajectories add none of these keys."""
    from mgpo.core.metrics import rollout_metrics
    from mgpo.core.trajectory import Trajectory, TurnRecord

    def traj(*actions):
        log = [TurnRecord("", 1, False, a, valid=a == "zoom", nested=a == "zoom" and k > 0 and actions[k - 1] == "zoom",
                          crop_size=(28, 28) if a == "zoom" else None) for k, a in enumerate(actions)]
        return Trajectory("x", 0, "A", ("a", "b"), (10, 10), (10, 10), turn_log=log)

    ts = [traj("answer"), traj("zoom", "zoom", "final"), traj("fallback", "zoom", "answer"), traj("zoom", "answer")]
    m = rollout_metrics(ts, [0, 0, 0, 1], group_size=2)
    assert m["turns/used"] == 2.25 and m["turns/crops"] == 1.0
    assert (m["turns/answer_at_turn1"], m["turns/answer_at_turn2"], m["turns/answer_at_turn3"]) == (0.25, 0.25, 0.5)
    assert m["turns/nested_zoom_share"] == 0.25
    assert m["turns/valid_box_share_turn1"] == 2 / 3 and m["turns/valid_box_share_turn2"] == 1.0
    assert "turns/valid_box_share_turn3" not in m
    two = Trajectory("x", 0, "A", ("a", "b"), (10, 10), (10, 10))
    assert not any(k.startswith("turns/") for k in rollout_metrics([two, two], [0, 1], group_size=2))
