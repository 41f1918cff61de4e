"""Loading the policy and its processor from a local Qwen2.5-VL directory.

The same code reads the tiny embedded checkpoint and a real Qwen2.5-VL-7B folder: both
go through ``from_pretrained``; nothing here names a hub id or downloads anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"auto" means bf16 on a GPU and fp32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        hint = " (run `make tiny` to build the embedded one)" if "tiny" in path.name else ""
        raise FileNotFoundError(f"no Qwen2.5-VL checkpoint at {path}: not a local folder with a config.json "
                                f"(models are read from local folders only, nothing is downloaded){hint}")
    return path


def load_processor(cfg: ModelConfig):
    from transformers import AutoProcessor

    path = check_model_dir(cfg.path)
    size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    return AutoProcessor.from_pretrained(path, size=size, trust_remote_code=cfg.trust_remote_code,
                                         local_files_only=True)


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", path: str | Path | None = None):
    """The policy (or a reference copy) in eval mode, weights from safetensors."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = check_model_dir(path or cfg.path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path,
        dtype=resolve_dtype(cfg.dtype, device),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        local_files_only=True,
    )
    return model.to(device).eval()
