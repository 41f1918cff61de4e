"""mgpo.eval.report: metrics from prediction records, the console table, `compare`."""

import json

import pytest

from mgpo.core.grounding import contains, enclosing, iou
from mgpo.eval.report import compute_metrics


def test_console_table_has_every_column():
    from mgpo.eval.report import console_table

    table = console_table({"results": {"v": {"questions": 3, "accuracy": 66.666, "grounding":
                                             {"valid_box": 100.0, "mean_iou": None}}}, "skipped": {"v": 1, "w": 4}})
    head, v, w = table.splitlines()
    assert head.split() == ["dataset", "questions", "accuracy", "%", "95%", "interval", "valid", "box", "%", "mean",
                            "IoU", "skipped"]
    assert v.split() == ["v", "3", "66.7", "-", "100.0", "-", "1"] and w.split() == ["w", "0", "-", "-", "-", "-", "4"]


def test_iou_and_crop_contains_target_hand_built():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [0, 0, 5, 10]) == 0.5
    assert enclosing([[10, 10, 20, 20], [50, 5, 60, 15]]) == [10, 5, 60, 20]
    assert contains([0, 0, 100, 100], enclosing([[10, 10, 20, 20], [50, 5, 60, 15]]))
    assert not contains([0, 0, 55, 100], enclosing([[10, 10, 20, 20], [50, 5, 60, 15]]))
    recs = [{"dataset": "d", "id": "1", "category": "c", "correct": True, "pred": "A", "valid": True,
             "box_original": [0, 0, 10, 10], "target_boxes": [[0, 0, 5, 10]], "original_size": [100, 100]},
            {"dataset": "d", "id": "2", "category": "c", "correct": False, "pred": None, "valid": False,
             "box_original": None, "target_boxes": [[0, 0, 5, 10]], "original_size": [100, 100]}]
    g = compute_metrics(recs)["d"]["grounding"]
    assert g["mean_iou"] == pytest.approx(0.25) and g["crop_contains_target"] == 50.0 and g["valid_box"] == 50.0


@pytest.mark.parametrize("make, reason", [
    (lambda d: None, "no such folder"),
    (lambda d: d.mkdir(), "no metrics.json"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text("{not json")), "not a readable JSON file"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text(json.dumps({"protocol": {}}))), "holds no results"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text(json.dumps({"protocol": {}, "results": {"x": {}}}))),
     "holds no results"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text("[]")), "holds no results"),
])
def test_compare_on_a_folder_that_is_no_evaluation_says_why(tmp_path, make, reason):
    from mgpo.eval.report import CompareError, compare

    make(tmp_path / "run")
    with pytest.raises(CompareError, match=reason) as refused:
        compare([tmp_path / "run"])
    assert str(tmp_path / "run") in str(refused.value)


def test_report_md_escapes_text_from_the_data():
    """A category written as HTML was copied into report.md as HTML (a Markdown viewer renders it)."""
    from mgpo.eval.report import render_markdown

    recs = [{"id": "q", "dataset": "d", "category": "<img src=x onerror=alert(1)>|x", "correct": True, "pred": "A",
             "valid": False, "box_original": None, "target_boxes": [], "crop_size": None, "original_size": [10, 10],
             "sample": 0}]
    text = render_markdown(compute_metrics(recs), {"mode": "mgpo"}, {"d": [("q9", "bad <b>image</b>")]})
    assert "<img" not in text and "<b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;\\|x" in text and "bad &lt;b&gt;image&lt;/b&gt;" in text


def test_compare_refuses_malformed_figures_and_lists_every_protocol_key(tmp_path):
    from mgpo.eval.report import CompareError, compare

    def write(name, accuracy, protocol):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"protocol": protocol, "results": {"v": {
            "accuracy": accuracy, "categories": {"a": 50.0},
            "grounding": {"valid_box": 10.0, "mean_iou": None, "crop_contains_target": None}}}}))

    write("a", 50.0, {"mode": "mgpo"})
    write("b", 60.0, {"mode": "mgpo", "max_pixels": 1003520})  # a key only the second run has
    assert "Protocol differences: max_pixels" in compare([tmp_path / "a", tmp_path / "b"])
    write("c", "fifty", {"mode": "mgpo"})
    with pytest.raises(CompareError, match="not what an evaluation writes"):
        compare([tmp_path / "a", tmp_path / "c"])



def _rec(qid, correct, box=None, target=(10, 10, 50, 50), **kw):
    return {"id": qid, "dataset": "v", "category": "c", "correct": correct, "pred": "A", "valid": box is not None,
            "box_original": box, "target_boxes": [list(target)] if target else [], "original_size": [100, 100],
            "sample": 0, "question": "q", "options": ["a", "b"], "cycle": "", **kw}


def test_every_accuracy_carries_its_interval_and_the_method_that_made_it():
    recs = [_rec(f"q{i}", i < 8) for i in range(10)]
    m = compute_metrics(recs)["v"]
    assert m["interval"] == "Wilson" and [round(v, 1) for v in m["accuracy_ci95"]] == [49.0, 94.3]
    k = compute_metrics([{**r, "sample": s} for r in recs for s in range(3)])["v"]  # three samples each
    assert k["interval"] == "bootstrap over questions"
    hr = compute_metrics([_rec(f"q{i}", True, cycle=f"cycle{i}") for i in range(4)])["v"]  # one question, rotated
    assert hr["interval"] == "bootstrap over questions" and hr["accuracy_ci95"] == [100.0, 100.0]


def test_grounding_faithfulness_on_hand_made_predictions():
    """Target (10, 10, 50, 50), centre (30, 30). Right answers: box = target (IoU 1, centre in), a
    box holding the centre but too big for IoU 0.5, a box elsewhere, no box; wrong: one covering."""
    recs = [_rec("a", True, [10, 10, 50, 50]), _rec("b", True, [0, 0, 100, 100]), _rec("c", True, [60, 60, 90, 90]),
            _rec("d", True, None), _rec("e", False, [12, 12, 48, 48]), _rec("f", False, None, target=None)]
    f = compute_metrics(recs)["v"]["faithfulness"]
    assert (f["right_answers"], f["wrong_answers"]) == (4, 1)
    assert f["right_covered_iou"] == pytest.approx(25.0) and f["right_covered_centre"] == pytest.approx(50.0)
    assert f["right_without_grounding"] == pytest.approx(50.0)
    assert f["wrong_covered_iou"] == pytest.approx(100.0) and f["wrong_covered_centre"] == pytest.approx(100.0)
    assert "faithfulness" not in compute_metrics([_rec("x", True, None, target=None)])["v"]


def test_compare_gives_the_paired_difference_with_its_interval_and_mcnemar(tmp_path):
    from mgpo.eval.report import compare

    def write(name, right):
        (tmp_path / name).mkdir()
        recs = [_rec(f"q{i}", i < right) for i in range(20)]
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (tmp_path / name / "metrics.json").write_text(json.dumps({"protocol": {"mode": "mgpo"},
                                                                  "results": compute_metrics(recs)}))
    write("base", 8)
    write("mgpo", 14)
    text = compare([tmp_path / "base", tmp_path / "mgpo"])
    assert "v, mgpo - base: +30.0 points, 95% interval" in text
    assert "20 questions, paired; right only in base: 0, only in mgpo: 6; McNemar exact p = 0.0312" in text


def test_compare_pairs_hr_bench_rotations_as_one_question(tmp_path):
    """HR-Bench asks each question 4 times with its options rotated: a comparison treated the
    rotations as 4 independent questions (McNemar and the paired interval too confident)."""
    from mgpo.eval.report import compare

    def write(name, right):
        (tmp_path / name).mkdir()
        recs = []
        for q in range(5):  # 5 questions x 4 rotations; the first `right` questions right in every rotation
            for k in range(4):
                r = _rec(f"q{q}-r{k}", q < right)
                r.update(question=f"question {q}?", options=["w", "x", "y", "z"][k:] + ["w", "x", "y", "z"][:k],
                         cycle=k + 1)
                recs.append(r)
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (tmp_path / name / "metrics.json").write_text(json.dumps({"protocol": {"mode": "mgpo"},
                                                                  "results": compute_metrics(recs)}))
    write("base", 1)
    write("mgpo", 4)
    text = compare([tmp_path / "base", tmp_path / "mgpo"])
    assert "v, mgpo - base: +60.0 points" in text
    # 5 questions, 3 discordant: p = 2 x (1/2)^3 = 0.25, not 2 x (1/2)^12 over 20 "questions"
    assert "5 questions, paired; right only in base: 0, only in mgpo: 3; McNemar exact p = 0.25" in text
