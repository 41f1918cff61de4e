"""The two-turn rollout: generate a box, crop the original, generate the answer.

For a batch of prompts, each sampled ``group_size`` times:

1. turn 1: batched ``generate`` on (system, image, question); vision special tokens are
   suppressed so the policy can never emit an ``<|image_pad|>`` that breaks the next
   forward;
2. ground: parse, check, map and crop each trajectory's box (``grounding.py``); a
   missing or bad box falls back to the original image;
3. turn 2: each trajectory's input is built by *concatenating token ids*: the turn-1
   prompt, the tokens actually sampled (cut right after the box block, as the authors'
   code does), ``<|im_end|>``, then the turn-2 user block with its image. Sampled text is
   never decoded and re-encoded, so the tokens we train on are the tokens we sampled;
4. the result is a ``Rollout``: right-padded ids, the loss mask (1 on the model's own
   tokens of both turns), ``mm_token_type_ids`` for mRoPE, every distinct image once,
   and per-trajectory metadata.

The one-turn templates (``grpo``, ``direct``) stop after step 1 and keep the whole turn:
the box, if any, is only a diagnostic there. The K-turn template ``mgpo_k`` (beyond the
paper) runs its turns in ``zoom.py`` with the same pieces (``conversation.py``).

Prompts are generated ``rollout.generation_batch_size`` whole groups at a time; each
chunk runs the same number of ``generate`` calls whatever the boxes look like (one per
turn), which is what keeps ZeRO-3 ranks in lock-step.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..config import RolloutConfig
from ..data.samples import Sample
from ..runtime.family import processor_family
from .conversation import (
    Context,
    Conversation,
    Piece,
    Prompt,
    assemble,
    close_at_box,
    cut_after,
    encode,
    encode_prompts,
    generate_turn1,
    is_closed,
    next_turn,
    stream_requests,
    write_turn,
)
from .generation import Continuation, Generated, continue_cache, generate_batch, special_ids
from .grounding import (
    Box,
    box_problem,
    counterfactual_region,
    crop_original,
    find_box,
    fit_to_budget,
    input_size_from_grid,
    smart_resize,
    to_original_box,
)
from .prompts import first_prompt_text, get_template, second_turn_text
from .stream import Finished, Request
from .trajectory import Rollout, Trajectory
from .zoom import zoom_stream, zoom_turns

# ----------------------------------------------------------------------------- hand-overs


def prompt_tokens(processor, template_name: str, sample: Sample, min_pixels: int, max_pixels: int) -> int:
    """Length of ``sample``'s turn-1 prompt as `encode` makes it, without decoding the image:
    the text's tokens with the one image placeholder expanded to (h/f)*(w/f) tokens of the
    header size resized by Qwen's rule (f: the family's factor, 28 or 32). Lets training drop
    over-long prompts at load."""
    text = first_prompt_text(processor, get_template(template_name), sample.question, sample.options)
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    factor = processor_family(processor).factor
    h, w = smart_resize(sample.height, sample.width, factor, min_pixels, max_pixels)
    return n_text - 1 + (h // factor) * (w // factor)


# ----------------------------------------------------------------------------- rollout

@torch.no_grad()
def rollout(model, processor, samples: list[Sample], cfg: RolloutConfig, *, min_pixels: int, max_pixels: int,
            greedy: bool = False, record_logprobs: bool = False, synced_gpus: bool = False,
            images: list | None = None, max_prompt_tokens: int = 0, crop: str = "model") -> Rollout:
    """Sample ``cfg.group_size`` conversations per prompt, in the template's turns.

    ``images`` are the samples' decoded originals when the caller has them already. A prompt
    longer than ``max_prompt_tokens`` (0 = no limit) is skipped like an unreadable image.
    ``crop``: what turn 2 shows (``eval.crop``; ``grounding.counterfactual_region``).
    """
    ctx = Context(processor, get_template(cfg.template), cfg, special_ids(processor), greedy, record_logprobs,
                   min_pixels, max_pixels, synced_gpus, crop=crop)
    prompts, skipped = encode_prompts(ctx, samples, images, max_prompt_tokens=max_prompt_tokens,
                                      count=lambda s: prompt_tokens(processor, cfg.template, s, min_pixels, max_pixels))
    was_training = model.training
    model.eval()
    trajectories, conversations = [], []
    per_call = cfg.generation_batch_size or len(prompts)
    try:
        if cfg.continuous_batching:  # one stream: rows leave, groups and next turns join
            trajectories, conversations = stream_groups(model, ctx, prompts, capacity=per_call * cfg.group_size)
        else:
            for lo in range(0, len(prompts), per_call):  # whole groups per generate call
                trajs, convs = rollout_groups(model, ctx, prompts[lo: lo + per_call], first_group=lo)
                trajectories += trajs
                conversations += convs
    finally:
        model.train(was_training)
    return assemble(ctx, conversations, trajectories, skipped)


def rollout_groups(model, ctx: Context, prompts: list[Prompt], first_group: int):
    """Turn 1 -> ground -> turn 2 for a chunk of whole groups."""
    group_size = ctx.cfg.group_size
    trajectories = _trajectories(ctx, prompts, first_group)
    if ctx.template.zoom_loop:  # mgpo_k: zoom or answer, turn after turn
        return trajectories, zoom_turns(model, ctx, prompts, trajectories)
    rows = list(range(len(trajectories)))
    turn1 = write_turn(ctx, prompts, 1, rows, lambda: generate_turn1(model, ctx, prompts))
    conversations = [_close_turn1(ctx, traj, prompts[i // group_size], turn1.tokens[i], turn1.logps[i])
                     for i, traj in enumerate(trajectories)]
    if ctx.template.turns == 1:
        return trajectories, conversations
    if not ctx.cfg.continue_turn2:
        turn1.cache = None  # nothing reuses it: free the memory now
    # ---- ground: crop (or fall back) and encode each turn-2 user block
    texts = ({}, {})  # per group: the crop block's words, the fallback block
    blocks = [_turn2_block(ctx, prompts, traj, i, texts) for i, traj in enumerate(trajectories)]
    # ---- turn 2: one batched generate (also when every box failed: lock-step)
    turn2 = write_turn(ctx, prompts, 2, rows, lambda: _generate_turn2(model, ctx, prompts, conversations, blocks, turn1))
    for i, (traj, conv, block) in enumerate(zip(trajectories, conversations, blocks)):
        _close_turn2(ctx, traj, conv, block, turn2.tokens[i], turn2.logps[i])
    return trajectories, conversations


def stream_groups(model, ctx: Context, prompts: list[Prompt], capacity: int):
    """The same conversations as ``rollout_groups``, decoded as one stream (``decode_stream``):
    each prompt group joins when there is room, and each row's turn 2 joins as soon as its turn 1
    has stopped and been cropped, prefilled from scratch (the turn-1 cache is not kept)."""
    trajectories = _trajectories(ctx, prompts, 0)
    if ctx.template.zoom_loop:  # mgpo_k: each row's next turn joins the stream
        return trajectories, zoom_stream(model, ctx, prompts, trajectories, capacity)
    conversations, blocks, texts = [None] * len(trajectories), [None] * len(trajectories), ({}, {})

    def finished(row: Finished) -> list[Request]:
        turn, i = row.key[0], row.key[1] + row.copy  # key: (turn, the request's first row)
        traj = trajectories[i]
        if turn == 2:
            _close_turn2(ctx, traj, conversations[i], blocks[i], row.tokens, row.logps)
            return []
        conversations[i] = conv = _close_turn1(ctx, traj, prompts[i // ctx.cfg.group_size], row.tokens, row.logps)
        if ctx.template.turns == 1:
            return []
        blocks[i] = block, image = _turn2_block(ctx, prompts, traj, i, texts)
        return [next_turn(ctx, 2, i, torch.cat([piece.tokens for piece in conv.pieces] + [block.ids]),
                          conv.images + [image])]

    stream_requests(model, ctx, prompts, finished, capacity)
    return trajectories, conversations


def _trajectories(ctx: Context, prompts: list[Prompt], first_group: int) -> list[Trajectory]:
    """One trajectory record per sample, group by group."""
    return [Trajectory(p.sample.id, first_group + g, p.sample.answer, tuple(p.sample.options), p.original.size,
                       input_size_from_grid(p.enc.image.grid[0], ctx.family.patch), turns=ctx.template.turns,
                       bare_letter=ctx.template.bare_letter, target_boxes=tuple(tuple(b) for b in p.sample.target_boxes))
            for g, p in enumerate(prompts) for _ in range(ctx.cfg.group_size)]


def _close_turn2(ctx: Context, traj: Trajectory, conv: Conversation, block, out: torch.Tensor, logp) -> None:
    """Record turn 2 and append the user block and the answer to the conversation."""
    (block, image) = block
    traj.turn2_truncated = not is_closed(out, ctx.stops)
    traj.turn2_text = ctx.processor.tokenizer.decode(out if traj.turn2_truncated else out[:-1],
                                                  skip_special_tokens=False)
    traj.turn2_tokens = len(out)
    conv.pieces += [Piece(block.ids, False), Piece(out, True, logp)]
    conv.images.append(image)


def _close_turn1(ctx: Context, traj: Trajectory, prompt: Prompt, sampled: torch.Tensor, logp) -> Conversation:
    """Read turn 1's box and decide which tokens stay in the conversation.

    Two turns: the turn is cut right after the box block (the authors' code's rule) and always
    closed with ``<|im_end|>`` (the sampled one when the model stopped right there,
    otherwise one we add and still train, as the authors' code does). One turn: the whole
    turn stays as sampled; the box is only recorded."""
    tok, im_end = ctx.processor.tokenizer, ctx.ids["<|im_end|>"]
    closed = is_closed(sampled, ctx.stops)
    body = sampled[:-1] if closed else sampled
    text = tok.decode(body, skip_special_tokens=False)
    found = find_box(text)
    keep = len(body)
    grid = ctx.family.box_grid
    if found is not None:
        box, end = found
        traj.box_input = box.as_list()
        traj.box_problem = box_problem(box, traj.input_size, ctx.cfg.min_box_side, ctx.cfg.max_box_aspect, grid)
        traj.valid = traj.box_problem is None
        if traj.valid:  # in original pixels: the crop's region, or (one turn) the grounding figures' box
            traj.box_original = to_original_box(box, traj.input_size, traj.original_size, grid).as_list()
        if traj.turns == 2:
            keep = cut_after(tok, body, text, end)
    traj.turn1_truncated = not closed and (found is None or traj.turns == 1)
    traj.turn1_text = tok.decode(body[:keep], skip_special_tokens=False)
    if traj.turns == 1:
        traj.turn1_tokens = len(sampled)
        return Conversation([Piece(prompt.enc.ids, False), Piece(sampled, True, logp)], [prompt.image], keep)
    tokens, logp = close_at_box(sampled, logp, keep, closed, im_end)
    traj.turn1_tokens = len(tokens)
    return Conversation([Piece(prompt.enc.ids, False), Piece(tokens, True, logp)], [prompt.image], keep)


def _turn2_block(ctx: Context, prompts: list[Prompt], traj: Trajectory, i: int, texts: tuple[dict, dict]):
    """Trajectory ``i``'s turn-2 user block (lead, image, question) and its image's index.

    A valid box crops the original (mapped from the model's coordinates) and enlarges the crop
    into the pixel budget. Otherwise the block is the fallback text with the original again:
    the same for the whole group, so it is encoded once (``texts``: per group, the crop block's
    words and the fallback block) and its image is the group's first image (identical patches)."""
    crop_text, fallback = texts
    g = i // ctx.cfg.group_size
    p = prompts[g]
    q, options = p.sample.question, p.sample.options
    crop = _shown_image(ctx, p, traj, f"{p.sample.id}-{i % ctx.cfg.group_size}")  # question, sample
    if crop is not None:
        traj.crop_size = crop.size
        if g not in crop_text:  # the same words for every crop of the group
            crop_text[g] = second_turn_text(ctx.processor, ctx.template, q, options, True)
        block = encode(ctx.processor, crop_text[g], [crop])
        return block, ctx.add_image(block.image)
    if g not in fallback:
        fallback[g] = encode(ctx.processor, second_turn_text(ctx.processor, ctx.template, q, options, False),
                             [p.original])
    return fallback[g], p.image


def _shown_image(ctx: Context, p: Prompt, traj: Trajectory, key: str):
    """The image turn 2 shows in the crop's place, or None for the fallback: the original's region
    under the model's box, enlarged into the pixel budget; or, in evaluation's counterfactuals
    (``ctx.crop``), a black image of that crop's size, a same-size crop elsewhere, the whole
    original, or the target's crop (``grounding.counterfactual_region``)."""
    if ctx.crop == "full":
        return p.original if traj.valid else None  # the processor resizes it, as the fallback's
    box = Box(*traj.box_original) if traj.valid else None  # mapped when turn 1 was closed
    region = counterfactual_region(ctx.crop, box, p.sample.target_boxes, p.original.size, key)
    if region is None:
        return None
    crop = fit_to_budget(crop_original(p.original, region), ctx.min_pixels, ctx.max_pixels, ctx.cfg.crop_resample,
                         ctx.family.factor)
    return Image.new("RGB", crop.size) if ctx.crop == "black" else crop


def _generate_turn2(model, ctx: Context, prompts, conversations, blocks, turn1: Generated) -> Generated:
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

