"""The K-turn rollout (``mgpo_k``, beyond the paper): each turn zooms or answers.

Every assistant turn either writes a box, which crops that region from the ORIGINAL image
(a box drawn on a crop is mapped back through that crop's resize and offset, so a nested
zoom reaches full resolution) and shows it in a new user turn; or writes ``\\boxed{}``,
which ends the conversation. A turn with neither, or with an unusable box, gets the
fallback text and the previous image again. Turn ``rollout.max_turns`` is a forced answer;
so is a turn whose next image would pass the image-token cap (``image_token_cap``).

Batched: each turn is one ``generate`` over the trajectories still running. Turn k+1
continues from turn k's cache (``continue_cache`` with the running rows only) or re-reads
every conversation (``continue_turn2 = False``). Under ZeRO-3 (``synced_gpus``) every rank
runs exactly ``max_turns`` calls: a rank whose trajectories have all finished still joins
each one with a dummy row whose output is thrown away. Turn 1 uses
``max_new_tokens_turn1``, every later turn ``max_new_tokens_turn2``.

With ``rollout.continuous_batching`` the turns run as one stream instead (``zoom_stream``): a
row's next turn joins as soon as its previous one has stopped and been read, re-reading its
whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import RolloutConfig
from .conversation import (
    Context,
    Conversation,
    Piece,
    Prompt,
    close_at_box,
    cut_after,
    encode,
    generate_turn1,
    is_closed,
    next_turn,
    stream_requests,
    write_turn,
)
from .generation import Continuation, Generated, continue_cache, generate_batch
from .grounding import (
    Box,
    View,
    box_problem,
    crop_original,
    find_box,
    fit_to_budget,
    input_size_from_grid,
    pixel_box,
    view_to_original,
)
from .prompts import zoom_turn_text
from .reward import extract_answer
from .stream import Finished, Request
from .trajectory import Trajectory, TurnRecord

DEFAULT_CAP_IMAGES = 4  # rollout.max_image_tokens = 0: at most this many full-budget images' tokens


def image_token_cap(cfg: RolloutConfig, max_pixels: int, factor: int = 28) -> int:
    """A trajectory's image-token cap: ``rollout.max_image_tokens``, or when 0 the tokens of
    min(max_turns, 4) images at the full pixel budget (one token per ``factor`` x ``factor``
    block: 28 for Qwen2.5-VL, 32 for Qwen3-VL). K <= 4 is
    then never capped (K turns show at most K images); a larger K stops showing crops after
    four images' worth, so its memory cannot grow with K.

    >>> image_token_cap(RolloutConfig(max_turns=50), 1280 * 28 * 28), image_token_cap(RolloutConfig(max_turns=3), 784)
    (5120, 3)
    """
    return cfg.max_image_tokens or min(cfg.max_turns, DEFAULT_CAP_IMAGES) * (max_pixels // (factor * factor))


@dataclass
class _State:
    """One trajectory between turns: the image it looks at and what it has cost so far."""

    prompt: Prompt
    view: View  # the latest image shown, as a region of the original
    picture: object  # that image (PIL), to show it again on a fallback
    image: int  # its index in the rollout's image list
    image_tokens: int  # image tokens in the conversation so far
    depth: int = 0  # crops of crops: 0 while the original is the latest image
    forced: bool = False  # the next turn is the forced answer
    done: bool = False


@dataclass
class _Call:
    """One generate call's rows: the trajectory of each (None: the lock-step dummy), its input."""

    gen: Generated
    trajs: list[int | None]
    inputs: list[torch.Tensor]
    images: list[list[int]]


def _image_tokens(grid: torch.Tensor) -> int:
    return int(grid.prod()) // 4  # 2x2 patches merge into one token


def zoom_turns(model, ctx: Context, prompts: list[Prompt], trajectories: list[Trajectory]) -> list[Conversation]:
    """Run up to ``ctx.cfg.max_turns`` turns; return each trajectory's conversation."""
    K, G = ctx.cfg.max_turns, ctx.cfg.group_size
    states, convs = _start(ctx, prompts, trajectories)
    n = len(trajectories)
    turn1 = write_turn(ctx, prompts, 1, list(range(n)), lambda: generate_turn1(model, ctx, prompts))
    call = _Call(turn1, list(range(n)), [p.enc.ids for p in prompts for _ in range(G)],
                 [[p.image] for p in prompts for _ in range(G)])
    for turn in range(1, K + 1):
        for row, i in enumerate(call.trajs):
            if i is not None:
                _read_turn(ctx, trajectories[i], states[i], convs[i], call.gen.tokens[row], call.gen.logps[row],
                           last=turn == K)
        running = [i for i in range(n) if not states[i].done]
        if turn == K or not (running or ctx.synced_gpus):
            break
        blocks = {i: _next_block(ctx, trajectories[i], states[i], last=turn + 1 == K) for i in running}
        for i in running:
            ids, new = blocks[i]
            convs[i].pieces.append(Piece(ids, False))
            convs[i].images += [] if new is None else [new]
        call = _next_call(model, ctx, prompts, call, running, convs, blocks, turn + 1)
    for traj in trajectories:
        _summarize(traj)
    return convs


def zoom_stream(model, ctx: Context, prompts: list[Prompt], trajectories: list[Trajectory],
                capacity: int) -> list[Conversation]:
    """The same turns as ``zoom_turns``, decoded as one stream (``decode_stream``): each row's
    next turn joins once its previous turn is read, prefilled from its whole conversation."""
    K = ctx.cfg.max_turns
    states, convs = _start(ctx, prompts, trajectories)

    def finished(row: Finished) -> list[Request]:
        turn, i = row.key[0], row.key[1] + row.copy  # key: (turn, the request's first row)
        traj, st, conv = trajectories[i], states[i], convs[i]
        _read_turn(ctx, traj, st, conv, row.tokens, row.logps, last=turn == K)
        if st.done:
            return []
        ids, new = _next_block(ctx, traj, st, last=turn + 1 == K)
        conv.pieces.append(Piece(ids, False))
        conv.images += [] if new is None else [new]
        return [next_turn(ctx, turn + 1, i, torch.cat([piece.tokens for piece in conv.pieces]), conv.images)]

    stream_requests(model, ctx, prompts, finished, capacity)
    for traj in trajectories:
        _summarize(traj)
    return convs


def _start(ctx: Context, prompts: list[Prompt], trajectories: list[Trajectory]):
    """Each trajectory's state and conversation before turn 1: the original, the prompt."""
    states, convs = [], []
    for i, traj in enumerate(trajectories):
        p = prompts[i // ctx.cfg.group_size]
        region = Box(0.0, 0.0, float(traj.original_size[0]), float(traj.original_size[1]))
        states.append(_State(p, View(region, traj.input_size), p.original, p.image, _image_tokens(p.enc.image.grid)))
        convs.append(Conversation([Piece(p.enc.ids, False)], [p.image]))
    return states, convs


def _read_turn(ctx: Context, traj: Trajectory, st: _State, conv: Conversation, sampled: torch.Tensor, logp,
               last: bool) -> None:
    """Decide what one turn did (zoom, fall back, answer) and which of its tokens stay.

    A zooming or falling-back turn is cut right after its box and closed with ``<|im_end|>``,
    as the paper's turn 1; an answering turn is kept whole, as sampled, and ends the
    conversation. Whichever comes first wins: a box closed before any ``\\boxed{}`` answer
    zooms, an answer written before the box ends the conversation."""
    tok, im_end = ctx.processor.tokenizer, ctx.ids["<|im_end|>"]
    closed = is_closed(sampled, ctx.stops)
    body = sampled[:-1] if closed else sampled
    text = tok.decode(body, skip_special_tokens=False)
    found = None if last or st.forced else find_box(text)
    answered = extract_answer(text if found is None else text[:found[1]], traj.options) is not None
    if last or st.forced or answered:
        conv.pieces.append(Piece(sampled, True, logp))
        traj.turn_log.append(TurnRecord(tok.decode(body, skip_special_tokens=False), len(sampled), not closed,
                                     "answer" if answered else "final"))
        st.done = True
        return
    record = TurnRecord("", 0, not closed, "fallback")
    keep = len(body)
    if found is not None:
        box, end = found
        grid = ctx.family.box_grid
        record.box_input = box.as_list()
        record.box_problem = box_problem(box, st.view.input_size, ctx.cfg.min_box_side, ctx.cfg.max_box_aspect,
                                         grid)
        record.valid = record.box_problem is None
        keep = cut_after(tok, body, text, end)
        if record.valid:
            record.action, record.nested = "zoom", st.depth > 0
            record.box_original = view_to_original(box, st.view, grid).as_list()
    else:
        record.box_problem = "no box"
    tokens, logp = close_at_box(sampled, logp, keep, closed, im_end)
    record.text, record.tokens = tok.decode(body[:keep], skip_special_tokens=False), len(tokens)
    conv.pieces.append(Piece(tokens, True, logp))
    conv.kept = keep
    traj.turn_log.append(record)


def _next_block(ctx: Context, traj: Trajectory, st: _State, last: bool):
    """The next user block of a running trajectory and its new image's index (None: text only).

    A zoom shows the crop of the original, enlarged into the pixel budget; a fallback shows
    the previous image again; either becomes the text-only forced-answer block when its image
    would pass ``rollout.max_image_tokens``."""
    record, p = traj.turn_log[-1], st.prompt
    question, options = p.sample.question, p.sample.options
    picture = st.picture
    if record.action == "zoom":
        box = Box(*record.box_original)
        picture = fit_to_budget(crop_original(p.original, box), ctx.min_pixels, ctx.max_pixels,
                                ctx.cfg.crop_resample, ctx.family.factor)
    block = encode(ctx.processor, zoom_turn_text(ctx.processor, ctx.template, question, options,
                                                  "crop" if record.action == "zoom" else "fallback", last), [picture])
    cost = _image_tokens(block.image.grid)
    if st.image_tokens + cost > image_token_cap(ctx.cfg, ctx.max_pixels, ctx.family.factor):
        record.capped, st.forced = record.action == "zoom", True
        text = zoom_turn_text(ctx.processor, ctx.template, question, options, "capped", True)
        return ctx.processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0], None
    st.image_tokens += cost
    if record.action != "zoom":
        return block.ids, st.image  # the same picture: its patches are stored once
    record.crop_size = picture.size
    st.view = View(Box(*map(float, pixel_box(Box(*record.box_original), p.original.size))),
                   input_size_from_grid(block.image.grid[0], ctx.family.patch))
    st.picture, st.depth = picture, st.depth + 1
    st.image = ctx.add_image(block.image)
    return block.ids, st.image


def _next_call(model, ctx: Context, prompts, prev: _Call, running: list[int], convs, blocks, turn: int) -> _Call:
    """One generate over the running trajectories (or a dummy row, lock-step), continued from
    the previous call's cache when it is kept."""
    row_of = {i: r for r, i in enumerate(prev.trajs)}
    trajs, inputs, images, rows = [], [], [], []
    for i in running:
        trajs.append(i)
        inputs.append(torch.cat([piece.tokens for piece in convs[i].pieces]))
        images.append(list(convs[i].images))
        rows.append(_continuation(ctx, row_of[i], convs[i].kept, inputs[-1], images[-1], blocks[i][1]))
    if not running:  # synced_gpus: join the call with the first row's input and a fallback block
        p = prompts[0]
        fallback = encode(ctx.processor, zoom_turn_text(ctx.processor, ctx.template, p.sample.question,
                                                         p.sample.options, "fallback", False), [p.original])
        trajs, inputs, images = [None], [torch.cat([prev.inputs[0], fallback.ids])], [prev.images[0] + [p.image]]
        rows.append(_continuation(ctx, 0, 0, inputs[0], images[0], p.image))
    gen = write_turn(ctx, prompts, turn, running, lambda: _generate(model, ctx, prompts, prev, inputs, images, rows))
    return _Call(gen, trajs, inputs, images)


def _generate(model, ctx: Context, prompts, prev: _Call, inputs, images, rows) -> Generated:
    image_id = ctx.ids["<|image_pad|>"]
    generation = ctx.generation(ctx.cfg.max_new_tokens_turn2)
    if not ctx.cfg.continue_turn2:
        prev.gen.cache = None  # nothing reuses it: free it before the next call fills another
    prepared = None
    if prev.gen.cache is not None and ctx.cfg.continue_turn2:
        spare = ctx.images[prompts[0].image]
        prepared = continue_cache(model, prev.gen, rows, image_id, ctx.ids["<|endoftext|>"],
                                  spare_image=(spare.pixel_values, spare.grid) if ctx.synced_gpus else None)
        prev.gen.cache = None
    gen = generate_batch(model, inputs, [torch.cat([ctx.images[j].pixel_values for j in ix]) for ix in images],
                         [r.grids for r in rows], generation, image_id, ctx.synced_gpus, prepared=prepared)
    if not ctx.cfg.continue_turn2:
        gen.cache = None  # nothing reuses it
    return gen


def _continuation(ctx: Context, row: int, kept: int, ids, images: list[int], new: int | None) -> Continuation:
    grids = torch.cat([ctx.images[j].grid for j in images])
    if new is None:
        return Continuation(row, kept, ids, grids, None, None)
    return Continuation(row, kept, ids, grids, ctx.images[new].pixel_values, ctx.images[new].grid)


def _summarize(traj: Trajectory) -> None:
    """Fill the two-turn fields from the turn log, for the paper-shaped consumers (turn 1's box)."""
    log = traj.turn_log
    traj.turns = len(log)
    first = log[0]
    traj.turn1_text, traj.turn1_tokens, traj.turn1_truncated = first.text, first.tokens, first.truncated
    if len(log) > 1:
        traj.turn2_text, traj.turn2_tokens, traj.turn2_truncated = log[1].text, log[1].tokens, log[1].truncated
    traj.box_input, traj.box_original, traj.valid = first.box_input, first.box_original, first.valid
    traj.box_problem = first.box_problem if first.action != "answer" else "answered"
    traj.crop_size = first.crop_size
