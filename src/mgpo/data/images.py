"""Images: decoding any file or embedded image into the RGB the processor expects, and
reading its size from the header alone.

A source is a file path, ``base64:<data>``, or a reference into a benchmark file
(``tsv:<offset>:<column>:<path>``, ``parquet:<row>:<column>:<path>``, see
``mgpo.data.benchmarks``) that is read back only when the image is used. Anything that cannot
be used raises `BadImageError` naming the record and the reason.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image, ImageOps

from .tables import read_embedded

MAX_ASPECT = 200.0  # Qwen's smart_resize refuses a long/short ratio above this (200 itself is fine)
HEADER_B64_CHARS = 1 << 16  # base64 decoded to read an embedded image's header (48 KiB of bytes)


class BadImageError(ValueError):
    """An image that cannot be used; the message names the record and the reason."""


def _embedded_bytes(source: str, sample_id: str) -> bytes:
    """The raw bytes of an image stored inside a file (base64 text or a benchmark-file reference)."""
    if source.startswith("base64:"):
        text = source[len("base64:"):]
    else:
        try:
            value = read_embedded(source)
        except (OSError, ValueError, IndexError) as e:
            raise BadImageError(f"{sample_id}: cannot read the embedded image ({e})") from e
        if isinstance(value, bytes):
            return value
        text = value
    try:
        return base64.b64decode(text, validate=False)
    except (ValueError, TypeError) as e:
        raise BadImageError(f"{sample_id}: embedded image is not valid base64 ({e})") from e


def is_embedded(source: str) -> bool:
    return source.startswith(("base64:", "tsv:", "parquet:"))


def _open(source: str, sample_id: str) -> Image.Image:
    if is_embedded(source):
        raw = _embedded_bytes(source, sample_id)
        if not raw:
            raise BadImageError(f"{sample_id}: embedded image is empty")
        stream: io.BytesIO | str = io.BytesIO(raw)
    else:
        path = Path(source)
        if not path.is_file():
            raise BadImageError(f"{sample_id}: image file not found: {source}")
        if path.stat().st_size == 0:
            raise BadImageError(f"{sample_id}: image file is empty (0 bytes): {source}")
        stream = source
    try:
        return Image.open(stream)
    except Exception as e:  # PIL raises several types for bad data
        raise BadImageError(f"{sample_id}: cannot decode image {source[:80]} ({e})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency on white, 16-bit and float scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit greyscale: stretch the actual range into 0..255.
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def load_image(source: str, sample_id: str = "?") -> Image.Image:
    """Decode an image fully: EXIF orientation applied, RGB, at its own size.

    An image with a side under 28 px is left as it is: the processor's ``smart_resize`` (Qwen's
    rule) enlarges it into the pixel budget, and ``prompt_tokens`` predicts that same size."""
    img = _open(source, sample_id)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    except BadImageError:
        raise
    except Exception as e:
        raise BadImageError(f"{sample_id}: cannot decode image {source[:80]} ({e})") from e
    w, h = img.size
    if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
        raise BadImageError(f"{sample_id}: aspect ratio {max(w, h) / min(w, h):.1f}:1 is beyond "
                            f"Qwen's {MAX_ASPECT:.0f}:1 limit ({w}x{h})")
    return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored). PIL looks for a PNG's eXIf chunk behind the
    pixel data by decoding the whole image; this reads only an eXIf chunk ahead of the pixels
    (where writers put it), so a size check stays a header read."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return img.getexif().get(0x0112, 1)


def _header_size(img: Image.Image, sample_id: str) -> tuple[int, int]:
    try:
        w, h = img.size
        orientation = _orientation(img)
    except Exception as e:
        raise BadImageError(f"{sample_id}: cannot read image header ({e})") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def image_size(source: str, sample_id: str) -> tuple[int, int]:
    """Width and height from the header only (cheap), after EXIF rotation."""
    return _header_size(_open(source, sample_id), sample_id)


def embedded_size(data: str | bytes, sample_id: str) -> tuple[int, int]:
    """Width and height of an embedded image (base64 text or bytes), decoding only its head.

    A JPEG or PNG header sits in the first few KiB; if it is not in the head, decode it all.
    """
    for head in (data[:HEADER_B64_CHARS], data):
        try:
            raw = head if isinstance(head, bytes) else base64.b64decode(head, validate=False)
            if not raw:
                raise BadImageError(f"{sample_id}: embedded image is empty")
            return _header_size(Image.open(io.BytesIO(raw)), sample_id)
        except BadImageError:
            raise
        except Exception as e:  # noqa: PERF203 - a header beyond the head: try the whole image
            problem = e
    raise BadImageError(f"{sample_id}: cannot decode the embedded image ({problem})")
