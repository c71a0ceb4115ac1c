"""Group-relative (GRPO outcome) advantages, docs/algorithm.md section 3.

Each response gets one scalar advantage computed from the rewards of its group (the `n` responses of one
draw of one prompt).
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np
import numpy.typing as npt


def group_advantages(
    rewards: npt.ArrayLike,
    group_ids: Sequence[Hashable] | npt.ArrayLike,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> np.ndarray:
  """Per-response GRPO advantages, docs/algorithm.md section 3 (verl's `compute_grpo_outcome_advantage`).

  `A_i = (r_i - mean) / (std + eps)` over the responses of the group of `i`, with the unbiased (ddof=1)
  standard deviation; `A_i = r_i - mean` when `norm_by_std` is False. A group of one response uses mean 0 and
  std 1 (verl's convention, so its advantage is `r / (1 + eps)`, or `r` without std normalisation). A group
  whose rewards are all equal gets exactly 0, even where the floating-point mean of equal values is not
  exactly that value (e.g. three rewards of 0.1).

  Args:
    rewards: `[num_responses]` scalar reward of each response.
    group_ids: `[num_responses]` group of each response: any hashables (ints, strings, tuples), in any order;
      equal ids form one group.
    norm_by_std: divide by the group's std (GRPO, DAPO) or not (Dr. GRPO).
    eps: added to the std before dividing.

  Returns:
    `[num_responses]` float32 advantages, in the order of `rewards`.
  """
  rewards = np.asarray(rewards, dtype=np.float64)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be one scalar per response, shape [num_responses]; got {rewards.shape}")
  group_ids = list(group_ids)
  if len(group_ids) != rewards.shape[0]:
    raise ValueError(f"{len(group_ids)} group ids for {rewards.shape[0]} rewards")
  if rewards.shape[0] == 0:
    return np.zeros((0,), np.float32)

  # Dense group indices in first-appearance order: a dict accepts any hashable, where np.unique would need
  # ids that sort against each other.
  dense_of_id: dict[Hashable, int] = {}
  group_index = np.fromiter((dense_of_id.setdefault(g, len(dense_of_id)) for g in group_ids),
                            dtype=np.int64, count=len(group_ids))
  num_groups = len(dense_of_id)

  counts = np.bincount(group_index, minlength=num_groups).astype(np.float64)
  means = np.bincount(group_index, weights=rewards, minlength=num_groups) / counts
  group_min = np.full(num_groups, np.inf)
  group_max = np.full(num_groups, -np.inf)
  np.minimum.at(group_min, group_index, rewards)
  np.maximum.at(group_max, group_index, rewards)
  # All-equal groups (singletons included): use the common value itself as the mean, so that r - mean is
  # exactly 0 instead of a rounding residue divided by (tiny std + eps).
  all_equal = group_min == group_max
  means = np.where(all_equal, group_min, means)
  singleton = counts == 1
  means = np.where(singleton, 0.0, means)

  deviations = rewards - means[group_index]
  if not norm_by_std:
    return deviations.astype(np.float32)

  squared = np.bincount(group_index, weights=deviations**2, minlength=num_groups)
  # Unbiased std (ddof=1, torch.std's default as verl uses it); singletons use std 1.
  stds = np.sqrt(squared / np.maximum(counts - 1.0, 1.0))
  stds = np.where(singleton, 1.0, stds)
  return (deviations / (stds[group_index] + eps)).astype(np.float32)
