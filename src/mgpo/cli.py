"""What the command-line entry points (train.py, eval.py, ``python -m mgpo.tools.plan``) share:
every config field in ``--help``, and user errors as one line with exit status 2.

This module imports nothing heavy (no torch, no transformers), so ``--help`` and a mistyped
key answer at once; the entry points import the trainer only after parsing their arguments.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USER_ERRORS = ("ConfigError", "RunFolderError", "CheckpointError", "ProtocolMismatchError", "FileNotFoundError",
               "NotADirectoryError", "CompareError", "BadImageError", "ClusterError")
"""Errors a user fixes by changing an argument, a file or a folder (not bugs): matched by class name,
so that telling them apart imports none of the modules that define them."""

EXIT_USER_ERROR = 2  # as argparse exits on a bad argument


def config_fields_help() -> str:
    """Every config field with its documentation, grouped by section, for ``--help``'s epilog."""
    import dataclasses
    import textwrap

    from .config import Config, field_docs

    defaults = {}
    for section in dataclasses.fields(Config):
        values = section.default_factory()
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            defaults[f"{section.name}.{f.name}"] = list(value) if isinstance(value, tuple) else value
    lines, current = ["config fields (override any as section.key=value; in brackets the library's default, which "
                      "a preset given with --config may change: --print-config shows the values in force):"], None
    for key, doc in field_docs().items():
        section = key.split(".", 1)[0]
        if section != current:
            lines += ["", f"  {section}:"]
            current = section
        lines.append(f"    {key} [{defaults.get(key)!r}]")
        text = " ".join(doc.split())
        lines += textwrap.wrap(text, width=96, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


def one_line(error: BaseException) -> str:
    """The error's message on one line: its list items joined with '; '.

    >>> one_line(ValueError("resuming r with settings that differ:\\n  - train.lr: 1 -> 2\\n  - seed: 0 -> 1"))
    'resuming r with settings that differ: train.lr: 1 -> 2; seed: 0 -> 1'
    """
    text = str(error).strip()
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    first, *rest = [line.strip() for line in text.splitlines() if line.strip()]
    items = [line[2:] if line.startswith("- ") else line for line in rest]
    return first + (" " + "; ".join(items) if items else "")


def is_user_error(error: BaseException) -> bool:
    return any(cls.__name__ in USER_ERRORS for cls in type(error).__mro__)


def run_main(main: Callable[[], object]) -> None:
    """Run an entry point: a user error prints ``error: <what, where, the fix>`` on stderr and
    exits with status 2; anything else (a bug) keeps its traceback. ``MGPO_DEBUG=1`` shows the
    traceback of user errors too."""
    try:
        main()
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if not is_user_error(e) or os.environ.get("MGPO_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
