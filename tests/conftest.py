"""Shared fixtures: the tiny checkpoint and a small synthetic set, built once per session."""

import os
import sys
from pathlib import Path

# Test files live in folders that mirror the package (core/, runtime/, data/, eval/, tools/, system/);
# the helper modules they share (helpers.py, ranks.py, launch.py, k2_reference.py, ...) sit here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers on few cores: torch's OpenMP threads spin while they wait, and two
    # workers of two threads each on 2 cores made the fast tests 4x slower (304 s against 71 s).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from mgpo.tools.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl", seed=0)


FAMILIES = ("qwen2.5-vl", "qwen3-vl")  # every model family the trainer supports


def pytest_collection_modifyitems(items):
    """The end-to-end (slow) cases run for Qwen2.5-VL in `make test` and for the other families in
    `make test-heavy` (CI runs both): the unit cases run for every family in both."""
    for item in items:
        family = getattr(item, "callspec", None) and item.callspec.params.get("family_dir")
        if family and family != FAMILIES[0] and item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session", params=FAMILIES)
def family_dir(request, tiny_dir, tmp_path_factory):
    """The tiny checkpoint of each family in turn: a test that takes it runs once per family."""
    from mgpo.tools.tiny import build_tiny_checkpoint

    if request.param == "qwen2.5-vl":
        return tiny_dir
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / f"tiny-{request.param}", seed=0,
                                 arch=request.param)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from mgpo.tools.synth import build_synth

    out = tmp_path_factory.mktemp("synth")
    build_synth(out, n=12, seed=0, split="train")
    return out
