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


def random_packed_micro_batch(rng: np.random.Generator, rows: int, row_width: int, vocab_size: int
                              ) -> dict[str, np.ndarray]:
  """Trajectories of random lengths (prompt and response at least one token each) packed first-fit into
  `rows` rows of `row_width` tokens (`batching.pack`, the training layout), with random advantages."""
  from dapo_jax.rl import batching
  prompts, responses, packed_rows = [], [], []
  for _ in range(rows):
    row, free = [], row_width
    while free >= 2 and (not row or rng.random() < 0.7):
      length = int(rng.integers(2, free + 1))
      prompt = int(rng.integers(1, length))
      row.append(len(prompts))
      prompts.append(rng.integers(0, vocab_size, prompt).tolist())
      responses.append(rng.integers(0, vocab_size, length - prompt).tolist())
      free -= length
    packed_rows.append(row)
  return batching.pack(prompts, responses, packed_rows, row_width=row_width, pad_id=0,
                       advantages=rng.normal(0, 1, len(prompts)).astype(np.float32))
