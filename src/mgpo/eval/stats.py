"""The uncertainty of an evaluation's figures, as pure functions of per-question outcomes.

- One sample per question, questions independent: Wilson's score interval on the accuracy
  (E. B. Wilson, "Probable inference, the law of succession, and statistical inference", 1927),
  which stays inside [0, 100] and is accurate at a few hundred questions where the normal
  approximation is not.
- Several samples per question (Avg@k), or questions that come in groups (HR-Bench asks each
  question four times, its options rotated): a bootstrap over questions (or groups), which keeps
  a question's samples together (B. Efron, "Bootstrap methods", 1979).
- Two evaluations of the same questions: the paired difference with a bootstrap interval over
  questions, and McNemar's exact test on the questions one got right and the other wrong (Q.
  McNemar, 1947; exact: the binomial test on the discordant pairs).

Every interval is 95%; every bootstrap draws 2,000 resamples from a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
RESAMPLES = 2000


def wilson(right: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy, in %.

    >>> [round(v, 2) for v in wilson(146, 191)]
    [69.94, 81.9]
    """
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = right / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def _resampled_means(groups: Sequence[Sequence[float]], rng: np.random.Generator) -> np.ndarray:
    """[RESAMPLES] the mean of every value, each time over groups drawn with replacement."""
    sums = np.array([sum(g) for g in groups], dtype=float)
    counts = np.array([len(g) for g in groups], dtype=float)
    pick = rng.integers(0, len(groups), size=(RESAMPLES, len(groups)))
    return sums[pick].sum(axis=1) / counts[pick].sum(axis=1)


def bootstrap(groups: Sequence[Sequence[float]], seed: int = 0) -> tuple[float, float]:
    """95% percentile interval, in %, of the mean of every value, resampling whole groups (a
    question's samples, or HR-Bench's rotations of one question) with replacement."""
    if not groups:
        return float("nan"), float("nan")
    lo, hi = np.percentile(_resampled_means(groups, np.random.default_rng(seed)), [2.5, 97.5])
    return 100 * float(lo), 100 * float(hi)


def accuracy_interval(groups: Sequence[Sequence[bool]]) -> tuple[tuple[float, float], str]:
    """The interval of an accuracy and how it was made: Wilson's when every group is one outcome
    (one sample per independent question), else the bootstrap over groups."""
    if all(len(g) == 1 for g in groups):
        return wilson(sum(bool(g[0]) for g in groups), len(groups)), "Wilson"
    return bootstrap([[float(x) for x in g] for g in groups]), "bootstrap over questions"


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: questions only A got right, only B.

    >>> round(mcnemar_exact(2, 10), 4)  # binomial(12, 0.5): P(X <= 2) x 2
    0.0386
    >>> mcnemar_exact(5, 5)
    1.0
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: dict[str, list[bool]], b: dict[str, list[bool]], seed: int = 0) -> dict:
    """B minus A on the questions both evaluated (per question, the mean over its samples): the
    difference in points with a 95% bootstrap interval over questions, McNemar's exact p on the
    first sample of each question, and how many questions each got right that the other did not."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return {"questions": 0}
    da = np.array([np.mean(a[q]) for q in shared])
    db = np.array([np.mean(b[q]) for q in shared])
    diffs = db - da
    pick = np.random.default_rng(seed).integers(0, len(shared), size=(RESAMPLES, len(shared)))
    lo, hi = np.percentile(diffs[pick].mean(axis=1), [2.5, 97.5])
    only_a = sum(bool(a[q][0]) and not b[q][0] for q in shared)
    only_b = sum(bool(b[q][0]) and not a[q][0] for q in shared)
    return {"questions": len(shared), "difference": 100 * float(diffs.mean()),
            "ci95": [100 * float(lo), 100 * float(hi)], "mcnemar_p": mcnemar_exact(only_a, only_b),
            "only_a": only_a, "only_b": only_b}


def unpaired(a: dict[str, list[bool]], b: dict[str, list[bool]], seed: int = 0) -> dict:
    """B minus A on different question sets: each accuracy resampled on its own, so the interval
    of the difference is wider than a paired one would be."""
    ga, gb = [[float(x) for x in v] for v in a.values()], [[float(x) for x in v] for v in b.values()]
    if not ga or not gb:
        return {"questions": 0}
    rng = np.random.default_rng(seed)
    diffs = _resampled_means(gb, rng) - _resampled_means(ga, rng)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    mean = lambda g: sum(map(sum, g)) / sum(map(len, g))  # noqa: E731
    return {"questions": [len(ga), len(gb)], "difference": 100 * (mean(gb) - mean(ga)),
            "ci95": [100 * float(lo), 100 * float(hi)]}
