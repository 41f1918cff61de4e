"""Model families: what differs between the vision-language models the trainer takes as a policy.

Everything family-specific is read once, from the checkpoint's ``config.json`` (its
``model_type``), into a ``Family``; loading, the processor check, grounding, the rollout, the
tiny builder and the plan read it from there. The method itself never asks which model it
runs: a box is mapped through the family's coordinate grid, an image is resized with the
family's factor, and that is all.

    Qwen2.5-VL: patch 14, 2x2 merge (factor 28); boxes in absolute pixels of the resized input.
    Qwen3-VL:   patch 16, 2x2 merge (factor 32); boxes on a 0-1000 grid over the image,
                DeepStack visual features added to the first decoder layers.

Qwen3.5 (``qwen3_5``) is refused at load: most of its decoder layers are linear attention
(Gated DeltaNet) whose recurrent state cannot be cut back to an earlier token, and the
rollout's shared prefill and turn-2 continuation both cut a cache.

    >>> FAMILIES["qwen3-vl"].factor, FAMILIES["qwen2.5-vl"].factor
    (32, 28)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    """``model_type`` in the checkpoint's config.json."""
    model_class: str
    """The transformers class that loads it."""
    config_class: str
    processor_class: str
    text_class: str
    """The decoder alone (what the plan's per-layer measurements build)."""
    patch: int
    """Vision patch side in input pixels."""
    merge: int
    """Patches merged per side into one image token."""
    box_grid: int | None
    """None: the model writes boxes in absolute pixels of the resized image it was shown;
    N: on a 0..N grid over that image (the same numbers whatever its size)."""

    @property
    def factor(self) -> int:
        """Side of one image token in input pixels: resized sides are multiples of it."""
        return self.patch * self.merge


FAMILIES: dict[str, Family] = {
    "qwen2.5-vl": Family("qwen2.5-vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                         "Qwen2_5_VLProcessor", "Qwen2_5_VLTextModel", patch=14, merge=2, box_grid=None),
    "qwen3-vl": Family("qwen3-vl", "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig",
                       "Qwen3VLProcessor", "Qwen3VLTextModel", patch=16, merge=2, box_grid=1000),
}
DEFAULT = FAMILIES["qwen2.5-vl"]

# Model types a user may reasonably point the trainer at, and the one missing piece each lacks.
REFUSED = {
    "qwen3_5": "Qwen3.5's linear-attention layers keep a recurrent state that cannot be cut back to an earlier "
               "token, and the rollout's shared prefill and turn-2 continuation cut the cache",
    "qwen3_5_moe": "Qwen3.5's linear-attention layers keep a recurrent state that cannot be cut back to an earlier "
                   "token, and the rollout's shared prefill and turn-2 continuation cut the cache",
    "qwen3_vl_moe": "the mixture-of-experts Qwen3-VL is not wired (its expert layers are untested here)",
    "qwen2_vl": "Qwen2-VL is not wired (train its successor Qwen2.5-VL)",
}


def family_named(model_type: str, where: object = "") -> Family:
    """The family of a ``model_type``; a clear one-line error for any other."""
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    at = f"{where}: " if where else ""
    if model_type in REFUSED:
        raise ValueError(f"{at}model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    known = ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values())
    raise ValueError(f"{at}model_type {model_type!r} is not a model family this trainer knows; known: {known}")


def family_of(source) -> Family:
    """The family of a model (anything with a ``.config``), a transformers config, a config
    dict, or a checkpoint folder (its config.json)."""
    if isinstance(source, (str, Path)):
        path = Path(source) / "config.json"
        return family_named(json.loads(path.read_text(encoding="utf-8")).get("model_type", ""), path)
    if isinstance(source, dict):
        return family_named(source.get("model_type", ""))
    config = getattr(source, "config", source)
    return family_named(getattr(config, "model_type", ""))


def model_class(family: Family):
    import transformers

    return getattr(transformers, family.model_class)


def processor_family(processor) -> Family:
    """The family a loaded processor belongs to (its class: ``Qwen2_5_VLProcessor``, ...)."""
    name = type(processor).__name__
    for family in FAMILIES.values():
        if family.processor_class == name:
            return family
    raise ValueError(f"processor {name} belongs to no model family this trainer knows "
                     f"({', '.join(f.processor_class for f in FAMILIES.values())})")


def path_family(path) -> Family:
    """The family of a checkpoint folder; Qwen2.5-VL (the paper's) when the folder is not on this
    machine (a plan or a protocol written for a model elsewhere)."""
    return family_of(path) if (Path(path) / "config.json").is_file() else DEFAULT
