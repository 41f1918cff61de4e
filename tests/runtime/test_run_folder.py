"""A new run in a folder that holds an earlier run: refused, or (train.overwrite) the earlier run
discarded, never the two mixed (checkpoints pruned across runs, metrics rows appended)."""

import pytest

from mgpo.config import load_config
from mgpo.runtime.checkpoint import MARKER, list_checkpoints
from mgpo.runtime.model import CheckpointError
from mgpo.runtime.run_folder import RunFolderError, start_run


def _earlier_run(out):
    for step in (100, 150):
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / MARKER).write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 150, "reward/mean": 0.5}\n')
    (out / "tensorboard").mkdir()
    (out / "config.resume-000100.yaml").write_text("{}")


def _start(out, *overrides):
    run = start_run(load_config(None, [f"train.output_dir={out}", "train.resume=none", *overrides]))
    run.lock.close()
    return run


def test_new_run_over_an_earlier_run_is_refused_naming_the_way_out(tmp_path):
    _earlier_run(tmp_path)
    with pytest.raises(RunFolderError, match="train.overwrite=true") as refused:
        _start(tmp_path)
    assert "checkpoint-100 .. checkpoint-150" in str(refused.value)
    assert len(list_checkpoints(tmp_path)) == 2 and (tmp_path / "metrics.jsonl").exists()


def test_overwrite_discards_the_earlier_run(tmp_path):
    _earlier_run(tmp_path)
    assert _start(tmp_path, "train.overwrite=true").resume_from is None
    assert list_checkpoints(tmp_path) == []
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
    assert not list(tmp_path.glob("config.resume-*.yaml"))
    # the saved config, reused to continue this run (--config <run>/config.yaml), must not discard it
    assert load_config(tmp_path / "config.yaml").train.overwrite is False


def test_new_run_in_a_folder_without_checkpoints_starts(tmp_path):
    (tmp_path / "notes.txt").write_text("kept")
    assert _start(tmp_path).resume_from is None
    assert (tmp_path / "notes.txt").read_text() == "kept"


def _checkpoint_of(out, step, run_id):
    """A checkpoint folder whose manifest records the run that wrote it."""
    import json

    from mgpo.runtime.checkpoint import write_manifest

    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": 0, "batch": 1}))
    write_manifest(ckpt, {"run_id": run_id})
    return ckpt


def test_a_checkpoint_of_another_run_is_not_resumed_into_this_one(tmp_path):
    """A seed-8 run's checkpoint linked into a seed-7 run's folder was resumed from: its weights and
    optimizer state silently replaced the run's. Each run now has an identity its checkpoints record."""
    import json

    this, other = tmp_path / "seed7", tmp_path / "seed8"
    run = _start(this)  # a new run: its identity in run.json
    mine = json.loads((this / "run.json").read_text())["id"]
    _checkpoint_of(this, 2, mine)
    foreign = _checkpoint_of(other, 4, "another-run")
    (this / "checkpoint-4").symlink_to(foreign, target_is_directory=True)
    with pytest.raises(CheckpointError, match="written by another run \\(another-run\\)"):
        _start(this, "train.resume=auto")
    (this / "checkpoint-4").unlink()
    assert _start(this, "train.resume=auto").resume_from == this / "checkpoint-2"
    # continuing the other run, explicitly, in a new folder is allowed, and that run goes on there
    new = tmp_path / "seed8-continued"
    assert _start(new, f"train.resume={foreign}").resume_from == foreign
    assert json.loads((new / "run.json").read_text())["id"] == "another-run"
    assert run.resume_from is None


def test_the_lock_file_is_gone_after_a_normal_end(tmp_path):
    run = start_run(load_config(None, [f"train.output_dir={tmp_path}", "train.resume=none"]))
    assert (tmp_path / ".lock").is_file()
    run.release()
    assert not (tmp_path / ".lock").exists()
    run.release()  # twice is harmless
    second = start_run(load_config(None, [f"train.output_dir={tmp_path}", "train.resume=none",
                                          "train.overwrite=true"]))  # the folder is free again
    second.release()
