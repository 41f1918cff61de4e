"""mgpo.runtime.memory, the GPU memory plan: a CPU measurement, what to change, the hardware the
shipped presets name (DeepSpeed's cross-check is in tests/tools/test_plan.py)."""

import argparse
import re
from pathlib import Path

import pytest

from mgpo.config import load_config
from mgpo.runtime.archs import ARCHS
from mgpo.runtime.memory import (
    MEASURED_ACT,
    activation_bytes,
    count_params,
    kv_bytes_per_token,
    plan,
    verdict,
)

PAPER = "configs/qwen2_5_vl_7b_mgpo.yaml"
LORA = "configs/qwen2_5_vl_7b_mgpo_lora_1gpu.yaml"
ONE_CALL = ["rollout.generation_batch_size=0"]  # every prompt of a rank in one generate call


def test_parameter_counts_are_the_published_models():
    # The counts public loader logs and model registries report for the published checkpoints
    # (3B: 3,754,622,976 with a 311,164,928 embedding; 7B: 8,292,166,656 with a 676,550,144
    # vision tower): the table in mgpo.runtime.archs builds those exact models.
    p3, p7 = count_params("qwen2.5-vl-3b"), count_params("qwen2.5-vl-7b")
    assert (p3.total, p3.embedding) == (3_754_622_976, 311_164_928)
    assert (p7.total, p7.vision, p7.embedding) == (8_292_166_656, 676_550_144, 544_997_376)
    # Qwen3-VL-8B-Instruct: 8.77 B as its model page reports (the table's widths build 8,767,123,696)
    assert round(count_params("qwen3-vl-8b").total / 1e7) == 877


def test_a_checkpoint_is_matched_to_an_architecture_of_its_own_family(tmp_path):
    """Qwen2.5-VL-3B and Qwen3-VL-2B share a 2048 hidden size; config.json's model_type tells them
    apart, and a Qwen3-VL folder of the 8B widths is planned as Qwen3-VL-8B."""
    import json

    from mgpo.runtime.memory import arch_for

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "text_config": {
        "hidden_size": 4096, "num_hidden_layers": 2}, "vision_config": {"depth": 2}}))
    assert arch_for(load_config(PAPER, [f"model.path={tmp_path}"])).name == "qwen3-vl-8b"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "text_config": {
        "hidden_size": 3584}}))
    with pytest.raises(ValueError, match="hidden_size 3584"):
        arch_for(load_config(PAPER, [f"model.path={tmp_path}"]))


def test_kv_and_activation_figures_match_a_cpu_measurement():
    """The plan's per-layer figures against a fresh measurement at 2 vs 1 layers (3B widths)."""
    from mgpo.tools.bench import measure_layer_bytes

    a = ARCHS["qwen2.5-vl-3b"]
    measured = measure_layer_bytes(a.name, tokens=256)
    assert kv_bytes_per_token(a, layers=1) == pytest.approx(measured["kv"], rel=0.2)
    assert activation_bytes(a, 1, checkpointing=False, layers=1) == pytest.approx(measured["act"], rel=0.2)
    assert MEASURED_ACT[a.name]["act_ckpt"] == pytest.approx(measured["act_ckpt"], rel=0.2)
    assert MEASURED_ACT[a.name]["prefill"] == pytest.approx(measured["prefill_peak"], rel=0.2)
    # Checkpointing keeps a layer's input only: the two figures differ by far more than 20%.
    assert measured["act_ckpt"] < 0.1 * measured["act"]


def test_the_papers_run_at_its_token_limits_does_not_fit_and_says_what_to_change():
    cfg = load_config(PAPER, ONE_CALL)
    pl = plan(cfg, 8, 80)
    assert not pl.fits
    assert pl.verdict.startswith("does not fit") and "rollout: at most" in pl.verdict
    assert f"at most {pl.max_generation_groups} prompt group(s)" in pl.verdict and pl.max_generation_groups >= 1
    assert "rollout.max_new_tokens_turn1/2" in pl.verdict


SHORT = ["rollout.max_new_tokens_turn1=1024", "rollout.max_new_tokens_turn2=1024", *ONE_CALL]


def test_following_the_advice_fits_and_one_group_more_does_not():
    advice = plan(load_config(PAPER, SHORT), 8, 80)
    assert not advice.fits and advice.max_generation_groups >= 1
    n = advice.max_generation_groups
    fits = plan(load_config(PAPER, SHORT + [f"train.prompts_per_rollout={8 * n}"]), 8, 80)
    assert fits.fits and fits.verdict.startswith("fits"), fits.verdict
    assert max(fits.phases.values()) <= fits.usable_gb
    over = plan(load_config(PAPER, SHORT + [f"train.prompts_per_rollout={8 * (n + 1)}"]), 8, 80)
    assert not over.fits and over.phases["rollout"] > over.usable_gb


def test_too_large_a_micro_batch_is_named_with_the_largest_that_fits():
    cfg = load_config(PAPER, SHORT + ["train.prompts_per_rollout=64", "train.micro_batch_size=64",
                                      "train.prompts_per_step=64"])
    pl = plan(cfg, 8, 80)
    assert not pl.fits and 1 <= pl.max_micro_batch < 64
    assert f"train.micro_batch_size at most {pl.max_micro_batch}" in pl.verdict
    ok = plan(load_config(PAPER, SHORT + ["train.prompts_per_rollout=64",
                                          f"train.micro_batch_size={pl.max_micro_batch}"]), 8, 80)
    assert ok.phases["update"] <= ok.usable_gb
    assert plan(load_config(PAPER, SHORT + ["train.prompts_per_rollout=64",
                                            f"train.micro_batch_size={pl.max_micro_batch + 1}"]), 8, 80
                ).phases["update"] > ok.usable_gb


def test_micro_batches_packed_by_tokens_hold_their_budget_in_the_plan():
    """train.micro_batch_tokens caps a micro-batch's padded tokens at the budget (or one trajectory
    past it), however many trajectories that is: the update's activations are those of that many
    tokens, not micro_batch_size trajectories at their longest; and the advice names the budget."""
    wide = ["train.prompts_per_rollout=64", "train.micro_batch_size=64", "train.prompts_per_step=64"]
    by_count = plan(load_config(PAPER, SHORT + wide), 8, 80)
    T = next(int(what.split(" x ")[1].split()[0]) for what, _, _ in by_count.lines
             if what.startswith("activations, micro-batch 64 x "))
    ckpt = " (checkpointed)" if load_config(PAPER).train.gradient_checkpointing else ""

    def packed(budget):
        return plan(load_config(PAPER, SHORT + wide + [f"train.micro_batch_tokens={budget}"]), 8, 80)

    four = packed(4 * T)
    assert [w for w, _, _ in four.lines if w.startswith("activations")] == [
        f"activations, micro-batch packed to at most {4 * T} tokens{ckpt}"]
    assert four.phases["update"] < by_count.phases["update"]
    # a budget under one trajectory still holds that trajectory; one over micro_batch_size of them is
    # not capped by micro_batch_size (packing ignores it)
    assert any(w.endswith(f"packed to at most {T} tokens{ckpt}") for w, _, _ in packed(1).lines)
    assert packed(128 * T).phases["update"] > by_count.phases["update"]
    assert "largest train.micro_batch_tokens" in four.verdict or "train.micro_batch_tokens at most" in four.verdict


def test_full_finetuning_on_one_small_gpu_names_the_model_states():
    line = verdict(load_config(PAPER), 1, 24)
    assert line.startswith("does not fit") and "model states alone do not fit" in line and "\n" not in line


def test_lora_preset_has_no_reference_copy_and_no_gathered_copy():
    pl = plan(load_config(LORA), 1, 80)
    names = " ".join(what for what, _, _ in pl.lines)
    assert "reference" not in names and "gathered" not in names
    assert pl.phases["optimizer step"] < 25  # bf16 base (16.6 GB) + adapters


def test_startup_line_only_on_gpus_refuses_what_will_not_fit(monkeypatch):
    import types

    import torch

    from mgpo.config import ConfigError
    from mgpo.runtime.memory import startup_line

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert startup_line(load_config(PAPER, ONE_CALL)) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80e9))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # the preset's launch (configs/accelerate/zero3_8gpu.yaml)
    for rank in ("0", "3"):  # every rank refuses, so none is left waiting for the others
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(ConfigError, match="rollout.generation_batch_size.*train.ignore_plan=true"):
            startup_line(load_config(PAPER, ONE_CALL))
    assert startup_line(load_config(PAPER)).startswith("memory plan: fits")
    line = startup_line(load_config(PAPER, [*ONE_CALL, "train.ignore_plan=true"]))
    assert line.startswith("WARNING: predicted out of memory") and "does not fit" in line


def test_check_verdict_refuses_a_plan_that_does_not_fit_unless_told():
    from mgpo.config import ConfigError
    from mgpo.runtime.memory import check_verdict

    over = plan(load_config(PAPER, ONE_CALL), 8, 80)
    with pytest.raises(ConfigError) as refused:
        check_verdict(over.verdict, ignore_plan=False)
    message = str(refused.value)
    assert "\n" not in message and "set rollout.generation_batch_size" in message and "at most 4" in message
    assert check_verdict(over.verdict, ignore_plan=True).startswith("WARNING")
    assert check_verdict(plan(load_config(PAPER), 8, 80).verdict, ignore_plan=False).startswith("memory plan: fits")
    assert check_verdict("memory plan unavailable: no config.json", False).startswith("memory plan: ")


def test_a_model_the_plan_cannot_size_gets_a_line_not_an_error(tiny_dir):
    cfg = load_config("configs/tiny_cpu.yaml", [f"model.path={tiny_dir}"])
    line = verdict(cfg, 1, 80)
    assert line.startswith("memory plan unavailable") and "hidden_size 64" in line


# ---- the shipped presets fit the hardware they name

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PLAN_LINE = re.compile(r"^# plan: (.+)$", re.MULTILINE)


def _hardware(path: Path) -> list[str] | None:
    """The ``mgpo.tools.plan`` arguments a preset names in its ``# plan: --gpus N --gpu-memory GB`` line."""
    found = PLAN_LINE.search(path.read_text())
    return found.group(1).split() if found else None


def _gpu_presets() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.yaml") if _hardware(p))


def test_every_training_preset_for_a_real_model_names_its_hardware():
    """A preset that trains a published checkpoint (not one of the project's own models under build/)
    names the GPUs it is sized for, so the next test can check it."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        if not cfg.model.path.startswith("build/") and not path.name.startswith("eval_"):
            assert _hardware(path), f"{path.name}: no '# plan: --gpus N --gpu-memory GB' line"
    assert len(_gpu_presets()) >= 3


@pytest.mark.parametrize("path", _gpu_presets(), ids=lambda p: p.name)
def test_every_gpu_preset_fits_the_hardware_it_names(path):
    args = argparse.ArgumentParser()
    args.add_argument("--gpus", type=int, required=True)
    args.add_argument("--gpu-memory", type=float, required=True)
    hw = args.parse_args(_hardware(path))
    pl = plan(load_config(path), hw.gpus, hw.gpu_memory)
    assert pl.fits, f"{path.name}: {pl.verdict}"
    # The header states the plan's own figures: each phase's peak and the decode-time floor.
    text = path.read_text()
    for phase, gb in pl.phases.items():
        assert f"{phase} {gb:.1f} GB" in text, f"{path.name}: header lacks '{phase} {gb:.1f} GB'"
    assert f"decode-time floor {pl.decode_floor_s:.0f} s" in text, path.name


# ---- the plan and the trainer agree on GPU counts; ZeRO-3's traffic

def test_the_plan_sizes_a_checkpoint_at_its_own_depth(tmp_path):
    """A folder of the 7B widths at 2 layers (what tools.tiny --arch builds, and make gpu-check runs)
    is planned at 2 layers, not as the full 28-layer model (before: 8.3 B parameters for 1.6 B)."""
    import json

    from mgpo.runtime.memory import arch_for

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 3584, "num_hidden_layers": 2},
                                                      "vision_config": {"depth": 2}}))
    cfg = load_config(PAPER, [f"model.path={tmp_path}"])
    a = arch_for(cfg)
    assert (a.name, a.num_hidden_layers, a.vision_depth) == ("qwen2.5-vl-7b", 2, 2)
    assert count_params(a).total == 1_641_598_064  # 2 layers and 2 vision blocks of the 7B widths
    assert plan(cfg, 1, 80).phases["optimizer step"] < plan(load_config(PAPER), 1, 80).phases["optimizer step"] / 4


def test_sft_plans_no_rollout_and_a_plain_launch_holds_what_it_holds(monkeypatch):
    """One account of what each algorithm and launch holds: SFT generates nothing (the check used
    to refuse an SFT run over a predicted rollout peak), a plain / DDP launch of full fine-tuning
    holds fp32 weights whole on every rank and in bf16 is refused (it used to be called 'fits')."""
    import types

    import torch

    from mgpo.config import ConfigError
    from mgpo.runtime.memory import startup_line

    rl = plan(load_config(PAPER, ONE_CALL), 8, 80)
    sft = plan(load_config(PAPER, [*ONE_CALL, "train.algorithm=sft"]), 8, 80)
    assert not rl.fits and rl.phases["rollout"] > rl.usable_gb
    assert "rollout" not in sft.phases and sft.fits and sft.verdict.startswith("fits")
    assert not any("reference" in what and gb > 0 for what, gb, _ in sft.lines), "SFT has no reference model"
    plain = plan(load_config(PAPER, ["model.dtype=float32"]), 8, 80, deepspeed=False)
    (params,) = [gb for what, gb, _ in plain.lines if what.startswith("fp32 params (not sharded")]
    assert params == pytest.approx(4 * 8_292_166_656 / 1e9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80e9))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)  # a DDP launch of the full fine-tuning preset
    with pytest.raises(ConfigError, match="full fine-tuning outside DeepSpeed"):
        startup_line(load_config(PAPER))


def test_the_plan_sizes_the_streams_cache_cap():
    """With rollout.continuous_batching the rollout holds at most rollout.stream_cache_tokens of
    cache: the plan counts the cap (not rows x the whole budget), prints the largest cap that fits,
    that cap fits, a cap 5% larger does not, and the verdict names the field to lower."""
    on = ["rollout.continuous_batching=true"]
    largest = plan(load_config(PAPER, on), 8, 80).max_cache_tokens
    a = ARCHS["qwen2.5-vl-7b"]
    at = plan(load_config(PAPER, [*on, f"rollout.stream_cache_tokens={largest}"]), 8, 80)
    (kv,) = [gb for what, gb, _ in at.lines if what.startswith("KV cache")]
    assert kv == pytest.approx(largest * kv_bytes_per_token(a) / 1e9, rel=1e-6)
    assert at.fits and at.phases["rollout"] == pytest.approx(at.usable_gb, rel=0.01)
    over = plan(load_config(PAPER, [*on, f"rollout.stream_cache_tokens={int(largest * 1.05)}"]), 8, 80)
    assert not over.fits and f"rollout.stream_cache_tokens at most {largest}" in over.verdict
