"""The miniature reproduction: MGPO from the embedded base model, over seeds, measured.

    python -m mgpo.repro --seeds 0 1 2 --steps 60        # `make repro`, writes docs/reproduction.md
    python -m mgpo.repro --task beacon --seeds 0 1 --steps 150   # grounding from the answer reward

For each seed: ``train.py`` with ``configs/tiny_demo.yaml`` from ``build/base/model``
(built first when missing), the greedy test accuracy of the checkpoints every
``--eval-every`` steps, and the training curves (reward, valid-box share) from
``metrics.jsonl``. Writes the table and the curves (PNG, drawn with PIL) to
``docs/reproduction.md`` and ``docs/reproduction/``.

``--task beacon`` does the same from ``build/beacon`` with ``configs/tiny_beacon.yaml``: the
answer is legible only in a crop, so the curves to read are the IoU of the turn-1 box with
the target and the test accuracy (see ``mgpo.beacon``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_seed(seed: int, steps: int, eval_every: int, base: Path, out: Path, config: str) -> dict:
    """Train one seed from the base and evaluate its checkpoints; return curves and accuracies."""
    run = out / f"mgpo-seed{seed}"
    start = time.time()
    common = [f"model.path={base / 'model'}", f"data.train={base / 'data' / 'train.jsonl'}",
              f"data.eval={base / 'data' / 'test.jsonl'}"]
    _run([sys.executable, "train.py", "--config", config, *common, f"train.output_dir={run}", f"train.seed={seed}",
          f"train.max_steps={steps}", f"train.save_every={eval_every}", "train.keep_last=100", "train.resume=none",
          "train.allow_config_change=true"])
    minutes = (time.time() - start) / 60
    accuracy, iou = {}, {}
    for step in range(eval_every, steps + 1, eval_every):
        ckpt = run / "checkpoints" / f"step-{step:06d}" / "model"
        _run([sys.executable, "eval.py", "--config", config, *common, f"model.path={ckpt}",
              f"eval.output_dir={run / f'eval-{step}'}", "eval.overwrite=true"])
        result = json.loads((run / f"eval-{step}" / "metrics.json").read_text())["results"]
        accuracy[step] = next(iter(result.values()))["accuracy"]
        iou[step] = next(iter(result.values()))["grounding"]["mean_iou"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"seed": seed, "minutes": minutes, "accuracy": accuracy, "iou": iou,
            "reward": [(r["step"], r["reward/mean"]) for r in rows],
            "valid_box": [(r["step"], r["grounding/valid_box_share"]) for r in rows],
            "train_iou": [(r["step"], r.get("grounding/iou", 0.0)) for r in rows]}


def plot(series: dict[str, list[tuple[float, float]]], title: str, path: Path, y_max: float = 1.0) -> None:
    """A line chart as a PNG: one line per series, steps on x, [0, y_max] on y."""
    W, H, L, B, T, R = 640, 360, 50, 40, 30, 120
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x_max = max((x for pts in series.values() for x, _ in pts), default=1) or 1
    sx = lambda x: L + (W - L - R) * x / x_max  # noqa: E731
    sy = lambda y: H - B - (H - B - T) * y / y_max  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline=(0, 0, 0))
    for k in range(5):
        y = y_max * k / 4
        d.line([L, sy(y), W - R, sy(y)], fill=(225, 225, 225))
        d.text((8, sy(y) - 6), f"{y:.2f}", fill=(0, 0, 0))
    d.text((L, H - B + 8), "0", fill=(0, 0, 0))
    d.text((W - R - 20, H - B + 8), f"step {x_max:.0f}", fill=(0, 0, 0))
    d.text((L, 8), title, fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        if len(pts) > 1:
            d.line([(sx(x), sy(y)) for x, y in pts], fill=colour, width=2)
        d.text((W - R + 10, T + 16 * i), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_report(base: dict, runs: list[dict], docs: Path, command: str, task: str = "colours") -> Path:
    figures = docs / "reproduction"
    prefix = "" if task == "colours" else f"{task}_"
    charts = {"reward": ("training reward (MGPO)", "reward"), "valid_box": ("valid-box share (MGPO)", "valid_box")}
    if task != "colours":
        charts["iou"] = ("IoU of the turn-1 box with the target (MGPO, training rollouts)", "train_iou")
    for name, (title, key) in charts.items():
        plot({f"seed {r['seed']}": r[key] for r in runs}, title, figures / f"{prefix}{name}.png")
    steps = sorted(runs[0]["accuracy"])
    tables = []
    for label, key, base_value, fmt in (("Greedy test accuracy (%)", "accuracy", base["test_accuracy"], "{:.1f}"),
                                        ("Greedy test IoU of the turn-1 box with the target", "iou",
                                         base.get("mean_iou") or 0.0, "{:.2f}")):
        if key == "iou" and task == "colours":
            continue
        head = "| seed | base | " + " | ".join(f"step {s}" for s in steps) + " | minutes |"
        lines = [f"{label}, {base.get('n_test', 64)} questions:", "", head, "|" + "---|" * (len(steps) + 3)]
        for r in runs:
            vals = " | ".join(fmt.format(r[key][s]) for s in steps)
            lines.append(f"| {r['seed']} | {fmt.format(base_value)} | {vals} | {r['minutes']:.1f} |")
        mean = " | ".join(fmt.format(sum(r[key][s] for r in runs) / len(runs)) for s in steps)
        lines.append(f"| mean | {fmt.format(base_value)} | {mean} | |")
        tables.append("\n".join(lines))
    about = f"the base model (seed {base['seed']}, {base['sft_steps']} SFT steps"
    about += f", label noise {base['label_noise']})" if "label_noise" in base else ")"
    path = docs / "reproduction.md"
    text = path.read_text() if path.exists() else ""
    tag = "repro" if task == "colours" else f"repro-{task}"
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    images = "\n".join(f"![{title}](reproduction/{prefix}{name}.png)" for name, (title, _) in charts.items())
    block = f"{start}\nGenerated by `{command}`, from {about}.\n\n" + "\n\n".join(tables) + f"\n\n{images}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + block + "\n"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--task", choices=["colours", "beacon"], default="colours")
    parser.add_argument("--base", help="default: build/base (colours), build/beacon (beacon)")
    parser.add_argument("--out", help="default: runs/repro (colours), runs/repro-beacon")
    parser.add_argument("--config", help="default: configs/tiny_demo.yaml (colours), configs/tiny_beacon.yaml")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args(argv)
    beacon = args.task == "beacon"
    base = Path(args.base or ("build/beacon" if beacon else "build/base"))
    out = Path(args.out or ("runs/repro-beacon" if beacon else "runs/repro"))
    config = args.config or ("configs/tiny_beacon.yaml" if beacon else "configs/tiny_demo.yaml")
    if not (base / "base.json").exists():
        _run([sys.executable, "-m", "mgpo.base", str(base), "--task", args.task])
    runs = [run_seed(s, args.steps, args.eval_every, base, out, config) for s in args.seeds]
    command = (f"python -m mgpo.repro{' --task beacon' if beacon else ''} --seeds {' '.join(map(str, args.seeds))} "
               f"--steps {args.steps} --eval-every {args.eval_every}")
    path = write_report(json.loads((base / "base.json").read_text()), runs, Path(args.docs), command, args.task)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
