"""Intervals and tests of an evaluation's figures, against hand-computed values."""

import math

import pytest

from mgpo.eval.stats import accuracy_interval, bootstrap, mcnemar_exact, paired, unpaired, wilson


def test_wilson_against_the_textbook_value():
    """8 of 10: the Wilson interval is (0.490, 0.943) in tables; 0 of 10 and 10 of 10 stay in [0, 100]."""
    lo, hi = wilson(8, 10)
    assert (round(lo, 1), round(hi, 1)) == (49.0, 94.3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(100.0)
    # by the formula: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    z, p, n = 1.959963984540054, 146 / 191, 191
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson(146, 191) == pytest.approx((100 * (centre - half), 100 * (centre + half)))


def test_mcnemar_exact_against_a_hand_computed_table():
    """A right where B wrong on 2 questions, the reverse on 10: p = 2 x P(Binomial(12, 1/2) <= 2)
    = 2 x (1 + 12 + 66) / 4096 = 0.0386; no discordant question: p = 1."""
    assert mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(10, 2) == mcnemar_exact(2, 10)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0


def test_the_bootstrap_keeps_a_questions_samples_together_and_is_wider_than_wilson_for_correlated_samples():
    """Four samples per question, all right or all wrong: really 20 independent outcomes, not 80."""
    groups = [[True] * 4 for _ in range(12)] + [[False] * 4 for _ in range(8)]
    lo, hi = bootstrap([[float(x) for x in g] for g in groups])
    wlo, whi = wilson(48, 80)
    assert lo < 60 < hi and hi - lo > whi - wlo
    assert accuracy_interval(groups)[1] == "bootstrap over questions"
    assert accuracy_interval([[True], [False]])[1] == "Wilson"
    assert bootstrap([[1.0]] * 5) == (100.0, 100.0)


def test_paired_difference_counts_and_interval():
    a = {f"q{i}": [i < 6] for i in range(10)}  # 6 right
    b = {f"q{i}": [i < 9] for i in range(10)}  # 9 right: 3 more, none lost
    out = paired(a, b)
    assert out["questions"] == 10 and out["difference"] == pytest.approx(30.0)
    assert (out["only_a"], out["only_b"]) == (0, 3) and out["mcnemar_p"] == pytest.approx(0.25)
    assert out["ci95"][0] <= 30.0 <= out["ci95"][1] and out["ci95"][0] >= 0.0
    far = unpaired(a, {f"r{i}": [i < 9] for i in range(10)})
    assert far["difference"] == pytest.approx(30.0)
    assert far["ci95"][1] - far["ci95"][0] > out["ci95"][1] - out["ci95"][0], "unpaired is wider"
