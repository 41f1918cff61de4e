"""data.max_prompt_tokens: over-long prompts are skipped and counted, in evaluation and in training."""

import json
from dataclasses import replace

import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from mgpo.config import ModelConfig
from mgpo.core.conversation import encode
from mgpo.core.prompts import first_prompt_text, get_template
from mgpo.core.rollout import prompt_tokens
from mgpo.data.images import BadImageError, load_image
from mgpo.data.samples import drop_long_prompts, load_samples
from mgpo.runtime.model import load_processor

MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


def test_prompt_tokens_without_the_image_equal_the_encoded_length(tiny_dir, synth_dir):
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX))
    samples = list(load_samples(synth_dir / "train.jsonl"))[:4]
    samples.append(replace(samples[0], question="word " * 500))
    for name in ("mgpo", "grpo", "direct"):
        for s in samples:
            text = first_prompt_text(processor, get_template(name), s.question, s.options)
            assert prompt_tokens(processor, name, s, MIN_PX, MAX_PX) == len(encode(processor, text, [s.load_image()]).ids)


def test_training_set_drops_over_long_prompts_at_load(tiny_dir, synth_dir, tmp_path):
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX))
    recs = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text().splitlines()[:3]]
    for r in recs:
        r["image"] = str(synth_dir / r["image"])
    recs[1]["question"] = "word " * 5000
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = load_samples(tmp_path / "d.jsonl")
    kept = drop_long_prompts(data, lambda s: prompt_tokens(processor, "mgpo", s, MIN_PX, MAX_PX), 2048)
    assert [s.id for s in kept] == [recs[0]["id"], recs[2]["id"]]
    assert kept.skipped[0][0] == recs[1]["id"] and "over data.max_prompt_tokens (2048)" in kept.skipped[0][1]
    assert len(drop_long_prompts(data, lambda s: 10**6, 0)) == 3  # 0 = no limit


QWEN_DEFAULT = (56 * 56, 28 * 28 * 1280)  # the published processor's min_pixels, the paper's max


@pytest.mark.parametrize("budget", [QWEN_DEFAULT, (MIN_PX, MAX_PX)])
@pytest.mark.parametrize("size", [(1, 28), (28, 1), (3, 28), (10, 40), (2, 56), (1, 200), (5, 1000), (1, 1), (27, 27)])
def test_small_images_follow_qwen_resize_and_prompt_tokens_agree(tmp_path, tiny_dir, size, budget):
    """An image with a side under 28 px goes to the processor as it is (Qwen's smart_resize
    enlarges it), and the length ``prompt_tokens`` predicts from the header is what the real
    processor produces."""
    lo, hi = budget
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=lo, max_pixels=hi))
    Image.new("RGB", size, (90, 20, 200)).save(tmp_path / "s.png")
    rec = {"id": "s", "image": str(tmp_path / "s.png"), "question": "Which colour?", "options": ["red", "blue"],
           "answer": "B"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    (sample,) = load_samples(tmp_path / "d.jsonl")
    image = sample.load_image()
    assert image.size == size  # decoded as it is: the processor does the resizing
    enc = encode(processor, first_prompt_text(processor, get_template("mgpo"), sample.question, sample.options), [image])
    _, gh, gw = enc.image.grid[0].tolist()
    assert (gh * 14, gw * 14) == smart_resize(size[1], size[0], 28, lo, hi)
    assert prompt_tokens(processor, "mgpo", sample, lo, hi) == len(enc.ids)


def test_one_by_28_gives_qwens_28_by_308(tmp_path, tiny_dir):
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=QWEN_DEFAULT[0], max_pixels=QWEN_DEFAULT[1]))
    Image.new("RGB", (1, 28)).save(tmp_path / "s.png")
    enc = encode(processor, "<|vision_start|><|image_pad|><|vision_end|>", [load_image(str(tmp_path / "s.png"))])
    assert enc.image.grid[0].tolist() == [1, 22, 2]  # 28 wide x 308 high, as qwen_vl_utils.smart_resize gives


@pytest.mark.parametrize("size, ok", [((1, 200), True), ((200, 1), True), ((5, 1000), True), ((1, 201), False),
                                      ((1000, 4), False)])
def test_aspect_ratio_200_is_accepted_above_is_refused(tmp_path, size, ok):
    """Qwen's smart_resize refuses a long/short side ratio above 200, not 200 itself."""
    Image.new("RGB", size).save(tmp_path / "a.png")
    rec = {"id": "a", "image": str(tmp_path / "a.png"), "question": "q?", "options": ["x", "y"], "answer": "A"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    data = load_samples(tmp_path / "d.jsonl")
    if ok:
        assert len(data) == 1 and load_image(str(tmp_path / "a.png")).size == size
    else:
        assert len(data) == 0 and "aspect ratio" in data.skipped[0][1]
        with pytest.raises(BadImageError, match="aspect ratio"):
            load_image(str(tmp_path / "a.png"))
