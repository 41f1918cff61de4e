"""Batched generation for the rollout, and the key/value-cache reuse that makes it fast.

``generate_batch`` is one ``generate`` call over left-padded prompts with our sampling
settings spelled out. Around it, two ways the naive rollout wastes work are removed:

1. ``group_size`` copies of each prompt each run the vision encoder and the prefill.
   ``shared_prefill`` runs them once per prompt and copies the cache for the group.
2. Turn 2 re-reads the whole conversation (first image included). ``continue_cache``
   keeps each sample's turn-1 cache (prompt + the tokens it kept), and prefills only the
   new tokens: the closing ``<|im_end|>``, the turn-2 user block and its crop.

Layout of a continued batch, per row (``prefix`` and ``fresh`` are the batch's widest cached
prefix and widest new chunk; padding may sit in the middle, the attention mask covers it):

    [left pad][cached prefix_i] | [pad][new chunk_i]
    <------ prefix -----------> <---- fresh ------>

In K turns (``mgpo_k``) turn k+1 continues from turn k's cache, over the rows still
running only; a continued call's prompt is no longer contiguous in its cache, so each
``Generated`` records the cache column of every real input token (``columns``).

Positions are Qwen's 3-D mRoPE ones computed over the whole row (``get_rope_index``),
so the crop's image tokens get their grid positions after the first image and the text.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from ..config import RolloutConfig
from .policy import rope_owner

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def special_ids(processor) -> dict[str, int]:
    tok = processor.tokenizer
    names = VISION_TOKENS + ("<|im_end|>", "<|endoftext|>")
    ids = {name: tok.convert_tokens_to_ids(name) for name in names}
    missing = [n for n, i in ids.items() if i is None or i == tok.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the Qwen-VL special tokens {missing}")
    return ids


def suppressed_ids(processor) -> list[int]:
    """Vision special tokens: never sampled (a sampled ``<|image_pad|>`` breaks the next
    forward: "Image features and image tokens do not match"), and so also masked out of the training distribution."""
    ids = special_ids(processor)
    return [ids[name] for name in VISION_TOKENS]


# Every field that changes the distribution ``generate`` samples from, at its neutral value.
# A field left None would be filled from the checkpoint's generation_config.json: Qwen2.5-VL
# ships repetition_penalty 1.05, top_k 1, top_p 0.001, which the training
# log-probs do not model.
_NEUTRAL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
                eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                encoder_no_repeat_ngram_size=0, length_penalty=1.0, num_beams=1, renormalize_logits=False,
                bad_words_ids=None, sequence_bias=None, begin_suppress_tokens=None, forced_bos_token_id=None,
                forced_eos_token_id=None, exponential_decay_length_penalty=None, guidance_scale=None,
                watermarking_config=None, remove_invalid_values=False, min_length=0, min_new_tokens=None)
_HARMLESS = {"bos_token_id", "decoder_start_token_id", "_from_model_config", "transformers_version",
             "max_length", "use_cache", "cache_implementation"}


def generation_config(cfg: RolloutConfig, max_new_tokens: int, ids: dict[str, int], greedy: bool,
                      record_logprobs: bool = False) -> GenerationConfig:
    """Sampling settings spelled out in full: nothing is inherited from the checkpoint."""
    fields = dict(_NEUTRAL)
    if greedy:  # GenerationConfig's own default, which greedy decoding ignores (0 draws a warning per call)
        fields.update(top_k=50)
    else:
        fields.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return GenerationConfig(
        **fields,
        do_sample=not greedy,
        max_new_tokens=max_new_tokens,
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        suppress_tokens=[ids[name] for name in VISION_TOKENS],
        return_dict_in_generate=True,
        output_scores=record_logprobs,
    )


def check_not_inherited(gen_cfg: GenerationConfig, model) -> None:
    """Refuse to generate if the checkpoint's generation config would fill a field we left
    unset (``generate`` fills every None field from it)."""
    shipped = getattr(model, "generation_config", None)
    if shipped is None:
        return
    ours = gen_cfg.to_dict()
    leaked = sorted(k for k, v in shipped.to_dict().items()
                    if v is not None and ours.get(k) is None and k not in _HARMLESS)
    if leaked:
        raise ValueError(f"the checkpoint's generation_config.json would set {leaked} for generation; "
                         "mgpo.core.generation.generation_config must spell them out")


def cache_arg(module) -> str:
    """The keyword a forward takes its KV cache by: ``cache`` since transformers renamed
    ``past_key_values`` (5.2x; the old name still works there, with a deprecation warning at every
    call), ``past_key_values`` before. A peft model's forward takes anything: its base model says."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward or ``generate`` returned, under either name."""
    return out["cache"] if "cache" in out else out.get("past_key_values")


def _left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


@dataclass
class Prepared:
    """Inputs for ``generate`` whose prefix is already in ``cache``."""

    ids: torch.Tensor  # [R, T] left-padded
    mask: torch.Tensor  # [R, T]
    mm: torch.Tensor  # [R, T] 1 on image tokens
    cache: object


@dataclass
class Generated:
    """What one ``generate`` call returned, per row."""

    tokens: list[torch.Tensor]  # new tokens, the stop token included when one was sampled
    logps: list[torch.Tensor | None]  # their generation-time log-probs (processed distribution)
    cache: object  # the key/value cache after the call
    width: int  # input width (left-padded prompt)
    steps: int  # decode steps run (the widest row's new tokens)
    columns: list[torch.Tensor] | None = None
    """Per row, the cache column of each real input token, in order. A fresh call's prompt is
    contiguous at the right; a continued call's is not ([pad][prefix] | [pad][new chunk])."""

    def cached_tokens(self, row: int, kept: int) -> torch.Tensor:
        """Cache columns of a row's input plus its first ``kept`` new tokens, in token order.

        The cache lacks the last decoded token: its forward never ran."""
        new = torch.arange(self.width, self.width + min(kept, self.steps - 1))
        return torch.cat([self.columns[row], new])


@dataclass
class Continuation:
    """One row of a turn that continues from the previous turn's cache."""

    row: int  # row of the previous ``Generated``
    kept: int  # new tokens of the previous turn kept in the conversation
    ids: torch.Tensor  # [L] the whole input of this turn: prompt, kept tokens, new block
    grids: torch.Tensor  # [n_images, 3] every image grid of the row, in order
    new_pixels: torch.Tensor | None  # [P, D] the new block's image patches (None: a text-only block)
    new_grid: torch.Tensor | None  # [1, 3]


@torch.no_grad()
def generate_batch(model, seqs: list[torch.Tensor], pixel_values: list[torch.Tensor], grids: list[torch.Tensor],
                   gen_cfg: GenerationConfig, image_token_id: int, synced_gpus: bool = False,
                   group_size: int = 1, prepared: Prepared | None = None) -> Generated:
    """One batched ``generate`` over variable-length prompts (left-padded).

    With ``group_size > 1`` each prompt is sampled ``group_size`` times from one shared
    prefill; rows come back prompt by prompt. ``prepared`` continues from a cache built by
    ``continue_cache`` instead.
    """
    device = model.device
    check_not_inherited(gen_cfg, model)
    if prepared is None:
        ids, mask = _left_pad(seqs, gen_cfg.pad_token_id)
        mm = (ids == image_token_id).long()
        if group_size > 1:
            prepared = shared_prefill(model, ids, mask, mm, torch.cat(pixel_values), torch.cat(grids), group_size)
    if prepared is not None:
        ids, mask, mm = prepared.ids, prepared.mask, prepared.mm
        kwargs = {cache_arg(model): prepared.cache}  # every image token is in the cache already
    else:
        kwargs = {"pixel_values": torch.cat(pixel_values).to(device), "image_grid_thw": torch.cat(grids).to(device)}
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), mm_token_type_ids=mm.to(device),
                         generation_config=gen_cfg, synced_gpus=synced_gpus, **kwargs)
    new = out.sequences[:, ids.shape[1]:].cpu()
    stops = set(gen_cfg.eos_token_id)
    tokens, logps = [], []
    for row in range(new.shape[0]):
        seq = new[row].tolist()
        end = next((j + 1 for j, tok in enumerate(seq) if tok in stops), len(seq))
        tokens.append(new[row, :end].clone())
        logps.append(torch.tensor([torch.log_softmax(out.scores[j][row].float(), dim=-1)[seq[j]].item()
                                   for j in range(end)]) if gen_cfg.output_scores else None)
    columns = [m.nonzero().squeeze(1) for m in mask]
    return Generated(tokens, logps, output_cache(out), ids.shape[1], new.shape[1], columns)


@torch.no_grad()
def shared_prefill(model, ids, mask, mm, pixel_values, grids, group_size: int) -> Prepared:
    """Prefill all but the last token of each prompt once; return the inputs and cache for
    ``group_size`` samples per prompt (rows prompt by prompt)."""
    device = model.device
    # logits_to_keep=1: the prefill's logits are never read (generate recomputes the last
    # position); the default would allocate prompts x length x vocabulary of them.
    out = model(input_ids=ids[:, :-1].to(device), attention_mask=mask[:, :-1].to(device),
                mm_token_type_ids=mm[:, :-1].to(device), pixel_values=pixel_values.to(device),
                image_grid_thw=grids.to(device), use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    cache.batch_repeat_interleave(group_size)
    owner = rope_owner(model)  # the prefill set the mRoPE offsets; decode steps read them
    owner.rope_deltas = owner.rope_deltas.repeat_interleave(group_size, dim=0)
    ids, mask, mm = (x.repeat_interleave(group_size, dim=0) for x in (ids, mask, mm))
    return Prepared(ids, mask, mm, cache)


@torch.no_grad()
def continue_cache(model, previous: Generated, rows: list[Continuation], image_token_id: int,
                   pad_id: int, spare_image: tuple[torch.Tensor, torch.Tensor] | None = None) -> Prepared:
    """Reuse each row's cache from the previous turn and prefill its new tokens (all but
    the last, which ``generate`` feeds itself). Any subset of the previous rows, in any
    order, can continue.

    ``spare_image`` (pixels, grid): under ZeRO-3 every rank must run the vision tower as
    often as the others; when no row brings a new image it is run on this one, unused."""
    device = model.device
    inner = rope_owner(model)  # the Qwen2_5_VLModel / Qwen3VLModel: embeddings, vision tower, language model
    spans = [previous.cached_tokens(r.row, r.kept) for r in rows]  # cache columns per row
    prefix = max(len(cols) for cols in spans)
    fresh = max(len(r.ids) - len(cols) for r, cols in zip(rows, spans))
    ids = torch.full((len(rows), prefix + fresh), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), prefix + fresh), dtype=torch.long)
    keep = torch.zeros((len(rows), prefix), dtype=torch.long)  # old-cache column feeding each prefix slot
    keep_mask = torch.zeros((len(rows), prefix), dtype=torch.bool)
    for i, (r, cols) in enumerate(zip(rows, spans)):
        reuse = len(cols)
        new = len(r.ids) - reuse
        ids[i, prefix - reuse: prefix], ids[i, prefix + fresh - new:] = r.ids[:reuse], r.ids[reuse:]
        mask[i, prefix - reuse: prefix], mask[i, prefix + fresh - new:] = 1, 1
        keep[i, prefix - reuse:] = cols
        keep_mask[i, prefix - reuse:] = True
    # Repack every layer's keys/values into the new left-padded prefix (pad slots zeroed;
    # the mask hides them). RoPE is already inside the cached keys, so moving a key to
    # another slot does not change what it encodes. Rows follow ``rows``' order.
    # One indexing per tensor picks the rows and their kept slots together, so only the
    # kept part is copied (the turn-2 cache is the rollout's memory peak).
    rows_idx = torch.tensor([r.row for r in rows], device=device)[:, None]  # [R, 1]
    slots, live = keep.to(device), keep_mask.to(device)[:, None, :, None]  # [R, S], [R, 1, S, 1]
    for layer in previous.cache.layers:
        for name in ("keys", "values"):
            old = getattr(layer, name)  # [R_prev, heads, S_prev, head_dim]
            new = old[rows_idx, :, slots].transpose(1, 2).contiguous()  # [R, heads, S, head_dim]
            setattr(layer, name, new.mul_(live.to(new.dtype)))
    mm = (ids == image_token_id).long()
    positions, deltas = inner.get_rope_index(ids.to(device), mm_token_type_ids=mm.to(device),
                                             image_grid_thw=torch.cat([r.grids for r in rows]).to(device),
                                             attention_mask=mask.to(device))
    chunk = ids[:, prefix: prefix + fresh - 1].to(device)  # the new chunk, all but its last column
    embeds, visual = _embed_chunk(inner, chunk, rows, image_token_id, spare_image)
    inner.language_model(inputs_embeds=embeds, attention_mask=mask[:, : prefix + fresh - 1].to(device),
                         position_ids=positions[:, :, prefix: prefix + fresh - 1], use_cache=True,
                         **visual, **{cache_arg(inner.language_model): previous.cache})
    inner.rope_deltas = deltas  # decode positions = real-token count + delta, per row
    return Prepared(ids, mask, mm, previous.cache)


def _embed_chunk(inner, chunk, rows: list[Continuation], image_token_id: int, spare_image):
    """Embeddings of a continued chunk with its new images' features, and the extra inputs the
    language model takes for them (Qwen3-VL's DeepStack: vision features added in early layers)."""
    embeds, visual = inner.get_input_embeddings()(chunk), {}
    image_mask = chunk == image_token_id
    if image_mask.any():
        pixels = torch.cat([r.new_pixels for r in rows if r.new_pixels is not None]).to(chunk.device)
        grids = torch.cat([r.new_grid for r in rows if r.new_grid is not None]).to(chunk.device)
        vision = inner.get_image_features(pixels, grids)
        embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds),
                                       torch.cat(vision.pooler_output).to(embeds.dtype))
        if getattr(vision, "deepstack_features", None):
            visual = {"visual_pos_masks": image_mask,
                      "deepstack_visual_embeds": [torch.cat(f).to(embeds.dtype) for f in vision.deepstack_features]}
    elif spare_image is not None:  # lock-step: the other ranks run the vision tower now
        inner.get_image_features(spare_image[0].to(chunk.device), spare_image[1].to(chunk.device))
    return embeds, visual
