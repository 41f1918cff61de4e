"""How long will it take? The time of one rollout batch and of a whole run, predicted from the
config, the published widths and the lengths the model's turns run to.

Each part of a rollout batch is bound by one resource of the GPU, and is timed at it:

- vision + prefill (compute): the vision tower over every image's patches (4 per image
  token) and the language model over every prompt chunk, 2 FLOPs per parameter per token, at
  the GPU's dense bf16 peak times a utilization. Turn 1 is prefilled once per prompt (its
  cache is copied to the group), turn 2 once per trajectory; generate computes logits for
  the last position only.
- decode (memory bandwidth): every step reads the language model's weights and every row's
  cache so far (``memory.decode_floor_s``). A generate call lasts as long as its longest row,
  so decode is timed at the longest row's length, not the mean.
- update (compute): 6 FLOPs per trained parameter per token (forward and backward; 2 for a
  frozen vision tower's forward, 4 for a language model frozen under LoRA, whose backward
  still carries the input's gradient), 2 more with gradient checkpointing's recompute, and a
  2-FLOP forward for each fixed pass (the old policy's when a rollout batch feeds several
  steps, the reference model's when ``loss.kl_coef`` > 0); the head only over the generated
  tokens (``masked_token_logprobs``).

Every rank does its own share of each part at once, so a rollout batch takes one rank's time.
Images are counted at the pixel budget (``model.max_pixels``), as high-resolution originals
and their enlarged crops are; ZeRO-3's traffic is not counted here (``mgpo.tools.plan``
prints it beside). Every template but "grpo" is timed as two turns, "mgpo_k" included: its
later turns, when a trajectory takes them, are not counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config, ConfigError
from .memory import BANDWIDTH_TBS, Params, arch_for, count_params, decode_floor_s, image_tokens

PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0}
"""Dense bf16 tensor-core peak of an H100 SXM and an H200 (NVIDIA's data sheets; the same
chip), TFLOP/s."""
UTILIZATION = 0.4
"""Share of the peak the compute-bound parts are assumed to reach (model FLOPs utilization):
large-batch training of 7B models reports 0.35-0.55; prefills of a few thousand tokens a row
are in that range too."""


@dataclass(frozen=True)
class TurnLengths:
    """Generated tokens per turn: the mean (what is prefilled and trained) and a generate
    call's longest row (what decode waits for)."""

    mean: tuple[float, float]
    longest: tuple[float, float]
    source: str


def given_lengths(text: str, source: str = "") -> TurnLengths:
    """``"T1,T2"`` from the command line: every row of a call that long (mean = longest).

    >>> given_lengths("64,256").longest
    (64.0, 256.0)
    """
    try:
        t1, t2 = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--turn-lengths wants two numbers, turn 1 and turn 2 tokens, as T1,T2; got {text!r}") from None
    if min(t1, t2) < 0:
        raise ConfigError(f"--turn-lengths must be >= 0, got {text!r}")
    return TurnLengths((t1, t2), (t1, t2), source or f"given lengths: turn 1 {t1:g}, turn 2 {t2:g} tokens")


def budget_lengths(cfg: Config, source: str = "") -> TurnLengths:
    """Every turn at its whole token budget (an upper bound: what is known before a run)."""
    r = cfg.rollout
    return given_lengths(f"{r.max_new_tokens_turn1},{r.max_new_tokens_turn2}", source)


def pilot_lengths(path: str | Path) -> TurnLengths:
    """The lengths a pilot run logged (its ``metrics.jsonl``): the mean over its rollout batches
    of each turn's mean, and of each turn's 95th percentile as a call's longest row (a call of
    16-20 rows waits on about the 1 - 1/16 quantile of them; a call of 32-64 rows on a higher
    one, toward the logged maximum, so for those the p95 underestimates decode)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e.msg}); a metrics.jsonl has one JSON object a line") from None
    keys = ("length/turn1_tokens", "length/turn2_tokens", "length/turn1_tokens_p95", "length/turn2_tokens_p95")
    rows = [r for r in rows if all(k in r for k in keys)]
    if not rows:
        raise ConfigError(f"{path}: no row with the per-turn lengths ({', '.join(keys)}): a pilot run of this "
                          "version of the trainer logs them on every step")
    mean = tuple(float(np.mean([r[k] for r in rows])) for k in keys)
    return TurnLengths(mean[:2], mean[2:], f"pilot {path}: {len(rows)} logged steps, turn 1 mean {mean[0]:.0f} "
                       f"(p95 {mean[2]:.0f}), turn 2 mean {mean[1]:.0f} (p95 {mean[3]:.0f}) tokens")


def rollout_batches(cfg: Config, questions: int) -> tuple[int, int]:
    """(rollout batches per epoch, in the whole run), as the trainer counts them: whole batches
    of ``train.prompts_per_rollout`` questions per epoch, cut at ``train.max_steps``.

    >>> from mgpo.config import load_config
    >>> rollout_batches(load_config(None, ["train.prompts_per_rollout=512", "train.epochs=15"]), 21690)
    (42, 630)
    """
    t = cfg.train
    per_epoch = questions // t.prompts_per_rollout
    total = t.epochs * per_epoch
    if t.max_steps:
        steps_per_batch = max(1, t.prompts_per_rollout // t.prompts_per_step) * t.ppo_epochs
        total = min(total, math.ceil(t.max_steps / steps_per_batch))
    return per_epoch, total


@dataclass(frozen=True)
class RunTime:
    """One rank's seconds per rollout batch, by part, and the run's rollout batches."""

    vision_prefill_s: float
    decode_s: float
    update_s: float
    batches_per_epoch: int
    batches: int

    @property
    def batch_s(self) -> float:
        return self.vision_prefill_s + self.decode_s + self.update_s

    @property
    def hours(self) -> float:
        return self.batches * self.batch_s / 3600


def flops_per_rollout_batch(cfg: Config, p: Params, tied: bool, world: int, lengths: TurnLengths,
                            text_tokens: int, factor: int = 28) -> tuple[float, float]:
    """(vision + prefill FLOPs, update FLOPs) of one rank's share of a rollout batch (``factor``:
    the architecture's image-token side in pixels)."""
    t, r = cfg.train, cfg.rollout
    prompts = t.prompts_per_rollout / world
    rows = prompts * r.group_size
    image = image_tokens(cfg, factor)
    patches = 4 * image
    head = p.embedding  # the lm_head: vocabulary x hidden, the embedding's shape (the same tensor when tied)
    body = p.total - p.vision - p.embedding - (0 if tied else head)  # the decoder layers and norms
    two_turns = r.template != "grpo"
    chunk = text_tokens // 2 + image if two_turns else text_tokens + image  # one turn's prompt
    # prefill: turn 1 once per prompt, turn 2 once per row; a logit row for each call's last position
    prefill = 2 * (p.vision * patches + body * chunk) * (prompts + (rows if two_turns else 0))
    generated = lengths.mean[0] + (lengths.mean[1] if two_turns else 0)
    tokens = (2 * chunk if two_turns else chunk) + generated  # one trajectory in the training forward
    images = 2 if two_turns else 1
    forward = 2 * (p.vision * patches * images + body * tokens + head * generated)  # one forward, FLOPs
    vision_trained = 0 if t.freeze_vision or t.lora_rank else p.vision
    # backward: 2 FLOPs a parameter for the input's gradient and 2 for the weight's; a frozen
    # language model under LoRA needs the first only (the adapters' own are negligible)
    backward = (2 if t.lora_rank else 4) * (body * tokens + head * generated) + 4 * vision_trained * patches * images
    recompute = forward if t.gradient_checkpointing else 0
    fixed = int(t.prompts_per_rollout > t.prompts_per_step or t.ppo_epochs > 1) + int(cfg.loss.kl_coef > 0)
    update = rows * (t.ppo_epochs * (forward + backward + recompute) + fixed * forward)
    return prefill, update


def run_time(cfg: Config, world: int, questions: int, lengths: TurnLengths, *, arch: str | None = None,
             text_tokens: int = 300, bandwidth_tbs: float = BANDWIDTH_TBS["h100"],
             peak_tflops: float = PEAK_TFLOPS["h100"], utilization: float = UTILIZATION) -> RunTime:
    """The time of one rollout batch by part (one rank's share; every rank works at once) and
    the run's number of rollout batches, for ``questions`` training questions."""
    a = arch_for(cfg, arch)
    p = count_params(a)
    prompts = max(1, cfg.train.prompts_per_rollout // world)
    groups = cfg.rollout.generation_batch_size or prompts
    calls = math.ceil(prompts / min(groups, prompts))
    rows = min(groups, prompts) * cfg.rollout.group_size
    decode = calls * decode_floor_s(a, p, cfg, rows, text_tokens, bandwidth_tbs, turn_lengths=lengths.longest)
    prefill, update = flops_per_rollout_batch(cfg, p, a.tie_word_embeddings, world, lengths, text_tokens, a.factor)
    rate = peak_tflops * 1e12 * utilization
    per_epoch, batches = rollout_batches(cfg, questions)
    return RunTime(prefill / rate, decode, update / rate, per_epoch, batches)


def render_run_time(rt: RunTime, lengths: TurnLengths, questions: str, peak_tflops: float, utilization: float,
                    bandwidth_tbs: float) -> list[str]:
    """The plan's lines for the run's time (``questions``: how many, and where that comes from)."""
    hours = {part: rt.batches * seconds / 3600 for part, seconds in
             (("decode", rt.decode_s), ("vision + prefill", rt.vision_prefill_s), ("update", rt.update_s))}
    days = f" ({rt.hours / 24:.1f} days)" if rt.hours >= 24 else ""
    return [f"run time at {lengths.source}:",
            f"  {questions}: {rt.batches_per_epoch} rollout batches per epoch, {rt.batches} in the run",
            f"  vision + prefill {rt.vision_prefill_s:9,.1f} s per rollout batch   compute: {peak_tflops:g} TFLOP/s x "
            f"{utilization:.0%} utilization",
            f"  decode           {rt.decode_s:9,.1f} s per rollout batch   HBM {bandwidth_tbs:g} TB/s: weights + KV "
            "per step, each call as long as its longest row",
            f"  update           {rt.update_s:9,.1f} s per rollout batch   compute: 6 FLOPs / parameter / token "
            "(+2 recompute, +2 per fixed pass)",
            f"  one rollout batch {rt.batch_s:,.0f} s; the run {rt.hours:,.1f} h{days}: "
            + ", ".join(f"{part} {h:,.1f} h" for part, h in hours.items()) + " (ZeRO-3's traffic not included)"]


def startup_line(cfg: Config, world: int, questions: int) -> str | None:
    """The run's time for the trainer to print at start-up on GPUs (None on CPU and for SFT), at
    every turn's whole budget: an upper bound, since no turn lengths are known yet. Advice
    only: a model the estimate cannot size gets a line saying so, never an error."""
    import torch

    if not torch.cuda.is_available() or cfg.train.algorithm != "rl":
        return None
    chip = "h200" if "H200" in torch.cuda.get_device_name(0) else "h100"
    try:
        rt = run_time(cfg, world, questions, budget_lengths(cfg), bandwidth_tbs=BANDWIDTH_TBS[chip],
                      peak_tflops=PEAK_TFLOPS[chip])
    except Exception as e:  # noqa: BLE001 - an estimate must never stop a launch
        return f"run time estimate unavailable: {e}"
    return (f"run time estimate: {rt.batches} rollout batches, at most {rt.hours:,.1f} h on {chip.upper()}s with "
            f"every turn at its whole budget (decode {rt.batches * rt.decode_s / 3600:,.1f} h, vision + prefill "
            f"{rt.batches * rt.vision_prefill_s / 3600:,.1f} h, update {rt.batches * rt.update_s / 3600:,.1f} h); "
            "python -m mgpo.tools.plan --pilot <this run>/metrics.jsonl times it at the lengths its turns run to")
