"""mgpo.core.conversation: encoding a prompt with its image, and closing a turn at its box."""

import pytest
import torch
from helpers import ScriptedModel
from PIL import Image

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.conversation import encode
from mgpo.core.reward import score
from mgpo.core.rollout import rollout
from mgpo.data.images import load_image
from mgpo.data.samples import BadImageError, load_samples
from mgpo.runtime.model import load_processor

MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


@pytest.fixture(scope="module")
def env(tiny_dir, synth_dir):
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return load_model(mcfg), load_processor(mcfg), list(load_samples(synth_dir / "train.jsonl")), mcfg


def _run(model, processor, samples, **kw):
    greedy = kw.pop("greedy", False)
    cfg = RolloutConfig(**{"group_size": 2, "max_new_tokens_turn1": 24, "max_new_tokens_turn2": 16, **kw})
    return rollout(model, processor, samples, cfg, min_pixels=MIN_PX, max_pixels=MAX_PX, record_logprobs=True,
                   greedy=greedy)


def test_one_turn_grpo_keeps_its_answer(env):
    """Bug 3: the box cut dropped "\\boxed{D}" from the one-turn answer and trained an
    unsampled <|im_end|> in its place."""
    model, processor, samples, _ = env
    sample = samples[0]
    text = '```json\n[{"bbox_2d": [10, 10, 300, 200], "label": "x"}]\n``` so the answer is \\boxed{' + sample.answer + "}"
    scripted = ScriptedModel(model, processor.tokenizer, [text + "<|im_end|>"])
    r = _run(scripted, processor, [sample], template="grpo", max_new_tokens_turn1=96)
    for _i, t in enumerate(r.trajectories):
        assert t.final_text.endswith("\\boxed{" + sample.answer + "}")
        assert t.box_input is not None  # the box stays a diagnostic
    assert score(r.trajectories).tolist() == [1.0, 1.0]
    # Every trained token was sampled (its generation log-prob exists), the closing one too.
    assert not torch.isnan(r.sample_logp[r.loss_mask.bool()]).any()


QWEN_DEFAULT = (56 * 56, 28 * 28 * 1280)  # the published processor's min_pixels, the paper's max


def test_one_by_28_gives_qwens_28_by_308(tmp_path, tiny_dir):
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=QWEN_DEFAULT[0], max_pixels=QWEN_DEFAULT[1]))
    Image.new("RGB", (1, 28)).save(tmp_path / "s.png")
    enc = encode(processor, "<|vision_start|><|image_pad|><|vision_end|>", [load_image(str(tmp_path / "s.png"))])
    assert enc.image.grid[0].tolist() == [1, 22, 2]  # 28 wide x 308 high, as qwen_vl_utils.smart_resize gives


def test_a_prompt_too_long_by_its_image_size_is_skipped_before_any_resize(env, monkeypatch):
    """The length limit was applied after the image was resized into the pixel budget: a huge
    budget allocated the enlarged image first (3 TB in one evaluation). Now the tokens are
    counted from the image's header size and the record is skipped without decoding it."""
    import dataclasses as dc

    from mgpo.config import RolloutConfig
    from mgpo.core.rollout import rollout

    _, processor, samples, _ = env
    decoded = []
    big = [dc.replace(s, width=40000, height=30000) for s in samples[:2]]
    monkeypatch.setattr(type(big[0]), "load_image", lambda self: decoded.append(self.id) or Image.new("RGB", (8, 8)))
    with pytest.raises(BadImageError, match="over data.max_prompt_tokens"):
        rollout(None, processor, big, RolloutConfig(group_size=2), min_pixels=200704, max_pixels=12845056,
                max_prompt_tokens=2048)
    assert decoded == [], "nothing decoded or resized for a prompt refused by its size"
