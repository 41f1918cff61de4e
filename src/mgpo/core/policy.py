"""The policy's log-prob forward: the one place that turns a rollout into token log-probs.

The trainer (policy, old and reference log-probs), the demo and the tests all go
through ``PolicyForward`` and ``rollout_logprobs``; ``mgpo.core.loss`` only does math on
what comes out.

Shapes: N trajectories, T tokens, K masked tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..runtime.memory import HEAD_CHUNK  # lm_head chunk: its size is planned with the rest of the memory

_MASKED = -1e9  # logit given to suppressed tokens: exp() is exactly 0, no inf * 0 = nan


def unwrap(model):
    """The Hugging Face model inside DDP / DeepSpeed / peft / PolicyForward wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif isinstance(model, PolicyForward):
            model = model.policy
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def rope_owner(model):
    """The inner model (Qwen2_5_VLModel, Qwen3VLModel) that keeps ``rope_deltas`` (the mRoPE
    offsets decode steps read)."""
    m = unwrap(model)
    for _ in range(5):
        if "rope_deltas" in vars(m):
            return m
        m = m.model
    raise AttributeError("cannot find the Qwen-VL module that holds rope_deltas")


def _head(lm_head: nn.Module, hidden_KH, tokens_K, temperature: float, suppress_ids, with_entropy: bool):
    """Log-prob of each target token (and the entropy) from hidden states, for one chunk."""
    logits_KV = lm_head(hidden_KH).float() / temperature
    if len(suppress_ids):
        logits_KV[:, suppress_ids] = _MASKED  # generation never samples them: same distribution
    logsm_KV = F.log_softmax(logits_KV, dim=-1)
    logp_K = logsm_KV.gather(-1, tokens_K[:, None]).squeeze(-1)
    entropy_K = -(logsm_KV.exp() * logsm_KV).sum(-1) if with_entropy else torch.zeros_like(logp_K)
    return logp_K, entropy_K


def masked_token_logprobs(model, inputs: dict[str, torch.Tensor], loss_mask_NT: torch.Tensor, *,
                          temperature: float = 1.0, suppress_ids=(), with_entropy: bool = False,
                          chunk_tokens: int = HEAD_CHUNK):
    """Log-probs (and entropies) of the loss-mask tokens from one forward pass.

    - ``mm_token_type_ids`` is passed, so the model computes 3-D mRoPE positions from the
      image grids. Without it transformers 5.x silently falls back to 1-D positions and
      the log-probs no longer match what was sampled.
    - The distribution is the one generation sampled from: logits divided by the
      temperature, vision tokens suppressed.
    - Only positions that predict a masked token go through ``lm_head``, ``chunk_tokens``
      at a time; under autograd each chunk is recomputed in backward, so the K x V
      log-softmax is never held for all K masked tokens at once.
    """
    hf = unwrap(model)
    hidden_NTH = hf.model(**inputs, use_cache=False).last_hidden_state
    target_NT = loss_mask_NT[:, 1:].to(hidden_NTH.device).bool()  # token t+1 is predicted at t
    hidden_KH = hidden_NTH[:, :-1][target_NT]
    tokens_K = inputs["input_ids"][:, 1:][target_NT]
    suppress = list(suppress_ids)
    parts = []
    for lo in range(0, max(1, len(tokens_K)), chunk_tokens):
        args = (hf.lm_head, hidden_KH[lo: lo + chunk_tokens], tokens_K[lo: lo + chunk_tokens], temperature,
                suppress, with_entropy)
        parts.append(checkpoint(_head, *args, use_reentrant=False) if torch.is_grad_enabled() else _head(*args))
    logp_K = torch.cat([p[0] for p in parts])
    logp_NT = torch.zeros(target_NT.shape[0], target_NT.shape[1] + 1, device=hidden_NTH.device)
    logp_NT[:, 1:][target_NT] = logp_K
    entropy_NT = None
    if with_entropy:
        entropy_NT = torch.zeros_like(logp_NT)
        entropy_NT[:, 1:][target_NT] = torch.cat([p[1] for p in parts])
    return logp_NT, entropy_NT


class PolicyForward(nn.Module):
    """The policy with its log-prob forward as ``forward``.

    DDP only synchronizes gradients for computations that go through the wrapped
    module's ``forward`` (and DeepSpeed only gathers ZeRO-3 shards there), so the
    trainer wraps this module rather than the bare Hugging Face model.
    """

    def __init__(self, policy, temperature: float, suppress_ids, chunk_tokens: int = HEAD_CHUNK):
        super().__init__()
        self.policy = policy
        self.temperature = temperature
        self.suppress_ids = list(suppress_ids)
        self.chunk_tokens = chunk_tokens  # masked positions per lm_head call (its memory is planned)

    def forward(self, loss_mask, with_entropy: bool = False, **inputs):
        return masked_token_logprobs(self.policy, inputs, loss_mask, temperature=self.temperature,
                                     suppress_ids=self.suppress_ids, with_entropy=with_entropy,
                                     chunk_tokens=self.chunk_tokens)


def device_of(model) -> torch.device:
    return next(unwrap(model).parameters()).device


@torch.no_grad()
def rollout_logprobs(forward: nn.Module, batch, micro_batches: list[list[int]]) -> torch.Tensor:
    """Log-probs of every trajectory of a ``Rollout`` (no grad), one forward per micro-batch (a
    list of trajectory indices each; every trajectory in one of them), on CPU, padded to the
    rollout's width: the old-policy and reference-model figures."""
    out_NT = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    device = device_of(forward)
    for part in micro_batches:
        mb = batch.select(part)
        logp, _ = forward(loss_mask=mb.loss_mask.to(device), **mb.model_inputs(device))
        out_NT[part, : logp.shape[1]] = logp.float().cpu()
    return out_NT
