"""Continuous batching (``rollout.continuous_batching``): the same conversations as the per-call
path, rows leaving and joining, within the row budget, no waiting on the longest row."""

import pytest
import torch
from helpers import ScriptedModel

import mgpo.core.conversation as conversation
import mgpo.core.rollout as ro
from mgpo.config import ModelConfig, RolloutConfig
from mgpo.data.samples import load_samples
from mgpo.runtime.family import processor_family

MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


@pytest.fixture(scope="module")
def env(family_dir, synth_dir):
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(family_dir), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return load_model(mcfg), load_processor(mcfg), list(load_samples(synth_dir / "train.jsonl"))


@pytest.fixture
def counted(monkeypatch):
    """Every stream's counts, as the rollout ran it."""
    seen = []
    real = conversation.decode_stream

    def counting(*a, **kw):
        seen.append((kw["capacity"], real(*a, **kw)))
        return seen[-1][1]
    monkeypatch.setattr(conversation, "decode_stream", counting)
    return seen


def _box(processor, valid: bool) -> str:
    grid = processor_family(processor).box_grid
    box = [30, 30, 200, 200] if valid else [200, 30, 30, 200]  # the second is inverted on any image
    if grid:
        box = [v * 2 for v in box]
    return f'```json\n[{{"bbox_2d": {box}}}]\n```'


def _rollout(model, processor, samples, scripts, stream: bool, greedy=True, **kw):
    cfg = RolloutConfig(**{"group_size": 3, "max_new_tokens_turn1": 48, "max_new_tokens_turn2": 10,
                           "continuous_batching": stream, **kw})
    scripted = ScriptedModel(model, processor.tokenizer, scripts)
    return ro.rollout(scripted, processor, samples, cfg, min_pixels=MIN_PX, max_pixels=MAX_PX, greedy=greedy,
                      record_logprobs=True)


@pytest.mark.parametrize("groups_at_once", [1, 2])
def test_the_stream_writes_the_per_call_paths_conversations_token_for_token(env, counted, groups_at_once):
    """Greedy: valid boxes (turn 2 shows a crop), invalid ones (the fallback), turns cut by the
    token limit, rows of one group finishing at different times; rows joining the running batch
    (next groups, and each row's turn 2 as soon as its turn 1 is cropped) give the same tokens,
    mask, images and log-probs as one generate call per turn over every row (the scripts are
    per row of the rank's batch in both: the stream's row keys carry the row's index there)."""
    model, processor, samples = env
    valid, invalid = _box(processor, True), _box(processor, False)
    # per row of the 9: a valid box, an invalid one, or free text (cut by the 48-token limit)
    turn1 = [valid, invalid, None, invalid, valid, valid, None, valid, invalid]
    a = _rollout(model, processor, samples[:3], [turn1, None], stream=True, generation_batch_size=groups_at_once)
    b = _rollout(model, processor, samples[:3], [turn1, None], stream=False)  # one call per turn for all rows
    assert {t.valid for t in a.trajectories} == {True, False} and any(t.turn1_truncated for t in a.trajectories)
    assert any(t.crop_size for t in a.trajectories)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.pixel_values, b.pixel_values)
    assert torch.equal(a.image_grid_thw, b.image_grid_thw)
    assert [t.texts for t in a.trajectories] == [t.texts for t in b.trajectories]
    both = ~torch.isnan(a.sample_logp) & ~torch.isnan(b.sample_logp)
    assert torch.equal(~torch.isnan(a.sample_logp), ~torch.isnan(b.sample_logp))
    assert (a.sample_logp[both] - b.sample_logp[both]).abs().max() < 1e-5
    ((capacity, counts),) = counted
    assert capacity == 3 * groups_at_once and 0 < counts.widest <= capacity


def test_one_turn_template_through_the_stream(env):
    model, processor, samples = env
    a = _rollout(model, processor, samples[:2], [None], stream=True, template="grpo", generation_batch_size=1)
    b = _rollout(model, processor, samples[:2], [None], stream=False, template="grpo")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert a.images_per_trajectory == [1] * 6


def test_a_long_row_holds_nobody(env, counted):
    """A heavy-tailed mix: one row of nine writes to its 48-token limit, the others stop at once.
    The per-call path computes every row for as long as the longest; the stream computes about the
    tokens it keeps (within 1.3x), while the other groups and the turn-2 rows join around it."""
    model, processor, samples = env
    stop = "\\boxed{A}<|im_end|>"
    turn1 = [None if i == 0 else stop for i in range(9)]
    r = _rollout(model, processor, samples[:3], [turn1, stop], stream=True, generation_batch_size=1,
                 stream_chunk=4)
    ((_, counts),) = counted
    assert r.trajectories[0].turn1_truncated and r.trajectories[0].turn1_tokens == 48 + 1  # (+ the <|im_end|> added)
    assert counts.row_steps <= 1.3 * counts.tokens, counts
    per_call = 3 * (3 * 48 + 3 * len(processor.tokenizer.encode(stop)))  # rows x longest, two calls per group
    assert counts.row_steps < per_call / 2


def test_sampling_draws_from_the_same_distribution(env):
    """Temperature 1: the stream's recorded log-probs are those of the training forward (the
    distribution sampled from is the policy's), as for the per-call path."""
    from mgpo.core.generation import suppressed_ids
    from mgpo.core.policy import PolicyForward, rollout_logprobs
    from mgpo.core.trainer import micro_batches

    model, processor, samples = env
    torch.manual_seed(0)
    r = _rollout(model, processor, samples[:2], [None, None], stream=True, greedy=False, generation_batch_size=1,
                 max_new_tokens_turn1=16, max_new_tokens_turn2=8)
    logp = rollout_logprobs(PolicyForward(model, 1.0, suppressed_ids(processor)), r, micro_batches([0] * len(r), 8))
    sampled = ~torch.isnan(r.sample_logp)
    assert sampled.sum() > 0.9 * r.loss_mask.sum()
    assert (logp[sampled] - r.sample_logp[sampled]).abs().max() < 1e-4


def test_k_turns_through_the_stream_match_the_per_call_turns(env, counted):
    """mgpo_k, K = 3, greedy: an early answer, a zoom then a nested zoom, a fallback, a row cut by
    its limit; each row's next turn joins the stream as soon as its turn is read. The same
    conversations, images and turn logs as one generate call per turn (scripts per row in turn 1,
    where every row is running in both paths; one script for every row of turn 2)."""
    model, processor, samples = env
    valid, invalid = _box(processor, True), _box(processor, False)
    nested = valid.replace("30, 30, 200, 200", "10, 10, 150, 150").replace("60, 60, 400, 400", "20, 20, 300, 300")
    turn1 = ["\\boxed{A}", valid, invalid, None, valid, "\\boxed{B}"]
    scripts = [turn1, nested, None]
    kw = dict(template="mgpo_k", max_turns=3, group_size=3, max_new_tokens_turn2=48)
    a = _rollout(model, processor, samples[:2], scripts, stream=True, generation_batch_size=1, **kw)
    b = _rollout(model, processor, samples[:2], scripts, stream=False, **kw)
    logs = [[r.action for r in t.turn_log] for t in a.trajectories]
    assert logs[0] == ["answer"] and logs[1][:2] == ["zoom", "zoom"] and logs[2][0] == "fallback"
    assert a.trajectories[1].turn_log[1].nested
    assert logs == [[r.action for r in t.turn_log] for t in b.trajectories]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert torch.equal(a.pixel_values, b.pixel_values) and a.images_per_trajectory == b.images_per_trajectory
    assert [t.texts for t in a.trajectories] == [t.texts for t in b.trajectories]
    ((capacity, counts),) = counted
    assert capacity == 3 and counts.widest <= 3


def test_the_cache_cap_is_never_passed_and_fewer_rows_join(env, counted):
    """rollout.stream_cache_tokens: the cache (rows x width) never passes the cap, with rows of
    every length; a tight cap runs fewer rows at once than a loose one, and both write the same
    conversations as the uncapped stream (greedy)."""
    model, processor, samples = env
    turn1 = [None if i % 4 == 0 else "\\boxed{A}<|im_end|>" for i in range(9)]
    base = _rollout(model, processor, samples[:3], [turn1, None], stream=True, generation_batch_size=3)
    prompt = max(int(r) for r in base.attention_mask.sum(1))  # longer than any turn-1 or turn-2 input
    runs = {}
    for cap in (3 * (prompt + 48), 9 * (prompt + 48)):
        counted.clear()
        r = _rollout(model, processor, samples[:3], [turn1, None], stream=True, generation_batch_size=3,
                     stream_cache_tokens=cap)
        ((_, counts),) = counted
        assert 0 < counts.largest_cache <= cap, (counts, cap)
        assert torch.equal(r.input_ids, base.input_ids) and torch.equal(r.loss_mask, base.loss_mask)
        runs[cap] = counts.widest
    tight, loose = runs.values()
    assert tight < loose


def test_the_stream_equals_one_row_at_a_time(env):
    """Greedy, free text: four prompts, rows joining and leaving a 2-row stream, against the
    per-call path run one row per generate call (each prompt alone, one sample, both turns)."""
    model, processor, samples = env
    kw = dict(group_size=1, max_new_tokens_turn1=20, max_new_tokens_turn2=12)
    a = _rollout(model, processor, samples[:4], [None, None], stream=True, generation_batch_size=2, stream_chunk=3,
                 **kw)
    b = _rollout(model, processor, samples[:4], [None, None], stream=False, generation_batch_size=1, **kw)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert [t.texts for t in a.trajectories] == [t.texts for t in b.trajectories]
