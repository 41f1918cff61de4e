"""The embedded base models: warm-started tiny Qwen2.5-VLs that the MGPO runs start from.

    python -m mgpo.tools.base build/base                   # `make base`: the colours task, ~1.6 min on 2 cores
    python -m mgpo.tools.base build/beacon --task beacon   # the beacon task (grounding), ~6.5 min
    python -m mgpo.tools.base build/nested --task nested   # two zooms needed (the K-turn experiment)
    python -m mgpo.tools.base build/demo --task demo       # `make demo`'s: the beacon task, ~2.3 min
    python -m mgpo.tools.base build/budgets --task budgets # the pixel-budget sweep's, ~3 min

A random tiny model never writes ``\\boxed{}``, so its reward is 0 and RL has nothing to
work with. This builds, deterministically from a seed:

1. ``data/``: the *colours* task. A 224-px image of grey clutter holds one large square
   in red, green or blue; the question asks its colour, with the options always in that
   order. ``sft.jsonl`` carries noisy labels (60% of them replaced by a random letter),
   ``train.jsonl`` and ``test.jsonl`` the true ones.
2. ``model/``: the tiny checkpoint after SFT (``train.algorithm=sft``) on ``sft.jsonl`` in
   the MGPO template: turn 1 a box around the square, turn 2 ``\\boxed{LETTER}``. The
   noisy labels are on purpose: the base learns the two-turn format and only a weak
   preference for the right letter (the best an SFT model can do on these labels is
   40% + 60% / 3 = 60% right), leaving room for the answer reward to teach the rest.
3. ``base.json``: where it starts (greedy test accuracy, valid-box share).

What this shows is that the trainer learns from the answer reward. The colour is visible at the model's resolution, so the crop does not
matter here: it is not the paper's emergent grounding (see docs/reproduction.md).

``--task beacon`` builds the base for the grounding experiment instead (``mgpo.tools.beacon``: the
answer is legible only in a crop of the tinted panel). Its SFT data: every training image
once per panel, the box on that panel and the answer the pattern inside it (so nothing
says which panel to pick), plus "what colour is the coloured square?" exercises on other,
pattern-free images with the box on the tinted panel, a generic grounding skill. Each SFT
batch takes the MGPO or the one-turn GRPO template in turn, so that both methods start from
this one model (``python -m mgpo.tools.repro --task beacon`` compares them). The base never sees the pattern question with its target's box; whether MGPO makes the skill
transfer to it is what ``python -m mgpo.tools.repro --task beacon`` measures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..config import ConfigError
from ..runtime.family import FAMILIES
from .args import claim_folder, positive_int

MARKER = "MGPO_BASE.json"  # in every folder this tool builds: only such a folder is ever rebuilt
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 70, 220)}
SIZE = 224  # px: 64 merged image tokens at the tiny budget, so a CPU step takes seconds
LABEL_NOISE = 0.6  # share of SFT labels replaced by a random letter
SFT_STEPS = 300


def colours_record(index: int, seed: int, split: str, image_dir: Path, label_noise: float = 0.0) -> dict:
    """Draw one image and return its JSONL record."""
    from ..data.records import LETTERS

    rng = random.Random(f"colours-{seed}-{split}-{index}")
    img = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for _ in range(30):  # grey clutter
        x, y, g = rng.randrange(SIZE), rng.randrange(SIZE), rng.randrange(90, 170)
        draw.rectangle([x, y, x + rng.randrange(4, 20), y + rng.randrange(4, 20)], fill=(g, g, g))
    names = list(COLOURS)
    colour = rng.randrange(len(names))
    side = rng.randrange(56, 96)
    x, y = rng.randrange(0, SIZE - side), rng.randrange(0, SIZE - side)
    draw.rectangle([x, y, x + side, y + side], fill=COLOURS[names[colour]])
    name = f"{split}-{index:05d}.png"
    img.save(image_dir / name)
    answer = LETTERS[colour] if rng.random() >= label_noise else rng.choice(LETTERS[: len(names)])
    return {"id": f"colours-{split}-{index:05d}", "image": f"images/{name}",
            "question": "What is the color of the square?", "options": names, "answer": answer,
            "category": "colour", "target_boxes": [[x, y, x + side, y + side]]}


def build_colours(out: Path, n: int, seed: int, split: str, label_noise: float = 0.0) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = [colours_record(i, seed, split, out / "images", label_noise) for i in range(n)]
    path = out / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_overrides(out: Path) -> list[str]:
    """Config overrides (on configs/tiny_cpu.yaml) shared by the base's SFT and the demo."""
    return [f"data.train={out / 'data' / 'train.jsonl'}", f"data.eval={out / 'data' / 'test.jsonl'}",
            "rollout.max_new_tokens_turn1=40", "rollout.max_new_tokens_turn2=12"]


BEACON_SFT_STEPS = 1000
DEMO_SFT_STEPS = 400
# How a base is evaluated (and how `mgpo.tools.repro` trains and evaluates each method from it):
# method -> (template, turns)
METHODS = {
    "mgpo": ("mgpo", 2),  # the paper's two turns: box, crop of the original, answer
    "grpo": ("grpo", 2),  # the paper's one-turn baseline: box and answer in one turn, no crop
    "mgpo_k2": ("mgpo_k", 2),  # this project's K-turn template, K = 2: one zoom at most
    "mgpo_k3": ("mgpo_k", 3),  # K = 3: up to two zooms, the second inside the first crop
}


def method_overrides(method: str) -> list[str]:
    """The config overrides that train and evaluate ``method``."""
    template, turns = METHODS[method]
    return [f"rollout.template={template}", f"rollout.max_turns={turns}", f"eval.mode={template}",
            f"eval.max_turns={turns}"]


@dataclass(frozen=True)
class Task:
    overrides: tuple[str, ...]  # on configs/tiny_cpu.yaml, for the SFT and the evaluations
    sft_steps: int
    methods: tuple[str, ...]  # the base is evaluated in each one's conversation
    layout: str = ""  # the beacon layout its images are drawn in ("": the colours task)
    lr: float = 1e-3  # SFT learning rate
    test_images: int = 64  # held-out questions the base (and the runs from it) are evaluated on
    sft_images: int = 256  # beacon layouts: images in the SFT data, each once per panel
    locate: int = 384  # beacon layouts: "what colour is the coloured square?" exercises in the SFT data
    sft_methods: tuple[str, ...] = ()  # the conversations the SFT teaches, in turn (default: methods)
    factors: tuple[int, ...] = ()  # the pixel-budget sweep: beacon drawn at these down-scale factors


TASKS = {
    "colours": Task((), SFT_STEPS, ("mgpo",)),
    # the pixel budget of configs/tiny_beacon.yaml; both templates, so MGPO and the one-turn
    # GRPO baseline start from the same model
    "beacon": Task(("model.min_pixels=50176", "model.max_pixels=50176"), BEACON_SFT_STEPS, ("mgpo", "grpo"),
                   layout="beacon"),
    # `make demo`'s base: the beacon task, 400 SFT steps on half the images and twice the
    # grounding exercises (so the skill the RL run transfers is learnt sooner), both
    # conversations as the beacon base; evaluated in the MGPO one only
    "demo": Task(("model.min_pixels=50176", "model.max_pixels=50176"), DEMO_SFT_STEPS, ("mgpo",), layout="beacon",
                 test_images=32, sft_images=128, locate=768, sft_methods=("mgpo", "grpo")),
    # the pixel-budget sweep (`python -m mgpo.tools.repro --task budgets`): the beacon at 1x, 2x
    # and 4x the model's view, every factor in the SFT data, so the base reads a crop at each
    # scale (and, in the one-turn template, the whole image where the pattern survives)
    "budgets": Task(("model.min_pixels=50176", "model.max_pixels=50176"), 600, ("mgpo", "grpo"), layout="beacon",
                    test_images=32, sft_images=64, locate=768, factors=(1, 2, 4)),
    # configs/tiny_nested.yaml: K = 2 and K = 3 conversations in turn, from one model
    "nested": Task(("model.min_pixels=12544", "model.max_pixels=12544", "rollout.max_new_tokens_turn2=40"),
                   BEACON_SFT_STEPS, ("mgpo_k2", "mgpo_k3"), layout="nested"),
}


def sft_overrides(task: Task) -> list[str]:
    """One SFT batch per method, in turn: its template (and, for mgpo_k, its number of turns)."""
    methods = task.sft_methods or task.methods
    templates = [METHODS[m][0] for m in methods]
    out = [f"train.sft_templates=[{','.join(templates)}]"]
    if "mgpo_k" in templates:
        out += ["rollout.template=mgpo_k", f"rollout.max_turns={max(t for _, t in map(METHODS.get, methods))}",
                f"train.sft_max_turns=[{','.join(str(METHODS[m][1]) for m in methods)}]"]
    return out


def build_data(data: Path, seed: int, task: Task) -> None:
    if task.factors:
        build_budgets(data, seed, task)
        return
    if task.layout:
        from .beacon import LAYOUTS, build_beacon

        layout = LAYOUTS[task.layout]
        build_beacon(data, task.sft_images, seed, "sft", every_panel=True, locate=task.locate, layout=layout)
        build_beacon(data, 256, seed, "train", layout=layout)
        build_beacon(data, task.test_images, seed + 1, "test", layout=layout)
        return
    build_colours(data, 256, seed, "train")
    build_colours(data, 256, seed, "sft", LABEL_NOISE)
    build_colours(data, 64, seed + 1, "test")


def build_budgets(data: Path, seed: int, task: Task) -> None:
    """The sweep's data: per factor F, ``sft-xF`` (every panel of ``sft_images`` images),
    ``train-xF`` and ``test-xF``, each the same scenes at every factor (so the factors' figures
    are paired: only the resolution differs); ``sft.jsonl`` joins the SFT parts and the grounding
    exercises (a third at each factor); ``train.jsonl`` / ``test.jsonl`` are the largest factor's."""
    from .beacon import beacon_at, build_beacon

    parts = []
    for factor in task.factors:
        layout = beacon_at(factor)
        parts.append(build_beacon(data, task.sft_images, seed, f"sft-x{factor}", every_panel=True,
                                  locate=task.locate // len(task.factors), layout=layout, scene="sft"))
        build_beacon(data, 256, seed, f"train-x{factor}", layout=layout, scene="train")
        build_beacon(data, task.test_images, seed + 1, f"test-x{factor}", layout=layout, scene="test")
    (data / "sft.jsonl").write_text("".join(p.read_text() for p in parts))
    for split in ("train", "test"):
        shutil.copy(data / f"{split}-x{max(task.factors)}.jsonl", data / f"{split}.jsonl")


# The pixel budget a family sees the tasks' images at. Qwen2.5-VL's 50,176 px show the beacon's
# 1792 x 448 originals at 448 x 112 (64 tokens of 28 px); with Qwen3-VL's 32-px tokens the same budget
# would round the height down to 96 px, so it gets 65,536 px: 512 x 128, again 64 tokens.
FAMILY_BUDGET = {"qwen3-vl": {50176: 65536}}


def family_overrides(task: Task, family: str) -> list[str]:
    """The task's settings, its pixel budget moved to the family's equivalent."""
    moved = FAMILY_BUDGET.get(family, {})
    out = []
    for item in task.overrides:
        key, _, value = item.partition("=")
        if key in ("model.min_pixels", "model.max_pixels") and int(value) in moved:
            item = f"{key}={moved[int(value)]}"
        out.append(item)
    return out


def build_base(out: str | Path, seed: int = 0, sft_steps: int | None = None, task: str = "colours",
               config: str = "configs/tiny_cpu.yaml", family: str = "qwen2.5-vl"):
    """Data, SFT and the starting point (a tiny model of ``family``); returns the model folder."""
    from ..config import load_config
    from ..core.trainer import train
    from ..eval.evaluate import evaluate
    from .tiny import build_tiny_checkpoint

    out = claim_folder(out, MARKER, "mgpo.tools.base")
    spec = TASKS[task]
    sft_steps = spec.sft_steps if sft_steps is None else sft_steps
    if sft_steps < 1:
        raise ConfigError(f"sft_steps must be at least 1, got {sft_steps}")
    start = time.time()
    data = out / "data"
    build_data(data, seed, spec)
    init = build_tiny_checkpoint(out / "init", seed=seed, arch=family)
    overrides = family_overrides(spec, family)
    cfg = load_config(config, [*base_overrides(out), *overrides, f"model.path={init}", f"data.train={data / 'sft.jsonl'}",
                               "train.algorithm=sft", f"train.output_dir={out / 'sft'}", "train.resume=none",
                               "train.overwrite=true", f"train.seed={seed}", "train.epochs=1000",
                               f"train.max_steps={sft_steps}", "train.prompts_per_rollout=16",
                               "train.prompts_per_step=16", "train.micro_batch_size=8", f"train.lr={spec.lr}",
                               *sft_overrides(spec),
                               f"train.save_every={sft_steps}", "train.log_every=50", "loss.kl_coef=0"])
    result = train(cfg)
    model = out / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(result.output_dir / f"checkpoint-{sft_steps}" / "model", model)
    modes = {}
    for mode in spec.methods:
        ev = load_config(config, [*base_overrides(out), *overrides, f"model.path={model}",
                                  *method_overrides(mode), f"eval.output_dir={out / 'eval' / mode}",
                                  "eval.overwrite=true"])
        metrics = evaluate(ev)["results"]["test"]
        modes[mode] = {"test_accuracy": metrics["accuracy"], "valid_box": metrics["grounding"]["valid_box"],
                       "mean_iou": metrics["grounding"]["mean_iou"],
                       "holds": metrics["grounding"]["crop_contains_target"] or 0.0}
    summary = {"task": task, "family": family, "seed": seed, "sft_steps": sft_steps, "methods": list(spec.sft_methods or spec.methods),
               "minutes": (time.time() - start) / 60, **modes[spec.methods[0]], "modes": modes}
    if task == "colours":
        summary["label_noise"] = LABEL_NOISE
    (out / "base.json").write_text(json.dumps(summary, indent=2) + "\n")
    for mode, m in modes.items():
        print(f"base model: {model}, {mode} template: greedy test accuracy {m['test_accuracy']:.1f}%, valid box "
              f"{m['valid_box']:.1f}%, IoU {m['mean_iou']:.2f}")
    print(f"built in {summary['minutes']:.1f} min")
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=sorted(TASKS), default="colours")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2.5-vl",
                        help="the model family of the tiny starting point (its box convention and resize)")
    parser.add_argument("--sft-steps", type=positive_int, default=None, help="default: 300 (colours), 400 (demo), 1000 (beacon, nested)")
    args = parser.parse_args(argv)
    build_base(args.out_dir, args.seed, args.sft_steps, args.task, family=args.family)


if __name__ == "__main__":
    from ..cli import run_main

    run_main(main)
