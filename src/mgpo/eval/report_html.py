"""report.html: the numbers first, then the cases.

Order follows what a reader wants: the protocol the numbers hold under, the accuracy and
grounding tables (with MME-RealWorld's official breakdown and HR-Bench's per-cycle scores),
charts (accuracy per category, IoU and crop-area histograms, valid-box share), the skipped
records, then case cards that can be filtered to right / wrong / invalid box. One
self-contained file: charts are inline SVG, images are data URIs, the only script is the
filter (a few lines, nothing fetched from the net).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from ..core.grounding import target_fit
from .report import fmt, grounding_values, interval

STYLE = """
body{font-family:sans-serif;margin:20px;color:#222} table{border-collapse:collapse;margin:6px 0 14px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px} th{background:#f0f0f0}
td.num{text-align:right} .charts{display:flex;flex-wrap:wrap;gap:16px} .chart{border:1px solid #ddd;padding:6px}
.card{border:2px solid #ccc;margin:10px;padding:8px;display:inline-block;vertical-align:top;width:680px}
.right{border-color:#2a2} .wrong{border-color:#c22} .invalid .head::after{content:" (invalid box)";color:#a60}
img{margin:4px;vertical-align:top} pre{white-space:pre-wrap;font-size:11px;background:#f6f6f6}
.filters button{margin-right:6px;padding:4px 10px} .filters button.on{background:#333;color:#fff}
"""

SCRIPT = """
function show(kind) {
  document.querySelectorAll('.card').forEach(c => {
    c.style.display = (kind === 'all' || c.classList.contains(kind)) ? '' : 'none';
  });
  document.querySelectorAll('.filters button').forEach(b => b.classList.toggle('on', b.dataset.kind === kind));
}
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('.card img')];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.getElementById('imgcount').textContent = ok + ' of ' + imgs.length + ' images shown';
});
"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(head: list[str], rows: list[list], numeric_from: int = 1) -> str:
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(
        f"<td class='num'>{_e(fmt(v))}</td>" if i >= numeric_from else f"<td>{_e(v)}</td>"
        for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


# ----------------------------------------------------------------------------- charts (inline SVG)

def svg_bars(items: list[tuple[str, float]], title: str, vmax: float = 100.0, unit: str = "%") -> str:
    """Horizontal bars, one per (label, value); NaN values are drawn empty."""
    row, label_w, bar_w = 18, 220, 260
    height = 24 + row * len(items)
    parts = [f"<text x='4' y='14' font-size='13' font-weight='bold'>{_e(title)}</text>"]
    for i, (label, value) in enumerate(items):
        y = 22 + i * row
        v = 0.0 if value is None or np.isnan(value) else float(value)
        w = bar_w * max(0.0, min(v, vmax)) / vmax
        parts.append(f"<text x='4' y='{y + 12}' font-size='11'>{_e(str(label)[:34])}</text>"
                     f"<rect x='{label_w}' y='{y + 2}' width='{w:.1f}' height='{row - 5}' fill='#4a7'/>"
                     f"<text x='{label_w + w + 4:.1f}' y='{y + 12}' font-size='11'>{_e(fmt(value))}{unit}</text>")
    return (f"<svg class='chart' role='img' width='{label_w + bar_w + 60}' height='{height}' "
            f"xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg>")


def svg_histogram(values: list[float], title: str, bins: int = 10, lo: float = 0.0, hi: float = 1.0) -> str:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi]."""
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi)) if values else (
        np.zeros(bins, int), np.linspace(lo, hi, bins + 1))
    width, height, top, bottom = 320, 180, 36, 22
    bw, peak = width / bins, max(1, int(counts.max()))
    parts = [f"<text x='4' y='14' font-size='13' font-weight='bold'>{_e(title)} (n={len(values)})</text>"]
    for i, c in enumerate(counts):
        h = (height - top - bottom) * c / peak
        x, y = i * bw, height - bottom - h
        parts.append(f"<rect x='{x + 1:.1f}' y='{y:.1f}' width='{bw - 2:.1f}' height='{h:.1f}' fill='#47a'>"
                     f"<title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {c}</title></rect>")
        if c:
            parts.append(f"<text x='{x + bw / 2:.1f}' y='{y - 2:.1f}' font-size='10' text-anchor='middle'>{c}</text>")
    parts.append(f"<text x='0' y='{height - 6}' font-size='10'>{lo:g}</text>"
                 f"<text x='{width}' y='{height - 6}' font-size='10' text-anchor='end'>{hi:g}</text>")
    return (f"<svg class='chart' role='img' width='{width}' height='{height}' "
            f"xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg>")


# ----------------------------------------------------------------------------- sections

def _summary(metrics: dict, protocol: dict, skipped: dict[str, list]) -> str:
    proto = [[k, v] for k, v in protocol.items() if k != "datasets"]
    proto += [[f"dataset {n}", f"{fp['count']} questions, sha256 {fp['sha256']}"]
              for n, fp in protocol.get("datasets", {}).items()]
    acc = [[n, m["questions"], m["samples_per_question"], m["accuracy"],
            f"{interval(m.get('accuracy_ci95'))} ({m.get('interval', '-')})", m["pass_at_k"], m["no_answer"],
            len(skipped.get(n, []))] for n, m in metrics.items()]
    acc += [[n, 0, "-", None, "-", None, None, len(v)] for n, v in skipped.items() if n not in metrics]
    ground = []
    for n, m in metrics.items():
        g = m["grounding"]
        q = g["crop_area_share_quantiles"]
        ground.append([n, g["valid_box"], "-" if g["mean_iou"] is None else f"{g['mean_iou']:.3f}",
                       g["crop_contains_target"], "/".join(f"{x:.3f}" for x in q) if q else "-"])
    out = ["<h2>Protocol</h2>", _table(["setting", "value"], proto, numeric_from=9),
           "<h2>Accuracy (%)</h2>",
           _table(["dataset", "questions", "k", "accuracy (Avg@k)", "95% interval", "pass@k", "no answer %", "skipped"],
                  acc),
           "<h2>Grounding</h2>",
           _table(["dataset", "valid box %", "mean IoU", "crop holds target %", "crop area share p10/p50/p90"],
                  ground)]
    faithful = [[n, f["right_covered_iou"], f["right_covered_centre"], f["wrong_covered_iou"],
                 f["wrong_covered_centre"], f["right_without_grounding"]]
                for n, m in metrics.items() if (f := m.get("faithfulness"))]
    if faithful:
        out += ["<h2>Grounding faithfulness</h2><p>Covered: the turn-1 box has IoU &ge; 0.5 with the target / "
                "holds the target's centre.</p>",
                _table(["dataset", "right answers covered % (IoU)", "(centre)", "wrong answers covered % (IoU)",
                        "(centre)", "right without grounding %"], faithful)]
    for n, m in metrics.items():
        out.append(f"<h3>{_e(n)}: per category</h3>" + _table(["category", "accuracy"],
                                                               [[c, v] for c, v in m["categories"].items()]))
        if "breakdown" in m:
            rows = [[k, v["accuracy"], v["samples"]] for k, v in m["breakdown"].items()]
            out.append(f"<h3>{_e(n)}: official breakdown (Task / Subtask / Category)</h3>"
                       + _table(["level", "accuracy", "samples"], rows))
        if "per_cycle" in m:
            c = m["per_cycle"]
            rows = [[k, v] for k, v in c["cycles"].items()] + [["mean over cycles", c["mean_over_cycles"]]]
            out.append(f"<h3>{_e(n)}: per cycle</h3>" + _table(["cycle", "accuracy"], rows))
    return "".join(out)


def _charts(records: list[dict], metrics: dict) -> str:
    valid = [(n, m["grounding"]["valid_box"]) for n, m in metrics.items() if m["grounding"]["valid_box"] is not None]
    charts = [svg_bars(valid, "valid-box share")] if valid else []  # (direct mode asks for no box)
    for n, m in metrics.items():
        recs = [r for r in records if r["dataset"] == n]
        _, _, shares = grounding_values(recs)
        charts.append(svg_bars(list(m["categories"].items()), f"{n}: accuracy per category"))
        # IoU of the valid boxes only (a missing box is no IoU of 0); no panel where nothing can be drawn
        boxed = [r for r in recs if r.get("target_boxes") and r["valid"]]
        if boxed:
            ious = [target_fit(r["box_original"], r["target_boxes"])[0] for r in boxed]
            missing = sum(1 for r in recs if r.get("target_boxes") and not r["valid"])
            charts.append(svg_histogram(ious, f"{n}: IoU with the target ({len(ious)} valid boxes, {missing} "
                                              "without one)"))
        if shares:
            charts.append(svg_histogram(shares, f"{n}: crop area / image area"))
    return "<h2>Charts</h2><div class='charts'>" + "".join(charts) + "</div>"


def _skipped(skipped: dict[str, list]) -> str:
    bad = [(d, i, why) for d, items in skipped.items() for i, why in items]
    items = "".join(f"<li>{_e(d)} / {_e(i)}: {_e(why)}</li>" for d, i, why in bad[:500])
    more = f"<li>... and {len(bad) - 500} more (metrics.json)</li>" if len(bad) > 500 else ""
    return f"<h2>Skipped records ({len(bad)})</h2><details><summary>show</summary><ul>{items}{more}</ul></details>"


# ----------------------------------------------------------------------------- cases

def _thumb(image, boxes: list[tuple[list[float], tuple[int, int, int]]], size: int = 384) -> str:
    from PIL import ImageDraw

    img = image.copy()
    draw = ImageDraw.Draw(img)
    width = max(2, int(max(img.size) / 300))
    least = max(img.size) / 40  # small targets would vanish in a thumbnail: draw at least this big
    W, H = img.size
    for box, color in boxes:
        # clamped to a margin around the image first: a box given as 1e9 pixels would make the
        # drawing itself (and so every report card) take many seconds
        x1, y1, x2, y2 = (min(max(float(v), -limit), limit) for v, limit in zip(box, (2 * W, 2 * H, 2 * W, 2 * H)))
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, least) / 2, max(y2 - y1, least) / 2
        draw.rectangle((cx - hw, cy - hh, cx + hw, cy + hh), outline=color, width=width)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def box_missed(r: dict) -> bool:
    """A record with target boxes whose turn-1 box does not hold them (or that wrote no valid box)."""
    return bool(r.get("target_boxes")) and not target_fit(r["box_original"] if r["valid"] else None,
                                                           r["target_boxes"])[1]


def pick_cases(records: list[dict], limit: int) -> list[dict]:
    """Up to ``limit`` cases taken in turn from right, wrong and invalid-box ones, so each filter shows
    some; within each, spread over the whole evaluation (every k-th), not its first questions only."""
    pools = [[r for r in records if r["valid"] and r["correct"]], [r for r in records if r["valid"] and not r["correct"]],
             [r for r in records if not r["valid"]]]
    takes = [0] * len(pools)  # how many of each, in turn, while any has more
    while sum(takes) < limit and any(n < len(pool) for n, pool in zip(takes, pools)):
        for k, pool in enumerate(pools):
            if takes[k] < len(pool) and sum(takes) < limit:
                takes[k] += 1
    chosen = [[pool[j * len(pool) // n] for j in range(n)] for pool, n in zip(pools, takes)]
    return [pick[j] for j in range(max(takes, default=0)) for pick in chosen if j < len(pick)]


def _card(r: dict, load_image) -> str:
    try:
        image = load_image(r)
    except Exception as e:  # a broken image must not break the report
        return f"<div class='card'><b>{_e(r['id'])}</b>: image unavailable ({_e(e)})</div>"
    boxes = [(b, (0, 200, 0)) for b in r.get("target_boxes") or []]
    crop = ""
    if r["valid"]:
        boxes.append((r["box_original"], (230, 0, 0)))
        crop = f"<img alt='crop' src='{_thumb(image.crop([int(v) for v in r['box_original']]), [], 256)}'>"
    texts = f"turn 1: {_e(r['turn1_text'][:600])}\n\nturn 2: {_e(r['turn2_text'][:600])}"
    if r.get("turns"):  # K-turn mode: every crop in order, every turn's text
        zooms = [t["box_original"] for t in r["turns"] if t.get("crop_size")]
        boxes += [(b, (230, 0, 0)) for b in zooms[1:]]
        crop = "".join(f"<img alt='crop {k + 1}' src='{_thumb(image.crop([int(v) for v in b]), [], 160)}'>"
                       for k, b in enumerate(zooms))
        texts = "\n\n".join(f"turn {k + 1} ({t['action']}): {_e(t['text'][:300])}" for k, t in enumerate(r["turns"]))
    verdict = "right" if r["correct"] else "wrong"
    kinds = verdict + ("" if r["valid"] else " invalid") + (" missed" if r["correct"] and box_missed(r) else "")
    facts = []
    if r.get("target_boxes"):
        fit_iou, holds = target_fit(r["box_original"] if r["valid"] else None, r["target_boxes"])
        facts.append(f"IoU with the target {fit_iou:.2f}" + (", holds it" if holds else ", misses it"))
    if r.get("crop_size"):
        facts.append(f"crop {r['crop_size'][0]} x {r['crop_size'][1]} px")
    options = "".join(f"<li>({chr(65 + k)}) {_e(o)}</li>" for k, o in enumerate(r.get("options") or []))
    return (f"<div class='card {kinds}'><div class='head'><b>{_e(r['id'])}</b> [{_e(r['dataset'])} / "
            f"{_e(r['category'])}] answer {_e(r['answer'])}, predicted {_e(r['pred'])}: <b>{verdict}</b>"
            f"{'; ' + _e('; '.join(facts)) if facts else ''}</div>"
            f"<img alt='original' src='{_thumb(image, boxes)}'>{crop}<p class='q'>{_e(r['question'])}</p>"
            f"{f'<ol class=opts>{options}</ol>' if options else ''}<pre>{texts}</pre></div>")


def _cases(records: list[dict], load_image, limit: int) -> str:
    shown = pick_cases(records, limit)
    counts = {"all": len(shown), "right": sum(r["correct"] for r in shown),
              "wrong": sum(not r["correct"] for r in shown), "invalid": sum(not r["valid"] for r in shown),
              "missed": sum(r["correct"] and box_missed(r) for r in shown)}
    names = {"all": "all", "right": "right", "wrong": "wrong", "invalid": "invalid box",
             "missed": "right answer, box missed"}
    buttons = "".join(f"<button data-kind='{k}' onclick=\"show('{k}')\"{' class=on' if k == 'all' else ''}>"
                      f"{names[k]} ({n})</button>" for k, n in counts.items())
    return (f"<h2>Cases ({len(shown)} of {len(records)})</h2>"
            "<p>Red: the model's box (mapped to the original). Green: ground-truth targets. "
            "<span id='imgcount'></span></p>"
            f"<div class='filters'>{buttons}</div>" + "".join(_card(r, load_image) for r in shown))


def render_html(records: list[dict], load_image, limit: int, metrics: dict, protocol: dict,
                skipped: dict[str, list], title: str = "MGPO evaluation") -> str:
    """The whole report: summary tables, charts, skipped records, then the filterable cases."""
    head = " · ".join(f"{n}: {fmt(m['accuracy'])}% of {m['questions']}" for n, m in metrics.items()) or \
        "no usable records"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><h1>{_e(title)}</h1>"
            f"<p class='headline'>{_e(head)}</p>" + _summary(metrics, protocol, skipped)
            + _charts(records, metrics) + _skipped(skipped) + _cases(records, load_image, limit)
            + "</body></html>")
