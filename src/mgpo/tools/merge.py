"""Merge a LoRA checkpoint into its base model and write a full Hugging Face folder.

    python -m mgpo.tools.merge runs/x/checkpoint-100 merged/ --base /models/Qwen2.5-VL-7B-Instruct

The result loads with ``from_pretrained`` (and serving engines) like any Qwen2.5-VL. The
weights keep the base checkpoint's dtype.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError, ModelConfig
from ..runtime.checkpoint import verify_part
from ..runtime.model import DTYPES, CheckpointError, check_adapter_dir, check_model_dir, load_model
from .args import claim_folder


def merge(checkpoint: str | Path, out: str | Path, base: str | Path) -> Path:
    from transformers import AutoProcessor

    checkpoint, out = Path(checkpoint), Path(out)
    adapter = check_adapter_dir(checkpoint / "adapter" if (checkpoint / "adapter").is_dir() else checkpoint)
    verify_part(adapter)  # as evaluation does: an adapter that fails its checkpoint's manifest is refused
    config = json.loads((check_model_dir(base) / "config.json").read_text(encoding="utf-8"))  # local only
    claim_folder(out, "MGPO_MERGED.json", "mgpo.tools.merge")  # never writes over a folder it did not make
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    model = load_model(ModelConfig(path=str(base), dtype=dtype if dtype in DTYPES else "float32"), adapter=adapter)
    model.save_pretrained(out, safe_serialization=True)
    processor_dir = adapter if (adapter / "processor_config.json").exists() else base
    AutoProcessor.from_pretrained(processor_dir, local_files_only=True).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--base", required=True, help="the local base model folder the adapter was trained on")
    args = parser.parse_args(argv)
    try:
        out = merge(args.checkpoint, args.out, args.base)
    except (FileNotFoundError, CheckpointError, ConfigError) as e:  # a folder that is not there or not usable: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
