"""Evaluation never silently reuses old results: stored protocol, torn lines, unique dataset names."""

import json
import os
import shutil
from pathlib import Path

import pytest

import mgpo.eval.evaluate as ev
from mgpo.config import load_config
from mgpo.runtime.checkpoint import write_manifest
from mgpo.runtime.model import CheckpointError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from mgpo.config import ModelConfig
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28)
    return load_model(mcfg), load_processor(mcfg)


@pytest.fixture
def calls(monkeypatch):
    """Counts the rollout batches an evaluation generates."""
    real, seen = ev.rollout, []

    def counting(model, processor, samples, cfg, **kw):
        seen.append([s.id for s in samples])
        return real(model, processor, samples, cfg, **kw)
    monkeypatch.setattr(ev, "rollout", counting)
    return seen


def _cfg(model_dir, out, data, *extra):
    data = data if isinstance(data, list) else [data]
    return load_config(ROOT / "configs/tiny_cpu.yaml", [
        f"model.path={model_dir}", f"eval.output_dir={out}", "eval.mode=direct", "rollout.max_new_tokens_turn2=6",
        "rollout.max_new_tokens_turn1=6", "eval.batch_size=4", "data.max_samples=8",
        f"eval.datasets=[{','.join(str(d) for d in data)}]", *extra])


def _predictions(out):
    return [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]


def test_rerun_under_another_protocol_is_refused_naming_what_differs(tiny_dir, synth_dir, tmp_path, loaded,
                                                                      calls):
    model, processor = loaded
    data, out = synth_dir / "train.jsonl", tmp_path / "eval"
    ev.evaluate(_cfg(tiny_dir, out, data), model, processor)
    assert len(calls) == 2
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_dir, other_model)
    for change, key in [("eval.mode=grpo", "mode"), ("model.max_pixels=100352", "max_pixels"),
                        (f"model.path={other_model}", "model"), ("data.max_samples=4", "questions")]:
        with pytest.raises(RuntimeError, match=key):
            ev.evaluate(_cfg(tiny_dir, out, data, change), model, processor)
    assert len(calls) == 2, "a refused rerun generates nothing"
    # The same protocol resumes (nothing left to do); overwrite starts fresh under the new one.
    assert ev.evaluate(_cfg(tiny_dir, out, data), model, processor)["results"]["train"]["questions"] == 8
    assert len(calls) == 2
    result = ev.evaluate(_cfg(tiny_dir, out, data, "eval.mode=grpo", "eval.overwrite=true"), model, processor)
    assert len(calls) == 4 and result["protocol"]["mode"] == "grpo"
    assert len(_predictions(out)) == 8
    stored = json.loads((out / "predictions" / "protocol.json").read_text())
    assert stored["protocol"]["mode"] == "grpo" and stored["sha256"] == result["protocol_sha256"]


def test_torn_last_line_is_redone(tiny_dir, synth_dir, tmp_path, loaded, calls):
    model, processor = loaded
    data, out = synth_dir / "train.jsonl", tmp_path / "eval"
    ev.evaluate(_cfg(tiny_dir, out, data), model, processor)
    rank0 = out / "predictions" / "rank0.jsonl"
    lines = rank0.read_text().splitlines(keepends=True)
    assert len(lines) == 8
    rank0.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # killed writing batch 2's first line
    calls.clear()
    result = ev.evaluate(_cfg(tiny_dir, out, data), model, processor)
    assert len(calls) == 1, "only the torn batch is redone"
    assert result["results"]["train"]["questions"] == 8
    assert sorted(p["id"] for p in _predictions(out)) == sorted(json.loads(x)["id"] for x in lines)


def test_datasets_whose_files_share_a_stem_get_unique_names(synth_dir, tiny_dir, tmp_path, loaded):
    model, processor = loaded
    paths = []
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
        rows = [{**r, "image": str(synth_dir / r["image"])} for r in rows]
        (tmp_path / folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(tmp_path / folder / "test.jsonl")
    result = ev.evaluate(_cfg(tiny_dir, tmp_path / "eval", paths, "data.max_samples=2"), model, processor)
    assert sorted(result["results"]) == ["first/test", "second/test"]
    assert all(m["questions"] == 2 for m in result["results"].values())


def test_torn_line_of_one_sample_redoes_its_question(tiny_dir, synth_dir, tmp_path, loaded, calls):
    """With k samples per question, a question is done only when all k are recorded."""
    model, processor = loaded
    data, out = synth_dir / "train.jsonl", tmp_path / "eval"
    extra = ("eval.group_size=2", "eval.temperature=1.0", "data.max_samples=4")
    ev.evaluate(_cfg(tiny_dir, out, data, *extra), model, processor)
    rank0 = out / "predictions" / "rank0.jsonl"
    lines = rank0.read_text().splitlines(keepends=True)
    assert len(lines) == 8 and json.loads(lines[-1])["sample"] == 1
    rank0.write_text("".join(lines[:-1]) + lines[-1][:20])  # the last question's second sample torn
    calls.clear()
    result = ev.evaluate(_cfg(tiny_dir, out, data, *extra), model, processor)
    assert len(calls) == 1
    assert len(_predictions(out)) == 8 and result["results"]["train"]["samples_per_question"] == 2


def _ckpt_dir(out, step):
    return out / f"checkpoint-{step}"


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


def test_the_protocol_changes_when_the_scorer_does(monkeypatch):
    """The scorer change that made \\boxed{Option B} read as B left the protocol's hash as it was, so
    a resumed evaluation could mix predictions scored both ways. The scorer's version is now part
    of it, and changes with what any of its reference replies scores as."""
    import re

    import mgpo.core.reward as reward
    from mgpo.eval.protocol import protocol

    cfg = load_config(None, [])
    now = protocol(cfg)["scorer"]
    assert reward.extract_answer("\\boxed{Option B}") == "B"
    # the scorer before that change: no label word before the letter
    monkeypatch.setattr(reward, "_LETTER", re.compile(r"^(?:\(\s*([A-Za-z])\s*(?:\)|$)|([A-Za-z])\s*(?:[.):]|$))"))
    assert reward.extract_answer("\\boxed{Option B}") is None
    assert protocol(cfg)["scorer"] != now
    monkeypatch.undo()
    assert protocol(cfg)["scorer"] == now, "the same scorer, the same version"


def test_a_prediction_line_without_its_dataset_is_ignored_not_fatal(tmp_path, caplog):
    """A line with no dataset (a hand-edited or foreign file) crashed every rerun."""
    from mgpo.eval.protocol import done_questions, read_predictions

    (tmp_path / "rank0.jsonl").write_text(json.dumps({"id": "q1", "dataset": "v", "sample": 0}) + "\n"
                                          + json.dumps({"id": "q2", "sample": 0}) + "\n" + json.dumps([1, 2]) + "\n")
    records = read_predictions(tmp_path)
    assert [r["id"] for r in records] == ["q1"]
    assert done_questions(records, 1) == {("v", "q1")}
    assert "line 2 is not a prediction record" in caplog.text and "line 3" in caplog.text


def test_one_fingerprint_for_a_question_set_everywhere(tiny_dir, synth_dir, tmp_path, loaded):
    """report.md and protocol.json showed two different hashes for the same questions."""
    model, processor = loaded
    out = tmp_path / "e"
    ev.evaluate(load_config("configs/tiny_cpu.yaml", [f"model.path={tiny_dir}", f"eval.output_dir={out}",
                                                      f"eval.datasets=[{synth_dir / 'train.jsonl'}]",
                                                      "data.max_samples=2", "rollout.max_new_tokens_turn1=4",
                                                      "rollout.max_new_tokens_turn2=4"]), model, processor)
    stored = json.loads((out / "predictions" / "protocol.json").read_text())["protocol"]["questions"]["train"]
    reported = json.loads((out / "metrics.json").read_text())["protocol"]["datasets"]["train"]
    assert stored == reported and stored["count"] == 2
    assert f"sha256 {stored['sha256']}" in (out / "report.md").read_text()
