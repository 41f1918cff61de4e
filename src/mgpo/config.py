"""Configuration: frozen dataclasses loaded from YAML, overridable from the command line.

    cfg = load_config("configs/tiny_cpu.yaml", ["rollout.group_size=8", "model.max_pixels=200704"])

Every field is documented once, here, in the docstring under it. Unknown keys fail with
the list of known ones; a value of the wrong type fails with the field's dotted name.
The object that is printed and saved beside a run is the object the code reads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import schema
from .schema import (
    ConfigError,
    build,
    fix_yaml_floats,
    flatten,
    load_yaml,
    merge_trees,
    parse_overrides,
    plain,
)

__all__ = ["Config", "ConfigError", "field_docs", "flatten", "load_config", "parse_overrides", "save_config"]

TEMPLATES = ("mgpo", "grpo", "direct", "mgpo_k")  # mgpo.core.prompts.TEMPLATES's keys (a test checks)
FORMATS = ("jsonl", "chat", "vstar", "mme_realworld", "hrbench")  # the data readers (mgpo.data.samples)
REPORT_TO = ("tensorboard", "wandb", "all", "none")  # train.report_to's choices (mgpo.runtime.logger)
CROP_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")  # mgpo.core.grounding.RESAMPLE's keys (a test checks)
LOSS_NORMALIZATIONS = ("token", "sequence", "constant")  # mgpo.core.loss.loss_weights's rules
EVAL_CROPS = ("model", "black", "random", "full", "gold")  # mgpo.core.grounding.counterfactual_region's kinds


@dataclass(frozen=True)
class ModelConfig:
    path: str = "build/tiny-qwen2.5-vl"
    """Local directory of a Qwen2.5-VL checkpoint (weights, processor, chat template)."""
    min_pixels: int = 256 * 28 * 28
    """Lower pixel budget of every image shown to the model; smaller crops are enlarged."""
    max_pixels: int = 1280 * 28 * 28
    """Upper pixel budget of every image shown to the model (paper: 1280*28*28)."""
    dtype: str = "auto"
    """Weights dtype: "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float16" or "float32"."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained: "sdpa", "eager" or "flash_attention_2"."""
    trust_remote_code: bool = False
    """Allow code shipped inside the checkpoint folder to run. Off unless you ask for it."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "build/synth/train.jsonl"
    """Training set: a file or folder in any format mgpo.data.samples reads."""
    train_format: str = "auto"
    """Format of `train`: auto, jsonl, vstar, mme_realworld or hrbench."""
    eval: str = "build/synth/test.jsonl"
    """Evaluation set (same formats)."""
    eval_format: str = "auto"
    """Format of every evaluation set (`eval` and each of eval.datasets); auto tells each from its path."""
    image_root: str = ""
    """Folder that relative image paths are resolved against ("" = where the format's published layout
    puts them: beside the JSONL, the MME-RealWorld archives' folder or its Lite `imgs/`)."""
    max_samples: int = 0
    """Use only the first N records of each set (0 = all)."""
    max_prompt_tokens: int = 8192
    """A prompt (text and image tokens) longer than this is skipped and counted (the paper's run: 8192; 0 = no limit);
    for a chat record (SFT), its whole conversation."""


@dataclass(frozen=True)
class RolloutConfig:
    template: str = "mgpo"
    """Prompt preset: "mgpo" (two turns with a crop), "grpo" (single-turn baseline), "direct", or
    "mgpo_k" (beyond the paper: each turn zooms or answers, up to ``max_turns`` turns; our wording)."""
    max_turns: int = 2
    """Assistant turns of a conversation. "mgpo" is the paper's two (and refuses any other value);
    "mgpo_k" takes K >= 2, the last turn being a forced answer; one-turn templates ignore it."""
    group_size: int = 8
    """Samples per prompt (n in GRPO); advantages are normalized within each group."""
    temperature: float = 1.0
    """Sampling temperature for both turns (the paper's run: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold for both turns (the paper's run: 1.0). Training refuses < 1: the
    training log-probs model the untruncated distribution."""
    top_k: int = 0
    """Sample only from the k most likely tokens (0 = off, the paper's run). Training refuses > 0."""
    max_new_tokens_turn1: int = 8192
    """Token budget of the grounding turn; a turn 1 that hits it falls back to the original image."""
    max_new_tokens_turn2: int = 8192
    """Token budget of the answer turn."""
    crop_resample: str = "bicubic"
    """Filter used to resize the crop: nearest (the authors' code), bilinear, bicubic or lanczos."""
    min_box_side: int = 28
    """A box is valid only if both sides are longer than this (input pixels)."""
    max_box_aspect: float = 100.0
    """A box is valid only if its long/short side ratio is below this."""
    format_reward: float = 0.0
    """Extra reward for a valid box in turn 1 (off in the paper's runs)."""
    turn_cost: float = 0.0
    """Reward subtracted per crop shown, for shorter searches ("mgpo_k"; 0 = off)."""
    max_image_tokens: int = 0
    """"mgpo_k": cap on a trajectory's image tokens (all its images); a turn whose next image would
    pass it gets the text-only forced-answer turn instead. 0 = min(max_turns, 4) images at the full
    pixel budget (max_pixels / 784 tokens each): K <= 4 is never capped, a larger K shows at most
    four images' worth. Host and device memory of a trajectory grow with its images."""
    shared_prefill: bool = True
    """Encode each image and prefill each prompt once per group, then sample the group from a
    copied cache (False: the naive path, every sample re-encodes and re-reads its prompt)."""
    generation_batch_size: int = 0
    """Prompts (whole groups) per ``generate`` call; 0 = all of a rank's prompts at once. At the
    paper's settings one call over 64 prompts x 8 samples holds a ~91 GB turn-2 cache: lower it."""
    continue_turn2: bool = True
    """Turn 2 continues from each sample's turn-1 cache and prefills only the new tokens
    (False: turn 2 re-reads the whole conversation, first image included)."""
    continuous_batching: bool = False
    """Decode a rank's whole rollout batch as one stream (``mgpo.core.stream``): every
    ``stream_chunk`` tokens the rows that stopped leave, and the next prompt groups, or a finished
    row's next turn, join, at most generation_batch_size groups' rows at once; no call waits on its
    longest row. A later turn is prefilled from its whole conversation (continue_turn2 does not
    apply). Every template, mgpo_k included."""
    stream_chunk: int = 8
    """continuous_batching: decode steps between two joins (a stopped row waits at most this long)."""
    stream_cache_tokens: int = 0
    """continuous_batching: the most key/value-cache tokens the stream holds (rows x width, padding
    included; 0 = no cap but generation_batch_size's rows). A request joins only if every running
    row and its own, each run to its token limit, fit under it, so the cache never passes it: when
    rows run long, fewer join. ``mgpo.tools.plan`` prints the largest that fits."""
    drop_uniform_groups: bool = False
    """Leave groups whose rewards are all equal (they carry no advantage) out of the update: their
    tokens get weight 0, so they add no KL or entropy term and do not count in the step's
    normalization (DAPO's dynamic sampling without the resampling; the share is logged as
    train/left_out_share). The ranks still run every micro-batch, to stay in lock-step."""
    over_turn: str = "penalize"
    """"mgpo_k": a trajectory that used all rollout.max_turns without a readable answer. "penalize":
    it scores 0 like any wrong answer (the default); "mask": it is left out of the loss instead
    (Mini-o3's over-turn masking), its reward still counted in its group's statistics. A trajectory
    made to answer early by rollout.max_image_tokens that wrote no readable answer counts as one."""
    zoom_bonus: float = 0.0
    """Added to the reward of a right answer per crop it was shown (PyVision-RL's reward for using
    the tool, against a policy that stops zooming), up to rollout.zoom_bonus_cap. 0 = off (the paper)."""
    zoom_bonus_cap: float = 0.2
    """The most rollout.zoom_bonus adds to one trajectory's reward."""


@dataclass(frozen=True)
class LossConfig:
    clip_eps: float = 0.2
    """PPO ratio clip range epsilon."""
    kl_coef: float = 0.01
    """Weight of the k3 KL penalty to the frozen initial model (0 = no reference model)."""
    kl_clamp: float = 10.0
    """The per-token k3 KL is clamped to [-kl_clamp, kl_clamp]."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus (subtracted from the loss)."""
    adv_eps: float = 1e-6
    """Added to the group std before dividing."""
    normalization: str = "token"
    """How token losses are averaged within an optimizer step. "token": one mean over every
    masked token of the step, across micro-batches and ranks (DAPO's token-level loss, TRL's
    "dapo"). "sequence": each trajectory's token mean, then the mean over the step's
    trajectories (GRPO's per-sequence mean). "constant": the sum over the step's masked tokens
    divided by (its trajectories that train x the most tokens one can generate: the turn budgets,
    max_new_tokens_turn1 + (turns - 1) x max_new_tokens_turn2), Dr. GRPO's. SFT's loss follows
    the same rule."""
    ratio: str = "token"
    """The importance ratio: "token" (PPO, per token; the paper), "sequence" (GSPO: exp of the mean
    token log-ratio over the trajectory's trained tokens, clipped per trajectory; GSPO used clip
    ranges near 3e-4 / 4e-4) or "geometric" (GMPO: token log-ratios clipped in log space to
    [-clip_eps, clip_eps_high], then their mean per trajectory; GMPO used 0.4). With K turns a
    trajectory's trained tokens are those of all its turns. The ratio departs from 1 only on
    off-policy steps: with one optimizer step per rollout batch (prompts_per_rollout =
    prompts_per_step) and train.ppo_epochs 1, every choice here (and clip_eps_high) trains as
    "token" does, and the trainer warns at start-up."""
    clip_eps_high: float | None = None
    """The upper clip of the ratio (DAPO's clip-higher: e.g. 0.28 with clip_eps 0.2); empty = clip_eps."""
    adv_scale: str = "group"
    """What the reward minus its group's mean is divided by: "group" (its group's std + adv_eps,
    GRPO, the paper), "batch" (the std of every reward of the rollout batch, all ranks, + adv_eps)
    or "none" (not divided: Dr. GRPO)."""


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/mgpo"
    """Run folder: config, TensorBoard logs, checkpoints."""
    seed: int = 0
    """Seed for data order, sampling and initialization."""
    epochs: int = 15
    """Passes over the training set."""
    algorithm: str = "rl"
    """"rl": MGPO, or the one-turn GRPO baseline, by rollout.template. "sft": supervised
    fine-tuning on the records' answers (and, where the record has a target box, a box around
    it) in the template of train.sft_templates: the paper's SFT row (grpo, records without
    boxes) and the warm start of the embedded base model."""
    sft_templates: tuple[str, ...] = ()
    """SFT only: templates taken in turn, one per rollout batch (e.g. [mgpo, grpo], so one base
    model follows both the two-turn and the one-turn prompts). Empty: rollout.template. What
    each teaches: grpo, one turn, the box (if the record has one) and \\boxed{LETTER}; on
    records without boxes the answer alone, the paper's SFT baseline. direct: the bare letter.
    mgpo: turn 1 a box around the record's target, turn 2 the answer from the crop; it needs
    target boxes (without, turn 1 would be empty and teach never to ground: refused). mgpo_k:
    zooms towards the target, then the answer."""
    sft_max_turns: tuple[int, ...] = ()
    """SFT in mgpo_k only: the rollout.max_turns of each rollout batch, taken in turn (e.g. [2, 3],
    so one base model knows both the K = 2 and the K = 3 conversation). Empty: rollout.max_turns."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    prompts_per_rollout: int = 512
    """Prompts sampled per rollout batch, over all ranks (the paper's run: 512 -> 4096 trajectories)."""
    prompts_per_step: int = 128
    """Prompts per optimizer step, over all ranks (the paper's run: 128, so 4 steps per rollout batch)."""
    micro_batch_size: int = 4
    """Trajectories per forward/backward on one rank; gradients accumulate to a step."""
    micro_batch_tokens: int = 0
    """When > 0, the update's micro-batches are packed by tokens instead: the step's trajectories,
    longest first, as many to a micro-batch as fit this many tokens with their padding (rows x
    the longest row); a longer trajectory goes alone. The old-policy and reference log-prob
    passes are packed the same way. 0: ``micro_batch_size`` trajectories each."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    lr: float = 1e-6
    """AdamW learning rate (constant after warm-up)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the training forward."""
    freeze_vision: bool = True
    """Keep the vision tower frozen."""
    lora_rank: int = 0
    """LoRA rank (0 = full fine-tuning)."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names that get LoRA adapters (language model only)."""
    save_every: int = 50
    """Write a checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    resume: str = "auto"
    """"auto" (newest checkpoint in output_dir that verifies), "none", or a checkpoint path."""
    overwrite: bool = False
    """A new run (resume "none") in a folder that holds an earlier run's checkpoints is refused;
    true: discard that run's checkpoints, metrics.jsonl and TensorBoard logs first (with resume
    "auto" over checkpoints it is refused: say resume "none" to discard). Saved as false in the
    run's config.yaml, so that file reused to continue the run cannot discard it."""
    allow_config_change: bool = False
    """Resume even though training-relevant settings differ from the run's saved config (the new
    config is saved as config.resume-<step>.yaml; config.yaml is kept). Off: such a resume is refused."""
    log_every: int = 1
    """Log scalars every N optimizer steps."""
    max_bad_steps: int = 5
    """Stop after this many consecutive non-finite losses."""
    report_to: str = "tensorboard"
    """Where scalars go besides metrics.jsonl (always written): "tensorboard" (runs/<name>/tensorboard),
    "wandb" (Weights & Biases through accelerate's tracker; it contacts its server unless WANDB_MODE=offline),
    "all" (both) or "none". The wandb package is imported only when asked for."""
    collective_timeout_s: int = 1200
    """How long (seconds) a rank waits at any collective for the others before the job stops,
    naming the collective (NCCL's flight recorder; see the README's "Several nodes"). The longest
    legitimate wait here is one rank finishing its rollout or evaluation share a few minutes
    ahead of the others, or rank 0 writing a large checkpoint; raise it for very long turns.
    Evaluation uses it too."""
    ignore_plan: bool = False
    """On GPUs, train.py refuses a launch that ``mgpo.runtime.memory`` (``python -m mgpo.tools.plan``) predicts will run out of
    memory, naming what to change; true: print the prediction as a warning and launch anyway."""


@dataclass(frozen=True)
class EvalConfig:
    mode: str = "mgpo"
    """mgpo (two turns with a crop), grpo (single-turn baseline), direct (question + choices only)
    or mgpo_k (zoom or answer each turn, up to eval.max_turns turns; beyond the paper)."""
    max_turns: int = 2
    """Assistant turns in mgpo_k mode (the rollout's max_turns for evaluation); mgpo is always 2."""
    crop: str = "model"
    """What turn 2 shows (mgpo mode): "model", the crop under the model's turn-1 box (the method);
    the counterfactuals that show whether the answer comes from that crop: "black" (a black image of
    the crop's exact size: the same tokens and positions), "random" (a crop of the same size at a
    random place, seeded per question and sample), "full" (the whole original again, as the fallback shows it),
    "gold" (the crop of the record's annotated target box, where it has one: the upper bound of
    grounding). Compare each with the plain run: `eval.py compare`."""
    adapter: str = ""
    """Optional LoRA adapter folder applied on top of model.path."""
    datasets: tuple[str, ...] = ()
    """Datasets to evaluate (any format mgpo.data.samples reads); empty = data.eval."""
    group_size: int = 1
    """Samples per question (k): 1 with temperature 0 is greedy; k > 1 gives Avg@k and pass@k."""
    temperature: float = 0.0
    """0 = greedy decoding; otherwise sampling at this temperature (top_p from rollout.top_p)."""
    batch_size: int = 8
    """Questions per generate batch."""
    output_dir: str = ""
    """Where predictions.jsonl, metrics.json, report.md and report.html go ("" = a folder named after
    the model, the datasets, the mode and the protocol: runs/eval/<model>/<datasets>-<mode>-<fingerprint>,
    so evaluations never share one)."""
    report_examples: int = 24
    """Cases shown in report.html."""
    overwrite: bool = False
    """Discard the predictions in output_dir when they were made under another protocol (model,
    mode, pixel budget, decoding, data...) and start fresh. Off: such a rerun is refused."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


RENAMED = {"eval.samples": "eval.group_size"}
"""Keys that were renamed: the old name is refused with a pointer to the new one."""


def _check_renamed(tree: dict, where: str) -> None:
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            raise ConfigError(f"{old} is now called {new} (same meaning: samples per question); rename it in {where}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = load_yaml(path.read_text(), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = fix_yaml_floats(loaded)
        _check_renamed(tree, str(path))
    given = parse_overrides(overrides or [])
    _check_renamed(given, "the command line")
    tree = merge_trees(tree, given)
    return validate(build(Config, tree, ""))


def _range(low: float, high: float = math.inf, *, above: bool = False, below: bool = False) -> tuple:
    """A rule for a number: finite, from ``low`` to ``high`` (``above``/``below``: that end excluded)."""
    text = (f"in {'(' if above else '['}{low}, {high}{')' if below else ']'}" if high < math.inf
            else f"{'>' if above else '>='} {low}")
    return (lambda v: math.isfinite(v) and (v > low if above else v >= low) and (v < high if below else v <= high),
            text)


BLOCK = 28 * 28  # one 28x28 merge block: the smallest image the vision tower takes
MAX_IMAGE_PIXELS = 16384 * BLOCK  # 12,845,056: Qwen2.5-VL's own processor default ceiling, 16,384 image tokens
COUNT, SOME, POSITIVE, SHARE = _range(0), _range(1), _range(0, above=True), _range(0, 1, below=True)
RANGES = {  # every numeric field: (accepts the value, what is allowed)
    "model.min_pixels": _range(BLOCK, MAX_IMAGE_PIXELS), "model.max_pixels": _range(BLOCK, MAX_IMAGE_PIXELS),
    "data.max_samples": COUNT, "data.max_prompt_tokens": COUNT,
    "rollout.max_turns": _range(2), "rollout.group_size": _range(2),  # one sample has no group-relative advantage
    "rollout.temperature": POSITIVE, "rollout.top_p": _range(0, 1, above=True), "rollout.top_k": COUNT,
    "rollout.max_new_tokens_turn1": SOME, "rollout.max_new_tokens_turn2": SOME, "rollout.min_box_side": COUNT,
    "rollout.max_box_aspect": _range(1, above=True), "rollout.format_reward": (math.isfinite, "a finite number"),
    "rollout.turn_cost": COUNT, "rollout.max_image_tokens": COUNT, "rollout.generation_batch_size": COUNT,
    "rollout.stream_chunk": SOME, "rollout.stream_cache_tokens": COUNT,
    "loss.clip_eps": POSITIVE, "loss.kl_coef": COUNT, "loss.kl_clamp": POSITIVE,
    "loss.entropy_coef": COUNT, "loss.adv_eps": POSITIVE, "rollout.zoom_bonus": COUNT, "rollout.zoom_bonus_cap": COUNT,
    "train.seed": COUNT, "train.epochs": SOME, "train.max_steps": COUNT, "train.prompts_per_rollout": SOME,
    "train.prompts_per_step": SOME, "train.micro_batch_size": SOME, "train.micro_batch_tokens": COUNT, "train.ppo_epochs": SOME, "train.lr": POSITIVE,
    "train.warmup_steps": COUNT, "train.weight_decay": COUNT, "train.betas[0]": SHARE, "train.betas[1]": SHARE,
    "train.grad_clip": POSITIVE, "train.lora_rank": COUNT, "train.save_every": SOME, "train.keep_last": COUNT,
    "train.log_every": SOME, "train.max_bad_steps": SOME, "train.collective_timeout_s": _range(10),
    "eval.max_turns": _range(2), "eval.group_size": SOME, "eval.temperature": COUNT, "eval.batch_size": SOME,
    "eval.report_examples": COUNT,
}
CHOICES = {  # every field with a fixed set of values
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "data.train_format": ("auto", *FORMATS), "data.eval_format": ("auto", *FORMATS),
    "rollout.template": tuple(sorted(TEMPLATES)), "rollout.crop_resample": CROP_FILTERS,
    "train.algorithm": ("rl", "sft"), "train.report_to": REPORT_TO, "eval.mode": tuple(sorted(TEMPLATES)),
    "loss.normalization": LOSS_NORMALIZATIONS, "loss.ratio": ("token", "sequence", "geometric"),
    "loss.adv_scale": ("group", "batch", "none"), "rollout.over_turn": ("penalize", "mask"),
    "eval.crop": EVAL_CROPS,
}
NOT_EMPTY = ("model.path", "data.train", "train.output_dir", "train.resume")  # (eval.output_dir "": derived)


def _problems(cfg: Config) -> list[str]:
    """Every value outside its allowed range or set of choices, as 'field: what is allowed'."""
    m, r, t, e = cfg.model, cfg.rollout, cfg.train, cfg.eval
    values = {**flatten(cfg.to_dict()), "train.betas[0]": t.betas[0], "train.betas[1]": t.betas[1]}
    problems = [f"{k} must be {text}, got {values[k]}" + ("" if math.isfinite(values[k]) else " (not a finite number)")
                for k, (ok, text) in RANGES.items() if not ok(values[k])]
    problems += [f"{k} must be one of {list(allowed)}, got {values[k]!r}"
                 for k, allowed in CHOICES.items() if values[k] not in allowed]
    problems += [f"{k} must not be empty" for k in NOT_EMPTY if not values[k].strip()]
    for key, template, turns in (("rollout", r.template, r.max_turns), ("eval", e.mode, e.max_turns)):
        if template == "mgpo" and turns != 2:
            problems.append(f"{key}.max_turns must be 2 with the paper's mgpo template, got {turns} (use mgpo_k)")
    if e.crop != "model" and e.mode != "mgpo":
        problems.append(f"eval.crop={e.crop} replaces the crop of the two-turn mgpo mode; eval.mode is {e.mode}")
    high = cfg.loss.clip_eps_high
    if high is not None and not (math.isfinite(high) and high > 0):
        problems.append(f"loss.clip_eps_high must be > 0 (or empty: loss.clip_eps), got {high}")
    if m.max_pixels < m.min_pixels:
        problems.append(f"model.max_pixels ({m.max_pixels}) must be >= model.min_pixels ({m.min_pixels})")
    if t.lora_rank > 0 and not t.lora_alpha > 0:
        problems.append(f"train.lora_alpha must be > 0 with LoRA (train.lora_rank={t.lora_rank}), got {t.lora_alpha}")
    if t.lora_rank > 0 and not t.lora_target_modules:
        problems.append("train.lora_target_modules must name at least one module with LoRA")
    problems += [f"train.sft_templates entries must be among {sorted(TEMPLATES)}, got {v!r}"
                 for v in t.sft_templates if v not in TEMPLATES]
    problems += [f"train.sft_max_turns entries must be at least 2, got {v!r}" for v in t.sft_max_turns if v < 2]
    return problems


def validate(cfg: Config) -> Config:
    """Refuse values that would crash later or train on nonsense, naming each field and its range."""
    problems = _problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(cfg.to_yaml())


def field_docs() -> dict[str, str]:
    """Every config field's dotted name and its documentation (the docstring under it)."""
    return schema.field_docs(Config)
