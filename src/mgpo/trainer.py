"""The MGPO training loop.

    python train.py --config configs/tiny_cpu.yaml
    accelerate launch --config_file configs/accelerate/zero3_8gpu.yaml train.py --config configs/qwen2_5_vl_7b_mgpo.yaml

One loop, stages marked: sample prompts -> rollout -> rewards -> group advantages ->
old / reference log-probs -> mini-batch updates -> log -> checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as D
from .checkpoint import load_training_state, save_checkpoint
from .config import Config, TrainConfig
from .data import BadImageError, load_samples
from .generation import VISION_TOKENS, special_ids
from .logger import RunLogger, rollout_metrics, setup_logging
from .loss import PolicyForward, policy_loss
from .model import load_model, load_processor
from .reward import group_advantages, score
from .rollout import Rollout, rollout
from .run_folder import start_run

log = logging.getLogger("mgpo")


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic, per rank, checked once at start-up."""

    prompts_per_rank: int  # prompts each rank rolls out per rollout batch
    steps_per_rollout: int  # optimizer steps fed by one rollout batch (per PPO epoch)
    trajectories_per_step: int  # per rank
    grad_accum: int  # micro-batches per optimizer step


def plan_batches(t: TrainConfig, group_size: int, world: int) -> BatchPlan:
    """Check that prompts, groups, ranks and micro-batches divide evenly; say what to change if not."""
    P, S, M = t.prompts_per_rollout, t.prompts_per_step, t.micro_batch_size
    problems = []
    if P % S:
        problems.append(f"train.prompts_per_rollout ({P}) must be a multiple of train.prompts_per_step ({S})")
    if S % world:
        problems.append(f"train.prompts_per_step ({S}) must be a multiple of the number of processes ({world}), "
                        "so that every prompt's whole group stays on one rank")
    per_step = (S // world) * group_size if S % world == 0 else 0
    if per_step and per_step % M:
        problems.append(f"each rank gets {S // world} prompts x group_size {group_size} = {per_step} trajectories "
                        f"per step, not a multiple of train.micro_batch_size ({M})")
    if problems:
        raise ValueError("batch sizes do not fit together:\n  - " + "\n  - ".join(problems))
    return BatchPlan(P // world, P // S, per_step, per_step // M)


def _set_trainable(model, t: TrainConfig):
    """Freeze the vision tower and/or add LoRA adapters; return the model to optimize."""
    if t.freeze_vision:
        model.model.visual.requires_grad_(False)
    if t.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        # A regex so only the language model gets adapters (the vision blocks reuse names).
        targets = r".*language_model.*\.(" + "|".join(t.lora_target_modules) + r")"
        model = get_peft_model(model, LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets))
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if t.lora_rank > 0:
            model.enable_input_require_grads()
    return model


def _load_policy(cfg: Config, resume_from: Path | None, device):
    t = cfg.train
    if t.lora_rank > 0:
        model = _set_trainable(load_model(cfg.model, device), t)
        if resume_from is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(resume_from / "adapter" / "adapter_model.safetensors")))
        return model
    path = resume_from / "model" if resume_from is not None else None
    return _set_trainable(load_model(cfg.model, device, path=path), t)


def _micro_batches(index: list[int], size: int) -> list[list[int]]:
    return [index[i: i + size] for i in range(0, len(index), size)]


def _load_images(prompts, reserve):
    """Decode each prompt's image; an unreadable one is replaced by ``reserve`` (counted), so
    every rank keeps the same number of groups and the same number of micro-batches."""
    images, kept, bad = [], [], []
    for sample in prompts:
        try:
            images.append(sample.load_image())
            kept.append(sample)
        except BadImageError as e:
            log.warning("skipping sample: %s", e)
            bad.append((sample.id, str(e)))
            kept.append(reserve)
            images.append(reserve.load_image())
    return kept, images, bad


@dataclass
class TrainResult:
    output_dir: Path
    policy: torch.nn.Module  # the trained model (a peft model when training LoRA)
    steps: int


def train(cfg: Config) -> TrainResult:
    t, G = cfg.train, cfg.rollout.group_size
    world = D.launched_world_size()
    plan = plan_batches(t, G, world)
    accelerator = D.make_accelerator(plan.grad_accum, t.micro_batch_size, t.grad_clip)
    setup_logging()
    out = Path(t.output_dir)
    run = start_run(cfg)  # lock the folder; verify the checkpoint; refuse changed settings; save the config
    resume_from = run.resume_from
    torch.manual_seed(t.seed + D.rank())  # each rank samples its own rollouts

    # ---- model, reference, optimizer
    processor = load_processor(cfg.model)
    ids = special_ids(processor)
    policy = _load_policy(cfg, resume_from, accelerator.device)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    wrapped = PolicyForward(policy, cfg.rollout.temperature, [ids[v] for v in VISION_TOKENS])
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / t.warmup_steps) if t.warmup_steps else 1.0)
    wrapped, optimizer, scheduler = accelerator.prepare(wrapped, optimizer, scheduler)
    reference = None
    if cfg.loss.kl_coef > 0 and t.lora_rank == 0:  # with LoRA the base model (adapters off) is the reference
        # Same log-prob forward as the policy (temperature, suppressed vision tokens).
        reference = PolicyForward(D.prepare_reference(accelerator, load_model(cfg.model, accelerator.device)),
                                  cfg.rollout.temperature, [ids[v] for v in VISION_TOKENS])
    state = {"step": 0, "epoch": 0, "batch": 0}
    if resume_from is not None:
        state = load_training_state(accelerator, wrapped, optimizer, scheduler, resume_from)
        log.info("resumed from %s at step %d", resume_from, state["step"])

    # ---- data
    data = load_samples(cfg.data.train, cfg.data.train_format, max_samples=cfg.data.max_samples)
    if len(data) < t.prompts_per_rollout:
        raise ValueError(f"{cfg.data.train} has {len(data)} usable records, fewer than "
                         f"train.prompts_per_rollout ({t.prompts_per_rollout})")
    batches_per_epoch = len(data) // t.prompts_per_rollout
    total = t.epochs * batches_per_epoch * plan.steps_per_rollout * t.ppo_epochs
    total = min(total, t.max_steps) if t.max_steps else total
    reserve = next(iter(data))
    logger = RunLogger(out, total)
    log.info("training %d steps: %d prompts x %d samples per rollout over %d rank(s), %d micro-batches of %d "
             "per step", total, t.prompts_per_rollout, G, world, plan.grad_accum, t.micro_batch_size)
    step, bad_steps = state["step"], 0
    synced = D.zero_stage(accelerator) == 3

    while step < total:
        # ---- sample prompts: this rank's slice of the epoch's shuffled order
        if state["batch"] >= batches_per_epoch:
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(t.seed + state["epoch"]))
        first = state["batch"] * t.prompts_per_rollout + D.rank() * plan.prompts_per_rank
        prompts, images, bad = _load_images([data[int(i)] for i in order[first: first + plan.prompts_per_rank]],
                                            reserve)
        t0 = time.perf_counter()

        # ---- rollout: no grad, eval mode, weights gathered once under ZeRO-3
        with D.generation_weights(accelerator, wrapped) as gen:
            batch = rollout(gen.policy, processor, prompts, cfg.rollout, min_pixels=cfg.model.min_pixels,
                            max_pixels=cfg.model.max_pixels, images=images, synced_gpus=synced)
        policy.train()
        t_rollout = time.perf_counter() - t0

        # ---- rewards and group-relative advantages
        rewards = score(batch.trajectories, cfg.rollout.format_reward)
        adv = group_advantages(rewards, G, cfg.loss.adv_eps)

        # ---- old and reference log-probs (no grad)
        t0 = time.perf_counter()
        everything = list(range(len(batch)))
        need_old = plan.steps_per_rollout > 1 or t.ppo_epochs > 1
        old_logp = _logprobs(wrapped, batch, everything, t.micro_batch_size) if need_old else None
        ref_logp = None
        if cfg.loss.kl_coef > 0:
            if reference is not None:
                ref_logp = _logprobs(reference, batch, everything, t.micro_batch_size)
            else:
                with accelerator.unwrap_model(wrapped).policy.disable_adapter():
                    ref_logp = _logprobs(wrapped, batch, everything, t.micro_batch_size)
        t_logp = time.perf_counter() - t0

        # ---- policy updates: steps_per_rollout optimizer steps, grad accumulation inside
        t0 = time.perf_counter()
        step_stats = []
        groups = len(batch) // G
        for _ in range(t.ppo_epochs):
            for chunk in range(plan.steps_per_rollout):
                lo, hi = chunk * groups // plan.steps_per_rollout, (chunk + 1) * groups // plan.steps_per_rollout
                index = list(range(lo * G, hi * G))  # whole groups
                step_tokens = batch.loss_mask[index].sum().clamp_min(1)
                stats, nonfinite = [], False
                for micro in _micro_batches(index, t.micro_batch_size):
                    mb = batch.select(micro)
                    with accelerator.accumulate(wrapped):
                        logp, entropy = wrapped(with_entropy=cfg.loss.entropy_coef > 0, **_inputs(mb, accelerator))
                        mask = mb.loss_mask.to(logp.device)
                        old = old_logp[micro, : mask.shape[1]].to(logp.device) if need_old else logp.detach()
                        ref = ref_logp[micro, : mask.shape[1]].to(logp.device) if ref_logp is not None else None
                        # Token mean over the whole step: accelerate divides each micro-batch
                        # loss by grad_accum, so normalize by step_tokens / grad_accum here.
                        loss, st = policy_loss(logp, old, adv[micro].to(logp.device), mask, cfg.loss,
                                               ref_logp_NT=ref, entropy_NT=entropy,
                                               denom=step_tokens.to(logp.device) / plan.grad_accum)
                        if not _all_finite(loss, accelerator):
                            # Keep every rank's collectives aligned: back-propagate an exact zero.
                            nonfinite = True
                            loss = sum(p.sum() for p in trainable) * 0.0
                        accelerator.backward(loss)
                        grad_norm = None
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(trainable, t.grad_clip)
                        if not (nonfinite and accelerator.sync_gradients and not D.is_deepspeed(accelerator)):
                            optimizer.step()
                            scheduler.step()
                        optimizer.zero_grad()
                    stats.append(st)
                step += 1
                bad_steps = bad_steps + 1 if nonfinite else 0
                if nonfinite:
                    log.warning("step %d: non-finite loss, update skipped (%d in a row)", step, bad_steps)
                    if bad_steps >= t.max_bad_steps:
                        raise RuntimeError(f"{bad_steps} consecutive non-finite losses; stopping (train.max_bad_steps)")
                step_stats.append({k: sum(s[k] for s in stats) for k in stats[0]} | {
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")})
                if step >= total:
                    break
            if step >= total:
                break
        t_update = time.perf_counter() - t0
        state["batch"] += 1

        # ---- log
        gathered = D.all_gather_objects((batch.trajectories, rewards.tolist(), bad))
        trajs = [tr for g in gathered for tr in g[0]]
        metrics = rollout_metrics(trajs, [r for g in gathered for r in g[1]], G)
        last = step_stats[-1] if step_stats else {}
        gen_tokens = sum(tr.turn1_tokens + tr.turn2_tokens for tr in trajs)
        metrics.update({f"train/{k}": v for k, v in last.items()})
        metrics.update({
            "train/lr": scheduler.get_last_lr()[0],
            "data/skipped_images": float(sum(len(g[2]) for g in gathered)),
            "time/rollout_s": t_rollout, "time/logprobs_s": t_logp, "time/update_s": t_update,
            "time/step_s": (t_rollout + t_logp + t_update) / max(1, len(step_stats)),
            "throughput/generated_tokens_per_s": gen_tokens / max(t_rollout, 1e-9),
        })
        if step % t.log_every == 0 or step >= total:
            logger.scalars(metrics, step)
            logger.examples(batch.trajectories, {p.id: im for p, im in zip(prompts, images)}, step)

        # ---- checkpoint (at rollout-batch boundaries, so a resume never loses rollout data)
        if step % t.save_every < len(step_stats) or step >= total:
            trainer_state = {**state, "step": step, "metrics": metrics}
            path = save_checkpoint(accelerator, wrapped, optimizer, scheduler, processor, out, step, trainer_state,
                                   t.keep_last, lora=t.lora_rank > 0)
            log.info("step %d: checkpoint %s", step, path)
    logger.close()
    D.barrier()
    return TrainResult(out, accelerator.unwrap_model(wrapped).policy, step)


def _inputs(mb: Rollout, accelerator) -> dict:
    return {"loss_mask": mb.loss_mask.to(accelerator.device), **mb.model_inputs(accelerator.device)}


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """True when the loss is finite on every rank (one all-reduce)."""
    bad = torch.tensor([0.0 if math.isfinite(loss.item()) else 1.0], device=accelerator.device)
    return accelerator.reduce(bad, reduction="sum").item() == 0 if D.world_size() > 1 else bad.item() == 0


@torch.no_grad()
def _logprobs(model: PolicyForward, batch: Rollout, index: list[int], micro: int) -> torch.Tensor:
    """Log-probs of a whole rollout, in micro-batches, on CPU, padded to the rollout's width."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    for part in _micro_batches(index, micro):
        mb = batch.select(part)
        device = _device(model)
        logp, _ = model(loss_mask=mb.loss_mask.to(device), **mb.model_inputs(device))
        out[part, : logp.shape[1]] = logp.float().cpu()
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device
