"""Grounding: parse the turn-1 box, check it, map it to the original image, crop.

A model writes a box on the image it was shown, in its family's convention: Qwen2.5-VL in
absolute pixels of the *resized* input (``(grid_w * 14, grid_h * 14)`` from
``image_grid_thw``), Qwen3-VL on a 0-1000 grid over it (``grid``: 1000). The crop must come
from the original file, so every box goes through ``to_original_box`` / ``view_to_original``
first (taken as original pixels unmapped, a Qwen2.5-VL box lands ~12% off on a 4032-px photo,
as one public implementation did).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

MAX_ASPECT = 200  # smart_resize refuses a long/short side ratio above this

RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


@dataclass(frozen=True)
class Box:
    """An axis-aligned box (x1, y1) top-left to (x2, y2) bottom-right, in pixels."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


# ----------------------------------------------------------------------------- parsing

_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_MAX_CANDIDATES = 64  # bound the work on adversarial text


def _as_box(obj) -> tuple[Box, bool] | None:
    """A Box from the shapes models write ({"bbox_2d": [...]}, [{...}], [x1, y1, x2, y2]), and
    whether it came from a ``bbox_2d`` item (Qwen's native form). In a list of detections the
    first ``bbox_2d`` item wins, as in the authors' code; then the first other box."""
    if isinstance(obj, dict):
        for key in ("bbox_2d", "bbox", "box"):
            if key in obj:
                found = _as_box(obj[key])
                return (found[0], key == "bbox_2d") if found else None
        return None
    if isinstance(obj, list):
        if len(obj) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            try:
                coords = [float(v) for v in obj]
            except OverflowError:
                return None
            return (Box(*coords), False) if all(math.isfinite(v) for v in coords) else None
        found = [f for item in obj if isinstance(item, (dict, list)) and (f := _as_box(item)) is not None]
        return next((f for f in found if f[1]), found[0] if found else None)
    return None


def find_box(text: str) -> tuple[Box, int] | None:
    """The box of a response and the offset just past the block that holds it.

    Candidates are the fenced blocks (```json ... ```) and then the bare JSON values, in
    order of appearance; the first of the best kind wins: a fenced ``bbox_2d`` item (Qwen's
    native grounding output), any other fenced box, a bare ``bbox_2d`` item (a fence the model
    never closed), any other bare box. So a list of four numbers written earlier in the
    reasoning ("[1, 2, 3, 4]") never displaces the grounding block.
    """
    best = None  # (rank, box, end); lower rank is better
    try:
        for rank, box, end in _candidates(text):
            if best is None or rank < best[0]:
                best = (rank, box, end)
            if rank in (0, 2):  # nothing later can beat it (the fenced candidates come first)
                break
    except Exception:  # parse_box must never raise on model output
        return None
    return (best[1], best[2]) if best else None


def _candidates(text: str):
    """(rank, box, end offset) of every JSON value in ``text`` that holds a box, fenced first."""
    for m in _FENCED.finditer(text):
        try:
            found = _as_box(json.loads(m.group(1)))
        except (ValueError, RecursionError):
            continue
        if found is not None:
            yield (0 if found[1] else 1), found[0], m.end()
    decoder = json.JSONDecoder()
    for start in [m.start() for m in re.finditer(r"[\[{]", text)][:_MAX_CANDIDATES]:
        try:
            obj, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        found = _as_box(obj)
        if found is not None:
            yield (2 if found[1] else 3), found[0], end


def parse_box(text: str) -> Box | None:
    """The first box in a turn-1 response, or None. Never raises.

    >>> parse_box('```json\\n[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}]\\n```')
    Box(x1=10.0, y1=20.0, x2=110.0, y2=220.0)
    >>> parse_box("the region is [1.5, 2, 30, 40.25] I think")
    Box(x1=1.5, y1=2.0, x2=30.0, y2=40.25)
    >>> parse_box("no box here") is None
    True
    """
    found = find_box(text if isinstance(text, str) else "")
    return found[0] if found else None


# ----------------------------------------------------------------------------- geometry

def on_input(box: Box, input_size: tuple[int, int], grid: int | None = None) -> Box:
    """A box as written by the model, in pixels of the ``(width, height)`` input it was shown:
    the box itself when the model writes pixels (``grid`` None), else scaled from its 0..grid grid.

    >>> on_input(Box(500, 0, 1000, 500), (640, 480), grid=1000)
    Box(x1=320.0, y1=0.0, x2=640.0, y2=240.0)
    """
    if grid is None:
        return box
    w, h = input_size
    return Box(box.x1 * w / grid, box.y1 * h / grid, box.x2 * w / grid, box.y2 * h / grid)


def box_problem(box: Box | None, input_size: tuple[int, int], min_side: float = 28,
                max_aspect: float = 100.0, grid: int | None = None) -> str | None:
    """Why ``box`` is unusable on a ``(width, height)`` input, or None if it is valid.

    The rules are the authors' code's, in input pixels (a ``grid`` box is scaled first): inside
    the input, not inverted, both sides longer than ``min_side``, long/short side ratio below
    ``max_aspect``.
    """
    if box is None:
        return "no box"
    if grid is not None:  # the grid's own edges, not the scaled ones: 1000 is the edge exactly
        if not (0 <= box.x1 < box.x2 <= grid and 0 <= box.y1 < box.y2 <= grid):
            return "outside the image or inverted"
        box = on_input(box, input_size, grid)
    w, h = input_size
    if not (0 <= box.x1 < box.x2 <= w and 0 <= box.y1 < box.y2 <= h):
        return "outside the image or inverted"
    if box.width <= min_side or box.height <= min_side:
        return "too small"
    if max(box.width, box.height) / min(box.width, box.height) >= max_aspect:
        return "aspect ratio too extreme"
    return None


def to_original_box(box: Box, input_size: tuple[int, int], original_size: tuple[int, int],
                    grid: int | None = None) -> Box:
    """Map a box from the resized model input (pixels, or its 0..``grid`` grid) to the original
    image; sizes are (width, height).

    >>> to_original_box(Box(0, 0, 448, 336), (448, 336), (4032, 3024))
    Box(x1=0.0, y1=0.0, x2=4032.0, y2=3024.0)
    >>> to_original_box(Box(500, 0, 1000, 500), (640, 480), (4000, 3000), grid=1000)
    Box(x1=2000.0, y1=0.0, x2=4000.0, y2=1500.0)
    """
    (wi, hi), (wo, ho) = (grid, grid) if grid else input_size, original_size
    # x * W_orig / W_in, multiplying first: the input's edge lands exactly on the original's.
    return Box(box.x1 * wo / wi, box.y1 * ho / hi, box.x2 * wo / wi, box.y2 * ho / hi)


@dataclass(frozen=True)
class View:
    """One image as shown to the model: the region of the original it holds (original pixels;
    the whole image for the original itself) and the size the model saw it at (width, height)."""

    region: Box
    input_size: tuple[int, int]


def view_to_original(box: Box, view: View, grid: int | None = None) -> Box:
    """Map a box drawn on a shown image (its pixels, or its 0..``grid`` grid) back to original
    pixels: undo the view's resize, then add its offset. Chained over crops of crops, a nested
    zoom lands on full-resolution pixels.

    >>> view_to_original(Box(280, 210, 560, 420), View(Box(1000, 750, 2000, 1500), (560, 420)))
    Box(x1=1500.0, y1=1125.0, x2=2000.0, y2=1500.0)
    """
    (wi, hi), r = (grid, grid) if grid else view.input_size, view.region
    # multiply first, as in to_original_box: the view's edge lands exactly on its region's edge
    return Box(r.x1 + box.x1 * r.width / wi, r.y1 + box.y1 * r.height / hi,
               r.x1 + box.x2 * r.width / wi, r.y1 + box.y2 * r.height / hi)


def input_size_from_grid(grid_thw, patch: int = 14) -> tuple[int, int]:
    """(width, height) of the resized image the model saw, from one ``image_grid_thw`` row
    (``patch``: the family's patch side, 14 for Qwen2.5-VL, 16 for Qwen3-VL)."""
    _, gh, gw = (int(v) for v in grid_thw)
    return gw * patch, gh * patch


def iou(a, b) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes.

    >>> iou([0, 0, 10, 10], [5, 0, 15, 10])
    0.3333333333333333
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def enclosing(boxes) -> list[float]:
    """The smallest box around all ``boxes`` (a crop must hold every target to be useful)."""
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def contains(outer, inner) -> bool:
    """
    >>> contains([0, 0, 10, 10], [2, 2, 5, 5]), contains([0, 0, 10, 10], [2, 2, 11, 5])
    (True, False)
    """
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def target_fit(box, targets) -> tuple[float, bool]:
    """How a box (None: no valid box) fits the box around every target: (IoU, holds them all)."""
    if not box:
        return 0.0, False
    target = enclosing(targets)
    return iou(box, target), contains(box, target)


def area_share(box, size: tuple[int, int]) -> float:
    """Share of an image of ``size`` (w, h) that a box [x1, y1, x2, y2] covers.

    >>> area_share([0, 0, 50, 20], (100, 100))
    0.1
    """
    return (box[2] - box[0]) * (box[3] - box[1]) / (size[0] * size[1])


def pixel_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer crop bounds covering ``box`` (floor/ceil), clamped to the image."""
    w, h = size
    x1 = min(max(0, math.floor(box.x1)), w - 1)
    y1 = min(max(0, math.floor(box.y1)), h - 1)
    x2 = max(min(w, math.ceil(box.x2)), x1 + 1)
    y2 = max(min(h, math.ceil(box.y2)), y1 + 1)
    return x1, y1, x2, y2


def fit_to_budget(image: Image.Image, min_pixels: int, max_pixels: int, resample: str = "bicubic",
                  factor: int = 28) -> Image.Image:
    """Resize into [min_pixels, max_pixels] with sides multiple of ``factor`` (the family's: 28
    for Qwen2.5-VL, 32 for Qwen3-VL), keeping the aspect ratio.

    Uses Qwen's own ``smart_resize`` rule, so the processor leaves the result as it is;
    small crops are enlarged, which is the point of the method.
    """
    w, h = image.size
    if max(w, h) > MAX_ASPECT * min(w, h):  # a sliver of a sliver-shaped original: Qwen's rule refuses it
        w, h = max(w, math.ceil(h / MAX_ASPECT)), max(h, math.ceil(w / MAX_ASPECT))
    h, w = smart_resize(h, w, factor, min_pixels, max_pixels)
    if (w, h) == image.size:
        return image
    return image.resize((w, h), RESAMPLE[resample])


def crop_original(original: Image.Image, box_in_original: Box) -> Image.Image:
    """The region of the original image under the box, pixels untouched."""
    return original.crop(pixel_box(box_in_original, original.size))


def counterfactual_region(kind: str, box: Box | None, targets, size: tuple[int, int], key: str) -> Box | None:
    """What turn 2 shows in place of the crop under the model's box (``eval.crop``; evaluation only,
    training always shows the model's crop). A model that answers from its crop falls to chance when
    its crop is black or elsewhere, and is unchanged or better when shown the target itself.

    The region of the original turn 2 crops from, by ``kind``: the model's box ("model", and
    "black", which blanks that crop afterwards), a box of the same size at a random place inside
    the original ("random", drawn from ``key``, the question and sample, so a rerun draws the same
    whatever the batching), or None for "full" (the whole original is shown) and for a missing
    box (the fallback). "gold" is the target boxes' enclosing box whatever turn 1 wrote, a
    missing box included (the upper bound of grounding: every trajectory shown the target), and
    None where the record has no targets.

    >>> counterfactual_region("gold", None, [[10, 20, 30, 40], [50, 5, 60, 35]], (100, 100), "q")
    Box(x1=10, y1=5, x2=60, y2=40)
    >>> r = counterfactual_region("random", Box(0, 0, 40, 20), [], (100, 50), "q")
    >>> (r.x2 - r.x1, r.y2 - r.y1), 0 <= r.x1 <= 60 and 0 <= r.y1 <= 30
    ((40.0, 20.0), True)
    """
    if kind == "gold":
        return Box(*enclosing(targets)) if targets else None
    if box is None or kind == "full":
        return None
    if kind == "random":
        import random

        rng = random.Random(f"random-crop-{key}")
        w, h = box.x2 - box.x1, box.y2 - box.y1
        x1, y1 = rng.uniform(0, max(0, size[0] - w)), rng.uniform(0, max(0, size[1] - h))
        return Box(x1, y1, x1 + w, y1 + h)
    return box
