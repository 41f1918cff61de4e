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


# ---- the objectives researchers compare against (loss.ratio, clip_eps_high, normalization: constant)

def _two_trajectories(log_ratios_0, log_ratios_1):
    """Two trajectories of 2 and 3 trained tokens (a pad after the first); old log-probs 0."""
    logp = torch.tensor([[*log_ratios_0, 0.0], log_ratios_1], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logp, torch.zeros(2, 3), mask


def test_a_sequence_ratio_outside_the_clip_zeroes_that_trajectorys_gradient():
    """GSPO: s_i = exp(mean of the trajectory's token log-ratios). Trajectory 0: log-ratios 0.3 and
    0.1, s_0 = e^0.2 = 1.2214 > 1.2, A = +1: clipped, no gradient. Trajectory 1: log-ratios 0, 0.03,
    0.06, s_1 = e^0.03, A = +2: inside. Token weights, 5 tokens: loss = (2 x -1.2 + 3 x -2 s_1) / 5;
    d loss / d logp_1t = -2 s_1 / 5 for each of its 3 tokens (s_1 / 3 each, times 3 tokens)."""
    logp, old, mask = _two_trajectories([0.3, 0.1], [0.0, 0.03, 0.06])
    loss, clip_frac = clipped_policy_loss(logp, old, torch.tensor([1.0, 2.0]), mask, 0.2, ratio="sequence")
    s1 = math.exp(0.03)
    assert loss.item() == pytest.approx((2 * -1.2 + 3 * -2 * s1) / 5, rel=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 5)
    loss.backward()
    assert logp.grad[0].tolist() == [0.0, 0.0, 0.0]
    assert logp.grad[1].tolist() == pytest.approx([-2 * s1 / 5] * 3, rel=1e-6)


def test_the_geometric_objective_equals_the_token_one_when_every_ratio_is_one():
    cfg = LossConfig(kl_coef=0.0, entropy_coef=0.0)
    results = []
    for ratio in ("token", "geometric", "sequence"):
        for weights in ("token", "sequence"):
            logp, old, mask = _two_trajectories([0.0, 0.0], [0.0, 0.0, 0.0])
            w = mask if weights == "token" else mask / mask.sum(1, keepdim=True)
            loss, _ = policy_loss(logp, old, torch.tensor([1.5, -0.5]), w, LossConfig(**{**cfg.__dict__, "ratio": ratio}),
                                  denom=w.sum())
            loss.backward()
            results.append((ratio, weights, loss.item(), logp.grad.clone()))
    for ratio, weights, value, grad in results:
        token = next(r for r in results if r[0] == "token" and r[1] == weights)
        assert value == pytest.approx(token[2], abs=1e-7) and torch.allclose(grad, token[3]), (ratio, weights)


def test_the_geometric_objective_clips_each_log_ratio_in_log_space_hand_computed():
    """GMPO, A = +1, clip 0.2 in log space: log-ratios 0.5 -> 0.2 (the smaller of it and its clip),
    -0.5 stays -0.5 (already the smaller): the trajectory's ratio is exp((0.2 - 0.5) / 2)."""
    logp, old, mask = _two_trajectories([0.5, -0.5], [0.0, 0.0, 0.0])
    loss, clip_frac = clipped_policy_loss(logp, old, torch.tensor([1.0, 0.0]), mask, 0.2, ratio="geometric")
    assert loss.item() == pytest.approx(2 * -math.exp(-0.15) / 5, rel=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 5)
    # A = -1: the larger of each and its clip: 0.5 stays, -0.5 -> -0.2
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([-1.0, 0.0]), mask, 0.2, ratio="geometric")
    assert loss.item() == pytest.approx(2 * math.exp(0.15) / 5, rel=1e-6)


def test_clip_higher_lets_a_positive_advantage_raise_its_ratio_further():
    """DAPO's clip-higher: ratio 1.25, A = +1: clipped at 1.2 by default, kept under clip_eps_high 0.28;
    the lower end (ratio 0.7, A = -1) is clipped at 0.8 either way."""
    logp, old, mask = torch.log(torch.tensor([[1.25, 0.7]])), torch.zeros(1, 2), torch.ones(1, 2)
    base, _ = clipped_policy_loss(logp[:, :1], old[:, :1], torch.tensor([1.0]), mask[:, :1], 0.2)
    high, _ = clipped_policy_loss(logp[:, :1], old[:, :1], torch.tensor([1.0]), mask[:, :1], 0.2, clip_eps_high=0.28)
    assert base.item() == pytest.approx(-1.2) and high.item() == pytest.approx(-1.25)
    low, _ = clipped_policy_loss(logp[:, 1:], old[:, 1:], torch.tensor([-1.0]), mask[:, 1:], 0.2, clip_eps_high=0.28)
    assert low.item() == pytest.approx(0.8)


def test_the_constant_normalization_divides_by_trajectories_times_the_budget():
    """Dr. GRPO: the step's token sum over (trajectories x the most tokens one can generate): two
    trajectories of 2 and 3 tokens, a budget of 10, per-token losses 1: 5 / (2 x 10) = 0.25."""
    from mgpo.core.loss import loss_denominator, loss_weights

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = loss_weights(mask, "constant", max_tokens=10)
    assert masked_mean(torch.ones(2, 3), w, loss_denominator(w, "constant")).item() == pytest.approx(0.25)
    assert loss_denominator(loss_weights(mask, "token"), "token").item() == 5.0
    assert loss_denominator(loss_weights(mask, "sequence"), "sequence").item() == 2.0


def test_the_constant_normalization_counts_only_the_trajectories_that_train():
    """A trajectory left out of the update (its mask zeroed: a uniform group dropped, an over-turn
    one masked) does not count among the step's trajectories: one trajectory of 2 tokens and one
    left out, a budget of 10, per-token losses 1: 2 / (1 x 10) = 0.2, as if it had never been there."""
    from mgpo.core.loss import loss_denominator, loss_weights

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]) * torch.tensor([[1.0], [0.0]])
    w = loss_weights(mask, "constant", max_tokens=10)
    assert loss_denominator(w, "constant").item() == 1.0
    assert masked_mean(torch.ones(2, 3), w, loss_denominator(w, "constant")).item() == pytest.approx(0.2)


def test_the_defaults_are_the_papers_token_objective_bit_for_bit():
    torch.manual_seed(0)
    logp, old = torch.randn(4, 6) * 0.1, torch.randn(4, 6) * 0.1
    mask, adv = (torch.rand(4, 6) > 0.3).float(), torch.randn(4)
    before, _ = clipped_policy_loss(logp, old, adv, mask, 0.2)
    explicit, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, clip_eps_high=0.2, ratio="token")
    ratio = torch.exp(logp - old)
    by_hand = masked_mean(torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.2)), mask)
    assert before.item() == explicit.item() == by_hand.item()
