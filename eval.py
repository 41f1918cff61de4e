"""Evaluate a Qwen2.5-VL checkpoint with a pinned protocol, or compare evaluation runs.

    python eval.py --config configs/demo.yaml                     # what `make demo` trained (runs/demo)
    python eval.py --config configs/tiny_cpu.yaml                 # what `make train` trained, else the tiny model
    python eval.py --config configs/eval_qwen2_5_vl_7b.yaml model.path=/models/ckpt eval.datasets=[/data/vstar_bench]
    python eval.py compare runs/eval/base/vstar_bench runs/eval/mgpo/vstar_bench   # side by side
    python eval.py crops runs/eval/mgpo/vstar_bench --judge /models/base           # Table 3: answerable from its crops?

Each evaluation writes to runs/eval/<model>/<datasets> unless eval.output_dir is set, and ends
by printing its accuracy table. `python eval.py compare --help`, `python eval.py crops --help`.
"""

import argparse
import sys

from mgpo.cli import EXIT_USER_ERROR, config_fields_help, run_main


def _parser(prog: str, description: str, **kw) -> argparse.ArgumentParser:
    """An argument parser whose refusals are one line (exit status 2, as argparse's own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, **kw)

    def error(message):
        print(f"error: {prog}: {message} (see {prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    parser.error = error
    return parser


def compare_main(argv: list[str]) -> None:
    parser = _parser("eval.py compare", "Side-by-side accuracy and grounding of evaluation folders (differences "
                     "against the first); columns are named by run, rows by dataset and category.")
    parser.add_argument("runs", nargs="+", help="evaluation folders (each holding metrics.json)")
    args = parser.parse_args(argv)
    from mgpo.eval.report import compare

    print(compare(args.runs), end="")


def crops_main(argv: list[str]) -> None:
    parser = _parser("eval.py crops", "The paper's Table 3: the share of an evaluation's questions whose turn-1 "
                     "crop lets the judge model (the base) answer right.")
    parser.add_argument("eval_dir")
    parser.add_argument("--judge", required=True, help="model folder that answers from the crops (the base)")
    parser.add_argument("--batch-size", type=int, default=16)
    a = parser.parse_args(argv)
    from mgpo.eval.evaluate import crop_answerable

    r = crop_answerable(a.eval_dir, a.judge, a.batch_size)
    print(f"{r['answerable']} of {r['questions']} questions answerable from their turn-1 crop "
          f"({r['share']:.1f}%; {r['valid_boxes']} valid boxes); written to {a.eval_dir}/crop_answerable.json")


def main() -> None:
    if sys.argv[1:2] == ["compare"]:
        return compare_main(sys.argv[2:])
    if sys.argv[1:2] == ["crops"]:
        return crops_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, epilog=config_fields_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML preset; without it the protocol comes from the model: a checkpoint's own run "
                             "config, else the paper's protocol (configs/eval_qwen2_5_vl_7b.yaml); with no model "
                             "given, configs/tiny_cpu.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    from mgpo.eval.evaluate import newest_run_model, protocol_config, protocol_lines, with_output_dir

    overrides = list(args.overrides)
    cfg, source = protocol_config(args.config, overrides)
    if cfg.model.path.startswith("build/") and not any(o.startswith("model.path=") for o in overrides):
        # A project preset: evaluate what its run (train.output_dir) trained, when it exists.
        if newest := newest_run_model(cfg.train.output_dir):
            cfg, source = protocol_config(args.config, [*overrides, f"model.path={newest}"])
    cfg = with_output_dir(cfg)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    from mgpo.eval.evaluate import evaluate
    from mgpo.eval.report import console_table
    from mgpo.runtime import distributed as D

    print(f"evaluating {cfg.model.path} into {cfg.eval.output_dir}")
    print(protocol_lines(cfg, source))
    result = evaluate(cfg)
    if result:
        print(console_table(result))
        print(f"report: {cfg.eval.output_dir}/report.md (and report.html, metrics.json, predictions.jsonl)")
    D.finish()


if __name__ == "__main__":
    run_main(main)
