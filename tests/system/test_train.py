"""Training end to end on the tiny model: updates, exact resume, kill safety, DDP, ZeRO-3, LoRA,
data that fights back (an unreadable first record, a resumed run's log).

Each run is its own process (accelerate keeps process-wide state), through
tests/train_worker.py, which records per-rank parameter checksums (launched by tests/launch.py).
"""

import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from launch import ROOT, WORKER, _common, _env, _ranks_agree, _zero3_env, run_worker
from PIL import Image
from safetensors.torch import load_file

from mgpo.runtime.checkpoint import latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.slow


def test_two_steps_change_every_trainable_parameter_and_no_frozen_one(tmp_path, tiny_dir, synth_dir):
    (rec,) = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "run", "train.max_steps=2",
                        "train.weight_decay=0.0", flags=["--rewards", "random"])
    assert rec["steps"] == 2
    trainable, changed = set(rec["trainable"]), set(rec["changed"])
    assert trainable and changed == trainable
    assert not any(n.startswith("model.visual.") for n in trainable), "vision tower is frozen by default"
    # TensorBoard and the plot-able log exist and hold the figures a run is read by.
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward/mean", "grounding/valid_box_share", "train/kl", "train/entropy", "train/clip_frac",
                "train/grad_norm", "train/lr", "time/rollout_s", "throughput/generated_tokens_per_s",
                "reward/zero_variance_groups", "length/turn2_truncated", "grounding/crop_area_share"):
        assert key in metrics[-1], key
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "config.yaml").exists()


def test_checkpoint_loads_with_from_pretrained_and_generates(tmp_path, family_dir, synth_dir):
    from train_worker import _checksums

    from mgpo.config import ModelConfig, RolloutConfig
    from mgpo.core.rollout import rollout
    from mgpo.data.samples import load_samples
    from mgpo.runtime.model import load_model, load_processor

    (rec,) = run_worker(tmp_path, family_dir, synth_dir, tmp_path / "run", "train.max_steps=2",
                        flags=["--rewards", "random"])
    ckpt = latest_checkpoint(tmp_path / "run")
    mcfg = ModelConfig(path=str(ckpt / "model"), min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28)
    model, processor = load_model(mcfg), load_processor(mcfg)
    assert _checksums(model) == rec["after"], "the checkpoint must hold the trained weights"
    assert rec["changed"], "and those differ from the initial ones"
    sample = load_samples(synth_dir / "train.jsonl")[0]
    r = rollout(model, processor, [sample], RolloutConfig(group_size=2, max_new_tokens_turn1=8,
                max_new_tokens_turn2=8), min_pixels=mcfg.min_pixels, max_pixels=mcfg.max_pixels)
    assert len(r) == 2 and all(t.turn1_tokens > 0 for t in r.trajectories)


def test_resume_is_exact(tmp_path, family_dir, synth_dir):
    args = ("train.save_every=2", "train.keep_last=5")
    flags = ["--rewards", "random"]
    (straight,) = run_worker(tmp_path, family_dir, synth_dir, tmp_path / "a", "train.max_steps=4", *args, flags=flags)
    run_worker(tmp_path, family_dir, synth_dir, tmp_path / "b", "train.max_steps=2", *args, flags=flags)
    (resumed,) = run_worker(tmp_path, family_dir, synth_dir, tmp_path / "b", "train.max_steps=4", *args, flags=flags)
    assert resumed["steps"] == 4
    assert resumed["after"] == straight["after"]
    a = load_file(str(latest_checkpoint(tmp_path / "a") / "model" / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "b") / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-2", "checkpoint-4"]


def test_a_run_stopped_inside_a_rollout_batch_resumes_to_the_weights_of_an_unbroken_run(tmp_path, tiny_dir, synth_dir):
    """Two optimizer steps per rollout batch here; train.max_steps=1 stops after the first. Before,
    the resume started a new rollout batch and the second half of the first was never trained on (27
    of 57 tensors differed from an unbroken run); the checkpoint now carries the rest of that batch."""
    args, flags = ("train.save_every=100", "train.weight_decay=0.0"), ["--rewards", "random"]
    (straight,) = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "a", "train.max_steps=2", *args, flags=flags)
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "b", "train.max_steps=1", *args, flags=flags)
    assert (tmp_path / "b" / "checkpoint-1" / "pending" / "rank0.pt").is_file()
    (resumed,) = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "b", "train.max_steps=2", *args, flags=flags)
    assert resumed["steps"] == 2 and resumed["after"] == straight["after"]
    assert len(resumed["lrs"]) == 1, "the resume takes the one step left of that batch, then stops"


def test_a_finite_loss_with_a_nan_gradient_moves_no_weight(tmp_path, tiny_dir, synth_dir):
    """The plain path stepped AdamW on a NaN gradient: every trainable tensor became NaN and the
    step counted as good. Now the step is skipped and counted, as DeepSpeed does."""
    record = tmp_path / "record-nangrad.json"
    cmd = [sys.executable, str(WORKER), str(record), "--rewards", "random", "--nan-grad",
           *_common(tiny_dir, synth_dir, tmp_path / "nangrad", "train.max_steps=2", "train.max_bad_steps=5")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss or gradient, update skipped (2 in a row)" in proc.stdout + proc.stderr
    rec = json.loads((tmp_path / "record-nangrad.json.rank0").read_text())
    assert rec["changed"] == [], "a step on a NaN gradient must not move any weight"
    assert rec["adam"]["steps"] == [], "nor advance AdamW"


def test_sigkill_during_checkpoint_keeps_the_previous_one(tmp_path, tiny_dir, synth_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, str(WORKER), str(tmp_path / "rec.json"),
           *_common(tiny_dir, synth_dir, out, "train.max_steps=8", "train.save_every=2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(MGPO_CHECKPOINT_PAUSE_S="3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if (out / "checkpoint-4.tmp").exists() and latest_checkpoint(out) is not None:
                break
            assert proc.poll() is None, "training ended before the second checkpoint"
            time.sleep(0.05)
        else:
            pytest.fail("second checkpoint never started")
        proc.send_signal(signal.SIGKILL)  # mid-write: weights written, not yet marked complete
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "checkpoint-2"
    from transformers import Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt / "model")
    # resume=auto continues from it (and ignores the half-written folder).
    (rec,) = run_worker(tmp_path, tiny_dir, synth_dir, out, "train.max_steps=4", "train.save_every=2")
    assert rec["steps"] == 4 and latest_checkpoint(out).name == "checkpoint-4"


def test_nonfinite_losses_skip_updates_then_stop(tmp_path, tiny_dir, synth_dir):
    (rec,) = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "skip", "train.max_steps=2",
                        "train.max_bad_steps=10", flags=["--nan-loss"])
    assert rec["steps"] == 2 and rec["changed"] == [], "a non-finite loss must not move any weight"
    assert rec["adam"] == {"steps": [], "moments": 0.0}, "nor advance AdamW"
    out = tmp_path / "nan"
    cmd = [sys.executable, str(WORKER), str(tmp_path / "r.json"), "--nan-loss",
           *_common(tiny_dir, synth_dir, out, "train.max_steps=6", "train.max_bad_steps=3")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "non-finite loss or gradient, update skipped (1 in a row)" in text
    assert "3 consecutive non-finite losses" in text


def test_lora_changes_only_adapter_weights(tmp_path, family_dir, synth_dir):
    (rec,) = run_worker(tmp_path, family_dir, synth_dir, tmp_path / "run", "train.max_steps=2", "train.lora_rank=4",
                        "train.weight_decay=0.0", flags=["--rewards", "random"])
    changed, trainable = set(rec["changed"]), set(rec["trainable"])
    assert trainable and all("lora_" in n for n in trainable)
    assert all("language_model" in n for n in trainable), "no adapters in the vision tower"
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    # The merge command writes a full model that differs from the base only by the adapters.
    from mgpo.runtime.family import family_of, model_class
    from mgpo.tools.merge import merge

    cls = model_class(family_of(family_dir))
    merged = cls.from_pretrained(merge(ckpt, tmp_path / "merged", family_dir))
    base = cls.from_pretrained(family_dir)
    diff = {n for (n, a), (_, b) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(a, b)}
    assert diff and all("language_model" in n and n.endswith("proj.weight") for n in diff)


def test_two_rank_ddp_on_cpu(tmp_path, tiny_dir, synth_dir):
    """Ranks agree; the warm-up advances once per optimizer step, not once per rank (accelerate's
    prepared scheduler stepped it world_size times: the logged rate was 1e-4 instead of 5e-5)."""
    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "ddp", "train.max_steps=2",
                         "train.warmup_steps=4", "train.lr=1e-4",
                         launcher="configs/accelerate/cpu_ddp_2proc.yaml", flags=["--rewards", "random"],
                         env=_env(ACCELERATE_USE_CPU="1"))
    _ranks_agree(records)
    metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # one row per optimizer step (2 per rollout batch here)
    assert [m["train/lr"] for m in metrics] == pytest.approx([1e-4 * 1 / 4, 1e-4 * 2 / 4]), "a 4-step warm-up"


def _step_figures(inputs: list[dict], cfg) -> tuple[dict, int]:
    """The loss terms' sums over every masked token of the given micro-batches (one token per row)."""
    from mgpo.core.loss import policy_loss

    flat = {k: torch.tensor([v for mb in inputs for v in mb[k]]) for k in ("logp", "old", "adv", "ref", "entropy")}
    K = len(flat["logp"])
    _, sums = policy_loss(flat["logp"][:, None], flat["old"][:, None], flat["adv"], torch.ones(K, 1), cfg,
                          ref_logp_NT=flat["ref"][:, None], entropy_NT=flat["entropy"][:, None], denom=1.0)
    return sums, K


def test_logged_step_figures_are_the_global_token_mean(tmp_path, tiny_dir, synth_dir):
    """Two ranks, two micro-batches each: the logged loss, policy loss, KL and entropy of a step
    equal the token mean over every masked token of the step on both ranks (before: each
    figure was grad_accum times its value, and each rank divided by its own token count)."""
    from mgpo.config import LossConfig

    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "fig", "train.max_steps=1",
                         "train.prompts_per_step=4", "train.micro_batch_size=4", "rollout.max_new_tokens_turn2=24",
                         launcher="configs/accelerate/cpu_ddp_2proc.yaml",
                         flags=["--rewards", "random", "--record-loss-inputs"], env=_env(ACCELERATE_USE_CPU="1"))
    per_rank = [_step_figures(r["loss_inputs"], LossConfig()) for r in records]
    assert all(len(r["loss_inputs"]) == 2 for r in records), "two micro-batches per rank"
    assert per_rank[0][1] != per_rank[1][1], "the ranks must hold different token counts for this test"
    tokens = sum(k for _, k in per_rank)
    metrics = json.loads((tmp_path / "fig" / "metrics.jsonl").read_text().splitlines()[-1])
    for name in ("loss", "pg_loss", "kl", "entropy", "clip_frac"):
        want = sum(s[name] for s, _ in per_rank) / tokens
        assert metrics[f"train/{name}"] == pytest.approx(want, rel=1e-4, abs=1e-7), name


def test_cpu_launch_without_cpu_flag_fails_loudly(tmp_path, tiny_dir, synth_dir):
    """Without ACCELERATE_USE_CPU accelerate set up each CPU rank to train alone (the trainer then
    refused, inside torch-elastic's dump); with no GPU and no DeepSpeed, several processes can only
    be a CPU DDP launch, so the trainer now sets the variable itself: the ranks train as one job."""
    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "x", "train.max_steps=1",
                         launcher="configs/accelerate/cpu_ddp_2proc.yaml", flags=["--rewards", "random"])
    assert [r["steps"] for r in records] == [1, 1]
    assert records[0]["after"] == records[1]["after"], "two ranks, one job: the same weights on both"
    assert records[0]["changed"], "and they trained"


def test_two_rank_zero3_on_cpu(tmp_path, family_dir, synth_dir):
    """Ranks agree, and the warm-up's rate reaches the optimizer DeepSpeed steps once per
    optimizer step (not once per rank, not stuck at its first value)."""
    records = run_worker(tmp_path, family_dir, synth_dir, tmp_path / "z3", "train.max_steps=2",
                         "train.warmup_steps=4", "train.lr=1e-4",
                         launcher="configs/accelerate/cpu_zero3_2proc.yaml", flags=["--rewards", "random"],
                         env=_zero3_env(tmp_path))
    _ranks_agree(records)
    for r in records:
        first, second = r["lrs"]
        assert first == [pytest.approx(2.5e-5)] * len(first) and second == [pytest.approx(5e-5)] * len(second)
    metrics = [json.loads(line) for line in (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["train/lr"] == pytest.approx(5e-5), "step 2 of a 4-step warm-up"
    ckpt = latest_checkpoint(tmp_path / "z3")
    assert (ckpt / "deepspeed").is_dir() and (ckpt / "model" / "model.safetensors").exists()


def test_zero3_nonfinite_step_moves_no_weight(tmp_path, tiny_dir, synth_dir):
    """Under DeepSpeed the engine steps inside backward: before the fix AdamW's weight decay
    still moved every weight on a non-finite step."""
    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "z3nan", "train.max_steps=1",
                         "train.max_bad_steps=10", "train.weight_decay=0.1",
                         launcher="configs/accelerate/cpu_zero3_2proc.yaml", flags=["--nan-loss"],
                         env=_zero3_env(tmp_path))
    assert [r["steps"] for r in records] == [1, 1]
    assert all(r["changed"] == [] for r in records), "a non-finite step must not move any weight"
    # ... nor advance AdamW (step count, moments), as the plain path skips it: before, the
    # engine stepped at lr 0 and the two launch modes diverged after a NaN
    assert all(r["adam"] == {"steps": [], "moments": 0.0} for r in records), [r["adam"] for r in records]


def test_zero3_one_rank_grounds_the_other_does_not(tmp_path, family_dir, synth_dir):
    """Rank 0's boxes are all valid, rank 1's all invalid: the run must still finish (no deadlock)."""
    records = run_worker(tmp_path, family_dir, synth_dir, tmp_path / "split", "train.max_steps=2",
                         "rollout.max_new_tokens_turn1=64", launcher="configs/accelerate/cpu_zero3_2proc.yaml",
                         flags=["--boxes", "split"], env=_zero3_env(tmp_path), timeout=900)
    assert [r["steps"] for r in records] == [2, 2]
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["grounding/valid_box_share"] == pytest.approx(0.5)


@pytest.mark.heavy
def test_zero3_continuous_batching_when_one_ranks_rows_stop_at_once(tmp_path, tiny_dir, synth_dir):
    """rollout.continuous_batching under ZeRO-3: rank 0's rows all stop at their first token in both
    turns, rank 1's write to their token limits. Rank 0 keeps joining and decoding with dummy rows
    while rank 1 works (every forward gathers the layers on both), and the run finishes on both."""
    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "stream", "train.max_steps=1",
                         "rollout.continuous_batching=true", "rollout.generation_batch_size=1",
                         "rollout.stream_chunk=4", launcher="configs/accelerate/cpu_zero3_2proc.yaml",
                         flags=["--stop", "split", "--rewards", "random"], env=_zero3_env(tmp_path), timeout=900)
    assert [r["steps"] for r in records] == [1, 1]
    assert records[0]["after"] == records[1]["after"] and records[0]["changed"]
    ((prefills0, decodes0, rows0),), ((prefills1, decodes1, rows1),) = (r["streams"] for r in records)
    assert (prefills0, decodes0) == (prefills1, decodes1), "the same forwards on both ranks"
    assert rows0 < rows1 / 2, "rank 0's rows stopped at once; it kept in step with dummy forwards"
    metrics = [json.loads(line) for line in (tmp_path / "stream" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["length/turn1_tokens_max"] == 24 + 1  # rank 1's rows ran to the limit (+ <|im_end|>)


@pytest.mark.heavy
def test_zero3_steps_with_micro_batches_packed_by_tokens(tmp_path, tiny_dir, synth_dir):
    """train.micro_batch_tokens under ZeRO-3, rank 0's rows long (crops), rank 1's short: every
    trajectory its own micro-batch, more than the accumulation steps DeepSpeed was configured
    with, and the engine still steps once per optimizer step on both ranks."""
    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "packed", "train.max_steps=2",
                         "rollout.max_new_tokens_turn1=64", "train.micro_batch_tokens=1", "train.lr=1e-4",
                         launcher="configs/accelerate/cpu_zero3_2proc.yaml", flags=["--boxes", "split"],
                         env=_zero3_env(tmp_path), timeout=900)
    assert [r["steps"] for r in records] == [2, 2]
    assert all(r["changed"] for r in records), "the weights moved"
    assert all(r["adam"]["steps"] == [2.0] for r in records), [r["adam"] for r in records]  # once per step
    metrics = [json.loads(line) for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/padded_share"] for m in metrics if "train/padded_share" in m] == [0.0, 0.0]


def test_zero3_k_turns_lock_step(tmp_path, tiny_dir, synth_dir):
    """mgpo_k, K = 3 under ZeRO-3: rank 0's trajectories all answer at turn 1, rank 1's zoom to
    the last turn. Both ranks run exactly K generate calls per rollout (rank 0 joins turns 2
    and 3 with a dummy row) and the run finishes."""
    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "zoom", "train.max_steps=1",
                         "rollout.template=mgpo_k", "rollout.max_turns=3", "rollout.max_new_tokens_turn1=40",
                         "rollout.max_new_tokens_turn2=40", launcher="configs/accelerate/cpu_zero3_2proc.yaml",
                         flags=["--zoom", "split"], env=_zero3_env(tmp_path), timeout=900)
    assert [r["steps"] for r in records] == [1, 1]
    assert [r["generate_calls"] for r in records] == [[3], [3]]
    metrics = [json.loads(line) for line in (tmp_path / "zoom" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["turns/answer_at_turn1"] == pytest.approx(0.5)
    assert metrics[-1]["turns/answer_at_turn3"] == pytest.approx(0.5)
    assert metrics[-1]["turns/nested_zoom_share"] == pytest.approx(0.5)


@pytest.mark.heavy
def test_zero3_k_turns_through_the_stream(tmp_path, tiny_dir, synth_dir):
    """mgpo_k, K = 3, rollout.continuous_batching under ZeRO-3: rank 0's rows answer at turn 1,
    rank 1's zoom to the last turn, each next turn joining the stream; both ranks finish with the
    turn figures of the per-call run."""
    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "zoomstream", "train.max_steps=1",
                         "rollout.template=mgpo_k", "rollout.max_turns=3", "rollout.max_new_tokens_turn1=40",
                         "rollout.max_new_tokens_turn2=40", "rollout.continuous_batching=true",
                         launcher="configs/accelerate/cpu_zero3_2proc.yaml", flags=["--zoom", "split"],
                         env=_zero3_env(tmp_path), timeout=900)
    assert [r["steps"] for r in records] == [1, 1] and [r["generate_calls"] for r in records] == [[0], [0]]
    metrics = [json.loads(line) for line in (tmp_path / "zoomstream" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["turns/answer_at_turn1"] == pytest.approx(0.5)
    assert metrics[-1]["turns/answer_at_turn3"] == pytest.approx(0.5)
    assert metrics[-1]["turns/nested_zoom_share"] == pytest.approx(0.5)


def test_unreadable_first_record_is_not_the_reserve(tmp_path, tiny_dir, synth_dir):
    recs = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text().splitlines()[:4]]
    for r in recs:
        r["image"] = str(synth_dir / r["image"])
    raw = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(raw, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(raw.getvalue()[:2000])  # the header loads, the pixels do not
    recs[0]["image"] = str(tmp_path / "cut.jpg")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (rec,) = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "run", "train.max_steps=1",
                        f"data.train={tmp_path / 'd.jsonl'}", "train.prompts_per_rollout=4")
    assert rec["steps"] == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/skipped_images"] == 1.0


def test_resume_does_not_repeat_logged_steps(tmp_path, tiny_dir, synth_dir):
    out = tmp_path / "run"
    common = ("train.save_every=2", "train.prompts_per_rollout=2", "train.prompts_per_step=2")
    run_worker(tmp_path, tiny_dir, synth_dir, out, "train.max_steps=2", *common)
    with open(out / "metrics.jsonl", "a") as f:  # a kill after step 3's log, before its checkpoint
        f.write(json.dumps({"step": 3, "reward/mean": -1.0}) + "\n")
    run_worker(tmp_path, tiny_dir, synth_dir, out, "train.max_steps=3", *common)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward/mean"] != -1.0


def test_every_optimizer_step_gets_its_own_row(tmp_path, tiny_dir, synth_dir):
    """Two optimizer steps per rollout batch (prompts_per_rollout = 2 x prompts_per_step): both
    steps' train/* figures are written, the rollout's figures repeated on each; log_every counts steps."""
    common = ("train.prompts_per_rollout=4", "train.prompts_per_step=2", "train.micro_batch_size=4",
              "train.max_steps=4")
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "every", *common, "train.log_every=1")
    rows = [json.loads(x) for x in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("train/loss" in r and "train/grad_norm" in r and "reward/mean" in r for r in rows)
    assert rows[0]["reward/mean"] == rows[1]["reward/mean"]  # one rollout batch, two steps
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "odd", *common, "train.log_every=3")
    rows = [json.loads(x) for x in (tmp_path / "odd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]  # step 3 is the first of a batch; 4 is the last step
