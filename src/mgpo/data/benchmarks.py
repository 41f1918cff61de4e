"""The published benchmark layouts, read as they ship (checked against each benchmark's own
repository and dataset card).

- **V***: ``test_questions.jsonl`` (191 questions) beside one folder per category; each line
  holds ``text`` (the question, then ``(A) ...`` option lines in the published order),
  ``image``, ``category``, ``question_id`` and ``label`` (the correct letter). Target boxes
  come from each image's ``<stem>.json`` (``bbox`` as ``[x, y, w, h]``). Only the listed
  questions are read, so the supplementary ``GPT4V-hard/`` and ``OCR/`` folders are never
  counted. The lmms-eval parquet re-upload (same columns, image embedded) reads too.
- **MME-RealWorld** (full and Lite): one JSON list. ``Image`` is relative to the folder
  holding the extracted archives (full set) or a bare name under ``imgs/`` beside the JSON
  (Lite); ``image_root`` overrides both. Task, Subtask and Category are kept for the
  official breakdown.
- **HR-Bench**: a TSV of up to 4.6 GB with a base64 image per row, read one row at a time;
  each sample keeps the row's byte offset and its image is read back and decoded only when
  used. Every field is read as text (``None``, ``NA`` and ``null`` are option texts). The
  published parquet copies read the same way, one row group at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from .images import embedded_size
from .records import LETTERS, Raw, jsonl_objects, kind_of, resolve
from .tables import image_value, parquet_rows, tsv_header, tsv_rows

_OPTION_LINE = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape kept from a non-UTF-8 line


# ----------------------------------------------------------------------------- V*

def split_vstar_text(text: object) -> tuple[str, list[str]]:
    """V*'s ``text`` -> (question, options in their published order).

    >>> split_vstar_text("What is the color of the cup?\\n(A) red\\n(B) blue\\nAnswer with the option's letter.")
    ('What is the color of the cup?', ['red', 'blue'])
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a text, got {kind_of(text)}")
    lines = text.split("\n")
    first = next((i for i, line in enumerate(lines) if _OPTION_LINE.match(line)), None)
    if first is None:
        raise ValueError("text holds no '(A) ...' option lines")
    options = []
    for line in lines[first:]:
        m = _OPTION_LINE.match(line)
        if not m:
            break  # the closing instruction
        if m.group(1) != LETTERS[len(options)]:
            raise ValueError(f"option ({m.group(1)}) out of order in text")
        options.append(m.group(2).strip())
    return "\n".join(lines[:first]).strip(), options


def _vstar_boxes(annotation: Path) -> list[list[float]] | None:
    """Target boxes (x1, y1, x2, y2) from an image's ``<stem>.json``; None when there is none."""
    if not annotation.is_file():
        return None
    try:
        info = json.loads(annotation.read_text(encoding="utf-8"))
        return [[x, y, x + w, y + h] for x, y, w, h in info.get("bbox") or []]
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"annotation {annotation.name} is unreadable ({e})") from e


def _vstar_raw(where: str, obj: dict, image: object, annotation: Path | None) -> Raw:
    try:
        question, options = split_vstar_text(obj.get("text"))
        boxes = _vstar_boxes(annotation) if annotation is not None else None
    except ValueError as e:
        return Raw(where, {"id": obj.get("question_id")}, str(e))
    return Raw(where, {"id": obj.get("question_id"), "image": image, "question": question, "options": options,
                       "answer": obj.get("label"), "category": obj.get("category"), "target_boxes": boxes})


def is_vstar_listing(path: Path) -> bool:
    """A ``.jsonl`` in V*'s published shape (``text`` + ``label``) rather than the project's own."""
    if path.name == "test_questions.jsonl":
        return True
    first = next((raw for raw in jsonl_objects(path) if raw.fields is not None), None)
    return first is not None and {"text", "label"} <= set(first.fields) and "options" not in first.fields


def vstar_records(path: Path, image_root: Path | None = None) -> Iterator[Raw]:
    """V* from its folder (or ``test_questions.jsonl`` itself, or the lmms-eval parquet)."""
    if path.suffix == ".parquet":
        yield from _vstar_parquet(path)
        return
    listing = path / "test_questions.jsonl" if path.is_dir() else path
    if not listing.is_file():
        raise FileNotFoundError(f"{path}: no test_questions.jsonl, the list of V*'s 191 questions in the published "
                                "snapshot; point data at the folder that holds it")
    root = image_root or listing.parent
    for raw in jsonl_objects(listing):
        if raw.fields is None:
            yield raw
            continue
        image = resolve(raw.fields.get("image"), root)
        annotation = Path(image).with_suffix(".json") if isinstance(image, str) and image else None
        yield _vstar_raw(raw.where, raw.fields, image, annotation)


def _vstar_parquet(path: Path) -> Iterator[Raw]:
    for row, rec in parquet_rows(path):
        raw = _vstar_raw(f"row {row}", rec, f"parquet:{row}:image:{path}", None)
        yield _with_embedded_size(raw, rec.get("image"))


# ----------------------------------------------------------------------------- MME-RealWorld

def _strip_option_label(text: object) -> object:
    """'(A) red' or '（A）red' -> 'red' (MME-RealWorld writes the letter into each choice)."""
    return re.sub(r"^\s*[\(（]\s*[A-Za-z]\s*[\)）]\s*", "", text).strip() if isinstance(text, str) else text


def mme_image(json_path: Path, image_root: Path | None, image: object) -> object:
    """Where the published layouts put an image: relative to the archives' folder (full
    set) or under ``imgs/`` beside the JSON (Lite); the first candidate that exists."""
    if not isinstance(image, str) or not image:
        return image
    base = image_root or json_path.parent
    candidates = [base / image, base / "imgs" / image, base / "imgs" / Path(image).name, base / Path(image).name]
    return str(next((c for c in candidates if c.is_file()), candidates[0]))


def mme_records(path: Path, image_root: Path | None = None) -> Iterator[Raw]:
    try:
        rows = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        yield Raw("file", {"id": path.name}, f"not a valid JSON file ({e})")
        return
    if not isinstance(rows, list):
        yield Raw("file", {"id": path.name}, f"expected a JSON list of records, got {kind_of(rows)}")
        return
    for i, row in enumerate(rows):
        where = f"record {i}"
        if not isinstance(row, dict):
            yield Raw(where, problem=f"expected an object, got {kind_of(row)}")
            continue
        choices = row.get("Answer choices", row.get("Answer Choices"))
        level = [row.get(k) for k in ("Task", "Subtask", "Category")]
        yield Raw(where, {
            "id": row.get("Question_id", row.get("Question id")),
            "image": mme_image(path, image_root, row.get("Image")),
            "question": row.get("Text"),
            "options": [_strip_option_label(c) for c in choices] if isinstance(choices, list) else choices,
            "answer": row.get("Ground truth", row.get("Ground Truth")),
            "category": "/".join(str(x) for x in level[:2] if x),
            "breakdown": [str(x) for x in level if x],
        })


# ----------------------------------------------------------------------------- HR-Bench


def _with_embedded_size(raw: Raw, image) -> Raw:
    """Record the image's size from its head now, while the row is in memory (no second read)."""
    if raw.fields is None or raw.problem is not None:
        return raw
    try:
        raw.fields["width"], raw.fields["height"] = embedded_size(image_value(image), str(raw.fields.get("id")))
    except ValueError as e:
        raw.fields["image_error"] = str(e).split(": ", 1)[-1]
    return raw


def _hrbench_raw(name: str, where: str, row: dict, image_ref: str) -> Raw:
    def text(key: str) -> str:  # every field as text: "None" and "NA" are options, not missing values
        value = row.get(key)
        return "" if value is None else str(value)

    options = [text(k) for k in "ABCD" if k in row]
    while options and options[-1] == "":
        options.pop()  # a question with fewer options leaves the last columns empty
    return Raw(where, {"id": f"{name}/{text('index')}", "image": image_ref, "question": text("question"),
                       "options": options, "answer": text("answer"), "category": text("category"),
                       "cycle": text("cycle_category")})


_HRBENCH_COLUMNS = {"index", "question", "answer", "A", "B", "image"}


def _not_hrbench(header: list[str]) -> str:
    first = "\t".join(header)
    looks = " (it reads as JSON: name the file .json/.jsonl or set the format)" if first.lstrip()[:1] in "[{" else ""
    return (f"not an HR-Bench TSV: the first line {first[:60]!r} is not a tab-separated header with the columns "
            f"{', '.join(sorted(_HRBENCH_COLUMNS))}{looks}")


def hrbench_records(path: Path) -> Iterator[Raw]:
    name = "hrbench_8k" if "8k" in path.name.lower() else "hrbench_4k" if "4k" in path.name.lower() else path.stem
    if path.suffix == ".parquet":
        for row, rec in parquet_rows(path):
            raw = _hrbench_raw(name, f"row {row}", rec, f"parquet:{row}:image:{path}")
            yield _with_embedded_size(raw, rec.get("image"))
        return
    header = tsv_header(path)
    if header is not None and not _HRBENCH_COLUMNS <= set(header):
        yield Raw("line 1", {"id": path.name}, _not_hrbench(header))
        return
    for offset, line, header, row in tsv_rows(path):
        where = f"line {line}"
        if isinstance(row, str):
            yield Raw(where, problem=row)
        elif len(row) != len(header):
            yield Raw(where, problem=f"{len(row)} fields, the header has {len(header)}")
        elif any(_NOT_UTF8.search(c) for i, c in enumerate(row) if header[i] != "image"):
            yield Raw(where, problem="not UTF-8")
        else:
            fields = dict(zip(header, row))
            raw = _hrbench_raw(name, where, fields, f"tsv:{offset}:{header.index('image')}:{path}")
            yield _with_embedded_size(raw, fields["image"])


def parquet_format(path: Path) -> str:
    """Which benchmark a parquet file holds, from its columns."""
    import pyarrow.parquet as pq

    names = set(pq.ParquetFile(path).schema_arrow.names)
    if {"A", "B", "answer"} <= names:
        return "hrbench"
    if {"text", "label"} <= names:
        return "vstar"
    raise ValueError(f"cannot tell which benchmark {path} holds (columns {sorted(names)})")


def published_count(path: str | Path, fmt: str) -> tuple[str, int] | None:
    """(benchmark, its published number of questions) for a file or folder in a published
    layout, or None: V* Bench 191, MME-RealWorld-Lite 1,919, HR-Bench 4K or 8K 800 rows each."""
    name = Path(path).name.lower()
    if fmt == "vstar":
        return "V* Bench", 191
    if fmt == "mme_realworld" and "lite" in name:
        return "MME-RealWorld-Lite", 1919
    if fmt == "hrbench":
        return "HR-Bench", 800
    return None
