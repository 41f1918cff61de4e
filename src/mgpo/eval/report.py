"""Evaluation metrics and reports, computed from ``predictions.jsonl`` alone.

Everything here is a pure function of the prediction records, so a report can be
recomputed (and checked) from the file, and two runs compared line by line.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..core.grounding import area_share, enclosing, target_fit
from .stats import accuracy_interval, paired, unpaired


def _acc(values) -> float:
    return float(np.mean(values)) * 100 if values else float("nan")


def grounding_values(recs: list[dict]) -> tuple[list[float], list[bool], list[float]]:
    """Per record: IoU of the box with the targets' enclosing box (0 when invalid), whether the crop
    holds every target (records with targets only), and the crop's share of the image (valid boxes)."""
    grounded = [r for r in recs if r.get("target_boxes")]
    fits = [target_fit(r["box_original"] if r["valid"] else None, r["target_boxes"]) for r in grounded]
    ious, crop_hits = [f[0] for f in fits], [f[1] for f in fits]
    shares = [area_share(r["box_original"], r["original_size"]) for r in recs if r["valid"] and r["box_original"]]
    return ious, crop_hits, shares


def breakdown(recs: list[dict]) -> dict[str, dict]:
    """Accuracy at every level of a benchmark's hierarchy (MME-RealWorld: Task -> Subtask ->
    Category), keyed "Task", "Task / Subtask", "Task / Subtask / Category"; each level is the
    mean over its questions' samples."""
    levels = defaultdict(list)
    for r in recs:
        path = r.get("breakdown") or []
        for depth in range(1, len(path) + 1):
            levels[" / ".join(path[:depth])].append(r["correct"])
    return {k: {"accuracy": _acc(v), "samples": len(v)} for k, v in sorted(levels.items())}


def per_cycle(recs: list[dict]) -> dict | None:
    """HR-Bench: accuracy of each option rotation (``cycle_category``) and their mean, the official score."""
    cycles = defaultdict(list)
    for r in recs:
        if r.get("cycle"):
            cycles[r["cycle"]].append(r["correct"])
    if not cycles:
        return None
    accs = {c: _acc(v) for c, v in sorted(cycles.items())}
    return {"cycles": accs, "mean_over_cycles": float(np.mean(list(accs.values())))}


def turn_summary(recs: list[dict]) -> dict:
    """K-turn mode: turns and crops per question, the share answering at each turn, nested zooms,
    and the valid-box share of each turn that zoomed or fell back."""
    logs = [r["turns"] for r in recs if r.get("turns")]
    out = {"turns_used": float(np.mean([len(log) for log in logs])),
           "crops": float(np.mean([sum(bool(t["crop_size"]) for t in log) for log in logs])),
           "nested_zoom": _acc([any(t["nested"] for t in log) for log in logs]),
           "answer_at_turn": {}, "valid_box_at_turn": {}}
    for k in range(1, max(len(log) for log in logs) + 1):
        out["answer_at_turn"][str(k)] = _acc([len(log) == k for log in logs])  # str: JSON keys
        asked = [log[k - 1]["valid"] for log in logs if len(log) > k]
        if asked:
            out["valid_box_at_turn"][str(k)] = _acc(asked)
    return out


def question_key(r: dict) -> tuple:
    """The unit a record's outcome belongs to: its question, except that HR-Bench's rotations of
    one question (same text, same options in another order) are one unit."""
    return ("cycles", r["question"], tuple(sorted(map(str, r.get("options") or ())))) if r.get("cycle") \
        else ("id", str(r["id"]))


def question_groups(recs: list[dict]) -> list[list[bool]]:
    """Each question's outcomes (its k samples, its rotations), the unit every interval resamples."""
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for r in recs:
        groups[question_key(r)].append(bool(r["correct"]))
    return list(groups.values())


def faithfulness(recs: list[dict]) -> dict | None:
    """How the right (and the wrong) answers relate to the turn-1 box, on records with target boxes:
    the share whose box covers the target, by IoU >= 0.5 and by the target's centre inside the box,
    and the share of right answers with neither ("right without grounding"). None without targets."""
    grounded = [r for r in recs if r.get("target_boxes")]
    if not grounded:
        return None

    def covers(r) -> tuple[bool, bool]:
        box = r["box_original"] if r.get("valid") else None
        if not box:
            return False, False
        x1, y1, x2, y2 = enclosing(r["target_boxes"])
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        return target_fit(box, r["target_boxes"])[0] >= 0.5, box[0] <= cx <= box[2] and box[1] <= cy <= box[3]

    out = {}
    for name, part in (("right", [r for r in grounded if r["correct"]]), ("wrong", [r for r in grounded if not r["correct"]])):
        fits = [covers(r) for r in part]
        out[f"{name}_answers"] = len(part)
        out[f"{name}_covered_iou"] = _acc([f[0] for f in fits]) if fits else None
        out[f"{name}_covered_centre"] = _acc([f[1] for f in fits]) if fits else None
        if name == "right":
            out["right_without_grounding"] = _acc([not (f[0] or f[1]) for f in fits]) if fits else None
    return out


def compute_metrics(records: list[dict], boxes: bool = True) -> dict:
    """Accuracy (Avg@k, pass@k) per dataset and category, and grounding diagnostics (None, shown
    as "-", when the prompt asks for no box: ``boxes=False``, the ``direct`` mode)."""
    out: dict = {}
    by_dataset = defaultdict(list)
    for r in records:
        by_dataset[r["dataset"]].append(r)
    for name, recs in sorted(by_dataset.items()):
        per_id = defaultdict(list)
        for r in recs:
            per_id[r["id"]].append(r)
        cats = defaultdict(list)
        for r in recs:
            cats[r["category"]].append(r["correct"])
        ious, crop_hits, shares = grounding_values(recs)
        ci, how = accuracy_interval(question_groups(recs))
        out[name] = {
            "questions": len(per_id),
            "samples_per_question": max(len(v) for v in per_id.values()),
            "accuracy": _acc([r["correct"] for r in recs]),  # Avg@k (k = 1: plain accuracy)
            "accuracy_ci95": list(ci), "interval": how,
            "pass_at_k": _acc([any(x["correct"] for x in v) for v in per_id.values()]),
            "categories": {c: _acc(v) for c, v in sorted(cats.items())},
            "no_answer": _acc([r["pred"] is None for r in recs]),
            "grounding": {
                "valid_box": _acc([r["valid"] for r in recs]),
                "mean_iou": float(np.mean(ious)) if ious else None,
                "crop_contains_target": _acc(crop_hits) if crop_hits else None,
                "crop_area_share_quantiles": (np.quantile(shares, [0.1, 0.5, 0.9]).round(4).tolist()
                                              if shares else None),
            } if boxes else dict.fromkeys(("valid_box", "mean_iou", "crop_contains_target",
                                           "crop_area_share_quantiles")),
        }
        if boxes and (faith := faithfulness(recs)) is not None:
            out[name]["faithfulness"] = faith
        if any(r.get("turns") for r in recs):
            out[name]["turns"] = turn_summary(recs)
        if any(r.get("breakdown") for r in recs):
            out[name]["breakdown"] = breakdown(recs)
        if (cycles := per_cycle(recs)) is not None:
            out[name]["per_cycle"] = cycles
    return out


def interval(ci) -> str:
    """A 95% interval as the tables print it.

    >>> interval([69.94, 81.9]), interval(None)
    ('69.9 - 81.9', '-')
    """
    return "-" if not ci or any(v is None or v != v for v in ci) else f"{ci[0]:.1f} - {ci[1]:.1f}"


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def md(value) -> str:
    """Text from the data (a category, a dataset name, a skip reason) as Markdown shows it: HTML
    escaped (a Markdown viewer renders raw HTML) and table pipes escaped.

    >>> md("<b>x</b> | y")
    '&lt;b&gt;x&lt;/b&gt; \\\\| y'
    """
    import html

    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def render_markdown(metrics: dict, protocol: dict, skipped: dict[str, list]) -> str:
    """report.md: the protocol block, a Table-1-style accuracy table, grounding, skipped records."""
    lines = ["# Evaluation report", "", "## Protocol", "", "| setting | value |", "|---|---|"]
    for k, v in protocol.items():
        if k != "datasets":
            lines.append(f"| {k} | {md(v)} |")
    for name, fp in protocol.get("datasets", {}).items():
        lines.append(f"| dataset {md(name)} | {fp['count']} questions, sha256 {fp['sha256']} |")
    lines += ["", "## Accuracy (%)", "", "| dataset | overall | 95% interval | pass@k | categories |",
              "|---|---|---|---|---|"]
    for name, m in metrics.items():
        cats = ", ".join(f"{md(c)} {fmt(v)}" for c, v in m["categories"].items())
        how = f" ({m['interval']})" if m.get("interval") else ""
        lines.append(f"| {md(name)} | {fmt(m['accuracy'])} | {interval(m.get('accuracy_ci95'))}{how} | "
                     f"{fmt(m['pass_at_k'])} | {cats} |")
    for name, m in metrics.items():
        if "breakdown" in m:
            lines += ["", f"### {md(name)}: official breakdown", "", "| level | accuracy | samples |", "|---|---|---|"]
            lines += [f"| {md(k)} | {fmt(v['accuracy'])} | {v['samples']} |" for k, v in m["breakdown"].items()]
        if "per_cycle" in m:
            c = m["per_cycle"]
            lines += ["", f"### {name}: per cycle", "", "| cycle | accuracy |", "|---|---|"]
            lines += [f"| {md(k)} | {fmt(v)} |" for k, v in c["cycles"].items()]
            lines.append(f"| mean over cycles | {fmt(c['mean_over_cycles'])} |")
    lines += ["", "## Grounding", "", "| dataset | valid box % | mean IoU | crop holds target % | crop area share "
              "(p10/p50/p90) | no answer % |", "|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        g = m["grounding"]
        q = "/".join(f"{x:.3f}" for x in g["crop_area_share_quantiles"]) if g["crop_area_share_quantiles"] else "-"
        iou_text = f"{g['mean_iou']:.3f}" if g["mean_iou"] is not None else "-"
        lines.append(f"| {md(name)} | {fmt(g['valid_box'])} | {iou_text} | {fmt(g['crop_contains_target'])} | {q} | "
                     f"{fmt(m['no_answer'])} |")
    faithful = {name: m["faithfulness"] for name, m in metrics.items() if m.get("faithfulness")}
    if faithful:
        lines += ["", "## Grounding faithfulness (records with target boxes)", "",
                  "Covered: the turn-1 box has IoU >= 0.5 with the target / holds the target's centre.", "",
                  "| dataset | right answers covered % (IoU / centre) | wrong answers covered % (IoU / centre) | "
                  "right without grounding % |", "|---|---|---|---|"]
        for name, f in faithful.items():
            lines.append(f"| {md(name)} | {fmt(f['right_covered_iou'])} / {fmt(f['right_covered_centre'])} | "
                         f"{fmt(f['wrong_covered_iou'])} / {fmt(f['wrong_covered_centre'])} | "
                         f"{fmt(f['right_without_grounding'])} |")
    turned = {name: m["turns"] for name, m in metrics.items() if "turns" in m}
    if turned:
        lines += ["", "## Turns (K-turn mode)", "", "| dataset | turns used | crops | nested zoom % | answer at turn k % "
                  "| valid box at turn k % |", "|---|---|---|---|---|---|"]
        for name, t in turned.items():
            at = ", ".join(f"{k}: {fmt(v)}" for k, v in t["answer_at_turn"].items())
            valid = ", ".join(f"{k}: {fmt(v)}" for k, v in t["valid_box_at_turn"].items()) or "-"
            lines.append(f"| {name} | {t['turns_used']:.2f} | {t['crops']:.2f} | {fmt(t['nested_zoom'])} | {at} | "
                         f"{valid} |")
    bad = [(d, i, why) for d, items in skipped.items() for i, why in items]
    lines += ["", f"## Skipped records ({len(bad)})", ""]
    lines += [f"- {md(d)} / {md(i)}: {md(why)}" for d, i, why in bad[:200]] or ["none"]
    return "\n".join(lines) + "\n"


def console_table(result: dict) -> str:
    """The accuracy table ``eval.py`` prints when it ends: one row per dataset (accuracy and the
    valid-box share in %, mean IoU with the targets where the dataset has them, records skipped).

    >>> print(console_table({"results": {"vstar": {"questions": 191, "accuracy": 76.44, "accuracy_ci95":
    ...     [69.94, 81.9], "grounding": {"valid_box": 95.3, "mean_iou": 0.4123}}}, "skipped": {"vstar": 0}}))
    dataset  questions  accuracy %  95% interval  valid box %  mean IoU  skipped
    vstar          191        76.4   69.9 - 81.9         95.3     0.412        0
    """
    head = ("dataset", "questions", "accuracy %", "95% interval", "valid box %", "mean IoU", "skipped")
    rows = []
    for name, m in result["results"].items():
        iou_ = m["grounding"]["mean_iou"]
        rows.append((name, str(m["questions"]), fmt(m["accuracy"]), interval(m.get("accuracy_ci95")),
                     fmt(m["grounding"]["valid_box"]), "-" if iou_ is None else f"{iou_:.3f}",
                     str(result.get("skipped", {}).get(name, 0))))
    for name, n in result.get("skipped", {}).items():  # a dataset whose every record was skipped
        if name not in result["results"]:
            rows.append((name, "0", "-", "-", "-", "-", str(n)))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def run_names(run_dirs: list[str | Path]) -> list[str]:
    """Column names for ``compare``: each folder's path cut to the fewest trailing parts that tell
    the runs apart, a folder named ``eval`` standing for the run that holds it.

    >>> run_names(["runs/base/eval", "runs/mgpo/eval"])
    ['base', 'mgpo']
    >>> run_names(["runs/eval/base/vstar_bench", "runs/eval/mgpo-checkpoint-600/vstar_bench"])
    ['base/vstar_bench', 'mgpo-checkpoint-600/vstar_bench']
    """
    paths = []
    for d in run_dirs:
        parts = list(Path(d).resolve().parts[1:]) or [str(d)]
        if len(parts) > 1 and parts[-1] == "eval":
            parts = parts[:-1]
        paths.append(parts)
    longest = max(len(p) for p in paths)
    for depth in range(1, longest + 1):
        names = ["/".join(p[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]


class CompareError(ValueError):
    """An argument of ``compare`` that is not a finished evaluation; the message says which and why."""


def read_metrics(run_dir: str | Path) -> dict:
    """An evaluation folder's ``metrics.json``, checked for what ``compare`` reads."""
    path = Path(run_dir) / "metrics.json"
    if not Path(run_dir).is_dir():
        raise CompareError(f"{run_dir}: no such folder (pass the eval.output_dir of an evaluation)")
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{run_dir}: no metrics.json (not a finished evaluation's eval.output_dir)") from None
    except (OSError, ValueError) as e:
        raise CompareError(f"{path}: not a readable JSON file ({e})") from None
    results = metrics.get("results") if isinstance(metrics, dict) else None
    fields = ("accuracy", "categories", "grounding")
    if not isinstance(results, dict) or not results or not isinstance(metrics.get("protocol"), dict) or not all(
            isinstance(r, dict) and all(k in r for k in fields) for r in results.values()):
        raise CompareError(f"{path}: holds no results (an evaluation writes results per dataset with "
                           f"{', '.join(fields)}, and its protocol)")
    for name, r in results.items():
        g = r["grounding"]
        numbers = [r["accuracy"], *(r["categories"].values() if isinstance(r["categories"], dict) else [None, "x"])]
        numbers += [g.get(k) for k in ("valid_box", "mean_iou", "crop_contains_target")] if isinstance(g, dict) else ["x"]
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in numbers) \
                or not isinstance(r["categories"], dict):
            raise CompareError(f"{path}: the results of {name!r} are not what an evaluation writes (numbers for the "
                               "accuracy, each category and the grounding figures): damaged or hand-edited")
    return metrics


def outcomes(run_dir: str | Path) -> dict[str, dict[tuple, list[bool]]]:
    """dataset -> question (``question_key``: HR-Bench's rotations together) -> its outcomes, from
    an evaluation's predictions.jsonl."""
    out: dict[str, dict[tuple, list[bool]]] = defaultdict(lambda: defaultdict(list))
    path = Path(run_dir) / "predictions.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        out[r["dataset"]][question_key(r)].append(bool(r["correct"]))
    return out


def _differences(run_dirs, names: list[str]) -> list[str]:
    """Each later run against the first, per dataset: paired (the same questions) or unpaired."""
    first = outcomes(run_dirs[0])
    lines = []
    for d, name in zip(run_dirs[1:], names[1:]):
        for dataset, b in outcomes(d).items():
            a = first.get(dataset)
            if not a:
                continue
            same = set(a) == set(b)
            r = paired(a, b) if same else unpaired(a, b)
            if not r.get("questions"):
                continue
            what = (f"{r['questions']} questions, paired; right only in {names[0]}: {r['only_a']}, only in {name}: "
                    f"{r['only_b']}; McNemar exact p = {r['mcnemar_p']:.3g}" if same else
                    f"different question sets ({r['questions'][0]} and {r['questions'][1]}): unpaired, so wider")
            lines.append(f"- {dataset}, {name} - {names[0]}: {r['difference']:+.1f} points, 95% interval "
                         f"{r['ci95'][0]:+.1f} to {r['ci95'][1]:+.1f} ({what})")
    return (["", "Differences (bootstrap over questions):", *lines]) if lines else []


def compare(run_dirs: list[str | Path]) -> str:
    """Side-by-side accuracy and grounding of several evaluation runs (differences vs the first)."""
    if not run_dirs:
        raise CompareError("give the evaluation folders to compare (eval.output_dir of each)")
    runs = list(zip(run_names(run_dirs), [read_metrics(d) for d in run_dirs]))
    rows: dict[str, list] = defaultdict(lambda: [None] * len(runs))
    for j, (_, m) in enumerate(runs):
        for name, dm in m["results"].items():
            rows[f"{name} overall"][j] = dm["accuracy"]
            for c, v in dm["categories"].items():
                rows[f"{name} {c}"][j] = v
            g = dm["grounding"]
            rows[f"{name} valid box %"][j] = g["valid_box"]
            rows[f"{name} mean IoU"][j] = g["mean_iou"]
            rows[f"{name} crop holds target %"][j] = g["crop_contains_target"]
    head = "| metric | " + " | ".join(n for n, _ in runs) + " |"
    lines = [head, "|" + "---|" * (len(runs) + 1)]
    for key, vals in rows.items():
        show = (lambda v: "-" if v is None else f"{v:.3f}") if key.endswith("IoU") else fmt
        digits = 3 if key.endswith("IoU") else 1
        cells = [show(vals[0])]
        for v in vals[1:]:
            delta = "" if v is None or vals[0] is None else f" ({v - vals[0]:+.{digits}f})"
            cells.append(show(v) + delta)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += _differences(run_dirs, [n for n, _ in runs])
    protocols = [m["protocol"] for _, m in runs]
    keys = {k for p in protocols for k in p}  # a key only a later run has is a difference too
    differs = sorted(k for k in keys if any(p.get(k) != protocols[0].get(k) for p in protocols[1:]))
    if differs:
        lines += ["", "Protocol differences: " + ", ".join(differs)]
    return "\n".join(lines) + "\n"
