"""mgpo.eval.evaluate on the tiny model, in one process: modes, scripted policies, formats, bad
input, output folders (the runs through eval.py are in tests/system/test_eval_runs.py)."""

import json
from pathlib import Path

import pytest
from helpers import ScriptedModel
from PIL import Image

import mgpo.eval.evaluate as ev
from mgpo.config import ModelConfig, RolloutConfig, load_config
from mgpo.core.rollout import rollout
from mgpo.data.samples import load_samples
from mgpo.eval.report import compare, compute_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from mgpo.config import ModelConfig
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28)
    return load_model(mcfg), load_processor(mcfg)


def _cfg(tiny_dir, out, *extra, data=None):
    return load_config(ROOT / "configs/tiny_cpu.yaml", [
        f"model.path={tiny_dir}", f"eval.output_dir={out}", "rollout.max_new_tokens_turn1=16",
        "rollout.max_new_tokens_turn2=8", "eval.batch_size=4", *([f"eval.datasets=[{data}]"] if data else []),
        *extra])


def _predictions(out):
    return [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["mgpo", "grpo", "direct"])
def test_each_mode_end_to_end_and_report_recomputes(tiny_dir, synth_dir, tmp_path, loaded, mode):
    model, processor = loaded
    cfg = _cfg(tiny_dir, tmp_path / mode, f"eval.mode={mode}", data=synth_dir / "train.jsonl")
    result = ev.evaluate(cfg, model=model, processor=processor)
    preds = _predictions(tmp_path / mode)
    assert len(preds) == 12 and {p["sample"] for p in preds} == {0}
    boxes = mode != "direct"  # the direct prompt asks for no box: no grounding figures
    assert result["results"] == json.loads(json.dumps(compute_metrics(preds, boxes=boxes)))  # recomputed from the file
    if not boxes:
        assert set(result["results"]["train"]["grounding"].values()) == {None}
    metrics = json.loads((tmp_path / mode / "metrics.json").read_text())
    assert metrics["protocol"]["mode"] == mode and metrics["protocol"]["decoding"] == "greedy"
    assert metrics["protocol"]["datasets"]["train"]["count"] == 12
    report = (tmp_path / mode / "report.md").read_text()
    assert "## Protocol" in report and "| train |" in report
    assert "<img" in (tmp_path / mode / "report.html").read_text()
    if mode != "mgpo":
        assert all(p["turn2_text"] == "" for p in preds)


def _scripted(answer_for, turn1='```json\n[{"bbox_2d": [20, 20, 200, 200]}]\n```'):
    real = ev.rollout

    def fake(model, processor, samples, cfg, **kw):
        assert len(samples) == 1
        scripts = [turn1, f"\\boxed{{{answer_for(samples[0])}}}"] if cfg.template == "mgpo" else \
            [f"\\boxed{{{answer_for(samples[0])}}}"]
        return real(ScriptedModel(model, processor.tokenizer, scripts), processor, samples, cfg, **kw)
    return fake


def test_oracle_policy_scores_100_and_always_a_scores_the_share_of_a(tiny_dir, synth_dir, tmp_path, loaded,
                                                                     monkeypatch):
    model, processor = loaded
    extra = ("eval.batch_size=1", "rollout.max_new_tokens_turn1=48", "rollout.max_new_tokens_turn2=12")
    monkeypatch.setattr(ev, "rollout", _scripted(lambda s: s.answer))
    oracle = ev.evaluate(_cfg(tiny_dir, tmp_path / "oracle", *extra, data=synth_dir / "train.jsonl"), model, processor)
    assert oracle["results"]["train"]["accuracy"] == 100.0
    assert oracle["results"]["train"]["grounding"]["valid_box"] == 100.0
    monkeypatch.setattr(ev, "rollout", _scripted(lambda s: "A"))
    always_a = ev.evaluate(_cfg(tiny_dir, tmp_path / "a", *extra, data=synth_dir / "train.jsonl"), model, processor)
    truth = [json.loads(line)["answer"] for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    assert always_a["results"]["train"]["accuracy"] == pytest.approx(100 * truth.count("A") / len(truth))
    table = compare([tmp_path / "oracle", tmp_path / "a"])
    assert "train overall | 100.0 |" in table and f"({100 * truth.count('A') / len(truth) - 100:+.1f})" in table


def test_sampling_gives_avg_and_pass_at_k(tiny_dir, synth_dir, tmp_path, loaded):
    model, processor = loaded
    cfg = _cfg(tiny_dir, tmp_path / "k", "eval.group_size=3", "eval.temperature=1.0", data=synth_dir / "train.jsonl")
    result = ev.evaluate(cfg, model, processor)
    preds = _predictions(tmp_path / "k")
    assert len(preds) == 36 and {p["sample"] for p in preds} == {0, 1, 2}
    assert result["results"]["train"]["samples_per_question"] == 3
    with pytest.raises(ValueError, match="temperature"):
        ev.evaluate(_cfg(tiny_dir, tmp_path / "bad", "eval.group_size=3", data=synth_dir / "train.jsonl"), model, processor)


def test_every_dataset_format_through_evaluation(tiny_dir, tmp_path, loaded):
    import base64
    import io

    from PIL import Image

    model, processor = loaded
    img = Image.new("RGB", (640, 480), (90, 90, 90))
    root = tmp_path / "vstar"
    (root / "direct_attributes").mkdir(parents=True)
    img.save(root / "direct_attributes" / "a.jpg")
    (root / "direct_attributes" / "a.json").write_text(json.dumps({"bbox": [[1, 2, 30, 40]]}))
    (root / "test_questions.jsonl").write_text(json.dumps({
        "question_id": 0, "image": "direct_attributes/a.jpg", "category": "direct_attributes", "label": "C",
        "text": "Q?\n(A) x\n(B) y\n(C) z\n(D) w\nAnswer with the option's letter from the given choices directly."}) + "\n")
    (tmp_path / "data" / "imgs").mkdir(parents=True)  # MME-RealWorld-Lite: bare names under imgs/
    img.save(tmp_path / "data" / "imgs" / "m.jpg")
    (tmp_path / "data" / "mme.json").write_text(json.dumps([{"Question_id": "q1", "Image": "m.jpg", "Text": "Q?",
                                                             "Answer choices": ["(A) a", "(B) b"], "Ground truth": "B",
                                                             "Task": "Perception", "Subtask": "OCR",
                                                             "Category": "text"}]))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "hr_bench_4k.tsv").write_text(
        "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage\n"
        f"1\tQ?\tC\tsingle\tNone\tb\tc\td\tcycle1\t{b64}\n2\tQ?\tD\tsingle\tb\tc\td\tNone\tcycle2\t{b64}\n")
    data = f"{root},{tmp_path / 'data' / 'mme.json'},{tmp_path / 'hr_bench_4k.tsv'}"
    result = ev.evaluate(_cfg(tiny_dir, tmp_path / "out", data=data), model, processor)
    assert set(result["results"]) == {"vstar", "mme", "hr_bench_4k"}
    assert [m["questions"] for m in result["results"].values()] == [2, 1, 1]  # sorted: hr_bench_4k, mme, vstar
    mme = result["results"]["mme"]["breakdown"]
    assert set(mme) == {"Perception", "Perception / OCR", "Perception / OCR / text"}
    assert set(result["results"]["hr_bench_4k"]["per_cycle"]["cycles"]) == {"cycle1", "cycle2"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Perception / OCR / text" in report and "mean over cycles" in report


def test_bad_records_are_listed_with_reasons(tiny_dir, synth_dir, tmp_path, loaded):
    model, processor = loaded
    lines = (synth_dir / "train.jsonl").read_text().splitlines()[:3]
    recs = [json.loads(x) for x in lines]
    for r in recs:
        r["image"] = str(synth_dir / r["image"])
    recs[1]["image"] = str(tmp_path / "gone.jpg")
    (tmp_path / "cut.jpg").write_bytes(Path(recs[2]["image"]).read_bytes()[:2000])  # header intact, data cut
    recs[2]["image"] = str(tmp_path / "cut.jpg")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    result = ev.evaluate(_cfg(tiny_dir, tmp_path / "out", data=tmp_path / "d.jsonl"), model, processor)
    assert result["results"]["d"]["questions"] == 1 and result["skipped"]["d"] == 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "synth-train-00001: image file not found" in report
    assert "synth-train-00002" in report


def test_a_set_with_no_usable_record_still_gets_a_report(tiny_dir, tmp_path, loaded):
    model, processor = loaded
    recs = [{"id": f"r{i}", "image": f"gone{i}.jpg", "question": "Q?", "options": ["a", "b"], "answer": "A"}
            for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    result = ev.evaluate(_cfg(tiny_dir, tmp_path / "out", data=tmp_path / "d.jsonl"), model, processor)
    assert result["results"] == {} and result["skipped"] == {"d": 3}
    assert "r2: image file not found" in (tmp_path / "out" / "report.md").read_text()
    assert "no usable records" in (tmp_path / "out" / "report.html").read_text()


def test_hostile_records_are_listed_and_the_evaluation_finishes(tiny_dir, synth_dir, tmp_path, loaded):
    model, processor = loaded
    good = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text().splitlines()[:2]]
    for r in good:
        r["image"] = str(synth_dir / r["image"])
    bad = {
        "boxes": {**good[0], "id": "boxes", "target_boxes": [[1, 2, 3]]},
        "letters": {**good[0], "id": "letters", "options": [f"o{i}" for i in range(27)]},
        "strings": {**good[0], "id": "strings", "options": "abcd"},
        "long": {**good[0], "id": "long", "question": "word " * 6000},
    }
    lines = [json.dumps(good[0]), "{broken", "42", json.dumps(good[0]), *map(json.dumps, bad.values()),
             json.dumps(good[1])]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tiny_dir, tmp_path / "out", "data.max_prompt_tokens=2048", data=tmp_path / "d.jsonl")
    result = ev.evaluate(cfg, model, processor)
    assert result["results"]["d"]["questions"] == 2 and result["skipped"]["d"] == 7
    report = (tmp_path / "out" / "report.md").read_text()
    for text in ("line-2: not JSON", "line-3: expected a JSON object", f"{good[0]['id']}: duplicate id",
                 "boxes: target_boxes[0] must be 4", "letters: 27 options", "strings: options must be a list",
                 "long: prompt has", "over data.max_prompt_tokens (2048)"):
        assert text in report, text


def test_k_turn_mode_reports_every_turn_and_crop(tiny_dir, synth_dir, tmp_path, loaded):
    """eval.mode=mgpo_k eval.max_turns=3: the protocol says so; each prediction lists its turns;
    report.md has the turns table; each case card shows every crop in order."""
    model, processor = loaded
    box = '```json\n[{"bbox_2d": [20, 20, 200, 150]}]\n```'
    scripted = ScriptedModel(model, processor.tokenizer, [box, box, "\\boxed{A}<|im_end|>"])
    out = tmp_path / "k3"
    cfg = _cfg(tiny_dir, out, "eval.mode=mgpo_k", "eval.max_turns=3", "eval.batch_size=12",
               "rollout.max_new_tokens_turn1=40", "rollout.max_new_tokens_turn2=40", "eval.report_examples=2",
               data=synth_dir / "train.jsonl")
    result = ev.evaluate(cfg, model=scripted, processor=processor)
    assert scripted.calls == 3
    proto = result["protocol"]
    assert proto["mode"] == "mgpo_k" and proto["max_turns"] == 3 and "not the paper's" in proto["template_wording"]
    preds = _predictions(out)
    assert all([t["action"] for t in p["turns"]] == ["zoom", "zoom", "answer"] for p in preds)
    assert all(p["turns"][1]["nested"] for p in preds)
    turns = result["results"]["train"]["turns"]
    assert turns["turns_used"] == 3 and turns["crops"] == 2 and turns["answer_at_turn"] == {"1": 0.0, "2": 0.0,
                                                                                          "3": 100.0}
    assert "## Turns (K-turn mode)" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "alt='crop 1'" in html and "alt='crop 2'" in html and "turn 3 (answer)" in html


def test_crop_answerable_counts_questions_boxes_and_right_answers(tiny_dir, synth_dir, tmp_path, loaded, monkeypatch):
    """Table 3: the judge answers from the crop alone, in one turn (the crop, the question and
    its options; greedy), never seeing the original. Bookkeeping: every question counts, only a
    valid turn-1 box gives the judge a crop, a right answer from it is what counts (here a judge
    that always says A)."""
    from helpers import ScriptedModel

    from mgpo.config import save_config
    from mgpo.core.grounding import Box, crop_original, fit_to_budget
    from mgpo.core.prompts import CROP_LEAD, DIRECT_SUFFIX, MGPO_SYSTEM, TURN1_SUFFIX
    from mgpo.data.samples import load_samples

    class Recording(ScriptedModel):
        def generate(self, **kwargs):
            seen.append({k: kwargs[k] for k in ("input_ids", "image_grid_thw")})
            return super().generate(**kwargs)

    model, processor = loaded
    out = tmp_path / "eval"
    (out / "predictions").mkdir(parents=True)
    cfg = _cfg(tiny_dir, out, data=synth_dir / "train.jsonl")
    save_config(cfg, out / "config.yaml")
    truth = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    box = [10.0, 20.0, 410.0, 320.0]  # original pixels
    rows = [{"id": r["id"], "dataset": "train", "sample": 0, "valid": k < 6, "box_input": [0, 0, 84, 84],
             "box_original": box if k < 6 else None} for k, r in enumerate(truth[:10])]
    rows += [{"id": truth[0]["id"], "dataset": "train", "sample": 1, "valid": False, "box_input": None},
             {"id": truth[10]["id"], "dataset": "train", "error": "unreadable"}]
    (out / "predictions" / "rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    judge = Recording(model, processor.tokenizer, ["B<|im_end|>", "A<|im_end|>"])  # the first batch's judge says B, the second's A
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: judge)
    result = ev.crop_answerable(out, str(tiny_dir), batch_size=4)
    want = sum(r["answer"] == "B" for r in truth[:4]) + sum(r["answer"] == "A" for r in truth[4:6])
    assert judge.calls == 2  # 6 boxed questions in batches of 4, one turn each
    assert (result["questions"], result["valid_boxes"], result["answerable"]) == (10, 6, want)
    assert result["share"] == pytest.approx(100 * want / 10)
    assert json.loads((out / ev.CROPS_FILE).read_text())["answerable"] == want
    # What the judge saw: one image per question, the crop under the box at the budget's size,
    # and the one-turn answer prompt with the options, nothing of the two-turn conversation.
    samples = list(load_samples(synth_dir / "train.jsonl"))
    tok, vision_start = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    for call, chunk in zip(seen, (samples[:4], samples[4:6])):
        assert call["image_grid_thw"].shape[0] == len(chunk) == call["input_ids"].shape[0]
        for row, grid, s in zip(call["input_ids"], call["image_grid_thw"], chunk):
            crop = fit_to_budget(crop_original(s.load_image(), Box(*box)), cfg.model.min_pixels, cfg.model.max_pixels,
                                 cfg.rollout.crop_resample)
            assert (int(grid[2]) * 14, int(grid[1]) * 14) == crop.size and crop.size != s.load_image().size
            assert int((row == vision_start).sum()) == 1
            text = tok.decode(row, skip_special_tokens=False)
            assert s.question.strip() in text and DIRECT_SUFFIX in text and f"(B) {s.options[1]}" in text
            assert CROP_LEAD not in text and TURN1_SUFFIX not in text and MGPO_SYSTEM not in text


MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28


@pytest.fixture(scope="module")
def env(tiny_dir, synth_dir):
    from mgpo.runtime.model import load_model, load_processor

    mcfg = ModelConfig(path=str(tiny_dir), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    return load_model(mcfg), load_processor(mcfg), list(load_samples(synth_dir / "train.jsonl")), mcfg


def _run(model, processor, samples, **kw):
    greedy = kw.pop("greedy", False)
    cfg = RolloutConfig(**{"group_size": 2, "max_new_tokens_turn1": 24, "max_new_tokens_turn2": 16, **kw})
    return rollout(model, processor, samples, cfg, min_pixels=MIN_PX, max_pixels=MAX_PX, record_logprobs=True,
                   greedy=greedy)


def test_direct_mode_scores_a_bare_letter(env, tmp_path):
    """Bug 4: the direct prompt asks for a letter; the scorer only read \\boxed{}."""
    from mgpo.config import Config, EvalConfig
    from mgpo.eval.evaluate import evaluate
    from mgpo.tools.synth import build_synth

    model, processor, _, mcfg = env
    build_synth(tmp_path / "s", n=1, seed=3, split="test")
    data = tmp_path / "s" / "test.jsonl"
    answer = json.loads(data.read_text().splitlines()[0])["answer"]
    scripted = ScriptedModel(model, processor.tokenizer, [f"{answer}.<|im_end|>"])
    cfg = Config(model=mcfg, eval=EvalConfig(mode="direct", datasets=(str(data),), batch_size=1,
                                             output_dir=str(tmp_path / "eval")))
    result = evaluate(cfg, model=scripted, processor=processor)
    assert result["results"]["test"]["accuracy"] == 100.0
    assert "bare" in result["protocol"]["answer_match"]


def test_one_turn_valid_box_is_mapped_for_the_grounding_figures(env):
    """A valid box in the one-turn template makes no crop; the report's IoU read its (unset)
    original-image box and ``eval.mode=grpo`` crashed on the first valid box."""
    from mgpo.core.grounding import Box, to_original_box
    from mgpo.eval.evaluate import _records
    from mgpo.eval.report import grounding_values

    model, processor, samples, _ = env
    sample = samples[0]
    text = '```json\n[{"bbox_2d": [10, 10, 300, 200], "label": "x"}]\n``` \\boxed{' + sample.answer + "}"
    r = _run(ScriptedModel(model, processor.tokenizer, [text + "<|im_end|>"]), processor, [sample], template="grpo",
             max_new_tokens_turn1=96)
    t = r.trajectories[0]
    assert t.valid and t.crop_size is None
    assert t.box_original == to_original_box(Box(*t.box_input), t.input_size, t.original_size).as_list()
    r.trajectories = r.trajectories[:1]
    ious, _, _ = grounding_values(_records(r, {sample.id: sample}, "test", 1))
    assert len(ious) == (1 if sample.target_boxes else 0)


def _user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}


GOOD = [
    {"id": "one", "messages": [_user("What colour is it?", "a.png"), {"role": "assistant", "content": "Red."}]},
    {"id": "two", "messages": [{"role": "system", "content": "Be brief."}, _user("First?", "a.png"),
                               {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
                               _user("Second?", "b.png"), {"role": "assistant", "content": "A2 <|im_end|> x"}]},
]
BAD = {
    "assistant first": [{"role": "assistant", "content": "hi"}, _user("q", "a.png")],
    "ends with user": [_user("q", "a.png"), {"role": "assistant", "content": "a"}, _user("q2")],
    "assistant image": [_user("q", "a.png"), {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}],
    "no image": [_user("q"), {"role": "assistant", "content": "a"}],
    "missing image": [_user("q", "gone.png"), {"role": "assistant", "content": "a"}],
    "bad content": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}],
    "bad role": [{"role": "tool", "content": "x"}, _user("q", "a.png"), {"role": "assistant", "content": "a"}],
}


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (120, 160), (30, 30, 200)).save(folder / "b.png")
    rows = GOOD + [{"id": k, "messages": m} for k, m in BAD.items()]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "chat.jsonl"


def test_evaluation_refuses_chat_files(tiny_dir, chat_file, tmp_path):
    from mgpo.config import load_config
    from mgpo.eval.evaluate import evaluate

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs/tiny_cpu.yaml", [f"model.path={tiny_dir}", f"eval.datasets=[{chat_file}]",
                                                f"eval.output_dir={tmp_path / 'eval'}"])
    with pytest.raises(ValueError, match="chat conversations"):
        evaluate(cfg)


EVAL_PRESET = "configs/eval_qwen2_5_vl_7b.yaml"


def test_each_evaluation_gets_its_own_folder_unless_told():
    from mgpo.config import load_config
    from mgpo.eval.evaluate import with_output_dir

    a = with_output_dir(load_config(EVAL_PRESET, ["model.path=/m/Qwen2.5-VL-7B-Instruct", "eval.datasets=[/d/v]"]))
    b = with_output_dir(load_config(EVAL_PRESET, ["model.path=runs/x/checkpoint-10/model",
                                                  "eval.datasets=[/d/v]"]))
    c = with_output_dir(load_config(EVAL_PRESET, ["model.path=/m/Qwen2.5-VL-7B-Instruct", "eval.datasets=[/d/w]"]))
    assert len({a.eval.output_dir, b.eval.output_dir, c.eval.output_dir}) == 3
    told = with_output_dir(load_config(EVAL_PRESET, ["eval.output_dir=/tmp/mine"]))
    assert told.eval.output_dir == "/tmp/mine"
    # two protocols never share a folder; the same protocol finds its own again
    half = with_output_dir(load_config(EVAL_PRESET, ["model.path=/m/Qwen2.5-VL-7B-Instruct", "eval.datasets=[/d/v]",
                                                      "model.max_pixels=501760"]))
    black = with_output_dir(load_config(EVAL_PRESET, ["model.path=/m/Qwen2.5-VL-7B-Instruct", "eval.datasets=[/d/v]",
                                                       "eval.crop=black"]))
    assert len({a.eval.output_dir, half.eval.output_dir, black.eval.output_dir}) == 3 and "-black-" in black.eval.output_dir
    assert with_output_dir(load_config(EVAL_PRESET, ["model.path=/m/Qwen2.5-VL-7B-Instruct",
                                                     "eval.datasets=[/d/v]"])).eval.output_dir == a.eval.output_dir


def test_a_partial_benchmark_is_evaluated_with_a_warning(tmp_path, caplog):
    """A V* folder with 1 of its 191 questions (a cut download) was scored without a word."""
    from PIL import Image

    root = tmp_path / "vstar_bench"
    (root / "direct_attributes").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "direct_attributes" / "a.jpg")
    (root / "test_questions.jsonl").write_text(json.dumps({
        "question_id": 0, "image": "direct_attributes/a.jpg", "category": "direct_attributes", "label": "A",
        "text": "Q?\n(A) x\n(B) y\nAnswer with the option's letter from the given choices directly."}) + "\n")
    sets = ev.eval_sets(load_config(None, [f"eval.datasets=[{root}]"]))
    assert len(sets["vstar_bench"]) == 1
    assert "1 questions (1 usable, 0 skipped), but V* Bench has 191" in caplog.text
    assert "not scored as wrong" in caplog.text


def test_an_evaluation_inside_a_checkpoint_folder_is_refused(tiny_dir, tmp_path):
    """Its files would fail the checkpoint's manifest: the checkpoint could no longer be resumed."""
    from mgpo.config import ConfigError
    from mgpo.runtime.checkpoint import enclosing_checkpoint

    ckpt = tmp_path / "run" / "checkpoint-4"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("{}")
    for out in (ckpt / "eval", ckpt / "model" / "eval"):
        with pytest.raises(ConfigError, match="lies inside the checkpoint .*checkpoint-4"):
            ev.evaluate(_cfg(tiny_dir, out))
    assert not (ckpt / "eval").exists()
    # the default folder of a checkpoint's evaluation is only named like one: runs/eval/checkpoint-600/...
    assert enclosing_checkpoint(tmp_path / "runs" / "eval" / "checkpoint-600" / "vstar_bench") is None


def test_the_protocol_comes_from_the_model_unless_a_preset_is_named(tmp_path, tiny_dir):
    """`make eval MODEL=runs/demo/checkpoint-30/model` evaluated the demo's tiny model under the 7B
    preset (50% accuracy, 0% valid boxes, for a model at 100% under its own settings)."""
    from dataclasses import replace

    from mgpo.config import save_config
    from mgpo.eval.evaluate import protocol_config, protocol_lines

    demo = load_config(ROOT / "configs" / "demo.yaml")
    ckpt_model = tmp_path / "checkpoint-30" / "model"
    ckpt_model.mkdir(parents=True)
    save_config(replace(demo, data=replace(demo.data, max_samples=12)),  # what train.py writes into every
                ckpt_model / "mgpo_config.yaml")  # checkpoint (a run on its first 12 records)
    cfg, source = protocol_config(None, [f"model.path={ckpt_model}"])
    assert (cfg.model.min_pixels, cfg.model.max_pixels) == (demo.model.min_pixels, demo.model.max_pixels)
    assert cfg.rollout.max_new_tokens_turn1 == demo.rollout.max_new_tokens_turn1 and cfg.model.path == str(ckpt_model)
    assert cfg.data.max_samples == 0, "the run's cap on its training records does not cut the evaluation"
    line = protocol_lines(cfg, source)
    assert line.startswith(f"protocol (the run config saved with {ckpt_model}): mode mgpo")
    assert f"pixels {demo.model.min_pixels}..{demo.model.max_pixels}" in line
    assert f"new tokens per turn {demo.rollout.max_new_tokens_turn1}/{demo.rollout.max_new_tokens_turn2}" in line
    published, source = protocol_config(None, [f"model.path={tiny_dir}"])  # no run config: the paper's protocol
    assert (published.model.max_pixels, published.model.dtype) == (1280 * 28 * 28, "bfloat16")
    assert "the paper's protocol" in source and "carries no run config" in source
    named, source = protocol_config("configs/tiny_cpu.yaml", [f"model.path={ckpt_model}"])  # a preset wins
    assert named.model.max_pixels == load_config("configs/tiny_cpu.yaml").model.max_pixels
    assert source == "preset configs/tiny_cpu.yaml"
