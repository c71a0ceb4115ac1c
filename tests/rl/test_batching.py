"""Padding layout and token-budget micro-batches."""
import numpy as np
import pytest

from dapo_jax.rl import batching


def test_bucket_length():
  assert [batching.bucket_length(n) for n in (1, 8, 9, 16, 17, 1000)] == [8, 8, 16, 16, 32, 1024]
  assert batching.bucket_length(3, minimum=1) == 4


def test_collate_left_pads_prompts_and_right_pads_responses():
  out = batching.collate([[5, 6, 7], [8]], [[1], [2, 3, 4]], pad_id=0, prompt_width=4, response_width=4)
  np.testing.assert_array_equal(out["prompt_ids"], [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(out["prompt_mask"], [[0, 1, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(out["response_ids"], [[1, 0, 0, 0], [2, 3, 4, 0]])
  np.testing.assert_array_equal(out["response_mask"], [[1, 0, 0, 0], [1, 1, 1, 0]])
  default = batching.collate([[1] * 9], [[2] * 3], pad_id=0)
  assert default["prompt_ids"].shape == (1, 16) and default["response_ids"].shape == (1, 8)


def test_collate_errors():
  with pytest.raises(ValueError, match="longer than its width"):
    batching.collate([[1, 2, 3]], [[1]], pad_id=0, prompt_width=2)
  with pytest.raises(ValueError, match="empty prompt"):
    batching.collate([[]], [[1]], pad_id=0)


def test_split_by_token_budget():
  # Each trajectory pads to 8 + 8 = 16 tokens while all fit in 8-wide buckets: a budget of 48 holds 3.
  assert batching.split_by_token_budget([3] * 7, [5] * 7, 48) == [[0, 1, 2], [3, 4, 5], [6]]
  # A long response widens its micro-batch's bucket: [8 + 32] per row, so it closes the group early.
  assert batching.split_by_token_budget([3, 3, 3, 3], [5, 20, 5, 5], 48) == [[0], [1], [2, 3]]
  # A trajectory alone over the budget still gets its own micro-batch.
  assert batching.split_by_token_budget([3, 3], [100, 2], 32) == [[0], [1]]
