"""mgpo.data.records: the checks on each record's fields, answer letters, chat records."""

import json

import pytest
from PIL import Image

from mgpo.data.records import normalize_letter
from mgpo.data.samples import load_samples


def _png(path, size=(64, 48), color=(200, 20, 20)):
    Image.new("RGB", size, color).save(path)
    return path


def _rec(i, image, **kw):
    return {"id": f"r{i}", "image": image, "question": "What colour?", "options": ["red", "blue"], "answer": "A",
            **kw}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- records

@pytest.mark.parametrize("change, reason", [
    ({"width": "big", "height": 48}, "width must be a whole number of pixels, got a string"),
    ({"width": 64, "height": [1]}, "height must be a whole number of pixels, got a list"),
    ({"width": -3, "height": 48}, "width must be a whole number of pixels"),
    ({"width": 1.5, "height": 48}, "width must be a whole number of pixels"),
    ({"width": float("nan"), "height": 48}, "width must be a whole number of pixels"),
    ({"width": True, "height": 48}, "width must be a whole number of pixels"),
    ({"width": 64}, "width and height go together"),
    ({"options": ["", ""]}, "options[0] is empty"),
    ({"options": ["red", "  "]}, "options[1] is empty"),
    ({"options": ["red", "red"]}, "options[1] 'red' repeats an earlier option"),
    ({"options": ["red", "blue", " red "]}, "options[2] ' red ' repeats an earlier option"),
    ({"answer": "a red square"}, "answer 'a red square' is not one of the 2 options"),
    ({"answer": "red"}, "answer 'red' is not one of the 2 options"),
    ({"answer": "B is right"}, "answer 'B is right' is not one of the 2 options"),
])
def test_bad_record_fields_are_skipped_with_their_reason(tmp_path, change, reason):
    good = _png(tmp_path / "g.png")
    ds = load_samples(_jsonl(tmp_path / "d.jsonl", [_rec(0, str(good)), _rec(1, str(good), **change)]))
    assert [s.id for s in ds] == ["r0"]
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == "r1" and reason in ds.skipped[0][1], ds.skipped


def test_a_stated_image_size_is_used(tmp_path):
    good = _png(tmp_path / "g.png")
    ds = load_samples(_jsonl(tmp_path / "d.jsonl", [_rec(0, str(good), width=640, height=480.0)]))
    assert (ds[0].width, ds[0].height) == (640, 480)


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("b", "B"), ("(c)", "C"), ("( D )", "D"), ("（B）", "B"), ("A.", "A"), ("A)", "A"), ("A:", "A"),
    ("B. red", "B"), ("D) x", "D"), (" C ", "C"),
    ("a red square", None), ("A red", None), ("red", None), ("", None), ("AB", None), ("(A", None),
])
def test_only_letter_forms_are_answers(text, letter):
    assert normalize_letter(text) == letter


@pytest.mark.parametrize("kind", ["question record in a chat file", "chat record in a question file"])
def test_a_mixed_file_reads_images_beside_the_file_not_the_working_directory(tmp_path, monkeypatch, kind):
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    data.mkdir(), cwd.mkdir()
    _png(data / "x.png", (64, 48))
    _png(cwd / "x.png", (99, 77))  # a same-named file where the process runs: must not be read
    monkeypatch.chdir(cwd)
    chat = {"id": "c", "messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}, "Q?"]},
                                    {"role": "assistant", "content": "A"}]}
    question = _rec(0, "x.png")
    records = [chat, question] if kind.startswith("question") else [question, chat]
    ds = load_samples(_jsonl(data / "d.jsonl", records))
    assert len(ds) == 2, ds.skipped
    for s in ds:
        assert s.image == str(data / "x.png") and (s.width, s.height) == (64, 48)
        assert all(v == str(data / "x.png") for _, parts in s.messages for k, v in parts if k == "image")


def _user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}


GOOD = [
    {"id": "one", "messages": [_user("What colour is it?", "a.png"), {"role": "assistant", "content": "Red."}]},
    {"id": "two", "messages": [{"role": "system", "content": "Be brief."}, _user("First?", "a.png"),
                               {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
                               _user("Second?", "b.png"), {"role": "assistant", "content": "A2 <|im_end|> x"}]},
]
BAD = {
    "assistant first": [{"role": "assistant", "content": "hi"}, _user("q", "a.png")],
    "ends with user": [_user("q", "a.png"), {"role": "assistant", "content": "a"}, _user("q2")],
    "assistant image": [_user("q", "a.png"), {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}],
    "no image": [_user("q"), {"role": "assistant", "content": "a"}],
    "missing image": [_user("q", "gone.png"), {"role": "assistant", "content": "a"}],
    "bad content": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}],
    "bad role": [{"role": "tool", "content": "x"}, _user("q", "a.png"), {"role": "assistant", "content": "a"}],
}


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (120, 160), (30, 30, 200)).save(folder / "b.png")
    rows = GOOD + [{"id": k, "messages": m} for k, m in BAD.items()]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "chat.jsonl"


def test_chat_file_loads_and_every_bad_record_is_named(chat_file):
    data = load_samples(chat_file)  # detected from the first record's "messages"
    assert [s.id for s in data] == ["one", "two"]
    assert data[0].question == "What colour is it?" and data[0].image.endswith("a.png")
    reasons = dict(data.skipped)
    assert set(reasons) == set(BAD)
    assert "ending with assistant" in reasons["assistant first"] and "ending with assistant" in reasons["ends with user"]
    assert "text only" in reasons["assistant image"] and "at least one image" in reasons["no image"]
    assert "gone.png" in reasons["missing image"] or "not found" in reasons["missing image"]
    assert "content" in reasons["bad content"] and "role" in reasons["bad role"]


@pytest.mark.parametrize("text, letter", [("A", "A"), ("(c)", "C"), ("B. red", "B"), ("D) x", "D"),
                                          ("red", None), ("", None)])
def test_normalize_letter(text, letter):
    assert normalize_letter(text) == letter
