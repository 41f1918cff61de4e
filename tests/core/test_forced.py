"""mgpo.core.forced: chat messages and teacher-forced targets, encoded as the rollout would."""

import json
import re

import pytest
import torch
from PIL import Image

from mgpo.config import ModelConfig, RolloutConfig
from mgpo.core.forced import chat_forced
from mgpo.data.samples import load_samples

MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


def _user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}


GOOD = [
    {"id": "one", "messages": [_user("What colour is it?", "a.png"), {"role": "assistant", "content": "Red."}]},
    {"id": "two", "messages": [{"role": "system", "content": "Be brief."}, _user("First?", "a.png"),
                               {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
                               _user("Second?", "b.png"), {"role": "assistant", "content": "A2 <|im_end|> x"}]},
]
BAD = {
    "assistant first": [{"role": "assistant", "content": "hi"}, _user("q", "a.png")],
    "ends with user": [_user("q", "a.png"), {"role": "assistant", "content": "a"}, _user("q2")],
    "assistant image": [_user("q", "a.png"), {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}],
    "no image": [_user("q"), {"role": "assistant", "content": "a"}],
    "missing image": [_user("q", "gone.png"), {"role": "assistant", "content": "a"}],
    "bad content": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}],
    "bad role": [{"role": "tool", "content": "x"}, _user("q", "a.png"), {"role": "assistant", "content": "a"}],
}


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (120, 160), (30, 30, 200)).save(folder / "b.png")
    rows = GOOD + [{"id": k, "messages": m} for k, m in BAD.items()]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "chat.jsonl"


def test_chat_mask_is_exactly_the_assistant_messages(tiny_dir, chat_file):
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    processor, model = load_processor(mcfg), load_model(mcfg)
    tok = processor.tokenizer
    data = load_samples(chat_file)
    r = chat_forced(processor, list(data), min_pixels=MIN_PX, max_pixels=MAX_PX)
    masked = [tok.decode(r.input_ids[i][r.loss_mask[i].bool()], skip_special_tokens=False) for i in range(2)]
    assert masked[0] == "Red.<|im_end|>"
    # the special-token string inside a target is text, not a control token (escaped, one <|im_end|> token)
    assert masked[1].startswith("A1<|im_end|>A2 <") and masked[1].endswith(" x<|im_end|>")
    assert int((r.input_ids[1] == tok.convert_tokens_to_ids("<|im_end|>")).sum()) == 5  # system, 2 user, 2 assistant
    assert r.images_per_trajectory == [1, 2]
    # Whole conversation = the chat template's own rendering (image placeholders expanded).
    for i, s in enumerate(data):
        full = tok.decode(r.input_ids[i][r.attention_mask[i].bool()], skip_special_tokens=False)
        chat = [{"role": role, "content": [{"type": "image"} if k == "image" else {"type": "text", "text": v}
                                           for k, v in parts]} for role, parts in s.messages]
        want = processor.apply_chat_template(chat, tokenize=False).rstrip("\n")
        assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", full) == want.replace("<|im_end|> x", "<\u200b|im_end|> x")
    with torch.no_grad():
        logits = model(**r.model_inputs()).logits
    assert torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def corrupt_second_image(chat_file):
    """A chat file whose second record's second image has a readable header but cannot be decoded."""
    folder = chat_file.parent
    noise = torch.randint(0, 256, (160, 120, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(folder / "c.jpg", quality=95)
    raw = (folder / "c.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(raw[: len(raw) // 2])  # the header survives, the pixel data does not
    two = json.loads(json.dumps(GOOD[1]).replace("b.png", "cut.jpg"))
    (folder / "corrupt.jsonl").write_text(json.dumps(GOOD[0]) + "\n" + json.dumps({**two, "id": "cut"}) + "\n")
    return folder / "corrupt.jsonl"


def test_a_record_whose_later_image_fails_is_replaced_by_the_reserve(tiny_dir, corrupt_second_image):
    """Every rank keeps its number of trajectories (and so of micro-batches): the record is
    replaced by the reserve and listed as skipped, as a record whose first image fails is."""
    from mgpo.runtime.model import load_processor

    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX))
    one, cut = load_samples(corrupt_second_image)
    r = chat_forced(processor, [one, cut], min_pixels=MIN_PX, max_pixels=MAX_PX, reserve=one)
    assert len(r) == 2 and [t.sample_id for t in r.trajectories] == ["one", "one"]
    assert [sid for sid, _ in r.skipped] == ["cut"] and "cut.jpg" in r.skipped[0][1]


def _png(path, size=(64, 48), color=(200, 20, 20)):
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _chat_file(folder, long_chars):
    _png(folder / "a.png", (300, 200))
    _png(folder / "b.png", (120, 160))
    user = {"role": "user", "content": [{"type": "image", "image": "a.png"}, "What colour?"]}
    rows = [{"id": "ok", "messages": [user, {"role": "assistant", "content": "Red."},
                                      {"role": "user", "content": [{"type": "image", "image": "b.png"}, "And?"]},
                                      {"role": "assistant", "content": "Blue."}]},
            {"id": "long", "messages": [user, {"role": "assistant", "content": "word " * (long_chars // 5)}]}]
    return _jsonl(folder / "chat.jsonl", rows)


def test_a_chat_record_is_counted_as_chat_forced_encodes_it(tmp_path, tiny_dir):
    from mgpo.config import ModelConfig
    from mgpo.core.forced import chat_forced, chat_tokens
    from mgpo.runtime.model import load_processor

    low, high = 16 * 28 * 28, 64 * 28 * 28
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=low, max_pixels=high))
    sample = load_samples(_chat_file(tmp_path, 100))[0]
    encoded = chat_forced(processor, [sample], min_pixels=low, max_pixels=high)
    assert chat_tokens(processor, sample, min_pixels=low, max_pixels=high) == encoded.input_ids.shape[1]


@pytest.fixture(scope="module")
def env(tiny_dir, synth_dir):
    from mgpo.config import ModelConfig
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return load_model(mcfg), load_processor(mcfg), list(load_samples(synth_dir / "train.jsonl"))


def _box(x1, y1, x2, y2):
    return f'```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}]\n```'


def test_teacher_forced_k_turn_conversation(env):
    """SFT in mgpo_k: the scripted box zooms, the scripted answer ends the conversation, and
    the mask covers exactly both assistant turns (the rollout's own assembly)."""
    from mgpo.core.forced import teacher_forced

    model, processor, samples = env
    texts = [(_box(20, 20, 200, 150), "\\boxed{B}")]
    cfg = RolloutConfig(template="mgpo_k", max_turns=4)
    r = teacher_forced(processor, samples[:1], texts, cfg, min_pixels=MIN_PX, max_pixels=MAX_PX)
    (t,) = r.trajectories
    assert [rec.action for rec in t.turn_log] == ["zoom", "answer"] and t.final_text == "\\boxed{B}"
    masked = processor.tokenizer.decode(r.input_ids[0][r.loss_mask[0].bool()], skip_special_tokens=False)
    assert masked == texts[0][0] + "<|im_end|>" + "\\boxed{B}<|im_end|>"
    assert r.images_per_trajectory == [2]
