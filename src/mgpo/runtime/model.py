"""Loading the policy and its processor from a local checkpoint folder.

The same code reads the tiny embedded checkpoints and a real Qwen2.5-VL-7B or Qwen3-VL-8B
folder: the class comes from the folder's config.json (``runtime.family``), the weights
through ``from_pretrained``; nothing here names a hub id or downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from .family import family_of, model_class

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"auto" means bf16 on a GPU and fp32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class CheckpointError(RuntimeError):
    """A model or checkpoint folder that cannot be read or trusted, or that does not fit this
    run; the message names the file or the setting."""


def check_model_dir(path: str | Path, weights: bool = False) -> Path:
    """Fail early, naming the file, on a missing or malformed config.json (and, with
    ``weights``, a truncated or malformed ``*.safetensors``) rather than deep inside transformers."""
    import json

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        hint = " (run `make tiny` to build the embedded one)" if "tiny" in path.name else ""
        raise FileNotFoundError(f"no model checkpoint at {path}: not a local folder with a config.json "
                                f"(models are read from local folders only, nothing is downloaded){hint}")
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("expected a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config}: not a valid config.json ({e})") from e
    if weights:
        _check_weights(path)
    return path


def _check_weights(path: Path) -> None:
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) not in the folder: {missing}")
    for file in sorted(path.glob("*.safetensors")):
        _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    """Read the header and check every tensor's bytes are in the file (a cut download fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def load_processor(cfg: ModelConfig):
    """The processor, with the config's pixel budget in force.

    Published Qwen2.5-VL folders carry legacy ``min_pixels: 3136`` / ``max_pixels:
    12845056`` keys that ``Qwen2VLImageProcessor`` applies *after* a ``size=`` argument
    (transformers 5.x): a 3840x2160 image then becomes 10,549 image tokens instead of
    1,280. So the budget is set on the loaded image processor itself (not passed as
    ``min_pixels`` / ``max_pixels``, which the processor would then re-send, deprecated, at
    every call), and checked.
    """
    from transformers import AutoProcessor
    from transformers.image_utils import SizeDict

    path = check_model_dir(cfg.path)
    _check_processor_files(path)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    processor.image_processor.size = SizeDict(shortest_edge=cfg.min_pixels, longest_edge=cfg.max_pixels)
    got = processor.image_processor.size
    if (got["shortest_edge"], got["longest_edge"]) != (cfg.min_pixels, cfg.max_pixels):
        raise RuntimeError(f"{path}: the image processor's pixel budget is {got['shortest_edge']}..."
                           f"{got['longest_edge']}, not the config's {cfg.min_pixels}...{cfg.max_pixels}")
    family = family_of(path)
    ip = processor.image_processor
    if (ip.patch_size, ip.merge_size) != (family.patch, family.merge):
        raise CheckpointError(f"{path}: the image processor cuts {ip.patch_size}-px patches merged {ip.merge_size}x"
                              f"{ip.merge_size}, but a {family.name} model takes {family.patch}-px patches merged "
                              f"{family.merge}x{family.merge}; copy the base model's preprocessor_config.json")
    return processor


def _check_processor_files(path: Path) -> None:
    """Name the tokenizer or image-processor files a model folder lacks, before transformers
    fails on them somewhere deeper (or, for a tokenizer, silently builds a wrong one)."""
    missing = []
    if not ((path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        missing.append("tokenizer.json (or vocab.json with merges.txt)")
    if not (path / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json (or processor_config.json)")
    if missing:
        raise CheckpointError(f"{path}: no tokenizer or image processor to read: missing {', '.join(missing)}; copy "
                              "them from the base model's folder (a published Qwen-VL folder carries them)")


def save_processor(processor, folder: str | Path) -> None:
    """``save_pretrained``, with the pixel budget written under both names (``size`` and
    the legacy ``min_pixels`` / ``max_pixels``), so any reader gets the budget we used."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    size = processor.image_processor.size
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = folder / name
        if not f.exists():
            continue
        cfg = json.loads(f.read_text())
        image = cfg.get("image_processor", cfg)
        image["size"] = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
        image["min_pixels"], image["max_pixels"] = size["shortest_edge"], size["longest_edge"]
        f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check_adapter_dir(path: str | Path) -> Path:
    """A LoRA adapter must be a local folder: a hub-style id would otherwise be fetched."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: not a local LoRA adapter folder (no adapter_config.json there); "
                                "adapters are read from local folders only, nothing is downloaded")
    return folder


def quiet_progress_bars() -> None:
    """Off a terminal, transformers' loading and saving progress bars are only noise in a log."""
    import sys

    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", path: str | Path | None = None,
               adapter: str | Path | None = None):
    """The policy (or a reference copy) in eval mode, weights from safetensors. With
    ``adapter`` (a local LoRA folder) the adapter is merged into the weights: the one place
    a LoRA checkpoint becomes a plain model (evaluation, ``mgpo.tools.merge``)."""
    adapter = check_adapter_dir(adapter) if adapter is not None else None  # before the slow load
    path = check_model_dir(path or cfg.path, weights=True)
    family = family_of(path)  # an unsupported model type is refused here, before the slow load
    quiet_progress_bars()
    model = model_class(family).from_pretrained(
        path,
        dtype=resolve_dtype(cfg.dtype, device),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        local_files_only=True,
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(device).eval()
