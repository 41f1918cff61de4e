"""One training run per folder: a lock, the saved config, and what a resume may change.

``start_run`` is the trainer's first step, before any model is loaded:

1. lock ``<output_dir>/.lock`` (``fcntl.flock``, held until the process ends): a second run
   started in the same folder refuses instead of interleaving checkpoints with the first;
2. pick the checkpoint to resume and verify it (``checkpoint.resolve_resume``); a new run
   (``resume=none``) in a folder that holds an earlier run's checkpoints is refused, unless
   ``train.overwrite=true`` discards them (otherwise the two runs' checkpoints and metrics
   would mix, and pruning could delete the new run's checkpoints before the old ones);
   ``train.overwrite=true`` with ``resume=auto`` over checkpoints is refused (continue or
   discard: the config must say which);
3. compare this run's config with the one saved beside the checkpoint: a resume whose
   training-relevant settings differ is refused, naming each field, unless
   ``train.allow_config_change=true``; then the new config is written as
   ``config.resume-<step>.yaml`` and ``config.yaml`` is never overwritten.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from ..config import Config, flatten, save_config
from ..schema import load_yaml
from . import distributed as D
from .checkpoint import (
    RUN_FILE,
    check_resume_ranks,
    check_resume_settings,
    check_same_run,
    checkpoint_step,
    read_manifest,
    resolve_resume,
    run_id,
    step_folders,
)
from .logger import METRICS

log = logging.getLogger("mgpo")

LOCK = ".lock"
SAVED = "config.yaml"

# Fields that may change on resume without changing what is trained: how long, how often
# to save or log, memory/speed knobs, and evaluation. Everything else is training-relevant.
FREE_ON_RESUME = frozenset({
    "train.output_dir", "train.resume", "train.overwrite", "train.max_steps", "train.epochs", "train.save_every",
    "train.keep_last", "train.log_every", "train.max_bad_steps", "train.collective_timeout_s",
    "train.allow_config_change", "train.micro_batch_size", "train.micro_batch_tokens",
    "train.gradient_checkpointing", "model.attn_implementation", "rollout.shared_prefill", "rollout.continue_turn2",
    "data.eval", "data.eval_format",
})
# Restored from the checkpoint whatever the config says (optimizer and scheduler state, the
# checkpoint's layout): a change could not take effect, so it is refused even when allowed.
FIXED_ON_RESUME = {
    "train.lr": "the learning rate is restored with the scheduler state",
    "train.betas": "AdamW betas are restored with the optimizer state",
    "train.weight_decay": "weight decay is restored with the optimizer state",
    "train.lora_rank": "the checkpoint's weights are laid out for it",
    "train.lora_target_modules": "the checkpoint's adapters sit on these modules",
    "train.freeze_vision": "the optimizer state covers exactly the trainable parameters",
}


class RunFolderError(RuntimeError):
    """A run that must not start in this folder as configured; the message says why."""


def _save(cfg: Config, path: Path) -> None:
    """Save the run's config with ``train.overwrite`` off: it is this invocation's order, and a
    saved config reused to continue the run (``--config <run>/config.yaml``) must not discard it."""
    save_config(replace(cfg, train=replace(cfg.train, overwrite=False)), path)


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Training-relevant fields whose value differs: ``{"train.lr": (saved, current)}``.

    Fields the saved config does not have (added by a newer version) are not compared.

    >>> config_changes({"train": {"lr": 1e-6, "max_steps": 10}}, {"train": {"lr": 0.5, "max_steps": 20}})
    {'train.lr': (1e-06, 0.5)}
    """
    old, new = flatten(saved), flatten(current)
    return {k: (old[k], v) for k, v in new.items()
            if k in old and old[k] != v and k not in FREE_ON_RESUME and not k.startswith("eval.")}


def lock_run_folder(out: Path) -> IO:
    """Take the folder's lock for the life of this process (the open file holds it)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(out / LOCK, "a+")  # noqa: SIM115 (held open on purpose)
    except OSError as e:  # a folder, or a file this user may not write
        raise RunFolderError(f"cannot use {out / LOCK} as the run folder's lock ({e.strerror}): it must be a "
                             "writable file (this trainer creates it); remove it, or choose another "
                             "train.output_dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(f"another training run is using {out} (pid {holder} holds {out / LOCK}); wait for it "
                             "to finish, or choose another train.output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def saved_config(out: Path, ckpt: Path) -> Path | None:
    """The config the resumed checkpoint was trained under: the newest ``config.resume-*.yaml``
    or ``config.yaml`` of this run folder, else of the checkpoint's own run folder."""
    for folder in (out, ckpt.parent):
        resumed = sorted(folder.glob("config.resume-*.yaml"))
        if resumed:
            return resumed[-1]
        if (folder / SAVED).is_file():
            return folder / SAVED
    return None


def _check_config(cfg: Config, out: Path, ckpt: Path) -> None:
    """Refuse a resume with changed settings (name each); with the override, save the new config beside."""
    path = saved_config(out, ckpt)
    if path is None:
        log.warning("no saved config beside %s: cannot check this run's settings against it", ckpt)
        return
    changes = config_changes(load_yaml(path.read_text(), str(path)) or {}, cfg.to_dict())
    if not changes:
        return
    lines = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
    fixed = [f"{k} ({FIXED_ON_RESUME[k]})" for k in changes if k in FIXED_ON_RESUME]
    if fixed:
        raise RunFolderError(f"resuming {ckpt} with settings that differ from {path}:\n  - " + "\n  - ".join(lines)
                             + "\nthese cannot change on resume: " + "; ".join(fixed)
                             + "\nstart a new train.output_dir to use them")
    if not cfg.train.allow_config_change:
        raise RunFolderError(f"resuming {ckpt} with settings that differ from {path}:\n  - " + "\n  - ".join(lines)
                             + "\nset train.allow_config_change=true to resume with the new values anyway, "
                             "or start a new train.output_dir")
    written = out / f"config.resume-{checkpoint_step(ckpt):06d}.yaml"
    _save(cfg, written)
    log.warning("resuming %s with changed settings (allowed by train.allow_config_change): %s; saved as %s",
                ckpt, "; ".join(lines), written)


def _clear_earlier_run(out: Path, overwrite: bool) -> None:
    """A new run's folder: refuse one that holds an earlier run's checkpoints, or (``overwrite``)
    discard that run's checkpoints, metrics and TensorBoard logs."""
    earlier = step_folders(out)  # (with or without COMPLETE)
    if not earlier:
        return
    if not overwrite:
        raise RunFolderError(f"train.resume=none, but {out} holds an earlier run's checkpoints ({earlier[0].name} .. "
                             f"{earlier[-1].name}); set train.overwrite=true to discard that run, "
                             "train.resume=auto to continue it, or choose another train.output_dir")
    log.warning("train.overwrite: discarding the earlier run in %s (%d checkpoints, its metrics and TensorBoard logs)",
                out, len(earlier))
    for folder in [*earlier, *out.glob("checkpoint-*.tmp")]:
        shutil.rmtree(folder)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    for stale in [out / METRICS, *out.glob("config.resume-*.yaml")]:
        stale.unlink(missing_ok=True)


def _check_overwrite(cfg: Config, out: Path) -> None:
    t = cfg.train
    if t.overwrite and t.resume == "auto" and (earlier := step_folders(out)):
        raise RunFolderError(f"train.overwrite=true with train.resume=auto, and {out} holds checkpoints "
                             f"({earlier[0].name} .. {earlier[-1].name}): which one wins is not guessed; set "
                             "train.resume=none "
                             "to discard the earlier run and start over, or drop train.overwrite to continue it")


def _prepare(cfg: Config, out: Path, ckpt: Path | None, deepspeed: bool) -> None:
    """Main rank only: a new run's folder cleared (or refused) and its config saved; a resume's
    checkpoint checked against this launch and its config against the saved one."""
    t = cfg.train
    if ckpt is None:  # a new run: a new identity, recorded in each of its checkpoints
        _clear_earlier_run(out, t.overwrite)
        _save(cfg, out / SAVED)
        (out / RUN_FILE).write_text(json.dumps({"id": uuid.uuid4().hex}) + "\n")
        return
    if t.resume == "auto":
        check_same_run(ckpt, out)
    elif run_id(out) is None:  # an explicit checkpoint continued in a new folder: that run goes on here
        theirs = (read_manifest(ckpt).get("settings") or {}).get("run_id")
        if theirs:
            (out / RUN_FILE).write_text(json.dumps({"id": theirs}) + "\n")
    check_resume_settings(ckpt, t.lora_rank, t.freeze_vision)
    check_resume_ranks(ckpt, D.world_size(), deepspeed)
    _check_config(cfg, out, ckpt)
    if not (out / SAVED).exists():  # resuming another folder's checkpoint into a new one
        _save(cfg, out / SAVED)


@dataclass
class RunStart:
    resume_from: Path | None  # the verified checkpoint to resume, or None for a new run
    lock: IO | None  # the open lock file (rank 0); keep a reference for the run's life

    def release(self) -> None:
        """At the end of a run: remove the lock file (still holding the lock, so no run that waits
        can take a file about to vanish) and let it go. A killed run leaves its file behind; the
        lock itself goes with the process, so the file blocks nothing."""
        if self.lock is not None:
            Path(self.lock.name).unlink(missing_ok=True)
            self.lock.close()
            self.lock = None


def start_run(cfg: Config, deepspeed: bool = False) -> RunStart:
    """Check that every rank sees the run folder, lock it, choose and verify the checkpoint
    (every rank hashing its own files), check it and the config, save the config. Every rank
    calls this; rank 0 does the folder's work and every rank gets its answer (or its refusal).
    ``deepspeed``: this launch runs DeepSpeed (its sharded state resumes on as many ranks)."""
    out = Path(cfg.train.output_dir)
    D.check_shared_folder(out, "train.output_dir")
    lock = D.on_main(lambda: lock_run_folder(out))
    try:
        D.on_main(lambda: _check_overwrite(cfg, out))
        ckpt = resolve_resume(cfg.train.resume, out)
        D.on_main(lambda: _prepare(cfg, out, ckpt, deepspeed))
    except BaseException:
        if lock is not None:  # refused: the folder is free again (a process that goes on may start another run)
            lock.close()
        raise
    return RunStart(ckpt, lock)
