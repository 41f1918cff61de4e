"""Run set-up: everything the training loop works with, built once before it starts.

Batch arithmetic checked against the number of processes, the process group, the policy
(frozen parts, LoRA adapters, resumed weights), the frozen reference for the KL term, the
optimizer and its schedule, the resumed training state, the data and the logger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, ConfigError, TrainConfig
from ..data.samples import BadImageError, drop_long_prompts, load_samples
from ..runtime import cost
from ..runtime import distributed as D
from ..runtime.checkpoint import load_pending, load_training_state
from ..runtime.logger import RunLogger, external_trackers, setup_logging, start_trackers
from ..runtime.memory import precision_problem
from ..runtime.model import CheckpointError, load_model, load_processor
from ..runtime.run_folder import start_run
from .generation import suppressed_ids
from .policy import PolicyForward
from .sft import check_training_data, record_tokens

log = logging.getLogger("mgpo")


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic, per rank, checked once at start-up."""

    prompts_per_rank: int  # prompts each rank rolls out per rollout batch
    steps_per_rollout: int  # optimizer steps fed by one rollout batch (per PPO epoch)
    trajectories_per_step: int  # per rank
    grad_accum: int  # micro-batches per optimizer step


def plan_batches(tcfg: TrainConfig, group_size: int, world: int) -> BatchPlan:
    """Check that prompts, groups, ranks and micro-batches divide evenly; say what to change if not."""
    rollout, step, micro = tcfg.prompts_per_rollout, tcfg.prompts_per_step, tcfg.micro_batch_size
    problems = []
    if rollout % step:
        problems.append(f"train.prompts_per_rollout ({rollout}) must be a multiple of train.prompts_per_step ({step})")
    if step % world:
        problems.append(f"train.prompts_per_step ({step}) must be a multiple of the number of processes ({world}), "
                        "so that every prompt's whole group stays on one rank")
    per_step = (step // world) * group_size if step % world == 0 else 0
    if per_step and per_step % micro:
        problems.append(f"each rank gets {step // world} prompts x group_size {group_size} = {per_step} trajectories "
                        f"per step, not a multiple of train.micro_batch_size ({micro})")
    if problems:
        raise ValueError("batch sizes do not fit together:\n  - " + "\n  - ".join(problems))
    return BatchPlan(rollout // world, rollout // step, per_step, per_step // micro)


def check_precision(cfg: Config, deepspeed: bool, device) -> None:
    """Refuse full fine-tuning in half precision outside DeepSpeed (``precision_problem``)."""
    if problem := precision_problem(cfg, deepspeed, device):
        raise ConfigError(problem)


def check_sampling(cfg: Config) -> None:
    """Training log-probs model the full temperature-scaled distribution: a truncated one
    (top_p < 1, top_k > 0) would make every ratio and KL term wrong."""
    r = cfg.rollout
    if r.top_p < 1.0 or r.top_k > 0:
        raise ValueError(f"rollout.top_p={r.top_p} / rollout.top_k={r.top_k}: training needs top_p=1 and top_k=0, "
                         "because the training log-probs do not model a truncated distribution "
                         "(evaluation may use them)")


def off_policy(plan: BatchPlan, tcfg: TrainConfig) -> bool:
    """Whether a rollout batch feeds more than one optimizer step (several steps per batch, or
    several PPO epochs): the later ones train a policy that is no longer the one that sampled,
    against the sampling policy's log-probs. Otherwise every importance ratio is exactly 1."""
    return plan.steps_per_rollout > 1 or tcfg.ppo_epochs > 1


def inert_ratio_settings(cfg: Config, plan: BatchPlan) -> str | None:
    """A warning when the loss's ratio settings cannot act: with one optimizer step per rollout
    batch and one pass over it, the policy that is trained is the one that sampled, every
    importance ratio is exactly 1, and GSPO's, GMPO's and clip-higher's objectives give the
    gradient of PPO's own. None when they can act or are not set."""
    loss = cfg.loss
    if cfg.train.algorithm != "rl" or (loss.ratio == "token" and loss.clip_eps_high is None):
        return None
    if off_policy(plan, cfg.train):
        return None
    named = [f"loss.ratio={loss.ratio}"] * (loss.ratio != "token") + \
        [f"loss.clip_eps_high={loss.clip_eps_high}"] * (loss.clip_eps_high is not None)
    return (f"{' and '.join(named)} change{'s' if len(named) == 1 else ''} nothing here: each rollout "
            f"batch feeds one optimizer step (train.prompts_per_rollout = train.prompts_per_step = "
            f"{cfg.train.prompts_per_step}, train.ppo_epochs = 1), so every ratio is 1 and the loss's gradient is "
            "PPO's; raise train.prompts_per_rollout or train.ppo_epochs for off-policy steps")


@dataclass
class Run:
    """What the loop works with, built once by ``setup_run``."""

    cfg: Config
    plan: BatchPlan
    accelerator: object
    wrapped: torch.nn.Module  # PolicyForward around the policy, prepared (DDP / DeepSpeed)
    optimizer: object
    scheduler: object  # stepped once per optimizer step, by us (not by accelerate)
    trainable: list
    reference: torch.nn.Module | None  # the reference model; None: no KL, or LoRA (adapters off = it)
    processor: object
    data: object
    reserve: object  # a sample whose image decodes: stands in for unreadable ones
    logger: RunLogger
    out: Path
    total: int
    folder: object = None  # the run folder's lock, held until the run object goes
    state: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "batch": 0})
    bad_steps: int = 0
    resumed_work: tuple | None = None  # (state, step slices) of a rollout batch the checkpoint stopped inside


def setup_run(cfg: Config) -> Run:
    """Process group, policy, reference model, optimizer, schedule, resume state, data, logger."""
    tcfg = cfg.train
    world = D.launched_world_size()
    plan = plan_batches(tcfg, 1 if tcfg.algorithm == "sft" else cfg.rollout.group_size, world)
    trackers = external_trackers(tcfg.report_to)  # refused here, before any model loads, when missing
    accelerator = D.make_accelerator(plan.grad_accum, tcfg.micro_batch_size, tcfg.grad_clip, log_with=trackers,
                                     timeout_s=tcfg.collective_timeout_s)
    setup_logging()
    out = Path(tcfg.output_dir)
    check_precision(cfg, D.is_deepspeed(accelerator), accelerator.device)
    # shared folder; lock; verify the checkpoint; refuse changed settings; save the config
    folder = start_run(cfg, deepspeed=D.is_deepspeed(accelerator))
    resume_from = folder.resume_from
    torch.manual_seed(tcfg.seed + D.rank())  # each rank samples its own rollouts

    # ---- data: the same usable records on every rank, before any model loads
    processor = load_processor(cfg.model)
    data = load_training_data(cfg, processor)
    if len(data) < tcfg.prompts_per_rollout:
        raise ValueError(f"{cfg.data.train} has {len(data)} usable records, fewer than "
                         f"train.prompts_per_rollout ({tcfg.prompts_per_rollout})")
    D.check_same("usable training records", data.fingerprint_rows(),
                 f"every node must read the same copy of {cfg.data.train} and its images (the ranks draw their "
                 "batches from one shuffled order)")

    # ---- model, reference model, optimizer
    suppress = suppressed_ids(processor)
    policy = load_policy(cfg, resume_from, accelerator.device)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    # Not passed to accelerate.prepare: its AcceleratedScheduler steps once per process per
    # optimizer step, which ends an 80-step warm-up after 10 steps on 8 GPUs.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / tcfg.warmup_steps) if tcfg.warmup_steps else 1.0)
    # RL models what generation sampled from; SFT's loss is the plain cross-entropy (T = 1, whole vocabulary)
    temperature, masked = (1.0, ()) if tcfg.algorithm == "sft" else (cfg.rollout.temperature, suppress)
    wrapped, optimizer = accelerator.prepare(PolicyForward(policy, temperature, masked), optimizer)
    reference = None
    # with LoRA the base model (adapters off) is the reference model; SFT has none
    if cfg.loss.kl_coef > 0 and tcfg.lora_rank == 0 and tcfg.algorithm == "rl":
        reference = PolicyForward(D.prepare_reference(accelerator, load_model(cfg.model, accelerator.device)),
                                  cfg.rollout.temperature, suppress)
    state, resumed_work = _resume(accelerator, wrapped, optimizer, scheduler, resume_from,
                                  len(data) // tcfg.prompts_per_rollout)

    total = tcfg.epochs * (len(data) // tcfg.prompts_per_rollout) * plan.steps_per_rollout * tcfg.ppo_epochs
    total = min(total, tcfg.max_steps) if tcfg.max_steps else total
    _announce(cfg, plan, total, world, len(data))
    start_trackers(accelerator, trackers, "mgpo", out.name, cfg.to_dict())
    logger = RunLogger(out, total, resume_step=state["step"] if resume_from else None,
                       tensorboard=tcfg.report_to in ("tensorboard", "all"), accelerator=accelerator if trackers else None)
    return Run(cfg, plan, accelerator, wrapped, optimizer, scheduler, trainable, reference, processor, data,
               _decodable_reserve(data), logger, out, total, folder=folder, state={**state}, resumed_work=resumed_work)


def _announce(cfg: Config, plan: BatchPlan, total: int, world: int, questions: int) -> None:
    """The start-up lines: the run's shape, ratio settings that cannot act, and on GPUs its time."""
    tcfg = cfg.train
    log.info("training (%s) %d steps: %d prompts x %d samples per rollout over %d rank(s), %d micro-batch%s of %d "
             "per step%s", tcfg.algorithm, total, tcfg.prompts_per_rollout, 1 if tcfg.algorithm == "sft" else
             cfg.rollout.group_size, world, plan.grad_accum, "" if plan.grad_accum == 1 else "es", tcfg.micro_batch_size,
             f", packed to at most {tcfg.micro_batch_tokens} tokens" if tcfg.micro_batch_tokens else "")
    if warning := inert_ratio_settings(cfg, plan):
        log.warning(warning)
    if D.is_main() and (line := cost.startup_line(cfg, world, questions)):  # on GPUs: how long? (mgpo.runtime.cost)
        log.info(line)


def _resume(accelerator, wrapped, optimizer, scheduler, resume_from: Path | None, per_epoch: int):
    """The training state to start from, and the rest of a rollout batch the checkpoint stopped
    inside. The state's counters are checked against what a run can write (``per_epoch``: rollout
    batches in an epoch): the manifest proves only that the files are the ones it lists."""
    if resume_from is None:
        return {"step": 0, "epoch": 0, "batch": 0}, None
    state = load_training_state(accelerator, wrapped, optimizer, scheduler, resume_from)
    check_resumed_state(state, per_epoch, resume_from / "trainer_state.json")
    resumed_work = load_pending(resume_from)
    log.info("resumed from %s at step %d%s", resume_from, state["step"],
             " (inside a rollout batch: its remaining steps first)" if resumed_work else "")
    return state, resumed_work


def check_resumed_state(state: dict, per_epoch: int, where: Path) -> None:
    """Refuse counters no run writes (``per_epoch``: rollout batches in an epoch here): a manifest
    proves only that a checkpoint's files are the ones it lists, and anyone handing one over can
    recompute it.

    >>> check_resumed_state({"step": 4, "epoch": 0, "batch": 2}, 8, Path("trainer_state.json"))
    """
    bad = [f"{k}={v!r}" for k, v in state.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if not bad and state["batch"] > per_epoch:
        bad.append(f"batch={state['batch']} (an epoch here has {per_epoch} rollout batches)")
    if bad:
        raise CheckpointError(f"{where} holds values no run writes ({', '.join(bad)}): hand-edited or damaged; "
                              "resume from another checkpoint")


def load_training_data(cfg: Config, processor):
    """The training set, every record over ``data.max_prompt_tokens`` skipped and counted: a
    question record by its turn-1 prompt, a chat record (SFT) by its whole conversation."""
    data = load_samples(cfg.data.train, cfg.data.train_format, image_root=cfg.data.image_root or None,
                        max_samples=cfg.data.max_samples)
    check_training_data(cfg, data)
    return drop_long_prompts(data, lambda s: record_tokens(cfg, processor, s), cfg.data.max_prompt_tokens)


def _set_trainable(model, tcfg: TrainConfig):
    """Freeze the vision tower and/or add LoRA adapters; return the model to optimize."""
    if tcfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if tcfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        # A regex so only the language model gets adapters (the vision blocks reuse names).
        targets = r".*language_model.*\.(" + "|".join(tcfg.lora_target_modules) + r")"
        model = get_peft_model(model, LoraConfig(r=tcfg.lora_rank, lora_alpha=tcfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets))
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tcfg.lora_rank > 0:
            model.enable_input_require_grads()
    return model


def load_policy(cfg: Config, resume_from: Path | None, device):
    """The policy to train: the configured model (or a checkpoint's weights), with frozen parts
    and LoRA adapters set; a LoRA checkpoint's adapters are loaded onto the base model."""
    tcfg = cfg.train
    if tcfg.lora_rank > 0:
        model = _set_trainable(load_model(cfg.model, device), tcfg)
        if resume_from is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(resume_from / "adapter" / "adapter_model.safetensors")))
        return model
    path = resume_from / "model" if resume_from is not None else None
    return _set_trainable(load_model(cfg.model, device, path=path), tcfg)


def _decodable_reserve(data):
    """The first sample whose images decode (it replaces a record with an unreadable image in a
    batch; a chat record's every image is checked)."""
    for sample in data:
        try:
            sample.load_images()
            return sample
        except BadImageError as e:
            log.warning("not usable as the reserve sample: %s", e)
    raise BadImageError(f"no image of the training set decodes ({len(data)} records)")
