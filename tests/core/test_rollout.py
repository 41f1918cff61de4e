"""The two-turn rollout on the real tiny model of each family: mask, log-prob parity, mRoPE,
batching, traps."""

import dataclasses
import json
from dataclasses import replace

import pytest
import torch
from helpers import CountingModel, ScriptedModel
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.conversation import encode
from mgpo.core.generation import VISION_TOKENS, generation_config, special_ids, suppressed_ids
from mgpo.core.grounding import Box
from mgpo.core.policy import PolicyForward, masked_token_logprobs, rollout_logprobs
from mgpo.core.prompts import CROP_LEAD, FALLBACK_LEAD, first_prompt_text, get_template
from mgpo.core.reward import extract_answer
from mgpo.core.rollout import prompt_tokens, rollout
from mgpo.core.sft import written
from mgpo.core.trainer import micro_batches
from mgpo.data.samples import load_samples
from mgpo.runtime.family import processor_family
from mgpo.runtime.model import load_processor

MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


def _env(folder, synth_dir):
    from mgpo.runtime.model import load_model

    mcfg = ModelConfig(path=str(folder), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    processor = load_processor(mcfg)
    model = load_model(mcfg)
    samples = list(load_samples(synth_dir / "train.jsonl"))
    return model, processor, samples


@pytest.fixture(scope="module")
def env(family_dir, synth_dir):
    return _env(family_dir, synth_dir)


def _run(model, processor, samples, **kw):
    cfg = RolloutConfig(**{"group_size": 2, "max_new_tokens_turn1": 24, "max_new_tokens_turn2": 16, **kw})
    return rollout(model, processor, samples, cfg, min_pixels=MIN_PX, max_pixels=MAX_PX, record_logprobs=True)


def _logp(model, processor, batch):
    """The trainer's log-probs of every trajectory (the one log-prob function)."""
    return rollout_logprobs(PolicyForward(model, 1.0, suppressed_ids(processor)), batch,
                            micro_batches([0] * len(batch), 8))  # 8 at a time, in order


def _without_mrope(model, processor, r):
    """The control of the parity tests: log-probs without ``mm_token_type_ids``. Qwen2.5-VL then
    silently falls back to 1-D positions (returned, to show they differ); Qwen3-VL refuses (None)."""
    flat_inputs = {k: v for k, v in r.model_inputs().items() if k != "mm_token_type_ids"}
    if processor_family(processor).name == "qwen3-vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            masked_token_logprobs(model, flat_inputs, r.loss_mask, suppress_ids=suppressed_ids(processor))
        return None
    return masked_token_logprobs(model, flat_inputs, r.loss_mask, suppress_ids=suppressed_ids(processor))[0]


def _box_in_input(traj, sample, processor, margin=20):
    """The sample's first target box padded by ``margin`` model-input pixels, as the family writes
    it (input pixels, or the 0-1000 grid)."""
    (W, H), (w, h) = traj.original_size, traj.input_size
    x1, y1, x2, y2 = sample.target_boxes[0]
    box = Box(max(0, int(x1 * w / W) - margin), max(0, int(y1 * h / H) - margin),
              min(w, int(x2 * w / W) + margin), min(h, int(y2 * h / H) + margin))
    return [int(v) for v in written(box, (w, h), processor_family(processor).box_grid).as_list()]


def test_mask_covers_exactly_the_models_tokens(env):
    model, processor, samples = env
    tok = processor.tokenizer
    sample = samples[0]
    probe = _run(model, processor, [sample], group_size=1, max_new_tokens_turn1=2, max_new_tokens_turn2=1)
    box = _box_in_input(probe.trajectories[0], sample, processor)
    turn1 = f'The key area: ```json\n[{{"bbox_2d": {box}, "label": "target"}}]\n``` and more text after'
    scripted = ScriptedModel(model, tok, [turn1, "It is \\boxed{B}"])
    r = _run(scripted, processor, [sample], group_size=2, max_new_tokens_turn1=96)
    for i, t in enumerate(r.trajectories):
        assert t.valid and t.box_input == [float(v) for v in box] and t.crop_size is not None
        # Turn 1 was cut right after the fenced block, then closed with <|im_end|>.
        assert t.turn1_text.endswith("```") and "more text" not in t.turn1_text
        masked = r.input_ids[i][r.loss_mask[i].bool()]
        text = tok.decode(masked, skip_special_tokens=False)
        assert text.startswith(t.turn1_text + "<|im_end|>")
        assert text[len(t.turn1_text + "<|im_end|>"):].startswith(t.turn2_text)
        # Nothing of the prompts, images or padding is under the mask.
        for forbidden in ("<|im_start|>", "<|image_pad|>", "<|vision_start|>", "Question:", CROP_LEAD):
            assert forbidden not in text
        assert not (r.loss_mask[i].bool() & ~r.attention_mask[i].bool()).any()
        # The turn-2 user block (unmasked) is the crop one.
        full = tok.decode(r.input_ids[i][r.attention_mask[i].bool()], skip_special_tokens=False)
        assert CROP_LEAD in full and full.count("<|vision_start|>") == 2
        assert r.loss_mask[i].sum() == t.turn1_tokens + t.turn2_tokens
    assert extract_answer(r.trajectories[0].final_text) == "B"


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefill", "naive"])
def test_logprob_parity_and_mrope(env, shared):
    """Training-forward log-probs equal generation-time ones; without mRoPE they do not."""
    model, processor, samples = env
    torch.manual_seed(0)
    # mixed image sizes, left/right padding; the optimized path (shared prefill + turn 2 from
    # turn 1's cache) or the naive one
    r = _run(model, processor, samples[:3], shared_prefill=shared, continue_turn2=shared)
    sampled = ~torch.isnan(r.sample_logp)
    assert sampled.sum() > 0.95 * r.loss_mask.sum()
    logp = _logp(model, processor, r)
    assert (logp[sampled] - r.sample_logp[sampled]).abs().max() < 1e-4
    flat = _without_mrope(model, processor, r)
    if flat is not None:
        assert (flat[sampled] - r.sample_logp[sampled]).abs().max() > 1e-3, "1-D positions must differ from mRoPE"


def test_batch_invariance(env):
    model, processor, samples = env
    torch.manual_seed(1)
    r = _run(model, processor, samples[:3], group_size=1)
    assert len({tuple(g) for g in r.image_grid_thw.tolist()}) > 1, "needs mixed image sizes"
    together, _ = masked_token_logprobs(model, r.model_inputs(), r.loss_mask, suppress_ids=suppressed_ids(processor))
    for i in range(len(r)):
        alone, _ = masked_token_logprobs(model, r.select([i]).model_inputs(), r.select([i]).loss_mask,
                                         suppress_ids=suppressed_ids(processor))
        m = r.select([i]).loss_mask.bool()  # [1, T_i]
        assert torch.allclose(alone[m], together[i : i + 1, : m.shape[1]][m], atol=1e-5)


def test_select_keeps_each_trajectorys_images_in_order(env):
    model, processor, samples = env
    r = _run(model, processor, samples[:2], group_size=2, max_new_tokens_turn1=4, max_new_tokens_turn2=2)
    sub = r.select([3, 0])
    # trajectory 3's two images, then trajectory 0's, patches and grids in the model's layout
    want = [r.images[j] for i in (3, 0) for j in r.image_index[i]]
    assert torch.equal(sub.pixel_values, torch.cat([im.pixel_values for im in want]))
    assert torch.equal(sub.image_grid_thw, torch.cat([im.grid for im in want]))
    assert torch.equal(r.image_grid_thw[6:8], sub.image_grid_thw[0:2])
    assert sub.trajectories[0] is r.trajectories[3]
    assert len(sub.images) == len({j for i in (3, 0) for j in r.image_index[i]})


def test_no_vision_tokens_are_ever_sampled(env):
    model, processor, samples = env
    ids = special_ids(processor)
    vision = torch.tensor([ids[t] for t in VISION_TOKENS])
    torch.manual_seed(0)
    r = _run(model, processor, samples[:4], group_size=4, max_new_tokens_turn1=48, max_new_tokens_turn2=48)
    produced = r.input_ids[r.loss_mask.bool()]
    assert not torch.isin(produced, vision).any()
    # Control: the same random model does emit them when nothing suppresses them.
    enc = processor(text=["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    gen = generation_config(RolloutConfig(), 400, ids, greedy=False)
    gen.suppress_tokens = None
    torch.manual_seed(0)
    out = model.generate(**enc, generation_config=gen)
    assert torch.isin(out.sequences[0, enc["input_ids"].shape[1]:], vision).any()


@pytest.mark.parametrize("kind", ["valid", "invalid"])
def test_lock_step_same_number_of_generate_calls(env, kind):
    model, processor, samples = env
    box = "[10, 10, 300, 200]" if kind == "valid" else "[0, 0, 5, 5]"
    counting = ScriptedModel(model, processor.tokenizer, [f'```json\n[{{"bbox_2d": {box}}}]\n```', None])
    r = _run(counting, processor, samples[:2], max_new_tokens_turn1=64)
    assert counting.calls == 2
    assert all(t.valid == (kind == "valid") for t in r.trajectories)


def test_unclosed_turn1_falls_back_and_truncated_turn2_keeps_its_mask(env):
    model, processor, samples = env
    tok = processor.tokenizer
    scripted = ScriptedModel(model, tok, ["no box here at all " * 10, "I pick \\boxed{A} because"])
    r = _run(scripted, processor, [samples[0]], max_new_tokens_turn1=12, max_new_tokens_turn2=12)
    for i, t in enumerate(r.trajectories):
        assert t.turn1_truncated and not t.valid and t.box_problem == "no box"
        assert t.turn2_truncated and t.turn2_tokens == 12
        full = tok.decode(r.input_ids[i][r.attention_mask[i].bool()], skip_special_tokens=False)
        assert FALLBACK_LEAD in full and CROP_LEAD not in full
        assert r.loss_mask[i].sum() == t.turn1_tokens + 12
        # The answer was written before the cut, so the reward still sees it.
        assert extract_answer(t.final_text) == "A"


def test_grpo_template_is_one_turn(env):
    model, processor, samples = env
    counting = CountingModel(model, processor.tokenizer)
    r = _run(counting, processor, samples[:2], template="grpo")
    assert counting.calls == 1
    assert r.images_per_trajectory == [1] * 4 and r.image_grid_thw.shape[0] == 4
    logp = _logp(model, processor, r)
    sampled = ~torch.isnan(r.sample_logp)
    assert (logp[sampled] - r.sample_logp[sampled]).abs().max() < 1e-4


def test_shipped_generation_config_is_not_inherited(env):
    """Qwen ships top_k=1 / top_p=0.001: inheriting it would make every group identical."""
    model, processor, samples = env
    model.generation_config.top_k = 1
    model.generation_config.top_p = 0.001
    try:
        torch.manual_seed(0)
        r = _run(model, processor, [samples[0]], group_size=4, max_new_tokens_turn1=8, max_new_tokens_turn2=4)
    finally:
        model.generation_config.top_k = None
        model.generation_config.top_p = None
    assert len({t.turn1_text for t in r.trajectories}) > 1


def test_unreadable_image_is_skipped_not_fatal(env, tmp_path):
    model, processor, samples = env
    bad = dataclasses.replace(samples[1], id="broken", image=str(tmp_path / "missing.jpg"))
    r = _run(model, processor, [bad, samples[0]], max_new_tokens_turn1=2, max_new_tokens_turn2=2)
    assert [s for s, _ in r.skipped] == ["broken"] and len(r) == 2
    assert all(t.sample_id == samples[0].id for t in r.trajectories)


@pytest.mark.parametrize("shared, cont", [(True, True), (True, False), (False, True)])
def test_optimized_paths_match_naive_path_token_for_token(env, monkeypatch, shared, cont):
    """Greedy: the optimized paths (one prefill per prompt with the cache copied per sample;
    turn 2 continuing from turn 1's cache) and the naive one produce the same tokens, with
    mixed image sizes, valid and invalid boxes, and turns cut by the token limit."""
    import mgpo.core.generation
    import mgpo.core.rollout

    model, processor, samples = env
    calls = {"shared_prefill": 0, "continue_cache": 0}
    # each helper is patched where it is looked up
    for module, name in ((mgpo.core.generation, "shared_prefill"), (mgpo.core.rollout, "continue_cache")):
        real = getattr(module, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(module, name, counted)
    tok = processor.tokenizer
    # Pixels: x2 = 400 fits the 588-px-wide input of samples[0] and not the 364-px one of samples[1].
    # The 0-1000 grid is the same on every image: the second sample's rows write an inverted box.
    script = '```json\n[{"bbox_2d": [30, 30, 400, 200]}]\n```'
    if processor_family(processor).box_grid:
        script = [script if i // 3 != 1 else script.replace("30, 30, 400", "400, 30, 30") for i in range(9)]
    runs = {}
    for optimized in (True, False):
        scripted = ScriptedModel(model, tok, [script, None])
        cfg = RolloutConfig(group_size=3, max_new_tokens_turn1=64, max_new_tokens_turn2=12,
                            shared_prefill=shared and optimized, continue_turn2=cont and optimized)
        runs[optimized] = rollout(scripted, processor, samples[:3], cfg, min_pixels=MIN_PX, max_pixels=MAX_PX,
                                  greedy=True)
    assert calls == {"shared_prefill": int(shared), "continue_cache": int(cont)}
    a, b = runs[True], runs[False]
    assert {t.valid for t in a.trajectories} == {True, False}
    assert any(t.turn2_truncated for t in a.trajectories)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert [t.turn1_text for t in a.trajectories] == [t.turn1_text for t in b.trajectories]


def test_two_turns_reproduce_the_recorded_rollouts(tiny_dir, synth_dir):
    """``rollout.max_turns = 2`` is the paper's template token for token: ids, masks, texts,
    images and log-probs equal those the code wrote before the K-turn loop existed
    (tests/fixtures/k2_reference.json, written by tests/k2_reference.py)."""
    import json
    from pathlib import Path

    from k2_reference import run_all

    model, processor, samples = _env(tiny_dir, synth_dir)  # recorded on the Qwen2.5-VL tiny model
    want = json.loads((Path(__file__).parents[1] / "fixtures" / "k2_reference.json").read_text())
    got = json.loads(json.dumps(run_all(model, processor, samples)))
    for name in want:
        for key in want[name]:
            if key != "sample_logp":
                assert got[name][key] == want[name][key], (name, key)
        for a, b in zip(got[name]["sample_logp"], want[name]["sample_logp"]):
            assert [x is None for x in a] == [x is None for x in b]
            assert max((abs(x - y) for x, y in zip(a, b) if x is not None), default=0) < 1e-4, name


def test_prompt_tokens_without_the_image_equal_the_encoded_length(family_dir, synth_dir):
    processor = load_processor(ModelConfig(path=str(family_dir), min_pixels=MIN_PX, max_pixels=MAX_PX))
    samples = list(load_samples(synth_dir / "train.jsonl"))[:4]
    samples.append(replace(samples[0], question="word " * 500))
    for name in ("mgpo", "grpo", "direct"):
        for s in samples:
            text = first_prompt_text(processor, get_template(name), s.question, s.options)
            assert prompt_tokens(processor, name, s, MIN_PX, MAX_PX) == len(encode(processor, text, [s.load_image()]).ids)


QWEN_DEFAULT = (56 * 56, 28 * 28 * 1280)  # the published processor's min_pixels, the paper's max


@pytest.mark.parametrize("budget", [QWEN_DEFAULT, (MIN_PX, MAX_PX)])
@pytest.mark.parametrize("size", [(1, 28), (28, 1), (3, 28), (10, 40), (2, 56), (1, 200), (5, 1000), (1, 1), (27, 27)])
def test_small_images_follow_qwen_resize_and_prompt_tokens_agree(tmp_path, family_dir, size, budget):
    """An image with a side under 28 px goes to the processor as it is (Qwen's smart_resize
    enlarges it), and the length ``prompt_tokens`` predicts from the header is what the real
    processor produces."""
    lo, hi = budget
    processor = load_processor(ModelConfig(path=str(family_dir), min_pixels=lo, max_pixels=hi))
    family = processor_family(processor)
    Image.new("RGB", size, (90, 20, 200)).save(tmp_path / "s.png")
    rec = {"id": "s", "image": str(tmp_path / "s.png"), "question": "Which colour?", "options": ["red", "blue"],
           "answer": "B"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    (sample,) = load_samples(tmp_path / "d.jsonl")
    image = sample.load_image()
    assert image.size == size  # decoded as it is: the processor does the resizing
    enc = encode(processor, first_prompt_text(processor, get_template("mgpo"), sample.question, sample.options), [image])
    _, gh, gw = enc.image.grid[0].tolist()
    assert (gh * family.patch, gw * family.patch) == smart_resize(size[1], size[0], family.factor, lo, hi)
    assert prompt_tokens(processor, "mgpo", sample, lo, hi) == len(enc.ids)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefill", "naive"])
def test_logprob_parity_and_mrope_with_a_crop(env, shared):
    """The parity above on rows whose turn 1 writes a valid box, so turn 2 holds a crop and its
    positions come after two images (the fast suite never saw one: 0 of 6 boxes were valid). Turn 1
    of those rows is forced (its recorded scores are the forcing's); every freely sampled token,
    turn 2 after the crop included, must match the training forward."""
    model, processor, samples = env
    probes = _run(model, processor, samples[:3], group_size=1, max_new_tokens_turn1=2, max_new_tokens_turn2=1)
    boxes = [_box_in_input(t, s, processor) for t, s in zip(probes.trajectories, samples[:3])]
    per_row = [f'```json\n[{{"bbox_2d": {boxes[i // 2]}, "label": "target"}}]\n```' if i % 2 == 0 else None
               for i in range(6)]
    torch.manual_seed(0)
    scripted = ScriptedModel(model, processor.tokenizer, [per_row, None])
    r = _run(scripted, processor, samples[:3], shared_prefill=shared, continue_turn2=shared, max_new_tokens_turn1=64)
    cropped = [i for i, t in enumerate(r.trajectories) if t.valid and t.crop_size is not None]
    assert cropped == [0, 2, 4]
    free = ~torch.isnan(r.sample_logp)
    for i in cropped:  # leave out the forced turn 1 of these rows
        trained = r.loss_mask[i].nonzero().squeeze(-1)
        free[i, trained[: r.trajectories[i].turn1_tokens]] = False
        assert free[i].sum() >= 2, "turn 2 after the crop was sampled"
    logp = _logp(model, processor, r)
    assert (logp[free] - r.sample_logp[free]).abs().max() < 1e-4
    flat = _without_mrope(model, processor, r)
    if flat is None:
        return
    crop_rows = torch.zeros_like(free)
    crop_rows[cropped] = free[cropped]
    assert (flat[crop_rows] - r.sample_logp[crop_rows]).abs().max() > 1e-3, "1-D positions must differ after a crop"


def test_counterfactual_crops_black_is_the_crops_size_and_gold_is_the_target(env, monkeypatch):
    """eval.crop: "black" shows a black image of exactly the model crop's size, so turn 2 holds the
    same tokens at the same positions; "gold" shows the crop of the record's target box."""
    import mgpo.core.rollout as ro
    from mgpo.core.grounding import crop_original, enclosing, fit_to_budget

    model, processor, samples = env
    sample = samples[0]
    probe = _run(model, processor, [sample], group_size=1, max_new_tokens_turn1=2, max_new_tokens_turn2=1)
    box = _box_in_input(probe.trajectories[0], sample, processor, margin=40)
    shown, real_encode = {}, ro.encode
    monkeypatch.setattr(ro, "encode", lambda proc, text, images: (shown.setdefault(len(shown), images[0]),
                                                                   real_encode(proc, text, images))[1])
    runs = {}
    for crop in ("model", "black", "gold"):
        shown.clear()
        scripted = ScriptedModel(model, processor.tokenizer, [f'```json\n[{{"bbox_2d": {box}}}]\n```', "\\boxed{A}"])
        cfg = RolloutConfig(group_size=1, max_new_tokens_turn1=64, max_new_tokens_turn2=8)
        runs[crop] = (rollout(scripted, processor, [sample], cfg, min_pixels=MIN_PX, max_pixels=MAX_PX, crop=crop),
                      dict(shown))
    (plain, plain_images), (black, black_images), (gold, gold_images) = runs["model"], runs["black"], runs["gold"]
    assert plain.trajectories[0].valid and black.trajectories[0].valid and gold.trajectories[0].crop_size is not None
    crop_image = plain_images[0]  # the turn-2 block's image (the turn-1 prompt is encoded elsewhere)
    assert black_images[0].size == crop_image.size and black_images[0].getbbox() is None  # every pixel 0
    assert black.input_ids.shape == plain.input_ids.shape and torch.equal(black.mm_token_type_ids, plain.mm_token_type_ids)
    original = sample.load_image()
    want = fit_to_budget(crop_original(original, Box(*enclosing(sample.target_boxes))), MIN_PX, MAX_PX, "bicubic",
                         processor_family(processor).factor)
    assert gold_images[0].size == want.size and list(gold_images[0].getdata()) == list(want.getdata())
