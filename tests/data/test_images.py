"""mgpo.data.images: decoding any image into RGB, and its size from the header alone."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mgpo.data.images import BadImageError, image_size, load_image
from mgpo.data.samples import load_samples


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rec(i, image, **kw):
    rec = {"id": f"r{i}", "image": image, "question": "What colour?", "options": ["red", "blue"],
           "answer": "A", "category": "c"}
    rec.update(kw)
    return rec


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


@pytest.mark.parametrize("size, ok", [((1, 200), True), ((200, 1), True), ((5, 1000), True), ((1, 201), False),
                                      ((1000, 4), False)])
def test_aspect_ratio_200_is_accepted_above_is_refused(tmp_path, size, ok):
    """Qwen's smart_resize refuses a long/short side ratio above 200, not 200 itself."""
    Image.new("RGB", size).save(tmp_path / "a.png")
    rec = {"id": "a", "image": str(tmp_path / "a.png"), "question": "q?", "options": ["x", "y"], "answer": "A"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    data = load_samples(tmp_path / "d.jsonl")
    if ok:
        assert len(data) == 1 and load_image(str(tmp_path / "a.png")).size == size
    else:
        assert len(data) == 0 and "aspect ratio" in data.skipped[0][1]
        with pytest.raises(BadImageError, match="aspect ratio"):
            load_image(str(tmp_path / "a.png"))
