"""A data file replaced by another must be read anew, even when its modification time is unchanged."""

import json
import os

from PIL import Image

from mgpo.data.samples import load_samples


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
