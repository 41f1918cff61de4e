"""The paper's training set: MME-RealWorld minus MME-RealWorld-Lite (21,690 questions).

    python -m mgpo.tools.mme_split --full /data/MME-RealWorld/MME_RealWorld.json \
        --lite /data/MME-RealWorld-Lite/data/MME-RealWorld-Lite.json
    python -m mgpo.tools.mme_split --train /data/MME-RealWorld/my_train.json --lite ...   # one you have: checked

The full set (``yifanzhang114/MME-RealWorld``: ``MME_RealWorld.json`` beside the extracted image
archives) and the Lite set (``yifanzhang114/MME-RealWorld-Lite``: ``data.zip`` unpacks to
``data/MME-RealWorld-Lite.json`` and ``data/imgs/``) are JSON lists of the same records
(``Question_id``, ``Image``, ``Text``, ``Answer choices``, ``Ground truth``, ``Task``, ``Subtask``,
``Category``, ...). Every full-set record whose ``Question_id`` is a Lite question's is left out;
so is one whose image file name and question text are a Lite question's (a Lite record whose id
the full set does not hold), so no evaluation question is trained on. The records are written
as published, by default to ``MME_RealWorld_train.json`` beside the full set, where their
``Image`` paths resolve; the training presets' ``data.train`` points there. Each count is printed
with its reason.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

PAPER_TRAIN = 21_690
"""Questions in the paper's training set (the full set's 23,609 minus Lite's 1,919)."""
TRAIN_NAME = "MME_RealWorld_train.json"


def question_id(row: dict) -> str | None:
    """The record's id as text (so 12 and "12" match), None when it has none."""
    value = row.get("Question_id", row.get("Question id"))
    return None if value is None else str(value)


def _text_key(row: dict) -> tuple[str, str]:
    """A question by its image's file name and its text (the Lite images are the full set's, renamed
    into one flat ``imgs/`` folder, so only the file name is compared)."""
    return Path(str(row.get("Image", ""))).name, " ".join(str(row.get("Text", "")).split())


@dataclass
class Split:
    train: list[dict] = field(default_factory=list)
    lite: int = 0
    matched_by_id: int = 0
    matched_by_text: int = 0
    lite_not_found: list = field(default_factory=list)  # Lite ids the full set lacks, by id and by text
    dropped: dict[str, int] = field(default_factory=dict)  # full-set records left out of training: why -> count


def split(full: list, lite: list) -> Split:
    """The full set minus the Lite questions (by ``Question_id``, then by image name and text)."""
    out = Split(lite=len(lite))
    lite_ids = {question_id(r) for r in lite if isinstance(r, dict) and question_id(r) is not None}
    full_ids = {question_id(r) for r in full if isinstance(r, dict)}
    by_text = {_text_key(r) for r in lite if isinstance(r, dict) and question_id(r) not in full_ids}
    seen = set()

    def drop(why: str):
        out.dropped[why] = out.dropped.get(why, 0) + 1
    for row in full:
        if not isinstance(row, dict):
            drop("not a JSON object")
            continue
        qid = question_id(row)
        if qid is None:
            drop("no Question_id (cannot be checked against Lite)")
        elif qid in seen:
            drop("Question_id repeated in the full set (the first kept)")
        elif qid in lite_ids:
            out.matched_by_id += 1
        elif _text_key(row) in by_text:
            out.matched_by_text += 1
        else:
            out.train.append(row)
        seen.add(qid)
    found_by_text = {_text_key(r) for r in full if isinstance(r, dict) and question_id(r) not in lite_ids}
    out.lite_not_found = [question_id(r) for r in lite if isinstance(r, dict) and question_id(r) not in full_ids
                          and _text_key(r) not in found_by_text]
    return out


def read_list(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the published file: see python -m mgpo.tools.mme_split --help)")
    try:
        rows = json.loads(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records (MME-RealWorld's layout)")
    return rows


def report(s: Split, full_name: str, lite_name: str, full_count: int) -> list[str]:
    lines = [f"{full_name}: {full_count:,} records; {lite_name}: {s.lite:,} questions",
             f"Lite questions matched in the full set by Question_id: {s.matched_by_id:,}",
             f"matched by image file name and question text (their ids differ): {s.matched_by_text:,}",
             f"Lite questions not found in the full set: {len(s.lite_not_found):,}"
             + (f" (e.g. {s.lite_not_found[:3]}; nothing to remove for them)" if s.lite_not_found else "")]
    lines += [f"left out of training: {n:,} full-set record(s): {why}" for why, n in s.dropped.items()]
    return lines


def check_train(rows: list, lite: list | None) -> list[str]:
    """A training set a user already has: its size against the paper's and its overlap with Lite."""
    ids = [question_id(r) for r in rows if isinstance(r, dict)]
    lines = [f"{len(rows):,} records, {len(set(ids) - {None}):,} distinct Question_ids (the paper's training set: "
             f"{PAPER_TRAIN:,})"]
    if lite is not None:
        overlap = {question_id(r) for r in lite if isinstance(r, dict)} & set(ids)
        lines.append(f"Lite questions in it: {len(overlap):,}" + (" (evaluation questions would be trained on; "
                                                                    "rebuild it with --full)" if overlap else ""))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.mme_split", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", type=Path, help="MME_RealWorld.json (beside the extracted image archives)")
    parser.add_argument("--lite", type=Path, help="MME-RealWorld-Lite.json")
    parser.add_argument("--train", type=Path, help="a training set you already have: counted and checked, not rewritten")
    parser.add_argument("--out", type=Path, help=f"default: {TRAIN_NAME} beside --full (its Image paths resolve there)")
    args = parser.parse_args(argv)
    try:
        _run(parser, args)
    except ValueError as e:  # a file that is not the published layout: one line, exit 2
        parser.error(str(e))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.train:
        for line in check_train(read_list(args.train), read_list(args.lite) if args.lite else None):
            print(line)
        print(f"train with: data.train={args.train}")
        return
    if not (args.full and args.lite):
        parser.error("give --full and --lite (or --train for a training set you already have)")
    out = args.out or args.full.parent / TRAIN_NAME
    if args.full.resolve() == args.lite.resolve():
        parser.error(f"--full and --lite are the same file ({args.full}): the training set would be empty")
    for name, given in (("--full", args.full), ("--lite", args.lite)):
        if out.resolve() == given.resolve():
            parser.error(f"--out {out} is the {name} file: writing there would replace a published benchmark file; "
                         f"choose another --out (default: {TRAIN_NAME} beside --full)")
    full = read_list(args.full)
    s = split(full, read_list(args.lite))
    for line in report(s, args.full.name, args.lite.name, len(full)):
        print(line)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(s.train, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    note = "the paper's count" if len(s.train) == PAPER_TRAIN else f"the paper trained on {PAPER_TRAIN:,}"
    print(f"training set: {len(s.train):,} questions ({note}) written to {out}")
    if out.parent.resolve() != args.full.parent.resolve():
        print(f"its Image paths are relative to {args.full.parent}: add data.image_root={args.full.parent}")
    print(f"train with: data.train={out}")


if __name__ == "__main__":
    from ..cli import run_main

    run_main(main)
