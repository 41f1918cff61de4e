"""A synthetic high-resolution VQA set shaped like V* Bench, built from a seed.

Each image is large (long side 1500 to 4000 px) and cluttered with grey shapes and
small coloured distractors; the question is about one or two *small* target shapes
(each under 1% of the image area) drawn as thin outlines. After Qwen's down-scale to
the model's pixel budget the thin coloured strokes blur into the background, while a
crop around the target, enlarged, shows them clearly: exactly the situation MGPO's
grounding turn is meant to fix.

Two categories, named as in V* Bench so one evaluation serves both:

- ``direct_attributes``: "What is the color of the triangle?" (four options);
- ``relative_position``: "Is the red triangle on the left or right side of the blue
  circle?" (two options).

    python -m mgpo.tools.synth build/synth --n 64 --seed 0 --split train
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..data.records import LETTERS
from .args import plain_name, positive_int

COLORS = {
    "red": (220, 30, 30),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 210, 10),
    "purple": (150, 40, 190),
    "orange": (250, 130, 10),
    "cyan": (10, 200, 210),
    "pink": (250, 90, 180),
}
SHAPES = ["triangle", "circle", "square", "diamond"]
ASPECTS = [(4, 3), (3, 2), (16, 9), (1, 1), (3, 4), (2, 3), (9, 16), (2, 1)]
STROKE = 1  # target outline width in original pixels: thin enough to vanish when down-scaled


def _shape_points(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, color, width: int) -> None:
    if shape == "circle":
        draw.ellipse(box, outline=color, width=width)
    else:
        draw.polygon(_shape_points(shape, box), outline=color, width=width)


def _free_box(rng: random.Random, size: tuple[int, int], side: int, taken: list, margin: int):
    """A side x side box inside the image that keeps ``margin`` px from every taken box."""
    w, h = size
    for _ in range(200):
        x1 = rng.randint(margin, w - side - margin)
        y1 = rng.randint(margin, h - side - margin)
        box = (x1, y1, x1 + side, y1 + side)
        if all(box[2] + margin < t[0] or t[2] + margin < box[0] or box[3] + margin < t[1]
               or t[3] + margin < box[1] for t in taken):
            return box
    raise RuntimeError("could not place a shape; the image is too crowded")


def background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A grey gradient cluttered with large grey shapes (no colour, so targets stand out only up close)."""
    w, h = size
    base = rng.randint(110, 170)
    img = Image.linear_gradient("L").resize(size).point(lambda v: base - 30 + v * 60 // 255)
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(60, 120)):
        g = rng.randint(70, 210)
        s = rng.randint(w // 40, w // 6)
        x, y = rng.randint(-s // 2, w), rng.randint(-s // 2, h)
        kind = rng.choice(["rect", "ellipse", "line"])
        if kind == "rect":
            draw.rectangle((x, y, x + s, y + s * rng.uniform(0.3, 1.5)), fill=(g, g, g))
        elif kind == "ellipse":
            draw.ellipse((x, y, x + s, y + s * rng.uniform(0.3, 1.5)), fill=(g, g, g))
        else:
            draw.line((x, y, x + rng.randint(-s, s), y + rng.randint(-s, s)), fill=(g, g, g),
                      width=rng.randint(2, 12))
    return img


def make_sample(index: int, seed: int, image_dir: Path, split: str) -> dict:
    """Draw one image and its question; return the JSONL record."""
    rng = random.Random(f"{seed}-{split}-{index}")
    aw, ah = rng.choice(ASPECTS)
    long_side = rng.randint(1500, 4000)
    scale = long_side / max(aw, ah)
    size = (int(aw * scale), int(ah * scale))
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    area = size[0] * size[1]
    side_hi = min(56, int(math.sqrt(0.009 * area)))  # each target under 1% of the image
    taken: list[tuple[int, int, int, int]] = []

    category = "direct_attributes" if rng.random() < 0.6 else "relative_position"
    colors = rng.sample(sorted(COLORS), 4)
    shapes = rng.sample(SHAPES, 2)
    targets = []
    n_targets = 1 if category == "direct_attributes" else 2
    for k in range(n_targets):
        side = rng.randint(24, side_hi)
        box = _free_box(rng, size, side, taken, margin=side * 2)
        if k == 1:  # the second object must sit clearly left or right of the first
            for _ in range(50):
                if abs((box[0] + box[2]) / 2 - (targets[0][0] + targets[0][2]) / 2) > 4 * side:
                    break
                box = _free_box(rng, size, side, taken, margin=side * 2)
        taken.append(box)
        targets.append(box)
        draw_shape(draw, shapes[k], box, COLORS[colors[k]], STROKE)

    # Small coloured distractors of the shapes the question does not name.
    other_shapes = [s for s in SHAPES if s not in shapes]
    for _ in range(rng.randint(4, 10)):
        side = rng.randint(24, side_hi)
        try:
            box = _free_box(rng, size, side, taken, margin=side)
        except RuntimeError:
            break
        taken.append(box)
        draw_shape(draw, rng.choice(other_shapes), box, COLORS[rng.choice(sorted(COLORS))], STROKE)

    if category == "direct_attributes":
        question = f"What is the color of the {shapes[0]}?"
        options = colors[:]  # colors[0] is the truth; shuffle the presentation
        rng.shuffle(options)
        answer = LETTERS[options.index(colors[0])]
    else:
        question = (f"Is the {colors[0]} {shapes[0]} on the left or right side of the "
                    f"{colors[1]} {shapes[1]}?")
        options = ["left", "right"]
        first_x = (targets[0][0] + targets[0][2]) / 2
        second_x = (targets[1][0] + targets[1][2]) / 2
        answer = "A" if first_x < second_x else "B"

    name = f"{split}-{index:05d}.jpg"
    # 4:4:4 chroma: default JPEG subsampling would smear the thin coloured strokes itself.
    img.save(image_dir / name, quality=95, subsampling=0)
    return {
        "id": f"synth-{split}-{index:05d}",
        "image": f"images/{name}",
        "question": question,
        "options": options,
        "answer": answer,
        "category": category,
        "target_boxes": [list(b) for b in targets],
        "width": size[0],
        "height": size[1],
    }


def build_synth(out_dir: str | Path, n: int, seed: int = 0, split: str = "train") -> Path:
    """Write ``n`` samples to ``out_dir/{split}.jsonl`` (+ images) and return that path."""
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        def tqdm(x, **_):
            return x
    records = [make_sample(i, seed, image_dir, split)
               for i in tqdm(range(n), desc=f"synth {split}", leave=False)]
    path = out / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", type=plain_name, default="train", help="the file's name: <split>.jsonl")
    args = parser.parse_args(argv)
    path = build_synth(args.out_dir, args.n, args.seed, args.split)
    print(f"synthetic set: {path} ({args.n} samples, seed {args.seed})")


if __name__ == "__main__":
    main()
