"""Raw records and the checks that turn one into the fields of a `Sample`.

Every reader (the project's JSONL, chat files, the published benchmark layouts) yields
`Raw` records; ``validate`` checks a question record's fields, ``validate_chat`` a chat
record's messages. Each raises ``ValueError`` with the field and the reason, which the
loader records as the record's skip reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters, everywhere in the project


def normalize_letter(value: object) -> str | None:
    """'A', 'a', '(A)', 'A.', 'A:' or 'A) text' -> 'A'; anything else -> None.

    A letter followed by text needs a closing mark between them: "a red square" is a
    sentence, not option A.
    """
    m = re.match(r"^\s*(?:[\(（]\s*([A-Za-z])\s*[\)）]|([A-Za-z])\s*[\).:）]|([A-Za-z])\s*$)", str(value))
    return next(g for g in m.groups() if g).upper() if m else None


def kind_of(value: object) -> str:
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
    raise ValueError(f"{name} must be a text, got {kind_of(value)}")


def _boxes(value: object) -> tuple[tuple[float, float, float, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"target_boxes must be a list of [x1, y1, x2, y2], got {kind_of(value)}")
    out = []
    for i, box in enumerate(value):
        ok = (isinstance(box, (list, tuple)) and len(box) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box))
        if not ok or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"target_boxes[{i}] must be 4 finite numbers x1 <= x2, y1 <= y2, got {box!r:.80}")
        out.append(tuple(float(v) for v in box))
    return tuple(out)


def validate(rec: dict) -> dict:
    """Check each field's type and shape; return the fields of a `Sample` or raise ValueError(reason)."""
    question = _text(rec.get("question"), "question")
    if not question.strip():
        raise ValueError("empty question")
    options = rec.get("options")
    if not isinstance(options, (list, tuple)):
        raise ValueError(f"options must be a list of texts, got {kind_of(options)}")
    options = tuple(_text(o, f"options[{i}]") for i, o in enumerate(options))
    for i, o in enumerate(options):
        if not o.strip():
            raise ValueError(f"options[{i}] is empty")
        if o.strip() in (p.strip() for p in options[:i]):
            raise ValueError(f"options[{i}] {o!r:.40} repeats an earlier option (the answer would be ambiguous)")
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
        raise ValueError("no image" if not image else f"image must be a path, got {kind_of(image)}")
    return {"image": image, "question": question, "options": options, "answer": letter, **image_size_fields(rec),
            "category": _text(rec.get("category"), "category", required=False),
            "target_boxes": _boxes(rec.get("target_boxes")),
            "breakdown": tuple(str(x) for x in rec.get("breakdown", ())), "cycle": str(rec.get("cycle", ""))}


ROLES = ("system", "user", "assistant")


def _chat_part(part: object, where: str) -> tuple[str, str]:
    if isinstance(part, str):
        return ("text", part)
    if not isinstance(part, dict):
        raise ValueError(f"{where} must be a text or an object, got {kind_of(part)}")
    kind = part.get("type")
    if kind == "text":
        return ("text", _text(part.get("text"), f"{where}.text"))
    if kind == "image":
        image = part.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}.image must be a path, got {kind_of(image)}")
        return ("image", image)
    raise ValueError(f"{where}.type must be \"text\" or \"image\", got {kind!r:.40}")


def validate_chat(rec: dict) -> dict:
    """A ``chat`` record's fields, checked: roles in order, every part a text or an image."""
    raw = rec.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"messages must be a non-empty list, got {kind_of(raw)}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {kind_of(m)}")
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
            "category": _text(rec.get("category"), "category", required=False), **image_size_fields(rec)}


def image_size_fields(rec: dict) -> dict:
    """``width`` and ``height`` of the (first) image when the record states them: both or
    neither, whole numbers of pixels (0 or absent = read from the image's header)."""
    size = {k: rec.get(k) or 0 for k in ("width", "height")}
    for k, v in size.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v != int(v):
            raise ValueError(f"{k} must be a whole number of pixels, got {kind_of(v)} {v!r:.40}")
    if (size["width"] == 0) != (size["height"] == 0):
        raise ValueError(f"width and height go together, got width {size['width']!r} and height {size['height']!r}")
    return {k: int(v) for k, v in size.items()}


@dataclass(frozen=True)
class Raw:
    """One record as a reader found it: where it is in the file, its fields, or why it is unusable."""

    where: str  # "line 12", "record 3", "row 7": for messages
    fields: dict | None = None
    problem: str | None = None


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
                yield Raw(where, problem=f"expected a JSON object, got {kind_of(obj)}")
                continue
            yield Raw(where, obj)


def resolve(path_text: object, base: Path) -> object:
    """An image path relative to ``base`` (absolute paths and non-texts pass through)."""
    if isinstance(path_text, str) and path_text and not Path(path_text).is_absolute():
        return str(base / path_text)
    return path_text
