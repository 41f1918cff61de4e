"""What an evaluation's numbers depend on, and the prediction files that hold them.

``protocol`` is what a report states with every result (model, mode, pixel budget,
decoding, token limits, box rule, answer matching); ``run_protocol`` adds what stored
predictions depend on (the model's files, the questions). Predictions are kept only
while they were made under the same protocol (``check_protocol``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..config import Config, flatten
from ..core.prompts import get_template
from ..core.reward import scorer_version
from ..core.zoom import image_token_cap
from ..data.samples import SampleSet
from ..runtime.checkpoint import sha256_file, verify_part
from ..runtime.family import path_family
from ..runtime.model import resolve_dtype

log = logging.getLogger("mgpo")


PROTOCOL_FILE = "protocol.json"


class ProtocolMismatchError(RuntimeError):
    """Stored predictions were made under another protocol than this run's."""


def protocol(cfg: Config) -> dict:
    """Everything that changes a number, stated with every result. (Not in it: what gives the
    same tokens by construction, rollout.shared_prefill and continue_turn2, and top_p / top_k
    under greedy decoding, which ignores them.)"""
    e, r, m = cfg.eval, cfg.rollout, cfg.model
    decoding = "greedy" if e.temperature == 0 else f"sampling T={e.temperature}, top_p={r.top_p}, top_k={r.top_k}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "model": m.path, "adapter": e.adapter or "none", "mode": e.mode,
        "dtype": str(resolve_dtype(m.dtype, device)).removeprefix("torch."), "attention": m.attn_implementation,
        "min_pixels": m.min_pixels, "max_pixels": m.max_pixels, "decoding": decoding,
        "max_prompt_tokens": cfg.data.max_prompt_tokens or "no limit",
        "samples_k": e.group_size, "max_new_tokens": f"{r.max_new_tokens_turn1}/{r.max_new_tokens_turn2}",
        "crop_resample": r.crop_resample, "box_rule": f"sides > {r.min_box_side}, aspect < {r.max_box_aspect}",
        "answer_match": "exact option letter in the last \\boxed{}" + (
            ", else a bare letter reply (B, (B), B.)" if get_template(e.mode).bare_letter else ""),
        "scorer": scorer_version(), "crop": e.crop,
    } | ({"max_turns": e.max_turns,
          "max_image_tokens": image_token_cap(replace(r, max_turns=e.max_turns), cfg.model.max_pixels,
                                             path_family(m.path).factor),
          "template_wording": "mgpo_k: this project's K-turn prompts, not the paper's"}
         if get_template(e.mode).zoom_loop else {})


def read_predictions(pred_dir: Path) -> list[dict]:
    """Every rank's prediction records; a line that is not a record of this format (not JSON, or
    without its question's id and dataset) is ignored with a warning, and its question redone."""
    records = []
    for f in sorted(pred_dir.glob("rank*.jsonl")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("%s line %d is not a JSON record; ignored (its batch is redone)", f, n)
                continue
            if not (isinstance(record, dict) and isinstance(record.get("id"), str)
                    and isinstance(record.get("dataset"), str)):
                log.warning("%s line %d is not a prediction record (no id or dataset); ignored", f, n)
                continue
            records.append(record)
    return records


def done_questions(records: list[dict], k: int) -> set[tuple[str, str]]:
    """Questions with all ``k`` samples recorded (or an error record): their batches are not redone."""
    samples: dict[tuple[str, str], set] = {}
    failed = set()
    for r in records:
        key = (r["dataset"], r["id"])
        if "error" in r:
            failed.add(key)
        samples.setdefault(key, set()).add(r.get("sample", 0))
    return failed | {key for key, s in samples.items() if len(s) >= k}


def cut_torn_tail(path: Path) -> int:
    """Remove a last line that has no newline (a kill mid-write) and return the bytes removed.

    Appending after such a line would glue the next record onto it and lose that one too.
    """
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            if pos == end and chunk.endswith(b"\n"):
                return 0
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                pos = pos - step + newline + 1
                break
            pos -= step
        f.truncate(pos)
        f.flush()
        os.fsync(f.fileno())
    return end - pos


_IDENTITIES: dict[tuple, str] = {}  # (folder, its files' names, sizes and times) -> content identity


def weights_identity(folder: str | Path) -> str:
    """The model (or adapter) folder by content: a hash of every file's name and SHA-256, so
    weights replaced in place with the same sizes and times are a new model.

    A checkpoint's ``model/`` or ``adapter/`` is first verified against the checkpoint's
    manifest (CheckpointError names a changed file) and identified by the manifest's hashes;
    any other folder is hashed whole. Reading every byte costs about 25 s for a 7B model in
    bf16 at 0.65 GB/s, once per process (remembered while no file is written to),
    against an evaluation's hours; headers and sizes alone would miss weights rewritten in
    place at the same size.
    """
    path = Path(folder)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stats = [p.stat() for p in files]  # ctime: changed by every write, and not settable (mtime is)
    key = (str(path.resolve()), tuple((p.relative_to(path).as_posix(), s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                                      for p, s in zip(files, stats)))
    if key not in _IDENTITIES:
        digests = verify_part(path)
        if digests is None:  # not part of a checkpoint: hashed whole
            digests = {p.relative_to(path).as_posix(): sha256_file(p) for p in files}
        text = json.dumps(digests, sort_keys=True)
        _IDENTITIES[key] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _IDENTITIES[key]


def questions_stamp(ds: SampleSet) -> dict:
    """Count and hash of every question as the model sees it (id, image, text, options, answer): the
    one fingerprint of a question set, in protocol.json, metrics.json and both reports."""
    digest = hashlib.sha256()
    for s in ds:
        digest.update(json.dumps([s.id, s.image, s.question, list(s.options), s.answer]).encode() + b"\n")
    return {"count": len(ds), "sha256": digest.hexdigest()[:16]}


def run_protocol(cfg: Config, datasets: dict[str, SampleSet]) -> dict:
    """Everything stored predictions depend on: the reported protocol, the model's files, the questions."""
    proto = protocol(cfg) | {
        "model_files": weights_identity(cfg.model.path),
        "adapter_files": weights_identity(cfg.eval.adapter) if cfg.eval.adapter else "none",
        "questions": {name: questions_stamp(ds) for name, ds in datasets.items()},
    }
    if cfg.eval.temperature > 0:  # sampled predictions depend on the per-batch seeds
        proto["sampling_seeds"] = f"train.seed={cfg.train.seed}, eval.batch_size={cfg.eval.batch_size}"
    return proto


def protocol_digest(proto: dict) -> str:
    """The sha256 of a protocol (its keys in order): the same settings, the same digest."""
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()


def check_protocol(pred_dir: Path, proto: dict, overwrite: bool) -> None:
    """Keep stored predictions only when made under ``proto``; refuse (or, with ``overwrite``,
    discard them) otherwise. Then store ``proto`` and its hash beside the predictions."""
    stored_file, old = pred_dir / PROTOCOL_FILE, sorted(pred_dir.glob("rank*.jsonl"))
    if stored_file.exists():
        stored = json.loads(stored_file.read_text())["protocol"]
        if stored == proto:
            return
        a, b = flatten(stored), flatten(proto)
        differ = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    elif old:
        differ = ["(no stored protocol: these predictions were made by an older version)"]
    else:
        differ = []
    if differ and not overwrite:
        raise ProtocolMismatchError(
            f"{pred_dir} holds predictions made under another protocol:\n  - " + "\n  - ".join(differ)
            + "\nset eval.overwrite=true to discard them and start fresh, or choose another eval.output_dir")
    if differ:
        log.warning("eval.overwrite: discarding the predictions in %s (%s)", pred_dir, "; ".join(differ))
        for f in old:
            f.unlink()
    stored_file.write_text(json.dumps({"protocol": proto, "sha256": protocol_digest(proto)}, indent=2) + "\n")
