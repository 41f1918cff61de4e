"""mgpo.data.benchmarks: the published layouts (V*, MME-RealWorld, HR-Bench), each on a
fixture written in its format."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mgpo.data.samples import load_samples


def _jpeg(path, size=(64, 48), color=(200, 20, 20)):
    Image.new("RGB", size, color).save(path)
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _vstar_snapshot(root):
    """The published V* snapshot: the question list, per-category folders, two supplementary folders."""
    questions = [
        ("direct_attributes", "sa_1", "What is the color of the cup?", ["blue", "red", "green", "white"], "B",
         [[10, 20, 30, 40]]),
        ("relative_position", "sa_2", "Is the dog on the left or right of the cat?", ["right", "left"], "A",
         [[1, 2, 3, 4], [50, 60, 10, 10]]),
    ]
    lines = []
    for qid, (cat, stem, q, opts, label, boxes) in enumerate(questions):
        (root / cat).mkdir(parents=True, exist_ok=True)
        _jpeg(root / cat / f"{stem}.jpg", (300, 200))
        # the per-image file lists the correct option first, unlike the published order
        truth = opts["ABCD".index(label)]
        (root / cat / f"{stem}.json").write_text(json.dumps(
            {"target_object": ["x"], "bbox": boxes, "question": q, "options": [truth] + [o for o in opts if o != truth]}))
        text = q + "\n" + "".join(f"({'ABCD'[i]}) {o}\n" for i, o in enumerate(opts)) + \
            "Answer with the option's letter from the given choices directly."
        lines.append({"question_id": qid, "image": f"{cat}/{stem}.jpg", "category": cat, "text": text, "label": label})
    _write_jsonl(root / "test_questions.jsonl", lines)
    for extra, suffix in (("GPT4V-hard", ".JPG"), ("OCR", ".jpg")):
        (root / extra).mkdir()
        _jpeg(root / extra / f"e1{suffix}", (300, 200))
        (root / extra / "e1.json").write_text(json.dumps({"bbox": [[1, 1, 5, 5]], "question": "Q?",
                                                           "options": ["a", "b"]}))
    return root


def test_vstar_reads_the_published_list_and_option_order(tmp_path):
    root = _vstar_snapshot(tmp_path / "vstar_bench")
    for path in (root, root / "test_questions.jsonl"):
        ds = load_samples(path)
        assert [s.id for s in ds] == ["0", "1"] and not ds.skipped  # GPT4V-hard/ and OCR/ never counted
        a, b = ds
        assert a.options == ("blue", "red", "green", "white") and a.answer == "B"  # as published
        assert a.question == "What is the color of the cup?" and a.category == "direct_attributes"
        assert a.target_boxes == ((10.0, 20.0, 40.0, 60.0),)  # [x, y, w, h] -> corners
        assert b.options == ("right", "left") and b.answer == "A"
        assert b.target_boxes == ((1.0, 2.0, 4.0, 6.0), (50.0, 60.0, 60.0, 70.0))


def test_vstar_question_without_options_is_skipped_by_its_id(tmp_path):
    root = _vstar_snapshot(tmp_path / "vstar_bench")
    lines = (root / "test_questions.jsonl").read_text().splitlines()
    broken = json.loads(lines[1]) | {"text": "Where is the dog?"}
    (root / "test_questions.jsonl").write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    ds = load_samples(root)
    assert [s.id for s in ds] == ["0"] and ds.skipped == [("1", "text holds no '(A) ...' option lines")]


def test_vstar_folder_without_the_list_says_what_is_missing(tmp_path):
    (tmp_path / "v" / "direct_attributes").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="test_questions.jsonl"):
        load_samples(tmp_path / "v", "vstar")


def _mme_row(qid, image, **kw):
    row = {"Question_id": qid, "Image": image, "Text": "What is written?", "Question Type": "Multiple Choice",
           "Answer choices": ["(A) cat", "(B) dog", "(C) car", "(D) cow", "(E) hat"], "Ground truth": "C",
           "Task": "Perception", "Subtask": "OCR with complex context", "Category": "text"}
    row.update(kw)
    return row


def test_mme_realworld_lite_layout(tmp_path):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    _jpeg(data / "imgs" / "a.jpg")
    rows = [_mme_row("q1", "a.jpg"), _mme_row("q2", "a.jpg", **{"Answer choices": ["（A）猫", "（B）狗"],
                                                               "Ground truth": "B", "Task": "Reasoning",
                                                               "Subtask": "Monitoring", "Category": "intention"})]
    (data / "MME-RealWorld-Lite.json").write_text(json.dumps(rows))
    ds = load_samples(data / "MME-RealWorld-Lite.json")
    assert [s.id for s in ds] == ["q1", "q2"], ds.skipped
    s, t = ds
    assert s.options == ("cat", "dog", "car", "cow", "hat") and s.answer == "C"
    assert s.breakdown == ("Perception", "OCR with complex context", "text")
    assert s.category == "Perception/OCR with complex context"
    assert t.options == ("猫", "狗") and t.answer == "B" and t.breakdown == ("Reasoning", "Monitoring", "intention")


def test_mme_realworld_full_layout_and_image_root(tmp_path):
    (tmp_path / "remote_sensing").mkdir()
    _jpeg(tmp_path / "remote_sensing" / "r.jpg")
    (tmp_path / "MME_RealWorld.json").write_text(json.dumps([_mme_row("q1", "remote_sensing/r.jpg")]))
    assert len(load_samples(tmp_path / "MME_RealWorld.json")) == 1
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "MME_RealWorld.json").write_text(json.dumps([_mme_row("q1", "remote_sensing/r.jpg")]))
    assert len(load_samples(tmp_path / "elsewhere" / "MME_RealWorld.json", image_root=tmp_path)) == 1
    wrong = load_samples(tmp_path / "elsewhere" / "MME_RealWorld.json")
    assert len(wrong) == 0 and "not found" in dict(wrong.skipped)["q1"]


def _b64_png(size=(80, 60), color=(1, 2, 3)):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    img.putpixel((0, 0), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


HR_HEADER = "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage"


def test_hrbench_tsv_with_base64(tmp_path):
    lines = [HR_HEADER, f"7\tWhat is it?\tB\tsingle\tx\ty\tz\tw\tcycle1\t{_b64_png()}"]
    (tmp_path / "hr_bench_4k.tsv").write_text("\n".join(lines) + "\n")
    ds = load_samples(tmp_path / "hr_bench_4k.tsv")
    s = ds[0]
    assert s.id == "hrbench_4k/7" and s.answer == "B" and s.options == ("x", "y", "z", "w")
    assert s.cycle == "cycle1" and s.category == "single" and (s.width, s.height) == (80, 60)
    assert s.load_image().getpixel((0, 0)) == (1, 2, 3)


def test_hrbench_keeps_option_texts_that_look_missing(tmp_path):
    lines = [HR_HEADER, f"1\tWhich?\tD\tcross\tNone\tNA\tnull\tn/a\tcycle2\t{_b64_png()}",
             f"2\tWhich?\tB\tsingle\tNaN\tNULL\t#N/A\tnan\tcycle3\t{_b64_png()}"]
    (tmp_path / "hr_bench_8k.tsv").write_text("\n".join(lines) + "\n")
    a, b = load_samples(tmp_path / "hr_bench_8k.tsv")
    assert a.options == ("None", "NA", "null", "n/a") and a.answer == "D"
    assert b.options == ("NaN", "NULL", "#N/A", "nan") and b.answer == "B"


def test_hrbench_images_stay_in_the_file_until_used(tmp_path):
    rows = [f"{i}\tQ{i}?\tA\tsingle\ta\tb\tc\td\tcycle1\t{_b64_png((64 + i, 48), (i, 0, 0))}" for i in range(5)]
    (tmp_path / "hr_bench_4k.tsv").write_text(HR_HEADER + "\n" + "\n".join(rows) + "\n")
    ds = load_samples(tmp_path / "hr_bench_4k.tsv")
    assert len(ds) == 5
    for i, s in enumerate(ds):
        assert len(s.image) < 300, "a sample holds a reference into the file, not the image"
        img = s.load_image()
        assert img.size == (64 + i, 48) and img.getpixel((0, 0)) == (i, 0, 0)


def test_hrbench_bad_rows_are_skipped_by_line(tmp_path):
    lines = [HR_HEADER, f"1\tQ?\tA\tsingle\ta\tb\tc\td\tcycle1\t{_b64_png()}",
             "2\tQ?\tA\tsingle\ta\tb",  # too few fields
             "3\tQ?\tA\tsingle\ta\tb\tc\td\tcycle1\tnot-an-image",
             f"4\tQ?\tA\tsingle\ta\tb\tc\td\tcycle1\t{_b64_png()}"]
    (tmp_path / "hr_bench_4k.tsv").write_text("\n".join(lines) + "\n")
    ds = load_samples(tmp_path / "hr_bench_4k.tsv")
    assert [s.id for s in ds] == ["hrbench_4k/1", "hrbench_4k/4"]
    reasons = dict(ds.skipped)
    assert "6 fields" in reasons["line-3"] and "decode" in reasons["hrbench_4k/3"]


def test_hrbench_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    png = base64.b64decode(_b64_png((90, 70), (9, 8, 7)))
    table = pa.table({"index": [0, 1], "question": ["Q?", "R?"], "answer": ["A", "C"], "category": ["single"] * 2,
                      "A": ["None", "x"], "B": ["NA", "y"], "C": ["b", "z"], "D": ["c", "w"],
                      "cycle_category": ["cycle1", "cycle2"],
                      "image": [{"bytes": png, "path": None}, {"bytes": png, "path": None}]})
    pq.write_table(table, tmp_path / "hr_bench_4k.parquet", row_group_size=1)
    ds = load_samples(tmp_path / "hr_bench_4k.parquet")
    assert [s.id for s in ds] == ["hrbench_4k/0", "hrbench_4k/1"] and ds[0].options == ("None", "NA", "b", "c")
    assert ds[1].load_image().getpixel((0, 0)) == (9, 8, 7) and ds[1].cycle == "cycle2"


@pytest.mark.parametrize("content", [
    json.dumps([{"index": 1, "question": "Q?", "answer": "A"}]),
    json.dumps([{"index": 1, "question": "Q?", "answer": "A"}], indent=1),
    "just some text\nand more\n",
])
def test_a_file_named_tsv_that_is_not_one_says_so(tmp_path, content):
    (tmp_path / "hr_bench_4k.tsv").write_text(content)
    ds = load_samples(tmp_path / "hr_bench_4k.tsv")
    assert len(ds) == 0 and len(ds.skipped) == 1, ds.skipped
    assert ds.skipped[0][0] == "hr_bench_4k.tsv" and "not an HR-Bench TSV" in ds.skipped[0][1]
    if content.startswith("["):
        assert "reads as JSON" in ds.skipped[0][1]
