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
- ``loss.normalization: constant``: Dr. GRPO's normalizer (Liu et al. 2025, "Understanding
  R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783): the sum over every masked
  token of the step divided by (the step's trajectories that train x the most tokens one can
  generate), a constant that does not depend on how long the answers were.

The importance ratio (``loss.ratio``) is PPO's per token (Schulman et al. 2017), GSPO's per
sequence (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071) or GMPO's
geometric mean (Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv:2507.20673); the
two sequence-level objectives give every trained token of a trajectory its trajectory's loss,
so the normalization above weighs them as it weighs tokens. ``loss.clip_eps_high`` is DAPO's
clip-higher (Yu et al. 2025, "DAPO", arXiv:2503.14476).

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


def loss_weights(mask_NT: torch.Tensor, normalization: str = "token", max_tokens: int = 1) -> torch.Tensor:
    """Each token's weight in the step's loss; the step's ``denom`` is ``loss_denominator`` of them,
    summed over the step.

    "token": 1 per masked token (the step's denominator is its token count). "sequence": 1 / (its
    trajectory's masked tokens), so each trajectory's mean counts once (the denominator is the
    number of trajectories with a masked token). "constant": 1 / ``max_tokens`` (the most tokens a
    trajectory can generate), over a denominator of the step's trajectories that train.

    >>> loss_weights(torch.tensor([[1., 1., 0.], [1., 0., 0.]]), "sequence")
    tensor([[0.5000, 0.5000, 0.0000],
            [1.0000, 0.0000, 0.0000]])
    """
    if normalization == "token":
        return mask_NT
    if normalization == "sequence":
        return mask_NT / mask_NT.sum(dim=1, keepdim=True).clamp_min(1)
    if normalization == "constant":
        return mask_NT / max_tokens
    raise ValueError(f"loss.normalization must be 'token', 'sequence' or 'constant', got {normalization!r}")


def loss_denominator(weights_NT: torch.Tensor, normalization: str = "token") -> torch.Tensor:
    """This rank's share of the step's denominator: the sum of its weights, or for "constant" the
    number of its trajectories that train (rows with any weight), whatever their lengths.

    >>> loss_denominator(torch.tensor([[0.5, 0.5], [0.5, 0.], [0., 0.]]), "constant")
    tensor(2.)
    """
    if normalization == "constant":
        return (weights_NT > 0).any(dim=1).sum().float()
    return weights_NT.sum()


def clipped_policy_loss(logp_NT, old_logp_NT, adv_N, mask_NT, clip_eps: float = 0.2, denom=None,
                        clip_eps_high: float | None = None, ratio: str = "token"):
    """The clipped surrogate, as a weighted mean over the mask (``mask_NT``: the loss weights).

    Returns (loss, clip fraction). ``adv_N`` is one advantage per trajectory. The ratio is
    clipped to [1 - clip_eps, 1 + clip_eps_high] (``clip_eps_high`` None: clip_eps):

    - "token" (PPO): r_t = pi(y_t) / pi_old(y_t); the loss of token t is max(-A r_t, -A clip(r_t)).
    - "sequence" (GSPO): s = exp(mean_t log r_t) over the trajectory's trained tokens, clipped as
      r_t is; every trained token of the trajectory carries max(-A s, -A clip(s)).
    - "geometric" (GMPO): each log r_t clipped to [-clip_eps, clip_eps_high] in log space, the
      pessimistic one of log r_t and its clip kept (the smaller for A > 0, the larger for A < 0),
      averaged per trajectory and exponentiated: every trained token carries -A exp(that mean).

    With every ratio 1 all three give -A on every trained token.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio_NT = logp_NT - old_logp_NT
    adv_NT = adv_N[:, None].to(log_ratio_NT.dtype)
    if ratio == "token":
        ratio_NT = torch.exp(log_ratio_NT)
    elif ratio in ("sequence", "geometric"):
        tokens_NT = (mask_NT > 0).to(log_ratio_NT.dtype)  # the trajectory's trained tokens, whatever their weight
        n_N1 = tokens_NT.sum(dim=1, keepdim=True).clamp_min(1)
        if ratio == "geometric":
            clipped_log_NT = torch.clamp(log_ratio_NT, -clip_eps, high)
            kept_NT = torch.where(adv_NT > 0, torch.minimum(log_ratio_NT, clipped_log_NT),
                                  torch.maximum(log_ratio_NT, clipped_log_NT))
            geo_N1 = torch.exp((kept_NT * tokens_NT).sum(dim=1, keepdim=True) / n_N1)
            loss = masked_mean((-adv_NT * geo_N1).expand_as(log_ratio_NT), mask_NT, denom)
            clip_frac = masked_mean((kept_NT != log_ratio_NT).float(), mask_NT, denom)
            return loss, clip_frac
        ratio_NT = torch.exp((log_ratio_NT * tokens_NT).sum(dim=1, keepdim=True) / n_N1).expand_as(log_ratio_NT)
    else:
        raise ValueError(f"loss.ratio must be 'token', 'sequence' or 'geometric', got {ratio!r}")
    unclipped_NT = -adv_NT * ratio_NT
    clipped_NT = -adv_NT * torch.clamp(ratio_NT, 1 - clip_eps, 1 + high)
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
    pg, clip_frac = clipped_policy_loss(logp_NT, old_logp_NT, adv_N, mask_NT, cfg.clip_eps, denom,
                                        cfg.clip_eps_high, cfg.ratio)
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
