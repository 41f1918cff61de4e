"""The synthetic set is deterministic, V*-shaped, and needs the crop to be read."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from mgpo.tools.synth import build_synth

TINY_MIN, TINY_MAX = 64 * 28 * 28, 256 * 28 * 28  # the tiny config's pixel budget


def _records(root, split="train"):
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def test_deterministic_from_seed(synth_dir, tmp_path):
    again = tmp_path / "again"
    build_synth(again, n=12, seed=0, split="train")
    a, b = _records(synth_dir), _records(again)
    assert a == b
    for ra in a:
        pa = np.asarray(Image.open(synth_dir / ra["image"]))
        pb = np.asarray(Image.open(again / ra["image"]))
        assert hashlib.sha1(pa.tobytes()).digest() == hashlib.sha1(pb.tobytes()).digest()
    other = tmp_path / "other"
    build_synth(other, n=12, seed=1, split="train")
    assert _records(other) != a


def test_shape_of_the_set(synth_dir):
    recs = _records(synth_dir)
    cats = {r["category"] for r in recs}
    assert cats == {"direct_attributes", "relative_position"}
    for r in recs:
        img = Image.open(synth_dir / r["image"])
        w, h = img.size
        assert (w, h) == (r["width"], r["height"])
        assert 1500 <= max(w, h) <= 4000
        n_opt = 4 if r["category"] == "direct_attributes" else 2
        assert len(r["options"]) == n_opt
        assert r["answer"] in "ABCD"[:n_opt]
        assert len(r["target_boxes"]) == (1 if r["category"] == "direct_attributes" else 2)
        for x1, y1, x2, y2 in r["target_boxes"]:
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert (x2 - x1) * (y2 - y1) < 0.01 * w * h


def test_relative_position_answer_matches_geometry(synth_dir):
    for r in _records(synth_dir):
        if r["category"] != "relative_position":
            continue
        (a, _, b, _), (c, _, d, _) = r["target_boxes"]
        truth = "left" if (a + b) / 2 < (c + d) / 2 else "right"
        assert r["options"]["AB".index(r["answer"])] == truth


def _saturation(arr):
    arr = arr.astype(np.int32)
    return arr.max(-1) - arr.min(-1)  # grey background ~0, coloured strokes high


@pytest.mark.parametrize("index", range(12))
def test_target_unreadable_downscaled_readable_in_crop(synth_dir, index):
    """Colour contrast of the target: gone after Qwen's down-scale, kept in an enlarged crop."""
    r = _records(synth_dir)[index]
    img = Image.open(synth_dir / r["image"]).convert("RGB")
    W, H = img.size
    h, w = smart_resize(H, W, 28, TINY_MIN, TINY_MAX)
    small = img.resize((w, h), Image.BICUBIC)
    for x1, y1, x2, y2 in r["target_boxes"]:
        original = _saturation(np.asarray(img.crop((x1, y1, x2, y2)))).max()
        sx, sy = w / W, h / H
        region = (int(x1 * sx), int(y1 * sy), int(np.ceil(x2 * sx)), int(np.ceil(y2 * sy)))
        downscaled = _saturation(np.asarray(small.crop(region))).max()
        m = x2 - x1  # a crop with one target-width of context on each side
        crop = img.crop((x1 - m, y1 - m, x2 + m, y2 + m))
        ch, cw = smart_resize(crop.height, crop.width, 28, TINY_MIN, TINY_MAX)
        enlarged = _saturation(np.asarray(crop.resize((cw, ch), Image.BICUBIC))).max()
        assert original > 120, "targets are drawn in saturated colours"
        assert downscaled < 0.5 * original, (downscaled, original)
        assert enlarged > 0.8 * original, (enlarged, original)
