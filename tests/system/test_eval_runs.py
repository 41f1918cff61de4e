"""Evaluation end to end through eval.py: a killed evaluation resumes, two ranks equal one."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import launch

ROOT = Path(__file__).resolve().parents[2]


def _predictions(out):
    return [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_evaluation_resumes_to_the_same_metrics(tiny_dir, synth_dir, tmp_path):
    def cmd(out):
        return [sys.executable, str(ROOT / "eval.py"), "--config", str(ROOT / "configs/tiny_cpu.yaml"),
                f"model.path={tiny_dir}", f"eval.output_dir={out}", f"eval.datasets=[{synth_dir / 'train.jsonl'}]",
                "eval.batch_size=2", "rollout.max_new_tokens_turn1=16", "rollout.max_new_tokens_turn2=8"]
    subprocess.run(cmd(tmp_path / "straight"), cwd=ROOT, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(tmp_path / "killed"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = tmp_path / "killed" / "predictions" / "rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not part.exists() or len(part.read_text().splitlines()) < 4):
        assert proc.poll() is None, "evaluation finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(part.read_text().splitlines())
    assert 4 <= done_before < 12
    subprocess.run(cmd(tmp_path / "killed"), cwd=ROOT, check=True, capture_output=True, timeout=600)
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert a["results"] == b["results"]
    assert _predictions(tmp_path / "straight") == _predictions(tmp_path / "killed")


@pytest.mark.slow
def test_two_rank_sharded_evaluation_equals_one_process(family_dir, synth_dir, tmp_path):
    import os

    def cmd(out, two_ranks):
        args = [str(ROOT / "eval.py"), "--config", str(ROOT / "configs/tiny_cpu.yaml"), f"model.path={family_dir}",
                f"eval.output_dir={out}", f"eval.datasets=[{synth_dir / 'train.jsonl'}]", "eval.batch_size=2",
                "rollout.max_new_tokens_turn1=16", "rollout.max_new_tokens_turn2=8"]
        if not two_ranks:
            return [sys.executable, *args]
        return [*launch("configs/accelerate/cpu_ddp_2proc.yaml"), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "one", False), cwd=ROOT, check=True, capture_output=True, timeout=600)
    subprocess.run(cmd(tmp_path / "two", True), cwd=ROOT, check=True, capture_output=True, timeout=600, env=env)
    shards = sorted((tmp_path / "two" / "predictions").glob("rank*.jsonl"))
    assert len(shards) == 2 and all(s.read_text() for s in shards), "each rank evaluates its own shard"
    assert _predictions(tmp_path / "one") == _predictions(tmp_path / "two")
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["results"], "and it scored them"
