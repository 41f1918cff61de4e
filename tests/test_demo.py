"""The demo's closing table: the base model's figures beside the trained run's."""

import json

from mgpo.tools.demo import before_after


def test_before_after_shows_where_the_box_lands(tmp_path):
    base = {"test_accuracy": 57.8, "valid_box": 100.0, "mean_iou": 0.30, "holds": 34.4}
    (tmp_path / "base.json").write_text(json.dumps(base))
    run, ev = tmp_path / "run", tmp_path / "run" / "eval"
    ev.mkdir(parents=True)
    rows = [{"step": s, "reward/mean": r, "grounding/valid_box_share": 1.0, "grounding/iou": iou,
             "grounding/box_holds_target": holds} for s, r, iou, holds in ((5, 0.4, 0.3, 0.35), (50, 0.9, 0.95, 0.97))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = {"accuracy": 93.8, "grounding": {"valid_box": 100.0, "mean_iou": 1.0, "crop_contains_target": 100.0}}
    (ev / "metrics.json").write_text(json.dumps({"results": {"test": test}}))
    table = before_after(tmp_path / "base.json", run, ev).splitlines()
    assert "| test accuracy % (greedy) | 57.8 | 93.8 |" in table
    assert "| test turn-1 box holds the target % | 34.4 | 100.0 |" in table
    assert "| training share of boxes holding the target | 0.35 | 0.97 |" in table
    assert "| training reward (step 5 -> 50) | 0.400 | 0.900 |" in table
