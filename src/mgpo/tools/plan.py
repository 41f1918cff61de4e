"""Will it fit, and what will it cost? The plan of a config on a given number of GPUs: per-GPU
memory by phase (``mgpo.runtime.memory``, the check ``train.py`` applies at start-up), the
decode-time floor, the run's time at the lengths its turns run to (``mgpo.runtime.cost``), the
GPU counts the trainer accepts, ZeRO-3's traffic, and DeepSpeed's own memory estimate beside ours.

    python -m mgpo.tools.plan --config configs/qwen2_5_vl_7b_mgpo.yaml --gpus 8 --gpu-memory 80
    python -m mgpo.tools.plan --config configs/qwen2_5_vl_7b_mgpo.yaml --gpus 8 --gpu-memory 80 --turn-lengths 64,256
    python -m mgpo.tools.plan --config ... --gpus 8 --gpu-memory 80 --pilot runs/pilot/metrics.jsonl
    python -m mgpo.tools.plan --config configs/qwen2_5_vl_7b_mgpo_lora_1gpu.yaml --gpus 1 --gpu-memory 80

GB = 10^9 bytes; GB/s and TB/s likewise.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, load_config
from ..runtime.archs import ARCHS
from ..runtime.cost import (
    PEAK_TFLOPS,
    UTILIZATION,
    budget_lengths,
    given_lengths,
    pilot_lengths,
    render_run_time,
    run_time,
)
from ..runtime.memory import (
    BANDWIDTH_TBS,
    BF16,
    GB,
    HEADROOM,
    Params,
    Plan,
    arch_for,
    count_params,
    plan,
    tokens_per_trajectory,
)
from .args import positive_float, positive_int

LINKS_GBS = {
    "NVLink, one node (H100 SXM: 450 GB/s per GPU each way)": ("gpu", 450.0),
    "InfiniBand, 8 x 400 Gb/s per node (one NIC per GPU)": ("node", 8 * 400 / 8),
    "InfiniBand, 1 x 400 Gb/s per node": ("node", 400 / 8),
    "Ethernet, 1 x 100 Gb/s per node": ("node", 100 / 8),
}
"""Interconnects ZeRO-3's traffic is timed at, GB/s: per GPU inside a node, per node between
nodes (one byte = 8 bits; data sheets' line rates, no protocol overhead)."""

def gpu_counts(cfg: Config, largest: int = 1024) -> list[int]:
    """The numbers of GPUs (ranks) the trainer accepts for ``cfg``'s batch sizes, up to ``largest``:
    the trainer's own check (``plan_batches``), not a copy of it."""
    from ..core.setup import plan_batches

    group = 1 if cfg.train.algorithm == "sft" else cfg.rollout.group_size
    ok = []
    for n in range(1, largest + 1):
        try:
            plan_batches(cfg.train, group, n)
        except ValueError:
            continue
        ok.append(n)
    return ok


def check_gpu_count(cfg: Config, world: int) -> None:
    """Refuse, as the trainer would at start-up, a number of GPUs the batch sizes do not divide
    into, naming the counts that work."""
    from ..core.setup import plan_batches

    try:
        plan_batches(cfg.train, 1 if cfg.train.algorithm == "sft" else cfg.rollout.group_size, world)
    except ValueError as e:
        from ..cli import one_line

        works = gpu_counts(cfg)
        raise ConfigError(f"--gpus {world}: the trainer refuses this launch ({one_line(e)}); the counts "
                          f"these batch sizes allow (up to 1024): {', '.join(map(str, works)) or 'none'}") from None


@dataclass(frozen=True)
class Traffic:
    """What ZeRO-3 moves between GPUs per optimizer step, in bytes of collective payload (the
    size of what is gathered or reduced; see ``zero3_traffic``)."""

    train: float  # forward and backward parameter gathers + the gradient reduce-scatter
    logprobs: float  # the old-policy and reference forwards, per step
    generation: float  # gathering the policy for generate, per step
    world: int

    @property
    def total(self) -> float:
        return self.train + self.logprobs + self.generation

    def seconds(self, kind: str, gbs: float) -> float:
        """Time at ``gbs`` GB/s: per GPU inside a node, a ring moves (n-1)/n of each payload
        through every GPU; between nodes, each node takes in about one whole payload per
        collective (its share comes from the other nodes), whatever its GPU count."""
        share = (self.world - 1) / self.world if kind == "gpu" else 1.0
        return self.total * share / (gbs * GB)


def zero3_traffic(cfg: Config, p: Params, world: int) -> Traffic:
    """ZeRO-3's collective payload per optimizer step. Each micro-batch gathers every bf16
    parameter for its forward and again for its backward (ZeRO-3 frees a layer's full weights
    after use; gradient checkpointing's recompute reuses the backward's gather) and reduce-scatters
    the bf16 gradient of every trainable parameter; the old-policy pass (when a rollout batch
    feeds several steps) and the reference model's pass each gather the weights once per
    micro-batch of the rollout batch; generation gathers the policy once per rollout batch.
    Small parameters ZeRO-3 keeps whole (its persistence threshold) are counted as moved."""
    t = cfg.train
    per_rank = (t.prompts_per_step // world) * (1 if t.algorithm == "sft" else cfg.rollout.group_size)
    micro = math.ceil(per_rank / t.micro_batch_size)  # micro-batches per step
    params = BF16 * p.total
    trainable = p.total - (p.vision if t.freeze_vision else 0)
    steps = (t.prompts_per_rollout // t.prompts_per_step) * t.ppo_epochs  # optimizer steps per rollout batch
    passes = int((t.prompts_per_rollout > t.prompts_per_step) or t.ppo_epochs > 1) + int(cfg.loss.kl_coef > 0)
    if t.algorithm == "sft":  # teacher-forced targets: no generation, no old or reference log-probs
        return Traffic(train=micro * (2 * params + BF16 * trainable), logprobs=0.0, generation=0.0, world=world)
    # the fixed passes run once per rollout batch over all its micro-batches: per step, divide by the steps
    logprobs = passes * micro * (t.prompts_per_rollout // t.prompts_per_step) * params / steps
    return Traffic(train=micro * (2 * params + BF16 * trainable), logprobs=logprobs, generation=params / steps,
                   world=world)


def render(cfg: Config, pl: Plan, world: int, gpu_gb: float, bandwidth: float, text_tokens: int,
           deepspeed: bool = True) -> str:
    rl = cfg.train.algorithm == "rl"
    launch = "LoRA" if cfg.train.lora_rank else "DeepSpeed" if deepspeed else "plain / DDP"
    out = [f"per-GPU memory plan ({cfg.train.algorithm}, {launch}): {world} x {gpu_gb:g} GB, micro-batch "
           f"{cfg.train.micro_batch_size}" + (f", group size {cfg.rollout.group_size}" if rl else "")
           + f", {text_tokens} text tokens assumed per trajectory", ""]
    out += [f"  {what:<62} {gb:8.2f} GB   {src}" for what, gb, src in pl.lines]
    out += [""] + [f"  phase {k:<56} {v:8.2f} GB" for k, v in pl.phases.items()]
    out += [f"  usable ({HEADROOM:.0%} of the GPU){'':<38} {pl.usable_gb:8.2f} GB", ""]
    if deepspeed and not cfg.train.lora_rank:
        out.append(f"model states as DeepSpeed counts them (at the step, with the gathered layers): "
                   f"{pl.model_states_gb:.2f} GB" + _deepspeed_says(cfg, world))
    out.append(f"largest micro-batch that fits: {pl.max_micro_batch}"
               + (f"; largest generate batch: {pl.max_generation_groups} prompt group(s)" if rl else ""))
    if rl:
        out.append(f"decode-time floor of one rollout batch at {bandwidth:g} TB/s: {pl.decode_floor_s:.0f} s "
                   "(every token budget used; weights + KV read once per step)")
        full = tokens_per_trajectory(cfg, text_tokens, arch_for(cfg).factor)[0]
        out.append(f"continuous batching (rollout.continuous_batching=true): rollout.stream_cache_tokens up to "
                   f"{pl.max_cache_tokens:,} fits ({pl.max_cache_tokens // full} trajectories of the whole token budget "
                   "at once; rows join while every running row, run to its limit, fits)")
    return "\n".join(out + ["", pl.verdict] + (_traffic_lines(cfg, world) if deepspeed else []))


def _traffic_lines(cfg: Config, world: int) -> list[str]:
    if cfg.train.lora_rank or world == 1:
        return []
    tr = zero3_traffic(cfg, count_params(arch_for(cfg)), world)
    out = ["", f"ZeRO-3 traffic per optimizer step: {tr.total / GB:,.0f} GB of collective payload (training "
               f"{tr.train / GB:,.0f}, old-policy and reference passes {tr.logprobs / GB:,.0f}, generation "
               f"{tr.generation / GB:,.0f}); a larger train.micro_batch_size cuts the first two"]
    out += [f"  {name:<60} {tr.seconds(kind, gbs):8.1f} s per step" for name, (kind, gbs) in LINKS_GBS.items()]
    return out


def deepspeed_estimate_gb(total_params: int, largest_module: int, world: int) -> float:
    """DeepSpeed's own figure (``estimate_zero3_model_states_mem_needs_all_cold``, the
    estimator ``..._all_live`` calls once it has counted a model) for no offload, per GPU."""
    import contextlib
    import io
    import os
    import re

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # importable on a machine without a GPU
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        estimate_zero3_model_states_mem_needs_all_cold(total_params, largest_module, num_gpus_per_node=world)
    for line in text.getvalue().splitlines():
        if "offload_param=none" in line and "offload_optimizer=none" in line:
            return float(re.findall(r"([\d.]+)GB", line)[1]) * 2**30 / GB  # columns: per CPU, per GPU (GiB)
    raise RuntimeError("DeepSpeed's estimator printed no no-offload row:\n" + text.getvalue())


def _deepspeed_says(cfg: Config, world: int) -> str:
    if cfg.train.lora_rank or world == 1:
        return ""
    try:
        p = count_params(arch_for(cfg))
        return f"; DeepSpeed's estimator (every parameter trainable): {deepspeed_estimate_gb(p.total, p.largest_module, world):.2f} GB"
    except ImportError:
        return ""


PAPER_QUESTIONS = 21_690
"""The paper's training set: MME-RealWorld without its Lite split."""


def training_questions(cfg: Config, given: int | None) -> tuple[int, str]:
    """(training questions, where the number comes from): given, else data.train's records when
    it is a JSON list or a JSONL file on this machine, else the paper's training set; at most
    data.max_samples when set, as the trainer reads no more."""
    n, where = given, "--questions"
    if not given:
        n, where = _records_in(Path(cfg.data.train))
    cap = cfg.data.max_samples
    return (cap, f"data.max_samples of {n:,} ({where})") if cap and cap < n else (n, where)


def _records_in(path: Path) -> tuple[int, str]:
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        text = path.read_text()
        try:
            n = len(json.loads(text)) if path.suffix == ".json" else sum(1 for line in text.splitlines() if line.strip())
            return n, f"records in {path}"
        except (json.JSONDecodeError, TypeError):
            pass
    return PAPER_QUESTIONS, f"the paper's set, MME-RealWorld without Lite; {path} is not here: pass --questions"


def main(argv: list[str] | None = None) -> None:
    from ..cli import config_fields_help

    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.plan", description=__doc__, epilog=config_fields_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=positive_int, required=True, help="ranks in total")
    parser.add_argument("--gpu-memory", type=positive_float, required=True, help="GB (10^9 bytes) per GPU")
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None, help="default: from model.path")
    parser.add_argument("--bandwidth", type=positive_float, default=BANDWIDTH_TBS["h100"],
                        help="HBM TB/s (H100 SXM 3.35, H200 4.8)")
    parser.add_argument("--text-tokens", type=positive_int, default=300,
                        help="prompt text of both turns, per trajectory")
    parser.add_argument("--turn-lengths", metavar="T1,T2", help="generated tokens of turn 1 and turn 2 to time the "
                        "run at (default: each turn's whole budget, the floor's assumption)")
    parser.add_argument("--pilot", metavar="METRICS_JSONL", help="time the run at the lengths a pilot run logged "
                        "(its metrics.jsonl: each turn's mean, and its 95th percentile as a call's longest row)")
    parser.add_argument("--questions", type=positive_int, default=None,
                        help="training questions (default: data.train's record count when it is a JSON or JSONL file "
                             f"here, else the paper's {PAPER_QUESTIONS:,})")
    parser.add_argument("--tflops", type=positive_float, default=PEAK_TFLOPS["h100"],
                        help="dense bf16 TFLOP/s per GPU (H100 and H200 SXM: 989)")
    parser.add_argument("--utilization", type=positive_float, default=UTILIZATION,
                        help="share of --tflops the compute-bound parts reach")
    parser.add_argument("--launch", choices=["deepspeed", "plain"], default="deepspeed",
                        help="full fine-tuning under DeepSpeed ZeRO-3 (the presets' launch), or plain / DDP")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if args.turn_lengths and args.pilot:
        parser.error("--turn-lengths and --pilot both give the turn lengths: pass one")
    if args.utilization > 1:
        parser.error(f"--utilization is a share of the peak, at most 1, got {args.utilization:g}")
    cfg = load_config(args.config, args.overrides)
    check_gpu_count(cfg, args.gpus)
    deepspeed = args.launch == "deepspeed"
    try:
        arch_for(cfg, args.arch)
    except ValueError as e:  # not a published architecture (the project's tiny models, say)
        raise ConfigError(f"{e}; the plan sizes the published Qwen2.5-VL architectures only") from None
    pl = plan(cfg, args.gpus, args.gpu_memory, arch=args.arch, text_tokens=args.text_tokens,
              bandwidth_tbs=args.bandwidth, deepspeed=deepspeed)
    print(render(cfg, pl, args.gpus, args.gpu_memory, args.bandwidth, args.text_tokens, deepspeed))
    if cfg.train.algorithm == "rl":
        r = cfg.rollout
        lengths = (pilot_lengths(args.pilot) if args.pilot else given_lengths(args.turn_lengths) if args.turn_lengths
                   else budget_lengths(cfg, f"every turn's whole budget ({r.max_new_tokens_turn1} and "
                                       f"{r.max_new_tokens_turn2} tokens: --turn-lengths or --pilot for the lengths a "
                                       "run has)"))
        questions, where = training_questions(cfg, args.questions)
        rt = run_time(cfg, args.gpus, questions, lengths, arch=args.arch, text_tokens=args.text_tokens,
                      bandwidth_tbs=args.bandwidth, peak_tflops=args.tflops, utilization=args.utilization)
        print("\n".join(["", *render_run_time(rt, lengths, f"{questions:,} training questions ({where})", args.tflops,
                                               args.utilization, args.bandwidth)]))
    works = [n for n in gpu_counts(cfg) if n >= args.gpus]
    print(f"GPU counts the trainer accepts for these batch sizes, from {args.gpus} up: "
          + ", ".join(map(str, works[:12])) + (" ..." if len(works) > 12 else "") + f" (largest: {works[-1]})")


if __name__ == "__main__":
    from ..cli import run_main

    run_main(main)
