"""The MGPO training loop.

    python train.py --config configs/tiny_cpu.yaml
    accelerate launch --config_file configs/accelerate/zero3_8gpu.yaml train.py --config configs/qwen2_5_vl_7b_mgpo.yaml

One loop, stages marked: sample prompts -> rollout -> rewards -> group advantages ->
old / reference log-probs -> optimizer steps over whole groups -> log -> checkpoint.
The loop's callees follow it in the order it calls them; the run's set-up (model, data,
optimizer, resume) is in ``setup.py``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, LossConfig
from ..data.samples import BadImageError
from ..runtime import distributed as D
from ..runtime.checkpoint import latest_checkpoint, save_checkpoint
from .loss import loss_denominator, loss_weights, policy_loss, sft_loss
from .metrics import rollout_metrics
from .policy import rollout_logprobs
from .prompts import get_template
from .reward import group_advantages, score, uniform_groups
from .rollout import rollout
from .setup import Run, check_sampling, off_policy, setup_run
from .sft import sft_batch
from .trajectory import Rollout

log = logging.getLogger("mgpo")


@dataclass
class TrainResult:
    output_dir: Path
    policy: torch.nn.Module  # the trained model (a peft model when training LoRA)
    steps: int
    model_dir: Path | None = None  # the newest checkpoint's model/ (adapter/ for LoRA): what from_pretrained loads


@dataclass
class Experience:
    """One rollout batch, ready for updates: the trajectories and what the objective needs of
    each (``None`` where the algorithm has no such term: SFT has no advantages, rewards, old or
    reference log-probs)."""

    batch: Rollout
    group_size: int  # trajectories per prompt (1 for SFT)
    advantages_N: torch.Tensor | None  # group-relative advantage of each trajectory
    rewards_N: torch.Tensor | None  # the reward each trajectory earned
    old_logp_NT: torch.Tensor | None  # the sampling policy's log-probs (None: one step per batch, ratio 1)
    ref_logp_NT: torch.Tensor | None  # the reference model's log-probs (None: no KL term)
    timings: dict  # seconds per phase ("time/..."), and on GPUs each phase's peak memory ("memory/...")
    trained_N: torch.Tensor | None = None  # 1.0 for trajectories the update trains on, 0.0 left out (None: all)

    def select(self, keep: list[int]) -> Experience:
        """The experience of trajectories ``keep`` only (whole groups)."""
        def rows(x):
            return None if x is None else x[keep]
        return Experience(self.batch.select(keep), self.group_size, rows(self.advantages_N), rows(self.rewards_N),
                          rows(self.old_logp_NT), rows(self.ref_logp_NT), dict(self.timings), rows(self.trained_N))

    def state(self) -> dict:
        """Tensors and plain values only (a checkpoint reads them back with weights_only=True)."""
        return {**{k: getattr(self, k) for k in ("group_size", "advantages_N", "rewards_N", "old_logp_NT",
                                                  "ref_logp_NT", "timings", "trained_N")},
                "batch": self.batch.state()}

    @classmethod
    def from_state(cls, state: dict) -> Experience:
        return cls(**{**state, "batch": Rollout.from_state(state["batch"])})


@dataclass
class Work:
    """A rollout batch being trained on: its experience and the optimizer steps still to take."""

    exp: Experience
    slices: list[list[int]]  # trajectory indices of each optimizer step still to take, in order
    skipped: list  # (record id, why) of records replaced in this batch, for the log
    images: dict  # record id -> its decoded original, for the logged examples

    def rest(self, done: int) -> Work | None:
        """What is left after the first ``done`` steps (None when the batch is finished): the
        remaining steps' trajectories only, so a checkpoint written here can resume exactly."""
        left = self.slices[done:]
        if not left:
            return None
        keep = sorted({i for step in left for i in step})
        at = {i: k for k, i in enumerate(keep)}
        return Work(self.exp.select(keep), [[at[i] for i in step] for step in left], [], {})


def train(cfg: Config) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data.train`` (MGPO, its one-turn GRPO baseline, or SFT, as the
    config says) until ``train.max_steps`` or the last epoch, resuming the run folder's newest
    checkpoint; returns the trained policy and where its logs and checkpoints are."""
    check_sampling(cfg)
    run = setup_run(cfg)
    tcfg = cfg.train
    # a checkpoint written inside a rollout batch (train.max_steps) holds the rest of that batch
    pending = Work(Experience.from_state(run.resumed_work[0]), run.resumed_work[1], [], {}) \
        if run.resumed_work else None
    while run.state["step"] < run.total:
        # ---- experience: prompts -> rollout, rewards, advantages, old/reference log-probs (RL), or
        #      the target conversations (SFT); or the rest of a batch a stop cut short
        work = pending or next_experience(run)

        # ---- updates: steps_per_rollout optimizer steps per PPO epoch, whole groups each
        t0 = time.perf_counter()
        D.reset_peak_memory()
        steps = []
        for index in work.slices:
            if run.state["step"] >= run.total:
                break
            steps.append(optimizer_step(run, work.exp, index))
        work.exp.timings["time/update_s"] = time.perf_counter() - t0
        work.exp.timings |= D.peak_memory("update")
        pending = work.rest(len(steps))
        run.state["batch"] += pending is None

        # ---- log
        metrics = _log(run, work.exp, work.skipped, steps, work.images)

        # ---- checkpoint (at rollout-batch boundaries, or with the rest of the batch when the run stops inside one)
        step = run.state["step"]
        if (step % tcfg.save_every < len(steps) and pending is None) or step >= run.total:
            path = save_checkpoint(run.accelerator, run.wrapped, run.optimizer, run.scheduler, run.processor,
                                   run.out, step, {**run.state, "metrics": metrics}, tcfg.keep_last,
                                   lora=tcfg.lora_rank > 0,
                                   pending=(pending.exp.state(), pending.slices) if pending else None,
                                   run_config=cfg.to_yaml())
            log.info("step %d: checkpoint %s", step, path)
    run.logger.close()
    D.barrier()
    run.folder.release()
    newest = latest_checkpoint(run.out)
    part = "adapter" if tcfg.lora_rank > 0 else "model"
    return TrainResult(run.out, run.accelerator.unwrap_model(run.wrapped).policy, run.state["step"],
                       newest / part if newest is not None else None)


def next_experience(run: Run) -> Work:
    """The next rollout batch: this rank's prompts, their experience, and the optimizer steps to take."""
    t0 = time.perf_counter()
    prompts, images, bad = _next_prompts(run)
    t_data = time.perf_counter() - t0
    exp = _sft_experience(run, prompts, images) if run.cfg.train.algorithm == "sft" else \
        _rl_experience(run, prompts, images)
    exp.timings["time/data_s"] = t_data  # decoding the prompts' images
    slices = list(_step_slices(len(exp.batch) // exp.group_size, exp.group_size, run.plan.steps_per_rollout,
                               run.cfg.train.ppo_epochs))
    # skipped: unreadable images replaced when loading, or while encoding (a chat record's later image)
    return Work(exp, slices, bad + exp.batch.skipped, dict(zip((p.id for p in prompts), images)))


def _next_prompts(run: Run):
    """This rank's prompts of the next rollout batch, with their decoded images."""
    tcfg = run.cfg.train
    per_epoch = len(run.data) // tcfg.prompts_per_rollout
    if run.state["batch"] >= per_epoch:
        run.state["epoch"], run.state["batch"] = run.state["epoch"] + 1, 0
    order = torch.randperm(len(run.data), generator=torch.Generator().manual_seed(tcfg.seed + run.state["epoch"]))
    first = run.state["batch"] * tcfg.prompts_per_rollout + D.rank() * run.plan.prompts_per_rank
    return _load_images([run.data[int(i)] for i in order[first: first + run.plan.prompts_per_rank]], run.reserve)


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


def _rl_experience(run: Run, prompts, images) -> Experience:
    cfg = run.cfg
    # ---- rollout: no grad, eval mode, weights gathered once under ZeRO-3
    t0 = time.perf_counter()
    D.reset_peak_memory()
    with D.generation_weights(run.accelerator, run.wrapped) as gen:
        batch = rollout(gen.policy, run.processor, prompts, cfg.rollout, min_pixels=cfg.model.min_pixels,
                        max_pixels=cfg.model.max_pixels, images=images,
                        synced_gpus=D.zero_stage(run.accelerator) == 3)
    run.wrapped.train()
    t_rollout, memory = time.perf_counter() - t0, D.peak_memory("rollout")
    # ---- rewards, group-relative advantages, and which trajectories the update trains on
    r = cfg.rollout
    rewards_N = score(batch.trajectories, r.format_reward, r.turn_cost, r.zoom_bonus, r.zoom_bonus_cap)
    batch_std = None
    if cfg.loss.adv_scale == "batch":  # every rank's rewards
        batch_std = float(torch.tensor([x for g in D.all_gather_objects(rewards_N.tolist()) for x in g]).double().std())
    advantages_N = group_advantages(rewards_N, r.group_size, cfg.loss.adv_eps, cfg.loss.adv_scale, batch_std)
    trained_N = trained_trajectories(batch.trajectories, rewards_N, cfg)
    # ---- old and reference log-probs (no grad)
    t0 = time.perf_counter()
    old_logp_NT, ref_logp_NT = _fixed_logprobs(run, batch)
    timings = {"time/rollout_s": t_rollout, "time/logprobs_s": time.perf_counter() - t0, **memory}
    return Experience(batch, r.group_size, advantages_N, rewards_N, old_logp_NT, ref_logp_NT, timings, trained_N)


def trained_trajectories(trajectories, rewards_N: torch.Tensor, cfg: Config) -> torch.Tensor | None:
    """1.0 for each trajectory the update trains on, 0.0 for one it leaves out: a group whose rewards
    are all equal (``rollout.drop_uniform_groups``), a K-turn trajectory that used every turn without
    a readable answer (``rollout.over_turn: mask``). None when nothing is left out by the config."""
    r = cfg.rollout
    if not r.drop_uniform_groups and r.over_turn == "penalize":
        return None
    keep_N = torch.ones(len(trajectories))
    if r.drop_uniform_groups:
        keep_N *= (~uniform_groups(rewards_N, r.group_size)).float().repeat_interleave(r.group_size)
    if r.over_turn == "mask":
        keep_N *= torch.tensor([0.0 if traj.turn_log and traj.turn_log[-1].action == "final" else 1.0
                                for traj in trajectories])
    return keep_N


def _fixed_logprobs(run: Run, batch: Rollout):
    """Old-policy log-probs (when a rollout batch feeds more than one step) and reference ones."""
    tcfg = run.cfg.train
    stale = off_policy(run.plan, tcfg)
    if not stale and run.cfg.loss.kl_coef <= 0:
        return None, None
    packs = pass_micro_batches(tcfg, batch.attention_mask.sum(dim=1).tolist())  # as the update's, by count or tokens
    old = rollout_logprobs(run.wrapped, batch, packs) if stale else None
    ref = None
    if run.cfg.loss.kl_coef > 0:
        if run.reference is not None:
            ref = rollout_logprobs(run.reference, batch, packs)
        else:  # LoRA: the base model, adapters off, is the frozen initial model
            with run.accelerator.unwrap_model(run.wrapped).policy.disable_adapter():
                ref = rollout_logprobs(run.wrapped, batch, packs)
    return old, ref


def _sft_experience(run: Run, prompts, images) -> Experience:
    """SFT's batch: each record's targets teacher-forced in the rollout's own format (``sft.py``)."""
    t0 = time.perf_counter()
    batch = sft_batch(run.cfg, run.processor, prompts, images, run.state["batch"], run.reserve)
    return Experience(batch, 1, None, None, None, None, {"time/rollout_s": time.perf_counter() - t0})


def _step_slices(groups: int, group_size: int, steps_per_rollout: int, ppo_epochs: int):
    """Trajectory indices of each optimizer step: whole groups, every PPO epoch."""
    for _ in range(ppo_epochs):
        for k in range(steps_per_rollout):
            lo, hi = k * groups // steps_per_rollout, (k + 1) * groups // steps_per_rollout
            yield list(range(lo * group_size, hi * group_size))


def optimizer_step(run: Run, exp: Experience, index: list[int]) -> dict[str, float]:
    """One optimizer step over whole groups; returns the step's figures.

    The loss is one mean over the whole step, on all ranks: with the default
    ``loss.normalization: token``, the mean over every masked token of every micro-batch on
    every rank (DAPO's token-level loss, TRL's "dapo"), not GRPO's per-sequence mean nor a
    mean per micro-batch; with ``sequence``, the mean over the step's trajectories of each
    one's token mean. Each micro-batch contributes (its weighted sum) / (the step's sum of
    weights / ranks), so after DDP averages the ranks' gradients the step's gradient is that
    of the global mean, and each logged figure is the sum of the micro-batches' shares,
    averaged over ranks. The KL term's gradient is that of KL(ref || policy) (see ``loss``).
    """
    cfg, acc, wrapped = run.cfg, run.accelerator, run.wrapped
    mask_NT = exp.batch.loss_mask[index]
    if exp.trained_N is not None:  # trajectories left out of the update: no token of theirs counts
        mask_NT = mask_NT * exp.trained_N[index, None]
    weights_NT = loss_weights(mask_NT, cfg.loss.normalization, max_generated(cfg))  # the step's, once
    # (clamped above 0: a step whose every trajectory was left out has loss 0, not 0/0; its gradient
    # is 0, though AdamW still decays the weights and moves them along its momentum)
    denom = (D.all_reduce_sum(loss_denominator(weights_NT, cfg.loss.normalization)) / D.world_size()).clamp_min(1e-30)
    lengths = exp.batch.attention_mask[index].sum(dim=1).tolist()
    packs = pass_micro_batches(cfg.train, lengths)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
    totals, finite, grad_norm = {}, True, float("nan")
    with_entropy = cfg.loss.entropy_coef > 0 and exp.advantages_N is not None
    for k, pack in enumerate(packs):
        part = [index[i] for i in pack]
        mb = exp.batch.select(part)
        last = k == len(packs) - 1
        with D.micro_batch(acc, wrapped, last):
            logp_NT, entropy_NT = wrapped(with_entropy=with_entropy, loss_mask=mb.loss_mask.to(acc.device),
                                          **mb.model_inputs(acc.device))
            loss, stats = objective(cfg.loss, exp, part, logp_NT, entropy_NT, weights_NT[pack],
                                    denom.to(logp_NT.device))
            finite = finite and _all_finite(loss)
            if not finite:
                loss = _skip_loss(logp_NT) if last and D.is_deepspeed(acc) else _zero_loss(logp_NT)
            # accelerate (or DeepSpeed) divides each micro-batch loss by grad_accum; ours already
            # is this micro-batch's share of the step's token mean, so undo that division.
            acc.backward(loss * run.plan.grad_accum)
            if last:  # the gradients are synchronized (D.micro_batch): clip, then step
                grad_norm = float(acc.clip_grad_norm_(run.trainable, cfg.train.grad_clip))
                # a finite loss can still give a non-finite gradient, and one AdamW step on it
                # turns every weight NaN: skipped, as DeepSpeed's own check skips it
                finite = finite and _all_finite(torch.tensor(grad_norm))
                if finite and not D.is_deepspeed(acc):
                    run.optimizer.step()  # (DeepSpeed stepped inside backward)
                run.optimizer.zero_grad()
        totals = {name: totals.get(name, 0.0) + v for name, v in stats.items()}
    run.state["step"] += 1
    if finite:
        run.scheduler.step()
    _count_bad_step(run, finite)
    padded = sum(len(pack) * max(lengths[i] for i in pack) for pack in packs)
    totals["padded_share"] = 1.0 - sum(lengths) / padded  # this rank's micro-batches' padding tokens
    return D.all_reduce_mean(totals) | {"grad_norm": grad_norm, "lr": lr}


def micro_batches(lengths: list[int], size: int, tokens: int = 0) -> list[list[int]]:
    """The positions of one step's trajectories (of these ``lengths``) in each micro-batch:
    ``size`` at a time in order, or with a token budget (``tokens`` > 0), longest first, as
    many to a micro-batch as fit ``tokens`` counted with their padding (rows x the longest
    row), so rows of like length train together; a longer trajectory goes alone.

    >>> micro_batches([5, 3, 9, 2], 2)
    [[0, 1], [2, 3]]
    >>> micro_batches([5, 3, 9, 2], 2, tokens=12)
    [[2], [0, 1], [3]]
    """
    if not tokens:
        return [list(range(lo, min(lo + size, len(lengths)))) for lo in range(0, len(lengths), size)]
    packs: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if packs and (len(packs[-1]) + 1) * lengths[packs[-1][0]] <= tokens:  # its first row is its longest
            packs[-1].append(i)
        else:
            packs.append([i])
    return packs


def pass_micro_batches(tcfg, lengths: list[int]) -> list[list[int]]:
    """The micro-batches of one pass (an update step, or a fixed log-prob pass) over trajectories
    of these ``lengths``: ``micro_batches`` by count or by ``train.micro_batch_tokens``; by tokens,
    split until every rank has as many as the rank with the most, since ZeRO-3 needs the same
    number of forward calls on every rank."""
    packs = micro_batches(lengths, tcfg.micro_batch_size, tcfg.micro_batch_tokens)
    if tcfg.micro_batch_tokens:
        packs = split_to(packs, max(D.all_gather_objects(len(packs))))
    return packs


def split_to(packs: list[list[int]], count: int) -> list[list[int]]:
    """``packs`` split until there are ``count`` (the most any rank has): the largest in half
    each time, so each micro-batch stays within its budget.

    >>> split_to([[2], [0, 1, 3]], 3)
    [[2], [0], [1, 3]]
    """
    packs = [list(p) for p in packs]
    while len(packs) < count:
        k = max(range(len(packs)), key=lambda k: len(packs[k]))
        if len(packs[k]) < 2:
            raise ValueError(f"cannot make {count} micro-batches of {sum(map(len, packs))} trajectories")
        half = len(packs[k]) // 2
        packs[k:k + 1] = [packs[k][:half], packs[k][half:]]
    return packs


def max_generated(cfg: Config) -> int:
    """The most tokens one trajectory can generate: its turns' budgets (``loss.normalization:
    constant`` divides by it)."""
    r = cfg.rollout
    template = get_template(r.template if cfg.train.algorithm == "rl" else (cfg.train.sft_templates or
                                                                            (r.template,))[0])
    turns = r.max_turns if template.zoom_loop else template.turns
    return r.max_new_tokens_turn1 + (turns - 1) * r.max_new_tokens_turn2


def objective(cfg: LossConfig, exp: Experience, part: list[int], logp_NT: torch.Tensor, entropy_NT, weights_NT,
              denom: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (trajectories ``part`` of ``exp``), as its share of the step's
    mean: the PPO-clipped policy loss with its KL and entropy terms, or for SFT the negative
    log-likelihood (``loss.py``). ``weights_NT``: the step's token weights of these rows."""
    width, dev = logp_NT.shape[1], logp_NT.device
    weights_NT = weights_NT[:, :width].to(dev)
    if exp.advantages_N is None:  # SFT
        return sft_loss(logp_NT, weights_NT, denom)
    # one step per rollout batch: the sampling policy is the current one, ratio 1
    old_NT = exp.old_logp_NT[part, :width].to(dev) if exp.old_logp_NT is not None else logp_NT.detach()
    ref_NT = exp.ref_logp_NT[part, :width].to(dev) if exp.ref_logp_NT is not None else None
    return policy_loss(logp_NT, old_NT, exp.advantages_N[part].to(dev), weights_NT, cfg, ref_logp_NT=ref_NT,
                       entropy_NT=entropy_NT, denom=denom)


def _all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (one all-reduce)."""
    return D.all_reduce_sum(0.0 if math.isfinite(loss.item()) else 1.0).item() == 0


def _zero_loss(logp: torch.Tensor) -> torch.Tensor:
    """An exact-zero loss through this micro-batch's own graph: every rank still runs the
    same backward collectives (DDP's reducer, ZeRO-3's reduce-scatter), and no weight moves.
    (When the log-probs themselves are not finite, even a zero loss back-propagates NaN: the
    step is skipped all the same.)"""
    return (torch.nan_to_num(logp, nan=0.0, posinf=0.0, neginf=0.0) * 0.0).sum()


def _skip_loss(logp: torch.Tensor) -> torch.Tensor:
    """The last micro-batch's loss of a non-finite step under DeepSpeed, whose engine steps
    inside ``backward`` and so cannot be skipped from outside: a loss whose gradient is NaN
    wherever it reaches. The engine's own check then finds a non-finite gradient norm
    (all-reduced, so every rank agrees), skips the optimizer step as it does an fp16 overflow,
    and clears the gradients: no weight, AdamW step count or moment moves, as on the plain path."""
    return _zero_loss(logp) * float("nan")


def _count_bad_step(run: Run, finite: bool) -> None:
    run.bad_steps = 0 if finite else run.bad_steps + 1
    if not finite:
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", run.state["step"],
                    run.bad_steps)
        if run.bad_steps >= run.cfg.train.max_bad_steps:
            raise RuntimeError(f"{run.bad_steps} consecutive non-finite losses or gradients; stopping "
                               "(train.max_bad_steps)")


def _log(run: Run, exp: Experience, bad, steps: list[dict], images: dict) -> dict:
    """Gather every rank's trajectories and log one row per optimizer step of this rollout batch:
    the step's own ``train/*`` figures, with the rollout batch's figures (reward, grounding,
    lengths, timings) repeated on each of its steps, so every row reads alone. ``train.log_every``
    counts optimizer steps. Returns the last step's row."""
    rewards = exp.rewards_N if exp.rewards_N is not None else score(exp.batch.trajectories)
    gathered = D.all_gather_objects((exp.batch.trajectories, rewards.tolist(), bad))
    trajs = [tr for g in gathered for tr in g[0]]
    batch = rollout_metrics(trajs, [r for g in gathered for r in g[1]], exp.group_size)
    if exp.rewards_N is None:  # SFT: teacher-forced texts, their "reward" says nothing
        batch = {k: v for k, v in batch.items() if not k.startswith("reward/")}
    gen_tokens = sum(tr.turn1_tokens + tr.turn2_tokens for tr in trajs)
    if exp.trained_N is not None:  # the share of trajectories left out of the update, every rank's
        batch["train/left_out_share"] = D.all_reduce_mean({"x": float(1.0 - exp.trained_N.mean())})["x"]
    batch.update({
        **exp.timings,
        "data/skipped_images": float(sum(len(g[2]) for g in gathered)),
        "time/step_s": sum(v for k, v in exp.timings.items() if k.startswith("time/")) / max(1, len(steps)),
        "throughput/generated_tokens_per_s": gen_tokens / max(exp.timings["time/rollout_s"], 1e-9),
    })
    first, row, logged = run.state["step"] - len(steps) + 1, batch, None
    for step, figures in enumerate(steps, start=first):
        row = batch | {f"train/{k}": v for k, v in figures.items()}
        if step % run.cfg.train.log_every == 0 or step >= run.total:
            run.logger.scalars(row, step)
            logged = step
    if logged is not None:
        run.logger.examples(exp.batch.trajectories, images, logged)
    return row
