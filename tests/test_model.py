"""Broken checkpoint folders fail with the file's name, before transformers reads them."""

import shutil

import pytest

from mgpo.config import ModelConfig
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
