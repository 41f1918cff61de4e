"""The paper's training set from MME-RealWorld's published files: the full set minus Lite."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from mgpo.data.samples import load_samples
from mgpo.tools.mme_split import split

ROOT = Path(__file__).resolve().parents[2]


def _record(qid, image, text, answer="A"):
    """One record as MME_RealWorld.json publishes it."""
    return {"Question_id": qid, "Image": image, "Text": text,
            "Answer choices": ["(A) one", "(B) two", "(C) three", "(D) four", "(E) The image does not feature it."],
            "Ground truth": answer, "Task": "Perception", "Subtask": "Remote Sensing", "Category": "color",
            "Question Type": "Multiple Choice"}


def _published(tmp_path):
    """A full set beside its image archives' folders, and a Lite set as data.zip unpacks."""
    full_dir, lite_dir = tmp_path / "MME-RealWorld", tmp_path / "MME-RealWorld-Lite" / "data"
    full = [_record(f"perception/remote_sensing/color/{i:04d}", f"remote_sensing/{i:05d}.png", f"What colour is {i}?")
            for i in range(8)]
    full.append({**_record(None, "remote_sensing/00099.png", "no id"), "Question_id": None})
    full.append(_record("perception/remote_sensing/color/0001", "remote_sensing/00001.png", "a repeat"))
    lite = [_record("perception/remote_sensing/color/0002", "00002.png", "What colour is 2?"),
            _record("perception/remote_sensing/color/0005", "00005.png", "What colour is 5?"),
            _record("lite/renamed/0007", "00007.png", "What  colour is 7?"),  # another id, same image and text
            _record("lite/only/0100", "00100.png", "Not in the full set?")]
    (full_dir / "remote_sensing").mkdir(parents=True)
    (lite_dir / "imgs").mkdir(parents=True)
    for i in list(range(8)) + [99]:
        Image.new("RGB", (64, 48), (i * 20, 0, 0)).save(full_dir / "remote_sensing" / f"{i:05d}.png")
    (full_dir / "MME_RealWorld.json").write_text(json.dumps(full))
    (lite_dir / "MME-RealWorld-Lite.json").write_text(json.dumps(lite))
    return full_dir / "MME_RealWorld.json", lite_dir / "MME-RealWorld-Lite.json", full, lite


def test_split_hand_built(tmp_path):
    _, _, full, lite = _published(tmp_path)
    s = split(full, lite)
    assert [r["Question_id"] for r in s.train] == [f"perception/remote_sensing/color/{i:04d}" for i in (0, 1, 3, 4, 6)]
    assert (s.matched_by_id, s.matched_by_text, s.lite_not_found) == (2, 1, ["lite/only/0100"])
    assert s.dropped == {"no Question_id (cannot be checked against Lite)": 1,
                         "Question_id repeated in the full set (the first kept)": 1}


def test_command_writes_the_training_file_that_the_trainer_reads(tmp_path):
    full, lite, _, _ = _published(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mgpo.tools.mme_split", "--full", str(full), "--lite", str(lite)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = full.parent / "MME_RealWorld_train.json"
    assert "matched in the full set by Question_id: 2" in proc.stdout and "Lite questions not found" in proc.stdout
    assert f"training set: 5 questions (the paper trained on 21,690) written to {out}" in proc.stdout
    assert f"data.train={out}" in proc.stdout
    samples = load_samples(out)  # the published reader, images resolved beside the full set
    assert len(samples) == 5 and not samples.skipped and samples[0].options[0] == "one"
    assert samples[0].load_image().size == (64, 48)

    checked = subprocess.run([sys.executable, "-m", "mgpo.tools.mme_split", "--train", str(out), "--lite", str(lite)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and "5 records" in checked.stdout and "Lite questions in it: 0" in checked.stdout


def test_the_training_presets_point_at_the_file_it_writes():
    from mgpo.config import load_config

    for name in ("qwen2_5_vl_7b_mgpo", "qwen2_5_vl_7b_grpo", "qwen2_5_vl_7b_mgpo_lora_1gpu"):
        assert load_config(ROOT / "configs" / f"{name}.yaml").data.train.endswith("/MME_RealWorld_train.json"), name


def test_a_file_not_laid_out_as_published_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "bad_lite.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "mgpo.tools.mme_split", "--full", str(tmp_path / "bad.json"),
                           "--lite", str(tmp_path / "bad_lite.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "expected a JSON list" in proc.stderr and "Traceback" not in proc.stderr


def test_the_output_never_replaces_a_benchmark_file(tmp_path):
    """--out at the Lite file replaced the benchmark with training questions (a later Lite evaluation
    scored training data); at the full set it overwrote it; --lite equal to --full wrote an empty
    training set. Each is refused, and nothing is written."""
    full, lite, _, _ = _published(tmp_path)
    before = {p: p.read_bytes() for p in (full, lite)}
    for args in (["--out", str(lite)], ["--out", str(full)], ["--lite", str(full)]):
        given = {"--full": str(full), "--lite": str(lite), **dict(zip(args[::2], args[1::2]))}
        proc = subprocess.run([sys.executable, "-m", "mgpo.tools.mme_split", *[x for kv in given.items() for x in kv]],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "benchmark file" in proc.stderr or "the same file" in proc.stderr
    assert {p: p.read_bytes() for p in (full, lite)} == before
    assert not (full.parent / "MME_RealWorld_train.json").exists()
