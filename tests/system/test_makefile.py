"""Only `make install` (and the README's `make demo` / `make test`) installs; other targets check.

Runs the project's Makefile in a scratch folder with a stand-in interpreter that records
how it is called, so nothing is installed and nothing is downloaded.
"""

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK_ONLY = ["train", "eval", "tiny", "synth", "bench", "lint", "test-fast", "test-heavy", "budgets", "repro-budgets"]
INSTALLING = ["install", "demo", "test"]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture
def clone(tmp_path):
    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _make(folder, *args):
    proc = subprocess.run(["make", "--no-print-directory", *args, "PYTHON=false"], cwd=folder,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def _fake_venv(folder: Path) -> Path:
    """A .venv whose python only records its arguments."""
    calls = folder / "calls.log"
    python = folder / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    (folder / ".venv" / ".installed").touch()
    return calls


@pytest.mark.parametrize("target", CHECK_ONLY)
def test_fresh_clone_says_run_make_install(clone, target):
    rc, text = _make(clone, target)
    assert rc != 0 and "make install" in text, text
    assert not (clone / ".venv").exists()


@pytest.mark.parametrize("target", CHECK_ONLY)
def test_stale_venv_is_not_reinstalled(clone, target):
    calls = _fake_venv(clone)
    later = time.time() + 10
    os.utime(clone / "requirements.txt", (later, later))  # requirements changed since the install
    rc, text = _make(clone, target)
    assert rc != 0 and "make install" in text, text
    assert not calls.exists(), f"ran the interpreter: {calls.read_text()}"


@pytest.mark.parametrize("target", INSTALLING)
def test_install_demo_and_test_still_set_everything_up(clone, target):
    rc, text = _make(clone, "-n", target)  # dry run: the commands it would run
    assert "pip install --quiet -r requirements.txt" in text and "-m venv" in text, text


def test_up_to_date_venv_runs_the_target(clone):
    calls = _fake_venv(clone)
    rc, text = _make(clone, "lint")
    assert rc == 0, text
    assert calls.read_text().startswith("-m ruff check"), calls.read_text()


@pytest.mark.parametrize("args, config", [
    ((), "configs/tiny_cpu.yaml"),  # the embedded default
    # a real checkpoint: no preset, eval.py takes the protocol from the model (its run's, or the paper's)
    (("MODEL=/models/Qwen2.5-VL-7B-Instruct", "DATA=/data/vstar_bench"), None),
    (("MODEL=runs/qwen2_5_vl_7b_mgpo/checkpoint-600/model",), None),
    (("MODEL=build/tiny-qwen2.5-vl",), "configs/tiny_cpu.yaml"),  # the project's own tiny models
    (("MODEL=runs/tiny_beacon/checkpoint-150/model",), "configs/tiny_cpu.yaml"),
    (("MODEL=/models/ckpt", "CONFIG=configs/mine.yaml"), "configs/mine.yaml"),  # CONFIG= always wins
])
def test_make_eval_uses_the_papers_protocol_for_a_real_checkpoint(clone, args, config):
    calls = _fake_venv(clone)
    rc, text = _make(clone, "eval", *args)
    assert rc == 0, text
    (line,) = [c for c in calls.read_text().splitlines() if c.startswith("eval.py")]
    if config is None:
        assert "--config" not in line and line.startswith("eval.py model.path="), line
    else:
        assert line.startswith(f"eval.py --config {config}"), line
    assert ("mgpo.tools.tiny" in calls.read_text()) != (config is None), "a real checkpoint needs no tiny model built"


def test_make_eval_after_make_demo_evaluates_the_demos_checkpoint(clone):
    """The Makefile and eval.py said "the newest demo checkpoint" while `make eval` evaluated the
    random tiny model; after `make demo` it now evaluates what the demo trained, under its config."""
    calls = _fake_venv(clone)
    ckpt = clone / "runs" / "demo" / "checkpoint-30"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("{}")
    rc, text = _make(clone, "eval")
    assert rc == 0, text
    (line,) = [c for c in calls.read_text().splitlines() if c.startswith("eval.py")]
    assert line.startswith("eval.py --config configs/demo.yaml"), line
    assert "mgpo.tools.tiny" not in calls.read_text(), "the demo's own model, not the random tiny one"


def test_make_demo_family_builds_and_runs_that_familys_demo(clone):
    """`make demo FAMILY=qwen3-vl` builds a tiny Qwen3-VL base in its own folder and runs the
    Qwen3-VL demo config into its own run folder; the default is the Qwen2.5-VL demo."""
    calls = _fake_venv(clone)
    rc, text = _make(clone, "demo", "FAMILY=qwen3-vl")
    assert rc == 0, text
    lines = calls.read_text().splitlines()
    assert lines[0] == "-m mgpo.tools.base build/demo-qwen3-vl --task demo --family qwen3-vl", lines
    assert "train.py --config configs/demo_qwen3_vl.yaml" in lines[1]
    assert (ROOT / "configs" / "demo_qwen3_vl.yaml").is_file()
    calls.unlink()
    rc, text = _make(clone, "demo")
    assert rc == 0 and calls.read_text().splitlines()[0] == "-m mgpo.tools.base build/demo --task demo --family qwen2.5-vl"
