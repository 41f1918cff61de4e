"""The trainer's pure pieces: batch arithmetic, step slices, sampling checks, logged figures."""

import pytest

from mgpo.config import TrainConfig, load_config
from mgpo.core.metrics import rollout_metrics
from mgpo.core.setup import check_sampling, plan_batches
from mgpo.core.trainer import _step_slices, train
from mgpo.core.trajectory import Trajectory


def test_plan_batches_paper_preset_on_8_ranks():
    t = TrainConfig(prompts_per_rollout=512, prompts_per_step=128, micro_batch_size=2)
    plan = plan_batches(t, group_size=8, world=8)
    assert plan.prompts_per_rank == 64  # 512 / 8
    assert plan.steps_per_rollout == 4  # 512 / 128
    assert plan.trajectories_per_step == 128  # 128 / 8 prompts x 8 samples
    assert plan.grad_accum == 64  # 128 / 2


def test_plan_batches_names_every_mismatch():
    t = TrainConfig(prompts_per_rollout=10, prompts_per_step=4, micro_batch_size=3)
    with pytest.raises(ValueError) as e:
        plan_batches(t, group_size=4, world=3)
    msg = str(e.value)
    assert "prompts_per_rollout (10)" in msg and "number of processes (3)" in msg
    with pytest.raises(ValueError, match="micro_batch_size"):
        plan_batches(TrainConfig(prompts_per_rollout=4, prompts_per_step=2, micro_batch_size=3), 4, 1)


def test_step_slices_are_whole_groups_every_epoch():
    slices = list(_step_slices(groups=4, group_size=3, steps_per_rollout=2, ppo_epochs=2))
    assert slices == [list(range(0, 6)), list(range(6, 12))] * 2


def test_training_refuses_a_truncated_sampling_distribution():
    for override in ("rollout.top_p=0.9", "rollout.top_k=20"):
        cfg = load_config(None, [override])
        with pytest.raises(ValueError, match="truncated distribution"):
            check_sampling(cfg)
        with pytest.raises(ValueError, match="truncated distribution"):
            train(cfg)  # refused before anything is loaded
    check_sampling(load_config(None, []))


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
