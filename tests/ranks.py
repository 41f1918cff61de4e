"""Two CPU ranks in one test: ``spawn(fn, tmp_path, backend)`` runs ``fn(rank, tmp_path, *args)`` on
both ranks of a process group created with ``backend`` and returns what each returned.

``"cuda:gloo"`` gives a group with NCCL's device map (no backend for CPU tensors: a collective on
a host tensor fails exactly as under NCCL) while gloo does the work; ``"cpu:gloo"`` is what the
CPU launches of the other tests get.
"""

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, tmp_path: Path, backend: str, *args) -> list[dict]:
    """``fn`` must be importable (a module-level function); an exception it raises comes back as
    ``{"error": "<class>: <message>"}``."""
    mp.start_processes(_rank_main, args=(fn, tmp_path, backend, _free_port(), args), nprocs=2,
                       start_method="spawn", join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _rank_main(rank, fn, tmp_path, backend, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=2)
    try:
        result = fn(rank, tmp_path, *args)
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(e).__name__}: {e}"}
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    os._exit(0)  # as mgpo.runtime.distributed.finish: DeepSpeed's C++ teardown can abort a finished process
