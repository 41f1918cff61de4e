"""What the experiment tools check before they touch anything: numbers in range, names that
stay inside their folder, and output folders that are theirs to write.

No tool deletes or overwrites a folder it did not make: each writes a marker file into the
folder it builds, and an existing, non-empty output folder without that marker is refused.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ..config import ConfigError


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def plain_name(text: str) -> str:
    """An argparse type: a file-name part (letters, digits, '-', '_', '.'), never a path, so what is
    named after it stays in its folder."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", text) or ".." in text:
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '-', '_' and '.' only (a name, not a path)")
    return text


def claim_folder(out: str | Path, marker: str, tool: str) -> Path:
    """``out`` as this tool's output folder: created (with ``marker`` in it) when missing or
    empty; reused when it holds ``marker`` (a previous build of the same tool); refused otherwise,
    so that nothing of the user's is ever overwritten or deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder: choose another output folder for {tool}")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ConfigError(f"{out.resolve()} is not empty and was not built by {tool} (it has no {marker}); "
                          f"{tool} writes and replaces files there, so it refuses: choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / marker).is_file():
        (out / marker).write_text(json.dumps({"built_by": tool}) + "\n")
    return out
