"""The command line: config fields in --help, user errors as one line (exit 2), the evaluation
preset for real checkpoints, and `eval.py compare`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EVAL_PRESET = "configs/eval_qwen2_5_vl_7b.yaml"


def _run(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("entry", [["train.py"], ["eval.py"], ["-m", "mgpo.tools.plan"]])
def test_help_lists_every_config_field_with_its_doc_by_section(entry):
    from mgpo.config import field_docs

    proc = _run(*entry, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "rollout.group_size [8]" in out and "Samples per prompt (n in GRPO)" in out
    for key in field_docs():
        assert f"    {key} [" in out, key
    assert out.index("  model:") < out.index("  rollout:") < out.index("  train:") < out.index("  eval:")


def test_importing_the_config_does_not_import_torch():
    """What --help needs loads in a blink: torch and transformers come only after parsing."""
    code = "import sys, mgpo.config, mgpo.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("entry", [["train.py"], ["eval.py"]])
def test_an_unknown_key_is_one_line_on_stderr_and_exit_2(entry):
    proc = _run(*entry, "--config", "configs/tiny_cpu.yaml", "rollout.group_sise=4")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "group_sise" in lines[0] and "group_size" in lines[0] and "Traceback" not in proc.stderr


def test_mgpo_debug_shows_the_traceback():
    proc = _run("train.py", "rollout.group_sise=4", env={"MGPO_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_missing_model_folder_is_one_line(tmp_path):
    proc = _run("eval.py", "--config", "configs/tiny_cpu.yaml", f"model.path={tmp_path / 'nothing'}",
                f"eval.output_dir={tmp_path / 'e'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert str(tmp_path / "nothing") in line


def test_a_bug_keeps_its_traceback():
    from mgpo.cli import is_user_error, one_line
    from mgpo.config import ConfigError

    assert is_user_error(ConfigError("x")) and is_user_error(FileNotFoundError("y"))
    assert not is_user_error(ValueError("z")) and not is_user_error(IndexError("w"))
    assert one_line(ConfigError("invalid config:\n  - a must be >= 1\n  - b must be > 0")) == \
        "invalid config: a must be >= 1; b must be > 0"


def test_the_eval_preset_is_the_papers_protocol():
    """The README's GPU evaluation, copied as written, runs under the paper's protocol."""
    proc = _run("eval.py", "--config", EVAL_PRESET, "model.path=runs/qwen2_5_vl_7b_mgpo/checkpoint-600/model",
                "eval.datasets=[/data/vstar_bench]", "--print-config")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model"]["min_pixels"], cfg["model"]["max_pixels"]) == (256 * 28 * 28, 1280 * 28 * 28)
    assert cfg["model"]["dtype"] == "bfloat16"
    assert (cfg["eval"]["temperature"], cfg["eval"]["group_size"], cfg["eval"]["mode"]) == (0.0, 1, "mgpo")
    assert cfg["rollout"]["max_new_tokens_turn1"] == cfg["rollout"]["max_new_tokens_turn2"] == 8192
    assert cfg["eval"]["output_dir"].startswith("runs/eval/qwen2_5_vl_7b_mgpo-checkpoint-600/vstar_bench-mgpo-")
    readme = (ROOT / "README.md").read_text()
    assert f"--config {EVAL_PRESET}" in readme or "make eval MODEL=" in readme


# ---- eval.py compare

def _eval_folder(path: Path, acc: float, iou: float) -> Path:
    path.mkdir(parents=True)
    results = {"v": {"questions": 2, "accuracy": acc, "categories": {"a": acc},
                     "grounding": {"valid_box": 50.0, "mean_iou": iou, "crop_contains_target": 50.0}}}
    (path / "metrics.json").write_text(json.dumps({"protocol": {"mode": "mgpo"}, "results": results,
                                                   "skipped": {"v": 0}}))
    return path


def test_compare_names_columns_by_run_and_shows_grounding(tmp_path):
    base = _eval_folder(tmp_path / "runs" / "base" / "eval", 50.0, 0.25)
    mgpo = _eval_folder(tmp_path / "runs" / "mgpo" / "eval", 75.0, 0.5)
    proc = _run("eval.py", "compare", str(base), str(mgpo))
    assert proc.returncode == 0, proc.stderr
    head, _, *rows = proc.stdout.splitlines()
    assert head == "| metric | base | mgpo |"
    assert "| v overall | 50.0 | 75.0 (+25.0) |" in rows
    assert "| v mean IoU | 0.250 | 0.500 (+0.250) |" in rows
    assert any(r.startswith("| v crop holds target % |") for r in rows)


@pytest.mark.parametrize("args", [[], ["--nope"]])
def test_compare_refuses_a_missing_argument_in_one_line(args):
    proc = _run("eval.py", "compare", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_compare_help_and_a_folder_without_metrics(tmp_path):
    proc = _run("eval.py", "compare", "--help")
    assert proc.returncode == 0 and "evaluation folders" in proc.stdout
    proc = _run("eval.py", "compare", str(tmp_path))
    assert proc.returncode == 2 and "metrics.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_protocol_mismatch_is_one_line_naming_the_fix(tmp_path, tiny_dir, synth_dir):
    args = ["eval.py", "--config", "configs/tiny_cpu.yaml", f"model.path={tiny_dir}",
            f"data.eval={synth_dir / 'train.jsonl'}", f"eval.output_dir={tmp_path / 'e'}", "data.max_samples=1",
            "rollout.max_new_tokens_turn1=4", "rollout.max_new_tokens_turn2=4"]
    first = _run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    again = _run(*args, "model.max_pixels=150528")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("error: ProtocolMismatchError") and "eval.overwrite=true" in line


def test_gpu_check_refuses_in_one_line_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check runs there instead")
    proc = _run("-m", "mgpo.tools.gpu_check", "--out", os.devnull)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ConfigError: make gpu-check runs on one CUDA GPU and this machine has none")


def test_eval_py_compare_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "eval.py"), "compare", str(tmp_path / "gone")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: CompareError: {tmp_path / 'gone'}: no such folder "
                                                "(pass the eval.output_dir of an evaluation)"]


@pytest.mark.slow
def test_a_run_and_its_evaluation_print_what_they_do_and_nothing_else(tmp_path, tiny_dir, synth_dir):
    """In a log (no terminal): DeepSpeed's accelerator warning, transformers' cache deprecation and
    top_k "not valid" warnings, and loading bars filled every run; `done:` came once per rank and did
    not say where the model is. Now: one done line naming the model folder from_pretrained loads."""
    out = tmp_path / "run"
    train = _run("train.py", "--config", "configs/tiny_cpu.yaml", f"model.path={tiny_dir}",
                 f"data.train={synth_dir / 'train.jsonl'}", f"train.output_dir={out}", "train.max_steps=1",
                 "rollout.max_new_tokens_turn1=6", "rollout.max_new_tokens_turn2=4")
    assert train.returncode == 0, train.stderr[-3000:]
    evaluate = _run("eval.py", "--config", "configs/tiny_cpu.yaml", f"model.path={out / 'checkpoint-1' / 'model'}",
                    f"data.eval={synth_dir / 'train.jsonl'}", f"eval.output_dir={tmp_path / 'eval'}",
                    "data.max_samples=2", "rollout.max_new_tokens_turn1=6", "rollout.max_new_tokens_turn2=4")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    for proc in (train, evaluate):
        text = proc.stdout + proc.stderr
        for noise in ("Setting accelerator to CPU", "deprecated", "not valid", "Loading weights", "Writing model"):
            assert noise not in text, f"{noise!r} in the output:\n{text[-2000:]}"
    done = [line for line in train.stdout.splitlines() if line.startswith("done:")]
    assert done == [f"done: 1 steps; logs, metrics and checkpoints are in {out}; the trained model (from_pretrained) "
                    f"is {out / 'checkpoint-1' / 'model'}"]
    assert not (out / ".lock").exists(), "the lock file is removed at a normal end"
