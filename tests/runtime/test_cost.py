"""mgpo.runtime.cost: the time of a rollout batch and of a run, on hand-computed cases."""

import json

import pytest

from mgpo.config import ConfigError, load_config
from mgpo.runtime.archs import ARCHS
from mgpo.runtime.cost import (
    RunTime,
    TurnLengths,
    flops_per_rollout_batch,
    given_lengths,
    pilot_lengths,
    rollout_batches,
    run_time,
)
from mgpo.runtime.memory import Params, count_params, decode_floor_s

PAPER = "configs/qwen2_5_vl_7b_mgpo.yaml"
SMALL = ["train.prompts_per_rollout=4", "train.prompts_per_step=4", "rollout.group_size=2", "train.ppo_epochs=1",
         "loss.kl_coef=0", "train.gradient_checkpointing=false", "train.freeze_vision=true",
         "model.min_pixels=784", "model.max_pixels=7840", "rollout.template=mgpo", "rollout.max_turns=2"]


def test_flops_of_a_rollout_batch_by_hand():
    # 1000 parameters: vision 100, embedding 50, an untied head of 50, decoder 800. 10 image tokens
    # (40 patches), 20 text tokens (10 a turn), so a turn's prompt chunk is 20 tokens; 2 ranks: 2
    # prompts, 4 rows each; turns of 3 and 5 tokens on average.
    cfg = load_config(None, SMALL)
    p = Params(total=1000, vision=100, embedding=50, lora=0, largest_module=0)
    lengths = TurnLengths((3.0, 5.0), (9.0, 9.0), "test")
    prefill, update = flops_per_rollout_batch(cfg, p, False, 2, lengths, text_tokens=20)
    # turn 1 once per prompt (2), turn 2 once per row (4): 2 x (100 x 40 + 800 x 20) x 6
    assert prefill == 240_000
    # a trajectory: 48 tokens (2 chunks + 8 generated), 2 images; forward 2 x (100x40x2 + 800x48 + 50x8)
    # = 93,600; backward without the frozen tower 4 x (800x48 + 50x8) = 155,200; 4 rows
    assert update == 4 * (93_600 + 155_200)
    # + gradient checkpointing's recompute and the reference model's forward: 2 more forwards a row
    cfg = load_config(None, [*SMALL, "train.gradient_checkpointing=true", "loss.kl_coef=0.01"])
    assert flops_per_rollout_batch(cfg, p, False, 2, lengths, text_tokens=20)[1] == 4 * (93_600 * 3 + 155_200)
    # the one-turn template: one chunk of all the text and one image, prefilled once per prompt
    cfg = load_config(None, [*SMALL, "rollout.template=grpo"])
    prefill, update = flops_per_rollout_batch(cfg, p, True, 2, lengths, text_tokens=20)  # tied: decoder 850
    assert prefill == 2 * (100 * 40 + 850 * 30) * 2
    assert update == 4 * (2 * (100 * 40 + 850 * 33 + 50 * 3) + 4 * (850 * 33 + 50 * 3))


def test_rollout_batches_count_whole_batches_and_stop_at_max_steps():
    cfg = load_config(PAPER)
    assert rollout_batches(cfg, 21_690) == (42, 630)  # 15 epochs of 42 whole batches of 512
    capped = load_config(PAPER, ["train.max_steps=10"])  # 4 optimizer steps per rollout batch: 3 batches
    assert rollout_batches(capped, 21_690) == (42, 3)


def test_decode_at_the_budgets_is_the_floor_and_grows_with_the_lengths():
    cfg = load_config(PAPER)
    a, p = ARCHS["qwen2.5-vl-7b"], count_params("qwen2.5-vl-7b")
    floor = decode_floor_s(a, p, cfg, 16, 300, 3.35)
    assert decode_floor_s(a, p, cfg, 16, 300, 3.35, turn_lengths=(8192, 8192)) == floor
    # one row, turns of 1 token each: two steps, each reading the weights and the cache so far
    weights = 2 * (p.total - p.vision - p.embedding)
    kv = 28 * 2 * 4 * 128 * 2  # bytes per cached token: layers x K,V x kv heads x head dim x bf16
    prefix1 = 150 + 1280
    prefix2 = prefix1 + 1 + 150 + 1280
    expected = (2 * weights + kv * (prefix1 + prefix2)) / 3.35e12
    assert decode_floor_s(a, p, cfg, 1, 300, 3.35, turn_lengths=(1, 1)) == pytest.approx(expected)


def test_run_time_is_its_parts_over_the_runs_batches():
    cfg = load_config(PAPER)
    short = run_time(cfg, 8, 21_690, given_lengths("64,256"))
    long = run_time(cfg, 8, 21_690, given_lengths("128,512"))
    assert isinstance(short, RunTime) and short.batches == 630
    assert short.batch_s == short.vision_prefill_s + short.decode_s + short.update_s
    assert short.hours == pytest.approx(630 * short.batch_s / 3600)
    assert long.decode_s > short.decode_s and long.update_s > short.update_s
    assert long.vision_prefill_s == short.vision_prefill_s  # the prompts do not change
    # decode: the rank's 64 prompts in calls of 2 groups (16 rows), 32 calls at the longest row's length
    a, p = ARCHS["qwen2.5-vl-7b"], count_params("qwen2.5-vl-7b")
    assert short.decode_s == pytest.approx(32 * decode_floor_s(a, p, cfg, 16, 300, 3.35, turn_lengths=(64, 256)))
    # the compute parts at twice the utilization take half the time
    fast = run_time(cfg, 8, 21_690, given_lengths("64,256"), utilization=0.8)
    assert fast.update_s == pytest.approx(short.update_s / 2) and fast.decode_s == short.decode_s


def test_pilot_lengths_come_from_the_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "length/turn1_tokens": 40, "length/turn2_tokens": 100, "length/turn1_tokens_p95": 60,
             "length/turn2_tokens_p95": 300},
            {"step": 2, "train/loss": 0.1},  # a row without lengths is passed over
            {"step": 3, "length/turn1_tokens": 20, "length/turn2_tokens": 50, "length/turn1_tokens_p95": 40,
             "length/turn2_tokens_p95": 100}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = pilot_lengths(path)
    assert lengths.mean == (30.0, 75.0) and lengths.longest == (50.0, 200.0)
    assert "2 logged steps" in lengths.source
    path.write_text(json.dumps({"step": 1, "length/turn1_tokens": 40}) + "\n")
    with pytest.raises(ConfigError, match="no row with the per-turn lengths"):
        pilot_lengths(path)
    path.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"metrics.jsonl:1: not JSON"):
        pilot_lengths(path)
    with pytest.raises(ConfigError, match="two numbers"):
        given_lengths("64")


def test_the_plan_prints_the_runs_batches_and_hours(tmp_path, capsys):
    from mgpo.tools.plan import main

    main(["--config", PAPER, "--gpus", "8", "--gpu-memory", "80", "--turn-lengths", "64,256"])
    out = capsys.readouterr().out
    assert "21,690 training questions (the paper's set" in out and "42 rollout batches per epoch, 630 in the run" in out
    expected = run_time(load_config(PAPER), 8, 21_690, given_lengths("64,256"))
    assert f"the run {expected.hours:,.1f} h" in out and "decode" in out and "update" in out
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": 1}\n' * 1100)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"length/turn1_tokens": 30, "length/turn2_tokens": 80,
                                   "length/turn1_tokens_p95": 64, "length/turn2_tokens_p95": 256}) + "\n")
    main(["--config", PAPER, "--gpus", "8", "--gpu-memory", "80", "--pilot", str(metrics), f"data.train={data}"])
    out = capsys.readouterr().out
    assert f"1,100 training questions (records in {data})" in out and "2 rollout batches per epoch, 30 in the run" in out
    assert f"pilot {metrics}: 1 logged steps" in out


def test_the_trainers_startup_line_on_gpus_only(monkeypatch):
    import torch

    from mgpo.runtime.cost import startup_line

    cfg = load_config(PAPER, ["model.path=/models/Qwen2.5-VL-7B-Instruct"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert startup_line(cfg, 8, 21_690) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    line = startup_line(cfg, 8, 21_690)
    full = run_time(cfg, 8, 21_690, given_lengths("8192,8192"))
    assert line.startswith(f"run time estimate: 630 rollout batches, at most {full.hours:,.1f} h on H100s")
    assert startup_line(load_config(PAPER, ["train.algorithm=sft"]), 8, 21_690) is None
    # a model the estimate cannot size: a line, not an error
    assert startup_line(load_config(PAPER, ["model.path=/models/mystery"]), 8, 21_690).startswith(
        "run time estimate unavailable: cannot tell the architecture")


def test_lora_backward_carries_only_the_inputs_gradient():
    cfg = load_config(None, [*SMALL, "train.lora_rank=8"])
    p = Params(total=1000, vision=100, embedding=50, lora=0, largest_module=0)
    lengths = TurnLengths((3.0, 5.0), (9.0, 9.0), "test")
    # as in the hand-computed case above, with a backward of 2 x (800 x 48 + 50 x 8) = 77,600
    assert flops_per_rollout_batch(cfg, p, False, 2, lengths, text_tokens=20)[1] == 4 * (93_600 + 77_600)


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b_mgpo", "qwen2_5_vl_7b_grpo", "qwen2_5_vl_7b_mgpo_lora_1gpu"])
def test_every_gpu_presets_header_states_the_plans_run_time(name):
    """The header's run time (its '# time: --turn-lengths T1,T2' line) is the plan's own figure."""
    import re
    from pathlib import Path

    from mgpo.tools.plan import training_questions

    text = Path(f"configs/{name}.yaml").read_text()
    gpus = int(re.search(r"^# plan: --gpus (\d+)", text, re.M).group(1))
    lengths = re.search(r"^# time: --turn-lengths (\S+)", text, re.M).group(1)
    cfg = load_config(f"configs/{name}.yaml")
    questions, _ = training_questions(cfg, None)
    rt = run_time(cfg, gpus, questions, given_lengths(lengths))
    r = cfg.rollout
    full = run_time(cfg, gpus, questions, given_lengths(f"{r.max_new_tokens_turn1},{r.max_new_tokens_turn2}"))
    flat = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    parts = (f"{rt.batches} rollout batches, {rt.hours:.1f} h (decode {rt.batches * rt.decode_s / 3600:.1f} h, vision + "
             f"prefill {rt.batches * rt.vision_prefill_s / 3600:.1f} h, update {rt.batches * rt.update_s / 3600:.1f} h)")
    assert parts in flat and f"{full.hours:.1f} h if every turn ran to its budget" in flat, (parts, full.hours)


def test_the_plan_counts_no_more_questions_than_the_trainer_reads(tmp_path):
    """data.max_samples caps the records the trainer reads, so the plan's run counts that many."""
    from mgpo.tools.plan import training_questions

    records = tmp_path / "train.jsonl"
    records.write_text("".join('{"question": "q"}\n' for _ in range(100)))
    assert training_questions(load_config(None, [f"data.train={records}"]), None) == (100, f"records in {records}")
    n, where = training_questions(load_config(None, [f"data.train={records}", "data.max_samples=30"]), None)
    assert n == 30 and "data.max_samples" in where
    assert training_questions(load_config(None, ["data.max_samples=30"]), 2000)[0] == 30
    assert training_questions(load_config(None, ["data.max_samples=3000"]), 2000)[0] == 2000
