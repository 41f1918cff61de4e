"""mgpo.core.policy: the chunked log-prob head."""

import pytest
import torch

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.generation import suppressed_ids
from mgpo.core.policy import masked_token_logprobs
from mgpo.core.rollout import rollout
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


def test_the_trainers_forward_bounds_each_lm_head_call(env):
    """Through PolicyForward, the module the trainer calls: a forward that passed every masked
    position to lm_head at once survived the test above, which calls the function directly."""
    from mgpo.core.policy import HEAD_CHUNK, PolicyForward

    model, processor, samples, _ = env
    torch.manual_seed(0)
    r = _run(model, processor, samples[:2], group_size=2, max_new_tokens_turn1=12, max_new_tokens_turn2=8)
    forward = PolicyForward(model, 1.0, (), chunk_tokens=4)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        logp, _ = forward(loss_mask=r.loss_mask, with_entropy=True, **r.model_inputs())
        logp.sum().backward()
    finally:
        hook.remove()
        model.zero_grad()
    assert int(r.loss_mask[:, 1:].sum()) > 8 and max(rows) <= 4, rows
    assert PolicyForward(model, 1.0, ()).chunk_tokens == HEAD_CHUNK, "the trainer's forward uses the planned chunk"
