"""mgpo.tools.merge: the command refuses what it cannot merge."""

import pytest


@pytest.mark.parametrize("base", ["Qwen/Qwen2.5-VL-7B-Instruct", "missing-folder"])
def test_merge_requires_a_local_base_folder(tmp_path, capsys, base):
    from mgpo.tools.merge import main

    adapter = tmp_path / "checkpoint-1" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "checkpoint-1"), str(tmp_path / "merged"), "--base", base])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1
    assert f"no model checkpoint at {base}: not a local folder" in err and "nothing is downloaded" in err
    assert not (tmp_path / "merged").exists()


def test_merge_requires_a_lora_checkpoint(tmp_path, capsys):
    from mgpo.tools.merge import main

    (tmp_path / "checkpoint-1" / "model").mkdir(parents=True)  # a full-weights checkpoint: nothing to merge
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "checkpoint-1"), str(tmp_path / "merged"), "--base", str(tmp_path)])
    assert stopped.value.code == 2 and "not a local LoRA adapter folder" in capsys.readouterr().err


def test_merge_refuses_an_adapter_that_fails_its_checkpoint_manifest(tmp_path, capsys):
    """Evaluation refused such an adapter while merge wrote a model from it (exit 0): one check for both."""
    import json

    from mgpo.runtime.checkpoint import write_manifest
    from mgpo.tools.merge import main

    ckpt = tmp_path / "checkpoint-1"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    write_manifest(ckpt, {})
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"swapped")
    with pytest.raises(SystemExit) as stopped:
        main([str(ckpt), str(tmp_path / "merged"), "--base", str(tmp_path / "base")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "adapter_model.safetensors does not match its SHA-256" in err
    assert not (tmp_path / "merged").exists()
