"""The K-turn rollout (``mgpo_k``) on the real tiny model of each family: equivalence of the
cache-continued and naive paths, the one loss mask, log-prob parity, the image-token cap."""

import math
import re

import pytest
import torch
from helpers import ScriptedModel

from mgpo.config import RolloutConfig
from mgpo.core.generation import suppressed_ids
from mgpo.core.policy import PolicyForward, rollout_logprobs
from mgpo.core.prompts import ZOOM_CAPPED, ZOOM_CROP_LEAD, ZOOM_FALLBACK_LEAD
from mgpo.core.rollout import rollout
from mgpo.core.trainer import micro_batches
from mgpo.data.samples import load_samples
from mgpo.runtime.family import processor_family

MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


@pytest.fixture(scope="module")
def env(family_dir, synth_dir):
    from mgpo.config import ModelConfig
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(family_dir), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return load_model(mcfg), load_processor(mcfg), list(load_samples(synth_dir / "train.jsonl"))


def _box(x1, y1, x2, y2):
    return f'```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}]\n```'


GRID_SCALE = (4, 5)  # a scripted box's numbers, written for a ~250 x 200 px view, on a 0-1000 grid


def _in_family(box, family):
    """A scripted box (numbers for a pixel-writing model) as the family writes the same intent."""
    if not family.box_grid:
        return list(box)
    sx, sy = GRID_SCALE
    return [min(family.box_grid, v * (sx, sy)[i % 2]) for i, v in enumerate(box)]


def _scripts_in_family(scripts, family):
    """Every bbox_2d of the scripts rewritten by ``_in_family``."""
    def convert(text):
        return text if text is None else re.sub(
            r'"bbox_2d": \[([^\]]*)\]',
            lambda m: f'"bbox_2d": {_in_family([int(v) for v in m.group(1).split(",")], family)}', text)
    return [[convert(t) for t in call] if isinstance(call, list) else convert(call) for call in scripts]


def _run(model, processor, samples, scripts, greedy=False, **kw):
    cfg = RolloutConfig(**{"template": "mgpo_k", "group_size": 2, "max_new_tokens_turn1": 40,
                           "max_new_tokens_turn2": 40, **kw})
    scripts = _scripts_in_family(scripts, processor_family(processor))
    scripted = ScriptedModel(model, processor.tokenizer, scripts)
    r = rollout(scripted, processor, samples, cfg, min_pixels=MIN_PX, max_pixels=MAX_PX, greedy=greedy,
                record_logprobs=True)
    return r, scripted.calls


# per call, one script per running row: trajectory 0 answers at once; 1 zooms into its crop
# twice (nested); 2 writes an unusable box, zooms, then answers; 3 is cut by the token limit
# without a box, zooms, writes freely, then answers at the forced last turn
MIXED = [
    ["\\boxed{A}", _box(20, 20, 200, 150), _box(0, 0, 5, 5), "no box " * 30],
    [_box(10, 10, 250, 180), _box(20, 20, 200, 150), _box(30, 30, 220, 160)],
    [_box(40, 40, 200, 150), "\\boxed{B}", None],
    [None, "\\boxed{C}"],
]


@pytest.mark.parametrize("shared, cont", [(True, True), (False, True), (True, False)])
def test_k_turns_optimized_match_naive_token_for_token(env, shared, cont):
    """Greedy: turn k+1 continued from turn k's cache (any subset of rows, non-contiguous
    prefixes) gives the same tokens as re-reading every conversation, on a batch mixing early
    answers, nested zooms, an invalid box and a turn cut by the token limit."""
    model, processor, samples = env
    a, calls = _run(model, processor, samples[:2], MIXED, greedy=True, max_turns=4, shared_prefill=shared,
                    continue_turn2=cont)
    b, _ = _run(model, processor, samples[:2], MIXED, greedy=True, max_turns=4, shared_prefill=False,
                continue_turn2=False)
    assert calls == 4
    logs = [[r.action for r in t.turn_log] for t in a.trajectories]
    assert logs[0] == ["answer"] and logs[1][:3] == ["zoom", "zoom", "zoom"] and len(logs[1]) == 4
    assert [r.nested for r in a.trajectories[1].turn_log[:3]] == [False, True, True]
    assert logs[2] == ["fallback", "zoom", "answer"] and a.trajectories[2].turn_log[0].box_problem
    assert a.trajectories[3].turn_log[0].truncated and logs[3][:2] == ["fallback", "zoom"] and logs[3][3] == "answer"
    assert a.images_per_trajectory == [1, 4, 3, 4]  # a fallback shows the previous image again
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert torch.equal(a.attention_mask, b.attention_mask) and a.image_index == b.image_index
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert [t.texts for t in a.trajectories] == [t.texts for t in b.trajectories]
    finals = [t.final_text for t in a.trajectories]
    assert finals[0].startswith("\\boxed{A}") and finals[2].startswith("\\boxed{B}")
    assert finals[1] == a.trajectories[1].texts[3] and finals[3].startswith("\\boxed{C}")


def test_nested_zoom_reaches_original_pixels(env):
    """The second box is drawn on the first crop; its original-pixel box lies inside the first
    one and is the hand-mapped region (offset + box * region / shown size; a grid family's box is
    on a 0-1000 scale whatever the shown size)."""
    model, processor, samples = env
    family = processor_family(processor)
    r, _ = _run(model, processor, samples[:1], [_box(20, 20, 200, 150), _box(10, 10, 250, 180), "\\boxed{A}"],
                greedy=True, max_turns=3)
    first, second = r.trajectories[0].turn_log[:2]
    (W, H), (w, h) = r.trajectories[0].original_size, r.trajectories[0].input_size
    if family.box_grid:
        w = h = family.box_grid
    a1, b1, a2, b2 = _in_family((20, 20, 200, 150), family)
    assert first.box_original == pytest.approx([a1 * W / w, b1 * H / h, a2 * W / w, b2 * H / h])
    b = first.box_original
    x1, y1, x2, y2 = math.floor(b[0]), math.floor(b[1]), math.ceil(b[2]), math.ceil(b[3])  # the crop's pixel bounds
    grid = r.images[r.image_index[0][1]].grid[0]
    cw, ch = grid[2].item() * family.patch, grid[1].item() * family.patch
    if family.box_grid:
        cw = ch = family.box_grid
    a1, b1, a2, b2 = _in_family((10, 10, 250, 180), family)
    assert second.box_original == pytest.approx([x1 + a1 * (x2 - x1) / cw, y1 + b1 * (y2 - y1) / ch,
                                                 x1 + a2 * (x2 - x1) / cw, y1 + b2 * (y2 - y1) / ch])
    assert second.nested and second.crop_size is not None


@pytest.mark.parametrize("K", [3, 4])
def test_k_turn_mask_and_logprob_parity(env, K):
    """One mask over every assistant turn (each closing <|im_end|> in, no user block, no image
    token); the trainer's log-probs equal the sampling ones within 1e-4."""
    model, processor, samples = env
    tok = processor.tokenizer
    torch.manual_seed(K)
    scripts = [_box(20, 20, 200, 150), _box(10, 10, 250, 180)] + [None] * (K - 2)
    r, _ = _run(model, processor, samples[:3], scripts, max_turns=K, max_new_tokens_turn2=16)
    assert max(len(t.turn_log) for t in r.trajectories) == K
    for i, t in enumerate(r.trajectories):
        masked = tok.decode(r.input_ids[i][r.loss_mask[i].bool()], skip_special_tokens=False)
        for forbidden in ("<|image_pad|>", "<|vision_start|>", "Question:", ZOOM_CROP_LEAD):
            assert forbidden not in masked
        # a random model may sample <|im_start|> itself; none comes from a user block
        assert masked.count("<|im_start|>") == sum(rec.text.count("<|im_start|>") for rec in t.turn_log)
        pos = 0
        for rec in t.turn_log[:-1]:  # every non-final turn, closed by <|im_end|>, in order
            pos = masked.index(rec.text + "<|im_end|>", pos) + len(rec.text)
        assert r.loss_mask[i].sum() == sum(rec.tokens for rec in t.turn_log)
        full = tok.decode(r.input_ids[i][r.attention_mask[i].bool()], skip_special_tokens=False)
        assert full.count("<|vision_start|>") == len(r.image_index[i]) == 1 + sum(
            rec.action in ("zoom", "fallback") for rec in t.turn_log[:-1])
    logp = rollout_logprobs(PolicyForward(model, 1.0, suppressed_ids(processor)), r, micro_batches([0] * len(r), 4))
    # the forced turns (the scripted boxes) have log-prob 0 under the forcing; the free ones,
    # every turn after the second image, are compared
    sampled = ~torch.isnan(r.sample_logp) & (r.sample_logp != 0)
    free = sum(rec.tokens for t in r.trajectories for rec in t.turn_log[2:])
    assert sampled.sum() >= free - len(r) * (K - 2) > 0
    assert (logp[sampled] - r.sample_logp[sampled]).abs().max() < 1e-4


def test_image_token_cap_forces_the_answer(env):
    """A crop that would pass rollout.max_image_tokens is not shown: the next user block is the
    text-only forced answer, and the conversation ends there whatever max_turns allows."""
    model, processor, samples = env
    scripts = [_box(20, 20, 200, 150), _box(10, 10, 250, 180), None, None]
    free, _ = _run(model, processor, samples[:1], scripts, greedy=True, max_turns=4, max_new_tokens_turn2=8)
    first = int(free.images[0].grid.prod()) // 4
    capped, calls = _run(model, processor, samples[:1], scripts, greedy=True, max_turns=4, max_new_tokens_turn2=8,
                         max_image_tokens=first + 1)
    assert free.images_per_trajectory[0] > 1
    assert capped.images_per_trajectory == [1, 1] and calls == 2
    for i, t in enumerate(capped.trajectories):
        assert [rec.action for rec in t.turn_log][0] == "zoom" and t.turn_log[0].capped and len(t.turn_log) == 2
        full = processor.tokenizer.decode(capped.input_ids[i][capped.attention_mask[i].bool()])
        assert ZOOM_CAPPED in full and ZOOM_FALLBACK_LEAD not in full and full.count("<|vision_start|>") == 1


def test_a_large_k_is_capped_by_default(tiny_dir, synth_dir):
    """rollout.max_image_tokens=0 with max_turns=6: a model that zooms every turn stops being
    shown crops once the next would pass four full-budget images' worth of tokens."""
    from helpers import ScriptedModel

    from mgpo.config import ModelConfig, RolloutConfig
    from mgpo.core.rollout import rollout
    from mgpo.core.zoom import image_token_cap
    from mgpo.runtime.model import load_model, load_processor

    budget = 64 * 28 * 28  # every image (original, crops) resized to about 64 tokens
    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=budget, max_pixels=budget, dtype="float32")
    model, processor = load_model(mcfg), load_processor(mcfg)
    cfg = RolloutConfig(template="mgpo_k", max_turns=6, group_size=2, max_new_tokens_turn1=40,
                        max_new_tokens_turn2=40)
    assert image_token_cap(cfg, budget) == 4 * 64
    zoom = '```json\n[{"bbox_2d": [10, 10, 150, 120]}]\n```'
    scripted = ScriptedModel(model, processor.tokenizer, [zoom] * 6)
    r = rollout(scripted, processor, list(load_samples(synth_dir / "train.jsonl"))[:1], cfg, min_pixels=budget,
                max_pixels=budget, greedy=True)
    for i, t in enumerate(r.trajectories):
        assert [rec.action for rec in t.turn_log[:-1]] == ["zoom"] * (len(t.turn_log) - 1)
        assert t.turn_log[-2].capped and len(t.turn_log) < 6  # the model kept zooming; the cap ended it
        assert sum(int(r.images[k].grid.prod()) // 4 for k in r.image_index[i]) <= 4 * 64
