"""A new run in a folder that holds an earlier run: refused, or (train.overwrite) the earlier run
discarded, never the two mixed (checkpoints pruned across runs, metrics rows appended)."""

import pytest

from mgpo.config import load_config
from mgpo.runtime.checkpoint import MARKER, list_checkpoints
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
