"""Box parsing, validity, the coordinate mapping and the crop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mgpo import parse_box, to_original_box
from mgpo.core.grounding import Box, box_problem, crop_original, find_box, fit_to_budget, input_size_from_grid


@pytest.mark.parametrize("text, box", [
    ('```json\n[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}]\n```', (10, 20, 110, 220)),
    ('I think: ```json\n{"bbox_2d": [1, 2, 3, 4]}\n``` done', (1, 2, 3, 4)),
    ('[{"bbox_2d": [5.5, 6, 70, 80.25], "label": "x"}]', (5.5, 6, 70, 80.25)),
    ('{"bbox_2d": [0, 0, 50, 60]}', (0, 0, 50, 60)),
    ("the region is [12, 34, 56, 78].", (12, 34, 56, 78)),
    ('```json\n[{"label": "no box"}, {"bbox_2d": [1, 1, 40, 40]}]\n```', (1, 1, 40, 40)),
    ('first [1, 2, 3, 4] then [5, 6, 7, 8]', (1, 2, 3, 4)),
    ('```json\nnot json\n``` but later [9, 9, 99, 99]', (9, 9, 99, 99)),
])
def test_parse_accepts_the_forms_models_write(text, box):
    assert parse_box(text) == Box(*map(float, box))


@pytest.mark.parametrize("text", ["", "no box", "[1, 2, 3]", '{"bbox_2d": [1, 2, "x", 4]}', "[NaN, 1, 2, 3]",
                                  "[1e999, 1, 2, 3]", "```json\n[{\"bbox_2d\": [1, 2]}]\n```", "[true, 1, 2, 3]",
                                  "[" * 5000])
def test_parse_rejects_non_boxes(text):
    assert parse_box(text) is None


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_parse_never_raises_on_any_text(text):
    parse_box(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=True), st.text(max_size=5),
                          st.none(), st.booleans()), max_size=6))
def test_parse_never_raises_on_json_like_text(values):
    import json
    parse_box(json.dumps({"bbox_2d": values}))
    parse_box("```json\n" + json.dumps([{"bbox_2d": values}]) + "\n```")


def test_find_box_reports_the_block_end():
    text = 'Look here ```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "a"}]\n``` and then more'
    box, end = find_box(text)
    assert text[:end].endswith("```") and text[end:] == " and then more"


@pytest.mark.parametrize("box, problem", [
    (Box(0, 0, 448, 336), None),
    (Box(10, 10, 40, 40), None),  # 30 px sides: just above the 28-px floor
    (Box(10, 10, 38, 100), "too small"),  # exactly 28 wide is not enough
    (Box(-1, 0, 100, 100), "outside the image or inverted"),
    (Box(0, 0, 449, 100), "outside the image or inverted"),
    (Box(100, 0, 50, 100), "outside the image or inverted"),
    (Box(0, 0, 100, 100.5 + 236), "outside the image or inverted"),
    (None, "no box"),
])
def test_validity_rules(box, problem):
    assert box_problem(box, (448, 336)) == problem


def test_aspect_ratio_rule():
    assert box_problem(Box(0, 0, 3000, 29.5), (4000, 4000)) == "aspect ratio too extreme"  # 101.7
    assert box_problem(Box(0, 0, 2900, 29.5), (4000, 4000)) is None  # 98.3
    assert box_problem(Box(0, 0, 100, 30), (448, 336), max_aspect=3) == "aspect ratio too extreme"


def test_mapping_matches_independent_arithmetic():
    # A 4032x3024 photo shown as 1288x966 (Qwen's resize for 1280*28*28 pixels).
    orig, inp = (4032, 3024), (1288, 966)
    b = to_original_box(Box(644, 483, 966, 724.5), inp, orig)
    assert b == Box(644 * 4032 / 1288, 483 * 3024 / 966, 966 * 4032 / 1288, 724.5 * 3024 / 966)
    assert b.x1 == pytest.approx(2016.0) and b.y1 == pytest.approx(1512.0)
    # The DeepEyes bug: reading input pixels as original ones is off by ~68% of the offset here.
    assert abs(b.x1 - 644) > 1000


@settings(max_examples=300, deadline=None)
@given(st.integers(28, 5000), st.integers(28, 5000), st.integers(1, 40), st.integers(1, 40),
       st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_valid_boxes_map_inside_the_original(W, H, gw, gh, a, b, c, d):
    inp = (gw * 28, gh * 28)
    x1, x2 = sorted((a * inp[0], c * inp[0]))
    y1, y2 = sorted((b * inp[1], d * inp[1]))
    box = Box(x1, y1, x2, y2)
    if box_problem(box, inp) is not None:
        return
    m = to_original_box(box, inp, (W, H))
    assert 0 <= m.x1 < m.x2 <= W * (1 + 1e-12) and 0 <= m.y1 < m.y2 <= H * (1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8000), st.integers(1, 8000), st.integers(1, 60), st.integers(1, 60))
def test_whole_input_maps_to_whole_original(W, H, gw, gh):
    inp = (gw * 28, gh * 28)
    assert to_original_box(Box(0, 0, *inp), inp, (W, H)) == Box(0, 0, W, H)


def test_input_size_from_grid():
    assert input_size_from_grid([1, 22, 42]) == (588, 308)


def test_crop_contains_target_and_keeps_its_pixels(synth_dir):
    """A box around the target in resized coordinates crops the target from the original."""
    import json

    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rec = json.loads((synth_dir / "train.jsonl").read_text().splitlines()[0])
    original = Image.open(synth_dir / rec["image"]).convert("RGB")
    W, H = original.size
    h, w = smart_resize(H, W, 28, 64 * 28 * 28, 256 * 28 * 28)
    tx1, ty1, tx2, ty2 = rec["target_boxes"][0]
    # What a model would say: the target's box in *input* pixels, with some margin.
    sx, sy = w / W, h / H
    in_box = Box(max(0, tx1 * sx - 15), max(0, ty1 * sy - 15), min(w, tx2 * sx + 15), min(h, ty2 * sy + 15))
    assert box_problem(in_box, (w, h)) is None
    ob = to_original_box(in_box, (w, h), (W, H))
    crop = crop_original(original, ob)
    assert ob.x1 <= tx1 and ob.y1 <= ty1 and ob.x2 >= tx2 and ob.y2 >= ty2  # contains the target
    x1, y1 = int(np.floor(ob.x1)), int(np.floor(ob.y1))
    expected = np.asarray(original)[y1: y1 + crop.height, x1: x1 + crop.width]
    assert np.array_equal(np.asarray(crop), expected)
    # The target's coloured outline is inside the crop at its original position.
    sat = np.ptp(np.asarray(crop).astype(int), axis=-1)
    ys, xs = np.nonzero(sat > 100)
    assert xs.min() + x1 >= tx1 - 1 and xs.max() + x1 <= tx2 + 1


def test_fit_to_budget_enlarges_small_crops_and_keeps_aspect():
    small = Image.new("RGB", (60, 40))
    out = fit_to_budget(small, 64 * 28 * 28, 256 * 28 * 28)
    assert out.width * out.height >= 64 * 28 * 28 and out.width % 28 == 0 and out.height % 28 == 0
    assert abs(out.width / out.height - 1.5) < 0.2
    big = Image.new("RGB", (3000, 2000))
    out = fit_to_budget(big, 64 * 28 * 28, 256 * 28 * 28)
    assert out.width * out.height <= 256 * 28 * 28
    assert fit_to_budget(Image.new("RGB", (280, 196)), 28 * 28, 256 * 28 * 28).size == (280, 196)


@pytest.mark.parametrize("resample", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_resample_filters(resample):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    assert fit_to_budget(img, 64 * 28 * 28, 256 * 28 * 28, resample).size[0] % 28 == 0


def test_nested_view_maps_back_to_original_pixels():
    """A box on a crop of a crop, mapped by hand: 4000x3000 original shown at 448x336; a box
    (112, 84, 224, 168) there is original (1000, 750, 2000, 1500); that crop shown at 560x420;
    a box (280, 210, 560, 420) on it is 1000 + 280 * 1000 / 560 = 1500, 750 + 210 * 750 / 420 = 1125,
    1000 + 560 * 1000 / 560 = 2000, 750 + 420 * 750 / 420 = 1500."""
    from mgpo.core.grounding import View, view_to_original

    whole = View(Box(0, 0, 4000, 3000), (448, 336))
    first = view_to_original(Box(112, 84, 224, 168), whole)
    assert first == Box(1000, 750, 2000, 1500)
    assert first == to_original_box(Box(112, 84, 224, 168), (448, 336), (4000, 3000))
    second = view_to_original(Box(280, 210, 560, 420), View(first, (560, 420)))
    assert second == Box(1500, 1125, 2000, 1500)
    # a box of the crop's whole shown image is the crop's region, exactly
    assert view_to_original(Box(0, 0, 560, 420), View(first, (560, 420))) == first


FENCED_CAT = '```json\n[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}]\n```'


@pytest.mark.parametrize("text", [
    "The area [1, 2, 3, 4] is too small. " + FENCED_CAT,  # a bare list before the fenced block
    "see ```\n[1, 2, 3, 4]\n``` then " + FENCED_CAT,  # an unlabelled fence of bare numbers first
    "I pick [1, 2, 3, 4] as a guess.\n" + FENCED_CAT[:-4],  # the model stopped before closing the fence
    '```json\n[[1, 2, 3, 4], {"bbox_2d": [10, 20, 110, 220], "label": "cat"}]\n```',  # the bbox_2d item wins
    '{"box": [1, 2, 3, 4]} and ' + FENCED_CAT,
])
def test_the_grounding_block_wins_over_earlier_numbers(text):
    """Qwen's native output (a bbox_2d item, fenced) is the box, whatever list of four numbers
    came before it; the turn is cut right after that block."""
    box, end = find_box(text)
    assert box == Box(10.0, 20.0, 110.0, 220.0)
    assert text[:end].rstrip("`\n").endswith('"cat"}]')


def test_the_first_fenced_bbox_2d_item_wins():
    second = FENCED_CAT.replace("10, 20, 110, 220", "30, 40, 130, 240")
    assert parse_box(FENCED_CAT + " or " + second) == Box(10.0, 20.0, 110.0, 220.0)
    assert parse_box('{"bbox_2d": [5, 5, 60, 60]} then ' + FENCED_CAT) == Box(10.0, 20.0, 110.0, 220.0)


def test_fit_to_budget_takes_a_sliver_beyond_qwens_ratio():
    """A crop of a 1-px-wide original can come out longer than 200:1 after rounding; Qwen's
    resize would refuse it, so its short side is widened to the limit first."""
    out = fit_to_budget(Image.new("RGB", (1, 201)), 64 * 28 * 28, 256 * 28 * 28)
    assert out.width % 28 == 0 and out.height % 28 == 0 and out.height > out.width
