"""Continuous batching: a decode loop where finished rows leave and waiting requests join.

One ``generate`` call lasts as long as its longest row: at temperature 1 one rambling sample
holds the fifteen that stopped. ``decode_stream`` instead decodes ``chunk`` tokens at a time;
after each chunk the rows that stopped leave the batch (their cache rows are dropped) and, while
there is room under ``capacity`` rows, the next requests join: prefilled once (a request sampled
``copies`` times shares one prefill), their cache left-padded to the running one's width and
appended; with a cache cap, a request joins only if every row, run to its token limit, still fits
(so the cache never passes the cap: when rows run long, fewer join). A finished row is handed to
``on_done``, which may queue a new request (the rollout
queues the row's turn 2 there), so turn 1 of a late group and turn 2 of an early one decode in
the same batch.

Each row keeps its own mRoPE offset (``delta``): a decode step's position is the row's count of
real tokens plus its offset, passed explicitly, so rows that joined at different times, with
different images, share one forward. Sampling is ``generate``'s: the same logits processors
(suppressed vision tokens, temperature, top-k, top-p), argmax at temperature 0, one multinomial
draw per row otherwise.

transformers' own continuous batching (``generate_batch`` / ``init_continuous_batching``, 5.25) takes
token ids only (``add_request(input_ids, ...)``): no pixels, no image grids, no mRoPE offsets, so it
cannot serve a Qwen-VL conversation with its images; hence this loop.

Under ZeRO-3 every rank must run the same forwards: ``lockstep`` (an all-ranks sum) makes each
rank join in the same iterations (a rank with nothing to join prefills its spare request,
unused) and decode the same steps (a rank with no row runs one dummy row) until every rank is done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .generation import cache_arg, output_cache
from .policy import rope_owner


@dataclass
class Request:
    """One prompt to sample ``copies`` times; ``key`` comes back with each finished row."""

    key: Any
    ids: torch.Tensor  # [L] the whole input
    pixels: torch.Tensor  # [P, D] patches of every image in ``ids``
    grids: torch.Tensor  # [n_images, 3]
    copies: int
    max_new: int


@dataclass
class Finished:
    key: Any
    copy: int
    tokens: torch.Tensor  # new tokens, the stop token included when one was sampled
    logps: torch.Tensor | None  # their log-probs under the processed distribution


@dataclass
class _Row:
    key: Any
    copy: int
    max_new: int
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    done: bool = False


@dataclass
class Counts:
    """What a stream computed: row-steps (rows x decode steps, finished rows waiting for the chunk's
    end included, dummy rows not), the tokens it kept, forward calls, the most rows at once."""

    row_steps: int = 0
    tokens: int = 0
    decode_calls: int = 0
    prefill_calls: int = 0
    widest: int = 0
    largest_cache: int = 0  # the most cache tokens held at once (rows x width)


def processors(gen_cfg: GenerationConfig) -> LogitsProcessorList:
    """The logits processors ``generate`` applies for our settings, in its order."""
    out = LogitsProcessorList()
    if gen_cfg.suppress_tokens:
        out.append(SuppressTokensLogitsProcessor(gen_cfg.suppress_tokens))
    if gen_cfg.do_sample:
        if gen_cfg.temperature != 1.0:
            out.append(TemperatureLogitsWarper(gen_cfg.temperature))
        if gen_cfg.top_k:
            out.append(TopKLogitsWarper(gen_cfg.top_k))
        if gen_cfg.top_p < 1.0:
            out.append(TopPLogitsWarper(gen_cfg.top_p))
    return out


class _Batch:
    """The running rows: their cache, attention mask over the cache, next input token, real-token
    count and mRoPE offset, all row-aligned."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = self.next = self.real = self.delta = None

    def __len__(self):
        return len(self.rows)

    def append(self, rows, cache, mask, nxt, real, delta):
        if not self.rows:
            self.rows, self.cache, self.mask, self.next, self.real, self.delta = rows, cache, mask, nxt, real, delta
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                setattr(mine, name, torch.cat([_pad_left(getattr(mine, name), width, 2),
                                               _pad_left(getattr(theirs, name), width, 2)]))
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows = self.rows + rows
        self.next, self.real, self.delta = (torch.cat(p) for p in ((self.next, nxt), (self.real, real),
                                                                    (self.delta, delta)))

    def keep(self, index: list[int]):
        """Only the rows ``index``; cache columns no kept row uses are cut."""
        if not index:
            self.__init__()
            return
        idx = torch.tensor(index, device=self.mask.device)
        mask = self.mask[idx]
        first = int(mask.any(0).nonzero()[0])
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                setattr(layer, name, getattr(layer, name)[idx, :, first:].contiguous())
        self.mask = mask[:, first:]
        self.rows = [self.rows[i] for i in index]
        self.next, self.real, self.delta = self.next[idx], self.real[idx], self.delta[idx]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@torch.no_grad()
def decode_stream(model, requests: list[Request], on_done: Callable[[Finished], list[Request]], *,
                  gen_cfg: GenerationConfig, image_token_id: int, pad_id: int, capacity: int, chunk: int = 8,
                  max_cache_tokens: int = 0, lockstep: Callable[[int], int] | None = None, steer=None) -> Counts:
    """Decode every request (and every request ``on_done`` queues), at most ``capacity`` rows at
    once and, with ``max_cache_tokens``, at most that many cache tokens (a request larger than
    either runs alone). ``lockstep(n)``: the sum of ``n`` over ranks (None outside ZeRO-3).
    ``steer(rows, scores)``: a hook applied after the processors (``rows``: each row's key, copy
    and tokens so far), to constrain what rows write."""
    queue, batch, counts = deque(requests), _Batch(), Counts()
    procs, stops = processors(gen_cfg), set(gen_cfg.eos_token_id)
    spare = requests[0] if requests else None
    while True:
        joining = []
        while queue and (not batch and not joining or _room(batch, joining + [queue[0]], capacity, max_cache_tokens)):
            joining.append(queue.popleft())
        if joining if lockstep is None else lockstep(int(bool(joining))) > 0:
            _join(model, batch, joining or [spare], image_token_id, pad_id, dummy=not joining)
            counts.prefill_calls += 1
        counts.widest = max(counts.widest, len(batch))
        for _ in range(chunk):
            live = any(not r.done for r in batch.rows)
            if lockstep is not None and lockstep(int(live)) == 0 or lockstep is None and not live:
                break
            _step(model, batch, procs, gen_cfg.do_sample, stops, steer, counts) if live else _dummy(model, pad_id)
            counts.decode_calls += 1
            counts.largest_cache = max(counts.largest_cache, len(batch) * batch.mask.shape[1] if batch else 0)
        kept = []
        for i, row in enumerate(batch.rows):
            if not row.done:
                kept.append(i)
                continue
            counts.tokens += len(row.tokens)
            queue.extend(on_done(Finished(row.key, row.copy, torch.tensor(row.tokens, dtype=torch.long),
                                          torch.tensor(row.logps) if gen_cfg.output_scores else None)))
        batch.keep(kept)
        busy = int(bool(queue or batch))
        if (lockstep(busy) if lockstep is not None else busy) == 0:
            return counts


def _room(batch: _Batch, joining: list[Request], capacity: int, max_cache_tokens: int) -> bool:
    """Whether ``joining`` fits beside the running rows: their rows under ``capacity``, and the
    cache, every row (running and joining) run to its token limit, under ``max_cache_tokens``:
    rows share one left-padded width, which grows by one column a step until the last row stops."""
    rows = len(batch) + sum(r.copies for r in joining)
    if rows > capacity:
        return False
    if not max_cache_tokens:
        return True
    width = max(([batch.mask.shape[1]] if batch else []) + [len(r.ids) - 1 for r in joining])
    steps = max([r.max_new - len(r.tokens) for r in batch.rows] + [r.max_new for r in joining])
    return rows * (width + steps) <= max_cache_tokens


def _join(model, batch: _Batch, requests: list[Request], image_token_id: int, pad_id: int, dummy: bool):
    """Prefill ``requests`` (all but each one's last token) in one forward and append their rows
    to the batch, each request's cache copied for its samples. ``dummy``: run the forward for the
    other ranks' sake and keep nothing."""
    device = model.device
    inner = rope_owner(model)
    width = max(len(r.ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.ids):], mask[i, width - len(r.ids):] = r.ids, 1
    ids, mask = ids.to(device), mask.to(device)
    mm = (ids == image_token_id).long()
    grids = torch.cat([r.grids for r in requests]).to(device)
    positions, delta = inner.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grids, attention_mask=mask)
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], mm_token_type_ids=mm[:, :-1],
                position_ids=positions[:, :, :-1], pixel_values=torch.cat([r.pixels for r in requests]).to(device),
                image_grid_thw=grids, use_cache=True, logits_to_keep=1)
    if dummy:
        return
    copies = torch.tensor([r.copies for r in requests], device=device)
    cache = output_cache(out)
    for layer in cache.layers:  # each request's cache once per sample
        for name in ("keys", "values"):
            setattr(layer, name, getattr(layer, name).repeat_interleave(copies, dim=0))
    rows = [_Row(r.key, c, r.max_new) for r in requests for c in range(r.copies)]
    batch.append(rows, cache, mask[:, :-1].repeat_interleave(copies, 0), ids[:, -1].repeat_interleave(copies),
                 (mask.sum(1) - 1).repeat_interleave(copies), delta.reshape(-1).repeat_interleave(copies))


def _step(model, batch: _Batch, procs, sample: bool, stops: set[int], steer, counts: Counts):
    """One decode step for every row; rows already done compute and are ignored."""
    mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
    positions = (batch.real + batch.delta).view(1, -1, 1).expand(3, -1, 1)
    out = model(input_ids=batch.next[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{cache_arg(model): batch.cache})
    batch.cache, batch.mask = output_cache(out), mask
    scores = procs(batch.next[:, None], out.logits[:, -1].float())
    if steer is not None:
        scores = steer(batch.rows, scores)
    tokens = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1) if sample else scores.argmax(-1)
    logps = torch.log_softmax(scores, -1).gather(1, tokens[:, None]).squeeze(1)
    counts.row_steps += len(batch)  # every row is computed, the ones already done included
    for row, tok, lp in zip(batch.rows, tokens.tolist(), logps.tolist()):
        if row.done:
            continue
        row.tokens.append(tok)
        row.logps.append(lp)
        row.done = tok in stops or len(row.tokens) >= row.max_new
    batch.next, batch.real = tokens, batch.real + 1


def _dummy(model, pad_id: int):
    """One token through the model, for the other ranks' sake (ZeRO-3 gathers every layer)."""
    model(input_ids=torch.tensor([[pad_id]], device=model.device), use_cache=False, logits_to_keep=1)
