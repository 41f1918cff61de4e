"""Train a Qwen2.5-VL policy with MGPO.

    python train.py --config configs/tiny_cpu.yaml                      # one process
    accelerate launch --config_file configs/accelerate/zero3_8gpu.yaml \
        train.py --config configs/qwen2_5_vl_7b_mgpo.yaml model.path=/models/Qwen2.5-VL-7B-Instruct

Any field can be overridden as section.key=value; --print-config shows the result and exits.
On GPUs a launch that `mgpo.runtime.memory` (`python -m mgpo.tools.plan`) predicts will run out of memory is refused
(train.ignore_plan=true launches anyway).
"""

import argparse

from mgpo.cli import config_fields_help, run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, epilog=config_fields_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml", help="YAML preset")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    from mgpo.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    # torch, transformers and the trainer only now: --help and a bad key answer at once
    from mgpo.core.trainer import train
    from mgpo.runtime import distributed as D
    from mgpo.runtime.memory import startup_line

    if line := startup_line(cfg):  # on GPUs: will it fit? (mgpo.runtime.memory; refuses if not)
        if D.launched_rank() == 0:  # (no process group yet: the launcher's rank)
            print(line)
    result = train(cfg)
    if D.is_main():
        where = f"; the trained model (from_pretrained) is {result.model_dir}" if result.model_dir else ""
        print(f"done: {result.steps} steps; logs, metrics and checkpoints are in {result.output_dir}{where}")
    D.finish()


if __name__ == "__main__":
    run_main(main)
