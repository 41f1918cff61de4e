"""Evaluate a Qwen2.5-VL checkpoint with a pinned protocol, or compare evaluation runs.

    python eval.py --config configs/tiny_cpu.yaml                 # newest demo checkpoint (or the tiny model)
    python eval.py --config CFG model.path=/models/ckpt eval.datasets=[/data/vstar_bench] eval.mode=direct
    python eval.py compare runs/eval_base runs/eval_mgpo           # side by side, differences per row
    python eval.py crops runs/eval_mgpo --judge build/beacon/model  # Table 3: answerable from its crops?
"""

import argparse
import sys

from mgpo.config import load_config
from mgpo.eval.evaluate import crop_answerable, evaluate, newest_run_model
from mgpo.eval.report import CompareError, compare
from mgpo.runtime import distributed as D

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        try:
            print(compare(sys.argv[2:]), end="")
        except CompareError as e:  # a folder that is not a finished evaluation: one line, no traceback
            sys.exit(f"eval.py compare: {e}")
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "crops":
        crops = argparse.ArgumentParser(description="The paper's Table 3: the share of an evaluation's questions "
                                        "whose turn-1 crop lets the judge model (the base) answer right.")
        crops.add_argument("eval_dir")
        crops.add_argument("--judge", required=True, help="model folder that answers from the crops (the base)")
        crops.add_argument("--batch-size", type=int, default=16)
        a = crops.parse_args(sys.argv[2:])
        r = crop_answerable(a.eval_dir, a.judge, a.batch_size)
        print(f"{r['answerable']} of {r['questions']} questions answerable from their turn-1 crop "
              f"({r['share']:.1f}%; {r['valid_boxes']} valid boxes); written to {a.eval_dir}/crop_answerable.json")
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--print-config", action="store_true")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if not any(o.startswith("model.path=") for o in overrides):
        # The embedded default: evaluate what `make demo` trained, when it exists.
        newest = newest_run_model(load_config(args.config, overrides).train.output_dir)
        if newest:
            overrides.append(f"model.path={newest}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        sys.exit(0)
    print(f"evaluating {cfg.model.path} ({cfg.eval.mode} mode)")
    result = evaluate(cfg)
    if result:
        print(f"report: {cfg.eval.output_dir}/report.md (and report.html, metrics.json, predictions.jsonl)")
    D.finish()
