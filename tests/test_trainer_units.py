"""The trainer's pure pieces: batch arithmetic, step slices, sampling checks, logged figures."""

import json

import pytest
import torch

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


def _one_step(tmp_path, tiny_dir, synth_dir, micro_batch_size, normalization="token"):
    """The figures of one SFT optimizer step over the same 4 records, in micro-batches of the given size."""
    from mgpo.core.setup import setup_run
    from mgpo.core.trainer import _next_prompts, _sft_experience, optimizer_step

    out = tmp_path / f"run-{micro_batch_size}-{normalization}"
    data = tmp_path / "train.jsonl"
    if not data.exists():  # the synthetic records with one short label, so the targets differ in length
        recs = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
        for r in recs:
            r["image"], r["category"] = str(synth_dir / r["image"]), r["category"] if r is not recs[0] else "hue"
        data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={data}",
                             f"train.output_dir={out}", "train.algorithm=sft", "train.prompts_per_rollout=4",
                             "train.prompts_per_step=4", f"train.micro_batch_size={micro_batch_size}",
                             f"loss.normalization={normalization}", "model.dtype=float32"])
    run = setup_run(cfg)
    assert run.plan.grad_accum == 4 // micro_batch_size
    prompts, images, _ = _next_prompts(run)
    exp = _sft_experience(run, prompts, images)
    with torch.no_grad():  # the step's NLL per trajectory, by hand, before the step moves the weights
        r = exp.batch
        logp_NT, _ = run.wrapped(loss_mask=r.loss_mask, **r.model_inputs())
        nll_N, tokens_N = -(logp_NT * r.loss_mask).sum(1).double(), r.loss_mask.sum(1).double()
    hand = {"token": (nll_N.sum() / tokens_N.sum()).item(), "sequence": (nll_N / tokens_N).mean().item()}
    return optimizer_step(run, exp, list(range(4))), hand


def test_step_gradient_does_not_depend_on_the_micro_batch_split(tmp_path, tiny_dir, synth_dir):
    """The same 4 trajectories in 1, 2 or 4 micro-batches give the same loss and the same
    gradient (its norm before clipping): the step's loss is one mean over the whole step.
    Without the ``* grad_accum`` rescale in optimizer_step the gradient shrank by the
    number of micro-batches."""
    token = {m: _one_step(tmp_path, tiny_dir, synth_dir, m)[0] for m in (1, 2, 4)}
    for m in (1, 2):
        assert token[m]["loss"] == pytest.approx(token[4]["loss"], rel=1e-5)
        assert token[m]["grad_norm"] == pytest.approx(token[4]["grad_norm"], rel=1e-4)



def test_sequence_normalization_over_the_whole_step(tmp_path, tiny_dir, synth_dir):
    """loss.normalization=sequence: the step's loss is the mean over its trajectories of each
    one's token mean, whatever the micro-batch split; token (the default) is the token mean."""
    (seq1, hand), (seq4, _) = (_one_step(tmp_path, tiny_dir, synth_dir, m, "sequence") for m in (1, 4))
    token1, _ = _one_step(tmp_path, tiny_dir, synth_dir, 1)
    assert abs(hand["sequence"] - hand["token"]) > 1e-5 * hand["token"], "the lengths must differ for this test"
    assert seq1["loss"] == pytest.approx(hand["sequence"], rel=1e-6)
    assert seq4["loss"] == pytest.approx(hand["sequence"], rel=1e-6)
    assert seq1["grad_norm"] == pytest.approx(seq4["grad_norm"], rel=1e-4)
    assert token1["loss"] == pytest.approx(hand["token"], rel=1e-6)
