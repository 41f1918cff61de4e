"""Everything about processes and devices, in one place.

The same entry point runs under ``python train.py`` (one process), ``accelerate launch``
(DDP) and ``accelerate launch`` with a DeepSpeed ZeRO-3 config, on one node or several.
Helpers fall back to single-process values when no process group exists.

Two kinds of collective. The model's own (DDP's gradient all-reduce, ZeRO-3's gathers,
``generate(synced_gpus=True)``) run on the main process group, which on GPUs is NCCL and
serves CUDA tensors only. Everything the trainer and the evaluator exchange themselves
(token counts, logged figures, trajectories, verdicts, checks at start-up) is small and lives
on the host, so it goes through a second, gloo group created once beside the main one
(``host_group``), whatever the main backend: the CPU tests run the same path as a GPU cluster.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import pickle
import socket
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # DeepSpeed then warns "Setting accelerator to CPU" at every import
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

DEFAULT_TIMEOUT_S = 1200
"""``train.collective_timeout_s``'s default (20 minutes), and the timeout before a config is read.
The longest legitimate wait at a collective here is one rank finishing its share of a
rollout, or of an evaluation, a few minutes before the others, or rank 0 writing a 7B
checkpoint (about 15 GB of weights at ~1 GB/s); a rank that is hung or dead is named after
this long instead of holding every GPU of the job for an hour (torch's default for NCCL is
10 minutes, accelerate's 30)."""

class ClusterError(RuntimeError):
    """The ranks of a job do not agree on what they see (a folder that is not shared between
    nodes, different data on different nodes): the message names the rank, its host and the fix."""


_HOST: dict = {"group": None, "timeout": timedelta(seconds=DEFAULT_TIMEOUT_S)}


def nccl_settings(environ: dict, timeout_s: float) -> dict[str, str]:
    """NCCL's fault settings this trainer sets before the process group starts, each only when the
    user has not set it (torch reads them when the NCCL group is created):

    - ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``: a collective that fails or passes the timeout aborts
      its communicator and ends the process, so torchrun ends the job, instead of leaving the
      other ranks blocked inside NCCL;
    - ``TORCH_NCCL_ENABLE_MONITORING=1`` and ``TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC``: a second
      thread ends the process if NCCL's watchdog itself stops responding (stuck in a CUDA call);
    - ``TORCH_NCCL_TRACE_BUFFER_SIZE`` and ``TORCH_NCCL_DUMP_ON_TIMEOUT=1``: keep the last
      collectives of each rank and write them out on a timeout (``/tmp/nccl_trace_rank_<r>``
      by default), which names the collective each rank was in when the job stopped.

    >>> sorted(nccl_settings({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}, 1200))
    ['TORCH_NCCL_DUMP_ON_TIMEOUT', 'TORCH_NCCL_ENABLE_MONITORING', 'TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC', \
'TORCH_NCCL_TRACE_BUFFER_SIZE']
    """
    wanted = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(max(600, timeout_s + 60))),
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }
    return {k: v for k, v in wanted.items() if k not in environ}


def _process_group_kwargs(timeout_s: float):
    from accelerate.utils import InitProcessGroupKwargs

    timeout = timedelta(seconds=timeout_s)
    _HOST["timeout"] = timeout
    os.environ.update(nccl_settings(os.environ, timeout_s))
    if launched_world_size() > 1 and not torch.cuda.is_available() and not launched_with_deepspeed():
        # several processes and no GPU: the only launch they can be is CPU DDP, which accelerate
        # sets up only with this variable (without it every process trains alone)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    if launched_world_size() > 1 and not torch.cuda.is_available():
        # NCCL needs GPUs; CPU ranks talk over gloo. (Only when launched: naming a backend
        # makes accelerate start a process group even for a single plain process.)
        return InitProcessGroupKwargs(backend="gloo", timeout=timeout)
    return InitProcessGroupKwargs(timeout=timeout)


def _check_world(state) -> None:
    """Refuse to run when the launcher's processes did not become one process group.

    Seen with `accelerate launch --multi_gpu` on a CPU machine: every process trains (or
    evaluates) alone, and the "ranks" silently diverge or duplicate work.
    """
    from accelerate.utils import DistributedType

    if state.num_processes != launched_world_size() or (
            launched_world_size() > 1 and state.distributed_type == DistributedType.NO):
        raise RuntimeError(
            f"the launcher started {launched_world_size()} processes but accelerate set up "
            f"{state.num_processes} ({state.distributed_type}); on CPU launch with ACCELERATE_USE_CPU=1 "
            "(DDP) or DS_ACCELERATOR=cpu (DeepSpeed)")


def make_accelerator(grad_accum_steps: int, micro_batch_size: int, gradient_clipping: float,
                     log_with: list[str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
    """An Accelerator for the current launch (plain, DDP or DeepSpeed), gloo on CPU; ``log_with``:
    accelerate's trackers to log to (none by default); ``timeout_s``: how long any collective may
    wait for the other ranks."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=grad_accum_steps,
                              kwargs_handlers=[_process_group_kwargs(timeout_s)],
                              log_with=log_with or None)
    _check_world(accelerator.state)
    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # No DataLoader goes through prepare(), so "auto" values must be filled here.
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = grad_accum_steps
        ds["train_batch_size"] = micro_batch_size * grad_accum_steps * accelerator.num_processes
        ds["gradient_clipping"] = gradient_clipping
    return accelerator


def make_state(timeout_s: float = DEFAULT_TIMEOUT_S):
    """The process state for inference-only jobs (evaluation), with the same checks."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    extra = {}
    if launched_world_size() > 1:  # any process-group argument makes a lone process start one
        kwargs = _process_group_kwargs(timeout_s)
        extra = {"timeout": kwargs.timeout, **({"backend": kwargs.backend} if kwargs.backend else {})}
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **extra)
    _check_world(state)
    return state


def launched_rank() -> int:
    """This process's rank as the launcher set it (readable before any process group exists)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """Processes started by the launcher (readable before any process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_with_deepspeed() -> bool:
    """The launcher set up DeepSpeed (``accelerate launch`` with a DeepSpeed config; readable before
    any accelerator exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def host() -> str:
    """This machine's name, as messages about ranks on several nodes give it."""
    return socket.gethostname()


def host_group():
    """The gloo process group for host-side collectives (CPU tensors, Python objects), created
    once, on first use, beside the main group (every rank reaches its first host collective at
    the same point of the program, as any collective requires). NCCL, the main group's backend
    on GPUs, serves CUDA tensors only: "No backend type associated with device type cpu"."""
    if _HOST["group"] is None:
        _HOST["group"] = dist.new_group(backend="gloo", timeout=_HOST["timeout"])
    return _HOST["group"]


def barrier(timeout_s: float | None = None) -> None:
    """Wait for every rank. ``timeout_s``: a wait longer than the collective timeout is expected here
    (the end of an evaluation waits for the slowest rank's whole share); a rank that never comes is
    then named (gloo's monitored barrier)."""
    if world_size() == 1:
        return
    if timeout_s is None:
        dist.barrier(group=host_group())
    else:
        dist.monitored_barrier(group=host_group(), timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)


def finish() -> None:
    """The last call of a launched script (train.py, eval.py, ``mgpo.core.sft``): in a distributed
    run every rank waits for the others, tears the process group down and leaves at once.

    Leaving at once (``os._exit(0)``, after flushing the logs and standard streams) skips the
    interpreter's teardown, where a finished DeepSpeed rank on CPU now and then aborted with
    "terminate called without an active exception" (a C++ destructor with no Python frame
    left; seen in two CI runs and in one of three local runs of the three ZeRO-3 tests, with
    or without the process group destroyed first), turning a finished job into a failed one.
    Everything the job writes is closed and flushed before this point. A single process
    returns normally."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    barrier()
    dist.destroy_process_group()
    _HOST["group"] = None
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def micro_batch(accelerator, model, last: bool):
    """One micro-batch of an optimizer step whose micro-batch count may vary from step to step
    (``train.micro_batch_tokens``): gradients sync, and DeepSpeed steps, after the ``last`` one
    only. accelerate hands ``sync_gradients`` to DeepSpeed as its accumulation boundary, and its
    ``no_sync`` holds DDP's all-reduce back (a no-op under ZeRO-3, which reduces every backward)."""
    accelerator.sync_gradients = last
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        yield


def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor:
    """``x`` (a scalar, on any device) summed over ranks, as a CPU tensor (unchanged outside
    distributed runs)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float32).reshape(1)
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=host_group())
    return x[0]


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Each figure averaged over ranks (one all-reduce for the whole dict)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=host_group())
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (a list of one outside distributed runs)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=host_group())
    return out


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=host_group())
    return box[0]


def on_main(fn):
    """``fn()`` run on rank 0 only: its result there, None on the other ranks. An error it raises
    is raised on every rank (rank 0's own, the others a copy, or a ClusterError with its text
    when it does not pickle), so that no rank goes on to a collective rank 0 never reaches."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if world_size() > 1:
        sent = broadcast_object(_portable(error) if is_main() else None)
        error = error if is_main() else sent
    if error is not None:
        raise error
    return result


def _portable(error: BaseException | None) -> BaseException | None:
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return copy.deepcopy(error)  # rebuilt from its pickled form, as the other ranks will
    except Exception:  # noqa: BLE001 - an exception type that does not survive pickling
        return ClusterError(f"rank 0 stopped: {type(error).__name__}: {error}")


def check_same(what: str, rows: list[str], fix: str) -> None:
    """Refuse, on every rank alike, when the ranks do not hold the same ``rows`` (what each rank
    read from its own disk), naming the first rank that differs from rank 0, both hosts and the
    first row where they part. One all-gather of a digest when they agree."""
    if world_size() == 1:
        return
    digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    digests = all_gather_objects((digest, host(), len(rows)))
    if len({d for d, _, _ in digests}) == 1:
        return
    lists = all_gather_objects(rows)
    other = next(r for r, (d, _, _) in enumerate(digests) if d != digests[0][0])
    a, b = lists[0], lists[other]
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def item(rows: list[str]) -> str:
        return repr(rows[i]) if i < len(rows) else "nothing (its list ends before)"

    raise ClusterError(f"rank {other} (host {digests[other][1]}) holds different {what} from rank 0 (host "
                       f"{digests[0][1]}): {len(b)} against {len(a)}; the first difference is item {i + 1}: rank 0 "
                       f"has {item(a)}, rank {other} has {item(b)}; {fix}")


def check_shared_folder(folder: str | Path, what: str, wait_s: float | None = None) -> None:
    """Refuse, on every rank alike, unless every rank sees one and the same ``folder``: each rank
    writes a marker file into it, and rank 0 must see every rank's while every rank sees rank
    0's. Checkpoints (each rank writes its own part, rank 0 seals them), run logs and
    evaluation shards all assume this. A network filesystem may show a new file late, so a
    missing marker is looked for again for up to ``wait_s`` seconds before the refusal (default: 30,
    the attribute-cache time of an NFS mount; ``MGPO_SHARED_FOLDER_WAIT_S`` sets it)."""
    if world_size() == 1:
        return
    if wait_s is None:
        wait_s = float(os.environ.get("MGPO_SHARED_FOLDER_WAIT_S", "30"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = broadcast_object(uuid.uuid4().hex if is_main() else None)
    mine = folder / f".shared-check-{token}-rank{rank()}"
    mine.write_text(host() + "\n")
    barrier()
    deadline = time.monotonic() + wait_s
    while True:
        views = all_gather_objects((host(), [r for r in range(world_size())
                                             if (folder / f".shared-check-{token}-rank{r}").exists()],
                                    time.monotonic() > deadline))
        problems = [f"rank {r} (host {views[r][0]}) does not see rank 0's files" for r in range(world_size())
                    if 0 not in views[r][1]]
        problems += [f"rank 0 (host {views[0][0]}) does not see rank {r}'s (host {views[r][0]})"
                     for r in range(world_size()) if r not in views[0][1]]
        if not problems or views[0][2]:  # rank 0's clock decides, so every rank leaves the loop together
            break
        time.sleep(2.0)
    barrier()
    mine.unlink(missing_ok=True)
    if problems:
        raise ClusterError(f"{folder} ({what}) is not one folder shared by every node: " + "; ".join(problems)
                           + f"; put {what} on a filesystem every node mounts at the same path (NFS, Lustre, "
                           "a shared volume): each rank writes its part of every checkpoint there and rank 0 "
                           "seals it")


def reset_peak_memory() -> None:
    """Start measuring a phase's peak accelerator memory (nothing on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory(phase: str) -> dict[str, float]:
    """``{"memory/<phase>_peak_gb": GB}``: the most this rank's tensors held on the GPU since
    ``reset_peak_memory`` (1 GB = 10^9 bytes; what ``mgpo.runtime.memory`` predicts per phase); empty on CPU."""
    if not torch.cuda.is_available():
        return {}
    return {f"memory/{phase}_peak_gb": torch.cuda.max_memory_allocated() / 1e9}


@contextlib.contextmanager
def generation_weights(accelerator, model, gather: bool = True):
    """The model to call ``generate`` on, with ZeRO-3 weights gathered once for the rollout.

    Without this, ZeRO-3 gathers every layer at every decode step (hours
    per step, as TRL users measured). Gathering needs the whole model to fit on one device; when it does not,
    pass ``gather=False`` and generation runs with ``synced_gpus`` so ranks stay in step.
    """
    if zero_stage(accelerator) == 3 and gather:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(model):
            yield accelerator.unwrap_model(model)
    else:
        yield accelerator.unwrap_model(model)


def prepare_reference(accelerator, ref_model):
    """Shard a frozen reference model the way the policy is sharded (ZeRO-3), or just place it."""
    ref_model.requires_grad_(False).eval()
    if zero_stage(accelerator) != 3:
        return ref_model.to(accelerator.device)
    import deepspeed

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    cfg = {
        "train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": ds.get("bf16", {"enabled": False}),
        "fp16": ds.get("fp16", {"enabled": False}),
    }
    engine, *_ = deepspeed.initialize(model=ref_model, config=cfg)
    engine.eval()
    return engine
