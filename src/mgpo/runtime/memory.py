"""Will it fit? The per-GPU memory of a launch and its decode-time floor, predicted before any
model loads: ``train.py`` refuses a GPU launch this predicts will run out of memory
(``startup_line``), and ``python -m mgpo.tools.plan`` prints the whole plan.

One training step has three memory peaks, never at the same time:

- rollout: the rank's shard of the model states, the whole policy gathered in bf16 for
  ``generate``, the reference model's shard, and the larger of the KV cache of one generate
  batch at its longest and the turn-2 prefill (cache so far + one layer's transient);
- update: the model states, the reference shard, the layers ZeRO-3 gathers for the
  forward, the activations of one micro-batch and the masked-logits buffer;
- optimizer step: the model states plus the fp32 gradient of one optimizer sub-group.

Each formula is a function below, with where each input comes from (docs/gpu-plan.md
states them once more, with the three documented set-ups). Bytes are exact counts for
parameters (from the published configs in ``mgpo.runtime.archs``, counted on the meta device)
and for the KV cache; activations per layer and token were measured on CPU (``make bench``;
the plan's tests measure them again) and are scaled to the real depth here. GB = 10^9 bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from ..config import Config, ConfigError
from .archs import ARCHS, Arch, arch_config
from .family import FAMILIES, family_of, model_class

HEAD_CHUNK = 2048
"""Masked tokens per lm_head chunk in the training forward (``mgpo.core.policy``): a 152k
vocabulary x 2048 x 4 bytes = 1.2 GB of logits at most, planned here."""

GB = 1e9
BF16, FP32 = 2, 4
HEADROOM = 0.9
"""Share of the GPU's memory the plan lets itself fill: the rest is the CUDA context,
NCCL buffers and allocator fragmentation."""
DS_SUB_GROUP = 1_000_000_000
"""DeepSpeed's default ``sub_group_size``: parameters stepped together, each step holding
their gradient in fp32."""
BANDWIDTH_TBS = {"h100": 3.35, "h200": 4.8}
"""HBM bandwidth of an H100 SXM and an H200 (NVIDIA's data sheets), TB/s."""
# Activation bytes per token per decoder layer, bf16, SDPA attention, the trainer's forward
# (``measure_layer_bytes`` in mgpo.tools.bench: live heap after the forward, 2 layers minus 1, 512
# tokens; ``make bench`` on 2026-11-24, AMD EPYC CPU, torch 2.14.1, transformers 5.23).
# "act": everything autograd keeps for backward; "act_ckpt": with gradient checkpointing
# (the layer's input, 2 x hidden bytes). Counting the tensors autograd saves gives about
# 22 x hidden + 6 x kv width + 8 x intermediate bytes, within 4% of both. "prefill": the
# peak of a no-grad layer beyond its input (its MLP's act(gate), up and their product).
MEASURED_ACT = {
    "qwen2.5-vl-3b": {"act": 130_205, "act_ckpt": 4_181, "prefill": 83_274},
    "qwen2.5-vl-7b": {"act": 225_512, "act_ckpt": 7_247, "prefill": 134_977},
    "qwen3-vl-8b": {"act": 215_454, "act_ckpt": 8_304, "prefill": 100_976},
}


@dataclass(frozen=True)
class Params:
    """Parameter counts of the full-depth model (tied weights counted once)."""

    total: int
    vision: int
    embedding: int
    lora: int  # adapter parameters at the config's rank and targets (0 without LoRA)
    largest_module: int  # the largest single module's own parameters (DeepSpeed's "largest layer")


@lru_cache(maxsize=8)
def count_params(arch: str | Arch, lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> Params:
    """Exact counts from the real module tree, built on the meta device (no memory); ``arch``
    a published architecture's name, or an ``Arch`` (one at reduced depth, say)."""
    import torch

    a = ARCHS[arch] if isinstance(arch, str) else arch
    arch_name = a.name
    with torch.device("meta"):
        model = model_class(FAMILIES[a.family])(
            arch_config(arch_name, layers=a.num_hidden_layers, vision_depth=a.vision_depth))
    unique = {id(p): p.numel() for p in model.parameters()}
    vision = sum(p.numel() for p in model.model.visual.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    lora = 0
    if lora_rank:
        for name, m in model.model.language_model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets:
                lora += lora_rank * (m.in_features + m.out_features)
    return Params(sum(unique.values()), vision, model.model.language_model.embed_tokens.weight.numel(), lora, largest)


def arch_for(cfg: Config, name: str | None = None) -> Arch:
    """The architecture: named, else read from the checkpoint's config.json, else guessed
    from the model path ("3B" / "7B" in it)."""
    if name:
        return ARCHS[name]
    path = Path(cfg.model.path) / "config.json"
    if path.is_file():
        c = json.loads(path.read_text())
        text = c.get("text_config", c)
        hidden = text.get("hidden_size", c.get("hidden_size"))
        family = family_of(c).name if "model_type" in c else None
        for a in ARCHS.values():
            if a.hidden_size == hidden and family in (None, a.family):  # at the checkpoint's own depth (a 2-layer build of the widths)
                return replace(a, num_hidden_layers=text.get("num_hidden_layers", a.num_hidden_layers),
                               vision_depth=c.get("vision_config", {}).get("depth", a.vision_depth))
        raise ValueError(f"{path}: hidden_size {hidden} is none of {sorted(ARCHS)}; pass --arch")
    low = cfg.model.path.lower()
    for a in ARCHS.values():
        if a.name.rsplit("-", 1)[-1] in low:
            return a
    raise ValueError(f"cannot tell the architecture of {cfg.model.path}; pass --arch {sorted(ARCHS)}")


# ----------------------------------------------------------------------------- formulas

def image_tokens(cfg: Config, factor: int = 28) -> int:
    """Tokens of one image at the pixel budget: one per ``factor`` x ``factor`` pixels (the
    architecture's patch x merge: 28, or 32 for Qwen3-VL)."""
    return cfg.model.max_pixels // (factor * factor)


def tokens_per_trajectory(cfg: Config, text_tokens: int, factor: int = 28) -> tuple[int, int]:
    """(all tokens, generated tokens) of the longest possible trajectory.

    Two images of at most max_pixels / factor^2 tokens each (the original, then the crop or the
    original again) for the two-turn template, one for the single-turn one.
    """
    r = cfg.rollout
    image = image_tokens(cfg, factor)
    if r.template == "grpo":
        return text_tokens + image + r.max_new_tokens_turn1, r.max_new_tokens_turn1
    new = r.max_new_tokens_turn1 + r.max_new_tokens_turn2
    return text_tokens + 2 * image + new, new


def kv_bytes_per_token(a: Arch, layers: int | None = None) -> int:
    """K and V, every layer, bf16: layers x 2 x kv heads x head dim x 2 bytes."""
    return (layers or a.num_hidden_layers) * 2 * a.num_key_value_heads * a.head_dim * BF16


def activation_bytes(a: Arch, tokens: int, checkpointing: bool, layers: int | None = None) -> float:
    """Activations kept for backward by one forward over ``tokens`` tokens.

    Without checkpointing every layer keeps its full set; with it every layer keeps its
    input and one layer at a time is recomputed with its full set during backward.
    """
    m, L = MEASURED_ACT[a.name], layers or a.num_hidden_layers
    per_token = L * m["act_ckpt"] + m["act"] if checkpointing else L * m["act"]
    return tokens * per_token


def turn2_prefill_bytes(a: Arch, cfg: Config, text_tokens: int) -> int:
    """Per row, at the start of turn 2 (``continue_cache``: every row's new chunk, its crop
    included, prefilled in one forward): the cache so far (turn 1 and the chunk) plus the
    largest transient of one layer, whichever of the decoder layer's (measured, per chunk
    token) and the vision tower's MLP on the crop's patches (4 per image token; act(gate),
    up and product: 3 x 3,420 x 2 bytes, counted) is larger. The single-turn template has
    no turn 2."""
    r = cfg.rollout
    if r.template == "grpo":
        return 0
    image = image_tokens(cfg, a.factor)
    chunk = text_tokens // 2 + image
    turn1 = text_tokens // 2 + image + r.max_new_tokens_turn1
    lm = chunk * MEASURED_ACT[a.name]["prefill"]
    vision = 4 * image * 3 * a.vision_intermediate_size * BF16
    return (turn1 + chunk) * kv_bytes_per_token(a) + max(lm, vision)


def masked_logits_bytes(a: Arch, tokens: int, entropy: bool) -> int:
    """``masked_token_logprobs``: lm_head only on the generated positions, ``HEAD_CHUNK`` of
    them at a time and recomputed in backward, so at most one chunk's bf16 logits, their
    fp32 copy divided by the temperature, log_softmax and, with the entropy bonus, exp() and
    the product are alive at once."""
    per = BF16 + FP32 + FP32 + (2 * FP32 if entropy else 0)
    return min(tokens, HEAD_CHUNK) * a.vocab_size * per


@dataclass
class Plan:
    lines: list[tuple[str, float, str]]  # (what, GB, where it comes from)
    phases: dict[str, float]  # GB per phase
    usable_gb: float
    fits: bool
    verdict: str
    max_micro_batch: int
    max_generation_groups: int
    decode_floor_s: float
    model_states_gb: float  # what DeepSpeed's estimator counts: states at the step + gathered layers
    max_cache_tokens: int = 0  # continuous batching: the largest rollout.stream_cache_tokens that fits


def _generation_groups(cfg: Config, prompts_per_rank: int) -> int:
    size = getattr(cfg.rollout, "generation_batch_size", 0)  # whole groups per generate call; 0 = all
    return min(size, prompts_per_rank) if size else prompts_per_rank


def precision_problem(cfg: Config, deepspeed: bool, device: str = "cuda") -> str | None:
    """Why a launch would train the wrong weights, or None. Full fine-tuning in bf16 or fp16
    outside DeepSpeed runs AdamW on the half-precision weights themselves: at lr 1e-6 an update
    is far below half a bf16 step of a typical weight (8 bits of mantissa), so it rounds away
    (one AdamW step on N(0, 0.02) weights at lr 1e-6 moves 2% of bf16 elements, all fp32 ones).
    DeepSpeed keeps fp32 master weights; LoRA adapters are fp32; fp32 weights are exact."""
    import torch

    from .model import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, device)
    if cfg.train.lora_rank or deepspeed or dtype == torch.float32:
        return None
    return (f"model.dtype={cfg.model.dtype} ({str(dtype).removeprefix('torch.')}) with full fine-tuning outside "
            "DeepSpeed: AdamW would update the half-precision weights themselves and most updates at "
            f"train.lr={cfg.train.lr:g} would round away; launch with DeepSpeed (configs/accelerate/zero3_*.yaml "
            "keeps fp32 master weights), train LoRA (train.lora_rank > 0), or set model.dtype=float32")


@dataclass(frozen=True)
class States:
    """What a launch holds besides activations and caches, per GPU, GB: its model states, the
    optimizer step's extra, the layers ZeRO-3 gathers, the policy gathered for generate, the
    reference model."""

    states: float
    step: float
    layer_buf: float
    gathered: float
    ref: float


def model_states(cfg: Config, p: Params, world: int, deepspeed: bool, add) -> States:
    """The one account of what each algorithm and launch holds (``add(what, bytes, source)``
    records each line): LoRA (a frozen bf16 base + fp32 adapters), full fine-tuning under
    DeepSpeed (bf16 weights, fp32 accumulated gradients, fp32 master weights and Adam moments,
    all sharded by ZeRO-3 over the ranks), or plain / DDP full fine-tuning (fp32 weights,
    gradients and moments, whole on every rank: half precision is refused,
    ``precision_problem``). SFT has no reference model; RL has one when ``loss.kl_coef`` > 0."""
    t = cfg.train
    rl_ref = cfg.loss.kl_coef > 0 and t.algorithm == "rl"
    if t.lora_rank:
        states = add("bf16 base weights (frozen, whole model)", BF16 * p.total, "published config, counted")
        states += add(f"LoRA r={t.lora_rank}: bf16 weights + grads + fp32 master + Adam m, v",
                      (BF16 + BF16 + FP32 + 2 * FP32) * p.lora, "r x (in + out) per targeted Linear")
        return States(states, 0.0, 0.0, 0.0, 0.0)  # the reference is the base, adapters off
    trainable = p.total - (p.vision if t.freeze_vision else 0)
    which = "trainable params (vision frozen)" if t.freeze_vision else "every param"
    if not deepspeed:
        states = add("fp32 params (not sharded: plain / DDP)", FP32 * p.total, "published config, counted")
        states += add("fp32 grads + Adam m, v", 3 * FP32 * trainable, which)
        ref = add("reference model (fp32), whole", FP32 * p.total if rl_ref else 0, "kl_coef > 0: a frozen copy")
        return States(states, 0.0, 0.0, 0.0, ref)
    zero3, shard = world > 1, world
    how = f"/ {shard} ranks (ZeRO-3)" if zero3 else "(DeepSpeed on one GPU)"
    states = add(f"bf16 params {how}", BF16 * p.total / shard, "published config, counted")
    # configs/deepspeed/zero3.json accumulates micro-batch gradients in fp32 (grad_accum_dtype), so
    # DeepSpeed's flat gradient-partition buffer is fp32: 4 bytes per trainable parameter / ranks (2 in bf16).
    states += add(f"fp32 accumulated grads {how}", FP32 * trainable / shard, which)
    states += add(f"fp32 master weights + Adam m, v {how}", 3 * FP32 * trainable / shard, "AdamW, mixed precision")
    step = add("fp32 gradient of one optimizer sub-group (at the step)",
               FP32 * min(DS_SUB_GROUP, trainable / shard), "DeepSpeed sub_group_size 1e9")
    layer_buf = add("layers gathered for forward/backward (ZeRO-3)", 2 * BF16 * p.largest_module,
                    "largest module, current + prefetched") if zero3 else 0.0
    gathered = add("full bf16 policy gathered for generate", BF16 * p.total,
                   "D.generation_weights") if zero3 and t.algorithm == "rl" else 0.0
    ref = add("reference model (bf16) share", BF16 * p.total / shard if rl_ref else 0,
              "kl_coef > 0: a frozen copy, sharded like the policy")
    return States(states, step, layer_buf, gathered, ref)


def plan(cfg: Config, world: int, gpu_memory_gb: float, *, arch: str | None = None, text_tokens: int = 300,
         bandwidth_tbs: float = BANDWIDTH_TBS["h100"], deepspeed: bool = True) -> Plan:
    """Per-GPU memory by phase, the verdict, and the decode-time floor of one rollout batch.
    ``deepspeed``: the launch runs DeepSpeed (the presets' full fine-tuning does; LoRA ignores it).
    SFT generates nothing: its plan has no rollout phase."""
    a, t, r = arch_for(cfg, arch), cfg.train, cfg.rollout
    if problem := precision_problem(cfg, deepspeed):
        raise ConfigError(problem)
    p = count_params(a, t.lora_rank, tuple(t.lora_target_modules) if t.lora_rank else ())
    G, T, new = r.group_size, *tokens_per_trajectory(cfg, text_tokens, a.factor)
    prompts_per_rank = max(1, t.prompts_per_rollout // world)
    groups = _generation_groups(cfg, prompts_per_rank)
    lines = []

    def add(what, nbytes, src):
        lines.append((what, nbytes / GB, src))
        return nbytes / GB

    held = model_states(cfg, p, world, deepspeed, add)
    rows = groups * G
    phases, max_groups, floor_s = {}, 0, 0.0
    cap = r.stream_cache_tokens if r.continuous_batching else 0
    joined = rows * (T - r.max_new_tokens_turn2)  # the most one join prefills: every row's longest input
    if t.algorithm == "rl" and cap:  # the stream: the cache stays under the cap, a join's prefill under both
        kv = add(f"KV cache: at most {cap} tokens (rollout.stream_cache_tokens)", cap * kv_bytes_per_token(a),
                 f"layers x 2 x {a.num_key_value_heads} kv heads x {a.head_dim} x bf16")
        decode_logits = add("decode logits (fp32 scores + probs)", rows * a.vocab_size * 2 * FP32, "generate, per step")
        prefill = add(f"a join's prefill of at most {min(cap, joined)} tokens: the widest layer's transient",
                      min(cap, joined) * MEASURED_ACT[a.name]["prefill"], "measured per-token layer peak")
        phases["rollout"] = held.states + held.gathered + held.ref + kv + max(decode_logits, prefill)
    elif t.algorithm == "rl":
        kv = add(f"KV cache: {rows} rows x {T} tokens", rows * T * kv_bytes_per_token(a),
                 f"layers x 2 x {a.num_key_value_heads} kv heads x {a.head_dim} x bf16")
        decode_logits = add("decode logits (fp32 scores + probs)", rows * a.vocab_size * 2 * FP32, "generate, per step")
        prefill = add(f"turn-2 prefill of {rows} rows, KV so far + the widest layer's transient",
                      rows * turn2_prefill_bytes(a, cfg, text_tokens), "measured per-token layer peak x chunk")
        phases["rollout"] = held.states + held.gathered + held.ref + max(kv + decode_logits, prefill)
    M = t.micro_batch_size
    # packed by tokens, a micro-batch holds at most the budget, padding counted (or one trajectory
    # past it), however many trajectories that is; its generated tokens are fewer than its tokens
    width, generated = (max(t.micro_batch_tokens, T),) * 2 if t.micro_batch_tokens else (M * T, M * new)
    shape = f"packed to at most {width} tokens" if t.micro_batch_tokens else f"{M} x {T} tokens"
    act = add(f"activations, micro-batch {shape}" + (" (checkpointed)" if t.gradient_checkpointing else ""),
              activation_bytes(a, width, t.gradient_checkpointing), "per-layer figures measured on CPU x layers")
    logits = add(f"masked-logits buffer (one chunk of at most {generated} generated)",
                 masked_logits_bytes(a, generated, cfg.loss.entropy_coef > 0), "masked_token_logprobs")
    phases["update"] = held.states + held.layer_buf + held.ref + act + logits
    phases["optimizer step"] = held.states + held.step
    usable = HEADROOM * gpu_memory_gb
    fits = max(phases.values()) <= usable

    # ---- the largest micro-batch and generate batch that fit
    per_traj_train = activation_bytes(a, T, t.gradient_checkpointing) / GB
    logits_chunk = masked_logits_bytes(a, 1 << 40, cfg.loss.entropy_coef > 0) / GB  # one lm_head chunk at most
    max_micro = max(0, math.floor((usable - (held.states + held.layer_buf + held.ref + logits_chunk)) / per_traj_train))
    if t.algorithm == "rl":
        per_group_gen = G * max(T * kv_bytes_per_token(a) + a.vocab_size * 2 * FP32,
                                turn2_prefill_bytes(a, cfg, text_tokens)) / GB
        max_groups = max(0, math.floor((usable - (held.states + held.gathered + held.ref)) / per_group_gen))
        floor_s = decode_floor_s(a, p, cfg, rows, text_tokens, bandwidth_tbs) * math.ceil(prompts_per_rank / groups)
    max_cache = 0
    if t.algorithm == "rl":  # the stream's largest cap: its cache plus a join's prefill transient
        room = (usable - (held.states + held.gathered + held.ref)) * GB - rows * a.vocab_size * 2 * FP32
        kv_b, pre_b = kv_bytes_per_token(a), MEASURED_ACT[a.name]["prefill"]
        beyond = (room - joined * pre_b) / kv_b  # a cap above what one join prefills
        max_cache = max(0, math.floor(beyond if beyond >= joined else room / (kv_b + pre_b)))
    verdict = _verdict(cfg, phases, usable, gpu_memory_gb, world, max_micro, max_groups, groups, T,
                       max_cache if cap else 0)
    return Plan(lines, phases, usable, fits, verdict, max_micro, max_groups, floor_s,
                held.states + held.step + held.layer_buf, max_cache)


def decode_floor_s(a: Arch, p: Params, cfg: Config, rows: int, text_tokens: int, bandwidth_tbs: float,
                   turn_lengths: tuple[float, float] | None = None) -> float:
    """Lower bound on one generate batch's decode time: every step reads the language
    model's weights once and every row's KV cache so far, at the GPU's HBM bandwidth; each
    turn runs to its token budget, or to ``turn_lengths`` (turn 1, turn 2) when given."""
    r = cfg.rollout
    weights = BF16 * (p.total - p.vision - (0 if a.tie_word_embeddings else p.embedding))  # a lookup reads one row
    image = image_tokens(cfg, a.factor)
    seconds, prefix = 0.0, text_tokens // 2 + image
    turns = list(turn_lengths or (r.max_new_tokens_turn1, r.max_new_tokens_turn2))[:1 if r.template == "grpo" else 2]
    for n in turns:
        kv_read = rows * kv_bytes_per_token(a) * (n * prefix + n * (n - 1) / 2)  # sum over steps of the cache length
        seconds += (n * weights + kv_read) / (bandwidth_tbs * 1e12)
        prefix += n + text_tokens // 2 + image
    return seconds


def _verdict(cfg, phases, usable, gpu_gb, world, max_micro, max_groups, groups, tokens_per_trajectory,
             max_cache: int = 0) -> str:
    worst = max(phases, key=phases.get)
    head = f"{phases[worst]:.1f} GB peak ({worst}) of {usable:.0f} GB usable on {gpu_gb:g} GB x {world}"
    largest = (f"train.micro_batch_tokens {max_micro * tokens_per_trajectory}" if cfg.train.micro_batch_tokens
               else f"train.micro_batch_size {max_micro}")
    if phases[worst] <= usable:
        return f"fits: {head}; largest {largest}"
    todo = []
    if phases.get("rollout", 0.0) > usable:
        if max_cache:  # the stream: its cap bounds the cache, its row budget only the logits
            todo.append(f"rollout: rollout.stream_cache_tokens at most {max_cache}, not "
                        f"{cfg.rollout.stream_cache_tokens}")
        elif max_groups >= 1:
            field = "rollout.generation_batch_size" if hasattr(cfg.rollout, "generation_batch_size") else \
                "train.prompts_per_rollout / world (generate runs on all of a rank's prompts at once)"
            todo.append(f"rollout: at most {max_groups} prompt group(s) per generate call, not {groups} "
                        f"(set {field}), or lower rollout.max_new_tokens_turn1/2")
        else:
            todo.append("rollout: not even one group fits; lower rollout.group_size or rollout.max_new_tokens_turn1/2, "
                        "or use more GPUs")
    if phases["update"] > usable:
        if max_micro >= 1:
            todo.append(f"update: {largest.replace(' ', ' at most ', 1)}")
        else:
            todo.append("update: not even one trajectory fits; lower rollout.max_new_tokens_turn1/2 (the "
                        "masked-logits buffer and the activations grow with them) or model.max_pixels")
        if not cfg.train.gradient_checkpointing:
            todo.append("update: train.gradient_checkpointing=true")
    if phases["optimizer step"] > usable:
        todo.append("model states alone do not fit: more GPUs, or LoRA (train.lora_rank)")
    return f"does not fit: {head}; change: " + "; ".join(todo)


def verdict(cfg: Config, world: int, gpu_memory_gb: float, deepspeed: bool = True) -> str:
    """One line for the trainer to print at start-up on GPUs. Advice only: a model the
    plan cannot size (not a published architecture) gets a line saying so, never an error;
    a launch that would train the wrong weights (``precision_problem``) is refused."""
    if problem := precision_problem(cfg, deepspeed):
        raise ConfigError(problem)
    try:
        return plan(cfg, world, gpu_memory_gb, deepspeed=deepspeed).verdict
    except Exception as e:  # noqa: BLE001 - the plan must never stop a launch
        return f"memory plan unavailable: {e}"


def startup_line(cfg: Config) -> str | None:
    """The verdict for this launch on a GPU run (None on CPU), the same on every rank, so that
    a refusal stops them all; see ``check_verdict``."""
    import torch

    if not torch.cuda.is_available():
        return None
    from .distributed import launched_with_deepspeed, launched_world_size

    line = verdict(cfg, launched_world_size(), torch.cuda.get_device_properties(0).total_memory / GB,
                   deepspeed=launched_with_deepspeed())
    return check_verdict(line, cfg.train.ignore_plan)


def check_verdict(line: str, ignore_plan: bool) -> str:
    """The start-up line to print for a plan's verdict; a predicted out-of-memory is refused
    (ConfigError, naming the change) unless ``train.ignore_plan`` is set, then it is a warning.

    >>> check_verdict("fits: 51.7 GB peak (rollout) of 72 GB usable on 80 GB x 8", False)
    'memory plan: fits: 51.7 GB peak (rollout) of 72 GB usable on 80 GB x 8'
    """
    if not line.startswith("does not fit"):
        return "memory plan: " + line
    if ignore_plan:
        return "WARNING: predicted out of memory (train.ignore_plan=true): " + line
    raise ConfigError(f"predicted out of memory (python -m mgpo.tools.plan shows the whole plan): {line}; or "
                      "pass train.ignore_plan=true to launch anyway")
