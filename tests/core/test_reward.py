import pytest
import torch

from mgpo import extract_answer, group_advantages
from mgpo.core.reward import score, zero_variance_share


@pytest.mark.parametrize("text, letter", [
    ("\\boxed{C}", "C"), ("\\boxed{(C)}", "C"), ("\\boxed{C. red}", "C"), ("\\boxed{\\text{C}}", "C"),
    ("\\boxed{ c }", "C"), ("\\boxed{$B$}", "B"), ("\\boxed{\\textbf{(D)}}", "D"), ("\\boxed{E)}", "E"),
    ("so \\boxed{A} no wait \\boxed{B}", "B"), ("\\boxed{}", None), ("\\boxed{red}", None),
    ("\\boxed{C", None), ("C", None), ("", None), ("\\boxed{AB}", None), ("\\boxed{Answer}", None),
])
def test_extract_answer(text, letter):
    assert extract_answer(text) == letter


@pytest.mark.parametrize("text, letter", [
    ("\\boxed{Option B}", "B"), ("\\boxed{option (C)}", "C"), ("\\boxed{Answer: D}", "D"),
    ("\\boxed{Choice A. red}", "A"), ("\\boxed{\\text{Option E}}", "E"),
    ("\\boxed{Option}", None), ("\\boxed{Options B or C}", None), ("\\boxed{Option B or C}", None),
])
def test_extract_answer_after_a_label_word(text, letter):
    assert extract_answer(text) == letter


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B. red", "B"), ("B) red", "B"), ("B: the red one", "B"),
    ("B or C", None), ("B/C", None), ("B, C", None), ("(B) or (C)", None), ("B and C", None), ("B & C", None),
    ("B. or C.", None), ("a red one", None), ("Because", None),
])
def test_bare_letter_naming_two_options_is_no_answer(text, letter):
    from mgpo.core.reward import bare_letter

    assert bare_letter(text) == letter


def test_extract_answer_by_option_text():
    assert extract_answer("\\boxed{ Right }", ["left", "right"]) == "B"


@pytest.mark.parametrize("text, letter", [
    # Option text maps to its letter only when it matches an option exactly.
    ("\\boxed{a red}", None), ("\\boxed{a red car}", None), ("\\boxed{b blue}", None),
    ("\\boxed{a blue square}", "B"), ("\\boxed{A Blue Square}", "B"), ("\\boxed{c}", "C"),
    # The letter forms still read as letters, whatever the options say.
    ("\\boxed{A}", "A"), ("\\boxed{(A)}", "A"), ("\\boxed{A. red}", "A"), ("\\boxed{A) red}", "A"),
    ("\\boxed{(A) red}", "A"), ("\\boxed{A: red}", "A"), ("\\boxed{B.}", "B"), ("\\boxed{(B}", "B"),
])
def test_option_text_needs_an_exact_match(text, letter):
    assert extract_answer(text, ["red", "a blue square", "green"]) == letter


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    adv = group_advantages(r, 4)
    # group 1: mean .5, unbiased std sqrt(1/3) = .57735 -> +-0.866025
    assert torch.allclose(adv[:4], torch.tensor([0.866025, -0.866025, 0.866025, -0.866025]), atol=1e-5)
    assert torch.equal(adv[4:8], torch.zeros(4))  # identical rewards: no signal
    # group 3: mean .75, std .5 -> (.25/.5, -.75/.5)
    assert torch.allclose(adv[8:], torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5)


@pytest.mark.parametrize("value", [0.9, 0.7, 1.05, 0.1, -0.3, 1 / 3])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_all_equal_group_has_exactly_zero_advantage(value, group_size):
    """Non-dyadic rewards (a format bonus, a turn cost) must not leave a rounding residue."""
    rewards = torch.full((2 * group_size,), value)
    assert torch.equal(group_advantages(rewards, group_size), torch.zeros(2 * group_size))


def test_mixed_non_dyadic_groups():
    r = torch.tensor([0.9, 0.9, 0.9, 0.9, 1.05, 0.05, 1.05, 0.05, 0.7, 0.7, 0.7, -0.3])
    adv = group_advantages(r, 4)
    assert torch.equal(adv[:4], torch.zeros(4))
    # group 2: mean .55, unbiased std sqrt(4 * .25 / 3) = .57735 -> +-0.866025
    assert torch.allclose(adv[4:8], torch.tensor([0.866025, -0.866025, 0.866025, -0.866025]), atol=1e-5)
    # group 3: mean .45, deviations .25 x 3 and -.75, unbiased std .5 -> (.5, .5, .5, -1.5)
    assert torch.allclose(adv[8:], torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5)
    assert adv.dtype == torch.float32


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="split"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)


def test_zero_variance_share():
    assert zero_variance_share(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2) == pytest.approx(2 / 3)


def test_turn_cost_charges_each_crop_shown():
    """rollout.turn_cost: the reward of the final turn's answer minus the cost per crop."""
    from mgpo.core.trajectory import Trajectory, TurnRecord

    log = [TurnRecord("z", 3, False, "zoom", crop_size=(28, 28)), TurnRecord("z", 3, False, "zoom", crop_size=(28, 28)),
           TurnRecord("f", 3, False, "fallback"), TurnRecord("\\boxed{B}", 3, False, "answer")]
    t = Trajectory("x", 0, "B", ("a", "b"), (10, 10), (10, 10), turn_log=log)
    assert t.crops == 2 and t.final_text == "\\boxed{B}"
    assert score([t]).tolist() == [1.0]
    assert score([t], turn_cost=0.25).tolist() == [0.5]
    two = Trajectory("y", 0, "B", ("a", "b"), (10, 10), (10, 10), turn2_text="\\boxed{A}", crop_size=(28, 28))
    assert score([two], turn_cost=0.25).tolist() == [-0.25]


def test_adv_scale_none_leaves_the_reward_minus_its_group_mean_and_batch_divides_by_the_batch_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert group_advantages(rewards, 4, scale="none").tolist() == [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    by_batch = group_advantages(rewards, 4, 1e-6, scale="batch", batch_std=0.5)
    assert by_batch.tolist() == pytest.approx([0.75 / 0.500001, -0.25 / 0.500001] + [-0.25 / 0.500001] * 2
                                              + [1.0 / 1.000002 * 1.0, 0.999998, -0.999998, -0.999998], rel=1e-5)
    assert group_advantages(torch.ones(4), 4, scale="none").tolist() == [0.0] * 4


def test_the_zoom_bonus_is_paid_on_right_answers_only_and_capped():
    from mgpo.core.trajectory import Trajectory, TurnRecord

    def traj(answer_text, crops):
        log = [TurnRecord("z", 3, False, "zoom", crop_size=(28, 28)) for _ in range(crops)]
        return Trajectory("s", 0, "A", ("x", "y"), (9, 9), (9, 9), turn_log=[*log, TurnRecord(answer_text, 3, False,
                                                                                               "answer")])
    trajs = [traj("\\boxed{A}", 1), traj("\\boxed{A}", 3), traj("\\boxed{A}", 9), traj("\\boxed{B}", 3)]
    assert score(trajs, zoom_bonus=0.05, zoom_bonus_cap=0.2).tolist() == pytest.approx([1.05, 1.15, 1.2, 0.0])
    assert score(trajs).tolist() == [1.0, 1.0, 1.0, 0.0], "off by default: the paper's reward"
