"""The real Qwen2.5-VL-3B widths at 2 layers on CPU: what the tiny model cannot show.

A 151,936-word tied embedding, 16 heads of dimension 128 over 2 key/value heads, mRoPE
[16, 24, 24], a vision tower of width 1280 with one windowed and one full-attention
block, and 1,280 image tokens from a 4,000-px image (max_pixels = 1280*28*28). One
module-scoped checkpoint; each test is one stage of a training run, in order.
Measured here (2 shared cores): 3 min 17 s and 8.5 GB peak RSS for the whole file.
"""

import dataclasses
import json
import random

import pytest
import torch
from helpers import ScriptedModel
from transformers import LogitsProcessor, LogitsProcessorList

from mgpo.config import ModelConfig, RolloutConfig, load_config
from mgpo.core.generation import special_ids, suppressed_ids
from mgpo.core.policy import PolicyForward
from mgpo.core.rollout import rollout
from mgpo.data.samples import Sample

pytestmark = [pytest.mark.slow, pytest.mark.heavy]
MIN_PX, MAX_PX = 256 * 28 * 28, 1280 * 28 * 28
# Input pixels of the 896 x 1120 first image: a 60-px box (its crop is enlarged to the 256-token
# minimum, which keeps the test's compute down) and a box too small to use.
VALID, INVALID = "[400, 300, 460, 360]", "[10, 10, 14, 14]"


class _ForceRows(LogitsProcessor):
    """Row r is forced to write ``scripts[r]`` from its first new token, then samples freely."""

    def __init__(self, scripts: list[list[int]], prompt_width: int):
        self.scripts, self.prompt_width = scripts, prompt_width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        for r, script in enumerate(self.scripts):
            if step < len(script):
                scores[r] = float("-inf")
                scores[r, script[step]] = 0.0
        return scores


class RowScriptedModel(ScriptedModel):
    """``ScriptedModel`` whose k-th generate call forces one script per batch row."""

    def generate(self, **kwargs):
        scripts = self.scripts[self.calls] if self.calls < len(self.scripts) else None
        self.calls += 1
        if scripts is not None:
            ids = [self.tokenizer.encode(s, add_special_tokens=False) for s in scripts]
            kwargs["logits_processor"] = LogitsProcessorList([_ForceRows(ids, kwargs["input_ids"].shape[1])])
        return self.model.generate(**kwargs)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from mgpo.runtime.model import load_model, load_processor
    from mgpo.tools.synth import background
    from mgpo.tools.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("real3b")
    ckpt = build_tiny_checkpoint(root / "qwen2.5-vl-3b-2l", seed=0, arch="qwen2.5-vl-3b", layers=2,
                                 vision_depth=2)
    image = background(random.Random(0), (3200, 4000))  # 4:5, exactly 1,280 tokens at max_pixels
    image.save(root / "big.jpg", quality=90)
    samples = [Sample(id=f"s{i}", image=str(root / "big.jpg"), question="What colour is the small square?",
                      options=("red", "green", "blue", "white"), answer="A") for i in range(2)]
    mcfg = ModelConfig(path=str(ckpt), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return {"root": root, "ckpt": ckpt, "mcfg": mcfg, "model": load_model(mcfg), "processor": load_processor(mcfg),
            "samples": samples}


def _logprobs(model, processor, batch):
    """The trainer's log-prob forward (masked, chunked lm_head) on one rollout."""
    forward = PolicyForward(model, 1.0, suppressed_ids(processor))
    return forward(loss_mask=batch.loss_mask, **batch.model_inputs())


def test_the_checkpoint_has_every_published_width(real):
    from mgpo.runtime.archs import ARCHS

    a, model = ARCHS["qwen2.5-vl-3b"], real["model"]
    lm, vis = model.model.language_model, model.model.visual
    assert model.lm_head.weight.shape == (a.vocab_size, a.hidden_size)
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr(), "3B ties lm_head to the embedding"
    attn = lm.layers[0].self_attn
    assert attn.k_proj.weight.shape == (a.num_key_value_heads * a.head_dim, a.hidden_size)
    assert lm.layers[0].mlp.gate_proj.weight.shape == (a.intermediate_size, a.hidden_size)
    assert len(lm.layers) == 2 and len(vis.blocks) == 2
    assert vis.blocks[0].mlp.gate_proj.weight.shape == (a.vision_intermediate_size, a.vision_hidden_size)
    assert model.config.vision_config.fullatt_block_indexes == [1], "one windowed and one full block"
    assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_rollout_logprobs_mask_update_reload_and_eval(real):
    """One two-turn rollout with a valid and an invalid box, then the whole training step."""
    model, processor, samples = real["model"], real["processor"], real["samples"]
    tok = processor.tokenizer
    ids = special_ids(processor)
    turn1 = [f'```json\n[{{"bbox_2d": {VALID}, "label": "square"}}]\n```',
             f'```json\n[{{"bbox_2d": {INVALID}, "label": "square"}}]\n```']
    scripted = RowScriptedModel(model, tok, [turn1, None])  # turn 2 samples freely
    cfg = RolloutConfig(group_size=2, max_new_tokens_turn1=40, max_new_tokens_turn2=6)
    torch.manual_seed(0)
    r = rollout(scripted, processor, samples[:1], cfg, min_pixels=MIN_PX, max_pixels=MAX_PX, record_logprobs=True)

    # ---- the crop path and the fallback path, at 1,280 image tokens for the 4,000-px original
    good, bad = r.trajectories
    assert good.valid and good.crop_size is not None and good.box_original is not None
    assert not bad.valid and bad.box_problem and bad.crop_size is None
    assert int(r.image_grid_thw[0].prod()) // 4 == 1280
    assert int(r.image_grid_thw[3].prod()) == int(r.image_grid_thw[0].prod()), "the fallback shows the original again"

    # ---- mask: exactly the model's own tokens of both turns
    for i, t in enumerate(r.trajectories):
        m = r.loss_mask[i].bool()
        assert int(m.sum()) == t.turn1_tokens + t.turn2_tokens
        assert not (m & ~r.attention_mask[i].bool()).any()
        assert not (m & r.mm_token_type_ids[i].bool()).any(), "no image token is trained on"
        masked = r.input_ids[i][m]
        assert masked[: t.turn1_tokens].tolist() == tok.encode(turn1[i], add_special_tokens=False) + [ids["<|im_end|>"]]
        assert int((r.input_ids[i] == ids["<|image_pad|>"]).sum()) == int(r.image_grid_thw[2 * i: 2 * i + 2].prod(-1).sum()) // 4

    # ---- one optimizer step with gradient checkpointing on the crop trajectory (the vision
    # tower stays frozen); its forward is the masked-lm_head log-prob forward, whose values
    # must equal the generation-time ones on the freely sampled turn 2
    model.model.visual.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().double().sum().item() for n, p in model.named_parameters()}
    # Plain SGD: AdamW's two fp32 states would add 3.7 GB here and nothing width-specific.
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    mb = r.select([0])
    logp, _ = _logprobs(model, processor, mb)
    mask = mb.loss_mask.bool()
    turn2 = mask.clone()
    turn2[0, mask[0].nonzero().squeeze(-1)[: good.turn1_tokens]] = False  # turn 1 was forced (scores = the forcing's)
    assert turn2.sum() >= 2 and not torch.isnan(mb.sample_logp[turn2]).any()
    assert (logp[turn2] - mb.sample_logp[turn2]).abs().max() < 1e-3
    assert (logp[mask] < 0).all() and (logp[~mask] == 0).all()
    loss = -(logp * mb.loss_mask).sum() / mb.loss_mask.sum()
    loss.backward()
    optimizer.step()
    del optimizer
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    model.eval()
    after = {n: p.detach().double().sum().item() for n, p in model.named_parameters()}
    assert all(after[n] != before[n] for n in trainable), [n for n in trainable if after[n] == before[n]]
    assert all(after[n] == before[n] for n in before if n.startswith("model.visual."))

    # ---- save_pretrained + from_pretrained reload: the same weights
    from mgpo.runtime.model import load_model

    out = real["root"] / "saved"
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    reloaded = load_model(dataclasses.replace(real["mcfg"], path=str(out)))
    mine, theirs = model.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    del model, mine, theirs
    real["model"] = reloaded

    # ---- a two-sample greedy evaluation through mgpo.eval.evaluate
    from mgpo.eval.evaluate import evaluate

    data = real["root"] / "eval.jsonl"
    data.write_text("".join(json.dumps({"id": s.id, "image": s.image, "question": s.question,
                                        "options": list(s.options), "answer": s.answer}) + "\n" for s in samples))
    # (64-token images here: the 1,280-token path is covered above and costs a minute per image)
    ecfg = load_config(None, [f"model.path={out}", "model.min_pixels=3136", "model.max_pixels=50176",
                              "model.dtype=float32", f"eval.datasets=[{data}]", "eval.batch_size=2",
                              f"eval.output_dir={real['root'] / 'eval'}", "rollout.max_new_tokens_turn1=4",
                              "rollout.max_new_tokens_turn2=4"])
    result = evaluate(ecfg, model=reloaded)
    preds = [json.loads(x) for x in (real["root"] / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and {p["id"] for p in preds} == {"s0", "s1"}
    assert result["results"], "metrics were computed"
