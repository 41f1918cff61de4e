"""Supervised fine-tuning targets, in the same templates the rollout uses.

SFT runs through the trainer (``train.algorithm: sft``): same config, launches,
checkpoints, logging. A record becomes the conversation the rollout would build had the
model written the target text of each turn (``forced.teacher_forced``), so the loss
mask is the rollout's own: the assistant tokens of every turn, nothing else.

Targets per template, and what each teaches:
- ``grpo``: one turn, the box block (when the record has a target box) and
  ``\\boxed{LETTER}``. On records without boxes (the paper's data has none) the target is the
  answer alone: the paper's SFT baseline, which answers in one turn.
- ``direct``: the bare letter, one turn: answering without any grounding format.
- ``mgpo``: turn 1 is a Qwen-style grounding block around the record's target (widened to a
  valid box in input pixels, written in the family's convention: input pixels for Qwen2.5-VL,
  the 0-1000 grid for Qwen3-VL), turn 2 ``\\boxed{LETTER}`` after the crop: it teaches
  the two-turn format, grounding then answering from the crop, and so needs target boxes.
  A record without one would train an empty turn 1 (just ``<|im_end|>``, then the fallback),
  teaching the model never to ground: ``check_sft_targets`` refuses data where no record
  has a box and warns when some lack one.
- ``mgpo_k`` (K turns): zoom towards the target until it is shown at full resolution or
  K - 1 zooms are used, each box drawn on the latest view (so a second box is nested in the
  first crop), then ``\\boxed{LETTER}``; a record without a box answers in turn 1, which
  this template allows.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

from ..config import Config
from ..runtime.family import DEFAULT, Family, processor_family
from .forced import chat_forced, chat_tokens, teacher_forced
from .grounding import Box, View, pixel_box, smart_resize, view_to_original
from .prompts import get_template
from .rollout import prompt_tokens
from .trajectory import Rollout

MIN_TARGET_SIDE = 56  # input pixels: twice the validity threshold, so the crop keeps some context

log = logging.getLogger("mgpo")


def sft_batch(cfg: Config, processor, samples, images, batch_index: int, reserve) -> Rollout:
    """One SFT batch: chat records' own assistant messages, or each question record's targets in
    the template of this rollout batch (``train.sft_templates`` and ``train.sft_max_turns`` taken in
    turn), teacher-forced through the rollout's own code, so the loss mask is the rollout's."""
    m = cfg.model
    if samples[0].messages:
        return chat_forced(processor, samples, min_pixels=m.min_pixels, max_pixels=m.max_pixels, images=images,
                           reserve=reserve)
    templates = cfg.train.sft_templates or (cfg.rollout.template,)
    turns = cfg.train.sft_max_turns or (cfg.rollout.max_turns,)
    rollout_cfg = replace(cfg.rollout, template=templates[batch_index % len(templates)],
                          max_turns=turns[batch_index % len(turns)])
    family = processor_family(processor)
    texts = [sft_texts(s, rollout_cfg.template, im.size, m.min_pixels, m.max_pixels, rollout_cfg.max_turns, family)
             for s, im in zip(samples, images)]
    return teacher_forced(processor, samples, texts, rollout_cfg, min_pixels=m.min_pixels, max_pixels=m.max_pixels,
                          images=images)


def check_training_data(cfg: Config, data) -> None:
    """What each algorithm trains on: chat conversations are SFT data (RL refuses them), and SFT
    in the mgpo template needs target boxes (``check_sft_targets``)."""
    chat = any(s.messages for s in data)
    if chat and cfg.train.algorithm != "sft":
        raise ValueError(f"{cfg.data.train} holds chat conversations (format chat): they are SFT data; "
                         "set train.algorithm=sft, or give RL a question file")
    if cfg.train.algorithm == "sft" and not chat:
        check_sft_targets(data, cfg.train.sft_templates or (cfg.rollout.template,), cfg.data.train)


def record_tokens(cfg: Config, processor, sample) -> int:
    """A training record's length as ``data.max_prompt_tokens`` counts it: a chat record's whole
    conversation, a question record's turn-1 prompt (no image is decoded)."""
    m = cfg.model
    if sample.messages:
        return chat_tokens(processor, sample, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
    return prompt_tokens(processor, cfg.rollout.template, sample, m.min_pixels, m.max_pixels)


def check_sft_targets(samples, templates, source) -> None:
    """Refuse SFT in the two-turn ``mgpo`` template when no record of ``source`` has a target
    box (every turn 1 would be empty: the model would learn never to ground); warn when some
    lack one. The other templates take records without boxes."""
    if "mgpo" not in templates:
        return
    missing = sum(not s.target_boxes for s in samples)
    if missing == len(samples):
        raise ValueError(f"{source}: no record has a target box, so SFT in the mgpo template would train an "
                         "empty turn 1 (the model learns never to ground); for the paper's SFT baseline (one "
                         "turn, the answer only) set train.sft_templates=[grpo] (or [direct])")
    if missing:
        log.warning("%s: %d of %d records have no target box: in the mgpo template their SFT turn 1 is empty "
                    "(it teaches not to ground)", source, missing, len(samples))


def input_size(original_size: tuple[int, int], min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(width, height) of the image the model sees, as Qwen's processor resizes it (``factor``:
    the family's, 28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
    w, h = original_size
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return rw, rh


def target_box(sample, original_size, size_in, region: Box | None = None) -> Box | None:
    """The box enclosing every target, mapped to input pixels of the view of ``region`` (default:
    the whole original) and widened to at least ``MIN_TARGET_SIDE`` on each side (clamped);
    fractional (``written`` rounds it as the family writes boxes)."""
    if not sample.target_boxes:
        return None
    region = region or Box(0, 0, *original_size)
    (W, H), (w, h), (ox, oy) = (region.width, region.height), size_in, (region.x1, region.y1)
    x1, y1 = (min(b[0] for b in sample.target_boxes) - ox) * w / W, (min(b[1] for b in sample.target_boxes) - oy) * h / H
    x2, y2 = (max(b[2] for b in sample.target_boxes) - ox) * w / W, (max(b[3] for b in sample.target_boxes) - oy) * h / H
    sides = []
    for lo, hi, limit in ((x1, x2, w), (y1, y2, h)):
        side = min(limit, max(hi - lo, MIN_TARGET_SIDE))
        start = min(max(0.0, (lo + hi) / 2 - side / 2), limit - side)
        sides.append((start, start + side))
    (bx1, bx2), (by1, by2) = sides
    return Box(bx1, by1, bx2, by2)


def written(box: Box, size_in: tuple[int, int], grid: int | None) -> Box:
    """An input-pixel box as the family writes it: in whole pixels (rounded), or on its 0..``grid``
    grid rounded outwards (a grid step can be wider than a pixel: the written box still holds the box).

    >>> written(Box(320, 0, 640, 240), (640, 480), 1000), written(Box(1, 1, 2, 2), (3000, 3000), 1000)
    (Box(x1=500, y1=0, x2=1000, y2=500), Box(x1=0, y1=0, x2=1, y2=1))
    >>> written(Box(10.4, 0.5, 99.6, 50), (640, 480), None)
    Box(x1=10, y1=0, x2=100, y2=50)
    """
    if grid is None:
        return Box(round(box.x1), round(box.y1), round(box.x2), round(box.y2))
    w, h = size_in
    return Box(math.floor(box.x1 * grid / w), math.floor(box.y1 * grid / h),
               math.ceil(box.x2 * grid / w), math.ceil(box.y2 * grid / h))


def grounding_block(box: Box, label: str) -> str:
    """Qwen's native grounding output: a fenced JSON list of ``{"bbox_2d", "label"}``."""
    item = {"bbox_2d": [int(v) for v in box.as_list()], "label": label or "target"}
    return "```json\n" + json.dumps([item]) + "\n```"


def zoom_path(sample, original_size, min_pixels: int, max_pixels: int, max_zooms: int,
              family: Family = DEFAULT) -> list[Box]:
    """``mgpo_k``'s boxes towards the target: each on the latest view, as the family writes it
    there, until the target is shown at full resolution (or ``max_zooms`` are used)."""
    region, boxes, grid = Box(0, 0, *original_size), [], family.box_grid
    while len(boxes) < max_zooms:
        size_in = input_size((round(region.width), round(region.height)), min_pixels, max_pixels, family.factor)
        box = target_box(sample, original_size, size_in, region)
        if box is None or region.width <= size_in[0]:  # already at full resolution (or no target)
            break
        boxes.append(written(box, size_in, grid))
        region = Box(*map(float, pixel_box(view_to_original(boxes[-1], View(region, size_in), grid), original_size)))
    return boxes


def sft_texts(sample, template: str, original_size, min_pixels: int, max_pixels: int,
              max_turns: int = 2, family: Family = DEFAULT) -> tuple[str, ...]:
    """The assistant text of each turn for one record, boxes in ``family``'s convention."""
    tmpl = get_template(template)
    answer = f"\\boxed{{{sample.answer}}}"
    if tmpl.bare_letter:
        return (sample.answer,)
    if tmpl.zoom_loop:
        label = sample.category.replace("_", " ")
        path = zoom_path(sample, original_size, min_pixels, max_pixels, max_turns - 1, family)
        return (*(grounding_block(b, label) for b in path), answer)
    size_in = input_size(original_size, min_pixels, max_pixels, family.factor)
    box = target_box(sample, original_size, size_in)
    block = grounding_block(written(box, size_in, family.box_grid), sample.category.replace("_", " ")) if box is not None else ""
    if tmpl.turns == 1:
        return ((block + " " + answer).strip(),)
    return (block, answer)
