"""Supervised fine-tuning from the command line: the trainer with ``train.algorithm=sft``.

    python -m mgpo.tools.sft --config configs/tiny_cpu.yaml [key=value ...]
    accelerate launch -m mgpo.tools.sft --config ...      # DDP / ZeRO-3, like train.py

The targets each template teaches are described in ``mgpo/core/sft.py``.
"""

from __future__ import annotations

import argparse

from ..config import load_config
from ..core.trainer import train
from ..runtime import distributed as D


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    result = train(load_config(args.config, [*args.overrides, "train.algorithm=sft"]))
    print(f"SFT done: {result.steps} steps, checkpoints in {result.output_dir} (checkpoint-<step>)")
    D.finish()


if __name__ == "__main__":
    main()
