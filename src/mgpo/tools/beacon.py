"""The *beacon* task: a detail legible only in a crop, at a place the model can see.

A 1792 x 448 grey image holds three 224-px square panels in a row, each filled with a fine
pattern (2-px horizontal stripes, vertical stripes or checks). One panel, the target, is
tinted in the colour that names its place (red left, green middle, blue right); the
others are grey. The question asks which pattern fills the coloured square, without
naming the colour: only the image says where it is.

At the tiny pixel budget (448 x 112, a 4x down-scale) every pattern averages to its
panel's flat colour: the tint, and so the target's place, stays visible; the pattern does
not (its period divides the down-scale factor and its contrast fades in over the last 16
px of each panel, so no edge gives it away: the down-scaled images of the three answers
differ by at most 2 of 255 levels, which is rounding). A crop of one panel is shown at its
own resolution, where the stripes are plain. So the answer needs the crop, and the right
crop needs only a colour read, not a spatial one (a random tiny Qwen2.5-VL cannot learn
to say *where* something is, see docs/reproduction.md).

The panels sit at input boxes [100, 28, 156, 84], [200, 28, 256, 84] and [300, 28, 356, 84]:
the three box texts differ in two digits, both fixed by the first, so the choice of a panel
is one token and the tiny model's digit-by-digit box text is otherwise the same whichever
panel it picks.

The *nested* layout (``NESTED``, for the K-turn experiment of ``mgpo_k``) needs two zooms:
an 896 x 224 image seen at 224 x 56 (4x down-scale, budget 112 x 112 = 12544 px), panels
of 224 px filled with a 1-px pattern (period 2). A crop of the panel is shown at 112 x 112,
a 2x down-scale, where the pattern still averages out; only a second zoom inside it (the
target is the panel's central 112 px) shows it at full resolution. The down-scale factors
4 and 2 are even and the panels start on multiples of 4, so every filter pairs opposite
pixels of the pattern and it cancels exactly (rounding aside).

    python -m mgpo.tools.beacon build/beacon --n 256 --seed 0 --split train
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.records import LETTERS
from .args import plain_name, positive_int


@dataclass(frozen=True)
class Layout:
    """Where things are, in original pixels, and the pixel budget they are drawn for."""

    name: str
    width: int
    height: int
    side: int  # panel side
    panels: tuple[tuple[int, int], ...]  # panel top-left corners
    period: int  # of the pattern: divides every down-scale factor, so the pattern averages out
    budget: int  # min_pixels = max_pixels of the model that reads it
    detail: int  # side of the target region, centred in the panel (the whole panel: side)
    fade: int = 16  # px over which the pattern's contrast fades in from each panel edge


# 448 x 112 at the 4x down-scale; panels at input boxes [100, 28, 156, 84] ...; 2-px stripes in a crop
BEACON = Layout("beacon", 1792, 448, 224, ((400, 112), (800, 112), (1200, 112)), period=4, budget=448 * 112,
                detail=224)
# 224 x 56 at 4x; a panel crop at 2x (112 x 112); the central 112 px at 1x: two zooms to read it
NESTED = Layout("nested", 896, 224, 224, ((64, 0), (352, 0), (640, 0)), period=2, budget=112 * 112, detail=112)


def beacon_at(factor: int) -> Layout:
    """The beacon drawn ``factor`` times the model's 448 x 112 view (BEACON is ``beacon_at(4)``),
    with the same 2-px stripes: the pixel-budget sweep. The panels sit at the same input boxes
    whatever the factor, so the box to write is the same; what changes is how much of the
    pattern survives the down-scale: plain at 1x, at the sampling limit at 2x, averaged out at
    4x and beyond. A crop of a panel (56 x factor px) is shown at 224 x 224, so it stays
    legible up to 4x."""
    return Layout(f"beacon-x{factor}", 448 * factor, 112 * factor, 56 * factor,
                  tuple((x * factor, 28 * factor) for x in (100, 200, 300)),
                  period=4, budget=448 * 112, detail=56 * factor, fade=4 * factor)


BUDGET_FACTORS = (1, 2, 4)  # the sweep's down-scale factors
LAYOUTS = {layout.name: layout for layout in (BEACON, NESTED, *(beacon_at(f) for f in BUDGET_FACTORS))}
PATTERNS = ["horizontal stripes", "vertical stripes", "checks"]
TINTS = {"red": (190, 50, 50), "green": (50, 150, 60), "blue": (60, 80, 200)}
PLACES = list(TINTS)  # panel index -> the colour that marks it when it is the target
GREY = (128, 128, 128)
QUESTION = "Which pattern fills the coloured square?"  # the colour is not named: the image says where
PANELS = BEACON.panels


def panel_box(index: int, layout: Layout = BEACON) -> list[int]:
    """[x1, y1, x2, y2] of panel ``index`` in original pixels."""
    x, y = layout.panels[index]
    return [x, y, x + layout.side, y + layout.side]


def target_box(index: int, layout: Layout = BEACON) -> list[int]:
    """The region that answers the question when panel ``index`` is the target: its centre."""
    x1, y1, _, _ = panel_box(index, layout)
    margin = (layout.side - layout.detail) // 2
    return [x1 + margin, y1 + margin, x1 + margin + layout.detail, y1 + margin + layout.detail]


def _pattern(kind: int, layout: Layout) -> np.ndarray:
    """A side x side field of -1/+1 with the contrast faded in near the edges."""
    side, period = layout.side, layout.period
    y, x = np.mgrid[0:side, 0:side]
    h, v = (y % period) < period // 2, (x % period) < period // 2
    sign = np.where([h, v, h ^ v][kind], -1.0, 1.0)
    edge = np.minimum(np.minimum(y, side - 1 - y), np.minimum(x, side - 1 - x))
    return sign * np.clip(edge / layout.fade, 0.0, 1.0)


def draw(target: int, patterns: list[int], layout: Layout = BEACON) -> Image.Image:
    """The image: panel ``i`` holds ``patterns[i]``; the target panel carries its place's tint."""
    img = np.full((layout.height, layout.width, 3), GREY, dtype=float)
    for i, kind in enumerate(patterns):
        x1, y1, x2, y2 = panel_box(i, layout)
        mean = np.array(TINTS[PLACES[i]] if i == target else GREY, dtype=float)
        img[y1:y2, x1:x2] = mean + _pattern(kind, layout)[..., None] * 50.0
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))


def beacon_records(index: int, seed: int, split: str, image_dir: Path, every_panel: bool = False,
                   layout: Layout = BEACON, scene: str | None = None) -> list[dict]:
    """One image and its record, with the target's box and the true answer.

    ``every_panel`` (the base model's SFT data) gives one record per panel instead, each with
    that panel as its box and the pattern *in that panel* as its answer. Every image is seen
    with every box, so the base learns the format and to report the pattern of the crop it is
    shown, and nothing about which panel to pick: only a crop of the tinted panel answers the
    question, which the base is never told. ``scene`` (default ``split``) names the draw: splits
    with the same scene hold the same scenes (target panel and patterns), e.g. one test set drawn
    at several down-scale factors."""
    rng = random.Random(f"beacon-{seed}-{scene or split}-{index}")
    target = rng.randrange(len(layout.panels))
    patterns = [rng.randrange(len(PATTERNS)) for _ in range(len(layout.panels))]
    name = f"{split}-{index:05d}.png"
    draw(target, patterns, layout).save(image_dir / name, compress_level=1)
    record = {"id": f"{layout.name}-{split}-{index:05d}", "image": f"images/{name}", "question": QUESTION,
              "options": PATTERNS, "answer": LETTERS[patterns[target]], "category": "square",
              "target_boxes": [target_box(target, layout)]}
    if not every_panel:
        return [record]
    return [{**record, "id": f"{record['id']}-panel{c}", "target_boxes": [target_box(c, layout)],
             "answer": LETTERS[patterns[c]]}
            for c in range(len(layout.panels))]


def locate_record(index: int, seed: int, split: str, image_dir: Path, layout: Layout = BEACON) -> dict:
    """A generic grounding exercise on other images: flat panels, no patterns, one tinted; the
    question asks the tint's colour and the box is the tinted panel. It teaches "box the
    coloured square" (and the colour-place link) without ever pairing the pattern question
    with the box of its target."""
    rng = random.Random(f"locate-{seed}-{split}-{index}")
    target = rng.randrange(len(layout.panels))
    img = np.full((layout.height, layout.width, 3), GREY, dtype=np.uint8)
    for i in range(len(layout.panels)):
        x1, y1, x2, y2 = panel_box(i, layout)
        img[y1:y2, x1:x2] = TINTS[PLACES[i]] if i == target else (100, 100, 100)
    name = f"{split}-locate-{index:05d}.png"
    Image.fromarray(img).save(image_dir / name, compress_level=1)
    return {"id": f"locate-{split}-{index:05d}", "image": f"images/{name}",
            "question": "What colour is the coloured square?", "options": PLACES,
            "answer": LETTERS[target], "category": "locate", "target_boxes": [target_box(target, layout)]}


def build_beacon(out: Path, n: int, seed: int, split: str, every_panel: bool = False, locate: int = 0,
                 layout: Layout = BEACON, scene: str | None = None) -> Path:
    """``n`` images (``every_panel``: one record per panel) and ``locate`` grounding exercises;
    ``scene``: see ``beacon_records``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = [r for i in range(n) for r in beacon_records(i, seed, split, out / "images", every_panel, layout, scene)]
    rows += [locate_record(i, seed, split, out / "images", layout) for i in range(locate)]
    path = out / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.beacon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", type=plain_name, default="train", help="the file's name: <split>.jsonl")
    parser.add_argument("--every-panel", action="store_true", help="one record per panel (the base's SFT data)")
    parser.add_argument("--locate", type=int, default=0, help="generic grounding exercises to add")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="beacon")
    args = parser.parse_args(argv)
    print(build_beacon(Path(args.out_dir), args.n, args.seed, args.split, args.every_panel, args.locate,
                       LAYOUTS[args.layout]))


if __name__ == "__main__":
    main()
