"""Checkpoints that fail safe, and resumes that cannot silently change a run.

Manifest (SHA-256 of every file in COMPLETE) verified before anything is loaded; a damaged
newest checkpoint falls back to the previous one; LoRA / freeze_vision / config changes on
resume named; one run per folder (a lock).
Training runs are subprocesses of tests/train_worker.py on the tiny model.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgpo.runtime.checkpoint import list_checkpoints, resolve_resume

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "train_worker.py"
pytestmark = pytest.mark.slow


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK")}
    return {**env, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def _cmd(tiny_dir, synth_dir, out, *overrides):
    return [sys.executable, str(WORKER), str(out.parent / f"record-{out.name}.json"), "--rewards", "random",
            f"model.path={tiny_dir}", f"data.train={synth_dir / 'train.jsonl'}", f"train.output_dir={out}",
            "rollout.group_size=2", "train.prompts_per_rollout=2", "train.prompts_per_step=2",
            "train.micro_batch_size=2", "rollout.max_new_tokens_turn1=8", "rollout.max_new_tokens_turn2=8",
            "train.save_every=1", "train.keep_last=5", *overrides]


def _train(tiny_dir, synth_dir, out, *overrides):
    proc = subprocess.run(_cmd(tiny_dir, synth_dir, out, *overrides), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, synth_dir):
    """A run folder with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    rc, text = _train(tiny_dir, synth_dir, out, "train.max_steps=2")
    assert rc == 0, text[-4000:]
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_complete_marker_lists_every_file_with_its_sha256(trained):
    for ckpt in list_checkpoints(trained):
        marker = json.loads((ckpt / "COMPLETE").read_text())
        files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"COMPLETE"}
        assert set(marker["files"]) == files
        assert {"model/model.safetensors", "optimizer.pt", "trainer_state.json", "rng/rank0.pt"} <= files
        for rel, digest in marker["files"].items():
            assert hashlib.sha256((ckpt / rel).read_bytes()).hexdigest() == digest
        assert marker["settings"]["lora_rank"] == 0 and marker["settings"]["freeze_vision"] is True
        # the run's config travels with its weights: evaluation takes its protocol from there
        from mgpo.config import load_config

        assert load_config(ckpt / "model" / "mgpo_config.yaml").train.output_dir == str(trained)


@pytest.mark.parametrize("damage, name", [
    (lambda c: open(c / "optimizer.pt", "ab").write(b"\0"), "optimizer.pt"),
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json"),
    # A crafted DeepSpeed engine file (DeepSpeed loads it with weights_only=False).
    (lambda c: (c / "deepspeed" / "state").mkdir(parents=True) or
     (c / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"payload"), "mp_rank_00_model_states.pt"),
    (lambda c: (c / "COMPLETE").write_text("ok\n"), "manifest"),
])
def test_changed_missing_or_added_file_is_refused_naming_it(run_copy, damage, name):
    ckpt = list_checkpoints(run_copy)[-1]
    damage(ckpt)
    with pytest.raises(RuntimeError, match=name):
        resolve_resume(str(ckpt), run_copy)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(run_copy, tiny_dir, synth_dir):
    weights = run_copy / "checkpoint-2" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    rc, text = _train(tiny_dir, synth_dir, run_copy, "train.max_steps=3")
    assert rc == 0, text[-4000:]
    assert "not resuming from" in text and "checkpoint-2/model/model.safetensors" in text
    assert f"resumed from {run_copy / 'checkpoint-1'}" in text
    record = json.loads((run_copy.parent / "record-run.json.rank0").read_text())
    assert record["steps"] == 3


@pytest.mark.parametrize("override, setting", [
    ("train.lora_rank=4", "train.lora_rank"),
    ("train.freeze_vision=false", "train.freeze_vision"),
])
def test_lora_or_freeze_vision_mismatch_names_the_setting(run_copy, tiny_dir, synth_dir, override, setting):
    rc, text = _train(tiny_dir, synth_dir, run_copy, "train.max_steps=3", override)
    assert rc != 0
    assert setting in text and "checkpoint-2" in text, text[-3000:]


def test_resume_with_changed_settings_is_refused_naming_each(run_copy, tiny_dir, synth_dir):
    saved = (run_copy / "config.yaml").read_bytes()
    rc, text = _train(tiny_dir, synth_dir, run_copy, "train.max_steps=3", "train.lr=0.5", "train.seed=123",
                      "rollout.group_size=4")
    assert rc != 0
    for field in ("train.lr", "train.seed", "rollout.group_size"):
        assert field in text, text[-3000:]
    assert (run_copy / "config.yaml").read_bytes() == saved, "the run's saved config must not change"
    assert len(list_checkpoints(run_copy)) == 2


def test_allowed_change_resumes_and_saves_the_new_config_beside(run_copy, tiny_dir, synth_dir):
    import yaml

    saved = (run_copy / "config.yaml").read_bytes()
    rc, text = _train(tiny_dir, synth_dir, run_copy, "train.max_steps=3", "train.lr=0.5",
                      "train.allow_config_change=true")
    assert rc != 0 and "train.lr" in text, "a learning rate the scheduler state would override is refused"
    rc, text = _train(tiny_dir, synth_dir, run_copy, "train.max_steps=3", "train.seed=123",
                      "train.allow_config_change=true")
    assert rc == 0, text[-3000:]
    assert "train.seed: 0 -> 123" in text
    assert (run_copy / "config.yaml").read_bytes() == saved
    assert yaml.safe_load((run_copy / "config.resume-000002.yaml").read_text())["train"]["seed"] == 123


def test_second_run_in_one_folder_is_refused(tmp_path, tiny_dir, synth_dir):
    out = tmp_path / "run"
    first = subprocess.Popen(_cmd(tiny_dir, synth_dir, out, "train.max_steps=1"), cwd=ROOT,
                             env=_env(MGPO_CHECKPOINT_PAUSE_S="60"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-1.tmp").exists():  # the first run is mid-way
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.1)
        rc, text = _train(tiny_dir, synth_dir, out, "train.max_steps=1")
        assert rc != 0 and "another training run is using" in text, text[-3000:]
        assert (out / "checkpoint-1.tmp").exists(), "the second run must not touch the first's files"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)


def test_hugging_face_tooling_finds_the_newest_checkpoint(trained):
    """transformers' get_last_checkpoint finds our folders; trainer_state.json carries the log history."""
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(trained)) == str(trained / "checkpoint-2")
    state = json.loads((trained / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [row["step"] for row in state["log_history"]] == [1, 2]
    assert "reward/mean" in state["log_history"][-1]
    first = json.loads((trained / "checkpoint-1" / "trainer_state.json").read_text())
    assert [row["step"] for row in first["log_history"]] == [1]


@pytest.mark.parametrize("edit, named", [({"batch": 10**9}, "batch=1000000000")])
def test_hand_edited_trainer_state_is_refused_even_with_a_matching_manifest(run_copy, tiny_dir, synth_dir,
                                                                            edit, named):
    """Counters a run never writes were accepted once the manifest's checksums were recomputed."""
    from mgpo.runtime.checkpoint import read_manifest, write_manifest

    ckpt = list_checkpoints(run_copy)[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, **edit}))
    settings = read_manifest(ckpt)["settings"]
    (ckpt / "COMPLETE").unlink()
    write_manifest(ckpt, settings)  # what someone handing over a checkpoint can do
    rc, text = _train(tiny_dir, synth_dir, run_copy, "train.max_steps=3")
    assert rc != 0 and "holds values no run writes" in text and named in text
