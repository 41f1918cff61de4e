"""What differs between model families, checked on each: box conventions, resize, refusals."""

import json
import random
import shutil

import pytest
import torch
from helpers import ScriptedModel
from PIL import Image

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.grounding import Box, View, fit_to_budget, pixel_box, to_original_box, view_to_original
from mgpo.core.sft import sft_texts, written
from mgpo.data.samples import load_samples
from mgpo.runtime.family import family_of, processor_family
from mgpo.runtime.model import CheckpointError, load_model, load_processor


def _one_image_set(tmp_path, size, target=(2100, 100, 2300, 300)):
    Image.new("RGB", size, (40, 90, 160)).save(tmp_path / "big.png")
    rec = {"id": "big", "image": str(tmp_path / "big.png"), "question": "Which colour?",
           "options": ["red", "blue"], "answer": "B", "target_boxes": [list(target)]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    return list(load_samples(tmp_path / "d.jsonl"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from mgpo.tools.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("q3") / "tiny-qwen3-vl", seed=0, arch="qwen3-vl")


@pytest.mark.parametrize("budget", [64 * 32 * 32, 300 * 32 * 32])
def test_a_qwen3_vl_grid_box_crops_the_original_at_the_same_pixels_whatever_the_input(qwen3, tmp_path, budget,
                                                                                      monkeypatch):
    """Qwen3-VL writes boxes on a 0-1000 grid over the image: [500, 0, 1000, 500] on a 4000 x 3000
    original is its right half's top half, (2000, 0, 4000, 1500) in original pixels, whatever size
    the model was shown the image at."""
    import mgpo.core.rollout as ro

    cut = []
    real = ro.crop_original
    monkeypatch.setattr(ro, "crop_original", lambda image, box: (cut.append(pixel_box(box, image.size)),
                                                                 real(image, box))[1])
    mcfg = ModelConfig(path=str(qwen3), min_pixels=budget, max_pixels=budget, dtype="float32")
    model, processor = load_model(mcfg), load_processor(mcfg)
    samples = _one_image_set(tmp_path, (4000, 3000))
    scripted = ScriptedModel(model, processor.tokenizer, ['{"bbox_2d": [500, 0, 1000, 500]}', None])
    cfg = RolloutConfig(group_size=1, max_new_tokens_turn1=40, max_new_tokens_turn2=2)
    r = ro.rollout(scripted, processor, samples, cfg, min_pixels=budget, max_pixels=budget, greedy=True)
    t = r.trajectories[0]
    assert t.valid and t.box_input == [500, 0, 1000, 500]
    assert t.box_original == [2000, 0, 4000, 1500] and cut == [(2000, 0, 4000, 1500)]
    assert t.input_size[0] % 32 == 0 and t.input_size[1] % 32 == 0


def test_grid_edges_land_on_the_image_edges():
    for (W, H) in [(4000, 3000), (33, 4097), (1, 1)]:
        for input_size in [(640, 480), (32, 4096), (32, 32)]:
            assert to_original_box(Box(0, 0, 1000, 1000), input_size, (W, H), grid=1000) == Box(0, 0, W, H)
    view = View(Box(1000, 750, 2000, 1500), (512, 384))
    assert view_to_original(Box(0, 0, 1000, 1000), view, grid=1000) == view.region
    assert view_to_original(Box(500, 500, 1000, 1000), view, grid=1000) == Box(1500, 1125, 2000, 1500)


def test_resize_is_the_family_image_processors_on_a_thousand_pairs(family_dir):
    """The size ``fit_to_budget`` resizes a crop to, and the size the rollout predicts for an
    original, is the size the family's own image processor resizes that image to, on 1,200 random
    image sizes and pixel budgets."""
    processor = load_processor(ModelConfig(path=str(family_dir)))
    f, ip = processor_family(processor), processor.image_processor
    rng = random.Random(0)
    for _ in range(1200):
        w, h = rng.randint(1, 600), rng.randint(1, 600)
        if max(w, h) > 200 * min(w, h):  # the processor refuses slivers (fit_to_budget widens them)
            continue
        lo = rng.randint(f.factor ** 2, 40 * f.factor ** 2)
        hi = rng.randint(lo, 300 * f.factor ** 2)
        image = Image.new("RGB", (w, h))
        out = ip(images=[image], size={"shortest_edge": lo, "longest_edge": hi}, return_tensors="pt")
        _, gh, gw = out["image_grid_thw"][0].tolist()
        assert (gw * f.patch, gh * f.patch) == fit_to_budget(image, lo, hi, factor=f.factor).size, (w, h, lo, hi)


@pytest.mark.parametrize("model_type, missing", [("qwen3_5", "recurrent state"), ("qwen3_vl_moe", "mixture"),
                                                 ("llava", "not a model family")])
def test_an_unsupported_model_is_refused_at_load_in_one_line(tmp_path, model_type, missing):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=missing) as e:
        load_model(ModelConfig(path=str(tmp_path)))
    assert "\n" not in str(e.value) and model_type in str(e.value)


def test_a_processor_of_another_family_is_refused(qwen3, tmp_path):
    from mgpo.tools.tiny import PUBLISHED_PREPROCESSOR

    folder = tmp_path / "mixed"
    shutil.copytree(qwen3, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PREPROCESSOR))
    with pytest.raises(CheckpointError, match="16-px patches"):
        load_processor(ModelConfig(path=str(folder)))


def test_family_is_read_from_the_checkpoint(family_dir):
    model = load_model(ModelConfig(path=str(family_dir)))
    processor = load_processor(ModelConfig(path=str(family_dir)))
    assert family_of(model) is family_of(family_dir) is processor_family(processor)
    assert type(model).__name__ == family_of(family_dir).model_class


def test_sft_targets_are_written_in_the_family_convention_and_crop_the_target(family_dir, tmp_path):
    """SFT's turn-1 box, read back by the rollout's own parser, crops a region that holds the
    target, for a pixel family and a grid family alike."""
    from mgpo.core.forced import teacher_forced
    from mgpo.core.grounding import contains

    budget = 100 * 32 * 32
    processor = load_processor(ModelConfig(path=str(family_dir), min_pixels=budget, max_pixels=budget))
    family = processor_family(processor)
    samples = _one_image_set(tmp_path, (4000, 3000))
    texts = [sft_texts(s, "mgpo", (4000, 3000), budget, budget, family=family) for s in samples]
    r = teacher_forced(processor, samples, texts, RolloutConfig(), min_pixels=budget, max_pixels=budget)
    t = r.trajectories[0]
    assert t.valid and contains(t.box_original, samples[0].target_boxes[0])
    if family.box_grid:  # 2100..2300 of 4000 px is 525..575 of the grid (widened to a valid box)
        assert 0 <= t.box_input[0] <= 525 and 575 <= t.box_input[2] <= 1000 and t.box_input[3] <= 1000
    assert written(Box(320, 0, 640, 240), (640, 480), family.box_grid) == (
        Box(500, 0, 1000, 500) if family.box_grid else Box(320, 0, 640, 240))
    assert torch.equal(r.loss_mask.sum(1), torch.tensor([t.turn1_tokens + t.turn2_tokens]))
