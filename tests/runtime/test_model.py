"""Broken checkpoint folders fail with the file's name, before transformers reads them."""

import json
import shutil

import pytest
from PIL import Image

from mgpo.config import ModelConfig
from mgpo.data.samples import load_samples
from mgpo.runtime.model import CheckpointError, load_model, load_processor


@pytest.fixture
def copy_of_tiny(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


def _weights(folder):
    """The (last) weights file: model.safetensors, or a shard when the folder is sharded."""
    return sorted(folder.glob("*.safetensors"))[-1]


def test_truncated_safetensors_names_the_file(copy_of_tiny):
    weights = _weights(copy_of_tiny)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{weights.name}: not a readable safetensors file"):
        load_model(ModelConfig(path=str(copy_of_tiny)))


def test_malformed_safetensors_header_names_the_file(copy_of_tiny):
    weights = _weights(copy_of_tiny)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=weights.name):
        load_model(ModelConfig(path=str(copy_of_tiny)))


def test_malformed_index_names_the_file(copy_of_tiny):
    index = copy_of_tiny / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-00009-of-00009.safetensors"}}')
    with pytest.raises(CheckpointError, match="index.json: lists shard"):
        load_model(ModelConfig(path=str(copy_of_tiny)))
    index.write_text("{cut")
    with pytest.raises(CheckpointError, match="index.json: not a valid safetensors index"):
        load_model(ModelConfig(path=str(copy_of_tiny)))


@pytest.mark.parametrize("text", ["{\"model_type\": \"qwen2_5_vl\",", "[1, 2]"])
def test_invalid_config_json_names_the_file(copy_of_tiny, text):
    (copy_of_tiny / "config.json").write_text(text)
    for load in (lambda c: load_model(c), load_processor):
        with pytest.raises(CheckpointError, match=r"config\.json: not a valid config\.json"):
            load(ModelConfig(path=str(copy_of_tiny)))


MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


@pytest.fixture(scope="module")
def env(tiny_dir, synth_dir):
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return load_model(mcfg), load_processor(mcfg), list(load_samples(synth_dir / "train.jsonl")), mcfg


def test_published_pixel_keys_do_not_override_the_budget(env, tmp_path):
    """Bug 1: a 3840x2160 image became 10,549 image tokens instead of at most 256."""
    from mgpo.runtime.model import save_processor

    _, processor, _, mcfg = env
    grid = processor.image_processor(images=[Image.new("RGB", (3840, 2160))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 4 <= MAX_PX // (28 * 28)
    # What we save is unambiguous: any reader (legacy keys or size) gets the same budget.
    save_processor(processor, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())["image_processor"]
    assert (saved["min_pixels"], saved["max_pixels"]) == (MIN_PX, MAX_PX)
    assert saved["size"] == {"shortest_edge": MIN_PX, "longest_edge": MAX_PX}
    from transformers import AutoProcessor

    plain = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert plain.image_processor.size["longest_edge"] == MAX_PX


def test_a_model_folder_without_tokenizer_files_is_named_at_load(copy_of_tiny):
    from mgpo.config import ModelConfig
    from mgpo.runtime.model import load_processor

    for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json"):
        (copy_of_tiny / name).unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json \\(or vocab.json with merges.txt\\), "
                                              "tokenizer_config.json"):
        load_processor(ModelConfig(path=str(copy_of_tiny)))
