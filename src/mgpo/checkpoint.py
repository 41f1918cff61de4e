"""Checkpoints that resume exactly and load with ``from_pretrained``.

Layout of ``<output_dir>/checkpoints/step-000050/``:

    model/            Hugging Face folder (safetensors + processor): from_pretrained loads it
    adapter/          instead of model/ when training LoRA (see ``python -m mgpo.merge``)
    optimizer.pt      optimizer and scheduler state (weights_only-safe), or
    deepspeed/        DeepSpeed's own sharded engine state under ZeRO
    rng/rank*.pt      every rank's RNG state
    trainer_state.json  step, epoch, data position
    COMPLETE          written last

A checkpoint is written into ``step-XXXXXX.tmp`` and renamed when whole, so a process
killed mid-write leaves the previous checkpoint untouched and loadable; folders without
COMPLETE are ignored on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .model import save_processor

MARKER = "COMPLETE"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / MARKER).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto`` -> newest complete checkpoint (or None), ``none`` -> None, else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no {MARKER} file)")
    return path


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

def save_checkpoint(accelerator, wrapped, optimizer, scheduler, processor, output_dir: str | Path, step: int,
                    trainer_state: dict, keep_last: int, lora: bool) -> Path:
    """Write a whole checkpoint atomically (every rank calls this)."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if D.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while writing
        (tmp / "rng").mkdir(parents=True)
    D.barrier()

    # Model weights: under ZeRO-3 get_state_dict gathers the shards (a collective).
    state_dict = accelerator.get_state_dict(wrapped)  # None on ranks other than 0 under ZeRO-3
    policy = accelerator.unwrap_model(wrapped).policy
    if D.is_main():
        state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items()}
        folder = tmp / ("adapter" if lora else "model")
        policy.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        save_processor(processor, folder)

    if D.is_deepspeed(accelerator):
        wrapped.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        if D.is_main():
            torch.save({"scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    elif D.is_main():
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng" / f"rank{D.rank()}.pt")
    if os.environ.get("MGPO_CHECKPOINT_PAUSE_S"):  # fault injection: a window to kill the writer in
        time.sleep(float(os.environ["MGPO_CHECKPOINT_PAUSE_S"]))
    D.barrier()

    if D.is_main():
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        (tmp / MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def load_training_state(accelerator, wrapped, optimizer, scheduler, ckpt: Path) -> dict:
    """Restore optimizer, scheduler and this rank's RNG; return the trainer state."""
    if D.is_deepspeed(accelerator):
        wrapped.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_module_strict=False)
        scheduler.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True)["scheduler"])
    else:
        blob = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    rng_file = ckpt / "rng" / f"rank{D.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())
