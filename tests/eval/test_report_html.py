"""report.html: summary first, charts, filterable cases; checked in a real browser (headless Chromium)."""

import re
import shutil
import subprocess

import pytest
from PIL import Image

from mgpo.eval.report import compute_metrics
from mgpo.eval.report_html import pick_cases, render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _records():
    base = {"dataset": "vstar", "category": "direct_attributes", "question": "What colour?", "options": ["a", "b"],
            "answer": "A", "turn1_text": "box", "turn2_text": "\\boxed{A}", "original_size": [200, 100],
            "target_boxes": [[10, 10, 50, 50]], "sample": 0, "breakdown": [], "cycle": ""}
    return [
        {**base, "id": "1", "pred": "A", "correct": True, "valid": True, "box_original": [0, 0, 50, 50]},
        {**base, "id": "2", "pred": "B", "correct": False, "valid": True, "box_original": [100, 50, 200, 100]},
        {**base, "id": "3", "pred": None, "correct": False, "valid": False, "box_original": None,
         "category": "relative_position"},
    ]


def _html(records):
    metrics = compute_metrics(records)
    protocol = {"model": "tiny", "mode": "mgpo", "datasets": {"vstar": {"count": 3, "sha256": "abc123abc123"}}}
    skipped = {"vstar": [("9", "image file not found: x.jpg")]}
    return render_html(records, lambda r: Image.new("RGB", (200, 100), (120, 30, 30)), 10, metrics, protocol, skipped)


def test_report_opens_with_the_summary_then_charts_then_cases():
    page = _html(_records())
    order = [page.index(s) for s in ("<h2>Protocol", "<h2>Accuracy", "<h2>Grounding", "<h2>Charts",
                                     "<h2>Skipped records (1)", "<h2>Cases")]
    assert order == sorted(order)
    assert "33.3" in page and "vstar: 33.3% of 3" in page  # 1 of 3 right
    assert page.count("<svg") == 4  # valid-box share, accuracy per category, IoU and crop-area histograms
    assert "right (1)" in page and "wrong (2)" in page and "invalid box (1)" in page
    assert len(re.findall(r"class='card [^']*invalid", page)) == 1
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from the net


def test_cases_mix_right_wrong_and_invalid():
    recs = _records() * 1
    recs = [{**r, "id": f"{r['id']}-{i}"} for i in range(5) for r in recs]
    picked = pick_cases(recs, 6)
    assert sum(r["correct"] for r in picked) == 2 and sum(not r["valid"] for r in picked) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed: `apt-get install -y chromium` "
                                             "(Debian/Ubuntu) runs this browser check")
def test_report_renders_in_headless_chromium(tmp_path):
    (tmp_path / "report.html").write_text(_html(_records()))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "vstar: 33.3% of 3" in dom and "<h2>Protocol</h2>" in dom
    # the load handler counts images that decoded (naturalWidth > 0): all 3 originals and 2 crops
    assert "5 of 5 images shown" in dom, dom[-2000:]
    shot = subprocess.run([*cmd[:-2], f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,900",
                           (tmp_path / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.returncode == 0 and Image.open(tmp_path / "shot.png").size == (1200, 900)


def test_a_card_with_absurd_target_boxes_is_drawn_at_once(monkeypatch):
    """Targets of 1e9 pixels made every report card take 15-30 s: PIL drew the whole rectangle.
    Each box is clamped to a margin around the image before it is drawn."""
    from PIL import Image, ImageDraw

    drawn = []
    real = ImageDraw.ImageDraw.rectangle
    monkeypatch.setattr(ImageDraw.ImageDraw, "rectangle",
                        lambda self, xy, *a, **kw: (drawn.append(xy), real(self, xy, *a, **kw))[1])
    rec = {"id": "q", "dataset": "d", "category": "c", "answer": "A", "pred": "B", "correct": False, "valid": False,
           "box_original": None, "target_boxes": [[0, 0, 1e9, 1e9], [-1e12, 5, 3e11, 7]], "question": "?",
           "turn1_text": "", "turn2_text": "", "sample": 0, "crop_size": None, "original_size": [64, 48]}
    page = render_html([rec], lambda r: Image.new("RGB", (64, 48)), 4, {}, {"mode": "mgpo"}, {})
    assert "<img alt='original'" in page and len(drawn) == 2
    assert all(abs(v) <= 3 * 64 for xy in drawn for v in xy), drawn


def test_cards_show_options_iou_and_crop_with_a_filter_for_right_answers_from_missed_boxes():
    """The cards lacked the option texts, the case's IoU and crop size, and a way to find right
    answers whose box missed the target; the IoU histogram counted "no box" as an IoU of 0."""
    recs = _records()
    recs[0] = {**recs[0], "crop_size": [448, 448]}
    recs.append({**recs[1], "id": "4", "pred": "A", "correct": True})  # right, but its box misses the target
    page = _html(recs)
    assert "<li>(A) a</li><li>(B) b</li>" in page
    assert "IoU with the target 0.64, holds it; crop 448 x 448 px" in page
    assert "IoU with the target 0.00, misses it" in page
    assert "right answer, box missed (1)" in page and page.count("class='card right missed'") == 1
    assert "IoU with the target (3 valid boxes, 1 without one)" in page


def test_no_empty_chart_for_a_dataset_without_targets_or_boxes():
    recs = [{**r, "target_boxes": [], "valid": False, "box_original": None} for r in _records()]
    page = _html(recs)
    assert "IoU with the target" not in page and "crop area / image area" not in page
    assert page.count("<svg") == 2  # the valid-box share and the accuracy per category


def test_cases_are_spread_over_the_whole_evaluation():
    """The report showed the first N cases only; now every k-th of each kind."""
    recs = [{**_records()[0], "id": str(i)} for i in range(100)]
    shown = pick_cases(recs, 6)
    assert len(shown) == 6 and int(shown[-1]["id"]) > 50


def test_the_report_shows_each_accuracys_interval_and_the_faithfulness_table():
    page = _html(_records())
    assert "95% interval" in page and "(Wilson)" in page
    assert "Grounding faithfulness" in page and "right without grounding %" in page
