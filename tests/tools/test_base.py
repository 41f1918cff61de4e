"""The base models' builder (``mgpo.tools.base``): what it checks before it builds, and the data it
draws for the pixel-budget sweep."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mgpo.config import ConfigError
from mgpo.tools.base import TASKS, build_base, build_budgets

ROOT = Path(__file__).resolve().parents[2]


def test_the_budget_sweep_draws_the_same_scenes_at_every_factor(tmp_path):
    """Table 2 compares the factors: before, each factor's test set was another draw (1 of 64
    scenes shared), so the comparison was unpaired. Now only the resolution differs."""
    from dataclasses import replace

    task = replace(TASKS["budgets"], test_images=6, sft_images=2, locate=3)
    build_budgets(tmp_path, 0, task)
    sets = {f: [json.loads(line) for line in (tmp_path / f"test-x{f}.jsonl").read_text().splitlines()]
            for f in task.factors}
    answers = {f: [r["answer"] for r in recs] for f, recs in sets.items()}
    assert len({tuple(a) for a in answers.values()}) == 1, answers
    panels = {f: [round(r["target_boxes"][0][0] / f) for r in recs] for f, recs in sets.items()}
    assert len({tuple(p) for p in panels.values()}) == 1, "the same target panel at every factor"
    assert len(set(answers[1])) > 1, "the scenes still differ from one another"


def test_the_builder_checks_its_arguments_and_its_folder(tmp_path):
    """`--sft-steps 0` trained 300 steps; a folder the tool did not build was written into."""
    proc = subprocess.run([sys.executable, "-m", "mgpo.tools.base", str(tmp_path / "b"), "--sft-steps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--sft-steps: must be at least 1, got 0" in proc.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and was not built by mgpo.tools.base"):
        build_base(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
