"""Evaluation with a pinned protocol: resumable, shardable, with grounding diagnostics.

    python eval.py --config configs/tiny_cpu.yaml                       # the embedded default
    python eval.py --config configs/qwen2_5_vl_7b_mgpo.yaml model.path=/models/ckpt \
        eval.datasets=[/data/vstar_bench,/data/MME-RealWorld-Lite.json] eval.mode=mgpo
    accelerate launch eval.py ...                                       # each rank takes a shard
    python eval.py compare runs/eval_base runs/eval_mgpo                 # side by side

Predictions are appended, one batch at a time, to ``predictions/rank{r}.jsonl``; a rerun
skips the batches already there, so a killed evaluation loses at most the batch in flight
(a last line cut by the kill is removed and its batch redone). The protocol the predictions
were made under (model files, mode, pixel budget, decoding, the questions themselves) is
stored beside them in ``predictions/protocol.json``: a rerun under another protocol is
refused, naming what differs, unless ``eval.overwrite=true`` discards the old predictions.
The crop is computed by ``mgpo.core.rollout``, the same code the trainer uses.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..config import Config, ConfigError, load_config, save_config
from ..core.grounding import Box, crop_original, fit_to_budget
from ..core.prompts import get_template
from ..core.reward import predicted_letter
from ..core.rollout import rollout
from ..data.benchmarks import published_count
from ..data.samples import BadImageError, SampleSet, detect_format, load_samples
from ..runtime import distributed as D
from ..runtime.checkpoint import RUN_CONFIG, enclosing_checkpoint
from ..runtime.model import CheckpointError, check_adapter_dir, check_model_dir, load_model, load_processor
from .protocol import (
    PROTOCOL_FILE,
    check_protocol,
    cut_torn_tail,
    done_questions,
    protocol,
    protocol_digest,
    questions_stamp,
    read_predictions,
    run_protocol,
    weights_identity,
)
from .report import compute_metrics, render_markdown
from .report_html import render_html

log = logging.getLogger("mgpo")


def _records(batch, samples_by_id, dataset: str, k: int) -> list[dict]:
    """One prediction record per trajectory (``k`` consecutive trajectories per question)."""
    out = []
    for i, t in enumerate(batch.trajectories):
        s = samples_by_id[t.sample_id]
        pred = predicted_letter(t)
        out.append({
            "id": s.id, "dataset": dataset, "category": s.category, "sample": i % k,
            "question": s.question, "options": list(s.options), "answer": s.answer, "pred": pred,
            "correct": pred == s.answer, "turn1_text": t.turn1_text, "turn2_text": t.turn2_text,
            "box_input": t.box_input, "box_original": t.box_original, "valid": t.valid, "box_problem": t.box_problem,
            "crop_size": list(t.crop_size) if t.crop_size else None, "original_size": list(t.original_size),
            "target_boxes": [list(b) for b in s.target_boxes], "breakdown": list(s.breakdown), "cycle": s.cycle,
        } | _turn_records(t))
    return out


def _turn_records(t) -> dict:
    """K-turn mode: every turn's text, action and box, in order (the report's crops come from here)."""
    if not t.turn_log:
        return {}
    return {"turns": [{"text": r.text, "action": r.action, "box_input": r.box_input, "box_original": r.box_original,
                       "valid": r.valid, "nested": r.nested, "capped": r.capped,
                       "crop_size": list(r.crop_size) if r.crop_size else None} for r in t.turn_log]}


def dataset_names(paths) -> list[str]:
    """A short, unique name per dataset: the file stem (or folder name), with parent folders
    prepended only where two would collide ("a/test", "b/test").

    >>> dataset_names(["/d/vstar_bench", "/x/test.jsonl", "/y/test.jsonl"])
    ['vstar_bench', 'x/test', 'y/test']
    """
    candidates = []
    for raw in paths:
        p = Path(raw).resolve()
        leaf = p.name if p.is_dir() else p.stem
        parents = [q.name for q in p.parents if q.name][::-1]  # outermost first
        names = ["/".join([*parents[len(parents) - d:], leaf]) for d in range(len(parents) + 1)]
        candidates.append([*names, str(p)])  # last resort: the whole path (test.json vs test.jsonl)
    if len({c[-1] for c in candidates}) < len(candidates):
        raise ConfigError(f"eval.datasets lists a dataset twice: {list(paths)}")
    level = [0] * len(candidates)
    while True:
        names = [c[i] for c, i in zip(candidates, level)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        level = [min(i + 1, len(c) - 1) if n in clashes else i for c, i, n in zip(candidates, level, names)]


def model_label(path: str) -> str:
    """A short name for a model folder: its own name, or for a training checkpoint the run and
    the checkpoint (a trailing ``model`` folder is skipped).

    >>> model_label("/models/Qwen2.5-VL-7B-Instruct")
    'Qwen2.5-VL-7B-Instruct'
    >>> model_label("runs/qwen2_5_vl_7b_mgpo/checkpoint-600/model")
    'qwen2_5_vl_7b_mgpo-checkpoint-600'
    >>> model_label("runs/lora/checkpoint-600/")
    'lora-checkpoint-600'
    """
    parts = [p for p in Path(path).parts if p not in ("/", "\\", ".")]
    if len(parts) > 1 and parts[-1] == "model":
        parts = parts[:-1]
    name = parts[-1] if parts else "model"
    if len(parts) >= 2 and name.startswith("checkpoint-"):
        return f"{parts[-2]}-{name}"
    return name


PAPER_PROTOCOL = Path(__file__).resolve().parents[3] / "configs" / "eval_qwen2_5_vl_7b.yaml"
DEFAULT_PRESET = "configs/tiny_cpu.yaml"


def protocol_config(preset: str | None, overrides: list[str]) -> tuple[Config, str]:
    """The config an evaluation runs under, and where it came from. A preset named with --config
    wins. Otherwise the model decides: a folder a training run wrote (``model/`` or ``adapter/`` of a
    checkpoint, holding ``mgpo_config.yaml``) is evaluated under that run's model, rollout and pixel
    settings; any other model folder (a published checkpoint) under the paper's protocol
    (``configs/eval_qwen2_5_vl_7b.yaml``); with no model given, the embedded default preset."""
    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    if preset:
        return load_config(preset, overrides), f"preset {preset}"
    folders = [given[k] for k in ("eval.adapter", "model.path") if given.get(k)]
    if not folders:
        return load_config(DEFAULT_PRESET, overrides), f"preset {DEFAULT_PRESET}"
    for folder in folders:
        saved = Path(folder) / RUN_CONFIG
        if saved.is_file():
            # the run's own settings; its output folder and its cap on the training records are not the
            # evaluation's (a run trained on its first N records is still evaluated on every question)
            return (load_config(saved, ["eval.output_dir=", "eval.overwrite=false", "data.max_samples=0", *overrides]),
                    f"the run config saved with {folder}")
    return load_config(PAPER_PROTOCOL, overrides), \
        f"the paper's protocol ({PAPER_PROTOCOL.name}): {folders[0]} carries no run config"


def protocol_lines(cfg: Config, source: str) -> str:
    """What an evaluation prints first: the protocol in force and where it came from."""
    e, m, r = cfg.eval, cfg.model, cfg.rollout
    sampling = "greedy" if e.temperature == 0 else f"sampling at T={e.temperature}, {e.group_size} per question"
    return (f"protocol ({source}): mode {e.mode}" + (f", crop {e.crop}" if e.crop != "model" else "")
            + f", pixels {m.min_pixels}..{m.max_pixels}, new tokens per turn {r.max_new_tokens_turn1}/"
            f"{r.max_new_tokens_turn2}, dtype {m.dtype}, {sampling}")


def with_output_dir(cfg: Config) -> Config:
    """``cfg`` with ``eval.output_dir`` filled when it is empty, computed once, before anything is
    written: runs/eval/<model>/<datasets>-<mode>[-<crop>]-<protocol fingerprint> (the adapter's name
    added to the model's), so an evaluation under another protocol (another pixel budget, say) never
    lands on this one's predictions, and a rerun under the same one finds and resumes them.

    >>> from mgpo.config import load_config
    >>> out = with_output_dir(load_config(None, ["model.path=/m/Qwen2.5-VL-7B-Instruct",
    ...     "eval.datasets=[/d/vstar_bench,/d/MME-RealWorld-Lite.json]"])).eval.output_dir
    >>> out.startswith("runs/eval/Qwen2.5-VL-7B-Instruct/vstar_bench+MME-RealWorld-Lite-mgpo-"), len(out.split("-")[-1])
    (True, 8)
    """
    if cfg.eval.output_dir:
        return cfg
    model = model_label(cfg.model.path) + (f"+{model_label(cfg.eval.adapter)}" if cfg.eval.adapter else "")
    data = "+".join(n.replace("/", "_") for n in dataset_names(cfg.eval.datasets or (cfg.data.eval,)))
    fp = protocol_digest(protocol(cfg))[:8]
    leaf = f"{data}-{cfg.eval.mode}" + (f"-{cfg.eval.crop}" if cfg.eval.crop != "model" else "") + f"-{fp}"
    return replace(cfg, eval=replace(cfg.eval, output_dir=str(Path("runs/eval") / model / leaf)))


def _prepare_output(cfg: Config, datasets: dict[str, SampleSet]) -> None:
    """Main process: check the stored protocol, cut torn lines, save the config; every process
    gets the outcome (a refusal stops them all)."""
    out = Path(cfg.eval.output_dir)
    pred_dir = out / "predictions"

    def prepare():
        pred_dir.mkdir(parents=True, exist_ok=True)
        check_protocol(pred_dir, run_protocol(cfg, datasets), cfg.eval.overwrite)
        for f in sorted(pred_dir.glob("rank*.jsonl")):
            if cut := cut_torn_tail(f):
                log.warning("%s: its last line was cut by a kill (%d bytes); removed, that batch is redone", f, cut)
        save_config(cfg, out / "config.yaml")

    D.on_main(prepare)


def eval_sets(cfg: Config) -> dict[str, SampleSet]:
    """The evaluation's datasets by their short names (``eval.datasets``, else ``data.eval``). A
    published benchmark with another number of questions than its published one (a partial
    download, a changed copy) is evaluated with a warning: its figures are not the benchmark's."""
    paths = cfg.eval.datasets or (cfg.data.eval,)
    sets = {}
    for name, path in zip(dataset_names(paths), paths):
        sets[name] = ds = load_samples(path, cfg.data.eval_format, image_root=cfg.data.image_root or None,
                                       max_samples=cfg.data.max_samples, name=name)
        fmt = detect_format(Path(path)) if cfg.data.eval_format == "auto" else cfg.data.eval_format
        published = published_count(path, fmt)
        found = len(ds) + len(ds.skipped)
        if published and found != published[1] and not cfg.data.max_samples:
            log.warning("%s: %d questions (%d usable, %d skipped), but %s has %d: a partial or changed copy; the "
                        "figures are over the usable ones only (skipped questions are listed in the report, not "
                        "scored as wrong), so they are not %s's", path, found, len(ds), len(ds.skipped),
                        published[0], published[1], published[0])
    return sets


def evaluate(cfg: Config, model=None, processor=None) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.eval.datasets``; write the report; return metrics.json's content."""
    cfg = with_output_dir(cfg)
    e = cfg.eval
    if e.group_size > 1 and e.temperature == 0:
        raise ConfigError("eval.group_size > 1 needs eval.temperature > 0 (greedy samples would be identical)")
    check_model_dir(cfg.model.path)  # local folders only, checked before anything else
    if e.adapter:
        check_adapter_dir(e.adapter)
    if (ckpt := enclosing_checkpoint(e.output_dir)) is not None:
        raise ConfigError(f"eval.output_dir={e.output_dir} lies inside the checkpoint {ckpt}: files written there "
                         "fail its manifest, so it could no longer be resumed or evaluated; choose another "
                         "eval.output_dir (by default runs/eval/<model>/<datasets>)")
    state = D.make_state(cfg.train.collective_timeout_s)
    out = Path(e.output_dir)
    D.check_shared_folder(out, "eval.output_dir")  # every rank writes its predictions there, rank 0 merges
    pred_dir = out / "predictions"
    datasets = eval_sets(cfg)
    for name, ds in datasets.items():
        if any(s.messages for s in ds):
            raise ConfigError(f"eval dataset {name} holds chat conversations (format chat): they are SFT data; "
                             "evaluate on multiple-choice question records")
    D.check_same("evaluation records", [row for ds in datasets.values() for row in ds.fingerprint_rows()],
                 "give every node the same copy of the datasets")
    _prepare_output(cfg, datasets)
    D.barrier()
    processor = processor or load_processor(cfg.model)
    model = model or load_model(cfg.model, state.device, adapter=cfg.eval.adapter or None)
    rcfg = replace(cfg.rollout, template=e.mode, group_size=e.group_size, temperature=e.temperature or 1.0,
                   max_turns=e.max_turns if get_template(e.mode).zoom_loop else 2)
    greedy = e.temperature == 0

    done = done_questions(read_predictions(pred_dir), e.group_size)
    mine = open(pred_dir / f"rank{state.process_index}.jsonl", "a")  # noqa: SIM115
    try:
        from tqdm import tqdm

        for name, ds in datasets.items():
            # Fixed batch boundaries: a resumed run forms exactly the same batches.
            batches = [list(range(i, min(i + e.batch_size, len(ds)))) for i in range(0, len(ds), e.batch_size)]
            todo = [(b, idx) for b, idx in enumerate(batches) if b % state.num_processes == state.process_index
                    and not all((name, ds[i].id) in done for i in idx)]
            for b, idx in tqdm(todo, desc=f"eval {name}", disable=not state.is_main_process):
                samples = [ds[i] for i in idx]
                torch.manual_seed(cfg.train.seed + b)  # sampling runs are reproducible per batch
                try:
                    batch = rollout(model, processor, samples, rcfg, min_pixels=cfg.model.min_pixels,
                                    max_pixels=cfg.model.max_pixels, greedy=greedy,
                                    max_prompt_tokens=cfg.data.max_prompt_tokens, crop=e.crop)
                    records = _records(batch, {s.id: s for s in samples}, name, e.group_size)
                    failed = batch.skipped
                except BadImageError as err:  # every prompt of the batch was refused; the reasons are in err
                    records, failed = [], [(s.id, str(err)) for s in samples]
                for sid, why in failed:
                    records.append({"id": sid, "dataset": name, "error": why})
                mine.write("".join(json.dumps(r) + "\n" for r in records))
                mine.flush()
                os.fsync(mine.fileno())
    finally:
        mine.close()
    D.barrier(timeout_s=24 * 3600)  # every rank's share written: rank 0 merges them (ranks may end hours apart)
    if not state.is_main_process:
        return {}
    return write_report(cfg, datasets, out)


def write_report(cfg: Config, datasets: dict[str, SampleSet], out: Path) -> dict:
    """Merge every rank's predictions and write predictions.jsonl, metrics.json, report.md, report.html."""
    records = read_predictions(out / "predictions")
    wanted = {(n, ds[i].id) for n, ds in datasets.items() for i in range(len(ds))}
    seen, good, errors = set(), [], {n: list(ds.skipped) for n, ds in datasets.items()}
    for r in records:
        key = (r["dataset"], r["id"], r.get("sample", 0))
        if key in seen or (r["dataset"], r["id"]) not in wanted:
            continue
        seen.add(key)
        if "error" in r:
            errors.setdefault(r["dataset"], []).append((r["id"], r["error"]))
        else:
            good.append(r)
    good.sort(key=lambda r: (r["dataset"], r["id"], r["sample"]))
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    metrics = compute_metrics(good, boxes=cfg.eval.mode != "direct")  # the direct prompt asks for no box
    proto = protocol(cfg) | {"datasets": {n: questions_stamp(ds) for n, ds in datasets.items()}}
    stored = out / "predictions" / PROTOCOL_FILE
    digest = json.loads(stored.read_text())["sha256"] if stored.exists() else None
    result = {"protocol": proto, "protocol_sha256": digest, "results": metrics,
              "skipped": {n: len(v) for n, v in errors.items()}}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(metrics, proto, errors))
    lookup = {(n, ds[i].id): ds[i] for n, ds in datasets.items() for i in range(len(ds))}
    html = render_html(good, lambda r: lookup[(r["dataset"], r["id"])].load_image(), cfg.eval.report_examples,
                       metrics, proto, errors)
    (out / "report.html").write_text(html)
    log.info("evaluation report: %s", out / "report.md")
    return result


CROPS_FILE = "crop_answerable.json"


def _turn1_box(record: dict) -> list[float] | None:
    """A prediction's first box in original pixels, when it was valid (K-turn: its first turn's)."""
    first = record["turns"][0] if record.get("turns") else record
    return first.get("box_original") if first.get("valid") else None


def judge_crop(sample, box_original, cfg: Config):
    """The crop the evaluated model was shown after its turn-1 box: the original's region under
    the box, enlarged into the evaluation's pixel budget as the rollout does."""
    crop = crop_original(sample.load_image(), Box(*box_original))
    return fit_to_budget(crop, cfg.model.min_pixels, cfg.model.max_pixels, cfg.rollout.crop_resample)


def crop_answerable(eval_dir: str | Path, judge: str, batch_size: int = 16) -> dict:
    """The paper's Table 3 for one evaluation: the share of its questions whose turn-1 crop
    alone lets ``judge`` (a model folder; in the paper, the base model) answer right.

    The judge gets one turn: the crop (``judge_crop``), the question and its options, asking
    for the option letter (the ``direct`` template), greedy. It never sees the original image,
    so its answer says what the crop holds, not what the judge can read from the full image.
    A question without a valid box counts as not answerable (there is no crop). The judge
    runs at the evaluation's pixel budget on its first sample of each question. Writes
    ``crop_answerable.json`` beside the evaluation's report."""
    from tqdm import tqdm

    out = Path(eval_dir)
    cfg = load_config(out / "config.yaml")
    check_model_dir(judge)
    judged = replace(cfg.model, path=judge)
    firsts = {(r["dataset"], r["id"]): r for r in read_predictions(out / "predictions")
              if "error" not in r and r.get("sample", 0) == 0}
    if not firsts:
        raise FileNotFoundError(f"{out / 'predictions'}: no predictions to judge")
    samples = {(name, s.id): s for name, ds in eval_sets(cfg).items() for s in ds}
    boxed = [(samples[k], box) for k, r in firsts.items() if k in samples and (box := _turn1_box(r))]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor, model = load_processor(judged), load_model(judged, device)
    one_turn = replace(cfg.rollout, template="direct", group_size=1)
    right = 0
    for lo in tqdm(range(0, len(boxed), batch_size), desc="judging crops"):
        kept, crops = [], []
        for s, box in boxed[lo: lo + batch_size]:
            try:
                crops.append(judge_crop(s, box, cfg))
                kept.append(s)
            except BadImageError as err:
                log.warning("crop_answerable: skipped: %s", err)
        if kept:
            batch = rollout(model, processor, kept, one_turn, min_pixels=cfg.model.min_pixels,
                            max_pixels=cfg.model.max_pixels, greedy=True, images=crops)
            right += sum(predicted_letter(t) == t.answer for t in batch.trajectories)
    result = {"evaluation": str(out), "judge": judge, "questions": len(firsts), "valid_boxes": len(boxed),
              "answerable": right, "share": 100.0 * right / len(firsts),
              "share_of_valid_boxes": 100.0 * right / len(boxed) if boxed else None}
    (out / CROPS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def newest_run_model(output_dir: str) -> str | None:
    """The model folder of the newest complete checkpoint under a training run whose model files
    pass the checkpoint's manifest, as a resume checks them; a damaged newer one is skipped with
    a warning naming the file, and when none passes this refuses rather than evaluate it."""
    from ..runtime.checkpoint import list_checkpoints

    problems = []
    for ckpt in reversed([c for c in list_checkpoints(output_dir) if (c / "model").is_dir()]):
        try:
            weights_identity(ckpt / "model")
        except CheckpointError as e:
            log.warning("not evaluating %s: %s; trying the previous checkpoint", ckpt, e)
            problems.append(str(e))
            continue
        return str(ckpt / "model")
    if problems:
        raise CheckpointError(f"no checkpoint of {output_dir} passes its manifest:\n  - " + "\n  - ".join(problems)
                              + "\npass model.path= to evaluate another model")
    return None

