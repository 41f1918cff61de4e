"""Datasets: one record type (`Sample`), its validation, and the project's own JSONL format.

Formats (``load_samples(path, fmt="auto")``):

- ``jsonl``: the project's own, written by ``mgpo.synth``: one JSON object per line with
  id, image (relative to the file), question, options, answer, category, target_boxes.
- ``chat``: conversations for SFT (``train.algorithm: sft``), one per line:
  ``{"id": ..., "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
  {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}, ...]}``, the
  chat layout of Hugging Face processors. ``content`` is a text or a list of parts; image
  paths are relative to the file; roles: an optional first ``system``, then ``user`` and
  ``assistant`` in turn, ending with ``assistant``. Every assistant message is a target.
- ``vstar``, ``mme_realworld``, ``hrbench``: the published benchmark layouts, read by
  ``mgpo.benchmarks`` (V* from ``test_questions.jsonl``, MME-RealWorld(-Lite) from its JSON
  list, HR-Bench from its TSV or parquet file, streamed).

Every reader yields raw records; ``_validate`` checks each field's type and shape and turns
a record into a `Sample`. A record that cannot be used (a line that is not JSON, a field of
the wrong type, a missing or unreadable image, an answer that is not one of the options, a
duplicate id) is skipped with its id and reason, logged with the file and line, and
counted; one bad record never stops a load, and a file with no usable record gives an
empty set whose skip list names every record. Images (``mgpo.images``) are decoded only
when used: an image embedded in a benchmark file is referenced by its place in the file and
read back then.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .images import MAX_ASPECT, MIN_SIDE, BadImageError, _image_size, load_image  # noqa: F401 - re-exported
from .prompts import LETTERS

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "chat", "vstar", "mme_realworld", "hrbench")


@dataclass(frozen=True)
class Sample:
    """One multiple-choice question about one image."""

    id: str
    image: str
    """A file path, ``base64:<data>``, or a reference into a benchmark file
    (``tsv:<offset>:<column>:<path>``, ``parquet:<row>:<column>:<path>``) read when used."""
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
    breakdown: tuple[str, ...] = ()
    """The benchmark's own score hierarchy, e.g. (Task, Subtask, Category) for MME-RealWorld."""
    cycle: str = ""
    """HR-Bench's ``cycle_category``: which rotation of the options this row is."""
    messages: tuple = ()
    """A ``chat`` record (SFT only): ((role, ((kind, value), ...)), ...) with kind "text" or
    "image" (a path; ``image`` above is the first one). Empty for a question record."""

    def load_image(self) -> Image.Image:
        return load_image(self.image, self.id)


# ----------------------------------------------------------------------------- records

def normalize_letter(value: object) -> str | None:
    """'A', 'a', '(A)', 'A.' or 'A) text' -> 'A'; anything else -> None."""
    m = re.match(r"^\s*[\(（]?([A-Za-z])\s*[\).:）]?(\s|$)", str(value))
    return m.group(1).upper() if m else None


def _kind(value: object) -> str:
    """How a JSON value reads in a message: 'null', 'a string', 'a list', ..."""
    if value is None:
        return "null"
    names = {bool: "true/false", str: "a string", int: "a number", float: "a number", list: "a list",
             tuple: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _text(value: object, name: str, required: bool = True) -> str:
    """A field that must be a text (a number is accepted and written as text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None and not required:
        return ""
    raise ValueError(f"{name} must be a text, got {_kind(value)}")


def _boxes(value: object) -> tuple[tuple[float, float, float, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"target_boxes must be a list of [x1, y1, x2, y2], got {_kind(value)}")
    out = []
    for i, box in enumerate(value):
        ok = (isinstance(box, (list, tuple)) and len(box) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box))
        if not ok or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"target_boxes[{i}] must be 4 finite numbers x1 <= x2, y1 <= y2, got {box!r:.80}")
        out.append(tuple(float(v) for v in box))
    return tuple(out)


def _validate(rec: dict) -> dict:
    """Check each field's type and shape; return the fields of a `Sample` or raise ValueError(reason)."""
    question = _text(rec.get("question"), "question")
    if not question.strip():
        raise ValueError("empty question")
    options = rec.get("options")
    if not isinstance(options, (list, tuple)):
        raise ValueError(f"options must be a list of texts, got {_kind(options)}")
    options = tuple(_text(o, f"options[{i}]") for i, o in enumerate(options))
    if len(options) < 2:
        raise ValueError(f"needs at least two options, got {len(options)}")
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options, more than the {len(LETTERS)} letters A-Z")
    answer = rec.get("answer")
    letter = normalize_letter(answer) if isinstance(answer, str) else None
    if letter is None or LETTERS.index(letter) >= len(options):
        raise ValueError(f"answer {answer!r} is not one of the {len(options)} options")
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("no image" if not image else f"image must be a path, got {_kind(image)}")
    return {"image": image, "question": question, "options": options, "answer": letter,
            "category": _text(rec.get("category"), "category", required=False),
            "target_boxes": _boxes(rec.get("target_boxes")),
            "breakdown": tuple(str(x) for x in rec.get("breakdown", ())), "cycle": str(rec.get("cycle", ""))}


ROLES = ("system", "user", "assistant")


def _chat_part(part: object, where: str) -> tuple[str, str]:
    if isinstance(part, str):
        return ("text", part)
    if not isinstance(part, dict):
        raise ValueError(f"{where} must be a text or an object, got {_kind(part)}")
    kind = part.get("type")
    if kind == "text":
        return ("text", _text(part.get("text"), f"{where}.text"))
    if kind == "image":
        image = part.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}.image must be a path, got {_kind(image)}")
        return ("image", image)
    raise ValueError(f"{where}.type must be \"text\" or \"image\", got {kind!r:.40}")


def _validate_chat(rec: dict) -> dict:
    """A ``chat`` record's fields, checked: roles in order, every part a text or an image."""
    raw = rec.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"messages must be a non-empty list, got {_kind(raw)}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {_kind(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r:.40}")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list) or not parts:
            raise ValueError(f"messages[{i}].content must be a text or a non-empty list of parts")
        parts = tuple(_chat_part(p, f"messages[{i}].content[{j}]") for j, p in enumerate(parts))
        if role == "assistant" and any(kind != "text" for kind, _ in parts):
            raise ValueError(f"messages[{i}]: an assistant message holds text only (it is the target)")
        messages.append((role, parts))
    roles = [r for r, _ in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body != ["user", "assistant"] * (len(body) // 2):
        raise ValueError(f"roles must be an optional system, then user and assistant in turn, ending with "
                         f"assistant; got {', '.join(roles)}")
    images = [v for _, parts in messages for kind, v in parts if kind == "image"]
    if not images:
        raise ValueError("a chat record needs at least one image")
    texts = [v for r, parts in messages if r == "user" for kind, v in parts if kind == "text"]
    return {"image": images[0], "question": texts[0] if texts else "", "options": (), "answer": "", "messages": tuple(messages),
            "category": _text(rec.get("category"), "category", required=False)}


@dataclass(frozen=True)
class Raw:
    """One record as a reader found it: where it is in the file, its fields, or why it is unusable."""

    where: str  # "line 12", "record 3", "row 7": for messages
    fields: dict | None = None
    problem: str | None = None


@dataclass
class SampleSet:
    """The usable records of one dataset, plus what was skipped and why."""

    name: str
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[int(i)]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def summary(self) -> str:
        reasons = Counter(r.split(" (")[0].split(":")[0] for _, r in self.skipped)
        text = f"{self.name}: {len(self)} usable records, {len(self.skipped)} skipped"
        if reasons:
            text += " (" + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()) + ")"
        return text


def _record_id(raw: Raw, derived: list[str]) -> str:
    rid = (raw.fields or {}).get("id")
    if rid is None or rid == "":
        derived.append(raw.where)
        return raw.where.replace(" ", "-")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError(f"id must be a text or a number, got {_kind(rid)}")
    return str(rid)


def _sample(raw: Raw, rid: str, name: str, check_images: bool) -> Sample:
    fields = _validate_chat(raw.fields) if "messages" in raw.fields else _validate(raw.fields)
    width, height = raw.fields.get("width", 0), raw.fields.get("height", 0)
    if raw.fields.get("image_error"):
        raise ValueError(raw.fields["image_error"])
    for _, parts in fields.get("messages", ()) if check_images else ():  # a chat's other images
        for kind, image in parts:
            if kind == "image" and image != fields["image"]:
                try:
                    _image_size(image, rid)
                except BadImageError as e:
                    raise ValueError(str(e).split(": ", 1)[-1]) from e
    if check_images and not width:
        try:
            width, height = _image_size(fields["image"], rid)
        except BadImageError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from e
    if width and max(width, height) / max(1, min(width, height)) >= MAX_ASPECT:
        raise ValueError(f"aspect ratio {max(width, height) / max(1, min(width, height)):.0f}:1 beyond Qwen's 200:1")
    return Sample(id=rid, dataset=name, width=width, height=height, **fields)


def _finish(name: str, source: Path, raws: Iterator[Raw], check_images: bool, max_samples: int) -> SampleSet:
    """Validate every raw record; keep the good ones, list the rest with their reasons."""
    samples, skipped, derived, first_seen = [], [], [], {}
    for raw in raws:
        rid = raw.where.replace(" ", "-")
        try:
            if raw.fields is not None:
                rid = _record_id(raw, derived)
            if raw.problem is not None:
                raise ValueError(raw.problem)
            if rid in first_seen:
                raise ValueError(f"duplicate id (first at {first_seen[rid]}); kept the first")
            sample = _sample(raw, rid, name, check_images)
        except (ValueError, RecursionError) as e:
            skipped.append((rid, str(e)))
            log.warning("skipping %s, %s (id %s): %s", source, raw.where, rid, e)
            continue
        first_seen[rid] = raw.where
        samples.append(sample)
        if max_samples and len(samples) >= max_samples:
            break
    if derived:
        log.warning("%s: %d record(s) without an id got one from their place in the file (%s)", source,
                    len(derived), ", ".join(derived[:5]) + (", ..." if len(derived) > 5 else ""))
    out = SampleSet(name, samples, skipped, str(source))
    if not samples:
        log.warning("no usable records in %s (%d skipped)", source, len(skipped))
    log.info(out.summary())
    return out


# ----------------------------------------------------------------------------- the project's JSONL

def jsonl_objects(path: Path) -> Iterator[Raw]:
    """One `Raw` per non-blank line, read one line at a time; a broken line is one skipped record."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"line {lineno}"
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is not data
            except UnicodeDecodeError as e:
                yield Raw(where, problem=f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
                continue
            try:
                obj = json.loads(text)
            except RecursionError:
                yield Raw(where, problem="JSON nested too deeply")
                continue
            except ValueError as e:
                yield Raw(where, problem=f"not JSON ({e})")
                continue
            if not isinstance(obj, dict):
                yield Raw(where, problem=f"expected a JSON object, got {_kind(obj)}")
                continue
            yield Raw(where, obj)


def resolve(path_text: object, base: Path) -> object:
    """An image path relative to ``base`` (absolute paths and non-texts pass through)."""
    if isinstance(path_text, str) and path_text and not Path(path_text).is_absolute():
        return str(base / path_text)
    return path_text


def _chat_records(path: Path, image_root: Path | None) -> Iterator[Raw]:
    """The ``chat`` format: image paths inside the messages resolved against the file's folder."""
    for raw in jsonl_objects(path):
        for m in (raw.fields or {}).get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and part.get("type") == "image":
                    part["image"] = resolve(part.get("image"), image_root or path.parent)
        yield raw


def _jsonl_records(path: Path, image_root: Path | None) -> Iterator[Raw]:
    for raw in jsonl_objects(path):
        if raw.fields is not None:
            raw.fields["image"] = resolve(raw.fields.get("image"), image_root or path.parent)
        yield raw


# ----------------------------------------------------------------------------- entry point

def _first_has_messages(path: Path) -> bool:
    first = next(jsonl_objects(path), None)
    return first is not None and first.fields is not None and "messages" in first.fields


def detect_format(path: Path) -> str:
    from .benchmarks import is_vstar_listing, parquet_format

    if path.is_dir():
        return "vstar"
    if path.suffix == ".tsv":
        return "hrbench"
    if path.suffix == ".parquet":
        return parquet_format(path)
    if path.suffix == ".jsonl":
        return "vstar" if is_vstar_listing(path) else "chat" if _first_has_messages(path) else "jsonl"
    if path.suffix == ".json":
        return "mme_realworld"
    raise ValueError(f"cannot tell the format of {path}; pass fmt= one of {', '.join(FORMATS)}")


def load_samples(path: str | Path, fmt: str = "auto", *, image_root: str | Path | None = None,
                 check_images: bool = True, max_samples: int = 0, name: str | None = None) -> SampleSet:
    """Read a dataset in any supported format; bad records are skipped and listed.

    ``image_root`` overrides where relative image paths are resolved (default: where the
    format's published layout puts them).
    """
    from . import benchmarks

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    root = Path(image_root) if image_root else None
    readers = {
        "jsonl": lambda: _jsonl_records(path, root),
        "chat": lambda: _chat_records(path, root),
        "vstar": lambda: benchmarks.vstar_records(path, root),
        "mme_realworld": lambda: benchmarks.mme_records(path, root),
        "hrbench": lambda: benchmarks.hrbench_records(path),
    }
    if fmt not in readers:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {sorted(readers)}")
    return _finish(name or path.stem, path, readers[fmt](), check_images, max_samples)


def drop_long_prompts(data: SampleSet, count_tokens, limit: int) -> SampleSet:
    """Move every sample whose prompt is over ``limit`` tokens (``count_tokens(sample)``) to the
    skip list. Training filters once at load: a prompt dropped mid-batch would leave one rank
    with fewer groups than the others."""
    if not limit:
        return data
    kept = []
    for s in data:
        if problem := prompt_length_problem(count_tokens(s), limit):
            data.skipped.append((s.id, problem))
            log.warning("skipping %s, record %s: %s", data.source, s.id, problem)
        else:
            kept.append(s)
    return SampleSet(data.name, kept, data.skipped, data.source)


def prompt_length_problem(n_tokens: int, limit: int) -> str | None:
    """Why a prompt of ``n_tokens`` (text and image tokens) is refused, or None.

    ``limit`` is ``data.max_prompt_tokens`` (0 = no limit); checked once the prompt is
    tokenized, so a 50,000-character question is skipped and counted instead of
    reaching the model.
    """
    if limit and n_tokens > limit:
        return f"prompt has {n_tokens} tokens, over data.max_prompt_tokens ({limit})"
    return None
