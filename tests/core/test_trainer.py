"""mgpo.core.trainer: step slices, one optimizer step over micro-batches, an SFT run in-process."""

import json

import pytest
import torch
from PIL import Image

from mgpo.config import load_config
from mgpo.core.trainer import _step_slices


def test_step_slices_are_whole_groups_every_epoch():
    slices = list(_step_slices(groups=4, group_size=3, steps_per_rollout=2, ppo_epochs=2))
    assert slices == [list(range(0, 6)), list(range(6, 12))] * 2


def _one_step(tmp_path, tiny_dir, synth_dir, micro_batch_size, normalization="token", tokens=0, spy=None):
    """The figures of one SFT optimizer step over the same 4 records, in micro-batches of the given
    size (or packed by ``tokens``; ``spy`` collects each micro-batch's shape)."""
    from mgpo.core.trainer import optimizer_step

    run, exp, hand = _sft_run(tmp_path, tiny_dir, synth_dir, micro_batch_size, normalization, tokens)
    if spy is not None:
        forward = run.wrapped.forward
        run.wrapped.forward = lambda **kw: spy.append(tuple(kw["input_ids"].shape)) or forward(**kw)
    return optimizer_step(run, exp, list(range(4))), hand


def _sft_run(tmp_path, tiny_dir, synth_dir, micro_batch_size, normalization="token", tokens=0):
    """A run over 4 SFT records (one label shorter than the rest), its batch, and the step's loss by hand."""
    from mgpo.core.setup import setup_run
    from mgpo.core.trainer import _next_prompts, _sft_experience

    out = tmp_path / f"run-{micro_batch_size}-{normalization}-{tokens}"
    data = tmp_path / "train.jsonl"
    if not data.exists():  # the synthetic records with one short label, so the targets differ in length
        recs = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
        for r in recs:
            r["image"], r["category"] = str(synth_dir / r["image"]), r["category"] if r is not recs[0] else "hue"
        data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={data}",
                             f"train.output_dir={out}", "train.algorithm=sft", "train.prompts_per_rollout=4",
                             "train.prompts_per_step=4", f"train.micro_batch_size={micro_batch_size}",
                             f"loss.normalization={normalization}", "model.dtype=float32",
                             f"train.micro_batch_tokens={tokens}"])
    run = setup_run(cfg)
    assert run.plan.grad_accum == 4 // micro_batch_size
    prompts, images, _ = _next_prompts(run)
    exp = _sft_experience(run, prompts, images)
    with torch.no_grad():  # the step's NLL per trajectory, by hand, before the step moves the weights
        r = exp.batch
        logp_NT, _ = run.wrapped(loss_mask=r.loss_mask, **r.model_inputs())
        nll_N, tokens_N = -(logp_NT * r.loss_mask).sum(1).double(), r.loss_mask.sum(1).double()
    hand = {"token": (nll_N.sum() / tokens_N.sum()).item(), "sequence": (nll_N / tokens_N).mean().item(),
            "lengths": r.attention_mask.sum(dim=1).tolist()}
    return run, exp, hand


def test_the_fixed_log_prob_passes_are_packed_as_the_update(tmp_path, tiny_dir, synth_dir):
    """With train.micro_batch_tokens the old-policy pass (as the reference one) is packed by the
    same budget as the update: every forward within it, and the same log-probs as by count."""
    import dataclasses

    from mgpo.core.trainer import _fixed_logprobs

    run, exp, hand = _sft_run(tmp_path, tiny_dir, synth_dir, 4)
    shapes = []
    forward = run.wrapped.forward
    run.wrapped.forward = lambda **kw: shapes.append(tuple(kw["input_ids"].shape)) or forward(**kw)

    def old_logprobs(tokens: int):  # two PPO epochs: the old policy's pass runs; no KL: no reference
        train = dataclasses.replace(run.cfg.train, ppo_epochs=2, micro_batch_tokens=tokens)
        run.cfg = dataclasses.replace(run.cfg, train=train, loss=dataclasses.replace(run.cfg.loss, kl_coef=0.0))
        shapes.clear()
        return _fixed_logprobs(run, exp.batch)[0]

    by_count = old_logprobs(0)
    assert shapes == [(4, max(hand["lengths"]))]
    budget = 2 * max(hand["lengths"])
    packed = old_logprobs(budget)
    assert len(shapes) == 2 and all(rows * width <= budget for rows, width in shapes), shapes
    assert torch.allclose(packed, by_count, atol=1e-5)


def test_step_gradient_does_not_depend_on_the_micro_batch_split(tmp_path, tiny_dir, synth_dir):
    """The same 4 trajectories in 1, 2 or 4 micro-batches give the same loss and the same
    gradient (its norm before clipping): the step's loss is one mean over the whole step.
    Without the ``* grad_accum`` rescale in optimizer_step the gradient shrank by the
    number of micro-batches."""
    token = {m: _one_step(tmp_path, tiny_dir, synth_dir, m)[0] for m in (1, 2, 4)}
    for m in (1, 2):
        assert token[m]["loss"] == pytest.approx(token[4]["loss"], rel=1e-5)
        assert token[m]["grad_norm"] == pytest.approx(token[4]["grad_norm"], rel=1e-4)



def test_micro_batches_packed_by_tokens_give_the_same_step_within_their_budget(tmp_path, tiny_dir, synth_dir):
    """train.micro_batch_tokens: the same 4 trajectories packed by a token budget (longest first,
    padding counted) give the loss and gradient of micro-batches by count, every micro-batch
    within its budget, and log the padded-token share."""
    by_count, hand = _one_step(tmp_path, tiny_dir, synth_dir, 4)
    lengths = sorted(hand["lengths"], reverse=True)
    budget = 2 * lengths[0]  # two of the longest fit, so 2 micro-batches of 2
    shapes = []
    packed, _ = _one_step(tmp_path, tiny_dir, synth_dir, 4, tokens=budget, spy=shapes)
    assert len(shapes) == 2 and all(rows * width <= budget for rows, width in shapes), shapes
    assert packed["loss"] == pytest.approx(by_count["loss"], rel=1e-5)
    assert packed["grad_norm"] == pytest.approx(by_count["grad_norm"], rel=1e-4)
    # padding: each micro-batch is as wide as its longest row
    want = 1 - sum(lengths) / (2 * lengths[0] + 2 * lengths[2])
    assert packed["padded_share"] == pytest.approx(want) and by_count["padded_share"] == pytest.approx(
        1 - sum(lengths) / (4 * lengths[0]))
    # more micro-batches than the accumulation steps the accelerator was made with (2 of 2 rows):
    # a budget of 1 token puts every trajectory alone, 4 calls, one step, the same loss and gradient
    shapes = []
    alone, _ = _one_step(tmp_path, tiny_dir, synth_dir, 2, tokens=1, spy=shapes)
    assert [rows for rows, _ in shapes] == [1, 1, 1, 1], shapes
    assert alone["loss"] == pytest.approx(by_count["loss"], rel=1e-5)
    assert alone["grad_norm"] == pytest.approx(by_count["grad_norm"], rel=1e-4)


def test_a_rank_with_fewer_packs_splits_to_the_most_any_rank_has(tmp_path, tiny_dir, synth_dir, monkeypatch):
    """Under ZeRO-3 every rank must make as many forward calls: when another rank packed its
    trajectories into 2 more micro-batches, this rank splits its own to match, and the step's loss
    and gradient are unchanged."""
    from mgpo.runtime import distributed as D

    by_count, hand = _one_step(tmp_path, tiny_dir, synth_dir, 4)
    real = D.all_gather_objects
    monkeypatch.setattr(D, "all_gather_objects", lambda obj: [obj, obj + 2] if isinstance(obj, int) else real(obj))
    shapes = []
    budget = 4 * max(hand["lengths"])  # one micro-batch here; the other rank has 3
    packed, _ = _one_step(tmp_path, tiny_dir, synth_dir, 4, tokens=budget, spy=shapes)
    assert [rows for rows, _ in shapes] == [1, 1, 2], shapes
    assert packed["loss"] == pytest.approx(by_count["loss"], rel=1e-5)
    assert packed["grad_norm"] == pytest.approx(by_count["grad_norm"], rel=1e-4)


def test_packing_by_tokens_hand_computed():
    from mgpo.core.trainer import micro_batches, split_to

    lengths = [100, 40, 700, 90, 35, 300, 38]
    packs = micro_batches(lengths, 4, tokens=400)
    # longest first: 700 alone (over the budget), 300 alone (2 x 300 > 400), then 100, 90, 40, 38
    # fit 4 x 100 = 400, and 35 starts the next
    assert packs == [[2], [5], [0, 3, 1, 6], [4]]
    assert sorted(i for p in packs for i in p) == list(range(7))
    assert all(len(p) == 1 or len(p) * lengths[p[0]] <= 400 for p in packs)
    assert split_to(packs, 6) == [[2], [5], [0], [3], [1, 6], [4]]
    with pytest.raises(ValueError, match="cannot make 8 micro-batches of 7"):
        split_to(packs, 8)
    assert micro_batches(lengths, 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_sequence_normalization_over_the_whole_step(tmp_path, tiny_dir, synth_dir):
    """loss.normalization=sequence: the step's loss is the mean over its trajectories of each
    one's token mean, whatever the micro-batch split; token (the default) is the token mean."""
    (seq1, hand), (seq4, _) = (_one_step(tmp_path, tiny_dir, synth_dir, m, "sequence") for m in (1, 4))
    token1, _ = _one_step(tmp_path, tiny_dir, synth_dir, 1)
    assert abs(hand["sequence"] - hand["token"]) > 1e-5 * hand["token"], "the lengths must differ for this test"
    assert seq1["loss"] == pytest.approx(hand["sequence"], rel=1e-6)
    assert seq4["loss"] == pytest.approx(hand["sequence"], rel=1e-6)
    assert seq1["grad_norm"] == pytest.approx(seq4["grad_norm"], rel=1e-4)
    assert token1["loss"] == pytest.approx(hand["token"], rel=1e-6)


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


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_the_rl_steps_loss_follows_loss_normalization(tmp_path, tiny_dir, synth_dir, normalization):
    """One RL step at ratio 1 (one step per rollout batch), no KL, no entropy: every trained token's
    loss is -advantage. "token": the step's loss is -sum(adv_i n_i) / sum(n_i) over the trajectories'
    masked-token counts n_i; "sequence": the mean of each trajectory's token mean, -mean(adv_i), which
    is 0 (group advantages sum to zero). A trainer that ignored loss.normalization on the RL path
    (the raw mask as weights) passed every loss, trainer and correctness test."""
    from mgpo.core.reward import group_advantages
    from mgpo.core.setup import setup_run
    from mgpo.core.trainer import next_experience, optimizer_step

    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={synth_dir / 'train.jsonl'}",
                             f"train.output_dir={tmp_path / 'run'}", "train.prompts_per_rollout=2",
                             "train.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch_size=4",
                             "rollout.max_new_tokens_turn1=12", "rollout.max_new_tokens_turn2=12",
                             f"loss.normalization={normalization}", "loss.kl_coef=0", "loss.entropy_coef=0",
                             "model.dtype=float32", "train.lr=1e-9"])
    run = setup_run(cfg)
    work = next_experience(run)
    exp = work.exp
    exp.advantages_N = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]), 4)
    for i, row in enumerate(exp.batch.loss_mask):  # trajectories of 4, 6, ... 18 trained tokens
        row[row.nonzero()[4 + 2 * i:, 0]] = 0.0
    n = exp.batch.loss_mask.sum(dim=1).double()
    assert len(set(n.tolist())) > 1, "the trajectories must differ in length for this test"
    adv = exp.advantages_N.double()
    want = -(adv * n).sum() / n.sum() if normalization == "token" else -adv.mean()
    got = optimizer_step(run, exp, list(range(8)))
    assert got["loss"] == pytest.approx(float(want), abs=1e-6)
    run.folder.release()


def test_left_out_trajectories_are_exactly_the_uniform_groups_and_the_over_turn_ones():
    from mgpo.core.trainer import trained_trajectories
    from mgpo.core.trajectory import Trajectory, TurnRecord

    def traj(last):
        return Trajectory("s", 0, "A", ("x", "y"), (9, 9), (9, 9), turn_log=[TurnRecord("t", 1, False, last)])

    trajs = [traj("answer"), traj("answer"), traj("final"), traj("answer"), traj("answer"), traj("final")]
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # groups of 2: uniform, mixed, uniform
    keep = lambda *o: trained_trajectories(trajs, rewards, load_config(None, ["rollout.group_size=2", *o]))  # noqa: E731
    assert keep() is None, "the paper's default leaves nothing out"
    assert keep("rollout.drop_uniform_groups=true").tolist() == [0, 0, 1, 1, 0, 0]
    assert keep("rollout.over_turn=mask").tolist() == [1, 1, 0, 1, 1, 0]
    assert keep("rollout.drop_uniform_groups=true", "rollout.over_turn=mask").tolist() == [0, 0, 0, 1, 0, 0]


def test_a_step_trains_on_exactly_the_groups_kept_and_normalizes_over_them(tmp_path, tiny_dir, synth_dir):
    """rollout.drop_uniform_groups: group 0's rewards are all equal, so it is left out; the step's
    token mean is over group 1's tokens only: -sum(adv_i n_i) / sum(n_i) over group 1."""
    from mgpo.core.reward import group_advantages
    from mgpo.core.setup import setup_run
    from mgpo.core.trainer import next_experience, optimizer_step

    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={synth_dir / 'train.jsonl'}",
                             f"train.output_dir={tmp_path / 'run'}", "train.prompts_per_rollout=2",
                             "train.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch_size=4",
                             "rollout.max_new_tokens_turn1=12", "rollout.max_new_tokens_turn2=12",
                             "loss.kl_coef=0", "loss.entropy_coef=0", "model.dtype=float32", "train.lr=1e-9",
                             "rollout.drop_uniform_groups=true"])
    run = setup_run(cfg)
    exp = next_experience(run).exp
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    exp.advantages_N = group_advantages(rewards, 4)
    exp.trained_N = torch.tensor([0.0] * 4 + [1.0] * 4)
    for i, row in enumerate(exp.batch.loss_mask):  # trajectories of different lengths
        row[row.nonzero()[4 + 2 * i:, 0]] = 0.0
    n = exp.batch.loss_mask.sum(dim=1).double()[4:]
    adv = exp.advantages_N.double()[4:]
    got = optimizer_step(run, exp, list(range(8)))
    assert got["loss"] == pytest.approx(float(-(adv * n).sum() / n.sum()), abs=1e-6)
    run.folder.release()
