"""Merge a LoRA checkpoint into its base model and write a full Hugging Face folder.

    python -m mgpo.merge runs/x/checkpoints/step-000100 merged/ --base /models/Qwen2.5-VL-7B-Instruct

The result loads with ``from_pretrained`` (and serving engines) like any Qwen2.5-VL.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def merge(checkpoint: str | Path, out: str | Path, base: str | Path) -> Path:
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    checkpoint, out = Path(checkpoint), Path(out)
    adapter = checkpoint / "adapter" if (checkpoint / "adapter").is_dir() else checkpoint
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter in {checkpoint} (expected adapter/adapter_config.json)")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, local_files_only=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoProcessor.from_pretrained(adapter if (adapter / "processor_config.json").exists() else base).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--base", required=True, help="the base model directory the adapter was trained on")
    args = parser.parse_args(argv)
    print(f"merged model written to {merge(args.checkpoint, args.out, args.base)}")


if __name__ == "__main__":
    main()
