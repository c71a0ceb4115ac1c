"""Random micro-batches in the layout of `dapo_jax.rl.batching.collate`, for the update-step tests."""
import numpy as np


def random_micro_batch(rng: np.random.Generator, rows: int, prompt_width: int, response_width: int,
                       vocab_size: int, *, with_old_logp: bool = False) -> dict[str, np.ndarray]:
  """Left-padded prompts and right-padded responses of random lengths (at least one token each), random
  advantages, and optionally random old log-probs (0 on padding)."""
  prompt_lengths = rng.integers(1, prompt_width + 1, rows)
  response_lengths = rng.integers(1, response_width + 1, rows)
  prompt_mask = (np.arange(prompt_width)[None] >= prompt_width - prompt_lengths[:, None]).astype(np.int32)
  response_mask = (np.arange(response_width)[None] < response_lengths[:, None]).astype(np.int32)
  batch = {"prompt_ids": rng.integers(0, vocab_size, (rows, prompt_width)).astype(np.int32) * prompt_mask,
           "prompt_mask": prompt_mask,
           "response_ids": rng.integers(0, vocab_size, (rows, response_width)).astype(np.int32) * response_mask,
           "response_mask": response_mask,
           "advantages": rng.normal(0, 1, rows).astype(np.float32)}
  if with_old_logp:
    batch["old_logp"] = (-rng.random((rows, response_width)) * response_mask).astype(np.float32)
  return batch
