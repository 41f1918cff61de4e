"""mgpo.core.generation on the real tiny model: our sampling settings, not the checkpoint's
shipped generation config; the shared prefill; generation batches."""

import pytest
import torch

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.generation import suppressed_ids
from mgpo.core.policy import PolicyForward, rollout_logprobs
from mgpo.core.rollout import rollout
from mgpo.core.trainer import micro_batches
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
    return rollout_logprobs(PolicyForward(model, 1.0, suppressed_ids(processor)), batch,
                            micro_batches([0] * len(batch), 4))  # 4 at a time, in order


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
