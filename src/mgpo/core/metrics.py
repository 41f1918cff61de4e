"""What a rollout batch's trajectories say, as the scalars the run logs: reward and
accuracy, the valid-box share (the paper's Figure 7), crop sizes, lengths, turns, and,
for records with an annotated target, how close the boxes come to it.

Every logged rollout figure is defined here once, from the trajectories.
"""

from __future__ import annotations

import numpy as np
import torch

from .grounding import area_share, target_fit
from .reward import predicted_letter, zero_variance_share


def rollout_metrics(trajectories, rewards, group_size: int) -> dict[str, float]:
    """Per-rollout figures: accuracy, the valid-box share (paper Fig. 7), crop area, lengths."""
    n = len(trajectories)
    rewards = np.asarray(rewards, dtype=float)
    crop_share = [area_share(traj.box_original, traj.original_size) for traj in trajectories if traj.box_original]
    return {
        "reward/mean": float(rewards.mean()),
        # the answer's correctness, not reward > 0 (a format bonus must not count as right)
        "reward/accuracy": float(np.mean([predicted_letter(traj) == traj.answer for traj in trajectories])),
        "reward/zero_variance_groups": zero_variance_share(torch.as_tensor(rewards), group_size),
        "grounding/valid_box_share": float(np.mean([traj.valid for traj in trajectories])),
        "grounding/any_box_share": float(np.mean([traj.box_input is not None for traj in trajectories])),
        "grounding/crop_area_share": float(np.mean(crop_share)) if crop_share else 0.0,
        **length_metrics(trajectories),
        "length/turn1_truncated": float(np.mean([traj.turn1_truncated for traj in trajectories])),
        "length/turn2_truncated": float(np.mean([traj.turn2_truncated for traj in trajectories])),
        "rollout/trajectories": float(n),
    } | target_metrics(trajectories) | turn_metrics(trajectories)


def length_metrics(trajectories) -> dict[str, float]:
    """Generated tokens per turn: the mean, the 95th percentile and the longest (what a run's
    time depends on: ``mgpo.tools.plan --pilot`` reads them back)."""
    out = {}
    for turn in (1, 2):
        n = np.array([getattr(traj, f"turn{turn}_tokens") for traj in trajectories], dtype=float)
        out |= {f"length/turn{turn}_tokens": float(n.mean()), f"length/turn{turn}_tokens_p95": float(np.quantile(n, 0.95)),
                f"length/turn{turn}_tokens_max": float(n.max())}
    return out


def target_metrics(trajectories) -> dict[str, float]:
    """How close the boxes come to the records' annotated targets (records that have one): mean
    IoU with the box around every target (0 without a valid box) and the share of boxes that hold
    every target. Nothing in training sees these; they show whether grounding emerges."""
    grounded = [traj for traj in trajectories if traj.target_boxes]
    if not grounded:
        return {}
    ious, holds = zip(*(target_fit(_original_box(traj), traj.target_boxes) for traj in grounded))
    return {"grounding/iou": float(np.mean(ious)), "grounding/box_holds_target": float(np.mean(holds))}


def _original_box(traj) -> list[float] | None:
    """The first valid box, in original pixels."""
    if traj.turn_log:
        return next((r.box_original for r in traj.turn_log if r.valid and r.box_original), None)
    return traj.box_original if traj.valid else None


def turn_metrics(trajectories) -> dict[str, float]:
    """K-turn rollouts (``mgpo_k``): turns and crops per trajectory, the share answering at each
    turn (the turns-used histogram), nested zooms, and the valid-box share of each turn among
    the trajectories that wrote that turn without answering. Empty for the paper's templates."""
    logs = [traj.turn_log for traj in trajectories if traj.turn_log]
    if not logs:
        return {}
    out = {"turns/used": float(np.mean([len(log) for log in logs])),
           "turns/crops": float(np.mean([sum(r.crop_size is not None for r in log) for log in logs])),
           "turns/nested_zoom_share": float(np.mean([any(r.nested for r in log) for log in logs])),
           "turns/capped_share": float(np.mean([any(r.capped for r in log) for log in logs]))}
    for k in range(1, max(len(log) for log in logs) + 1):
        out[f"turns/answer_at_turn{k}"] = float(np.mean([len(log) == k for log in logs]))
        asked = [log[k - 1] for log in logs if len(log) > k]  # turns that zoomed or fell back
        if asked:
            out[f"turns/valid_box_share_turn{k}"] = float(np.mean([r.valid for r in asked]))
    return out
