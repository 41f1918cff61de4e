"""Show one MGPO step on one question: both turns, the box, the crop, reward, advantage, loss.

    python -m mgpo.tools.demo --config configs/tiny_cpu.yaml
    python -m mgpo.tools.demo --config configs/demo.yaml --from-run --before build/demo/base.json   # `make demo`'s end
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..config import load_config
from ..core.generation import suppressed_ids
from ..core.loss import policy_loss
from ..core.policy import PolicyForward
from ..core.reward import group_advantages, score
from ..core.rollout import rollout
from ..data.samples import load_samples
from ..runtime.model import load_model, load_processor


def show_one_rollout(cfg, sample_index: int = 0) -> dict:
    """Run and print one group of rollouts with its reward, advantage and loss."""
    torch.manual_seed(cfg.train.seed)
    processor = load_processor(cfg.model)
    model = load_model(cfg.model)
    sample = load_samples(cfg.data.train, cfg.data.train_format)[sample_index]

    t0 = time.perf_counter()
    batch = rollout(model, processor, [sample], cfg.rollout, min_pixels=cfg.model.min_pixels,
                    max_pixels=cfg.model.max_pixels)
    t_rollout = time.perf_counter() - t0
    rewards = score(batch.trajectories)
    adv = group_advantages(rewards, cfg.rollout.group_size, cfg.loss.adv_eps)

    t0 = time.perf_counter()
    forward = PolicyForward(model, cfg.rollout.temperature, suppressed_ids(processor))
    logp, entropy = forward(loss_mask=batch.loss_mask, with_entropy=True, **batch.model_inputs())
    loss, stats = policy_loss(logp, logp.detach(), adv, batch.loss_mask, cfg.loss, entropy_NT=entropy)
    loss.backward()
    t_loss = time.perf_counter() - t0

    print(f"question [{sample.id}]: {sample.question}  options={list(sample.options)}  answer={sample.answer}")
    print(f"original image {batch.trajectories[0].original_size}, model input {batch.trajectories[0].input_size}")
    same: dict[tuple, list[int]] = {}  # identical samples (a trained model often writes one answer) once
    for i, t in enumerate(batch.trajectories):
        same.setdefault((t.turn1_text, t.turn2_text), []).append(i)
    for idx in same.values():
        i, t = idx[0], batch.trajectories[idx[0]]
        also = f" (samples {', '.join(map(str, idx))}: {len(idx)} identical)" if len(idx) > 1 else ""
        print(f"--- sample {i}{also}: reward {rewards[i]:.0f}, advantage {adv[i]:+.3f}")
        print(f"  turn 1 ({t.turn1_tokens} tokens{', truncated' if t.turn1_truncated else ''}): {t.turn1_text!r}")
        print(f"  box as written {t.box_input}  valid={t.valid}  ({t.box_problem or 'ok'})"
              f"  box (original px) {t.box_original}  crop {t.crop_size}")
        print(f"  turn 2 ({t.turn2_tokens} tokens{', truncated' if t.turn2_truncated else ''}): {t.turn2_text!r}")
    if len(same) == 1:
        print(f"all {len(batch)} samples are the same: every reward equal, every advantage 0, so this group "
              "teaches nothing (GRPO learns from groups whose samples differ)")
    print(f"loss {stats['loss']:.4f} (policy {stats['pg_loss']:.4f}, entropy {stats['entropy']:.3f}); "
          f"masked tokens {int(batch.loss_mask.sum())} of {int(batch.attention_mask.sum())}")
    print(f"timings: rollout {t_rollout:.2f} s for {len(batch)} trajectories, log-probs + backward {t_loss:.2f} s")
    return {"rollout_s": t_rollout, "loss_s": t_loss, **stats}


def before_after(base_json: str | Path, run_dir: str | Path, eval_dir: str | Path, window: int = 5) -> str:
    """The demo's closing table: the base model's starting point, the training figures over the
    first and the last ``window`` logged steps (one step's 64 rollouts are noisy), and the
    trained model's evaluation."""
    base = json.loads(Path(base_json).read_text())
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    after = json.loads((Path(eval_dir) / "metrics.json").read_text())["results"]
    test = next(iter(after.values()))
    first, last = rows[:window], rows[-window:]

    def steps(part):
        return f"{part[0]['step']}" if len(part) == 1 else f"{part[0]['step']}-{part[-1]['step']}"

    def training(label, key, fmt):
        mean = lambda part: sum(r.get(key, 0.0) for r in part) / len(part)  # noqa: E731
        return f"| {label} | {fmt.format(mean(first))} | {fmt.format(mean(last))} |"

    lines = [
        "| | base model | trained |",
        "|---|---|---|",
        f"| test accuracy % (greedy) | {base['test_accuracy']:.1f} | {test['accuracy']:.1f} |",
        f"| test valid box % | {base['valid_box']:.1f} | {test['grounding']['valid_box']:.1f} |",
        training(f"training reward (steps {steps(first)} -> {steps(last)})", "reward/mean", "{:.3f}"),
        training("training valid-box share", "grounding/valid_box_share", "{:.2f}"),
    ]
    if "mean_iou" in base and "grounding/iou" in rows[-1]:  # records with a target: did the box find it?
        holds = test["grounding"].get("crop_contains_target")
        lines[4:4] = [f"| test IoU of the turn-1 box with the target | {base['mean_iou']:.2f} | "
                      f"{test['grounding']['mean_iou']:.2f} |"]
        if "holds" in base and holds is not None:
            lines[5:5] = [f"| test turn-1 box holds the target % | {base['holds']:.1f} | {holds:.1f} |"]
        lines.append(training("training IoU with the target", "grounding/iou", "{:.2f}"))
        lines.append(training("training share of boxes holding the target", "grounding/box_holds_target", "{:.2f}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--from-run", action="store_true", help="use the newest checkpoint of train.output_dir")
    parser.add_argument("--before", help="base.json of the base model: print a before/after table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.from_run:
        from ..eval.evaluate import newest_run_model

        newest = newest_run_model(cfg.train.output_dir)
        if newest:
            cfg = load_config(args.config, [*args.overrides, f"model.path={newest}"])
    if args.from_run or not args.before:
        print(f"one MGPO rollout of {cfg.model.path}:")
        show_one_rollout(cfg)
    if args.before:
        print(before_after(args.before, cfg.train.output_dir, cfg.eval.output_dir))


if __name__ == "__main__":
    main()
