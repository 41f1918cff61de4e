"""mgpo.runtime.checkpoint: manifests, pickles, step folders, training state, and checkpoints
written by several ranks."""

import json
import os
from pathlib import Path

import pytest
import torch
from ranks import spawn

from mgpo.runtime import distributed as D
from mgpo.runtime.checkpoint import check_pickles, list_checkpoints, resolve_resume, write_manifest
from mgpo.runtime.model import CheckpointError


class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: what a crafted checkpoint file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _ckpt_dir(out, step):
    return out / f"checkpoint-{step}"


def _deepspeed_like_checkpoint(out, step, model_states):
    """A checkpoint laid out as a ZeRO run writes it, with a manifest that matches its files."""
    folder = _ckpt_dir(out, step)
    (folder / "deepspeed" / "state").mkdir(parents=True)
    (folder / "rng").mkdir()
    torch.save(model_states, folder / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"scheduler": {"last_epoch": step}}, folder / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, folder / "rng" / "rank0.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(folder, {})
    return folder


def test_a_crafted_pickle_in_a_deepspeed_checkpoint_is_refused_unrun(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    good = _deepspeed_like_checkpoint(tmp_path / "run", 1, {"module": {"w": torch.ones(2)}})
    bad = _deepspeed_like_checkpoint(tmp_path / "run", 2, {"module": {"w": torch.ones(2)}, "x": _Payload(marker)})
    crafted = bad / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_model_states.pt is refused"):
        resolve_resume(str(bad), tmp_path / "run")  # the manifest matches: only the pickle check stops it
    with pytest.raises(CheckpointError, match="unpickling it calls"):
        check_pickles(bad / "deepspeed")
    assert resolve_resume("auto", tmp_path / "run") == good  # auto falls back to the one that passes
    assert not marker.exists() and crafted.exists()


def test_deepspeed_classes_in_a_real_zero_checkpoint_are_allowed(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = _deepspeed_like_checkpoint(tmp_path / "run", 1, {"module": {"w": torch.ones(2)}})
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "ds_version": "0.19",
                "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(2)}}}},
               folder / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write_manifest(folder, {})
    check_pickles(folder)
    assert resolve_resume(str(folder), tmp_path / "run") == folder


def _start(out, *overrides):
    from mgpo.config import load_config
    from mgpo.runtime.run_folder import start_run

    run = start_run(load_config(None, [f"train.output_dir={out}", *overrides]))
    run.lock.close()
    return run


def test_checkpoint_folders_without_complete_are_not_started_over(tmp_path):
    for step in (2, 4):
        _deepspeed_like_checkpoint(tmp_path, step, {"module": {}})
        (_ckpt_dir(tmp_path, step) / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="without a COMPLETE marker \\(checkpoint-2, checkpoint-4\\)"):
        _start(tmp_path)  # resume=auto
    assert _ckpt_dir(tmp_path, 4).is_dir() and not (tmp_path / "config.yaml").exists()


def test_an_unmarked_newer_folder_is_named_when_an_older_checkpoint_resumes(tmp_path, caplog):
    good = _deepspeed_like_checkpoint(tmp_path, 2, {"module": {}})
    _ckpt_dir(tmp_path, 4).mkdir()
    with caplog.at_level("WARNING"):
        assert resolve_resume("auto", tmp_path) == good
    assert "ignoring checkpoint-4" in caplog.text and "no COMPLETE marker" in caplog.text


def test_swapped_step_folders_are_refused(tmp_path):
    for step in (2, 4):
        _deepspeed_like_checkpoint(tmp_path, step, {"module": {}})
    _ckpt_dir(tmp_path, 2).rename(tmp_path / "swap")
    _ckpt_dir(tmp_path, 4).rename(_ckpt_dir(tmp_path, 2))
    (tmp_path / "swap").rename(_ckpt_dir(tmp_path, 4))
    with pytest.raises(CheckpointError) as refused:
        resolve_resume("auto", tmp_path)
    assert "holds step 2, not the step its folder is named for (4)" in str(refused.value)
    assert "holds step 4, not the step its folder is named for (2)" in str(refused.value)
    with pytest.raises(CheckpointError, match="renamed or swapped"):
        resolve_resume(str(_ckpt_dir(tmp_path, 4)), tmp_path)


def test_overwrite_with_resume_auto_over_checkpoints_is_refused(tmp_path):
    from mgpo.runtime.run_folder import RunFolderError

    _deepspeed_like_checkpoint(tmp_path, 2, {"module": {}})
    with pytest.raises(RunFolderError, match="train.overwrite=true with train.resume=auto.*train.resume=none"):
        _start(tmp_path, "train.overwrite=true")
    assert _ckpt_dir(tmp_path, 2).is_dir()
    assert _start(tmp_path / "fresh", "train.overwrite=true").resume_from is None  # nothing to discard: fine


def test_a_lock_that_is_a_folder_says_so(tmp_path):
    from mgpo.runtime.run_folder import RunFolderError

    (tmp_path / ".lock").mkdir()
    with pytest.raises(RunFolderError, match="cannot use .*\\.lock as the run folder's lock \\(Is a directory\\)"):
        _start(tmp_path)


def test_a_rank_without_rng_state_in_the_checkpoint_is_named(tmp_path, monkeypatch, caplog):
    """A 1-process checkpoint resumed on 2 ranks: rank 1 finds no RNG state and says so."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mgpo.runtime import distributed as D
    from mgpo.runtime.checkpoint import load_training_state

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    folder = _ckpt_dir(tmp_path, 3)
    (folder / "rng").mkdir(parents=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, folder / "rng" / "rank0.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "epoch": 0, "batch": 3, "log_history": []}))
    monkeypatch.setattr(D, "rank", lambda: 1)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    with caplog.at_level("WARNING"):
        state = load_training_state(accelerator, None, optimizer, scheduler, folder)
    assert state == {"step": 3, "epoch": 0, "batch": 3}
    assert "rank 1" in caplog.text and "no RNG state for this rank" in caplog.text and "resumed on 2" in caplog.text


# ----------------------------------------------------------------------------- faults

_SAVE_UNDER_A_SIZE_LIMIT = r"""
import resource, signal, sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from mgpo.runtime.checkpoint import save_checkpoint

out, big = Path(sys.argv[1]), sys.argv[2]


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(8))

    def save_pretrained(self, folder, state_dict, safe_serialization):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "model.safetensors"))


policy = Policy()
wrapped = SimpleNamespace(policy=policy)
weights = {"policy.w": policy.w.detach()}
accelerator = SimpleNamespace(distributed_type=DistributedType.NO, get_state_dict=lambda w: weights,
                              unwrap_model=lambda w: w)
processor = SimpleNamespace(save_pretrained=lambda folder: None,
                            image_processor=SimpleNamespace(size={"shortest_edge": 1, "longest_edge": 2}))
optimizer = torch.optim.AdamW(policy.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
save = lambda step: save_checkpoint(accelerator, wrapped, optimizer, scheduler, processor, out, step,
                                    {"step": step, "epoch": 0, "batch": step}, keep_last=2, lora=False)
save(1)
# what step 2 writes grows past a 64 KiB file-size limit: the weights, or the optimizer state
if big == "weights":
    weights = {"policy.w": torch.zeros(100_000)}
else:
    optimizer.state[policy.w] = {"exp_avg": torch.zeros(100_000), "exp_avg_sq": torch.zeros(100_000),
                                 "step": torch.tensor(1.0)}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of the process dying
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
save(2)
"""


@pytest.mark.parametrize("big", ["weights", "optimizer"])
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, big):
    import subprocess
    import sys

    from mgpo.runtime.checkpoint import list_checkpoints, verify_checkpoint

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _SAVE_UNDER_A_SIZE_LIMIT, str(out), big], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("mgpo.runtime.model.CheckpointError: no space left on device "
                                                    f"while writing {out / 'checkpoint-2.tmp'}"), proc.stderr[-2000:]
    assert f"the previous checkpoint ({out / 'checkpoint-1'}) is untouched" in last
    assert list_checkpoints(out) == [out / "checkpoint-1"] and not (out / "checkpoint-2.tmp").exists()
    verify_checkpoint(out / "checkpoint-1")


def _write_parts(rank, folder):
    """What each rank writes into a checkpoint: its RNG state and its ZeRO shard; rank 0 the rest."""
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    (folder / "deepspeed").mkdir(exist_ok=True)
    torch.save({"rank": rank}, folder / "rng" / f"rank{rank}.pt")
    torch.save({"shard": torch.full((4,), float(rank))}, folder / "deepspeed" / f"zero_pp_rank_{rank}_optim.pt")
    if rank == 0:
        (folder / "trainer_state.json").write_text("{}\n")


def _seal(rank, tmp_path, shared):
    from mgpo.runtime.checkpoint import MARKER, read_manifest, seal_manifest, verify_checkpoint

    folder = tmp_path / ("ckpt" if shared else f"ckpt-node{rank}")
    _write_parts(rank, folder)
    D.barrier()
    seal_manifest(folder, {})
    verify_checkpoint(folder, shared=True)  # each rank hashes its own files
    D.barrier()
    if rank == 0:
        (folder / "deepspeed" / "zero_pp_rank_1_optim.pt").write_bytes(b"damaged")
    D.barrier()
    try:
        verify_checkpoint(folder, shared=True)
        damaged = None
    except Exception as e:  # noqa: BLE001
        damaged = f"{type(e).__name__}: {e}"
    return {"files": sorted(read_manifest(folder)["files"]), "complete": (folder / MARKER).exists(),
            "damaged": damaged}


def test_a_checkpoint_holds_every_ranks_files_each_hashed_by_its_writer(tmp_path):
    ranks = spawn(_seal, tmp_path, "cuda:gloo", True)
    assert ranks[0] == ranks[1]
    assert ranks[0]["files"] == ["deepspeed/zero_pp_rank_0_optim.pt", "deepspeed/zero_pp_rank_1_optim.pt",
                                 "rng/rank0.pt", "rng/rank1.pt", "trainer_state.json"]
    # rank 1 hashes its own shard: the damage is found, and every rank refuses alike
    assert ranks[0]["damaged"].startswith("CheckpointError: ") and "zero_pp_rank_1_optim.pt" in ranks[0]["damaged"]


def test_a_checkpoint_missing_a_ranks_files_is_not_complete(tmp_path):
    """Rank 1 writes into a folder rank 0 does not see (a node without the shared filesystem):
    before, rank 0 marked its own half COMPLETE and the run went on."""
    ranks = spawn(_seal, tmp_path, "cuda:gloo", False)
    for out in ranks:
        assert out["error"].startswith("CheckpointError: ")
        assert "rank 1 (host " in out["error"] and "which rank 0 (host" in out["error"]
        assert "must be one folder shared by every node" in out["error"]
    assert not (tmp_path / "ckpt-node0" / "COMPLETE").exists()


def _manifest(folder, files):
    from mgpo.runtime.checkpoint import write_manifest

    for rel in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"x")
    write_manifest(folder, {})
    return folder


def test_resuming_zero3_shards_on_another_rank_count_is_refused_in_one_line(tmp_path):
    from mgpo.runtime.checkpoint import CheckpointError, check_resume_ranks

    z3 = _manifest(tmp_path / "z3", ["deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                     "rng/rank0.pt", "rng/rank1.pt"])
    check_resume_ranks(z3, 2, deepspeed=True)
    for world, ds, why in [(4, True, "sharded over 2 ranks and this launch has 4"),
                           (2, False, "this launch does not use DeepSpeed")]:
        with pytest.raises(CheckpointError, match=why) as refused:
            check_resume_ranks(z3, world, deepspeed=ds)
        assert "\n" not in str(refused.value) and "model.path=" in str(refused.value)
    plain = _manifest(tmp_path / "plain", ["optimizer.pt", "rng/rank0.pt", "rng/rank1.pt"])
    for world in (1, 2, 3):  # a plain checkpoint resumes on any number of ranks
        check_resume_ranks(plain, world, deepspeed=False)
    with pytest.raises(CheckpointError, match="written without DeepSpeed"):
        check_resume_ranks(plain, 2, deepspeed=True)


@pytest.mark.slow
def test_stray_folders_are_not_checkpoints(tmp_path):
    for name in ("checkpoint-3", "checkpoint-latest", "checkpoint-4.tmp", "checkpoint-1-copy", "notes", "step-000005"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "COMPLETE").write_text("{}\n")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
