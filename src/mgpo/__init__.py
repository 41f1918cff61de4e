"""MGPO: multi-turn grounding-based policy optimization for Qwen2.5-VL, in plain PyTorch.

The data flow, one module per stage, all of it in ``core/`` (its docstring gives the
reading order):

    data -> prompts -> rollout (generate, ground, crop) -> reward (+ advantage) -> loss -> update

Around it: ``runtime/`` (model loading, processes, checkpoints, logging), ``data/``,
``eval/``, and ``tools/`` (the tiny checkpoint, synthetic tasks, experiments, benchmarks).

Shape letters used in tensor names and shape comments, each defined here only: N trajectories
(prompts x group_size), T tokens of a padded batch, L tokens of one sequence, B prompts, G
group size, R rows of one ``generate`` call, S cached positions, V vocabulary, H hidden size,
K masked tokens, P image patches, D features of one patch.
"""

import os

# Offline by default, before any Hugging Face library is imported (they read these once,
# at import): nothing is downloaded, no telemetry or download-count request is sent (a
# plain `datasets.load_dataset` of a local file otherwise pings a remote URL). Models,
# adapters and data are local folders and files only. Set a variable yourself to change it.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")

__all__ = ["Box", "extract_answer", "group_advantages", "parse_box", "to_original_box"]


def __getattr__(name: str):
    """The re-exports above, imported on first use: they import torch, and ``import mgpo.config``
    (what ``--help`` needs) must not."""
    if name in ("Box", "parse_box", "to_original_box"):
        from .core import grounding

        return getattr(grounding, name)
    if name in ("extract_answer", "group_advantages"):
        from .core import reward

        return getattr(reward, name)
    raise AttributeError(f"module 'mgpo' has no attribute {name!r}")
