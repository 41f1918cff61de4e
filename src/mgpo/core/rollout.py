"""The two-turn rollout: generate a box, crop the original, generate the answer.

For a batch of prompts, each sampled ``group_size`` times:

1. turn 1: batched ``generate`` on (system, image, question); vision special tokens are
   suppressed so the policy can never emit an ``<|image_pad|>`` that breaks the next
   forward;
2. ground: parse, check, map and crop each trajectory's box (``mgpo.grounding``); a
   missing or bad box falls back to the original image;
3. turn 2: each trajectory's input is built by *concatenating token ids*: the turn-1
   prompt, the tokens actually sampled (cut right after the box block, as the reference
   does), ``<|im_end|>``, then the turn-2 user block with its image. Sampled text is
   never decoded and re-encoded, so the tokens we train on are the tokens we sampled;
4. the result is a ``Rollout``: right-padded ids, the loss mask (1 on the model's own
   tokens of both turns), ``mm_token_type_ids`` for mRoPE, every distinct image once,
   and per-trajectory metadata.

The one-turn templates (``grpo``, ``direct``) stop after step 1 and keep the whole turn:
the box, if any, is only a diagnostic there. The K-turn template ``mgpo_k`` (beyond the
paper) runs its turns in ``mgpo.zoom`` with the same pieces.

Prompts are generated ``rollout.generation_batch_size`` whole groups at a time; each
chunk runs the same number of ``generate`` calls whatever the boxes look like (one per
turn), which is what keeps ZeRO-3 ranks in lock-step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .config import RolloutConfig
from .data import MIN_SIDE, BadImageError, Sample, load_image, prompt_length_problem
from .generation import (
    Continuation,
    Generated,
    continue_cache,
    generate_batch,
    generation_config,
    special_ids,
)
from .grounding import (
    FACTOR,
    Box,
    box_problem,
    crop_original,
    find_box,
    fit_to_budget,
    input_size_from_grid,
    smart_resize,
    to_original_box,
)
from .prompts import Template, chat_pieces, first_prompt_text, get_template, second_turn_text
from .trajectory import ImagePatches, Rollout, Trajectory, TurnRecord

__all__ = ["ImagePatches", "Rollout", "Trajectory", "TurnRecord", "chat_forced", "prompt_tokens", "rollout",
           "teacher_forced"]


# ----------------------------------------------------------------------------- hand-overs

@dataclass
class _Encoded:
    ids: torch.Tensor  # [L]
    image: ImagePatches


@dataclass
class _Prompt:
    sample: Sample
    original: object  # the decoded original (PIL image)
    enc: _Encoded  # the turn-1 prompt
    image: int  # index of its image in the rollout's image list
    script: tuple[str, ...] | None = None  # teacher forcing: the assistant text of each turn


@dataclass
class _Piece:
    tokens: torch.Tensor  # [L]
    trained: bool  # the model produced these tokens (loss mask 1)
    logp: torch.Tensor | None = None  # [L] generation-time log-probs, when recorded


@dataclass
class _Conversation:
    """One trajectory's tokens, piece by piece, and its images."""

    pieces: list[_Piece]
    images: list[int]
    kept: int = 0  # turn-1 tokens kept (the turn-2 cache continues after them)


@dataclass
class _Context:
    """Everything a rollout's turns share."""

    processor: object
    template: Template
    cfg: RolloutConfig
    ids: dict[str, int]
    greedy: bool
    record_logprobs: bool
    min_pixels: int
    max_pixels: int
    synced_gpus: bool
    images: list[ImagePatches] = field(default_factory=list)

    @property
    def stops(self) -> set[int]:
        return {self.ids["<|im_end|>"], self.ids["<|endoftext|>"]}

    def add_image(self, image: ImagePatches) -> int:
        self.images.append(image)
        return len(self.images) - 1

    def generation(self, max_new_tokens: int):
        return generation_config(self.cfg, max_new_tokens, self.ids, self.greedy, self.record_logprobs)


def prompt_tokens(processor, template_name: str, sample: Sample, min_pixels: int, max_pixels: int) -> int:
    """Length of ``sample``'s turn-1 prompt as `_encode` makes it, without decoding the image:
    the text's tokens with the one image placeholder expanded to (h/28)*(w/28) tokens of the
    header size resized by Qwen's rule. Lets training drop over-long prompts at load."""
    text = first_prompt_text(processor, get_template(template_name), sample.question, sample.options)
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    h, w = smart_resize(max(sample.height, MIN_SIDE), max(sample.width, MIN_SIDE), FACTOR, min_pixels, max_pixels)
    return n_text - 1 + (h // FACTOR) * (w // FACTOR)


def _encode(processor, text: str, images: list) -> _Encoded:
    """Tokenize one text with its image; the processor expands the image placeholder."""
    out = processor(text=[text], images=images, return_tensors="pt")
    return _Encoded(out["input_ids"][0], ImagePatches(out["pixel_values"], out["image_grid_thw"]))


def _closed(tokens: torch.Tensor, stops: set[int]) -> bool:
    """Did this turn end with a stop token (rather than at the token limit)?"""
    return len(tokens) > 0 and int(tokens[-1]) in stops


def _cut_after(tokenizer, tokens: torch.Tensor, text: str, end: int) -> int:
    """Fewest leading tokens whose decoded text covers ``text[:end]`` (binary search)."""
    target = text[:end]
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if tokenizer.decode(tokens[:mid], skip_special_tokens=False).startswith(target):
            hi = mid
        else:
            lo = mid + 1
    return hi


# ----------------------------------------------------------------------------- rollout

@torch.no_grad()
def rollout(model, processor, samples: list[Sample], cfg: RolloutConfig, *, min_pixels: int, max_pixels: int,
            greedy: bool = False, record_logprobs: bool = False, synced_gpus: bool = False,
            images: list | None = None, max_prompt_tokens: int = 0) -> Rollout:
    """Sample ``cfg.group_size`` conversations per prompt, in the template's turns.

    ``images`` are the samples' decoded originals when the caller has them already. A prompt
    longer than ``max_prompt_tokens`` (0 = no limit) is skipped like an unreadable image.
    """
    ctx = _Context(processor, get_template(cfg.template), cfg, special_ids(processor), greedy, record_logprobs,
                   min_pixels, max_pixels, synced_gpus)
    prompts, skipped = _encode_prompts(ctx, samples, images, max_prompt_tokens=max_prompt_tokens)
    was_training = model.training
    model.eval()
    trajectories, conversations = [], []
    per_call = cfg.generation_batch_size or len(prompts)
    try:
        for lo in range(0, len(prompts), per_call):  # whole groups per generate call
            t, c = _rollout_groups(model, ctx, prompts[lo: lo + per_call], first_group=lo)
            trajectories += t
            conversations += c
    finally:
        model.train(was_training)
    return _assemble(ctx, conversations, trajectories, skipped)


@torch.no_grad()
def teacher_forced(processor, samples: list[Sample], texts: list[tuple[str, ...]], cfg: RolloutConfig, *,
                   min_pixels: int, max_pixels: int, images: list | None = None, model=None) -> Rollout:
    """The conversations the rollout would build had the model written ``texts[i]`` (one
    string per assistant turn) for ``samples[i]``: SFT's batches, with the rollout's own
    box parsing, crop, token concatenation and loss mask. One trajectory per sample.

    With ``model``, ``texts`` may script turn 1 only: ``model`` then writes turn 2 greedily
    (the crop-answerability measure: given this box, does the model answer?)."""
    template = get_template(cfg.template)
    if not template.zoom_loop:  # (mgpo_k scripts end where their answer is)
        if any(len(t) != len(texts[0]) for t in texts) or not 0 < len(texts[0]) <= template.turns:
            raise ValueError(f"teacher_forced: every sample needs the same number of scripted turns, 1 to "
                             f"{template.turns} for the {cfg.template!r} template")
        if len(texts[0]) < template.turns and model is None:
            raise ValueError("teacher_forced: the texts script turn 1 only, and no model is given to write turn 2")
    ctx = _Context(processor, template, replace(cfg, group_size=1, continue_turn2=False), special_ids(processor),
                   greedy=True, record_logprobs=False, min_pixels=min_pixels, max_pixels=max_pixels,
                   synced_gpus=False)
    prompts, skipped = _encode_prompts(ctx, samples, images, texts)
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        trajectories, conversations = _rollout_groups(model, ctx, prompts, first_group=0)
    finally:
        if was_training:
            model.train()
    return _assemble(ctx, conversations, trajectories, skipped)


def chat_forced(processor, samples: list[Sample], *, min_pixels: int, max_pixels: int,
                images: list | None = None) -> Rollout:
    """SFT on ``chat`` records (``Sample.messages``): each conversation encoded piece by piece
    as a rollout is, the text between assistant messages (system, user blocks, their images)
    untrained, each assistant message and its closing ``<|im_end|>`` trained; the same
    `_assemble` builds the loss mask. ``images[i]``, when given, is sample i's first image
    decoded; a sample with an unreadable image is skipped and listed."""
    ctx = _Context(processor, get_template("mgpo"), RolloutConfig(group_size=1), special_ids(processor),
                   greedy=True, record_logprobs=False, min_pixels=min_pixels, max_pixels=max_pixels,
                   synced_gpus=False)
    tok, im_end = processor.tokenizer, ctx.ids["<|im_end|>"]
    trajectories, conversations, skipped = [], [], []
    for k, sample in enumerate(samples):
        paths = [value for _, parts in sample.messages for kind, value in parts if kind == "image"]
        try:
            loaded = [images[k] if images is not None else sample.load_image()]
            loaded += [load_image(path, sample.id) for path in paths[1:]]
        except BadImageError as e:
            skipped.append((sample.id, str(e)))
            continue
        pieces, shown, targets = [], [], []
        for text, target in chat_pieces(processor, sample.messages):
            if target:
                pieces.append(_Piece(torch.tensor(tok.encode(text, add_special_tokens=False) + [im_end]), True))
                targets.append(text)
                continue
            block = loaded[len(shown): len(shown) + text.count("<|vision_start|>")]
            out = processor(text=[text], images=block or None, return_tensors="pt")
            if block:  # one ImagePatches per image: the processor returns them concatenated
                grids = out["image_grid_thw"]
                for pixels, grid in zip(out["pixel_values"].split(grids.prod(-1).tolist()), grids.split(1)):
                    shown.append(ctx.add_image(ImagePatches(pixels, grid)))
            pieces.append(_Piece(out["input_ids"][0], False))
        t = Trajectory(sample.id, len(conversations), "", (), loaded[0].size,
                       input_size_from_grid(ctx.images[shown[0]].grid[0]), turns=len(targets))
        t.turn1_text, t.turn2_text = targets[0], targets[-1] if len(targets) > 1 else ""
        trajectories.append(t)
        conversations.append(_Conversation(pieces, shown))
    if not conversations:
        raise BadImageError("every conversation of the batch was skipped: " + "; ".join(r for _, r in skipped))
    return _assemble(ctx, conversations, trajectories, skipped)


def _scripted(ctx: _Context, texts: list[str]) -> Generated:
    """What ``generate`` would return had the model written ``texts`` and stopped."""
    tok, im_end = ctx.processor.tokenizer, ctx.ids["<|im_end|>"]
    tokens = [torch.tensor(tok.encode(t, add_special_tokens=False) + [im_end]) for t in texts]
    return Generated(tokens, [None] * len(texts), cache=None, width=0, steps=max(len(t) for t in tokens))


def _encode_prompts(ctx: _Context, samples: list[Sample], images: list | None, texts=None,
                    max_prompt_tokens: int = 0):
    """Decode each image once and encode each turn-1 prompt once; unreadable ones are skipped."""
    prompts, skipped = [], []
    for k, sample in enumerate(samples):
        try:
            original = images[k] if images is not None else sample.load_image()
        except BadImageError as e:
            skipped.append((sample.id, str(e)))
            continue
        text = first_prompt_text(ctx.processor, ctx.template, sample.question, sample.options)
        enc = _encode(ctx.processor, text, [original])
        if too_long := prompt_length_problem(len(enc.ids), max_prompt_tokens):
            skipped.append((sample.id, too_long))
            continue
        prompts.append(_Prompt(sample, original, enc, ctx.add_image(enc.image), texts[k] if texts else None))
    if not prompts:
        raise BadImageError("every prompt of the batch was skipped: " + "; ".join(r for _, r in skipped))
    return prompts, skipped


def _rollout_groups(model, ctx: _Context, prompts: list[_Prompt], first_group: int):
    """Turn 1 -> ground -> turn 2 for a chunk of whole groups."""
    group_size = ctx.cfg.group_size
    trajectories = [Trajectory(p.sample.id, first_group + g, p.sample.answer, tuple(p.sample.options),
                               p.original.size, input_size_from_grid(p.enc.image.grid[0]), turns=ctx.template.turns,
                               bare_letter=ctx.template.bare_letter,
                               target_boxes=tuple(tuple(b) for b in p.sample.target_boxes))
                    for g, p in enumerate(prompts) for _ in range(group_size)]
    if ctx.template.zoom_loop:  # mgpo_k: zoom or answer, turn after turn
        from .zoom import zoom_turns

        return trajectories, zoom_turns(model, ctx, prompts, trajectories)
    turn1 = _generate_turn1(model, ctx, prompts)
    conversations = [_close_turn1(ctx, t, prompts[i // group_size], turn1, i) for i, t in enumerate(trajectories)]
    if ctx.template.turns == 1:
        return trajectories, conversations
    if not ctx.cfg.continue_turn2:
        turn1.cache = None  # nothing reuses it: free the memory now
    # ---- ground: crop (or fall back) and encode each turn-2 user block
    blocks = _turn2_blocks(ctx, prompts, trajectories)
    # ---- turn 2: one batched generate (also when every box failed: lock-step)
    if prompts[0].script is not None and len(prompts[0].script) > 1:
        turn2 = _scripted(ctx, [p.script[1] for p in prompts])
    else:
        turn2 = _generate_turn2(model, ctx, prompts, conversations, blocks, turn1)
    for i, (t, conv, (block, image)) in enumerate(zip(trajectories, conversations, blocks)):
        out = turn2.tokens[i]
        t.turn2_truncated = not _closed(out, ctx.stops)
        t.turn2_text = ctx.processor.tokenizer.decode(out if t.turn2_truncated else out[:-1],
                                                      skip_special_tokens=False)
        t.turn2_tokens = len(out)
        conv.pieces += [_Piece(block.ids, False), _Piece(out, True, turn2.logps[i])]
        conv.images.append(image)
    return trajectories, conversations


def _generate_turn1(model, ctx: _Context, prompts: list[_Prompt]) -> Generated:
    """Turn 1: one batched generate (each prompt prefilled once, or once per sample); rows
    are trajectories, group by group."""
    group_size = ctx.cfg.group_size
    if prompts[0].script is not None:
        return _scripted(ctx, [p.script[0] for p in prompts])
    shared = ctx.cfg.shared_prefill and group_size > 1
    rows = 1 if shared else group_size  # input rows per prompt (shared: the cache is copied instead)
    return generate_batch(model, [p.enc.ids for p in prompts for _ in range(rows)],
                          [p.enc.image.pixel_values for p in prompts for _ in range(rows)],
                          [p.enc.image.grid for p in prompts for _ in range(rows)],
                          ctx.generation(ctx.cfg.max_new_tokens_turn1), ctx.ids["<|image_pad|>"],
                          ctx.synced_gpus, group_size=group_size if shared else 1)


def _close_turn1(ctx: _Context, t: Trajectory, prompt: _Prompt, turn1: Generated, i: int) -> _Conversation:
    """Read turn 1's box and decide which tokens stay in the conversation.

    Two turns: the turn is cut right after the box block (the reference's rule) and always
    closed with ``<|im_end|>`` (the sampled one when the model stopped right there,
    otherwise one we add and still train, as the reference does). One turn: the whole
    turn stays as sampled; the box is only recorded."""
    tok, im_end = ctx.processor.tokenizer, ctx.ids["<|im_end|>"]
    sampled, logp = turn1.tokens[i], turn1.logps[i]
    closed = _closed(sampled, ctx.stops)
    body = sampled[:-1] if closed else sampled
    text = tok.decode(body, skip_special_tokens=False)
    found = find_box(text)
    keep = len(body)
    if found is not None:
        box, end = found
        t.box_input = box.as_list()
        t.box_problem = box_problem(box, t.input_size, ctx.cfg.min_box_side, ctx.cfg.max_box_aspect)
        t.valid = t.box_problem is None
        if t.valid:  # in original pixels: the crop's region, or (one turn) the grounding figures' box
            t.box_original = to_original_box(box, t.input_size, t.original_size).as_list()
        if t.turns == 2:
            keep = _cut_after(tok, body, text, end)
    t.turn1_truncated = not closed and (found is None or t.turns == 1)
    t.turn1_text = tok.decode(body[:keep], skip_special_tokens=False)
    if t.turns == 1:
        t.turn1_tokens = len(sampled)
        return _Conversation([_Piece(prompt.enc.ids, False), _Piece(sampled, True, logp)], [prompt.image], keep)
    sampled_close = closed and keep == len(body) and int(sampled[-1]) == im_end
    tokens = torch.cat([body[:keep], torch.tensor([im_end])])
    if logp is not None:
        logp = torch.cat([logp[:keep], logp[keep:keep + 1] if sampled_close else torch.tensor([float("nan")])])
    t.turn1_tokens = len(tokens)
    return _Conversation([_Piece(prompt.enc.ids, False), _Piece(tokens, True, logp)], [prompt.image], keep)


def _turn2_blocks(ctx: _Context, prompts: list[_Prompt], trajectories: list[Trajectory]):
    """Per trajectory: the turn-2 user block (lead, image, question) and its image's index.

    A valid box crops the original (mapped from input pixels) and enlarges the crop into
    the pixel budget. Otherwise the block is the fallback text with the original again:
    the same for the whole group, so it is encoded once and its image is the group's
    first image (identical patches)."""
    blocks, crop_text, fallback = [], {}, {}
    for i, t in enumerate(trajectories):
        g = i // ctx.cfg.group_size
        p = prompts[g]
        q, options = p.sample.question, p.sample.options
        if t.valid:
            box = Box(*t.box_original)  # mapped when turn 1 was closed
            crop = fit_to_budget(crop_original(p.original, box), ctx.min_pixels, ctx.max_pixels,
                                 ctx.cfg.crop_resample)
            t.crop_size = crop.size
            if g not in crop_text:  # the same words for every crop of the group
                crop_text[g] = second_turn_text(ctx.processor, ctx.template, q, options, True)
            block = _encode(ctx.processor, crop_text[g], [crop])
            blocks.append((block, ctx.add_image(block.image)))
        else:
            if g not in fallback:
                fallback[g] = _encode(ctx.processor, second_turn_text(ctx.processor, ctx.template, q, options,
                                                                           False), [p.original])
            blocks.append((fallback[g], p.image))
    return blocks


def _generate_turn2(model, ctx: _Context, prompts, conversations, blocks, turn1: Generated) -> Generated:
    """Turn 2 for every trajectory: continued from turn 1's cache, or re-read from scratch."""
    seqs, pixels, grids, rows = [], [], [], []
    for i, (conv, (block, _)) in enumerate(zip(conversations, blocks)):
        p = prompts[i // ctx.cfg.group_size]
        seqs.append(torch.cat([piece.tokens for piece in conv.pieces] + [block.ids]))
        pixels.append(torch.cat([p.enc.image.pixel_values, block.image.pixel_values]))
        grids.append(torch.cat([p.enc.image.grid, block.image.grid]))
        rows.append(Continuation(i, conv.kept, seqs[-1], grids[-1], block.image.pixel_values, block.image.grid))
    gen = ctx.generation(ctx.cfg.max_new_tokens_turn2)
    prepared = None
    if turn1.cache is not None:
        prepared = continue_cache(model, turn1, rows, ctx.ids["<|image_pad|>"], ctx.ids["<|endoftext|>"])
        turn1.cache = None
    return generate_batch(model, seqs, pixels, grids, gen, ctx.ids["<|image_pad|>"], ctx.synced_gpus,
                          prepared=prepared)


def _assemble(ctx: _Context, conversations: list[_Conversation], trajectories, skipped) -> Rollout:
    """Right-pad the finished conversations and build the one loss mask."""
    lengths = [sum(len(p.tokens) for p in c.pieces) for c in conversations]
    n, width = len(conversations), max(lengths)
    pad_id, image_token = ctx.ids["<|endoftext|>"], ctx.ids["<|image_pad|>"]
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.float32)
    sample_logp = torch.full((n, width), float("nan")) if ctx.record_logprobs else None
    for i, conv in enumerate(conversations):
        pos = 0
        for piece in conv.pieces:
            span = slice(pos, pos + len(piece.tokens))
            input_ids[i, span] = piece.tokens
            if piece.trained:
                loss_mask[i, span] = 1.0
                if sample_logp is not None and piece.logp is not None:
                    sample_logp[i, span] = piece.logp
            pos += len(piece.tokens)
        attention_mask[i, :pos] = 1
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        mm_token_type_ids=(input_ids == image_token).long() * attention_mask,
        images=ctx.images,
        image_index=[c.images for c in conversations],
        trajectories=trajectories,
        skipped=skipped,
        sample_logp=sample_logp,
    )
