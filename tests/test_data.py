"""Every loader on a fixture written in its format, and every bad-input case."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mgpo.data.images import BadImageError, image_size, load_image
from mgpo.data.records import normalize_letter
from mgpo.data.samples import load_samples


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


def test_byte_order_marks_are_not_data(tmp_path):
    (tmp_path / "hr_bench_4k.tsv").write_bytes(("\ufeff" + HR_HEADER + f"\n3\tQ?\tA\tsingle\ta\tb\tc\td\tcycle1\t"
                                                f"{_b64_png()}\n").encode())
    assert [s.id for s in load_samples(tmp_path / "hr_bench_4k.tsv")] == ["hrbench_4k/3"]
    good = _jpeg(tmp_path / "g.jpg")
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(_rec(0, str(good))).encode() + b"\n")
    assert [s.id for s in load_samples(tmp_path / "d.jsonl")] == ["r0"]


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

@pytest.mark.parametrize("text, letter", [("A", "A"), ("(c)", "C"), ("B. red", "B"), ("D) x", "D"),
                                          ("red", None), ("", None)])
def test_normalize_letter(text, letter):
    assert normalize_letter(text) == letter


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


def test_truncated_image_fails_at_decode_with_its_id(tmp_path):
    raw = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(raw, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(raw.getvalue()[:600])  # header intact, data cut
    with pytest.raises(BadImageError, match="rec-9"):
        load_image(str(tmp_path / "cut.jpg"), "rec-9")


def test_a_png_size_is_read_from_its_header_without_decoding_the_pixels(tmp_path):
    raw = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(raw, "PNG")
    (tmp_path / "cut.png").write_bytes(raw.getvalue()[:2000])  # header intact, pixel data cut
    assert image_size(str(tmp_path / "cut.png"), "rec-3") == (500, 300)
    with pytest.raises(BadImageError, match="rec-3"):  # the decode itself still fails, with the id
        load_image(str(tmp_path / "cut.png"), "rec-3")
    rotated = Image.new("RGB", (60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "r.png", exif=exif)  # PIL writes the eXIf chunk ahead of the pixels
    assert image_size(str(tmp_path / "r.png"), "r") == (30, 60) == load_image(str(tmp_path / "r.png")).size


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "LA", "L", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
        path = tmp_path / "x.png"
    else:
        img = Image.new("RGB", (64, 64), (10, 200, 30)).convert(mode)
        path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(str(path))
    assert out.mode == "RGB" and out.size == (64, 64)
    if mode == "I;16":  # 16-bit range is stretched, not clipped to white
        arr = np.asarray(out)
        assert arr.min() == 0 and arr.max() == 255


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    img.save(tmp_path / "t.png")
    assert load_image(str(tmp_path / "t.png")).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(str(tmp_path / "r.jpg")).size == (30, 60)
    ds = load_samples(_write_jsonl(tmp_path / "r.jsonl", [_rec(0, "r.jpg")]))
    assert (ds[0].width, ds[0].height) == (30, 60)


def test_tiny_image_is_decoded_at_its_own_size(tmp_path):
    """The processor's smart_resize (Qwen's rule) enlarges it; enlarging it here first would
    give another size than Qwen's and move target boxes given in the file's pixels."""
    Image.new("RGB", (10, 40), (5, 5, 5)).save(tmp_path / "s.png")
    assert load_image(str(tmp_path / "s.png")).size == (10, 40)


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "none.jsonl")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="format"):
        load_samples(tmp_path / "x.csv")
