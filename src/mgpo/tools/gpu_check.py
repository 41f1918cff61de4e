"""The first GPU check: one MGPO step in each launch mode, its generation speed and its memory
per phase beside the plan's prediction, on whatever single CUDA GPU this runs on.

    make gpu-check                      # python -m mgpo.tools.gpu_check [--out docs/gpu-check.md]

Two models, built here with random weights (nothing is downloaded): the embedded tiny
Qwen2.5-VL, and every width of Qwen2.5-VL-7B at 2 decoder layers and 2 vision blocks. Each
takes one MGPO step through ``train.py`` in bf16 with SDPA attention (and flash-attention 2
when ``flash_attn`` is installed): plain (one process), with LoRA, and under DeepSpeed ZeRO-3
on one process (``accelerate launch``; skipped when DeepSpeed is not installed). The step
uses the paper preset's pixel budget and generation batch (2 prompt groups of 8 per
``generate`` call), 128 + 64 new tokens per turn (a random model writes to its limit). The
table gives each step's result, generated tokens per second, the peak GPU memory of its
rollout and update phases (logged by the trainer as ``memory/*_peak_gb``) beside the plan's
figure for the same config (``mgpo.runtime.memory``, at the checkpoint's depth; the tiny model is
no published architecture: no figure), and the step's seconds. About 5 minutes on an H100.
Writes the table to ``--out`` with the GPU's name. Without a CUDA GPU it refuses in one line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

from ..config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[3]
STEP = ["train.max_steps=1", "train.save_every=1000", "train.report_to=none", "train.prompts_per_rollout=2",
        "train.prompts_per_step=2", "rollout.group_size=8", "rollout.generation_batch_size=2",
        "train.micro_batch_size=2", "rollout.max_new_tokens_turn1=128", "rollout.max_new_tokens_turn2=64",
        "model.min_pixels=200704", "model.max_pixels=1003520", "model.dtype=bfloat16",
        "train.gradient_checkpointing=true"]
# plain: full fine-tuning outside DeepSpeed runs in fp32 (the trainer refuses it in bf16: AdamW on
# bf16 weights loses most updates); LoRA and ZeRO-3 run in bf16
MODES = {"plain": ["model.dtype=float32"], "lora": ["train.lora_rank=16"], "zero3": []}


def check_gpu() -> str:
    """The GPU's name, or a refusal (one line) on a machine without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("make gpu-check runs on one CUDA GPU and this machine has none (torch.cuda.is_available() "
                          "is False); on CPU `make test` runs the same code paths on the tiny model")
    return torch.cuda.get_device_name(0)


def step_command(mode: str, overrides: list[str]) -> list[str]:
    script = [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), *STEP, *MODES[mode],
              *overrides]
    if mode != "zero3":
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "zero3_8gpu.yaml"), "--num_processes", "1", *script]


def run_step(mode: str, model: Path, data: Path, attn: str, out: Path, gpu_gb: float) -> dict:
    overrides = [f"model.path={model}", f"data.train={data}", f"model.attn_implementation={attn}",
                 f"train.output_dir={out}"]
    row = {"mode": mode, "attention": attn, "plan": _planned(mode, overrides, gpu_gb)}
    if mode == "zero3" and find_spec("deepspeed") is None:
        return row | {"result": "skipped: deepspeed is not installed"}
    t0 = time.perf_counter()
    proc = subprocess.run(step_command(mode, overrides), cwd=ROOT, capture_output=True, text=True, timeout=600)
    row["wall_s"] = time.perf_counter() - t0
    if proc.returncode != 0:
        last = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-1:] or ["(no output)"]
        return row | {"result": f"FAILED (exit {proc.returncode}): {last[0][:160]}"}
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return row | {"result": "ok", "metrics": metrics}


def _planned(mode: str, overrides: list[str], gpu_gb: float) -> dict | None:
    from ..runtime.memory import plan

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [*STEP, *MODES[mode], *overrides])
    try:
        return plan(cfg, 1, gpu_gb, deepspeed=mode == "zero3").phases
    except (ValueError, KeyError):  # the tiny model is no published architecture
        return None


def render(gpu: str, rows: list[dict], date: str) -> str:
    import torch

    def gb(x):
        return f"{x:.2f}" if isinstance(x, float) else "-"

    lines = ["# GPU check", "", f"GPU: {gpu}; torch {torch.__version__}; {date}. Command: `make gpu-check` "
             "(`python -m mgpo.tools.gpu_check`). One MGPO step per row (`train.py`, bf16, the paper's pixel "
             "budget, 2 prompt groups of 8 per generate call, 128 + 64 new tokens per turn); memory is the "
             "trainer's logged peak per phase (10^9 bytes), the plan's figure for the same config beside it.", "",
             "| model | mode | attention | result | generated tokens/s | rollout peak GB (plan) | "
             "update peak GB (plan) | step s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, p = r.get("metrics", {}), r.get("plan") or {}
        lines.append(f"| {r['model']} | {r['mode']} | {r['attention']} | {r['result']} | "
                     f"{gb(m.get('throughput/generated_tokens_per_s'))} | "
                     f"{gb(m.get('memory/rollout_peak_gb'))} ({gb(p.get('rollout'))}) | "
                     f"{gb(m.get('memory/update_peak_gb'))} ({gb(p.get('update'))}) | {gb(m.get('time/step_s'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "gpu-check.md"))
    args = parser.parse_args(argv)
    gpu = check_gpu()
    import torch

    from .synth import build_synth
    from .tiny import build_tiny_checkpoint

    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    attns = ["sdpa"] + (["flash_attention_2"] if find_spec("flash_attn") else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = build_synth(work / "data", n=4, seed=0, split="train")
        models = {"tiny": build_tiny_checkpoint(work / "tiny"),
                  "tiny qwen3-vl": build_tiny_checkpoint(work / "tiny3", arch="qwen3-vl"),
                  "qwen2.5-vl-7b widths, 2 layers": build_tiny_checkpoint(work / "w7b", arch="qwen2.5-vl-7b"),
                  "qwen3-vl-8b widths, 2 layers": build_tiny_checkpoint(work / "w8b", arch="qwen3-vl-8b")}
        for name, model in models.items():
            for attn in attns if not name.startswith("tiny") else ["sdpa"]:
                for mode in MODES:
                    row = run_step(mode, model, data, attn, work / f"run-{len(rows)}", gpu_gb) | {"model": name}
                    print(f"{name} / {mode} / {attn}: {row['result']}", flush=True)
                    rows.append(row)
    text = render(gpu, rows, time.strftime("%Y-%m-%d"))
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    from ..cli import run_main

    run_main(main)
