"""Datasets: one record type (`Sample`), its validation, and the project's own JSONL format.

Formats (``load_samples(path, fmt="auto")``):

- ``jsonl``: the project's own, written by ``mgpo.tools.synth``: one JSON object per line with
  id, image (relative to the file), question, options, answer, category, target_boxes.
- ``chat``: conversations for SFT (``train.algorithm: sft``), one per line:
  ``{"id": ..., "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
  {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}, ...]}``, the
  chat layout of Hugging Face processors. ``content`` is a text or a list of parts; image
  paths are relative to the file; roles: an optional first ``system``, then ``user`` and
  ``assistant`` in turn, ending with ``assistant``. Every assistant message is a target.
- ``vstar``, ``mme_realworld``, ``hrbench``: the published benchmark layouts, read by
  ``mgpo.data.benchmarks`` (V* from ``test_questions.jsonl``, MME-RealWorld(-Lite) from its JSON
  list, HR-Bench from its TSV or parquet file, streamed).

Every reader yields raw records; ``validate`` checks each field's type and shape and turns
a record into a `Sample`. A record that cannot be used (a line that is not JSON, a field of
the wrong type, a missing or unreadable image, an answer that is not one of the options, a
duplicate id) is skipped with its id and reason, logged with the file and line, and
counted; one bad record never stops a load, and a file with no usable record gives an
empty set whose skip list names every record. Images (``mgpo.data.images``) are decoded only
when used: an image embedded in a benchmark file is referenced by its place in the file and
read back then.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..config import FORMATS
from . import benchmarks
from .benchmarks import is_vstar_listing, parquet_format
from .images import MAX_ASPECT, BadImageError, image_size, load_image
from .records import Raw, jsonl_objects, kind_of, resolve, validate, validate_chat

log = logging.getLogger(__name__)



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

    def load_images(self) -> list[Image.Image]:
        """Every image of the record, decoded, in order: a chat record's every image part, a
        question record's one image. Raises ``BadImageError`` naming the record and the file."""
        paths = [value for _, parts in self.messages for kind, value in parts if kind == "image"]
        return [self.load_image()] + [load_image(p, self.id) for p in paths[1:]]


# ----------------------------------------------------------------------------- records


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

    def fingerprint_rows(self) -> list[str]:
        """The records as this machine read them, one line each: every usable record's id, image
        and size, then every skipped one's id and reason. Every node of a job must read the same:
        a node whose copy lacks an image skips that record and would draw other batches."""
        def image(ref: str) -> str:  # an embedded image by its digest, not its bytes
            return "base64 " + hashlib.sha256(ref.encode()).hexdigest()[:16] if ref.startswith("base64:") else ref

        return ([f"{s.id}\t{image(s.image)}\t{s.width}x{s.height}" for s in self.samples]
                + [f"skipped {rid}\t{why}" for rid, why in self.skipped])

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
        raise ValueError(f"id must be a text or a number, got {kind_of(rid)}")
    return str(rid)


def _sample(raw: Raw, rid: str, name: str, check_images: bool) -> Sample:
    fields = validate_chat(raw.fields) if "messages" in raw.fields else validate(raw.fields)
    width, height = fields.pop("width"), fields.pop("height")
    if raw.fields.get("image_error"):
        raise ValueError(raw.fields["image_error"])
    for _, parts in fields.get("messages", ()) if check_images else ():  # a chat's other images
        for kind, image in parts:
            if kind == "image" and image != fields["image"]:
                try:
                    image_size(image, rid)
                except BadImageError as e:
                    raise ValueError(str(e).split(": ", 1)[-1]) from e
    if check_images and not width:
        try:
            width, height = image_size(fields["image"], rid)
        except BadImageError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from e
    if width and max(width, height) / max(1, min(width, height)) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {max(width, height) / max(1, min(width, height)):.1f}:1 beyond Qwen's 200:1")
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


def _jsonl_records(path: Path, image_root: Path | None) -> Iterator[Raw]:
    """The ``jsonl`` and ``chat`` formats: every image path (a question record's ``image``, a
    chat record's image parts) resolved against the file's folder, whichever kind of record
    a file mixes in, so that no relative path is read against the working directory."""
    base = image_root or path.parent
    for raw in jsonl_objects(path):
        if raw.fields is not None and "image" in raw.fields:
            raw.fields["image"] = resolve(raw.fields["image"], base)
        messages = (raw.fields or {}).get("messages")
        for m in messages if isinstance(messages, list) else []:
            content = m.get("content") if isinstance(m, dict) else None
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and part.get("type") == "image":
                    part["image"] = resolve(part.get("image"), base)
        yield raw


# ----------------------------------------------------------------------------- entry point

def _first_has_messages(path: Path) -> bool:
    first = next(jsonl_objects(path), None)
    return first is not None and first.fields is not None and "messages" in first.fields


def detect_format(path: Path) -> str:

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

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    root = Path(image_root) if image_root else None
    readers = {
        "jsonl": lambda: _jsonl_records(path, root),
        "chat": lambda: _jsonl_records(path, root),
        "vstar": lambda: benchmarks.vstar_records(path, root),
        "mme_realworld": lambda: benchmarks.mme_records(path, root),
        "hrbench": lambda: benchmarks.hrbench_records(path),
    }
    if fmt not in readers:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {sorted(readers)}")
    return _finish(name or path.stem, path, readers[fmt](), check_images, max_samples)


def drop_long_prompts(data: SampleSet, count_tokens, limit: int) -> SampleSet:
    """Move every sample whose prompt (a chat record: its whole conversation) is over ``limit``
    tokens (``count_tokens(sample)``) to the skip list. Training filters once at load: a prompt
    dropped mid-batch would leave one rank with fewer groups than the others."""
    if not limit:
        return data
    kept = []
    for s in data:
        if problem := prompt_length_problem(count_tokens(s), limit, "conversation" if s.messages else "prompt"):
            data.skipped.append((s.id, problem))
            log.warning("skipping %s, record %s: %s", data.source, s.id, problem)
        else:
            kept.append(s)
    return SampleSet(data.name, kept, data.skipped, data.source)


def prompt_length_problem(n_tokens: int, limit: int, what: str = "prompt") -> str | None:
    """Why a prompt (or a chat record's whole ``conversation``) of ``n_tokens`` (text and image
    tokens) is refused, or None.

    ``limit`` is ``data.max_prompt_tokens`` (0 = no limit); checked once the prompt is
    tokenized, so a 50,000-character question is skipped and counted instead of
    reaching the model.
    """
    if limit and n_tokens > limit:
        return f"{what} has {n_tokens} tokens, over data.max_prompt_tokens ({limit})"
    return None
