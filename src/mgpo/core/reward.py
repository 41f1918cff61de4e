"""Reward and group-relative advantage (GRPO), as pure functions.

The reward is binary: 1.0 when the option letter in the last ``\\boxed{...}`` of the final
assistant turn equals the ground truth. Nothing rewards the box directly; grounding is
learned because good crops lead to right answers (paper, section 3).
"""

from __future__ import annotations

import re

import torch

_BOXED = "\\boxed{"
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# A letter alone, in parentheses, or followed by ". ) :" ("C", "(C) red", "C. red", "C: red"),
# optionally after a label word ("Option C", "Answer: C"); a letter followed by a space and a
# word ("a red", "B or C") is text, not a letter.
_LETTER = re.compile(r"^(?:(?i:option|answer|choice)\s*(?::\s*|\s+))?"
                     r"(?:\(\s*([A-Za-z])\s*(?:\)|$)|([A-Za-z])\s*(?:[.):]|$))")


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, with nested braces matched."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i, depth = start + len(_BOXED), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed (e.g. cut by the token limit)


def extract_answer(text: str, options: tuple[str, ...] | list[str] | None = None) -> str | None:
    """The option letter in the last ``\\boxed{...}``, normalized; None when there is none.

    >>> [extract_answer(text) for text in ["\\\\boxed{C}", "\\\\boxed{(C)}", "\\\\boxed{C. red}", "\\\\boxed{\\\\text{C}}"]]
    ['C', 'C', 'C', 'C']
    >>> extract_answer("\\\\boxed{Option B}"), extract_answer("\\\\boxed{B or C}")
    ('B', None)
    >>> extract_answer("first \\\\boxed{A}, finally \\\\boxed{B}")
    'B'
    >>> extract_answer("\\\\boxed{red}", options=["blue", "red"])
    'B'
    >>> extract_answer("\\\\boxed{a red}", options=["red", "blue"]) is None  # not letter A
    True
    >>> extract_answer("no answer") is None
    True
    """
    content = _last_boxed(text if isinstance(text, str) else "")
    if content is None:
        return None
    prev = None
    while prev != content:  # unwrap \text{\textbf{C}} and friends
        prev, content = content, _WRAPPERS.sub(r"\1", content)
    content = content.strip().strip("$").strip()
    m = _LETTER.match(content)
    if m:
        return (m.group(1) or m.group(2)).upper()
    if options:  # option text counts only as a whole: "a red" is not option A
        for i, option in enumerate(options):
            if content.lower() == str(option).strip().lower():
                return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[i]
    return None


_BARE = re.compile(r"^\s*\(?([A-Z])\)?(?:[.:)]|\s|$)")
# Two letters joined ("B or C", "(B) and (C)", "B/C"): naming two options is no answer.
_TWO = re.compile(r"^\s*\(?[A-Z]\)?[.:)]?\s*(?:(?i:or|and)\b|[&/,])\s*\(?[A-Z]\)?(?:[.:)]|\s|$)")


def bare_letter(text: str) -> str | None:
    """A reply that is just an option letter ("B", "(B)", "B.", "B. red"), as the direct
    prompt asks for. Upper-case only, so an article ("a red ...") is never read as A.

    >>> [bare_letter(text) for text in ["B", " (B)", "B. red", "a red one", "Because", "B or C"]]
    ['B', 'B', 'B', None, None, None]
    """
    text = text if isinstance(text, str) else ""
    m = _BARE.match(text)
    return m.group(1) if m and not _TWO.match(text) else None


def predicted_letter(traj) -> str | None:
    """The answer a trajectory gives: the last \\boxed{} of its final turn, or, for a
    template that asks for a bare letter, that letter."""
    letter = extract_answer(traj.final_text, traj.options)
    if letter is None and traj.bare_letter:
        letter = bare_letter(traj.final_text)
    return letter


# Replies whose reading by ``extract_answer`` / ``bare_letter`` defines the scorer's behaviour:
# any change to how one of them scores changes ``scorer_version``, and so the evaluation
# protocol (stored predictions scored the old way are never mixed with new ones).
SCORER_CASES = ("\\boxed{C}", "\\boxed{(C)}", "\\boxed{C. red}", "\\boxed{C: red}", "\\boxed{\\text{C}}",
                "\\boxed{\\textbf{(c)}}", "\\boxed{$C$}", "\\boxed{Option B}", "\\boxed{Answer: B}",
                "\\boxed{choice b}", "\\boxed{B or C}", "\\boxed{a red}", "\\boxed{red}", "\\boxed{ Red }",
                "\\boxed{blue}", "first \\boxed{A}, finally \\boxed{B}", "\\boxed{B", "\\boxed{}", "B",
                " (B)", "B. red", "B: red", "a red one", "Because", "B or C", "(B) and (C)", "B/C", "b", "")
SCORER_REVISION = 1
"""Raised by hand when the scorer changes in a way ``SCORER_CASES`` does not show."""


def scorer_version() -> str:
    """The scorer's identity: its revision and a digest of how it reads ``SCORER_CASES`` (boxed
    letters, option texts of ("red", "blue"), bare letters). Any change to what a reply scores as
    in those cases changes it."""
    import hashlib

    readings = [(extract_answer(c, ("red", "blue")), extract_answer(c), bare_letter(c)) for c in SCORER_CASES]
    return f"{SCORER_REVISION}:{hashlib.sha256(repr(readings).encode()).hexdigest()[:12]}"


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: str = "group",
                     batch_std: float | None = None) -> torch.Tensor:
    """GRPO advantages: ``(r - group mean) / (group std + eps)``, groups laid out consecutively.

    The std is the unbiased one, as in the authors' code. A group whose rewards are all
    equal has zero advantage and so contributes no policy gradient. That zero is set
    exactly, not left to the arithmetic: with a reward that is not a binary fraction
    (0.9 = 1 - a turn cost) the mean of equal values can round one ulp off them, and
    that ulp over a std of ~1e-8 plus eps would push the whole group by ~0.05. The
    statistics are computed in float64 for the same reason.

    ``scale`` (``loss.adv_scale``): "group" divides by the group's std + eps (above), "batch" by
    ``batch_std`` + eps (the std of the whole rollout batch's rewards, every rank's), "none" not
    at all (Dr. GRPO: the reward minus its group's mean).

    >>> group_advantages(torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.]), 4)
    tensor([ 1.5000, -0.5000, -0.5000, -0.5000,  0.0000,  0.0000,  0.0000,  0.0000])
    >>> group_advantages(torch.tensor([1., 0., 0., 0.]), 4, scale="none")
    tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 for group-relative advantages, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    rewards_BG = rewards.double().view(-1, group_size)
    mean_B1 = rewards_BG.mean(dim=1, keepdim=True)
    if scale == "group":
        divisor = rewards_BG.std(dim=1, keepdim=True, unbiased=True) + eps
    elif scale == "batch":
        if batch_std is None:
            raise ValueError("loss.adv_scale=batch needs the rollout batch's reward std")
        divisor = float(batch_std) + eps
    elif scale == "none":
        divisor = 1.0
    else:
        raise ValueError(f"loss.adv_scale must be 'group', 'batch' or 'none', got {scale!r}")
    advantages_BG = (rewards_BG - mean_B1) / divisor
    return advantages_BG.masked_fill(uniform_groups(rewards_BG, group_size)[:, None], 0.0).float().view(-1)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] True for each group whose rewards are all equal (it carries no advantage).

    >>> uniform_groups(torch.tensor([1., 1., 0., 1.]), 2)
    tensor([ True, False])
    """
    rewards_BG = rewards.view(-1, group_size)
    return rewards_BG.amax(dim=1) == rewards_BG.amin(dim=1)


def zero_variance_share(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal (they teach nothing)."""
    return uniform_groups(rewards.float(), group_size).float().mean().item()


def score(trajectories, format_reward: float = 0.0, turn_cost: float = 0.0, zoom_bonus: float = 0.0,
          zoom_bonus_cap: float = 0.0) -> torch.Tensor:
    """Rewards of a rollout, one per trajectory: accuracy of the final turn (+ an optional
    valid-box bonus, - an optional cost per crop shown, for short K-turn searches, + an optional
    bonus per crop on a right answer only, at most ``zoom_bonus_cap``, for a policy that keeps zooming).

    >>> from mgpo.core.trajectory import Trajectory
    >>> right = Trajectory("s", 0, "A", ("x", "y"), (9, 9), (9, 9), turn2_text="\\\\boxed{A}", crop_size=(4, 4))
    >>> score([right, Trajectory("s", 0, "B", ("x", "y"), (9, 9), (9, 9), crop_size=(4, 4))], zoom_bonus=0.05,
    ...       zoom_bonus_cap=0.2).tolist()
    [1.0499999523162842, 0.0]
    """
    out = []
    for traj in trajectories:
        right = float(predicted_letter(traj) == traj.answer)
        bonus = min(zoom_bonus * traj.crops, zoom_bonus_cap) * right
        out.append(right + (format_reward if traj.valid else 0.0) - turn_cost * traj.crops + bonus)
    return torch.tensor(out)
