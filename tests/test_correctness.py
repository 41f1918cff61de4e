"""Bugs that only a published checkpoint folder or the paper's scale shows.

The tiny checkpoint is laid out like a published Qwen2.5-VL-7B-Instruct folder: its
preprocessor_config.json carries the legacy 3,136..12,845,056-pixel keys and its
generation_config.json the shipped repetition_penalty / top_k / top_p. Each test here
failed on the code before its fix.
"""

import json

import pytest
import torch
from helpers import ScriptedModel
from PIL import Image

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.generation import suppressed_ids
from mgpo.core.policy import PolicyForward, masked_token_logprobs, rollout_logprobs
from mgpo.core.reward import score
from mgpo.core.rollout import rollout
from mgpo.core.trajectory import Trajectory
from mgpo.data.samples import load_samples

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


def _train_logp(model, processor, batch):
    return rollout_logprobs(PolicyForward(model, 1.0, suppressed_ids(processor)), batch, micro_batch_size=4)


def test_tiny_folder_is_laid_out_like_a_published_one(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "chat_template.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
            "model.safetensors.index.json"} <= names
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056) and "size" not in pre
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (gen["repetition_penalty"], gen["top_k"], gen["top_p"]) == (1.05, 1, 0.001)


def test_published_pixel_keys_do_not_override_the_budget(env, tmp_path):
    """Bug 1: a 3840x2160 image became 10,549 image tokens instead of at most 256."""
    from mgpo.runtime.model import save_processor

    _, processor, _, mcfg = env
    grid = processor.image_processor(images=[Image.new("RGB", (3840, 2160))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 4 <= MAX_PX // (28 * 28)
    # What we save is unambiguous: any reader (legacy keys or size) gets the same budget.
    save_processor(processor, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())["image_processor"]
    assert (saved["min_pixels"], saved["max_pixels"]) == (MIN_PX, MAX_PX)
    assert saved["size"] == {"shortest_edge": MIN_PX, "longest_edge": MAX_PX}
    from transformers import AutoProcessor

    plain = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert plain.image_processor.size["longest_edge"] == MAX_PX


def test_shipped_generation_config_does_not_leak_into_sampling(env):
    """Bug 2: repetition_penalty 1.05 from generation_config.json reshaped the sampled
    distribution: max |train - sampling log-prob| was 0.0136 on this model."""
    model, processor, samples, _ = env
    torch.manual_seed(0)
    r = _run(model, processor, samples[:2], group_size=2, max_new_tokens_turn1=24, max_new_tokens_turn2=12)
    logp = _train_logp(model, processor, r)
    sampled = ~torch.isnan(r.sample_logp)
    assert sampled.sum() > 20
    assert (logp[sampled] - r.sample_logp[sampled]).abs().max() < 1e-4


def test_greedy_generation_applies_no_inherited_processor(env, monkeypatch):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model, processor, samples, _ = env
    seen = []
    real = type(model)._get_logits_processor

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        seen.extend(type(p).__name__ for p in out)
        return out
    monkeypatch.setattr(type(model), "_get_logits_processor", spy)
    _run(model, processor, samples[:1], greedy=True, max_new_tokens_turn1=4, max_new_tokens_turn2=2)
    assert seen and RepetitionPenaltyLogitsProcessor.__name__ not in seen
    assert not {"TopKLogitsWarper", "TopPLogitsWarper", "TemperatureLogitsWarper"} & set(seen), seen


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


def test_direct_mode_scores_a_bare_letter(env, tmp_path):
    """Bug 4: the direct prompt asks for a letter; the scorer only read \\boxed{}."""
    from mgpo.config import Config, EvalConfig
    from mgpo.eval.evaluate import evaluate
    from mgpo.tools.synth import build_synth

    model, processor, _, mcfg = env
    build_synth(tmp_path / "s", n=1, seed=3, split="test")
    data = tmp_path / "s" / "test.jsonl"
    answer = json.loads(data.read_text().splitlines()[0])["answer"]
    scripted = ScriptedModel(model, processor.tokenizer, [f"{answer}.<|im_end|>"])
    cfg = Config(model=mcfg, eval=EvalConfig(mode="direct", datasets=(str(data),), batch_size=1,
                                             output_dir=str(tmp_path / "eval")))
    result = evaluate(cfg, model=scripted, processor=processor)
    assert result["results"]["test"]["accuracy"] == 100.0
    assert "bare" in result["protocol"]["answer_match"]


def test_prefill_keeps_no_prompt_logits(env):
    """Bug 6: the shared prefill computed vocabulary logits for every prompt token."""
    model, processor, samples, _ = env
    widths = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
    try:
        _run(model, processor, samples[:2], group_size=2, max_new_tokens_turn1=2, max_new_tokens_turn2=2)
    finally:
        hook.remove()
    assert widths and max(widths) == 1, widths


def test_generation_batch_size_and_first_image_stored_once(env):
    """Bug 7: one generate over every prompt of the rank, the first image copied per sample."""
    from helpers import CountingModel

    model, processor, samples, _ = env
    counting = CountingModel(model, processor.tokenizer)
    torch.manual_seed(0)
    r = _run(counting, processor, samples[:3], group_size=3, generation_batch_size=2,
             max_new_tokens_turn1=4, max_new_tokens_turn2=2)
    assert counting.calls == 4  # 2 generate calls (groups 0-1, then group 2) x 2 turns
    assert len(r) == 9
    # Images kept: one first image per group, never one copy per trajectory. Every box fails
    # on this random model, and the fallback shows the same resized original again.
    assert not any(t.valid for t in r.trajectories)
    assert len(r.images) == 3
    assert r.image_index == [[g, g] for g in range(3) for _ in range(3)]
    # The same answers as one generate over everything, greedy.
    a = _run(model, processor, samples[:3], group_size=3, greedy=True, max_new_tokens_turn1=6,
             max_new_tokens_turn2=3, generation_batch_size=1)
    b = _run(model, processor, samples[:3], group_size=3, greedy=True, max_new_tokens_turn1=6,
             max_new_tokens_turn2=3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)


def test_final_text_is_the_templates_final_turn():
    """Bug 12: an empty turn 2 fell back to turn 1's text for the reward."""
    t = Trajectory("x", 0, "A", ("a", "b"), (10, 10), (10, 10), turns=2, turn1_text="\\boxed{A}", turn2_text="")
    assert t.final_text == "" and score([t]).tolist() == [0.0]
    one = Trajectory("x", 0, "A", ("a", "b"), (10, 10), (10, 10), turns=1, turn1_text="\\boxed{A}")
    assert score([one]).tolist() == [1.0]


def test_chunked_head_equals_unchunked(env):
    """Bug 13: log-softmax and entropy over the vocabulary are computed in chunks (and
    recomputed in backward), with the same values and gradients."""
    model, processor, samples, _ = env
    torch.manual_seed(0)
    r = _run(model, processor, samples[:2], group_size=2, max_new_tokens_turn1=12, max_new_tokens_turn2=8)
    inputs = r.model_inputs()
    outs = {}
    for chunk in (5, 1 << 20):
        model.zero_grad()
        logp, ent = masked_token_logprobs(model, inputs, r.loss_mask, suppress_ids=suppressed_ids(processor),
                                          with_entropy=True, chunk_tokens=chunk)
        (logp.sum() + ent.sum()).backward()
        outs[chunk] = (logp.detach(), ent.detach(), model.lm_head.weight.grad.clone())
    model.zero_grad()
    for a, b in zip(outs[5], outs[1 << 20]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_lm_head_sees_at_most_one_chunk_of_rows(env):
    """The memory fix itself: lm_head (and so the K x V log-softmax) never runs on more than
    ``chunk_tokens`` masked positions at once, in forward or in backward's recomputation;
    the trainer's forward uses HEAD_CHUNK."""
    import inspect

    from mgpo.core.policy import HEAD_CHUNK

    model, processor, samples, _ = env
    torch.manual_seed(0)
    r = _run(model, processor, samples[:2], group_size=2, max_new_tokens_turn1=12, max_new_tokens_turn2=8)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        logp, _ = masked_token_logprobs(model, r.model_inputs(), r.loss_mask, with_entropy=True, chunk_tokens=5)
        logp.sum().backward()
    finally:
        hook.remove()
        model.zero_grad()
    masked = int(r.loss_mask[:, 1:].sum())
    assert masked > 10 and rows and max(rows) <= 5, rows
    assert sum(rows) == 2 * masked  # every masked position once in forward, once recomputed in backward
    assert inspect.signature(masked_token_logprobs).parameters["chunk_tokens"].default == HEAD_CHUNK


def test_one_turn_valid_box_is_mapped_for_the_grounding_figures(env):
    """A valid box in the one-turn template makes no crop; the report's IoU read its (unset)
    original-image box and ``eval.mode=grpo`` crashed on the first valid box."""
    from mgpo.core.grounding import Box, to_original_box
    from mgpo.eval.evaluate import _records
    from mgpo.eval.report import grounding_values

    model, processor, samples, _ = env
    sample = samples[0]
    text = '```json\n[{"bbox_2d": [10, 10, 300, 200], "label": "x"}]\n``` \\boxed{' + sample.answer + "}"
    r = _run(ScriptedModel(model, processor.tokenizer, [text + "<|im_end|>"]), processor, [sample], template="grpo",
             max_new_tokens_turn1=96)
    t = r.trajectories[0]
    assert t.valid and t.crop_size is None
    assert t.box_original == to_original_box(Box(*t.box_input), t.input_size, t.original_size).as_list()
    r.trajectories = r.trajectories[:1]
    ious, _, _ = grounding_values(_records(r, {sample.id: sample}, "test", 1))
    assert len(ious) == (1 if sample.target_boxes else 0)
