"""Training on data that fights back: an unreadable first record, a resumed run's log."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_train import run_worker

pytestmark = pytest.mark.slow


def test_unreadable_first_record_is_not_the_reserve(tmp_path, tiny_dir, synth_dir):
    recs = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text().splitlines()[:4]]
    for r in recs:
        r["image"] = str(synth_dir / r["image"])
    raw = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(raw, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(raw.getvalue()[:2000])  # the header loads, the pixels do not
    recs[0]["image"] = str(tmp_path / "cut.jpg")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (rec,) = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "run", "train.max_steps=1",
                        f"data.train={tmp_path / 'd.jsonl'}", "train.prompts_per_rollout=4")
    assert rec["steps"] == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/skipped_images"] == 1.0


def test_resume_does_not_repeat_logged_steps(tmp_path, tiny_dir, synth_dir):
    out = tmp_path / "run"
    common = ("train.save_every=2", "train.prompts_per_rollout=2", "train.prompts_per_step=2")
    run_worker(tmp_path, tiny_dir, synth_dir, out, "train.max_steps=2", *common)
    with open(out / "metrics.jsonl", "a") as f:  # a kill after step 3's log, before its checkpoint
        f.write(json.dumps({"step": 3, "reward/mean": -1.0}) + "\n")
    run_worker(tmp_path, tiny_dir, synth_dir, out, "train.max_steps=3", *common)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward/mean"] != -1.0


def test_every_optimizer_step_gets_its_own_row(tmp_path, tiny_dir, synth_dir):
    """Two optimizer steps per rollout batch (prompts_per_rollout = 2 x prompts_per_step): both
    steps' train/* figures are written, the rollout's figures repeated on each; log_every counts steps."""
    common = ("train.prompts_per_rollout=4", "train.prompts_per_step=2", "train.micro_batch_size=4",
              "train.max_steps=4")
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "every", *common, "train.log_every=1")
    rows = [json.loads(x) for x in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("train/loss" in r and "train/grad_norm" in r and "reward/mean" in r for r in rows)
    assert rows[0]["reward/mean"] == rows[1]["reward/mean"]  # one rollout batch, two steps
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "odd", *common, "train.log_every=3")
    rows = [json.loads(x) for x in (tmp_path / "odd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]  # step 3 is the first of a batch; 4 is the last step
