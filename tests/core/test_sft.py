"""SFT: targets in the rollout's own templates, the mask on assistant tokens only, learning,
the checks at set-up (the runs through tests/train_worker.py are in tests/system/test_sft_runs.py)."""

import dataclasses
import json

import pytest
import torch

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.forced import teacher_forced
from mgpo.core.generation import suppressed_ids
from mgpo.core.loss import sft_loss
from mgpo.core.policy import PolicyForward
from mgpo.core.prompts import CROP_LEAD, FALLBACK_LEAD
from mgpo.core.sft import sft_texts
from mgpo.data.samples import load_samples

MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


@pytest.fixture(scope="module")
def env(tiny_dir, synth_dir):
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return load_model(mcfg), load_processor(mcfg), list(load_samples(synth_dir / "train.jsonl"))


def _batch(processor, samples, template="mgpo"):
    images = [s.load_image() for s in samples]
    texts = [sft_texts(s, template, im.size, MIN_PX, MAX_PX) for s, im in zip(samples, images)]
    return teacher_forced(processor, samples, texts, RolloutConfig(template=template), min_pixels=MIN_PX,
                          max_pixels=MAX_PX, images=images), texts


def test_mask_covers_exactly_the_assistant_tokens(env):
    _, processor, samples = env
    tok = processor.tokenizer
    no_box = dataclasses.replace(samples[1], target_boxes=())
    r, texts = _batch(processor, [samples[0], no_box])
    for i, (turn1, turn2) in enumerate(texts):
        masked = tok.decode(r.input_ids[i][r.loss_mask[i].bool()], skip_special_tokens=False)
        assert masked == f"{turn1}<|im_end|>{turn2}<|im_end|>"
        full = tok.decode(r.input_ids[i][r.attention_mask[i].bool()], skip_special_tokens=False)
        assert full.endswith(f"<|im_start|>assistant\n{turn2}<|im_end|>")
    t0, t1 = r.trajectories
    assert t0.valid and t0.crop_size is not None and "bbox_2d" in texts[0][0]
    full0 = tok.decode(r.input_ids[0][r.attention_mask[0].bool()], skip_special_tokens=False)
    assert CROP_LEAD in full0
    assert not t1.valid and texts[1][0] == ""
    assert FALLBACK_LEAD in tok.decode(r.input_ids[1][r.attention_mask[1].bool()], skip_special_tokens=False)
    # The target box holds the target: the crop was taken around it.
    (x1, y1, x2, y2), (bx1, by1, bx2, by2) = samples[0].target_boxes[0], t0.box_original
    assert bx1 <= x1 and by1 <= y1 and bx2 >= x2 and by2 >= y2


@pytest.mark.parametrize("template, want", [("grpo", "\\boxed{"), ("direct", "")])
def test_one_turn_targets(env, template, want):
    _, processor, samples = env
    r, texts = _batch(processor, samples[:2], template)
    for i, (text,) in enumerate(texts):
        masked = processor.tokenizer.decode(r.input_ids[i][r.loss_mask[i].bool()], skip_special_tokens=False)
        assert masked == f"{text}<|im_end|>" and want in text
        assert text.endswith(samples[i].answer + ("}" if want else ""))


def test_loss_falls_on_a_fixed_batch(env):
    model, processor, samples = env
    model = type(model).from_pretrained(model.name_or_path)  # a private copy to train
    r, _ = _batch(processor, samples[:4])
    forward = PolicyForward(model, 1.0, suppressed_ids(processor))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        logp, _ = forward(loss_mask=r.loss_mask, **r.model_inputs())
        loss, _ = sft_loss(logp, r.loss_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # measured: 6.38 -> 3.82 nats in 12 steps; a broken mask or loss sign would not fall by 1
    assert losses[-1] < losses[0] - 1.0, losses


def test_scripted_turn1_model_writes_turn2_greedily(env):
    """Table 3's measure: turn 1 scripted (a box), turn 2 written by the model. Each token the
    model wrote is the argmax of its logits over the assembled conversation (crop included),
    so the answer was generated in exactly the context the rollout builds."""
    model, processor, samples = env
    images = [s.load_image() for s in samples[:2]]
    texts = [sft_texts(s, "mgpo", im.size, MIN_PX, MAX_PX)[:1] for s, im in zip(samples[:2], images)]
    r = teacher_forced(processor, samples[:2], texts, RolloutConfig(template="mgpo", max_new_tokens_turn2=6),
                       min_pixels=MIN_PX, max_pixels=MAX_PX, images=images, model=model)
    with torch.no_grad():
        logits = model(**r.model_inputs()).logits
    for i, t in enumerate(r.trajectories):
        assert t.valid and t.crop_size is not None and t.turn1_text == texts[i][0]
        n = int(r.attention_mask[i].sum())
        turn2 = r.loss_mask[i, :n].nonzero().flatten()[-t.turn2_tokens:]  # the last trained span
        assert t.turn2_tokens > 0 and int(turn2[0]) > len(processor.tokenizer(texts[i][0])["input_ids"])
        masked = logits[i, turn2 - 1].clone()
        masked[:, list(suppressed_ids(processor))] = float("-inf")
        assert torch.equal(masked.argmax(-1), r.input_ids[i, turn2])
    with pytest.raises(ValueError, match="no model"):
        teacher_forced(processor, samples[:1], texts[:1], RolloutConfig(template="mgpo"), min_pixels=MIN_PX,
                       max_pixels=MAX_PX)


@pytest.mark.parametrize("max_turns, zooms", [(2, 1), (3, 2), (4, 2)])
def test_k_turn_targets_zoom_until_full_resolution(tiny_dir, tmp_path, max_turns, zooms):
    """mgpo_k SFT on the nested beacon: each box is drawn on the latest view, the second inside
    the first crop; zooming stops once the target is shown at full resolution (two zooms), or
    when the turns run out (K = 2: one zoom, then the forced answer)."""
    from mgpo.runtime.model import load_processor
    from mgpo.tools import beacon

    layout = beacon.NESTED
    path = beacon.build_beacon(tmp_path, 2, 0, "test", layout=layout)
    samples = list(load_samples(path))
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=layout.budget, max_pixels=layout.budget))
    images = [s.load_image() for s in samples]
    texts = [sft_texts(s, "mgpo_k", im.size, layout.budget, layout.budget, max_turns) for s, im in zip(samples, images)]
    r = teacher_forced(processor, samples, texts, RolloutConfig(template="mgpo_k", max_turns=max_turns),
                       min_pixels=layout.budget, max_pixels=layout.budget, images=images)
    for s, t, script in zip(samples, r.trajectories, texts):
        assert len(script) == zooms + 1 and script[-1] == f"\\boxed{{{s.answer}}}"
        assert [rec.action for rec in t.turn_log] == ["zoom"] * zooms + ["answer"]
        assert [rec.nested for rec in t.turn_log[:zooms]] == [False, True][:zooms]
        first = t.turn_log[0].box_original
        assert first[0] <= s.target_boxes[0][0] and first[2] >= s.target_boxes[0][2]  # the panel holds the target
        if zooms == 2:  # the second crop is the target itself, shown at its own size
            assert t.turn_log[1].box_original == list(map(float, s.target_boxes[0]))
            assert t.turn_log[1].crop_size == (layout.detail, layout.detail)


def test_sft_loss_is_at_temperature_one(tmp_path, tiny_dir, synth_dir, env):
    """SFT fits the model's own distribution (T = 1, the plain cross-entropy), whatever the
    rollout's sampling temperature: the log-probs its loss sees are log_softmax of the raw logits."""
    import torch.nn.functional as F

    from mgpo.config import load_config
    from mgpo.core.setup import setup_run

    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={synth_dir / 'train.jsonl'}",
                             f"train.output_dir={tmp_path / 'run'}", "train.algorithm=sft", "rollout.temperature=0.5",
                             "train.prompts_per_rollout=2", "train.prompts_per_step=2", "train.micro_batch_size=1",
                             f"model.min_pixels={MIN_PX}", f"model.max_pixels={MAX_PX}", "model.dtype=float32"])
    run = setup_run(cfg)
    r, _ = _batch(run.processor, env[2][:2])
    with torch.no_grad():
        logp_NT, _ = run.wrapped(loss_mask=r.loss_mask, **r.model_inputs())
        logits_NTV = run.wrapped.policy(**r.model_inputs(), use_cache=False).logits.float()
    want_NT = F.log_softmax(logits_NTV[:, :-1], -1).gather(-1, r.input_ids[:, 1:, None]).squeeze(-1)
    mask_NT = r.loss_mask[:, 1:].bool()
    assert mask_NT.sum() > 0
    torch.testing.assert_close(logp_NT[:, 1:][mask_NT], want_NT[mask_NT], atol=2e-5, rtol=0)


def test_mgpo_sft_without_target_boxes_is_refused(env, caplog):
    """SFT in the two-turn mgpo template on records without a target box would train an empty
    turn 1 (the model learns never to ground): refused when no record has a box, warned when
    some lack one; the paper's SFT baseline (one turn, the answer only) is the grpo template."""
    from mgpo.core.sft import check_sft_targets

    samples = env[2][:4]
    no_box = [dataclasses.replace(s, target_boxes=()) for s in samples]
    with pytest.raises(ValueError, match=r"no record has a target box.*empty turn 1.*sft_templates=\[grpo\]"):
        check_sft_targets(no_box, ("mgpo",), "d.jsonl")
    with pytest.raises(ValueError, match="empty turn 1"):
        check_sft_targets(no_box, ("mgpo", "grpo"), "d.jsonl")
    check_sft_targets(no_box, ("grpo",), "d.jsonl")  # one turn, the answer only: the paper's SFT row
    check_sft_targets(no_box, ("direct",), "d.jsonl")
    check_sft_targets(samples, ("mgpo",), "d.jsonl")
    with caplog.at_level("WARNING", logger="mgpo"):
        check_sft_targets(samples[:3] + no_box[3:], ("mgpo",), "d.jsonl")
    assert "1 of 4 records have no target box" in caplog.text
    # what the grpo template teaches on a record without a box: the answer alone
    assert sft_texts(no_box[0], "grpo", (600, 400), MIN_PX, MAX_PX) == (f"\\boxed{{{samples[0].answer}}}",)


def test_sft_run_refuses_mgpo_template_without_boxes(tmp_path, tiny_dir, synth_dir):
    from mgpo.config import load_config
    from mgpo.core.setup import setup_run

    recs = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    data = tmp_path / "no_boxes.jsonl"
    data.write_text("".join(json.dumps({**r, "image": str(synth_dir / r["image"]), "target_boxes": []}) + "\n"
                            for r in recs))
    common = [f"model.path={tiny_dir}", f"data.train={data}", "train.algorithm=sft", "train.prompts_per_rollout=2",
              "train.prompts_per_step=2", "train.micro_batch_size=1"]
    with pytest.raises(ValueError, match="no record has a target box"):
        setup_run(load_config(None, [*common, f"train.output_dir={tmp_path / 'a'}"]))
    assert setup_run(load_config(None, [*common, f"train.output_dir={tmp_path / 'b'}", "train.sft_templates=[grpo]"]))


def test_a_control_token_in_a_record_is_trained_as_text_never_as_the_token(env):
    """A record whose category is "<|endoftext|>" put the real control token into the turn-1 target
    (the box label was not escaped) and trained it. Targets are escaped as prompts are."""
    _, processor, samples = env
    tok = processor.tokenizer
    hostile = dataclasses.replace(samples[0], category="<|endoftext|>")
    r, texts = _batch(processor, [hostile])
    assert "<|endoftext|>" in texts[0][0], "the label reaches the target text"
    trained = r.input_ids[0][r.loss_mask[0].bool()].tolist()
    specials = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|vision_start|>")}
    assert not specials & set(trained), "no control token among the trained ones (only <|im_end|> closes turns)"
    assert trained.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2


def test_k_turn_targets_of_different_lengths_in_one_batch(tiny_dir, tmp_path):
    """A batch whose first record answers at once (no target box) and whose second zooms twice:
    the decision "replay the script or let the model write" was taken from the first record's
    script only, so turn 2 of the second record went to a model there is none of (SFT passes none)."""
    import dataclasses as dc

    from mgpo.runtime.model import load_processor
    from mgpo.tools import beacon

    layout = beacon.NESTED
    samples = list(load_samples(beacon.build_beacon(tmp_path, 2, 0, "test", layout=layout)))
    samples[0] = dc.replace(samples[0], target_boxes=())  # no target: answers in turn 1
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=layout.budget, max_pixels=layout.budget))
    images = [s.load_image() for s in samples]
    texts = [sft_texts(s, "mgpo_k", im.size, layout.budget, layout.budget, 3) for s, im in zip(samples, images)]
    assert [len(t) for t in texts] == [1, 3]
    r = teacher_forced(processor, samples, texts, RolloutConfig(template="mgpo_k", max_turns=3),
                       min_pixels=layout.budget, max_pixels=layout.budget, images=images)
    assert [[rec.action for rec in t.turn_log] for t in r.trajectories] == [["answer"], ["zoom", "zoom", "answer"]]
