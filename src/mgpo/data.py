"""Datasets: one record type (`Sample`) and loaders for every format we read.

Formats (``load_samples(path, fmt="auto")``):

- ``jsonl``: the project's own, written by ``mgpo.synth``: one JSON object per line with
  id, image (relative to the file), question, options, answer, category, target_boxes.
- ``vstar``: the V* Bench folder: ``<root>/<category>/<name>.jpg`` beside ``<name>.json``
  holding ``question``, ``options`` (the correct one first), ``bbox`` ([x, y, w, h] each).
- ``mme_realworld``: the MME-RealWorld(-Lite) JSON list with ``Question_id``, ``Image``,
  ``Text``, ``Answer choices`` ("(A) ..."), ``Ground truth``, ``Task``, ``Subtask``;
  images relative to an image root (the JSON's folder by default).
- ``hrbench``: the HR-Bench TSV: ``index``, ``question``, ``answer``, ``category``,
  ``A`` to ``D`` and ``image`` (base64).

Records are read through ``datasets`` (Arrow-backed, memory-mapped when it caches) and
images are decoded only when used. A record that cannot be used (missing or empty image
file, unreadable header, an answer that is not one of the options, an empty question,
an aspect ratio Qwen refuses) is skipped with its id and reason, and counted; one bad
record never stops a load.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_ASPECT = 200.0  # Qwen's smart_resize refuses a long/short ratio above this
MIN_SIDE = 28  # one 28-px merge block: smaller sides are enlarged before the processor


class BadImageError(ValueError):
    """An image that cannot be used; the message names the record and the reason."""


@dataclass(frozen=True)
class Sample:
    """One multiple-choice question about one image."""

    id: str
    image: str
    """A file path, or ``base64:<data>`` for formats that embed the image."""
    question: str
    options: tuple[str, ...]
    answer: str
    """The correct option's letter."""
    category: str = ""
    target_boxes: tuple[tuple[float, float, float, float], ...] = ()
    """Ground-truth regions (x1, y1, x2, y2) in original-image pixels, when known."""
    dataset: str = ""
    width: int = 0
    height: int = 0

    def load_image(self) -> Image.Image:
        return load_image(self.image, self.id)


# ----------------------------------------------------------------------------- images

def _open(source: str, sample_id: str) -> Image.Image:
    if source.startswith("base64:"):
        try:
            raw = base64.b64decode(source[len("base64:"):], validate=False)
        except (ValueError, TypeError) as e:
            raise BadImageError(f"{sample_id}: embedded image is not valid base64 ({e})") from e
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
    """Decode an image fully: EXIF orientation applied, RGB, short side at least 28 px."""
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
    if max(w, h) / max(1, min(w, h)) >= MAX_ASPECT:
        raise BadImageError(f"{sample_id}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is beyond "
                            f"Qwen's {MAX_ASPECT:.0f}:1 limit ({w}x{h})")
    if min(w, h) < MIN_SIDE:
        # Enlarge (keeping the aspect ratio) so the processor gets at least one merge block.
        s = MIN_SIDE / min(w, h)
        img = img.resize((max(MIN_SIDE, round(w * s)), max(MIN_SIDE, round(h * s))), Image.BICUBIC)
    return img


def _image_size(source: str, sample_id: str) -> tuple[int, int]:
    """Width and height from the header only (cheap), after EXIF rotation."""
    img = _open(source, sample_id)
    try:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    except Exception as e:
        raise BadImageError(f"{sample_id}: cannot read image header ({e})") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# ----------------------------------------------------------------------------- records

def normalize_letter(value: object) -> str | None:
    """'A', 'a', '(A)', 'A.' or 'A) text' -> 'A'; anything else -> None."""
    m = re.match(r"^\s*\(?([A-Za-z])\s*[\).:]?(\s|$)", str(value))
    return m.group(1).upper() if m else None


def _strip_option_label(text: str) -> str:
    """'(A) red' -> 'red' (MME-RealWorld writes the letter into each choice)."""
    return re.sub(r"^\s*\(?[A-Za-z]\)\s*", "", str(text)).strip()


def _check(rec: dict) -> str | None:
    """The reason a normalized record cannot be used, or None."""
    if not str(rec.get("question") or "").strip():
        return "empty question"
    options = rec.get("options") or []
    if len(options) < 2:
        return f"needs at least two options, got {len(options)}"
    letter = normalize_letter(rec.get("answer") or "")
    if letter is None or LETTERS.index(letter) >= len(options):
        return f"answer {rec.get('answer')!r} is not one of the {len(options)} options"
    if not rec.get("image"):
        return "no image"
    return None


@dataclass
class SampleSet:
    """The usable records of one dataset, plus what was skipped and why."""

    name: str
    rows: object  # datasets.Dataset of normalized records
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        r = self.rows[int(i)]
        return Sample(
            id=r["id"], image=r["image"], question=r["question"], options=tuple(r["options"]),
            answer=r["answer"], category=r["category"],
            target_boxes=tuple(tuple(float(v) for v in b) for b in (r["target_boxes"] or [])),
            dataset=self.name, width=r["width"], height=r["height"],
        )

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def summary(self) -> str:
        reasons = Counter(r.split(" (")[0].split(":")[0] for _, r in self.skipped)
        text = f"{self.name}: {len(self)} usable records, {len(self.skipped)} skipped"
        if reasons:
            text += " (" + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()) + ")"
        return text


def _finish(name: str, records: Iterator[dict], check_images: bool, max_samples: int) -> SampleSet:
    from datasets import Dataset

    good, skipped = [], []
    for rec in records:
        rid = str(rec.get("id", "?"))
        reason = _check(rec)
        if reason is None and check_images:
            try:
                rec["width"], rec["height"] = _image_size(rec["image"], rid)
                w, h = rec["width"], rec["height"]
                if max(w, h) / max(1, min(w, h)) >= MAX_ASPECT:
                    reason = f"aspect ratio {max(w, h) / max(1, min(w, h)):.0f}:1 beyond Qwen's 200:1"
            except BadImageError as e:
                reason = str(e).split(": ", 1)[-1]
        if reason is not None:
            skipped.append((rid, reason))
            log.warning("skipping record %s of %s: %s", rid, name, reason)
            continue
        rec["id"] = rid
        rec["answer"] = normalize_letter(rec["answer"])
        rec["options"] = [str(o) for o in rec["options"]]
        rec["category"] = str(rec.get("category") or "")
        rec["target_boxes"] = [[float(v) for v in b] for b in (rec.get("target_boxes") or [])]
        rec.setdefault("width", 0)
        rec.setdefault("height", 0)
        good.append({k: rec[k] for k in ("id", "image", "question", "options", "answer", "category",
                                         "target_boxes", "width", "height")})
        if max_samples and len(good) >= max_samples:
            break
    seen = Counter(r["id"] for r in good)
    dupes = [i for i, n in seen.items() if n > 1]
    if dupes:
        raise ValueError(f"{name}: duplicate record ids {dupes[:5]}; ids must be unique")
    features = None
    if not good:
        from datasets import Features, List, Value

        features = Features({"id": Value("string"), "image": Value("string"), "question": Value("string"),
                             "options": List(Value("string")), "answer": Value("string"),
                             "category": Value("string"), "target_boxes": List(List(Value("float64"))),
                             "width": Value("int64"), "height": Value("int64")})
    out = SampleSet(name, Dataset.from_list(good, features=features), skipped)
    log.info(out.summary())
    return out


def _read_rows(path: Path, builder: str, **kwargs):
    """Rows of a local file through ``datasets``, cached under the file's content hash: the
    default cache key is the path and modification time, so a file replaced by another with
    the same mtime would load the old rows."""
    from datasets import config, load_dataset

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    cache = Path(config.HF_DATASETS_CACHE) / "mgpo-by-content" / digest.hexdigest()[:24]
    return load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache), **kwargs)


def _jsonl_records(path: Path) -> Iterator[dict]:
    for row in _read_rows(path, "json"):
        rec = dict(row)
        image = str(rec.get("image") or "")
        if image and not Path(image).is_absolute():
            image = str(path.parent / image)
        rec["image"] = image
        yield rec


def _vstar_records(root: Path) -> Iterator[dict]:
    for meta in sorted(root.glob("*/*.json")):
        category = meta.parent.name
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            yield {"id": f"{category}/{meta.stem}", "question": "", "_error": str(e)}
            continue
        image = next((p for p in (meta.with_suffix(s) for s in (".jpg", ".jpeg", ".png")) if p.exists()),
                     meta.with_suffix(".jpg"))
        # V* stores the correct option first; present them in an order fixed by the
        # record's name, so the answer letter is not always A and every run agrees.
        options = list(info.get("options") or [])
        order = sorted(range(len(options)),
                       key=lambda i: hashlib.sha1(f"{meta.stem}-{i}".encode()).hexdigest())
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (info.get("bbox") or [])]
        yield {
            "id": f"{category}/{meta.stem}",
            "image": str(image),
            "question": info.get("question", ""),
            "options": [options[i] for i in order],
            "answer": LETTERS[order.index(0)] if options else "",
            "category": category,
            "target_boxes": boxes,
        }


def _mme_records(path: Path, image_root: Path | None) -> Iterator[dict]:
    root = image_root or path.parent
    for row in _read_rows(path, "json"):
        choices = row.get("Answer choices") or row.get("Answer Choices") or []
        yield {
            "id": str(row.get("Question_id") or row.get("Question id") or ""),
            "image": str(root / str(row.get("Image") or "")),
            "question": row.get("Text") or "",
            "options": [_strip_option_label(c) for c in choices],
            "answer": row.get("Ground truth") or row.get("Ground Truth") or "",
            "category": f"{row.get('Task', '')}/{row.get('Subtask', '')}".lower(),
        }


def _hrbench_records(path: Path) -> Iterator[dict]:
    name = "hrbench_8k" if "8k" in path.name.lower() else "hrbench_4k"
    for row in _read_rows(path, "csv", sep="\t"):
        options = [row[k] for k in "ABCD" if row.get(k) not in (None, "")]
        yield {
            "id": f"{name}/{row.get('index')}",
            "image": "base64:" + str(row.get("image") or ""),
            "question": row.get("question") or "",
            "options": [str(o) for o in options],
            "answer": row.get("answer") or "",
            "category": f"{name}/{row.get('category', '')}",
        }


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "vstar"
    if path.suffix == ".tsv":
        return "hrbench"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json":
        return "mme_realworld"
    raise ValueError(f"cannot tell the format of {path}; pass fmt= one of jsonl, vstar, "
                     "mme_realworld, hrbench")


def load_samples(path: str | Path, fmt: str = "auto", *, image_root: str | Path | None = None,
                 check_images: bool = True, max_samples: int = 0, name: str | None = None) -> SampleSet:
    """Read a dataset in any supported format; bad records are skipped and listed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {
        "jsonl": lambda: _jsonl_records(path),
        "vstar": lambda: _vstar_records(path),
        "mme_realworld": lambda: _mme_records(path, Path(image_root) if image_root else None),
        "hrbench": lambda: _hrbench_records(path),
    }
    if fmt not in readers:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {sorted(readers)}")
    return _finish(name or path.stem, readers[fmt](), check_images, max_samples)
