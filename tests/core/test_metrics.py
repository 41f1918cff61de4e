"""mgpo.core.metrics: the logged rollout figures, hand-computed."""

import pytest

from mgpo.core.metrics import rollout_metrics
from mgpo.core.trajectory import Trajectory


def _traj(valid, box_original=None, text="", answer="A", size=(100, 100)):
    t = Trajectory("s", 0, answer, ("x", "y"), size, (50, 50), turn2_text=text, valid=valid,
                   box_original=box_original, box_input=[0, 0, 1, 1] if box_original else None,
                   turn1_tokens=10, turn2_tokens=5)
    return t


def test_rollout_metrics_hand_computed():
    trajs = [
        _traj(True, [0, 0, 50, 20], "\\boxed{A}"),  # right, crop share 0.1
        _traj(True, [0, 0, 100, 100], "\\boxed{B}"),  # wrong, crop share 1.0
        _traj(False, None, "\\boxed{A}"),  # right, no box
        _traj(False, None, ""),  # no answer
    ]
    m = rollout_metrics(trajs, [1.0, 0.0, 1.0, 0.0], group_size=2)
    assert m["reward/mean"] == 0.5
    assert m["reward/accuracy"] == 0.5
    assert m["reward/zero_variance_groups"] == 0.0  # (1, 0) and (1, 0)
    assert m["grounding/valid_box_share"] == 0.5
    assert m["grounding/crop_area_share"] == pytest.approx((0.1 + 1.0) / 2)
    assert m["length/turn1_tokens"] == 10 and m["rollout/trajectories"] == 4
    same = rollout_metrics(trajs, [1.0, 1.0, 0.0, 0.0], group_size=2)
    assert same["reward/zero_variance_groups"] == 1.0


def test_rollout_metrics_one_turn_template_with_a_valid_box():
    """A valid box in the one-turn template has no crop (box_original unset): no crash."""
    t = _traj(True, None, "")
    t.turns, t.turn1_text = 1, "\\boxed{A}"
    m = rollout_metrics([t, t], [1.0, 1.0], group_size=2)
    assert m["grounding/valid_box_share"] == 1.0 and m["grounding/crop_area_share"] == 0.0
    assert m["reward/accuracy"] == 1.0


def test_target_metrics_hand_computed():
    """IoU with the annotated target and "the box holds the target", over records with a target
    (0 and False without a valid box)."""
    target = ((0, 0, 50, 50),)
    one_turn = Trajectory("s", 0, "A", ("x", "y"), (100, 100), (50, 50), turns=1, valid=True,
                          box_input=[0, 0, 25, 25], box_original=[0, 0, 50, 50], target_boxes=target)
    invalid = Trajectory("s", 0, "A", ("x", "y"), (100, 100), (50, 50), valid=False, target_boxes=target)
    whole = Trajectory("s", 0, "A", ("x", "y"), (100, 100), (50, 50), valid=True, box_input=[0, 0, 50, 50],
                       box_original=[0, 0, 100, 100], target_boxes=target)
    no_target = _traj(True, [0, 0, 10, 10])
    m = rollout_metrics([one_turn, invalid, whole, no_target], [0, 0, 0, 0], group_size=2)
    assert m["grounding/iou"] == pytest.approx((1.0 + 0.0 + 0.25) / 3)
    assert m["grounding/box_holds_target"] == pytest.approx(2 / 3)
    assert "grounding/iou" not in rollout_metrics([no_target, no_target], [0, 0], group_size=2)


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


def test_turn_lengths_mean_p95_and_longest():
    """The lengths a run's time depends on: 19 rows of 10 tokens and one of 410 in turn 1."""
    trajs = [_traj(True) for _ in range(20)]
    trajs[7].turn1_tokens, trajs[3].turn2_tokens = 410, 0
    m = rollout_metrics(trajs, [0.0] * 20, group_size=4)
    assert m["length/turn1_tokens"] == 30.0 and m["length/turn1_tokens_max"] == 410.0
    # numpy's linear quantile: position 0.95 x 19 = 18.05 between the sorted 10 and 410
    assert m["length/turn1_tokens_p95"] == pytest.approx(10 + 0.05 * 400)
    assert m["length/turn2_tokens"] == pytest.approx(95 / 20) and m["length/turn2_tokens_max"] == 5.0
