"""Nothing phones home: train and eval run with every network connection refused and recorded.

The runs go through tests/socket_guard.py in a clean environment (no HF_* offline
variables), so what keeps them offline is the package itself, not the Makefile.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUARD = ROOT / "tests" / "socket_guard.py"
pytestmark = pytest.mark.slow


def _clean_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "TRANSFORMERS_", "ACCELERATE_")) and k not in ("WORLD_SIZE", "RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _guarded(tmp_path, script, *args):
    log = tmp_path / f"connections-{script}.log"
    proc = subprocess.run([sys.executable, str(GUARD), str(log), script, "--config", "configs/tiny_cpu.yaml", *args],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=600)
    attempts = log.read_text() if log.exists() else ""
    return proc, attempts


def test_train_and_eval_make_no_connection(tmp_path, tiny_dir, synth_dir):
    small = ["rollout.group_size=2", "rollout.max_new_tokens_turn1=8", "rollout.max_new_tokens_turn2=8",
             "data.max_samples=2"]
    proc, attempts = _guarded(
        tmp_path, "train.py", f"model.path={tiny_dir}", f"data.train={synth_dir / 'train.jsonl'}",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.prompts_per_rollout=2",
        "train.prompts_per_step=2", "train.micro_batch_size=2", *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert attempts == "", f"training tried to reach the network:\n{attempts[:3000]}"

    proc, attempts = _guarded(
        tmp_path, "eval.py", f"model.path={tiny_dir}", f"data.eval={synth_dir / 'train.jsonl'}",
        f"eval.output_dir={tmp_path / 'eval'}", *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert attempts == "", f"evaluation tried to reach the network:\n{attempts[:3000]}"
    assert (tmp_path / "eval" / "metrics.json").exists()
    assert "accuracy %" in proc.stdout and "\ntrain " in proc.stdout, proc.stdout[-2000:]  # the console table


@pytest.mark.parametrize("setting", ["eval.adapter", "model.path"])
def test_hub_style_id_is_refused_without_a_connection(tmp_path, tiny_dir, synth_dir, setting):
    """A typo or a hub id in place of a local folder: a clear error, no download attempt."""
    args = [f"model.path={tiny_dir}", f"data.eval={synth_dir / 'train.jsonl'}", f"eval.output_dir={tmp_path / 'e'}",
            "data.max_samples=1", f"{setting}=someone/some-weights"]
    proc, attempts = _guarded(tmp_path, "eval.py", *args)
    assert proc.returncode != 0
    assert "someone/some-weights" in proc.stderr and "local" in proc.stderr.lower(), proc.stderr[-2000:]
    assert attempts == "", f"tried to reach the network:\n{attempts[:3000]}"
