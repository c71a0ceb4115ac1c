"""The old-log-prob pass (docs/algorithm.md section 6) in micro-batches of its own token budget.

The pass has no backward pass, so it holds no activations for one and can take more rows per call than the
update: rollout.log_prob_micro_batch_tokens (verl's log_prob_max_token_len_per_gpu; 0: actor.micro_batch_tokens).
It runs on the very packed rows of the update's micro-batches (`rl/batching.training_batches`), grouped by its own
budget; each process's rows of the result come back to the host and travel with the update's micro-batches.
"""
from collections.abc import Callable, Sequence

import jax
import numpy as np

from dapo_jax import batch_placement

INPUTS = ("input_ids", "segment_ids", "positions", "response_mask")
"""What the pass reads of a packed micro-batch (the response mask zeroes the other positions' values); the
per-token advantages and sampler log-probs stay on the host."""


def add_old_log_probs(mini_batches: Sequence[Sequence[dict[str, np.ndarray]]],
                      log_probs: Callable[[dict[str, jax.Array]], jax.Array], *, micro_batch_tokens: int,
                      mesh: jax.sharding.Mesh) -> None:
  """Adds `old_logp` (float32, the rows' shape) to every micro-batch of `mini_batches` (this process's packed
  micro-batches, `training_batches`' layout) in place.

  Each mini-batch's rows are regrouped, in order, into micro-batches of `micro_batch_tokens // width` rows (at
  least one), their `INPUTS` placed with `put_micro_batches` (with several processes, they agree on the calls and
  shapes, so every process makes every call) and passed to `log_probs`, the jitted forward pass.
  """
  for micro_batches in mini_batches:
    rows = {key: np.concatenate([mb[key] for mb in micro_batches]) for key in INPUTS}
    count, width = rows["input_ids"].shape
    per_call = max(1, micro_batch_tokens // width)
    calls = [{key: value[first:first + per_call] for key, value in rows.items()}
             for first in range(0, count, per_call)]
    results = [log_probs(batch) for batch in batch_placement.put_micro_batches(calls, mesh)]  # all dispatched
    old_logp = np.concatenate([batch_placement.process_rows(result)[:len(call["input_ids"]), :width]
                               for result, call in zip(results, calls)])
    start = 0
    for mb in micro_batches:
      mb["old_logp"] = old_logp[start:start + len(mb["input_ids"])]
      start += len(mb["input_ids"])
