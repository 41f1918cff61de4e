"""The beacon task keeps its promise: through the model's own processor, the down-scaled image
is the same whatever the answer (rounding aside) while a crop of the target shows it; the base
model's SFT records pair every panel with the pattern inside it."""

import json

import pytest

from mgpo.config import ModelConfig
from mgpo.tools import beacon

BUDGET = 448 * 112  # the beacon budget: min_pixels = max_pixels, a 4x down-scale
ONE_LEVEL = 1 / 255 / 0.26  # one 8-bit level after the processor's normalization (smallest std 0.26)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from mgpo.runtime.model import load_processor

    return load_processor(ModelConfig(path=str(tiny_dir), min_pixels=BUDGET, max_pixels=BUDGET))


def _pixels(processor, image):
    return processor.image_processor(images=[image], return_tensors="pt")


@pytest.mark.parametrize("target", [0, 1, 2])
def test_answer_invisible_down_scaled_legible_in_the_crop(processor, target):
    images = [beacon.draw(target, [(k + i) % 3 for i in range(3)]) for k in range(3)]  # the three answers
    whole = [_pixels(processor, im) for im in images]
    assert whole[0]["image_grid_thw"].tolist() == [[1, 8, 32]]  # 448 x 112: the 4x down-scale
    spread = max((a["pixel_values"] - b["pixel_values"]).abs().max().item() for a in whole for b in whole)
    assert spread <= 2.5 * ONE_LEVEL, "the down-scaled image must not tell the answers apart"
    crops = [_pixels(processor, im.crop(tuple(beacon.panel_box(target))))["pixel_values"] for im in images]
    gaps = [(crops[i] - crops[j]).abs().mean().item() for i in range(3) for j in range(i)]
    assert min(gaps) > 20 * ONE_LEVEL, "a crop of the target must show its pattern"


def test_the_tint_marks_the_target(processor):
    """The target's place is visible down-scaled: moving the target changes the image."""
    a, b = (_pixels(processor, beacon.draw(t, [0, 0, 0]))["pixel_values"] for t in (0, 2))
    assert (a - b).abs().max().item() > 20 * ONE_LEVEL


def test_sft_records_pair_every_panel_with_its_own_pattern(tmp_path):
    path = beacon.build_beacon(tmp_path, n=4, seed=0, split="sft", every_panel=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    truth = [json.loads(line) for line in beacon.build_beacon(tmp_path / "t", 4, 0, "sft").read_text().splitlines()]
    assert len(rows) == 4 * len(beacon.PANELS)
    for i, t in enumerate(truth):
        mine = rows[i * 3:(i + 1) * 3]
        assert [r["target_boxes"] for r in mine] == [[beacon.panel_box(p)] for p in range(3)]
        # the record whose box is the true target carries the true answer
        assert [r["answer"] for r in mine if r["target_boxes"] == t["target_boxes"]] == [t["answer"]]


@pytest.fixture(scope="module")
def nested_processor(tiny_dir):
    from mgpo.runtime.model import load_processor

    budget = beacon.NESTED.budget
    return load_processor(ModelConfig(path=str(tiny_dir), min_pixels=budget, max_pixels=budget))


@pytest.mark.parametrize("target", [0, 1, 2])
def test_nested_layout_needs_two_zooms(nested_processor, target):
    """NESTED: the pattern is invisible in the image (4x down) and in a crop of the panel (2x
    down, as the rollout shows it), legible only in the panel's centre (1x): two zooms."""
    from mgpo.core.grounding import Box, crop_original, fit_to_budget

    layout, budget = beacon.NESTED, beacon.NESTED.budget
    images = [beacon.draw(target, [(k + i) % 3 for i in range(3)], layout) for k in range(3)]

    def shown(region):  # what the model reads of a region of the original
        return [_pixels(nested_processor, fit_to_budget(crop_original(im, Box(*region)), budget, budget))
                for im in images]

    whole = [_pixels(nested_processor, im) for im in images]
    assert whole[0]["image_grid_thw"].tolist() == [[1, 4, 16]]  # 224 x 56: the 4x down-scale
    panel = shown(beacon.panel_box(target, layout))
    assert panel[0]["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112 x 112: the panel at 2x down
    for views in (whole, panel):
        spread = max((a["pixel_values"] - b["pixel_values"]).abs().max().item() for a in views for b in views)
        assert spread <= 2.5 * ONE_LEVEL, "neither the image nor a crop of the panel may tell the answers apart"
    centre = [v["pixel_values"] for v in shown(beacon.target_box(target, layout))]
    gaps = [(centre[i] - centre[j]).abs().mean().item() for i in range(3) for j in range(i)]
    assert min(gaps) > 20 * ONE_LEVEL, "the second zoom must show the pattern"


@pytest.mark.parametrize("factor", beacon.BUDGET_FACTORS)
def test_budget_sweep_layouts_differ_only_in_what_the_down_scale_keeps(processor, factor):
    """beacon_at(F): the same picture at F times the model's view. The panels sit at the same input
    boxes; the pattern survives the down-scale at 1x and 2x (the one-turn model can read it) and
    averages out at 4x; a crop of the target, shown at the budget, is legible at every factor."""
    from mgpo.core.grounding import Box, crop_original, fit_to_budget

    layout = beacon.beacon_at(factor)
    assert [[v // factor for v in beacon.panel_box(i, layout)] for i in range(3)] == \
        [[v // 4 for v in beacon.panel_box(i)] for i in range(3)]
    images = [beacon.draw(1, [(k + i) % 3 for i in range(3)], layout) for k in range(3)]
    whole = [_pixels(processor, im) for im in images]
    assert whole[0]["image_grid_thw"].tolist() == [[1, 8, 32]]  # always seen at 448 x 112
    spread = max((a["pixel_values"] - b["pixel_values"]).abs().max().item() for a in whole for b in whole)
    if factor < 4:
        assert spread > 20 * ONE_LEVEL, "at 1x and 2x the whole image shows the pattern"
    else:
        assert spread <= 2.5 * ONE_LEVEL, "from 4x on the whole image must not tell the answers apart"
    crops = [_pixels(processor, fit_to_budget(crop_original(im, Box(*beacon.panel_box(1, layout))), BUDGET, BUDGET))
             for im in images]
    gaps = [(crops[i]["pixel_values"] - crops[j]["pixel_values"]).abs().mean().item() for i in range(3) for j in range(i)]
    assert min(gaps) > 20 * ONE_LEVEL, "a crop of the target must show its pattern"


def test_a_split_name_never_leaves_its_folder(tmp_path):
    """`beacon --split ../../x` wrote outside its folder."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mgpo.tools.beacon", str(tmp_path / "b"), "--split", "../../x",
                           "--n", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "a name, not a path" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path.parent / "x.jsonl").exists()
