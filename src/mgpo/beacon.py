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
crop needs only a colour read, not a spatial one: the kind of task the learning issue
accepts for its level (b) (a random tiny Qwen2.5-VL cannot learn to say *where* something
is, see docs/reproduction.md).

The panels sit at input boxes [100, 28, 156, 84], [200, 28, 256, 84] and [300, 28, 356, 84]:
the three box texts differ in two digits, both fixed by the first, so the choice of a panel
is one token and the tiny model's digit-by-digit box text is otherwise the same whichever
panel it picks.

    python -m mgpo.beacon build/beacon --n 256 --seed 0 --split train
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from .prompts import LETTERS

WIDTH, HEIGHT = 1792, 448  # original image, px: 448 x 112 at the 4x down-scale of the tiny budget
SIDE = 224  # panel side, px: a crop of one panel is shown at its own resolution
PANELS = [(400, 112), (800, 112), (1200, 112)]  # panel top-left corners: input boxes [100, 28, 156, 84] ...
PERIOD = 4  # px: divides the 4x down-scale (patterns average out), 2-px stripes in the crop
FADE = 16  # px over which the pattern's contrast fades in from each panel edge
PATTERNS = ["horizontal stripes", "vertical stripes", "checks"]
TINTS = {"red": (190, 50, 50), "green": (50, 150, 60), "blue": (60, 80, 200)}
PLACES = list(TINTS)  # panel index -> the colour that marks it when it is the target
GREY = (128, 128, 128)
QUESTION = "Which pattern fills the coloured square?"  # the colour is not named: the image says where


def panel_box(index: int) -> list[int]:
    """[x1, y1, x2, y2] of panel ``index`` in original pixels."""
    x, y = PANELS[index]
    return [x, y, x + SIDE, y + SIDE]


def _pattern(kind: int) -> np.ndarray:
    """A SIDE x SIDE field of -1/+1 with the contrast faded in near the edges."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    h, v = (y % PERIOD) < PERIOD // 2, (x % PERIOD) < PERIOD // 2
    sign = np.where([h, v, h ^ v][kind], -1.0, 1.0)
    edge = np.minimum(np.minimum(y, SIDE - 1 - y), np.minimum(x, SIDE - 1 - x))
    return sign * np.clip(edge / FADE, 0.0, 1.0)


def draw(target: int, patterns: list[int]) -> Image.Image:
    """The image: panel ``i`` holds ``patterns[i]``; the target panel carries its place's tint."""
    img = np.full((HEIGHT, WIDTH, 3), GREY, dtype=float)
    for i, kind in enumerate(patterns):
        x1, y1, x2, y2 = panel_box(i)
        mean = np.array(TINTS[PLACES[i]] if i == target else GREY, dtype=float)
        img[y1:y2, x1:x2] = mean + _pattern(kind)[..., None] * 50.0
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))


def beacon_records(index: int, seed: int, split: str, image_dir: Path, every_panel: bool = False) -> list[dict]:
    """One image and its record, with the target's box and the true answer.

    ``every_panel`` (the base model's SFT data) gives one record per panel instead, each with
    that panel as its box and the pattern *in that panel* as its answer. Every image is seen
    with every box, so the base learns the format and to report the pattern of the crop it is
    shown, and nothing about which panel to pick: only a crop of the tinted panel answers the
    question, which the base is never told."""
    rng = random.Random(f"beacon-{seed}-{split}-{index}")
    target = rng.randrange(len(PANELS))
    patterns = [rng.randrange(len(PATTERNS)) for _ in range(len(PANELS))]
    name = f"{split}-{index:05d}.png"
    draw(target, patterns).save(image_dir / name, compress_level=1)
    record = {"id": f"beacon-{split}-{index:05d}", "image": f"images/{name}", "question": QUESTION,
              "options": PATTERNS, "answer": LETTERS[patterns[target]], "category": "square",
              "target_boxes": [panel_box(target)]}
    if not every_panel:
        return [record]
    return [{**record, "id": f"{record['id']}-panel{c}", "target_boxes": [panel_box(c)],
             "answer": LETTERS[patterns[c]]}
            for c in range(len(PANELS))]


def locate_record(index: int, seed: int, split: str, image_dir: Path) -> dict:
    """A generic grounding exercise on other images: flat panels, no patterns, one tinted; the
    question asks the tint's colour and the box is the tinted panel. It teaches "box the
    coloured square" (and the colour-place link) without ever pairing the pattern question
    with the box of its target."""
    rng = random.Random(f"locate-{seed}-{split}-{index}")
    target = rng.randrange(len(PANELS))
    img = np.full((HEIGHT, WIDTH, 3), GREY, dtype=np.uint8)
    for i in range(len(PANELS)):
        x1, y1, x2, y2 = panel_box(i)
        img[y1:y2, x1:x2] = TINTS[PLACES[i]] if i == target else (100, 100, 100)
    name = f"{split}-locate-{index:05d}.png"
    Image.fromarray(img).save(image_dir / name, compress_level=1)
    return {"id": f"locate-{split}-{index:05d}", "image": f"images/{name}",
            "question": "What colour is the coloured square?", "options": PLACES,
            "answer": LETTERS[target], "category": "locate", "target_boxes": [panel_box(target)]}


def build_beacon(out: Path, n: int, seed: int, split: str, every_panel: bool = False, locate: int = 0) -> Path:
    """``n`` images (``every_panel``: one record per panel) and ``locate`` grounding exercises."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = [r for i in range(n) for r in beacon_records(i, seed, split, out / "images", every_panel)]
    rows += [locate_record(i, seed, split, out / "images") for i in range(locate)]
    path = out / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--every-panel", action="store_true", help="one record per panel (the base's SFT data)")
    args = parser.parse_args(argv)
    print(build_beacon(Path(args.out_dir), args.n, args.seed, args.split, args.every_panel))


if __name__ == "__main__":
    main()
