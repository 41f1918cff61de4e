"""The demo's closing table: the base model's figures beside the trained run's."""

import json

from mgpo.tools.demo import before_after


def test_before_after_shows_where_the_box_lands(tmp_path):
    base = {"test_accuracy": 57.8, "valid_box": 100.0, "mean_iou": 0.30, "holds": 34.4}
    (tmp_path / "base.json").write_text(json.dumps(base))
    run, ev = tmp_path / "run", tmp_path / "run" / "eval"
    ev.mkdir(parents=True)
    rows = [{"step": s, "reward/mean": 0.4 if s <= 5 else 0.9, "grounding/valid_box_share": 1.0,
             "grounding/iou": 0.3 if s <= 5 else 0.95, "grounding/box_holds_target": 0.35 if s <= 5 else 0.97}
            for s in range(1, 31)]
    rows[0]["reward/mean"], rows[-1]["reward/mean"] = 0.0, 1.0  # one noisy step each end: the windows average it
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = {"accuracy": 93.8, "grounding": {"valid_box": 100.0, "mean_iou": 1.0, "crop_contains_target": 100.0}}
    (ev / "metrics.json").write_text(json.dumps({"results": {"test": test}}))
    table = before_after(tmp_path / "base.json", run, ev).splitlines()
    assert "| test accuracy % (greedy) | 57.8 | 93.8 |" in table
    assert "| test turn-1 box holds the target % | 34.4 | 100.0 |" in table
    assert "| training share of boxes holding the target | 0.35 | 0.97 |" in table
    assert "| training reward (steps 1-5 -> 26-30) | 0.320 | 0.920 |" in table


def test_identical_samples_are_printed_once_and_said_to_teach_nothing(tiny_dir, synth_dir, capsys):
    """After training, the demo printed eight identical samples with advantage 0 and loss 0."""
    from mgpo.config import load_config
    from mgpo.tools.demo import show_one_rollout

    cfg = load_config("configs/tiny_cpu.yaml", [f"model.path={tiny_dir}", f"data.train={synth_dir / 'train.jsonl'}",
                                                "rollout.temperature=0.0001", "rollout.group_size=4",
                                                "rollout.max_new_tokens_turn1=6", "rollout.max_new_tokens_turn2=4"])
    show_one_rollout(cfg)
    out = capsys.readouterr().out
    assert out.count("--- sample") == 1 and "(samples 0, 1, 2, 3: 4 identical)" in out
    assert "all 4 samples are the same" in out and "teaches nothing" in out
