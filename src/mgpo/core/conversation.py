"""The conversation kit every turn loop shares (the two-turn rollout, the K-turn loop,
teacher forcing): the hand-over types, encoding a prompt with its image, generating
turn 1, closing a turn right after its box, and assembling finished conversations into
a `Rollout` with the one loss mask.

A conversation is a list of pieces of token ids; a piece is either the model's own
tokens (``trained``: loss mask 1) or text we inserted (prompts, user blocks with their
images: loss mask 0). `assemble` is the only place that turns pieces into the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..config import RolloutConfig
from ..data.samples import BadImageError, Sample, prompt_length_problem
from ..runtime.family import Family, processor_family
from .generation import Generated, generate_batch, generation_config
from .prompts import Template, escape_data, first_prompt_text
from .stream import Counts, Request, decode_stream
from .trajectory import ImagePatches, Rollout


@dataclass
class Encoded:
    ids: torch.Tensor  # [L]
    image: ImagePatches


@dataclass
class Prompt:
    sample: Sample
    original: object  # the decoded original (PIL image)
    enc: Encoded  # the turn-1 prompt
    image: int  # index of its image in the rollout's image list
    script: tuple[str, ...] | None = None  # teacher forcing: the assistant text of each turn


@dataclass
class Piece:
    tokens: torch.Tensor  # [L]
    trained: bool  # the model produced these tokens (loss mask 1)
    logp: torch.Tensor | None = None  # [L] generation-time log-probs, when recorded


@dataclass
class Conversation:
    """One trajectory's tokens, piece by piece, and its images."""

    pieces: list[Piece]
    images: list[int]
    kept: int = 0  # turn-1 tokens kept (the turn-2 cache continues after them)


@dataclass
class Context:
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
    crop: str = "model"  # what turn 2 shows in the crop's place (evaluation's counterfactuals)
    images: list[ImagePatches] = field(default_factory=list)

    @cached_property
    def family(self) -> Family:
        """The model family: its resize factor, patch side and box convention."""
        return processor_family(self.processor)

    @property
    def stops(self) -> set[int]:
        return {self.ids["<|im_end|>"], self.ids["<|endoftext|>"]}

    def add_image(self, image: ImagePatches) -> int:
        self.images.append(image)
        return len(self.images) - 1

    def generation(self, max_new_tokens: int):
        return generation_config(self.cfg, max_new_tokens, self.ids, self.greedy, self.record_logprobs)


def encode(processor, text: str, images: list) -> Encoded:
    """Tokenize one text with its image; the processor expands the image placeholder."""
    out = processor(text=[text], images=images, return_tensors="pt")
    return Encoded(out["input_ids"][0], ImagePatches(out["pixel_values"], out["image_grid_thw"]))


def is_closed(tokens: torch.Tensor, stops: set[int]) -> bool:
    """Did this turn end with a stop token (rather than at the token limit)?"""
    return len(tokens) > 0 and int(tokens[-1]) in stops


def cut_after(tokenizer, tokens: torch.Tensor, text: str, end: int) -> int:
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


def scripted(ctx: Context, texts: list[str]) -> Generated:
    """What ``generate`` would return had the model written ``texts`` and stopped. The texts are
    plain text (SFT targets are built from record fields): a control-token string in them is
    escaped as in every prompt, so it is trained as the characters it is, never as the token."""
    tok, im_end = ctx.processor.tokenizer, ctx.ids["<|im_end|>"]
    tokens = [torch.tensor(tok.encode(escape_data(ctx.processor, text), add_special_tokens=False) + [im_end])
              for text in texts]
    return Generated(tokens, [None] * len(texts), cache=None, width=0, steps=max(len(ids) for ids in tokens))


def encode_prompts(ctx: Context, samples: list[Sample], images: list | None, texts=None,
                    max_prompt_tokens: int = 0, count=None):
    """Decode each image once and encode each turn-1 prompt once; unreadable ones are skipped.
    ``count(sample)``: the prompt's tokens from the image's header size, checked against
    ``max_prompt_tokens`` before anything is decoded or resized (a pixel budget that would make a
    huge image is refused without allocating it); the encoded length is checked again after."""
    prompts, skipped = [], []
    for k, sample in enumerate(samples):
        if count is not None and max_prompt_tokens and sample.width and (
                too_long := prompt_length_problem(count(sample), max_prompt_tokens)):
            skipped.append((sample.id, too_long))
            continue
        try:
            original = images[k] if images is not None else sample.load_image()
        except BadImageError as e:
            skipped.append((sample.id, str(e)))
            continue
        text = first_prompt_text(ctx.processor, ctx.template, sample.question, sample.options)
        enc = encode(ctx.processor, text, [original])
        if too_long := prompt_length_problem(len(enc.ids), max_prompt_tokens):
            skipped.append((sample.id, too_long))
            continue
        prompts.append(Prompt(sample, original, enc, ctx.add_image(enc.image), texts[k] if texts else None))
    if not prompts:
        raise BadImageError("every prompt of the batch was skipped: " + "; ".join(r for _, r in skipped))
    return prompts, skipped


def write_turn(ctx: Context, prompts: list[Prompt], turn: int, rows: list[int], generate) -> Generated:
    """Assistant turn ``turn`` (1-based) of trajectories ``rows``: written by the model
    (``generate()``), or, when the prompts carry a script for that turn (teacher forcing: SFT's
    targets, a judge's given turn 1), each row's scripted text. The one place that decides."""
    scripts = [prompts[r // ctx.cfg.group_size].script for r in rows]
    if not scripts or any(s is None or len(s) < turn for s in scripts):  # (K turns: each row's own length)
        return generate()
    return scripted(ctx, [s[turn - 1] for s in scripts])


def generate_turn1(model, ctx: Context, prompts: list[Prompt]) -> Generated:
    """Turn 1: one batched generate (each prompt prefilled once, or once per sample); rows
    are trajectories, group by group."""
    group_size = ctx.cfg.group_size
    shared = ctx.cfg.shared_prefill and group_size > 1
    rows = 1 if shared else group_size  # input rows per prompt (shared: the cache is copied instead)
    return generate_batch(model, [p.enc.ids for p in prompts for _ in range(rows)],
                          [p.enc.image.pixel_values for p in prompts for _ in range(rows)],
                          [p.enc.image.grid for p in prompts for _ in range(rows)],
                          ctx.generation(ctx.cfg.max_new_tokens_turn1), ctx.ids["<|image_pad|>"],
                          ctx.synced_gpus, group_size=group_size if shared else 1)


def stream_requests(model, ctx: Context, prompts: list[Prompt], finished, capacity: int) -> Counts:
    """``decode_stream`` over ``prompts``' turn 1 (one request per group, a row per sample; row
    keys are (turn, the request's first row)) and every next turn ``finished`` queues (``next_turn``),
    with the rollout's settings: its sampling (each request's own token limit), at most ``capacity``
    rows and ``rollout.stream_cache_tokens`` cache tokens at once, the ranks in lock-step under
    ZeRO-3, and the model's ``steer`` hook when it has one."""
    cfg = ctx.cfg
    requests = [Request((1, g * cfg.group_size), p.enc.ids, p.enc.image.pixel_values, p.enc.image.grid,
                        cfg.group_size, cfg.max_new_tokens_turn1) for g, p in enumerate(prompts)]
    return decode_stream(model, requests, finished,
                         gen_cfg=ctx.generation(max(cfg.max_new_tokens_turn1, cfg.max_new_tokens_turn2)),
                         image_token_id=ctx.ids["<|image_pad|>"], pad_id=ctx.ids["<|endoftext|>"], capacity=capacity,
                         chunk=cfg.stream_chunk, max_cache_tokens=cfg.stream_cache_tokens,
                         lockstep=_lockstep if ctx.synced_gpus else None,
                         steer=getattr(model, "steer", None))


def next_turn(ctx: Context, turn: int, row: int, ids: torch.Tensor, images: list[int]) -> Request:
    """Row ``row``'s turn ``turn`` for the stream: its whole conversation so far (``ids``, with the
    rollout images ``images``), prefilled from scratch."""
    return Request((turn, row), ids, torch.cat([ctx.images[j].pixel_values for j in images]),
                   torch.cat([ctx.images[j].grid for j in images]), 1, ctx.cfg.max_new_tokens_turn2)


def _lockstep(n: int) -> int:
    """``n`` summed over ranks (the stream's agreement on joins, steps and the end)."""
    from ..runtime.distributed import all_reduce_sum

    return int(all_reduce_sum(n))


def assemble(ctx: Context, conversations: list[Conversation], trajectories, skipped) -> Rollout:
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


def close_at_box(sampled: torch.Tensor, logp: torch.Tensor | None, keep: int, closed: bool,
                 im_end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A turn cut after its first ``keep`` tokens (right after the box block) and closed with
    ``<|im_end|>``: the sampled one when the model stopped right there (its log-prob kept),
    otherwise one we add (trained too, as the authors' code does; no log-prob was recorded for it).

    ``sampled`` is the turn as generated, ``closed`` whether it ended with a stop token."""
    body = sampled[:-1] if closed else sampled
    sampled_close = closed and keep == len(body) and int(sampled[-1]) == im_end
    tokens = torch.cat([body[:keep], torch.tensor([im_end])])
    if logp is not None:
        logp = torch.cat([logp[:keep], logp[keep:keep + 1] if sampled_close else torch.tensor([float("nan")])])
    return tokens, logp
