"""Training runs as subprocesses: each run is its own process (accelerate keeps process-wide
state), through tests/train_worker.py, which records per-rank parameter checksums."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_worker.py"


def launch(config: str) -> list[str]:
    """`accelerate launch` with ``config`` on a free port, so that two multi-process tests
    running at once (pytest -n 2) do not both take the default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config),
            "--main_process_port", str(port)]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return {**env, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _common(tiny_dir, synth_dir, out, *extra):
    return [f"model.path={tiny_dir}", f"data.train={synth_dir / 'train.jsonl'}", f"train.output_dir={out}",
            "rollout.max_new_tokens_turn1=24", "rollout.max_new_tokens_turn2=16", "train.log_every=1", *extra]


def run_worker(tmp, tiny_dir, synth_dir, out, *overrides, launcher=None, flags=(), env=None, timeout=600):
    record = tmp / f"record-{out.name}.json"
    cmd = [sys.executable, str(WORKER)] if launcher is None else [*launch(launcher), str(WORKER)]
    cmd += [str(record), *flags, *_common(tiny_dir, synth_dir, out, *overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(p.read_text()) for p in sorted(tmp.glob(f"record-{out.name}.json.rank*"))]


def _ranks_agree(records):
    assert len(records) == 2 and all(r["steps"] == 2 for r in records)
    assert records[0]["after"] == records[1]["after"], "ranks diverged"
    assert set(records[0]["changed"]) == set(records[0]["trainable"])


def _zero3_env(tmp_path):
    return _env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / "build" / "torch_extensions"))
