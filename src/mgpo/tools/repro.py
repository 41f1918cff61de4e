"""The miniature reproduction: MGPO from the embedded base models, over seeds, measured.

    python -m mgpo.tools.repro --seeds 0 1 2 --steps 60                  # colours (`make repro`)
    python -m mgpo.tools.repro --task beacon --seeds 0 1 2 --steps 60 --eval-every 30   # Tables 1, 3
    python -m mgpo.tools.repro --task budgets --seeds 0 1 2 --steps 40   # Table 2 (`make repro-budgets`)
    python -m mgpo.tools.repro --task nested --seeds 0 1 2 --steps 200 --eval-every 50  # K = 3 vs K = 2

For each seed: ``train.py`` with ``configs/tiny_colours.yaml`` from ``build/base/model``
(built first when missing), the greedy test accuracy of the checkpoints every
``--eval-every`` steps, and the training curves (reward, valid-box share) from
``metrics.jsonl``. Writes the table and the curves (PNG, drawn with PIL) to
``docs/reproduction.md`` and ``docs/reproduction/``.

``--task beacon`` does the same from ``build/beacon`` with ``configs/tiny_beacon.yaml``, for
MGPO, the paper's one-turn GRPO baseline and its SFT baseline (the answers only, no box)
from the same base (``--methods``): the answer is legible only in a crop, so the curves to
read are the IoU of the turn-1 box with the target, the valid-box share (the paper's Figure
7) and the test accuracy (see ``mgpo.tools.beacon``). It also measures the paper's Table 3:
the share of test questions whose turn-1 crop lets the base model answer right (``eval.py
crops``).

``--task budgets`` is the paper's Table 2: the beacon scene at several down-scale factors of
the model's fixed view (``build/budgets``), the base and each method at each factor, each
run evaluated once, at its last step; a table and a chart of accuracy against the budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import fmean

from PIL import Image, ImageDraw

from ..config import load_config
from .args import plain_name, positive_int
from .base import METHODS, method_overrides

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


LABELS = {"mgpo": "MGPO", "grpo": "GRPO", "mgpo_k2": "MGPO-K, K=2", "mgpo_k3": "MGPO-K, K=3",
          "sft": "SFT (answer only)", "mgpo_seq": "MGPO, sequence ratio (GSPO)",
          "mgpo_geo": "MGPO, geometric ratio (GMPO)", "mgpo_noscale": "MGPO, no std scaling (Dr. GRPO)"}
# MGPO with another objective (the loss section's options): trained with these overrides, evaluated as MGPO
VARIANTS = {"mgpo_seq": ["loss.ratio=sequence"], "mgpo_geo": ["loss.ratio=geometric"],
            "mgpo_noscale": ["loss.adv_scale=none"]}
METHOD_OF = {"sft": "grpo", **dict.fromkeys(VARIANTS, "mgpo")}  # the conversation a method is evaluated in
TASK_DEFAULTS = {  # task -> (default base folder, config, methods)
    "colours": ("build/base", "configs/tiny_colours.yaml", ["mgpo"]),
    "beacon": ("build/beacon", "configs/tiny_beacon.yaml", ["mgpo", "grpo", "sft"]),
    "budgets": ("build/budgets", "configs/tiny_beacon.yaml", ["mgpo", "grpo"]),
    "nested": ("build/nested", "configs/tiny_nested.yaml", ["mgpo_k2", "mgpo_k3"]),
}


def run_seed(seed: int, steps: int, eval_every: int, base: Path, out: Path, config: str, method: str = "mgpo",
             judge: str | None = None, data: tuple[Path, Path] | None = None, name: str | None = None,
             settings: tuple[str, ...] = ()) -> dict:
    """Train one seed of ``method`` from the base and evaluate its checkpoints (``collect`` reads
    the figures back). With ``judge``, also the share of the last checkpoint's test questions
    the judge answers from their turn-1 crops (the paper's Table 3). ``data``: the (train,
    test) files, by default the base's own. ``method`` "sft" is the paper's SFT baseline: the
    same training questions with their answers only (no box), one turn, as many examples as
    an RL run of as many steps takes. ``settings``: config overrides for the training run only.
    """
    run = out / (name or f"{method}-seed{seed}")
    train_file, test_file = data or (base / "data" / "train.jsonl", base / "data" / "test.jsonl")
    common = [f"model.path={base / 'model'}", f"data.eval={test_file}", *method_overrides(METHOD_OF.get(method, method))]
    if method == "sft":
        run.mkdir(parents=True, exist_ok=True)
        answers = answers_only(train_file, run.parent / f"{train_file.stem}-answers.jsonl")
        fit = ["train.algorithm=sft", "train.sft_templates=[grpo]", f"data.train={answers}",
               f"data.image_root={train_file.parent.resolve()}"]
    else:
        fit = [f"data.train={train_file}", *VARIANTS.get(method, [])]
    _run([sys.executable, "train.py", "--config", config, *common, *fit, *settings, f"train.output_dir={run}",
          f"train.seed={seed}", f"train.max_steps={steps}", f"train.save_every={eval_every}", "train.keep_last=100",
          "train.resume=none", "train.overwrite=true"])
    for step in range(eval_every, steps + 1, eval_every):
        _evaluate(run / f"checkpoint-{step}" / "model", test_file, config, method, run / f"eval-{step}")
    if judge and method != "sft":
        crops(run / f"eval-{steps}", judge)
    return collect(run, method, seed)


def _evaluate(model: Path, test_file: Path, config: str, method: str, out: Path, extra: tuple[str, ...] = ()) -> float:
    """``eval.py`` on ``model`` in ``method``'s conversation; its greedy test accuracy."""
    _run([sys.executable, "eval.py", "--config", config, f"model.path={model}", f"data.eval={test_file}",
          *method_overrides(METHOD_OF.get(method, method)), *extra, f"eval.output_dir={out}", "eval.overwrite=true"])
    return _accuracy(out)


def _result(eval_dir: Path) -> dict:
    return next(iter(json.loads((eval_dir / "metrics.json").read_text())["results"].values()))


def _accuracy(eval_dir: Path) -> float:
    return _result(eval_dir)["accuracy"]


def answers_only(records: Path, out: Path) -> Path:
    """``records`` without their target boxes (image paths as they were: resolve them against
    ``records``' folder): the SFT baseline's data."""
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "target_boxes"}) + "\n" for r in rows))
    return out


def collect(run: Path, method: str, seed: int) -> dict:
    """One run's figures from its folder: the training curves (``metrics.jsonl``), each
    evaluated checkpoint's test accuracy, valid-box share, IoU and share of turn-1 crops holding
    the target, Table 3 when measured, and the training minutes (from the config's writing to
    the last checkpoint's)."""
    accuracy, iou, valid, holds = {}, {}, {}, {}
    for folder in sorted(run.glob("eval-*"), key=lambda f: int(f.name.split("-")[1])):
        step = int(folder.name.split("-")[1])
        result = next(iter(json.loads((folder / "metrics.json").read_text())["results"].values()))
        accuracy[step], iou[step] = result["accuracy"], result["grounding"]["mean_iou"] or 0.0
        valid[step] = result["grounding"]["valid_box"]
        holds[step] = result["grounding"].get("crop_contains_target") or 0.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward/mean" in r]  # RL steps only: an SFT run logs its loss, no rollouts
    last = max(run.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    found = {"method": method, "seed": seed, "accuracy": accuracy, "iou": iou, "valid": valid, "holds": holds,
             "minutes": (last.stat().st_mtime - (run / "config.yaml").stat().st_mtime) / 60,
             "reward": [(r["step"], r["reward/mean"]) for r in rows],
             "valid_box": [(r["step"], r["grounding/valid_box_share"]) for r in rows],
             "train_iou": [(r["step"], r.get("grounding/iou", 0.0)) for r in rows],
             "train_holds": [(r["step"], r.get("grounding/box_holds_target", 0.0)) for r in rows]}
    table3 = run / f"eval-{max(accuracy)}" / "crop_answerable.json"
    if table3.exists():
        found["crops"] = json.loads(table3.read_text())["share"]
    return found


def crops(eval_dir: Path, judge: str) -> float:
    """Table 3 for one evaluation folder (``eval.py crops``): % of questions answerable from the crop."""
    _run([sys.executable, "eval.py", "crops", str(eval_dir), "--judge", judge])
    return json.loads((eval_dir / "crop_answerable.json").read_text())["share"]


def plot(series: dict[str, list[tuple[float, float]]], title: str, path: Path, y_max: float = 1.0,
         y_label: str = "", x_label: str = "optimizer step", x_ticks: list[tuple[float, str]] | None = None,
         spans: dict[str, list[tuple[float, float, float]]] | None = None, lines: bool = True) -> None:
    """A line chart as a PNG (drawn with PIL): one line per series, [0, y_max] on y, each axis
    labelled. ``x_ticks`` (position, text) replace the default 0 .. largest x; ``spans`` draw a
    whisker (x, low, high) per point, e.g. the lowest and highest seed; ``lines=False`` draws
    the points alone (categories on x)."""
    W, H, L, B, T, R = 720, 400, 56, 56, 48, 170
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [x for pts in series.values() for x, _ in pts] + [x for x, _ in x_ticks or []]
    x_min, x_max = (min(xs), max(xs)) if x_ticks else (0, max(xs, default=1) or 1)
    x_pad = (x_max - x_min) * 0.05 if x_ticks else 0
    sx = lambda x: L + (W - L - R) * (x - x_min + x_pad) / ((x_max - x_min + 2 * x_pad) or 1)  # noqa: E731
    sy = lambda y: H - B - (H - B - T) * y / y_max  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline=(0, 0, 0))
    for k in range(5):
        y = y_max * k / 4
        d.line([L, sy(y), W - R, sy(y)], fill=(225, 225, 225))
        d.text((8, sy(y) - 6), f"{y:g}", fill=(0, 0, 0))
    for x, text in x_ticks or [(0, "0"), (x_max, f"{x_max:g}")]:
        d.line([sx(x), H - B, sx(x), H - B + 4], fill=(0, 0, 0))
        d.text((sx(x) - 3 * len(text), H - B + 8), text, fill=(0, 0, 0))
    d.text((8, 8), title, fill=(0, 0, 0))
    d.text((8, T - 16), f"y: {y_label}" if y_label else "", fill=(0, 0, 0))
    d.text((L + (W - L - R) // 2 - 3 * len(x_label), H - B + 26), f"x: {x_label}", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        if lines and len(pts) > 1:
            d.line([(sx(x), sy(y)) for x, y in pts], fill=colour, width=2)
        for x, y in pts if x_ticks else ():
            d.ellipse([sx(x) - 3, sy(y) - 3, sx(x) + 3, sy(y) + 3], fill=colour)
        for x, lo, hi in (spans or {}).get(name, ()):
            d.line([sx(x) + 2 * i - 3, sy(lo), sx(x) + 2 * i - 3, sy(hi)], fill=colour, width=1)
        d.text((W - R + 10, T + 16 * i), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


CHART_UNITS = {"reward": "training reward (mean over the step's rollouts, 0-1)",
               "valid_box": "share of turn-1 boxes that are valid (0-1)",
               "iou": "IoU of the turn-1 box with the target (0-1)",
               "holds": "share of turn-1 boxes holding the target (0-1)"}


def _final(run: dict, key: str) -> float:
    return run[key][max(run[key])]


def _spread(values: list[float], fmt: str) -> str:
    """The mean over seeds, with the lowest and highest seed in brackets when there are several."""
    mean = fmt.format(fmean(values))
    return mean if len(values) == 1 else f"{mean} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _write_block(path: Path, tag: str, content: str) -> Path:
    """Put ``content`` between the page's ``tag`` markers (appended with them when absent);
    the rest of the page is kept."""
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    block = f"{start}\n{content}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + block + "\n"
    path.write_text(text)
    return path


def _summary(base: dict, runs: list[dict], methods: list[str]) -> str:
    """The paper's Tables 1-3 in miniature: base (each template) and each method's last
    checkpoint, mean over seeds with the lowest and highest seed in brackets. Table 3's column only where it was
    measured (the paper's template)."""
    table3 = bool(base.get("crops")) or any("crops" in r for r in runs)
    head = ["model", "test accuracy %", "valid box %", "IoU with the target", "turn-1 box holds the target %"]
    head += ["answerable from the turn-1 crop %"] if table3 else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, m in base.get("modes", {}).items():
        row = [f"base, {LABELS[mode]}", f"{m['test_accuracy']:.1f}", f"{m['valid_box']:.1f}",
               f"{m['mean_iou'] or 0.0:.2f}", f"{m['holds']:.1f}" if "holds" in m else "-"]
        crop = base.get("crops", {}).get(mode)
        row += ["-" if crop is None else f"{crop:.1f}"] if table3 else []
        lines.append("| " + " | ".join(row) + " |")
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        boxless = method == "sft"  # writes no box: no IoU, nothing to hold the target
        row = [f"{LABELS[method]}, step {max(mine[0]['accuracy'])}",
               _spread([_final(r, "accuracy") for r in mine], "{:.1f}"), _spread([_final(r, "valid") for r in mine], "{:.1f}"),
               "-" if boxless else _spread([_final(r, "iou") for r in mine], "{:.2f}"),
               "-" if boxless else _spread([_final(r, "holds") for r in mine], "{:.1f}")]
        if table3:
            row.append(_spread([r["crops"] for r in mine], "{:.1f}") if all("crops" in r for r in mine) else "-")
        lines.append("| " + " | ".join(row) + " |")
    seeds = ", ".join(str(r["seed"]) for r in runs if r["method"] == methods[0])
    about = (f"Greedy test figures, {base.get('n_test', 64)} questions; each method's last checkpoint, mean over "
             f"seeds {seeds} with the lowest and highest seed in brackets.")
    if "sft" in methods:
        about += (" SFT (answer only) is the paper's SFT baseline: the same training questions with their answers "
                  "and no box, one turn (the GRPO template), as many questions as an RL run sees, evaluated in "
                  "that template.")
    if table3:
        about += (" The last column is the paper's Table 3: the share of questions the base model answers right "
                  "from the crop under their turn-1 box alone, in one turn (`eval.py crops`; no valid box counts "
                  "as not answerable).")
    return about + "\n\n" + "\n".join(lines)


def _summary_chart(base: dict, runs: list[dict], methods: list[str], path: Path) -> str:
    """The summary table as a chart: per model (each base conversation, each method's last
    checkpoint) the greedy test accuracy and, where measured, Table 3's answerable share; a
    whisker from the lowest to the highest seed. Returns its title."""
    models = [(f"base {LABELS[m]}", [base["modes"][m]["test_accuracy"]], [base.get("crops", {}).get(m)])
              for m in base.get("modes", {})]
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        models.append((LABELS[method].split(" (")[0], [_final(r, "accuracy") for r in mine],
                       [r.get("crops") for r in mine]))
    series = {"test accuracy %": [(i, fmean(acc)) for i, (_, acc, _) in enumerate(models)]}
    spans = {"test accuracy %": [(i, min(acc), max(acc)) for i, (_, acc, _) in enumerate(models) if len(acc) > 1]}
    crops = [(i, c) for i, (_, _, c) in enumerate(models) if c and None not in c]
    if crops:
        series["answerable from the turn-1 crop %"] = [(i, fmean(c)) for i, c in crops]
        spans["answerable from the turn-1 crop %"] = [(i, min(c), max(c)) for i, c in crops if len(c) > 1]
    title = f"Greedy test accuracy{' and Table 3' if crops else ''} by model (last checkpoint, mean over seeds)"
    plot(series, title, path, y_max=100.0, y_label="% of test questions, whiskers: lowest and highest seed",
         x_label="model", x_ticks=[(i, name) for i, (name, _, _) in enumerate(models)], spans=spans, lines=False)
    return title


def write_report(base: dict, runs: list[dict], docs: Path, command: str, task: str = "colours",
                 block: str | None = None) -> Path:
    """The task's block of docs/reproduction.md and its charts (``block``: another block and chart
    prefix, so a comparison beside the main one replaces nothing of it)."""
    figures = docs / "reproduction"
    prefix = f"{block}_" if block else "" if task == "colours" else f"{task}_"
    methods = list(dict.fromkeys(r["method"] for r in runs))
    who = " and ".join(LABELS[m] for m in methods if m != "sft")
    name = (lambda r: f"seed {r['seed']}") if len(methods) == 1 else (lambda r: f"{LABELS[r['method']]} seed {r['seed']}")
    charts = {"reward": (f"training reward ({who})", "reward"), "valid_box": (f"valid-box share ({who})", "valid_box")}
    if task != "colours":
        charts["iou"] = (f"IoU of the turn-1 box with the target ({who}, training rollouts)", "train_iou")
        charts["holds"] = (f"share of turn-1 boxes holding the target ({who}, training rollouts)", "train_holds")
    for chart, (title, key) in charts.items():
        plot({name(r): r[key] for r in runs if r["method"] != "sft"}, title, figures / f"{prefix}{chart}.png",
             y_label=CHART_UNITS[chart])
    tables = [_summary(base, runs, methods)] if task != "colours" else []
    summary_chart = _summary_chart(base, runs, methods, figures / f"{prefix}summary.png") if task != "colours" else None
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        at_base = base.get("modes", {}).get(METHOD_OF.get(method, method), base)
        steps = sorted(mine[0]["accuracy"])
        for label, key, base_value, fmt in (("greedy test accuracy (%)", "accuracy", at_base["test_accuracy"], "{:.1f}"),
                                            ("greedy test IoU of the turn-1 box with the target", "iou",
                                             at_base.get("mean_iou") or 0.0, "{:.2f}")):
            if key == "iou" and (task == "colours" or method == "sft"):  # no grounding / no box to score
                continue
            head = "| seed | base | " + " | ".join(f"step {s}" for s in steps) + " | minutes |"
            lines = [f"{LABELS[method]}, {label}, {base.get('n_test', 64)} questions:", "", head,
                     "|" + "---|" * (len(steps) + 3)]
            for r in mine:
                vals = " | ".join(fmt.format(r[key][s]) for s in steps)
                lines.append(f"| {r['seed']} | {fmt.format(base_value)} | {vals} | {r['minutes']:.1f} |")
            mean = " | ".join(fmt.format(sum(r[key][s] for r in mine) / len(mine)) for s in steps)
            lines.append(f"| mean | {fmt.format(base_value)} | {mean} | |")
            tables.append("\n".join(lines))
    about = f"the base model (seed {base['seed']}, {base['sft_steps']} SFT steps"
    methods_sft = base.get("methods", [])
    about += f", the conversations of {' and '.join(LABELS[m] for m in methods_sft)} in turn" if len(methods_sft) > 1 else ""
    about += f", label noise {base['label_noise']})" if "label_noise" in base else ")"
    images = "\n".join(f"![{title}](reproduction/{prefix}{chart}.png)" for chart, (title, _) in charts.items())
    if summary_chart:
        images = f"![{summary_chart}](reproduction/{prefix}summary.png)\n" + images
    tag = f"repro-{block}" if block else "repro" if task == "colours" else f"repro-{task}"
    return _write_block(docs / "reproduction.md", tag,
                        f"Generated by `{command}`, from {about}.\n\n" + "\n\n".join(tables) + f"\n\n{images}")


CONDITIONS = {  # name -> (eval overrides on top of the MGPO conversation, what turn 2 shows)
    "model": (("eval.crop=model",), "the crop under the model's turn-1 box (the method)"),
    "black": (("eval.crop=black",), "a black image of that crop's size"),
    "random": (("eval.crop=random",), "a crop of that size elsewhere in the image"),
    "full": (("eval.crop=full",), "the whole original again"),
    "gold": (("eval.crop=gold",), "the crop of the annotated target box"),
    "direct": (("eval.mode=direct",), "nothing: one turn, question and choices only, with both turns' tokens"),
}


def counterfactuals(base: Path, out: Path, config: str, methods: list[str], seeds: list[int], steps: int,
                    report_only: bool = False) -> dict[tuple[str, str], dict]:
    """Whether the answers come from the crop: the base and each seed's last checkpoint of each
    method evaluated in the MGPO conversation with turn 2 showing each of ``CONDITIONS``
    (``eval.crop``), and in the one-turn ``direct`` mode. (model, condition) -> that evaluation's
    metrics; the model "base" or "<method> seed <s>"."""
    models = {"base": base / "model", **{f"{m} seed {s}": out / f"{m}-seed{s}" / f"checkpoint-{steps}" / "model"
                                         for m in methods for s in seeds}}
    r = load_config(config).rollout
    # the one turn gets both turns' tokens: a model that writes its box first still has room to answer
    whole = (f"rollout.max_new_tokens_turn1={r.max_new_tokens_turn1 + r.max_new_tokens_turn2}",)
    found = {}
    for name, model in models.items():
        for condition, (overrides, _) in CONDITIONS.items():
            at = out / "counterfactuals" / f"{name.replace(' seed ', '-seed')}-{condition}"
            if not report_only:
                _evaluate(model, base / "data" / "test.jsonl", config, "mgpo", at,
                          overrides + (whole if condition == "direct" else ()))
            found[name, condition] = _result(at)
    return found


def write_counterfactuals(found: dict[tuple[str, str], dict], docs: Path, command: str) -> Path:
    """The counterfactual tables (each method's mean over seeds; each model's accuracy with its 95%
    interval), between the ``repro-counterfactuals`` markers of the reproduction page."""
    from ..eval.report import interval

    models = list(dict.fromkeys(m for m, _ in found))
    methods = list(dict.fromkeys(m.split(" seed ")[0] for m in models if m != "base"))
    seeds = {m: [n for n in models if n.startswith(f"{m} seed ")] for m in methods}
    plain = {m: fmean(found[n, "model"]["accuracy"] for n in seeds[m]) for m in methods}
    head = ["turn 2 shows", "base", *(LABELS[m] for m in methods), *(f"{LABELS[m]} - its plain run" for m in methods)]
    summary = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    detail = ["| model | " + " | ".join(CONDITIONS) + " |", "|" + "---|" * (len(CONDITIONS) + 1)]
    for condition, (_, shown) in CONDITIONS.items():
        means = {m: [found[n, condition]["accuracy"] for n in seeds[m]] for m in methods}
        summary.append(f"| {condition}: {shown} | {found['base', condition]['accuracy']:.1f} | "
                       + " | ".join(_spread(means[m], "{:.1f}") for m in methods) + " | "
                       + " | ".join(f"{fmean(means[m]) - plain[m]:+.1f}" for m in methods) + " |")
    for name in models:
        label = name if name == "base" else name.replace(name.split(" seed ")[0], LABELS[name.split(" seed ")[0]])
        detail.append(f"| {label} | " + " | ".join(
            f"{found[name, c]['accuracy']:.1f} ({interval(found[name, c].get('accuracy_ci95'))})" for c in CONDITIONS)
            + " |")
    questions = found["base", "model"]["questions"]
    about = (f"Greedy test accuracy (%) on the beacon task's {questions} held-out questions, in the MGPO "
             "conversation with turn 2 showing the model's own crop or a counterfactual in its place, and in the "
             "one-turn direct mode. Methods: the mean over seeds with the lowest and highest seed in brackets, and "
             "the change from the same checkpoints' plain run (\"model\"). A right answer that survives a black or "
             "a random crop does not come from the crop.")
    return _write_block(docs / "reproduction.md", "repro-counterfactuals",
                        f"Generated by `{command}`.\n\n{about}\n\n" + "\n".join(summary)
                        + "\n\nEach model, with the 95% interval of its accuracy (Wilson, one answer per question):"
                        + "\n\n" + "\n".join(detail))


def budget_sweep(base: Path, out: Path, config: str, methods: list[str], seeds: list[int], steps: int,
                 report_only: bool = False, settings: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
    """The pixel-budget sweep (the paper's Table 2 in miniature): at each down-scale factor the
    base model (in each method's conversation) and each method trained from it, over seeds, on
    that factor's questions; each run evaluated once, at its last step."""
    factors = sorted(int(p.stem.split("-x")[1]) for p in (base / "data").glob("test-x*.jsonl"))
    at_base, runs = {}, []
    for factor in factors:
        data = (base / "data" / f"train-x{factor}.jsonl", base / "data" / f"test-x{factor}.jsonl")
        for method in methods:
            at = out / f"base-x{factor}-{method}"
            at_base[factor, method] = _accuracy(at) if report_only else _evaluate(base / "model", data[1], config,
                                                                                   method, at)
            for seed in seeds:
                name = f"x{factor}-{method}-seed{seed}"
                run = (collect(out / name, method, seed) if report_only else
                       run_seed(seed, steps, steps, base, out, config, method, data=data, name=name,
                                settings=settings))
                runs.append({**run, "factor": factor})
    return at_base, runs


def write_budgets(at_base: dict, runs: list[dict], methods: list[str], docs: Path, command: str) -> Path:
    """The sweep's table and chart, between the ``repro-budgets`` markers of the reproduction page."""
    import math

    factors = sorted({f for f, _ in at_base})
    final = {(f, m): [_final(r, "accuracy") for r in runs if r["factor"] == f and r["method"] == m]
             for f in factors for m in methods}
    head = (["down-scale factor"] + [f"base, {LABELS[m]} conversation" for m in methods]
            + [LABELS[m] for m in methods])
    if {"mgpo", "grpo"} <= set(methods):
        head.append("MGPO - GRPO")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in factors:
        row = [f"{f}x"] + [f"{at_base[f, m]:.1f}" for m in methods] + [_spread(final[f, m], "{:.1f}") for m in methods]
        if {"mgpo", "grpo"} <= set(methods):
            row.append(f"{fmean(final[f, 'mgpo']) - fmean(final[f, 'grpo']):+.1f}")
        lines.append("| " + " | ".join(row) + " |")
    steps = max(max(r["accuracy"]) for r in runs)
    seeds = sorted({r["seed"] for r in runs})
    about = (f"Greedy test accuracy (%) on each factor's held-out questions; each method after {steps} steps "
             f"from the base, mean over seeds {', '.join(map(str, seeds))} with the lowest and highest seed in "
             "brackets. The model's view is 448 x 112 (50,176 px) at every factor; the original is that times the "
             "factor.")
    pos = {f: math.log2(f) for f in factors}
    series = {f"base ({LABELS[m]} conversation)": [(pos[f], at_base[f, m]) for f in factors] for m in methods}
    series.update({LABELS[m]: [(pos[f], fmean(final[f, m])) for f in factors] for m in methods})
    spans = {LABELS[m]: [(pos[f], min(final[f, m]), max(final[f, m])) for f in factors] for m in methods}
    chart = docs / "reproduction" / "budgets_accuracy.png"
    plot(series, "Greedy test accuracy against the pixel budget (beacon task)", chart, y_max=100.0,
         y_label="greedy test accuracy (%), whiskers: lowest and highest seed",
         x_label="down-scale factor of the original (the model sees 448 x 112 px)",
         x_ticks=[(pos[f], f"{f}x") for f in factors], spans=spans)
    return _write_block(docs / "reproduction.md", "repro-budgets",
                        f"Generated by `{command}`.\n\n{about}\n\n" + "\n".join(lines)
                        + "\n\n![accuracy against the pixel budget](reproduction/budgets_accuracy.png)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.repro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--eval-every", type=positive_int, default=20)
    parser.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="colours")
    parser.add_argument("--base", help="default: build/<task> (build/base for colours)")
    parser.add_argument("--out", help="default: runs/repro-<block> with --block, else runs/repro (colours), runs/repro-<task>")
    parser.add_argument("--config", help="default: configs/tiny_<task>.yaml (tiny_beacon.yaml for budgets)")
    parser.add_argument("--methods", nargs="+", choices=sorted([*METHODS, "sft", *VARIANTS]),
                        help="default: mgpo (colours), mgpo grpo sft (beacon), mgpo grpo (budgets), mgpo_k2 mgpo_k3 "
                             "(nested): the methods whose conversations the task's base learnt, and the SFT baseline; "
                             "mgpo_seq, mgpo_geo, mgpo_noscale: MGPO with another objective (loss.ratio=sequence, "
                             "loss.ratio=geometric, loss.adv_scale=none)")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--block", type=plain_name, default=None,
                        help="write the report to this block of docs/reproduction.md (and runs/repro-<block>), "
                             "beside the task's own: e.g. objectives, for --methods mgpo mgpo_seq mgpo_geo mgpo_noscale")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                        help="config overrides for every method's training runs (not their evaluation): e.g. "
                             "train.prompts_per_rollout=16, so each rollout batch feeds two optimizer steps and the "
                             "objectives' importance ratios depart from 1")
    parser.add_argument("--counterfactuals", action="store_true",
                        help="also evaluate the base and each seed's last checkpoint in the MGPO conversation with "
                             "turn 2 showing a counterfactual crop (eval.crop black, random, full, gold) beside its "
                             "own, and in the one-turn direct mode, and write those tables (needs mgpo among the "
                             "methods)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rewrite the report from the run folders already in --out")
    args = parser.parse_args(argv)
    if args.task != "budgets" and args.steps % args.eval_every:
        parser.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every}): each run is "
                     "evaluated at every multiple and at its last step")
    if args.counterfactuals and ("mgpo" not in (args.methods or TASK_DEFAULTS[args.task][2])
                                 or args.task not in ("beacon", "colours")):
        parser.error("--counterfactuals evaluates MGPO's checkpoints on a task with target boxes: pass --task beacon "
                     "(or colours) with mgpo among --methods")
    if any(s < 0 for s in args.seeds):
        parser.error(f"--seeds must be whole numbers >= 0, got {args.seeds}")
    default_base, default_config, default_methods = TASK_DEFAULTS[args.task]
    base = Path(args.base or default_base)
    out = Path(args.out or ("runs/repro" if args.task == "colours" and not args.block
                            else f"runs/repro-{args.block or args.task}"))
    config = args.config or default_config
    if not (base / "base.json").exists():
        if args.report_only:
            parser.error(f"--report-only trains and builds nothing, and {base / 'base.json'} is missing: run without "
                         "--report-only first (it builds the base model), or pass --base")
        _run([sys.executable, "-m", "mgpo.tools.base", str(base), "--task", args.task])
    methods = args.methods or default_methods
    command = (f"python -m mgpo.tools.repro{'' if args.task == 'colours' else ' --task ' + args.task} --seeds {' '.join(map(str, args.seeds))} "
               f"--steps {args.steps}{'' if args.task == 'budgets' else f' --eval-every {args.eval_every}'} "
               f"--methods {' '.join(methods)}") + (f" --set {' '.join(args.settings)}" if args.settings else "")
    if args.task == "budgets":
        at_base, runs = budget_sweep(base, out, config, methods, args.seeds, args.steps, args.report_only,
                                     tuple(args.settings))
        print(f"wrote {write_budgets(at_base, runs, methods, Path(args.docs), command)}")
        return
    summary = json.loads((base / "base.json").read_text())
    # Table 3 (the paper's template only): the base answers from each method's turn-1 crops
    judge = str(base / "model") if args.task == "beacon" else None
    if judge:
        summary["crops"] = {mode: crops(base / "eval" / mode, judge) if not args.report_only else
                            json.loads((base / "eval" / mode / "crop_answerable.json").read_text())["share"]
                            for mode in summary.get("modes", {})}
    if args.report_only:
        runs = [collect(out / f"{m}-seed{s}", m, s) for m in methods for s in args.seeds]
    else:
        runs = [run_seed(s, args.steps, args.eval_every, base, out, config, m, judge, settings=tuple(args.settings))
                for m in methods for s in args.seeds]
    command += f" --block {args.block}" if args.block else ""
    print(f"wrote {write_report(summary, runs, Path(args.docs), command, args.task, args.block)}")
    if args.counterfactuals:
        found = counterfactuals(base, out, config, [m for m in methods if m != "sft"], args.seeds, args.steps,
                                args.report_only)
        print(f"wrote {write_counterfactuals(found, Path(args.docs), command + ' --counterfactuals')}")


if __name__ == "__main__":
    from ..cli import run_main

    run_main(main)
