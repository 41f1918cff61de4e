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
