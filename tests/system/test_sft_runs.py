"""SFT runs end to end through tests/train_worker.py: templates per batch, a chat file, 2-rank
DDP and exact resume."""

import json

import pytest
from launch import _env, _ranks_agree, run_worker
from PIL import Image


@pytest.mark.slow
def test_sft_two_rank_ddp_and_exact_resume(tmp_path, tiny_dir, synth_dir):
    args = ("train.algorithm=sft", "train.save_every=2", "train.keep_last=5", "train.lr=1e-3", "train.micro_batch_size=1")
    records = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "ddp", "train.max_steps=2", *args,
                         launcher="configs/accelerate/cpu_ddp_2proc.yaml", env=_env(ACCELERATE_USE_CPU="1"))
    _ranks_agree(records)
    (straight,) = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "a", "train.max_steps=4", *args)
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "b", "train.max_steps=2", *args)
    (resumed,) = run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "b", "train.max_steps=4", *args)
    assert resumed["steps"] == 4 and resumed["after"] == straight["after"]
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/nll" in m for m in metrics)


def test_sft_templates_alternate_per_batch(tmp_path, tiny_dir, synth_dir):
    """train.sft_templates=[mgpo, grpo]: batch 1 is the two-turn conversation, batch 2 the one-turn
    one (no turn-2 tokens), so one base model learns both prompts."""
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "mix", "train.algorithm=sft", "train.max_steps=2",
               "train.micro_batch_size=1", "train.prompts_per_rollout=2", "train.prompts_per_step=2",
               "train.sft_templates=[mgpo, grpo]")
    metrics = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["length/turn2_tokens"] > 0 and metrics[1]["length/turn2_tokens"] == 0


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


def test_sft_on_chat_file_trains_and_rl_refuses_it(tmp_path, tiny_dir, synth_dir, chat_file):
    run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "sft", f"data.train={chat_file}", "train.algorithm=sft",
               "train.max_steps=2", "train.epochs=2", "train.prompts_per_rollout=2", "train.prompts_per_step=2",
               "train.micro_batch_size=1")
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["train/nll"] > 0 for m in metrics)
    with pytest.raises(AssertionError, match="chat conversations"):
        run_worker(tmp_path, tiny_dir, synth_dir, tmp_path / "rl", f"data.train={chat_file}", "train.max_steps=1",
                   "train.prompts_per_rollout=2", "train.prompts_per_step=2")
