"""Dynamic sampling: roll out more prompts than are trained on and keep the most informative groups.

A group whose ``G`` completions all earn the same reward has zero group-relative advantage: it carries no
reward signal (under GDSD its regression target is 0, so it only holds those sequences in place). As the
policy improves, more groups go flat (the tiny Sudoku default: 9% of the groups in its first 60 steps, 48%
in its last 60). DAPO (Yu et al., 2025, "dynamic sampling") over-samples prompts and drops such groups. Here the
trained batch keeps a fixed shape, so the compiled update never changes: ``rl.rollout_prompts_per_step``
prompts are rolled out and the ``rl.prompts_per_step`` groups with the largest reward spread are trained on.
"""

from __future__ import annotations

import numpy as np


def groups_by_spread(rewards: np.ndarray, group_size: int, keep: int) -> np.ndarray:
    """Indices of the ``keep`` groups with the largest reward standard deviation, in their original order.

    Args:
      rewards: [num_groups * group_size], rows grouped as consecutive blocks of ``group_size``.
      group_size: G.
      keep: number of groups to keep, 1 <= keep <= num_groups.
    Returns:
      [keep] int array of group indices, ascending. Ties in spread go to the earlier group, so the choice is
      deterministic (a resumed run picks the same groups).
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} do not form groups of {group_size}")
    n_groups = rewards.shape[0] // group_size
    if not 1 <= keep <= n_groups:
        raise ValueError(f"keep={keep}: expected between 1 and the number of groups, {n_groups}")
    spread = rewards.reshape(n_groups, group_size).std(axis=1)
    order = np.argsort(-spread, kind="stable")     # largest spread first; stable: earlier group wins a tie
    return np.sort(order[:keep])


def group_rows(groups: np.ndarray, group_size: int) -> np.ndarray:
    """Row indices [len(groups) * G] of the given groups (prompt-major, as the rollout lays them out)."""
    return (np.asarray(groups)[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
