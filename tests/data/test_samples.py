"""mgpo.data.samples: the loader on the project's own JSONL and on bad input (every skipped record
named and counted), formats, the file cache, the prompt-length limit."""

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mgpo.config import ModelConfig
from mgpo.core.rollout import prompt_tokens
from mgpo.data.samples import drop_long_prompts, load_samples
from mgpo.runtime.model import load_processor


def _jpeg(path, size=(64, 48), color=(200, 20, 20)):
    Image.new("RGB", size, color).save(path)
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rec(i, image, **kw):
    rec = {"id": f"r{i}", "image": image, "question": "What colour?", "options": ["red", "blue"],
           "answer": "A", "category": "c"}
    rec.update(kw)
    return rec


def test_own_jsonl_from_synth(synth_dir):
    ds = load_samples(synth_dir / "train.jsonl")
    assert len(ds) == 12 and not ds.skipped
    s = ds[0]
    assert s.image.startswith(str(synth_dir)) and s.target_boxes and s.width > 0
    img = s.load_image()
    assert img.mode == "RGB" and img.size == (s.width, s.height)


# ----------------------------------------------------------------------------- published layouts

def _mme_row(qid, image, **kw):
    row = {"Question_id": qid, "Image": image, "Text": "What is written?", "Question Type": "Multiple Choice",
           "Answer choices": ["(A) cat", "(B) dog", "(C) car", "(D) cow", "(E) hat"], "Ground truth": "C",
           "Task": "Perception", "Subtask": "OCR with complex context", "Category": "text"}
    row.update(kw)
    return row


def _b64_png(size=(80, 60), color=(1, 2, 3)):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    img.putpixel((0, 0), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


HR_HEADER = "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage"


def test_byte_order_marks_are_not_data(tmp_path):
    (tmp_path / "hr_bench_4k.tsv").write_bytes(("\ufeff" + HR_HEADER + f"\n3\tQ?\tA\tsingle\ta\tb\tc\td\tcycle1\t"
                                                f"{_b64_png()}\n").encode())
    assert [s.id for s in load_samples(tmp_path / "hr_bench_4k.tsv")] == ["hrbench_4k/3"]
    good = _jpeg(tmp_path / "g.jpg")
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(_rec(0, str(good))).encode() + b"\n")
    assert [s.id for s in load_samples(tmp_path / "d.jsonl")] == ["r0"]


# ----------------------------------------------------------------------------- hostile data

def test_a_set_with_no_usable_record_is_empty_and_lists_every_record(tmp_path):
    recs = [_rec(i, str(tmp_path / f"gone{i}.jpg")) for i in range(3)]
    ds = load_samples(_write_jsonl(tmp_path / "d.jsonl", recs))
    assert len(ds) == 0 and [i for i, _ in ds.skipped] == ["r0", "r1", "r2"]
    (tmp_path / "m.json").write_text(json.dumps([_mme_row("q1", "nowhere.jpg"), _mme_row("q2", "nowhere.jpg")]))
    ds = load_samples(tmp_path / "m.json")
    assert len(ds) == 0 and [i for i, _ in ds.skipped] == ["q1", "q2"]


@pytest.mark.parametrize("line, reason", [
    (b"{not json", "not JSON"),
    (b"42", "expected a JSON object, got a number"),
    (b'{"id": "x", "question": "caf\xe9"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[1, 2]", "expected a JSON object, got a list"),
])
def test_a_broken_line_is_one_skipped_record(tmp_path, line, reason):
    good = _jpeg(tmp_path / "g.jpg")
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(_rec(0, str(good))).encode() + b"\n" + line + b"\n" +
                     json.dumps(_rec(2, str(good))).encode() + b"\n")
    ds = load_samples(path)
    assert [s.id for s in ds] == ["r0", "r2"]
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == "line-2" and reason in ds.skipped[0][1]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_and_blank_files_give_an_empty_set(tmp_path, content):
    (tmp_path / "e.jsonl").write_bytes(content)
    ds = load_samples(tmp_path / "e.jsonl")
    assert len(ds) == 0 and ds.skipped == []


@pytest.mark.parametrize("change, reason", [
    ({"options": "abcd"}, "options must be a list of texts, got a string"),
    ({"options": ["a", None]}, "options[1] must be a text, got null"),
    ({"options": ["a", ["b", "c"]]}, "options[1] must be a text, got a list"),
    ({"question": ["what", "colour"]}, "question must be a text, got a list"),
    ({"question": None}, "question must be a text, got null"),
    ({"target_boxes": [[1, 2, 3]]}, "target_boxes[0] must be 4 finite numbers"),
    ({"target_boxes": [[1, None, 3, 4]]}, "target_boxes[0] must be 4 finite numbers"),
    ({"target_boxes": [[5, 5, 1, 1]]}, "target_boxes[0] must be 4 finite numbers"),
    ({"target_boxes": "0 0 1 1"}, "target_boxes must be a list"),
    ({"options": [f"o{i}" for i in range(27)]}, "27 options, more than the 26 letters"),
    ({"answer": 1}, "answer 1 is not one of the 2 options"),
    ({"category": {"a": 1}}, "category must be a text"),
    ({"id": {"a": 1}}, "id must be a text or a number"),
    ({"image": 5}, "image must be a path"),
])
def test_each_field_is_checked_at_load(tmp_path, change, reason):
    good = _jpeg(tmp_path / "g.jpg")
    ds = load_samples(_write_jsonl(tmp_path / "d.jsonl", [_rec(0, str(good)), {**_rec(1, str(good)), **change}]))
    assert [s.id for s in ds] == ["r0"]
    assert len(ds.skipped) == 1 and reason in ds.skipped[0][1], ds.skipped


def test_twenty_six_options_are_fine(tmp_path):
    good = _jpeg(tmp_path / "g.jpg")
    ds = load_samples(_write_jsonl(tmp_path / "d.jsonl", [_rec(0, str(good), options=list("abcdefghijklmnopqrstuvwxyz"),
                                                               answer="Z")]))
    assert len(ds) == 1 and ds[0].answer == "Z"


def test_duplicate_ids_keep_the_first_and_missing_ids_come_from_the_line(tmp_path, caplog):
    good = _jpeg(tmp_path / "g.jpg")
    recs = [_rec(0, str(good)), _rec(0, str(good), question="second"), _rec(1, str(good)), _rec(9, str(good))]
    del recs[3]["id"]
    with caplog.at_level("WARNING"):
        ds = load_samples(_write_jsonl(tmp_path / "d.jsonl", recs))
    assert [s.id for s in ds] == ["r0", "r1", "line-4"] and ds[0].question == "What colour?"
    assert ds.skipped == [("r0", "duplicate id (first at line 1); kept the first")]
    assert "line 4" in caplog.text and "without an id" in caplog.text


def test_prompt_length_limit():
    from mgpo.data.samples import prompt_length_problem

    assert prompt_length_problem(8192, 8192) is None and prompt_length_problem(10**6, 0) is None
    assert "8193 tokens, over data.max_prompt_tokens (8192)" in prompt_length_problem(8193, 8192)


def test_bad_records_are_skipped_and_counted(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    Image.new("RGB", (4000, 10)).save(tmp_path / "wide.png")
    recs = [
        _rec(0, str(good)),
        _rec(1, str(tmp_path / "missing.jpg")),
        _rec(2, str(tmp_path / "empty.jpg")),
        _rec(3, str(tmp_path / "garbage.jpg")),
        _rec(4, str(good), answer="C"),
        _rec(5, str(good), question="  "),
        _rec(6, str(tmp_path / "wide.png")),
        _rec(7, str(good), options=["only"]),
    ]
    ds = load_samples(_write_jsonl(tmp_path / "d.jsonl", recs))
    assert [s.id for s in ds] == ["r0"]
    reasons = dict(ds.skipped)
    assert "not found" in reasons["r1"]
    assert "0 bytes" in reasons["r2"]
    assert "cannot decode" in reasons["r3"]
    assert "not one of the 2 options" in reasons["r4"]
    assert reasons["r5"] == "empty question"
    assert "aspect ratio" in reasons["r6"]
    assert "two options" in reasons["r7"]
    assert "7 skipped" in ds.summary()


def test_ten_thousand_records_with_bad_ones(tmp_path):
    good = _jpeg(tmp_path / "g.jpg")
    recs = [_rec(i, str(good)) for i in range(10_000)]
    for i in (17, 5000, 9999):
        recs[i]["image"] = str(tmp_path / f"gone{i}.jpg")
    ds = load_samples(_write_jsonl(tmp_path / "big.jsonl", recs))
    assert len(ds) == 9_997 and sorted(i for i, _ in ds.skipped) == ["r17", "r5000", "r9999"]


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "none.jsonl")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="format"):
        load_samples(tmp_path / "x.csv")


def _write(path, question):
    rec = {"id": "q1", "image": "img.png", "question": question, "options": ["red", "blue"], "answer": "A"}
    path.write_text(json.dumps(rec) + "\n")


def test_replaced_file_with_the_same_mtime_is_not_read_from_the_cache(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    data = tmp_path / "set.jsonl"
    _write(data, "What colour is the first shape?")
    stamp = data.stat()
    assert load_samples(data)[0].question == "What colour is the first shape?"
    _write(data, "What colour is the other shape?")  # same length, same mtime
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert data.stat().st_size == stamp.st_size
    assert load_samples(data)[0].question == "What colour is the other shape?"


MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


def test_training_set_drops_over_long_prompts_at_load(tiny_dir, synth_dir, tmp_path):
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX))
    recs = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text().splitlines()[:3]]
    for r in recs:
        r["image"] = str(synth_dir / r["image"])
    recs[1]["question"] = "word " * 5000
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = load_samples(tmp_path / "d.jsonl")
    kept = drop_long_prompts(data, lambda s: prompt_tokens(processor, "mgpo", s, MIN_PX, MAX_PX), 2048)
    assert [s.id for s in kept] == [recs[0]["id"], recs[2]["id"]]
    assert kept.skipped[0][0] == recs[1]["id"] and "over data.max_prompt_tokens (2048)" in kept.skipped[0][1]
    assert len(drop_long_prompts(data, lambda s: 10**6, 0)) == 3  # 0 = no limit
