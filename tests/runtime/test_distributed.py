"""The trainer's and the evaluator's own collectives on a process group laid out like NCCL's.

On GPUs the main process group is NCCL, which serves CUDA tensors only. Here two CPU ranks
create their group with the backend string ``"cuda:gloo"``: gloo does the work, but the
group has NCCL's device map (no backend for CPU tensors), so a collective on a host tensor
fails exactly as it would under NCCL ("No backend type associated with device type cpu").
"""

import pytest
import torch
from ranks import spawn

from mgpo.runtime import distributed as D


def _every_collective(rank, tmp_path):
    """Each collective of runtime/distributed.py, called as the trainer and the evaluator do."""
    out = {}
    # optimizer_step: the step's token count (a sum of the loss mask, a CPU tensor) and the
    # logged figures; the non-finite check (a Python float)
    out["denom"] = float(D.all_reduce_sum(torch.ones(3 + rank, 5).sum()))
    out["finite"] = float(D.all_reduce_sum(float(rank)))
    out["figures"] = D.all_reduce_mean({"loss": 1.0 + rank, "kl": 2.0 * rank})
    # _log: every rank's trajectories; start_run / eval: rank 0's verdict
    out["gathered"] = D.all_gather_objects({"rank": rank, "rewards": [0.0, 1.0]})
    out["broadcast"] = D.broadcast_object(("resume", None) if rank == 0 else None)
    D.barrier()
    D.barrier(timeout_s=60)  # the end of an evaluation
    D.check_same("training records", ["a", "b"], "fix")
    D.check_shared_folder(tmp_path / "run", "train.output_dir")
    return out


@pytest.mark.parametrize("backend", ["cuda:gloo", "cpu:gloo"])
def test_host_collectives_run_on_a_group_without_a_cpu_backend(tmp_path, backend):
    ranks = spawn(_every_collective, tmp_path, backend)
    for out in ranks:
        assert "error" not in out, out.get("error")
        assert out["denom"] == 15.0 + 20.0
        assert out["finite"] == 1.0
        assert out["figures"] == {"kl": 1.0, "loss": 1.5}
        assert out["gathered"] == [{"rank": 0, "rewards": [0.0, 1.0]}, {"rank": 1, "rewards": [0.0, 1.0]}]
        assert out["broadcast"] == ["resume", None]
    assert not list((tmp_path / "run").iterdir()), "the shared-folder markers are removed"


def _different_rows(rank, tmp_path):
    rows = ["r1|a.png|100x80", "r2|b.png|90x90", "r3|c.png|10x10"]
    if rank == 1:
        rows = [rows[0], rows[2]]  # this node's copy lacks b.png: r2 is skipped there
    D.check_same("usable training records", rows, "give every node the same copy of the data")
    return {}


def test_different_rows_on_a_rank_are_refused_on_every_rank_naming_the_first_difference(tmp_path):
    ranks = spawn(_different_rows, tmp_path, "cuda:gloo")
    for out in ranks:
        assert out["error"].startswith("ClusterError: rank 1 (host ")
        assert "2 against 3" in out["error"]
        assert "item 2: rank 0 has 'r2|b.png|90x90', rank 1 has 'r3|c.png|10x10'" in out["error"]
        assert "give every node the same copy of the data" in out["error"]


def _separate_folders(rank, tmp_path):
    D.check_shared_folder(tmp_path / f"node{rank}", "train.output_dir", wait_s=0.0)
    return {}


def test_a_folder_each_rank_sees_alone_is_refused_on_every_rank(tmp_path):
    """Two nodes, each with its own disk at the same path: emulated by a folder per rank."""
    ranks = spawn(_separate_folders, tmp_path, "cuda:gloo")
    for out in ranks:
        assert out["error"].startswith("ClusterError: ")
        assert "rank 1 (host " in out["error"] and "does not see rank 0's files" in out["error"]
        assert "not one folder shared by every node" in out["error"]


def test_nccl_fault_settings_leave_what_the_user_set():
    env = {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "99"}
    got = D.nccl_settings(env, 1200)
    assert got["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and got["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC" not in got
    assert D.nccl_settings({}, 3600)["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "3660"


# ---- checkpoints written by several ranks

