"""mgpo.core.setup: batch arithmetic, sampling checks, the training data."""

import json

import pytest
from PIL import Image

from mgpo.config import TrainConfig, load_config
from mgpo.core.setup import check_sampling, inert_ratio_settings, plan_batches
from mgpo.core.trainer import train


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


@pytest.mark.parametrize("loss", [["loss.ratio=sequence"], ["loss.ratio=geometric"], ["loss.clip_eps_high=0.28"]])
def test_ratio_settings_that_cannot_act_are_warned_of(loss):
    """One optimizer step per rollout batch, one pass: every ratio is 1, so GSPO, GMPO and
    clip-higher train as PPO does; said at start-up. Off-policy steps (a rollout batch feeding two
    steps, or two PPO epochs) and the plain token ratio get no warning."""
    on_policy = ["train.prompts_per_rollout=8", "train.prompts_per_step=8", "train.micro_batch_size=8"]
    cfg = load_config(None, [*on_policy, *loss])
    warning = inert_ratio_settings(cfg, plan_batches(cfg.train, 8, 1))
    assert warning and "every ratio is 1" in warning and loss[0].split("=")[1] in warning
    for off_policy in (["train.prompts_per_rollout=16"], ["train.ppo_epochs=2"]):
        cfg = load_config(None, [*on_policy, *loss, *off_policy])
        assert inert_ratio_settings(cfg, plan_batches(cfg.train, 8, 1)) is None
    cfg = load_config(None, on_policy)
    assert inert_ratio_settings(cfg, plan_batches(cfg.train, 8, 1)) is None


def test_training_refuses_a_truncated_sampling_distribution():
    for override in ("rollout.top_p=0.9", "rollout.top_k=20"):
        cfg = load_config(None, [override])
        with pytest.raises(ValueError, match="truncated distribution"):
            check_sampling(cfg)
        with pytest.raises(ValueError, match="truncated distribution"):
            train(cfg)  # refused before anything is loaded
    check_sampling(load_config(None, []))


def _png(path, size=(64, 48), color=(200, 20, 20)):
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _chat_file(folder, long_chars):
    _png(folder / "a.png", (300, 200))
    _png(folder / "b.png", (120, 160))
    user = {"role": "user", "content": [{"type": "image", "image": "a.png"}, "What colour?"]}
    rows = [{"id": "ok", "messages": [user, {"role": "assistant", "content": "Red."},
                                      {"role": "user", "content": [{"type": "image", "image": "b.png"}, "And?"]},
                                      {"role": "assistant", "content": "Blue."}]},
            {"id": "long", "messages": [user, {"role": "assistant", "content": "word " * (long_chars // 5)}]}]
    return _jsonl(folder / "chat.jsonl", rows)


def test_a_chat_record_over_the_token_limit_is_skipped_at_load(tmp_path, tiny_dir):
    from mgpo.config import load_config
    from mgpo.core.setup import load_training_data
    from mgpo.runtime.model import load_processor

    path = _chat_file(tmp_path, 200_000)
    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={path}", "train.algorithm=sft"])
    data = load_training_data(cfg, load_processor(cfg.model))
    assert [s.id for s in data] == ["ok"]
    assert data.skipped[0][0] == "long" and "over data.max_prompt_tokens (8192)" in data.skipped[0][1]
    assert data.skipped[0][1].startswith("conversation has")


def test_half_precision_full_finetuning_outside_deepspeed_is_refused(tmp_path):
    """AdamW on bf16 weights: at lr 1e-6 one step moved 2% of the elements (all of them in fp32).
    Refused before any model loads, naming the three launches that train correctly."""
    from mgpo.config import ConfigError
    from mgpo.core.setup import check_precision

    cfg = load_config(None, ["model.dtype=bfloat16", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="full fine-tuning outside DeepSpeed") as refused:
        check_precision(cfg, deepspeed=False, device="cpu")
    assert "DeepSpeed" in str(refused.value) and "train.lora_rank" in str(refused.value)
    assert "model.dtype=float32" in str(refused.value)
    with pytest.raises(ConfigError, match="full fine-tuning outside DeepSpeed"):
        train(cfg)  # the trainer itself refuses, before loading anything
    assert not (tmp_path / "run" / "config.yaml").exists()
    check_precision(cfg, deepspeed=True, device="cpu")  # DeepSpeed keeps fp32 master weights
    check_precision(load_config(None, ["model.dtype=bfloat16", "train.lora_rank=8"]), deepspeed=False, device="cpu")
    check_precision(load_config(None, ["model.dtype=float32"]), deepspeed=False, device="cpu")


@pytest.mark.parametrize("state, named", [({"step": 4, "epoch": 0, "batch": 10**9}, "batch=1000000000"),
                                          ({"step": 4, "epoch": -5, "batch": 1}, "epoch=-5"),
                                          ({"step": 4, "epoch": 0, "batch": "3"}, "batch='3'"),
                                          ({"step": True, "epoch": 0, "batch": 1}, "step=True")])
def test_resumed_counters_no_run_writes_are_refused(tmp_path, state, named):
    """Hand-edited trainer_state.json values were accepted once the manifest's checksums were
    recomputed (the run's own resume path is checked in tests/system/test_checkpoint_runs.py)."""
    from mgpo.core.setup import check_resumed_state
    from mgpo.runtime.model import CheckpointError

    with pytest.raises(CheckpointError, match="holds values no run writes") as refused:
        check_resumed_state(state, 8, tmp_path / "trainer_state.json")
    assert named in str(refused.value)
    check_resumed_state({"step": 4, "epoch": 3, "batch": 8}, 8, tmp_path / "trainer_state.json")
