"""Run mgpo.core.trainer.train in its own process (plain, or under accelerate launch) and record
what the tests check: per-rank parameter checksums, which parameters changed.

    python tests/train_worker.py OUT.json --config configs/tiny_cpu.yaml [--rewards random]
        [--boxes valid|invalid|split] [--zoom split] [--stop split] key=value ...
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import mgpo.core.setup as setup  # noqa: E402
import mgpo.core.trainer as trainer  # noqa: E402
from mgpo.config import load_config  # noqa: E402
from mgpo.runtime import distributed as D  # noqa: E402


def _checksums(model):
    """A number per parameter that changes when any element does (ZeRO-3 shards gathered first)."""
    import contextlib

    out = {}
    for n, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p])
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            w = p.detach().double()
            out[n] = float(w.sum()) + float(w.abs().sum()) * 1e-3 + float((w * w).sum()) * 1e-6
    return out


def _adam_state(optimizer):
    """The step counts and moment norms of the torch AdamW inside accelerate's / DeepSpeed's wrappers."""
    while not isinstance(optimizer, torch.optim.AdamW):
        optimizer = optimizer.optimizer
    states = [s for s in optimizer.state.values() if s]
    return {"steps": sorted({float(s["step"]) for s in states}),
            "moments": sum(float(s["exp_avg"].norm()) + float(s["exp_avg_sq"].norm()) for s in states)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--rewards", default="real", choices=["real", "random"])
    ap.add_argument("--boxes", default="free", choices=["free", "valid", "invalid", "split"])
    ap.add_argument("--stop", default="free", choices=["free", "split"],
                    help="rank 0's rows stop at once in both turns, rank 1's write to their token limits")
    ap.add_argument("--zoom", default="free", choices=["free", "split"],
                    help="mgpo_k: rank 0's trajectories all answer at turn 1, rank 1's zoom at every turn")
    ap.add_argument("--nan-loss", action="store_true", help="every loss is NaN (fault injection)")
    ap.add_argument("--nan-grad", action="store_true",
                    help="the loss stays finite but one weight's gradient is NaN (fault injection)")
    ap.add_argument("--negate-advantages", action="store_true", help="a broken trainer: advantages negated")
    ap.add_argument("--shuffle-advantages", action="store_true",
                    help="a broken trainer: each trajectory gets another's advantage (credit misassigned)")
    ap.add_argument("--record-loss-inputs", action="store_true",
                    help="record every micro-batch's masked loss inputs (to recompute the step's figures)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)

    if args.rewards == "random":  # non-zero advantages, so the policy gradient is exercised
        def _score(trajectories, *_):
            g = torch.Generator().manual_seed(len(trajectories) + D.rank())
            return torch.randint(0, 2, (len(trajectories),), generator=g).float()
        trainer.score = _score

    if args.boxes != "free":  # script turn 1 per rank: every box valid, or invalid, or split by rank
        from helpers import ScriptedModel

        real_rollout = trainer.rollout

        def _rollout(model, processor, *a, **kw):
            kind = args.boxes if args.boxes != "split" else ("valid" if D.rank() == 0 else "invalid")
            box = "[30, 30, 200, 200]" if kind == "valid" else "[0, 0, 3, 3]"
            script = f'```json\n[{{"bbox_2d": {box}}}]\n```'
            return real_rollout(ScriptedModel(model, processor.tokenizer, [script, None]), processor, *a, **kw)
        trainer.rollout = _rollout

    if args.negate_advantages:
        real_advantages = trainer.group_advantages
        trainer.group_advantages = lambda *a, **kw: -real_advantages(*a, **kw)

    if args.shuffle_advantages:
        true_advantages = trainer.group_advantages
        shuffle = torch.Generator().manual_seed(cfg.train.seed)

        def _shuffled(*a, **kw):
            adv = true_advantages(*a, **kw)
            return adv[torch.randperm(len(adv), generator=shuffle)]
        trainer.group_advantages = _shuffled

    streams = []  # per rollout: this rank's stream (prefill calls, decode calls, row-steps)
    if args.stop == "split":
        from helpers import ScriptedModel

        import mgpo.core.conversation as conversation

        real_stream, real_rollout = conversation.decode_stream, trainer.rollout

        def _counted(*a, **kw):
            c = real_stream(*a, **kw)
            streams.append([c.prefill_calls, c.decode_calls, c.row_steps])
            return c
        conversation.decode_stream = _counted

        def _rollout(model, processor, *a, **kw):
            scripts = ["\\boxed{A}<|im_end|>"] * 2 if D.rank() == 0 else [None, None]
            return real_rollout(ScriptedModel(model, processor.tokenizer, scripts), processor, *a, **kw)
        trainer.rollout = _rollout

    generate_calls = []  # per rollout, this rank's generate calls
    if args.zoom == "split":
        from helpers import ScriptedModel

        real_rollout = trainer.rollout

        def _rollout(model, processor, *a, **kw):
            box = '```json\n[{"bbox_2d": [30, 30, 200, 200]}]\n```'
            scripts = ["\\boxed{A}<|im_end|>"] if D.rank() == 0 else [box] * (cfg.rollout.max_turns - 1)
            scripted = ScriptedModel(model, processor.tokenizer, scripts)
            out = real_rollout(scripted, processor, *a, **kw)
            generate_calls.append(scripted.calls)
            return out
        trainer.rollout = _rollout

    if args.nan_loss:
        real_loss = trainer.policy_loss

        def _nan_loss(*a, **kw):
            loss, stats = real_loss(*a, **kw)
            return loss * float("nan"), stats
        trainer.policy_loss = _nan_loss

    loss_inputs = []
    if args.record_loss_inputs:
        real_policy_loss = trainer.policy_loss

        def _recording(logp, old, adv, mask, cfg, *, ref_logp_NT=None, entropy_NT=None, denom=None):
            m = mask.bool()
            adv_NT = adv[:, None].expand_as(logp)
            pick = lambda x: None if x is None else x.detach()[m].tolist()  # noqa: E731
            loss_inputs.append({"logp": pick(logp), "old": pick(old), "adv": pick(adv_NT), "ref": pick(ref_logp_NT),
                                "entropy": pick(entropy_NT)})
            return real_policy_loss(logp, old, adv, mask, cfg, ref_logp_NT=ref_logp_NT, entropy_NT=entropy_NT,
                                    denom=denom)
        trainer.policy_loss = _recording

    lrs = []  # per optimizer step, the rate in the optimizer's param groups when the step starts
    runs = []
    real_step = trainer.optimizer_step

    def _step(run, *a, **kw):
        lrs.append([g["lr"] for g in run.optimizer.param_groups])
        runs[:] = [run]
        return real_step(run, *a, **kw)
    trainer.optimizer_step = _step

    before = {}
    real_load = setup.load_policy

    def _load(*a, **kw):
        model = real_load(*a, **kw)
        if args.nan_grad:  # the first trainable tensor's gradient turns NaN in backward
            first = next(p for p in model.parameters() if p.requires_grad)
            first.register_hook(lambda g: g * float("nan"))
        before.update(_checksums(model))
        before["__trainable__"] = [n for n, p in model.named_parameters() if p.requires_grad]
        return model
    setup.load_policy = _load

    result = trainer.train(cfg)
    after = _checksums(result.policy)
    record = {
        "rank": D.rank(),
        "steps": result.steps,
        "after": after,
        "trainable": before.pop("__trainable__"),
        "changed": [n for n in after if after[n] != before[n]],
        "loss_inputs": loss_inputs,
        "generate_calls": generate_calls,
        "streams": streams,
        "lrs": lrs,
        "adam": _adam_state(runs[0].optimizer) if runs else None,
    }
    Path(f"{args.out}.rank{D.rank()}").write_text(json.dumps(record))
    D.finish()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
