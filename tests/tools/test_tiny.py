"""The embedded checkpoint loads through the same from_pretrained path as a real one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mgpo.tools.tiny import SPECIAL_TOKENS, build_tiny_checkpoint


def _load(path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    return (Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval(),
            AutoProcessor.from_pretrained(path))


def test_round_trip_weights_and_processor(tiny_dir, tmp_path):
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    model, processor = _load(tiny_dir)
    # The same seed and config, built in memory, equals what from_pretrained read back.
    torch.manual_seed(0)
    fresh = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(tiny_dir))
    loaded = model.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    # Save what we loaded and load it again: nothing changes.
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    model2, processor2 = _load(tmp_path / "again")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor2.image_processor.to_dict() == processor.image_processor.to_dict()
    assert processor2.chat_template == processor.chat_template


def _weights(folder):
    """Every tensor of a (sharded) safetensors checkpoint."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_same_seed_same_weights(tiny_dir, tmp_path):
    other = build_tiny_checkpoint(tmp_path / "b", seed=0)
    a, b = _weights(tiny_dir), _weights(other)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    different = _weights(build_tiny_checkpoint(tmp_path / "c", seed=1))
    assert not all(torch.equal(a[k], different[k]) for k in a)


def test_special_tokens_and_config_ids_agree(tiny_dir):
    model, processor = _load(tiny_dir)
    tok = processor.tokenizer
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, f"{t} must be one token, got {ids}"
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size >= len(tok)
    assert tok.eos_token == "<|im_end|>"
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size


def test_chat_template_renders_qwen_format(tiny_dir):
    _, processor = _load(tiny_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_small_on_disk(tiny_dir):
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert size < 20e6


def test_tiny_folder_is_laid_out_like_a_published_one(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "chat_template.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
            "model.safetensors.index.json"} <= names
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056) and "size" not in pre
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (gen["repetition_penalty"], gen["top_k"], gen["top_p"]) == (1.05, 1, 0.001)


def test_a_folder_the_tool_did_not_build_is_never_replaced(tmp_path, monkeypatch):
    """`tiny OUT` deleted OUT whatever it held (a user's folder was wiped; `tiny ..` from a
    subfolder emptied the parent). Only a previous build (it holds MGPO_TINY.json) is replaced."""
    import subprocess
    import sys

    from mgpo.config import ConfigError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="is not empty and is not a tiny checkpoint this tool built"):
        build_tiny_checkpoint(mine)
    assert (mine / "thesis.tex").read_text() == "years of work"
    sub = tmp_path / "sub"
    sub.mkdir()
    proc = subprocess.run([sys.executable, "-m", "mgpo.tools.tiny", ".."], cwd=sub, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "not the working folder or one above it" in proc.stderr
    assert (mine / "thesis.tex").exists() and sub.is_dir()
    built = build_tiny_checkpoint(tmp_path / "tiny", hidden_size=32, vocab_size=512)
    assert (built / "MGPO_TINY.json").is_file()
    build_tiny_checkpoint(built, hidden_size=32, vocab_size=512)  # its own earlier build: replaced


def test_a_qwen3_vl_build_is_laid_out_like_the_published_one(tmp_path, capsys):
    """``--arch qwen3-vl``: the Qwen3-VL class and config, its published image-processor file (patch
    16, ``size`` keys) and sampling (top_k 20, top_p 0.8, temperature 0.7), a chat template without a
    default system prompt, and a special-token layout the model and processor agree on."""
    from mgpo.tools.tiny import main

    main([str(tmp_path / "q3"), "--arch", "qwen3-vl"])
    assert "tiny qwen3-vl" in capsys.readouterr().out
    folder = tmp_path / "q3"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["vision_config"]["patch_size"] == 16 and config["vision_config"]["deepstack_visual_indexes"]
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["patch_size"] == 16 and pre["size"] == {"longest_edge": 16777216, "shortest_edge": 65536}
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["top_k"], gen["top_p"], gen["temperature"]) == (20, 0.8, 0.7)
    model, processor = _load(folder)
    assert type(processor).__name__ == "Qwen3VLProcessor" and processor.image_processor.patch_size == 16
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
