"""The policy loss, as pure functions of tensors (the log-probs come from ``mgpo.core.policy``).

Shapes: N trajectories, T tokens. ``logp_NT[:, t]`` is the log-prob of token ``t`` given
the tokens before it; positions outside ``mask_NT`` hold 0 and never matter.

Normalization has one owner: every term is a weighted sum over the masked tokens divided
by ``denom``, the sum of the weights over the whole optimizer step (every micro-batch on
every rank); ``loss_weights`` gives the weights. A micro-batch's loss and statistics are
then its exact share of the step's mean, and the step's figures are their sums.

- ``loss.normalization: token`` (the default): one token mean over every masked token of
  the step, across micro-batches and ranks: DAPO's token-level loss (Yu et al. 2025), TRL's
  ``loss_type="dapo"``. Not GRPO's per-sequence mean (a long answer's tokens count as much
  as a short one's), nor a mean per micro-batch (which would weight a token by how many
  others share its micro-batch).
- ``loss.normalization: sequence``: GRPO's per-sequence mean (Shao et al. 2024): each
  trajectory's token mean, then the mean over the step's trajectories.

The KL term is the per-token k3 estimate, whose value estimates KL(pi || ref) on the
sampled tokens; its gradient (samples held fixed) is ``(1 - ref/pi) * grad log pi``, whose
expectation under pi is the gradient of KL(ref || pi): the penalty pulls the policy
towards covering what the reference model would say.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``x`` over ``mask`` divided by ``denom`` (default: the mask's count).

    Passing the token count of the whole optimizer step as ``denom`` makes gradient
    accumulation over micro-batches an exact token mean.

    >>> masked_mean(torch.tensor([[1., 2., 3.]]), torch.tensor([[1., 0., 1.]]))
    tensor(2.)
    """
    total = (x * mask).sum()
    return total / (mask.sum().clamp_min(1) if denom is None else denom)


def loss_weights(mask_NT: torch.Tensor, normalization: str = "token") -> torch.Tensor:
    """Each token's weight in the step's loss; the step's ``denom`` is their sum over the step.

    "token": 1 per masked token (the sum is the step's token count). "sequence": 1 / (its
    trajectory's masked tokens), so each trajectory's mean counts once (the sum is the
    number of trajectories with a masked token).

    >>> loss_weights(torch.tensor([[1., 1., 0.], [1., 0., 0.]]), "sequence")
    tensor([[0.5000, 0.5000, 0.0000],
            [1.0000, 0.0000, 0.0000]])
    """
    if normalization == "token":
        return mask_NT
    if normalization == "sequence":
        return mask_NT / mask_NT.sum(dim=1, keepdim=True).clamp_min(1)
    raise ValueError(f"loss.normalization must be 'token' or 'sequence', got {normalization!r}")


def clipped_policy_loss(logp_NT, old_logp_NT, adv_N, mask_NT, clip_eps: float = 0.2, denom=None):
    """PPO's clipped surrogate (Schulman et al. 2017), token mean over the mask.

    Returns (loss, clip fraction). ``adv_N`` is one advantage per trajectory, broadcast to
    its tokens.
    """
    ratio_NT = torch.exp(logp_NT - old_logp_NT)
    adv_NT = adv_N[:, None].to(ratio_NT.dtype)
    unclipped_NT = -adv_NT * ratio_NT
    clipped_NT = -adv_NT * torch.clamp(ratio_NT, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped_NT, clipped_NT), mask_NT, denom)
    clip_frac = masked_mean((clipped_NT > unclipped_NT).float(), mask_NT, denom)
    return loss, clip_frac


def kl_k3(logp_NT, ref_logp_NT, clamp: float = 10.0):
    """Per-token k3 estimator of KL(policy || reference model), clamped (verl's "low_var_kl").

    k3 = exp(ref - logp) - (ref - logp) - 1 is unbiased, always >= 0, and has lower
    variance than log(p/q) (J. Schulman, "Approximating KL Divergence", 2020).

    >>> kl_k3(torch.tensor([0.0]), torch.tensor([0.0]))
    tensor([0.])
    """
    log_ratio_NT = (ref_logp_NT - logp_NT).clamp(-20, 20)
    return (torch.exp(log_ratio_NT) - log_ratio_NT - 1).clamp(-clamp, clamp)


def policy_loss(logp_NT, old_logp_NT, adv_N, mask_NT, cfg, *, ref_logp_NT=None, entropy_NT=None,
                denom=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The full objective: clipped policy loss + kl_coef * KL - entropy_coef * entropy.

    One mask serves all three terms: the loss mask, or the ``loss_weights`` made from it.
    ``cfg`` is a ``LossConfig``. With ``denom`` the sum of the weights over the step, the
    returned statistics add up over micro-batches to the step's figures.
    """
    pg, clip_frac = clipped_policy_loss(logp_NT, old_logp_NT, adv_N, mask_NT, cfg.clip_eps, denom)
    loss = pg
    stats = {"pg_loss": pg.item(), "clip_frac": clip_frac.item()}
    if ref_logp_NT is not None and cfg.kl_coef:
        kl = masked_mean(kl_k3(logp_NT, ref_logp_NT, cfg.kl_clamp), mask_NT, denom)
        loss = loss + cfg.kl_coef * kl
        stats["kl"] = kl.item()
    if entropy_NT is not None:
        ent = masked_mean(entropy_NT, mask_NT, denom)
        loss = loss - cfg.entropy_coef * ent
        stats["entropy"] = ent.item()
    stats["loss"] = loss.item()
    return loss, stats


def sft_loss(logp_NT, mask_NT, denom=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised fine-tuning: negative log-likelihood of the masked (assistant) tokens,
    normalized over the step like the policy loss."""
    nll = masked_mean(-logp_NT, mask_NT, denom)
    return nll, {"loss": nll.item(), "nll": nll.item()}
