"""Hostile inputs: every case is built by the test (no committed files), one parametrized
case per way in, so that the next pass starts from them.

Each case says what must happen: a clear message naming the file, record, field or folder,
nothing lost, no code run from a checkpoint, no silent misread.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from mgpo.data.records import normalize_letter
from mgpo.data.samples import load_samples
from mgpo.runtime.checkpoint import check_pickles, resolve_resume, write_manifest
from mgpo.runtime.model import CheckpointError


def _png(path, size=(64, 48), color=(200, 20, 20)):
    Image.new("RGB", size, color).save(path)
    return path


def _rec(i, image, **kw):
    return {"id": f"r{i}", "image": image, "question": "What colour?", "options": ["red", "blue"], "answer": "A",
            **kw}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- records

@pytest.mark.parametrize("change, reason", [
    ({"width": "big", "height": 48}, "width must be a whole number of pixels, got a string"),
    ({"width": 64, "height": [1]}, "height must be a whole number of pixels, got a list"),
    ({"width": -3, "height": 48}, "width must be a whole number of pixels"),
    ({"width": 1.5, "height": 48}, "width must be a whole number of pixels"),
    ({"width": float("nan"), "height": 48}, "width must be a whole number of pixels"),
    ({"width": True, "height": 48}, "width must be a whole number of pixels"),
    ({"width": 64}, "width and height go together"),
    ({"options": ["", ""]}, "options[0] is empty"),
    ({"options": ["red", "  "]}, "options[1] is empty"),
    ({"options": ["red", "red"]}, "options[1] 'red' repeats an earlier option"),
    ({"options": ["red", "blue", " red "]}, "options[2] ' red ' repeats an earlier option"),
    ({"answer": "a red square"}, "answer 'a red square' is not one of the 2 options"),
    ({"answer": "red"}, "answer 'red' is not one of the 2 options"),
    ({"answer": "B is right"}, "answer 'B is right' is not one of the 2 options"),
])
def test_bad_record_fields_are_skipped_with_their_reason(tmp_path, change, reason):
    good = _png(tmp_path / "g.png")
    ds = load_samples(_jsonl(tmp_path / "d.jsonl", [_rec(0, str(good)), _rec(1, str(good), **change)]))
    assert [s.id for s in ds] == ["r0"]
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == "r1" and reason in ds.skipped[0][1], ds.skipped


def test_a_stated_image_size_is_used(tmp_path):
    good = _png(tmp_path / "g.png")
    ds = load_samples(_jsonl(tmp_path / "d.jsonl", [_rec(0, str(good), width=640, height=480.0)]))
    assert (ds[0].width, ds[0].height) == (640, 480)


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("b", "B"), ("(c)", "C"), ("( D )", "D"), ("（B）", "B"), ("A.", "A"), ("A)", "A"), ("A:", "A"),
    ("B. red", "B"), ("D) x", "D"), (" C ", "C"),
    ("a red square", None), ("A red", None), ("red", None), ("", None), ("AB", None), ("(A", None),
])
def test_only_letter_forms_are_answers(text, letter):
    assert normalize_letter(text) == letter


@pytest.mark.parametrize("kind", ["question record in a chat file", "chat record in a question file"])
def test_a_mixed_file_reads_images_beside_the_file_not_the_working_directory(tmp_path, monkeypatch, kind):
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    data.mkdir(), cwd.mkdir()
    _png(data / "x.png", (64, 48))
    _png(cwd / "x.png", (99, 77))  # a same-named file where the process runs: must not be read
    monkeypatch.chdir(cwd)
    chat = {"id": "c", "messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}, "Q?"]},
                                    {"role": "assistant", "content": "A"}]}
    question = _rec(0, "x.png")
    records = [chat, question] if kind.startswith("question") else [question, chat]
    ds = load_samples(_jsonl(data / "d.jsonl", records))
    assert len(ds) == 2, ds.skipped
    for s in ds:
        assert s.image == str(data / "x.png") and (s.width, s.height) == (64, 48)
        assert all(v == str(data / "x.png") for _, parts in s.messages for k, v in parts if k == "image")


HR_HEADER = "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage"


def _b64_png():
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_tsv_cell_that_opens_a_quote_swallows_no_row(tmp_path):
    rows = [f'{i}\t{chr(34) + "Sign" if i == 1 else "Q?"}\tA\tsingle\ta\tb\tc\td\tcycle1\t{_b64_png()}'
            for i in range(12)]
    (tmp_path / "hr_bench_4k.tsv").write_text(HR_HEADER + "\n" + "\n".join(rows) + "\n")
    ds = load_samples(tmp_path / "hr_bench_4k.tsv")
    assert len(ds) == 12 and not ds.skipped, ds.skipped
    assert ds[1].question == '"Sign' and ds[5].load_image().size == (80, 60)


@pytest.mark.parametrize("content", [
    json.dumps([{"index": 1, "question": "Q?", "answer": "A"}]),
    json.dumps([{"index": 1, "question": "Q?", "answer": "A"}], indent=1),
    "just some text\nand more\n",
])
def test_a_file_named_tsv_that_is_not_one_says_so(tmp_path, content):
    (tmp_path / "hr_bench_4k.tsv").write_text(content)
    ds = load_samples(tmp_path / "hr_bench_4k.tsv")
    assert len(ds) == 0 and len(ds.skipped) == 1, ds.skipped
    assert ds.skipped[0][0] == "hr_bench_4k.tsv" and "not an HR-Bench TSV" in ds.skipped[0][1]
    if content.startswith("["):
        assert "reads as JSON" in ds.skipped[0][1]


# ----------------------------------------------------------------------------- checkpoints

class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: what a crafted checkpoint file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _ckpt_dir(out, step):
    return out / f"checkpoint-{step}"


def _deepspeed_like_checkpoint(out, step, model_states):
    """A checkpoint laid out as a ZeRO run writes it, with a manifest that matches its files."""
    folder = _ckpt_dir(out, step)
    (folder / "deepspeed" / "state").mkdir(parents=True)
    (folder / "rng").mkdir()
    torch.save(model_states, folder / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"scheduler": {"last_epoch": step}}, folder / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, folder / "rng" / "rank0.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(folder, {})
    return folder


def test_a_crafted_pickle_in_a_deepspeed_checkpoint_is_refused_unrun(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    good = _deepspeed_like_checkpoint(tmp_path / "run", 1, {"module": {"w": torch.ones(2)}})
    bad = _deepspeed_like_checkpoint(tmp_path / "run", 2, {"module": {"w": torch.ones(2)}, "x": _Payload(marker)})
    crafted = bad / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_model_states.pt is refused"):
        resolve_resume(str(bad), tmp_path / "run")  # the manifest matches: only the pickle check stops it
    with pytest.raises(CheckpointError, match="unpickling it calls"):
        check_pickles(bad / "deepspeed")
    assert resolve_resume("auto", tmp_path / "run") == good  # auto falls back to the one that passes
    assert not marker.exists() and crafted.exists()


def test_deepspeed_classes_in_a_real_zero_checkpoint_are_allowed(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = _deepspeed_like_checkpoint(tmp_path / "run", 1, {"module": {"w": torch.ones(2)}})
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "ds_version": "0.19",
                "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(2)}}}},
               folder / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write_manifest(folder, {})
    check_pickles(folder)
    assert resolve_resume(str(folder), tmp_path / "run") == folder


# ----------------------------------------------------------------------------- config values

@pytest.mark.parametrize("overrides, message", [
    (["train.lr=.inf"], "train.lr must be > 0, got inf (not a finite number)"),
    (["train.lr=.nan"], "train.lr must be > 0, got nan"),
    (["eval.temperature=.nan"], "eval.temperature must be >= 0, got nan"),
    (["rollout.temperature=.inf"], "rollout.temperature must be > 0, got inf"),
    (["train.lora_rank=-1"], "train.lora_rank must be >= 0, got -1"),
    (["train.algorithm=bogus"], "train.algorithm must be one of ['rl', 'sft'], got 'bogus'"),
    (["loss.kl_clamp=-1"], "loss.kl_clamp must be > 0, got -1"),
    (["loss.kl_clamp=0"], "loss.kl_clamp must be > 0, got 0"),
    (["train.lora_rank=8", "train.lora_alpha=0"], "train.lora_alpha must be > 0 with LoRA"),
    (["train.lora_rank=8", "train.lora_target_modules=[]"], "train.lora_target_modules must name at least one"),
    (["rollout.max_box_aspect=0"], "rollout.max_box_aspect must be > 1, got 0"),
    (["rollout.max_box_aspect=1"], "rollout.max_box_aspect must be > 1, got 1"),
    (["model.min_pixels=1", "model.max_pixels=1"], "model.min_pixels must be >= 784, got 1"),
    (["model.min_pixels=1", "model.max_pixels=1"], "model.max_pixels must be >= 784, got 1"),
    (["loss.adv_eps=0"], "loss.adv_eps must be > 0, got 0"),
    (["loss.adv_eps=.inf"], "loss.adv_eps must be > 0, got inf"),
    (["loss.kl_coef=.inf"], "loss.kl_coef must be >= 0, got inf"),
    (["loss.entropy_coef=.nan"], "loss.entropy_coef must be >= 0, got nan"),
    (["loss.clip_eps=.nan"], "loss.clip_eps must be > 0, got nan"),
    (["rollout.min_box_side=-1"], "rollout.min_box_side must be >= 0, got -1"),
    (["rollout.format_reward=.nan"], "rollout.format_reward must be a finite number, got nan"),
    (["rollout.generation_batch_size=-1"], "rollout.generation_batch_size must be >= 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay must be >= 0, got -0.1"),
    (["train.betas=[1.0, 0.999]"], "train.betas[0] must be in [0, 1), got 1.0"),
    (["train.betas=[0.9, -1]"], "train.betas[1] must be in [0, 1), got -1"),
    (["train.grad_clip=.inf"], "train.grad_clip must be > 0, got inf"),
    (["train.seed=-1"], "train.seed must be >= 0, got -1"),
    (["train.max_bad_steps=0"], "train.max_bad_steps must be >= 1, got 0"),
    (["train.ppo_epochs=0"], "train.ppo_epochs must be >= 1, got 0"),
    (["eval.report_examples=-1"], "eval.report_examples must be >= 0, got -1"),
    (["model.attn_implementation=flash"], "model.attn_implementation must be one of ['sdpa', 'eager', 'flash_att"),
    (['model.path=""'], "model.path must not be empty"),
    (['train.resume=" "'], "train.resume must not be empty"),
    (['train.output_dir=""'], "train.output_dir must not be empty"),
])
def test_bad_config_values_are_refused_at_load_naming_the_field(overrides, message):
    from mgpo.config import ConfigError, load_config

    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides)
    assert message in str(refused.value), str(refused.value)


def test_every_config_field_has_a_range_or_a_set_of_choices():
    """A new numeric or choice field cannot be added without its check."""
    import dataclasses

    from mgpo import config
    from mgpo.config import Config

    free_text = {"data.train", "data.eval", "data.image_root", "model.path", "train.output_dir", "train.resume",
                 "eval.adapter", "eval.output_dir", "eval.datasets", "train.lora_target_modules", "train.sft_templates",
                 "train.sft_max_turns", "train.betas", "train.lora_alpha"}  # (the last four: checked by hand)
    unchecked = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(config, section.type)):
            name = f"{section.name}.{f.name}"
            if f.type in (bool, "bool") or name in free_text:
                continue
            if name not in config.RANGES and name not in config.CHOICES:
                unchecked.append(name)
    assert not unchecked, f"fields without a range or a set of choices: {unchecked}"


# ----------------------------------------------------------------------------- lengths

def _chat_file(folder, long_chars):
    _png(folder / "a.png", (300, 200))
    _png(folder / "b.png", (120, 160))
    user = {"role": "user", "content": [{"type": "image", "image": "a.png"}, "What colour?"]}
    rows = [{"id": "ok", "messages": [user, {"role": "assistant", "content": "Red."},
                                      {"role": "user", "content": [{"type": "image", "image": "b.png"}, "And?"]},
                                      {"role": "assistant", "content": "Blue."}]},
            {"id": "long", "messages": [user, {"role": "assistant", "content": "word " * (long_chars // 5)}]}]
    return _jsonl(folder / "chat.jsonl", rows)


def test_a_chat_record_over_the_token_limit_is_skipped_at_load(tmp_path, tiny_dir):
    from mgpo.config import load_config
    from mgpo.core.setup import load_training_data
    from mgpo.runtime.model import load_processor

    path = _chat_file(tmp_path, 200_000)
    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={path}", "train.algorithm=sft"])
    data = load_training_data(cfg, load_processor(cfg.model))
    assert [s.id for s in data] == ["ok"]
    assert data.skipped[0][0] == "long" and "over data.max_prompt_tokens (8192)" in data.skipped[0][1]
    assert data.skipped[0][1].startswith("conversation has")


def test_a_chat_record_is_counted_as_chat_forced_encodes_it(tmp_path, tiny_dir):
    from mgpo.config import ModelConfig
    from mgpo.core.forced import chat_forced, chat_tokens
    from mgpo.runtime.model import load_processor

    low, high = 16 * 28 * 28, 64 * 28 * 28
    processor = load_processor(ModelConfig(path=str(tiny_dir), min_pixels=low, max_pixels=high))
    sample = load_samples(_chat_file(tmp_path, 100))[0]
    encoded = chat_forced(processor, [sample], min_pixels=low, max_pixels=high)
    assert chat_tokens(processor, sample, min_pixels=low, max_pixels=high) == encoded.input_ids.shape[1]


def test_a_large_k_is_capped_by_default(tiny_dir, synth_dir):
    """rollout.max_image_tokens=0 with max_turns=6: a model that zooms every turn stops being
    shown crops once the next would pass four full-budget images' worth of tokens."""
    from helpers import ScriptedModel

    from mgpo.config import ModelConfig, RolloutConfig
    from mgpo.core.rollout import rollout
    from mgpo.core.zoom import image_token_cap
    from mgpo.runtime.model import load_model, load_processor

    budget = 64 * 28 * 28  # every image (original, crops) resized to about 64 tokens
    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=budget, max_pixels=budget, dtype="float32")
    model, processor = load_model(mcfg), load_processor(mcfg)
    cfg = RolloutConfig(template="mgpo_k", max_turns=6, group_size=2, max_new_tokens_turn1=40,
                        max_new_tokens_turn2=40)
    assert image_token_cap(cfg, budget) == 4 * 64
    zoom = '```json\n[{"bbox_2d": [10, 10, 150, 120]}]\n```'
    scripted = ScriptedModel(model, processor.tokenizer, [zoom] * 6)
    r = rollout(scripted, processor, list(load_samples(synth_dir / "train.jsonl"))[:1], cfg, min_pixels=budget,
                max_pixels=budget, greedy=True)
    for i, t in enumerate(r.trajectories):
        assert [rec.action for rec in t.turn_log[:-1]] == ["zoom"] * (len(t.turn_log) - 1)
        assert t.turn_log[-2].capped and len(t.turn_log) < 6  # the model kept zooming; the cap ended it
        assert sum(int(r.images[k].grid.prod()) // 4 for k in r.image_index[i]) <= 4 * 64


# ----------------------------------------------------------------------------- evaluation protocol

@pytest.mark.parametrize("change, key", [
    ("model.dtype=bfloat16", "dtype"),
    ("model.attn_implementation=eager", "attention"),
    ("data.max_prompt_tokens=100", "max_prompt_tokens"),
    ("rollout.top_k=5", "decoding"),
    ("rollout.top_p=0.5", "decoding"),
    ("rollout.max_image_tokens=100", "max_image_tokens"),
])
def test_every_field_that_changes_a_prediction_is_in_the_protocol(change, key):
    from mgpo.config import load_config
    from mgpo.eval.protocol import protocol

    base = ["eval.temperature=1.0", "eval.mode=mgpo_k", "eval.max_turns=3"]  # (sampling: top_k / top_p count)
    a, b = protocol(load_config(None, base)), protocol(load_config(None, [*base, change]))
    assert a[key] != b[key] and {k for k in a if a[k] != b[k]} == {key}


def _model_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_in_place(path):
    """Change bytes in the middle of a file, keeping its size and modification time."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_weights_replaced_in_place_are_a_new_model(tiny_dir, tmp_path):
    from mgpo.config import load_config
    from mgpo.eval.protocol import run_protocol

    model = _model_copy(tiny_dir, tmp_path / "model")
    cfg = load_config(None, [f"model.path={model}"])
    before = run_protocol(cfg, {})["model_files"]
    _rewrite_in_place(model / "model-00001-of-00002.safetensors")
    assert run_protocol(cfg, {})["model_files"] != before


def test_a_checkpoint_model_is_identified_by_its_manifest_and_verified(tiny_dir, tmp_path, caplog):
    from mgpo.eval.evaluate import newest_run_model
    from mgpo.eval.protocol import weights_identity

    run = tmp_path / "run"
    for step in (1, 2):
        _model_copy(tiny_dir, _ckpt_dir(run, step) / "model")
        write_manifest(_ckpt_dir(run, step), {})
    plain = weights_identity(_model_copy(tiny_dir, tmp_path / "plain"))
    assert weights_identity(_ckpt_dir(run, 2) / "model") == plain  # the same files, however found
    assert newest_run_model(str(run)) == str(_ckpt_dir(run, 2) / "model")
    _rewrite_in_place(_ckpt_dir(run, 2) / "model" / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors does not match its SHA-256"):
        weights_identity(_ckpt_dir(run, 2) / "model")
    with caplog.at_level("WARNING"):
        assert newest_run_model(str(run)) == str(_ckpt_dir(run, 1) / "model")
    assert "not evaluating" in caplog.text and "model-00002-of-00002.safetensors" in caplog.text
    _rewrite_in_place(_ckpt_dir(run, 1) / "model" / "config.json")
    with pytest.raises(CheckpointError, match="no checkpoint of .* passes its manifest"):
        newest_run_model(str(run))


# ----------------------------------------------------------------------------- run folders

def _start(out, *overrides):
    from mgpo.config import load_config
    from mgpo.runtime.run_folder import start_run

    run = start_run(load_config(None, [f"train.output_dir={out}", *overrides]))
    run.lock.close()
    return run


def test_checkpoint_folders_without_complete_are_not_started_over(tmp_path):
    for step in (2, 4):
        _deepspeed_like_checkpoint(tmp_path, step, {"module": {}})
        (_ckpt_dir(tmp_path, step) / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="without a COMPLETE marker \\(checkpoint-2, checkpoint-4\\)"):
        _start(tmp_path)  # resume=auto
    assert _ckpt_dir(tmp_path, 4).is_dir() and not (tmp_path / "config.yaml").exists()


def test_an_unmarked_newer_folder_is_named_when_an_older_checkpoint_resumes(tmp_path, caplog):
    good = _deepspeed_like_checkpoint(tmp_path, 2, {"module": {}})
    _ckpt_dir(tmp_path, 4).mkdir()
    with caplog.at_level("WARNING"):
        assert resolve_resume("auto", tmp_path) == good
    assert "ignoring checkpoint-4" in caplog.text and "no COMPLETE marker" in caplog.text


def test_swapped_step_folders_are_refused(tmp_path):
    for step in (2, 4):
        _deepspeed_like_checkpoint(tmp_path, step, {"module": {}})
    _ckpt_dir(tmp_path, 2).rename(tmp_path / "swap")
    _ckpt_dir(tmp_path, 4).rename(_ckpt_dir(tmp_path, 2))
    (tmp_path / "swap").rename(_ckpt_dir(tmp_path, 4))
    with pytest.raises(CheckpointError) as refused:
        resolve_resume("auto", tmp_path)
    assert "holds step 2, not the step its folder is named for (4)" in str(refused.value)
    assert "holds step 4, not the step its folder is named for (2)" in str(refused.value)
    with pytest.raises(CheckpointError, match="renamed or swapped"):
        resolve_resume(str(_ckpt_dir(tmp_path, 4)), tmp_path)


def test_overwrite_with_resume_auto_over_checkpoints_is_refused(tmp_path):
    from mgpo.runtime.run_folder import RunFolderError

    _deepspeed_like_checkpoint(tmp_path, 2, {"module": {}})
    with pytest.raises(RunFolderError, match="train.overwrite=true with train.resume=auto.*train.resume=none"):
        _start(tmp_path, "train.overwrite=true")
    assert _ckpt_dir(tmp_path, 2).is_dir()
    assert _start(tmp_path / "fresh", "train.overwrite=true").resume_from is None  # nothing to discard: fine


def test_a_lock_that_is_a_folder_says_so(tmp_path):
    from mgpo.runtime.run_folder import RunFolderError

    (tmp_path / ".lock").mkdir()
    with pytest.raises(RunFolderError, match="cannot use .*\\.lock as the run folder's lock \\(Is a directory\\)"):
        _start(tmp_path)


def test_a_rank_without_rng_state_in_the_checkpoint_is_named(tmp_path, monkeypatch, caplog):
    """A 1-process checkpoint resumed on 2 ranks: rank 1 finds no RNG state and says so."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mgpo.runtime import distributed as D
    from mgpo.runtime.checkpoint import load_training_state

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    folder = _ckpt_dir(tmp_path, 3)
    (folder / "rng").mkdir(parents=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, folder / "rng" / "rank0.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "epoch": 0, "batch": 3, "log_history": []}))
    monkeypatch.setattr(D, "rank", lambda: 1)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    with caplog.at_level("WARNING"):
        state = load_training_state(accelerator, None, optimizer, scheduler, folder)
    assert state == {"step": 3, "epoch": 0, "batch": 3}
    assert "rank 1" in caplog.text and "no RNG state for this rank" in caplog.text and "resumed on 2" in caplog.text


# ----------------------------------------------------------------------------- faults

_SAVE_UNDER_A_SIZE_LIMIT = r"""
import resource, signal, sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from mgpo.runtime.checkpoint import save_checkpoint

out, big = Path(sys.argv[1]), sys.argv[2]


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(8))

    def save_pretrained(self, folder, state_dict, safe_serialization):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "model.safetensors"))


policy = Policy()
wrapped = SimpleNamespace(policy=policy)
weights = {"policy.w": policy.w.detach()}
accelerator = SimpleNamespace(distributed_type=DistributedType.NO, get_state_dict=lambda w: weights,
                              unwrap_model=lambda w: w)
processor = SimpleNamespace(save_pretrained=lambda folder: None,
                            image_processor=SimpleNamespace(size={"shortest_edge": 1, "longest_edge": 2}))
optimizer = torch.optim.AdamW(policy.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
save = lambda step: save_checkpoint(accelerator, wrapped, optimizer, scheduler, processor, out, step,
                                    {"step": step, "epoch": 0, "batch": step}, keep_last=2, lora=False)
save(1)
# what step 2 writes grows past a 64 KiB file-size limit: the weights, or the optimizer state
if big == "weights":
    weights = {"policy.w": torch.zeros(100_000)}
else:
    optimizer.state[policy.w] = {"exp_avg": torch.zeros(100_000), "exp_avg_sq": torch.zeros(100_000),
                                 "step": torch.tensor(1.0)}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of the process dying
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
save(2)
"""


@pytest.mark.parametrize("big", ["weights", "optimizer"])
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, big):
    import subprocess
    import sys

    from mgpo.runtime.checkpoint import list_checkpoints, verify_checkpoint

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _SAVE_UNDER_A_SIZE_LIMIT, str(out), big], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("mgpo.runtime.model.CheckpointError: no space left on device "
                                                    f"while writing {out / 'checkpoint-2.tmp'}"), proc.stderr[-2000:]
    assert f"the previous checkpoint ({out / 'checkpoint-1'}) is untouched" in last
    assert list_checkpoints(out) == [out / "checkpoint-1"] and not (out / "checkpoint-2.tmp").exists()
    verify_checkpoint(out / "checkpoint-1")


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
    assert f"no Qwen2.5-VL checkpoint at {base}: not a local folder" in err and "nothing is downloaded" in err
    assert not (tmp_path / "merged").exists()


def test_merge_requires_a_lora_checkpoint(tmp_path, capsys):
    from mgpo.tools.merge import main

    (tmp_path / "checkpoint-1" / "model").mkdir(parents=True)  # a full-weights checkpoint: nothing to merge
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "checkpoint-1"), str(tmp_path / "merged"), "--base", str(tmp_path)])
    assert stopped.value.code == 2 and "not a local LoRA adapter folder" in capsys.readouterr().err


@pytest.mark.parametrize("make, reason", [
    (lambda d: None, "no such folder"),
    (lambda d: d.mkdir(), "no metrics.json"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text("{not json")), "not a readable JSON file"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text(json.dumps({"protocol": {}}))), "holds no results"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text(json.dumps({"protocol": {}, "results": {"x": {}}}))),
     "holds no results"),
    (lambda d: (d.mkdir(), (d / "metrics.json").write_text("[]")), "holds no results"),
])
def test_compare_on_a_folder_that_is_no_evaluation_says_why(tmp_path, make, reason):
    from mgpo.eval.report import CompareError, compare

    make(tmp_path / "run")
    with pytest.raises(CompareError, match=reason) as refused:
        compare([tmp_path / "run"])
    assert str(tmp_path / "run") in str(refused.value)


def test_eval_py_compare_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "eval.py"), "compare", str(tmp_path / "gone")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: CompareError: {tmp_path / 'gone'}: no such folder "
                                                "(pass the eval.output_dir of an evaluation)"]
