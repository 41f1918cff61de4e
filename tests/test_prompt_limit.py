"""data.max_prompt_tokens: over-long prompts are skipped and counted, in evaluation and in training."""

import json
from dataclasses import replace

from mgpo.config import ModelConfig
from mgpo.core.conversation import encode
from mgpo.core.prompts import first_prompt_text, get_template
from mgpo.core.rollout import prompt_tokens
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
