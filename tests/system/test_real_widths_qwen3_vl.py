"""The real Qwen3-VL-8B widths at 2 layers on CPU: what the tiny Qwen3-VL cannot show.

A 151,936-word untied embedding of width 4096, 32 heads of dimension 128 over 8 key/value heads,
interleaved mRoPE [24, 20, 20], a vision tower of width 1152 (patch 16) whose last block feeds
DeepStack, and 980 image tokens from a 4,000-px image at the paper's pixel budget. One module-scoped
checkpoint; the rollout with a real crop, the log-prob parity over it, then one step on the
language model's attention weights (an optimizer over every weight would hold 3 x 7 GB here).
"""

import random

import pytest
import torch
from helpers import ScriptedModel

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.generation import suppressed_ids
from mgpo.core.policy import PolicyForward
from mgpo.core.rollout import rollout
from mgpo.data.samples import Sample

pytestmark = [pytest.mark.slow, pytest.mark.heavy]
MIN_PX, MAX_PX = 256 * 28 * 28, 1280 * 28 * 28


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from mgpo.runtime.model import load_model, load_processor
    from mgpo.tools.synth import background
    from mgpo.tools.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("real8b")
    ckpt = build_tiny_checkpoint(root / "qwen3-vl-8b-2l", seed=0, arch="qwen3-vl-8b", layers=2, vision_depth=2)
    background(random.Random(0), (3200, 4000)).save(root / "big.jpg", quality=90)
    sample = Sample(id="s0", image=str(root / "big.jpg"), question="What colour is the small square?",
                    options=("red", "green", "blue", "white"), answer="A")
    mcfg = ModelConfig(path=str(ckpt), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return {"model": load_model(mcfg), "processor": load_processor(mcfg), "sample": sample}


def test_qwen3_vl_8b_widths_rollout_crop_parity_and_a_step(real):
    from mgpo.runtime.archs import ARCHS

    a, model, processor = ARCHS["qwen3-vl-8b"], real["model"], real["processor"]
    lm = model.model.language_model
    assert model.lm_head.weight.shape == (a.vocab_size, a.hidden_size) and not model.config.tie_word_embeddings
    assert lm.layers[0].self_attn.k_proj.weight.shape == (a.num_key_value_heads * a.head_dim, a.hidden_size)
    assert model.config.vision_config.deepstack_visual_indexes == [1]

    # a grid box around the middle of the image: its crop is enlarged into the budget
    box = '```json\n[{"bbox_2d": [400, 400, 600, 600], "label": "square"}]\n```'
    scripted = ScriptedModel(model, processor.tokenizer, [box, None])
    cfg = RolloutConfig(group_size=1, max_new_tokens_turn1=40, max_new_tokens_turn2=6)
    torch.manual_seed(0)
    r = rollout(scripted, processor, [real["sample"]], cfg, min_pixels=MIN_PX, max_pixels=MAX_PX,
                record_logprobs=True)
    (t,) = r.trajectories
    assert t.valid and t.box_original == [1280, 1600, 1920, 2400] and t.crop_size is not None
    assert 900 <= int(r.image_grid_thw[0].prod()) // 4 <= 980  # the budget's 1,003,520 px in 32 x 32 tokens
    assert t.input_size[0] % 32 == 0 and t.input_size[1] % 32 == 0

    # the training forward's log-probs on the freely sampled turn 2 (after the crop, DeepStack
    # over both images) equal generation's; then one step on the attention weights
    model.requires_grad_(False)
    trained = [p for n, p in model.named_parameters() if "language_model" in n and "self_attn" in n
               and n.endswith("proj.weight")]
    for p in trained:
        p.requires_grad_(True)
    before = [p.detach().clone() for p in trained]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    logp, _ = PolicyForward(model, 1.0, suppressed_ids(processor))(loss_mask=r.loss_mask, **r.model_inputs())
    mask = r.loss_mask.bool()
    turn2 = mask.clone()
    turn2[0, mask[0].nonzero().squeeze(-1)[: t.turn1_tokens]] = False  # turn 1 was forced
    assert turn2.sum() >= 2 and (logp[turn2] - r.sample_logp[turn2]).abs().max() < 1e-3
    (-(logp * r.loss_mask).sum() / r.loss_mask.sum()).backward()
    with torch.no_grad():
        for p in trained:
            p -= 0.1 * p.grad
    assert all(not torch.equal(p, b) for p, b in zip(trained, before))
