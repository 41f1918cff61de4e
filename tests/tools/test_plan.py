"""mgpo.tools.plan: DeepSpeed's cross-check, the GPU counts, ZeRO-3's traffic."""

import pytest

from mgpo.config import load_config
from mgpo.runtime.memory import count_params, plan
from mgpo.tools.plan import deepspeed_estimate_gb

PAPER = "configs/qwen2_5_vl_7b_mgpo.yaml"


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize("arch", ["qwen2.5-vl-3b", "qwen2.5-vl-7b"])
def test_model_states_match_deepspeeds_estimator(arch, world):
    pytest.importorskip("deepspeed")
    cfg = load_config(PAPER)
    p = count_params(arch)
    pl = plan(cfg, world, 80, arch=arch)
    # DeepSpeed's estimator has no term for the gradient-accumulation dtype: compare with the
    # grad partitions at 2 bytes, and check the fp32 ones separately.
    (grads_gb,) = [gb for what, gb, _ in pl.lines if what.startswith("fp32 accumulated grads")]
    trainable = p.total - (p.vision if cfg.train.freeze_vision else 0)
    assert grads_gb == pytest.approx(4 * trainable / world / 1e9)
    ours = pl.model_states_gb - grads_gb / 2
    theirs = deepspeed_estimate_gb(p.total, p.largest_module, world)
    assert abs(ours - theirs) / theirs < 0.10, (ours, theirs)


def test_shipped_zero3_config_accumulates_gradients_in_fp32():
    """Summed in bf16 (8 bits of mantissa), the 7B preset's 64 micro-batch gradients per step
    would lose their small terms; the key is DeepSpeed's own (deepspeed.runtime.constants)."""
    import json
    from pathlib import Path

    ds = json.loads(Path("configs/deepspeed/zero3.json").read_text())
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    constants = pytest.importorskip("deepspeed.runtime.constants")
    assert constants.DATA_TYPES in ds and constants.GRAD_ACCUM_DTYPE in ds[constants.DATA_TYPES]


@pytest.mark.parametrize("gpus", [24, 48, 256])
def test_the_plan_refuses_the_gpu_counts_the_trainer_refuses(gpus):
    """The paper's preset (128 prompts per step) on 24, 48 or 256 GPUs: the trainer's start-up check
    refuses, so the plan must too (it said "fits" before), naming the counts that work."""
    from mgpo.config import ConfigError
    from mgpo.core.setup import plan_batches
    from mgpo.tools.plan import main

    cfg = load_config(PAPER)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        plan_batches(cfg.train, cfg.rollout.group_size, gpus)
    with pytest.raises(ConfigError, match=rf"--gpus {gpus}: the trainer refuses .* 1, 2, 4, 8, 16, 32, 64, 128$"):
        main(["--config", PAPER, "--gpus", str(gpus), "--gpu-memory", "80"])


def test_the_plan_lists_the_gpu_counts_the_trainer_accepts(capsys):
    from mgpo.tools.plan import gpu_counts, main

    assert gpu_counts(load_config(PAPER)) == [1, 2, 4, 8, 16, 32, 64, 128]
    main(["--config", PAPER, "--gpus", "16", "--gpu-memory", "80"])
    assert "from 16 up: 16, 32, 64, 128 (largest: 128)" in capsys.readouterr().out


def test_zero3_traffic_on_the_papers_preset_by_hand():
    """8 GPUs: 16 prompts x 8 samples per rank and step, micro-batch 2 -> 64 micro-batches, each
    gathering the 8,292,166,656 bf16 parameters twice and reducing the 7,615,616,512 trainable
    ones' bf16 gradients; old-policy and reference passes over the 4 steps' micro-batches, once per
    rollout batch of 4 steps; generation gathers once per rollout batch."""
    from mgpo.tools.plan import zero3_traffic

    tr = zero3_traffic(load_config(PAPER), count_params("qwen2.5-vl-7b"), 8)
    params, trainable = 2 * 8_292_166_656, 2 * 7_615_616_512
    assert tr.train == 64 * (2 * params + trainable) == 3_097_593_577_472
    assert tr.logprobs == 2 * 64 * params  # (old + reference) x 64 micro-batches x 4 steps / 4 steps
    assert tr.generation == params / 4
    # a ring inside a node moves 7/8 of it through each GPU; between nodes each node takes it all
    assert tr.seconds("gpu", 450) == pytest.approx(tr.total * 7 / 8 / 450e9)
    assert tr.seconds("node", 12.5) == pytest.approx(tr.total / 12.5e9)
    no_kl = zero3_traffic(load_config(PAPER, ["loss.kl_coef=0"]), count_params("qwen2.5-vl-7b"), 8)
    assert no_kl.logprobs == tr.logprobs / 2


@pytest.mark.parametrize("args, error", [
    (["--gpus", "0"], "--gpus: must be at least 1, got 0"),
    (["--gpus", "-8"], "--gpus: must be at least 1, got -8"),
    (["--gpus", "8", "--gpu-memory", "nan"], "--gpu-memory: must be a finite number above 0, got nan"),
    (["--gpus", "8", "--gpu-memory", "inf"], "--gpu-memory: must be a finite number above 0, got inf"),
    (["--gpus", "8", "--bandwidth", "0"], "--bandwidth: must be a finite number above 0, got 0"),
    (["--gpus", "8", "--text-tokens", "-5"], "--text-tokens: must be at least 1, got -5"),
])
def test_the_plan_refuses_out_of_range_arguments_in_one_line(args, error, capsys):
    """Each crashed, or printed a plan for a negative number of GPUs."""
    from mgpo.tools.plan import main

    with pytest.raises(SystemExit) as stopped:
        main(["--config", PAPER, "--gpu-memory", "80", *args])
    assert stopped.value.code == 2 and error in capsys.readouterr().err


def test_the_plan_of_a_model_it_cannot_size_is_one_line(tiny_dir):
    from mgpo.config import ConfigError
    from mgpo.tools.plan import main

    with pytest.raises(ConfigError, match="hidden_size 64 is none of .*the published Qwen2.5-VL architectures only"):
        main(["--config", "configs/tiny_cpu.yaml", "--gpus", "1", "--gpu-memory", "80", f"model.path={tiny_dir}"])
