"""Evaluation with a pinned protocol: resumable, shardable, with grounding diagnostics.

    python eval.py --config configs/tiny_cpu.yaml                       # the embedded default
    python eval.py --config configs/qwen2_5_vl_7b_mgpo.yaml model.path=/models/ckpt \
        eval.datasets=[/data/vstar_bench,/data/MME-RealWorld-Lite.json] eval.mode=mgpo
    accelerate launch eval.py ...                                       # each rank takes a shard
    python eval.py compare runs/eval_base runs/eval_mgpo                 # side by side

Predictions are appended, one batch at a time, to ``predictions/rank{r}.jsonl``; a rerun
skips the batches already there, so a killed evaluation loses at most the batch in flight.
The crop is computed by ``mgpo.rollout``, the same code the trainer uses.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from . import distributed as D
from .config import Config, save_config
from .data import BadImageError, SampleSet, load_samples
from .model import load_model, load_processor
from .prompts import get_template
from .report import compute_metrics, fingerprint, render_markdown
from .report_html import render_html
from .reward import predicted_letter
from .rollout import rollout

log = logging.getLogger("mgpo")


def protocol(cfg: Config) -> dict:
    """Everything that changes a number, stated with every result."""
    e, r = cfg.eval, cfg.rollout
    decoding = "greedy" if e.temperature == 0 else f"sampling T={e.temperature}, top_p={r.top_p}"
    return {
        "model": cfg.model.path, "adapter": e.adapter or "none", "mode": e.mode,
        "min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels, "decoding": decoding,
        "samples_k": e.samples, "max_new_tokens": f"{r.max_new_tokens_turn1}/{r.max_new_tokens_turn2}",
        "crop_resample": r.crop_resample, "box_rule": f"sides > {r.min_box_side}, aspect < {r.max_box_aspect}",
        "answer_match": "exact option letter in the last \\boxed{}" + (
            ", else a bare letter reply (B, (B), B.)" if get_template(e.mode).bare_letter else ""),
    } | ({"max_turns": e.max_turns, "max_image_tokens": r.max_image_tokens or "no cap",
          "template_wording": "mgpo_k: this project's K-turn prompts, not the paper's"}
         if get_template(e.mode).zoom_loop else {})


def _load_policy(cfg: Config, device):
    model = load_model(cfg.model, device)
    if cfg.eval.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.eval.adapter).merge_and_unload().eval()
    return model


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


def _read_predictions(pred_dir: Path) -> list[dict]:
    records = []
    for f in sorted(pred_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill: its batch is redone
    return records


def _dataset_name(path: str) -> str:
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def evaluate(cfg: Config, model=None, processor=None) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.eval.datasets``; write the report; return metrics.json's content."""
    e = cfg.eval
    if e.samples > 1 and e.temperature == 0:
        raise ValueError("eval.samples > 1 needs eval.temperature > 0 (greedy samples would be identical)")
    state = D.make_state()
    out = Path(e.output_dir)
    pred_dir = out / "predictions"
    if state.is_main_process:
        pred_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    state.wait_for_everyone()
    processor = processor or load_processor(cfg.model)
    model = model or _load_policy(cfg, state.device)
    rcfg = replace(cfg.rollout, template=e.mode, group_size=e.samples, temperature=e.temperature or 1.0,
                   max_turns=e.max_turns if get_template(e.mode).zoom_loop else 2)
    greedy = e.temperature == 0

    datasets: dict[str, SampleSet] = {}
    for path in e.datasets or (cfg.data.eval,):
        name = _dataset_name(path)
        datasets[name] = load_samples(path, cfg.data.eval_format, image_root=cfg.data.image_root or None,
                                      max_samples=cfg.data.max_samples, name=name)

    done = {(r["dataset"], r["id"]) for r in _read_predictions(pred_dir)}
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
                                    max_prompt_tokens=cfg.data.max_prompt_tokens)
                    records = _records(batch, {s.id: s for s in samples}, name, e.samples)
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
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    return write_report(cfg, datasets, out)


def write_report(cfg: Config, datasets: dict[str, SampleSet], out: Path) -> dict:
    """Merge every rank's predictions and write predictions.jsonl, metrics.json, report.md, report.html."""
    records = _read_predictions(out / "predictions")
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
    metrics = compute_metrics(good)
    proto = protocol(cfg) | {"datasets": {n: fingerprint(ds[i].id for i in range(len(ds)))
                                          for n, ds in datasets.items()}}
    result = {"protocol": proto, "results": metrics, "skipped": {n: len(v) for n, v in errors.items()}}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(metrics, proto, errors))
    lookup = {(n, ds[i].id): ds[i] for n, ds in datasets.items() for i in range(len(ds))}
    html = render_html(good, lambda r: lookup[(r["dataset"], r["id"])].load_image(), cfg.eval.report_examples,
                       metrics, proto, errors)
    (out / "report.html").write_text(html)
    log.info("evaluation report: %s", out / "report.md")
    return result


def newest_run_model(output_dir: str) -> str | None:
    """The model folder of the newest complete checkpoint under a training run, if any."""
    from .checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(output_dir)
    return str(ckpt / "model") if ckpt is not None and (ckpt / "model").is_dir() else None

