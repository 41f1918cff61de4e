"""The loss math on hand-computed numbers."""

import math

import pytest
import torch

from mgpo.config import LossConfig
from mgpo.core.loss import clipped_policy_loss, kl_k3, masked_mean, policy_loss


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert masked_mean(x, m).item() == pytest.approx(10 / 3)
    assert masked_mean(x, m, denom=10).item() == pytest.approx(1.0)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_clipped_policy_loss_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios, since old log-probs are 0
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    # positive advantage: ratio 1.5 clips to 1.2; 0.5 is kept (min of the two objectives); 1.1 kept
    loss, clip_frac = clipped_policy_loss(logp, old, torch.tensor([2.0]), mask, 0.2)
    assert loss.item() == pytest.approx(-(2 * 1.2 + 2 * 0.5 + 2 * 1.1) / 3, rel=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)
    # negative advantage: 0.5 clips to 0.8; 1.5 is kept
    loss, clip_frac = clipped_policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2)
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3, rel=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)


def test_kl_k3_hand_computed_and_clamped():
    logp = torch.tensor([math.log(0.5), 0.0, 0.0])
    ref = torch.tensor([math.log(0.25), 0.0, 30.0])
    kl = kl_k3(logp, ref, clamp=10.0)
    # r = q/p = 0.5: k3 = r - log r - 1 = 0.5 + log 2 - 1
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    assert kl[1].item() == 0.0
    assert kl[2].item() == 10.0  # clamped
    assert (kl >= 0).all()


def test_policy_loss_combines_terms():
    cfg = LossConfig(clip_eps=0.2, kl_coef=0.5, entropy_coef=0.1)
    logp = torch.zeros(1, 2)
    ref = torch.full((1, 2), math.log(0.5))
    ent = torch.full((1, 2), 2.0)
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, logp, torch.tensor([1.0]), mask, cfg, ref_logp_NT=ref, entropy_NT=ent)
    kl = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(-1.0 + 0.5 * kl - 0.1 * 2.0, rel=1e-6)
    assert stats["kl"] == pytest.approx(kl, rel=1e-6) and stats["entropy"] == pytest.approx(2.0)


def test_gradient_is_zero_at_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5))
    logsm = torch.log_softmax(logits, -1)
    logp = logsm.gather(-1, tokens[..., None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]], dtype=torch.float32)
    loss, _ = policy_loss(logp, logp.detach() + 0.1, torch.tensor([1.0, -2.0]), mask, LossConfig(),
                          ref_logp_NT=logp.detach() - 0.3, entropy_NT=ent)
    loss.backward()
    g = logits.grad.abs().sum(-1)
    assert torch.all(g[mask == 0] == 0), "masked positions must get exactly zero gradient"
    assert torch.all(g[mask == 1] > 0)


def _two_micro_batches(normalization):
    """A step of two trajectories split over two micro-batches: trajectory 0 has one masked
    token (NLL 2), trajectory 1 three (NLL 1, 2, 6); the step's denominator is the sum of the
    weights over the whole step, as optimizer_step computes it."""
    from mgpo.core.loss import loss_weights, sft_loss

    nll_NT = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 2.0, 6.0, 9.0]])
    mask_NT = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    weights_NT = loss_weights(mask_NT, normalization)
    denom = weights_NT.sum()
    return sum(sft_loss(-nll_NT[[i]], weights_NT[[i]], denom)[0].item() for i in range(2))


def test_token_normalization_is_one_mean_over_the_steps_tokens():
    assert _two_micro_batches("token") == pytest.approx((2 + 1 + 2 + 6) / 4)  # 2.75


def test_sequence_normalization_is_the_mean_of_each_trajectorys_mean():
    assert _two_micro_batches("sequence") == pytest.approx((2 / 1 + (1 + 2 + 6) / 3) / 2)  # 2.5


def test_loss_weights_hand_computed():
    from mgpo.core.loss import loss_weights

    mask_NT = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(loss_weights(mask_NT, "token"), mask_NT)
    assert torch.equal(loss_weights(mask_NT, "sequence"), torch.tensor(
        [[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]]))  # an empty row stays empty
    assert LossConfig().normalization == "token"  # the default: the token mean over the step


def test_sequence_normalization_weights_the_policy_terms_alike():
    """pg loss, clip fraction, KL and entropy all use the same weights."""
    from mgpo.core.loss import loss_weights

    mask_NT = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    w_NT = loss_weights(mask_NT, "sequence")
    ent_NT = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    logp_NT = torch.zeros(2, 2)
    _, stats = policy_loss(logp_NT, logp_NT, torch.tensor([1.0, -1.0]), w_NT, LossConfig(kl_coef=0.0),
                           entropy_NT=ent_NT, denom=w_NT.sum())
    assert stats["entropy"] == pytest.approx((1 + 4) / 2)
    assert stats["pg_loss"] == pytest.approx((-1 + 1) / 2)


def test_normalization_choices_are_checked_at_load():
    from mgpo.config import ConfigError, load_config

    assert load_config(None, ["loss.normalization=sequence"]).loss.normalization == "sequence"
    with pytest.raises(ConfigError, match="loss.normalization must be one of"):
        load_config(None, ["loss.normalization=sample"])
