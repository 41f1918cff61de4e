"""Checkpoints that resume exactly and load with ``from_pretrained``.

Layout of ``<output_dir>/checkpoint-50/`` (the name Hugging Face's ``get_last_checkpoint``
looks for):

    model/            Hugging Face folder (safetensors + processor): from_pretrained loads it;
                      with mgpo_config.yaml, the run's config (evaluation's protocol comes from it)
    adapter/          instead of model/ when training LoRA (see ``python -m mgpo.tools.merge``)
    optimizer.pt      optimizer and scheduler state (weights_only-safe), or
    deepspeed/        DeepSpeed's own sharded engine state under ZeRO
    rng/rank*.pt      every rank's RNG state
    pending/rank*.pt  only when the run stopped inside a rollout batch (train.max_steps): each
                      rank's rest of that batch (trajectories, advantages, old and reference
                      log-probs), so the resume takes exactly the steps an unbroken run would
    trainer_state.json  step, epoch, data position, and the log history (metrics rows so far)
    COMPLETE          written last: JSON with the SHA-256 of every other file (the manifest)

A checkpoint is written into ``checkpoint-50.tmp``, every file and folder is fsynced, the
manifest is written, and the folder is renamed when whole, so a process killed mid-write
leaves the previous checkpoint untouched and loadable, and only whole checkpoints carry
the name other tools look for. Every rank writes part of it (its RNG state, its ZeRO shards):
each rank hashes the files it wrote (``file_owner``), rank 0 merges their lists into the
manifest, and a checkpoint is COMPLETE only when rank 0 sees every file every rank wrote
(so the run folder must be shared between nodes; ``D.check_shared_folder`` checks that at
start). A resume verifies the same way, each rank the files it wrote. A ``checkpoint-<N>`` folder without COMPLETE was not written
whole by this trainer (damaged, or another tool's): it is never resumed, and ``resume=auto``
refuses to start over on top of one.

Nothing in a checkpoint is deserialized before the manifest is verified, and no pickle is
read without torch's weights-only unpickler. DeepSpeed unpickles its engine files itself,
without that guard, and a manifest proves only that the files are the ones it lists (anyone
handing over a checkpoint can write a matching one); so before DeepSpeed reads anything,
every ``*.pt`` file is first opened with the weights-only unpickler, allowing only the few
DeepSpeed classes its files hold (``DEEPSPEED_GLOBALS``), and a file that needs anything
else is refused by name. A checkpoint that fails verification is refused, naming the file;
``resume=auto`` then falls back to the newest one that passes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .logger import METRICS, metric_rows
from .model import CheckpointError, save_processor

log = logging.getLogger("mgpo")

MARKER = "COMPLETE"
RUN_CONFIG = "mgpo_config.yaml"  # in model/ (adapter/): the run's config, whose protocol evaluation uses
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-<digits>`` folder, complete or not, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=checkpoint_step)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<digits>`` with a COMPLETE marker), oldest first, not yet verified."""
    return [p for p in step_folders(output_dir) if (p / MARKER).exists()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _names(folders: list[Path]) -> str:
    return ", ".join(p.name for p in folders[:6]) + (f" and {len(folders) - 6} more" if len(folders) > 6 else "")


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto`` -> newest checkpoint that verifies (or None), ``none`` -> None, else that path, verified.

    With ``auto``, a damaged newest checkpoint is skipped with a warning naming the file;
    when checkpoints exist but none verifies, or only folders without COMPLETE do, this
    refuses rather than start over silently. In a distributed run every rank calls it: rank
    0's listing is the one used, each rank hashes its own files, every rank gets one answer.
    """
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / MARKER).exists():
            raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no {MARKER} file)")
        verify_checkpoint(path, shared=True)
        return path
    unmarked, complete = D.broadcast_object(
        ([p for p in step_folders(output_dir) if not (p / MARKER).exists()], list_checkpoints(output_dir))
        if D.is_main() else None)
    problems = []
    for ckpt in reversed(complete):
        try:
            verify_checkpoint(ckpt, shared=True)
        except CheckpointError as e:
            log.warning("not resuming from %s: %s; trying the previous checkpoint", ckpt, e)
            problems.append(str(e))
            continue
        if problems:
            log.warning("resuming from %s, the newest checkpoint that verifies", ckpt)
        if unmarked:
            log.warning("ignoring %s in %s: no %s marker (not written whole by this trainer)", _names(unmarked),
                        output_dir, MARKER)
        return ckpt
    if problems:
        raise CheckpointError(f"no checkpoint under {output_dir} verifies:\n  - "
                              + "\n  - ".join(problems) + "\nmove them away, or start a new train.output_dir")
    if unmarked:
        raise CheckpointError(f"{output_dir} holds checkpoint folders without a {MARKER} marker ({_names(unmarked)}): "
                              "not written whole by this trainer, so not resumed, and a new run is not started on "
                              "top of them; move them away, or choose another train.output_dir")
    return None


# ----------------------------------------------------------------------------- manifest

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk (a folder: its entries, so renames stick)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` except the marker, as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() and p.relative_to(folder).as_posix() != MARKER)


_OWNED = re.compile(r"(?:^|/)rank(\d+)\.pt$|zero_pp_rank_(\d+)_")


def file_owner(rel: str) -> int:
    """The rank that writes a checkpoint file: ``rng/rank<r>.pt`` and DeepSpeed's
    ``zero_pp_rank_<r>_*`` shards are rank r's, everything else rank 0's.

    >>> [file_owner(f) for f in ("rng/rank1.pt", "deepspeed/state/zero_pp_rank_3_mp_rank_00_optim_states.pt",
    ...                           "model/model.safetensors")]
    [1, 3, 0]
    """
    found = _OWNED.search(rel)
    return int(next(g for g in found.groups() if g is not None)) if found else 0


def _hash_and_sync(folder: Path, rels: list[str]) -> dict[str, str]:
    """SHA-256 of each file, each flushed to disk."""
    digests = {}
    for rel in rels:
        digests[rel] = sha256_file(folder / rel)
        _fsync(folder / rel)
    return digests


def write_manifest(folder: Path, settings: dict, files: dict[str, str] | None = None) -> None:
    """Fsync every file and folder, then write COMPLETE: the SHA-256 of every file (``files``,
    when the ranks hashed their own; else hashed here), and the training settings the
    checkpoint's layout depends on. Called once, after all ranks wrote."""
    files = _hash_and_sync(folder, _files(folder)) if files is None else dict(sorted(files.items()))
    for sub in sorted({p for p in folder.rglob("*") if p.is_dir()}, key=lambda p: -len(p.parts)):
        _fsync(sub)
    marker = folder / MARKER
    with open(marker, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "settings": settings, "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)


def seal_manifest(folder: Path, settings: dict) -> None:
    """Every rank: hash the files this rank wrote; rank 0 merges the lists and writes COMPLETE
    only if it sees every file of every rank (else a CheckpointError on every rank, naming the
    rank, its host and a file). Files no rank claims (another writer's) rank 0 hashes itself."""
    mine = [rel for rel in _files(folder) if file_owner(rel) == D.rank()]
    reports = D.all_gather_objects((D.host(), _hash_and_sync(folder, mine)))
    problem = None
    if D.is_main():
        seen = set(_files(folder))
        merged = {rel: digest for _, files in reports for rel, digest in files.items()}
        for r, (host, files) in enumerate(reports):
            unseen = sorted(set(files) - seen)
            if unseen or f"rng/rank{r}.pt" not in files:
                what = unseen[0] if unseen else f"rng/rank{r}.pt"
                problem = (f"{folder}: rank {r} (host {host}) wrote {what}, which rank 0 (host {D.host()}) does not "
                           "see; train.output_dir must be one folder shared by every node; the checkpoint is not "
                           "marked complete")
                break
        if problem is None:
            merged |= _hash_and_sync(folder, sorted(seen - set(merged)))
            write_manifest(folder, settings, merged)
    problem = D.broadcast_object(problem)
    if problem is not None:
        raise CheckpointError(problem)


def read_manifest(folder: Path) -> dict:
    """The COMPLETE marker's content (JSON only: safe to read before verifying)."""
    try:
        manifest = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / MARKER} is not a readable manifest ({e}); a checkpoint without one "
                              "(written before manifests existed, or damaged) is not loaded") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder / MARKER} holds no file manifest; a checkpoint without one "
                              "(written before manifests existed, or damaged) is not loaded")
    return manifest


def verify_checkpoint(folder: str | Path, under: str = "", shared: bool = False) -> dict:
    """Check every file against the manifest (``under``: only the files of that sub-folder, e.g.
    ``model`` for an evaluation); raise CheckpointError naming the first file that is missing,
    changed or not listed. Returns the manifest. ``shared``: called on every rank, each hashes
    the files its rank wrote (``file_owner``, modulo the ranks of this job), and every rank
    raises the same error."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    prefix = f"{under.strip('/')}/" if under else ""
    listed = {rel: digest for rel, digest in manifest["files"].items() if rel.startswith(prefix)}
    present = {rel for rel in _files(folder) if rel.startswith(prefix)}
    ranks, me = (D.world_size(), D.rank()) if shared else (1, 0)
    problem = None
    try:
        extra = sorted(present - set(listed))
        if extra:
            raise CheckpointError(f"{folder / extra[0]} is not in the checkpoint's manifest (added after the save?)")
        for rel, digest in sorted(listed.items()):
            if rel not in present:
                raise CheckpointError(f"{folder / rel} is missing (listed in the checkpoint's manifest)")
            if file_owner(rel) % ranks == me and sha256_file(folder / rel) != digest:
                raise CheckpointError(f"{folder / rel} does not match its SHA-256 in the manifest "
                                      "(truncated, damaged or replaced)")
        if not under:
            _check_step(folder)
            check_pickles(folder)
    except CheckpointError as e:
        problem = str(e)
    if shared:
        problem = next((p for p in D.all_gather_objects(problem) if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)
    return manifest


def enclosing_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint folder ``path`` lies in (itself or a parent holding a manifest, or one being
    written, ``checkpoint-<N>.tmp``), or None: nothing may be written inside one, or its manifest fails.
    (A folder merely named ``checkpoint-<N>``, e.g. runs/eval/checkpoint-600/, is no checkpoint.)"""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / MARKER).is_file() or (folder.name.endswith(".tmp") and _STEP_DIR.match(folder.name[:-4])):
            return folder
    return None


def verify_part(folder: str | Path) -> dict[str, str] | None:
    """A checkpoint's ``model/`` or ``adapter/`` folder checked against its checkpoint's manifest
    (CheckpointError names a changed, missing or added file): its files' SHA-256 by name inside the
    folder, or None for a folder that is not part of a checkpoint. What evaluation and
    ``mgpo.tools.merge`` check before they read weights."""
    path = Path(folder)
    if not (path.parent / MARKER).is_file():
        return None
    listed = verify_checkpoint(path.parent, under=path.name)["files"]
    return {rel.split("/", 1)[1]: digest for rel, digest in listed.items() if rel.startswith(f"{path.name}/")}


def _check_step(folder: Path) -> None:
    """A ``checkpoint-<N>`` folder must hold step N (folders renamed or swapped resume the wrong step)."""
    state_file = folder / "trainer_state.json"
    if not _STEP_DIR.match(folder.name) or not state_file.is_file():
        return
    try:
        step = json.loads(state_file.read_text()).get("step")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{state_file} is not a readable trainer state ({e})") from e
    if step != checkpoint_step(folder):
        raise CheckpointError(f"{state_file} holds step {step!r}, not the step its folder is named for "
                              f"({checkpoint_step(folder)}): checkpoint folders renamed or swapped")


# What DeepSpeed pickles into its ZeRO checkpoint files beside tensors and plain containers
# (torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-3 checkpoints, fp32 and bf16):
# an enum and the loss scaler, data-only classes rebuilt without running code of the file's.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def _deepspeed_classes() -> list:
    try:
        from deepspeed.runtime.fp16 import loss_scaler
        from deepspeed.runtime.zero import config as zero_config
    except ImportError:  # no DeepSpeed: no file may name its classes
        return []
    return [zero_config.ZeroStageEnum, loss_scaler.LossScaler, loss_scaler.DynamicLossScaler]


def check_pickles(folder: Path) -> None:
    """Open every ``*.pt`` under ``folder`` with the weights-only unpickler (tensors memory-mapped,
    not read) and raise CheckpointError naming the first file that needs anything beyond
    tensors, plain containers and ``DEEPSPEED_GLOBALS``: such a file could run code when
    DeepSpeed unpickles it without the guard."""
    allowed = _deepspeed_classes()
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except Exception as e:  # UnpicklingError, or a file that is no torch.save zip at all
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            reason = f"unpickling it calls {found.group(1)}" if found else f"{type(e).__name__}: {str(e)[:200]}"
            raise CheckpointError(f"{path} is refused: {reason}, which torch's weights-only unpickler does not "
                                  f"allow (a checkpoint holds tensors, plain containers and "
                                  f"{', '.join(DEEPSPEED_GLOBALS)} only); it could run code when loaded") from None


def layout_settings(policy, lora: bool) -> dict:
    """The settings a checkpoint can only be resumed with, read from the model that was saved."""
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    return {
        "lora_rank": int(policy.peft_config["default"].r) if lora else 0,
        # Under LoRA the base (vision tower included) is frozen whatever freeze_vision says.
        "freeze_vision": None if lora else not any(".visual." in f".{n}" for n in trainable),
        "trainable_tensors": len(trainable),
    }


RUN_FILE = "run.json"


def run_id(output_dir: str | Path) -> str | None:
    """The identity of the run that owns ``output_dir`` (``run.json``, written when the run starts),
    recorded in every checkpoint it writes; None for a folder without one (an older version's)."""
    path = Path(output_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_same_run(ckpt: Path, output_dir: str | Path) -> None:
    """Refuse to continue a run from a checkpoint another run wrote (copied or linked into its
    folder): its weights and optimizer state would silently replace this run's."""
    theirs = (read_manifest(ckpt).get("settings") or {}).get("run_id")
    ours = run_id(output_dir)
    if theirs and ours and theirs != ours:
        raise CheckpointError(f"{ckpt} was written by another run ({theirs}) than the one in {output_dir} ({ours}), "
                              "copied or linked in: it is not resumed; remove it, or continue that run in a new "
                              "folder with train.resume=<its path>")


def check_resume_settings(ckpt: Path, lora_rank: int, freeze_vision: bool) -> None:
    """Refuse, naming the setting, a resume whose LoRA / freeze_vision setting differs from the
    checkpoint's (otherwise: a missing adapter file or an optimizer-state size error)."""
    saved = read_manifest(ckpt).get("settings") or {}
    problems = []
    if "lora_rank" in saved and saved["lora_rank"] != lora_rank:
        what = "full weights in model/" if saved["lora_rank"] == 0 else f"a rank-{saved['lora_rank']} LoRA adapter"
        problems.append(f"train.lora_rank: the checkpoint holds {what} (train.lora_rank={saved['lora_rank']}), "
                        f"this run sets train.lora_rank={lora_rank}")
    if lora_rank == 0 and saved.get("freeze_vision") is not None and saved["freeze_vision"] != freeze_vision:
        problems.append(f"train.freeze_vision: the checkpoint was trained with train.freeze_vision="
                        f"{str(saved['freeze_vision']).lower()}, this run sets {str(freeze_vision).lower()} "
                        "(the optimizer state covers a different set of parameters)")
    if problems:
        raise CheckpointError(f"cannot resume from {ckpt}:\n  - " + "\n  - ".join(problems)
                              + "\nresume with the checkpoint's settings, or start a new train.output_dir")


def check_resume_ranks(ckpt: Path, world: int, deepspeed: bool) -> None:
    """Refuse, in one line, a resume whose launch cannot load the checkpoint's optimizer state:
    DeepSpeed's ZeRO state is one shard per rank and loads only on as many ranks as wrote it,
    and a DeepSpeed launch cannot read a plain checkpoint's optimizer.pt (nor the reverse). A
    plain (DDP / one-process) checkpoint resumes on any number of ranks (each rank's sampling
    then continues from the seed where the checkpoint has no RNG state for it)."""
    files = read_manifest(ckpt)["files"]
    shards = {file_owner(rel) for rel in files if rel.startswith("deepspeed/") and "zero_pp_rank_" in rel}
    fresh = (f"or start a new run from its weights (model.path={ckpt / 'model'}, a new train.output_dir; the "
             "optimizer starts afresh)")
    if shards and not deepspeed:
        raise CheckpointError(f"cannot resume from {ckpt}: its optimizer state is DeepSpeed's (ZeRO, {len(shards)} "
                              f"shards) and this launch does not use DeepSpeed; resume with the DeepSpeed launch "
                              f"config on {len(shards)} ranks, {fresh}")
    if deepspeed and not shards:
        raise CheckpointError(f"cannot resume from {ckpt}: it was written without DeepSpeed (optimizer.pt) and this "
                              f"launch uses DeepSpeed; resume with the launch that wrote it, {fresh}")
    pending = {file_owner(rel) for rel in files if rel.startswith("pending/")}
    if pending and len(pending) != world:
        raise CheckpointError(f"cannot resume from {ckpt}: the run stopped inside a rollout batch and each of its "
                              f"{len(pending)} ranks saved its rest of that batch; this launch has {world}: resume on "
                              f"{len(pending)} ranks, or from the checkpoint before it")
    if shards and len(shards) != world:
        raise CheckpointError(f"cannot resume from {ckpt}: its DeepSpeed ZeRO state is sharded over {len(shards)} "
                              f"ranks and this launch has {world}; DeepSpeed loads those shards only on as many "
                              f"ranks as wrote them: resume on {len(shards)} ranks, {fresh}")


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save / load

_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How a full disk surfaces through torch's zip writer and safetensors' Rust writer
_FULL_DISK_TEXT = ("unexpected pos", "file write failed", "No space left", "StorageFull", "File too large",
                   "QuotaExceeded", "FileTooLarge")


def save_checkpoint(accelerator, wrapped, optimizer, scheduler, processor, output_dir: str | Path, step: int,
                    trainer_state: dict, keep_last: int, lora: bool, pending: tuple[dict, list] | None = None,
                    run_config: str | None = None) -> Path:
    """Write a whole checkpoint atomically (every rank calls this). A write that fails for want of
    space (or a file-size limit) is reported as such, naming the folder; the half-written folder
    is removed and the previous checkpoint, never touched, stays the one a resume takes."""
    try:
        return _write_checkpoint(accelerator, wrapped, optimizer, scheduler, processor, output_dir, step,
                                 trainer_state, keep_last, lora, pending, run_config)
    except Exception as e:
        if not ((isinstance(e, OSError) and e.errno in _FULL_DISK) or any(t in str(e) for t in _FULL_DISK_TEXT)):
            raise
        tmp = checkpoint_dir(output_dir, step).with_name(f"checkpoint-{step}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        raise CheckpointError(f"no space left on device while writing {tmp} ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1][:160]}); the previous checkpoint "
                              f"({previous or 'none'}) is untouched: free space, then resume") from e


def _write_checkpoint(accelerator, wrapped, optimizer, scheduler, processor, output_dir: str | Path, step: int,
                      trainer_state: dict, keep_last: int, lora: bool, pending: tuple[dict, list] | None,
                      run_config: str | None) -> Path:
    root = Path(output_dir)
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")  # not a name get_last_checkpoint or a resume takes
    if D.is_main() and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while writing
    D.barrier()
    (tmp / "rng").mkdir(parents=True, exist_ok=True)  # every rank: its own files go in there

    # Model weights: under ZeRO-3 get_state_dict gathers the shards (a collective).
    state_dict = accelerator.get_state_dict(wrapped)  # None on ranks other than 0 under ZeRO-3
    policy = accelerator.unwrap_model(wrapped).policy
    if D.is_main():
        state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items()}
        folder = tmp / ("adapter" if lora else "model")
        policy.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        save_processor(processor, folder)
        if run_config is not None:  # evaluation reads the run's own protocol from here
            (folder / RUN_CONFIG).write_text(run_config)

    if D.is_deepspeed(accelerator):
        wrapped.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        if D.is_main():
            torch.save({"scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    elif D.is_main():
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng" / f"rank{D.rank()}.pt")
    if pending is not None:  # the rest of the rollout batch this rank was training on
        (tmp / "pending").mkdir(exist_ok=True)
        torch.save(pending[0], tmp / "pending" / f"rank{D.rank()}.pt")
        trainer_state = {**trainer_state, "pending_slices": pending[1]}
    if os.environ.get("MGPO_CHECKPOINT_PAUSE_S"):  # fault injection: a window to kill the writer in
        time.sleep(float(os.environ["MGPO_CHECKPOINT_PAUSE_S"]))
    D.barrier()

    if D.is_main():
        # global_step and log_history as Hugging Face's Trainer names them, for its tooling
        history = metric_rows(root / METRICS, upto=step)
        state = {**trainer_state, "global_step": step, "log_history": history}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    seal_manifest(tmp, layout_settings(policy, lora) | {"run_id": run_id(root)})
    if D.is_main():
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def load_training_state(accelerator, wrapped, optimizer, scheduler, ckpt: Path) -> dict:
    """Restore optimizer, scheduler and this rank's RNG; return the trainer state.

    ``ckpt`` comes from ``resolve_resume``, which verified it against its manifest.
    """
    if D.is_deepspeed(accelerator):
        check_pickles(ckpt / "deepspeed")  # DeepSpeed unpickles without the weights-only guard
        wrapped.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_module_strict=False)
        scheduler.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True)["scheduler"])
    else:
        blob = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    rng_file = ckpt / "rng" / f"rank{D.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        saved = len(list((ckpt / "rng").glob("rank*.pt")))
        log.warning("rank %d: %s has no RNG state for this rank (written by %d process(es), resumed on %d); its "
                    "sampling continues from the seed, so this resume is not the run's exact continuation",
                    D.rank(), ckpt / "rng", saved, D.world_size())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return {k: state[k] for k in ("step", "epoch", "batch")}


def load_pending(ckpt: Path) -> tuple[dict, list[list[int]]] | None:
    """The rest of the rollout batch this rank was training on when the run stopped inside it
    (its state, and the trajectory indices of each step still to take), or None."""
    slices = json.loads((ckpt / "trainer_state.json").read_text()).get("pending_slices")
    if not slices:
        return None
    return torch.load(ckpt / "pending" / f"rank{D.rank()}.pt", weights_only=True, map_location="cpu"), slices
