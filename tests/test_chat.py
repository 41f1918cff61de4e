"""SFT from a JSONL of chat messages (data format ``chat``): loading with every bad record
skipped and named, the mask on exactly the assistant messages, and a run through the trainer."""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import run_worker

from mgpo.config import ModelConfig
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


def test_chat_file_loads_and_every_bad_record_is_named(chat_file):
    data = load_samples(chat_file)  # detected from the first record's "messages"
    assert [s.id for s in data] == ["one", "two"]
    assert data[0].question == "What colour is it?" and data[0].image.endswith("a.png")
    reasons = dict(data.skipped)
    assert set(reasons) == set(BAD)
    assert "ending with assistant" in reasons["assistant first"] and "ending with assistant" in reasons["ends with user"]
    assert "text only" in reasons["assistant image"] and "at least one image" in reasons["no image"]
    assert "gone.png" in reasons["missing image"] or "not found" in reasons["missing image"]
    assert "content" in reasons["bad content"] and "role" in reasons["bad role"]


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


def test_sft_on_chat_file_trains_and_rl_refuses_it(tmp_path, tiny_dir, synth_dir, chat_file):
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "sft", f"data.train={chat_file}", "train.algorithm=sft",
               "train.max_steps=2", "train.epochs=2", "train.prompts_per_rollout=2", "train.prompts_per_step=2",
               "train.micro_batch_size=1")
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["train/nll"] > 0 for m in metrics)
    with pytest.raises(AssertionError, match="chat conversations"):
        run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "rl", f"data.train={chat_file}", "train.max_steps=1",
                   "train.prompts_per_rollout=2", "train.prompts_per_step=2")


def test_evaluation_refuses_chat_files(tiny_dir, chat_file, tmp_path):
    from mgpo.config import load_config
    from mgpo.eval.evaluate import evaluate

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny_cpu.yaml", [f"model.path={tiny_dir}", f"eval.datasets=[{chat_file}]",
                                                f"eval.output_dir={tmp_path / 'eval'}"])
    with pytest.raises(ValueError, match="chat conversations"):
        evaluate(cfg)


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


def test_sft_run_counts_the_replaced_chat_record(tmp_path, tiny_dir, corrupt_second_image):
    from mgpo.config import load_config
    from mgpo.core.trainer import train

    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={corrupt_second_image}",
                             f"train.output_dir={tmp_path / 'run'}", "train.algorithm=sft", "train.max_steps=1",
                             "train.prompts_per_rollout=2", "train.prompts_per_step=2", "train.micro_batch_size=1",
                             f"model.min_pixels={MIN_PX}", f"model.max_pixels={MAX_PX}", "model.dtype=float32"])
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["rollout/trajectories"] == 2 and metrics["data/skipped_images"] == 1
