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


def test_capped_bucket_length_stops_at_the_longest_allowed_length():
  # DAPO's 20,480-token responses: the power-of-two bucket would be 32,768.
  assert batching.capped_bucket_length(20480, 20480) == 20480
  assert batching.capped_bucket_length(16385, 20480) == 20480
  assert batching.capped_bucket_length(16384, 20480) == 16384
  assert batching.capped_bucket_length(9, 12) == 12 and batching.capped_bucket_length(5, 12) == 8
  assert batching.capped_bucket_length(100) == 128
  with pytest.raises(ValueError, match="over the maximum width 12"):
    batching.capped_bucket_length(13, 12)


def test_collate_caps_widths_at_the_maximum_lengths():
  out = batching.collate([[1] * 5, [2] * 2], [[3] * 20, [4]], pad_id=0, max_prompt_width=6, max_response_width=24)
  # Buckets 8 and 32 capped at 6 and 24.
  assert out["prompt_ids"].shape == (2, 6) and out["response_ids"].shape == (2, 24)
  np.testing.assert_array_equal(out["prompt_mask"], [[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
  assert out["response_mask"].sum(axis=1).tolist() == [20, 1]
  # Below the cap the power-of-two bucket stays.
  short = batching.collate([[1] * 5], [[3] * 10], pad_id=0, max_prompt_width=6, max_response_width=24)
  assert short["prompt_ids"].shape == (1, 6) and short["response_ids"].shape == (1, 16)
  with pytest.raises(ValueError, match=r"response of 25 tokens is longer than max_response_width \(24\)"):
    batching.collate([[1]], [[3] * 25], pad_id=0, max_response_width=24)


def test_training_batches_pack_rows_of_the_bucket_width_into_the_token_budget():
  # Trajectories of 5, 4, 3, 3, 4 tokens (2-token prompts): the longest, 5, buckets to 8 (under the cap of
  # 4 + 6 = 10), so rows are 8 wide and a budget of 20 takes 2 rows; first-fit gives rows [0, 2], [1, 3], [4].
  prompts = [[9, 9]] * 5
  responses = [[1, 2, 3], [4, 5], [6], [7], [8, 8]]
  sampler = [-np.arange(1, len(r) + 1, dtype=np.float32) for r in responses]
  advantages = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
  masked = np.array([False, False, False, True, False])
  out = batching.training_batches(prompts, responses, sampler, advantages, masked, rows_per_update=5,
                                  micro_batch_tokens=20, pad_id=0, max_prompt_width=4, max_response_width=6)
  assert len(out) == 1 and [mb["input_ids"].shape for mb in out[0]] == [(2, 8), (1, 8)]
  first, second = out[0]
  np.testing.assert_array_equal(first["input_ids"], [[9, 9, 1, 2, 3, 9, 9, 6], [9, 9, 4, 5, 9, 9, 7, 0]])
  np.testing.assert_array_equal(first["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 2, 0]])
  # Trajectory 3 (the second of row 1) is overlong-filtered: laid out, but no valid token.
  np.testing.assert_array_equal(first["response_mask"], [[0, 0, 1, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_allclose(first["advantages"][1], [0, 0, 2, 2, 0, 0, 4, 0])
  np.testing.assert_allclose(first["sampler_logp"][0], [0, 0, -1, -2, -3, 0, 0, -1])
  np.testing.assert_array_equal(second["input_ids"], [[9, 9, 8, 8, 0, 0, 0, 0]])


def test_row_width_bucket_has_four_widths_per_doubling():
  assert [batching.row_width_bucket(n) for n in (1, 8, 9, 11, 16, 17, 33, 42, 56, 57, 65, 100)] == [
      8, 8, 10, 12, 16, 20, 40, 48, 56, 64, 80, 112]
  # DAPO's longest response, 20,480 tokens, is a bucket (5 x 2^12); a longest trajectory of 2,048 + 20,480 buckets
  # to 24,576, capped at the config's maximum.
  assert batching.row_width_bucket(20480) == 20480 and batching.row_width_bucket(22528) == 24576
  assert batching.packed_row_width([22528], 22528) == 22528 and batching.packed_row_width([20481], 22528) == 22528
  assert batching.packed_row_width([30, 57], 72) == 64 and batching.packed_row_width([70], 72) == 72
  with pytest.raises(ValueError, match="over the maximum width"):
    batching.packed_row_width([73], 72)


def test_pack_rows_is_first_fit_in_order():
  # Row width 8: 5 opens row 0, 4 opens row 1, 3 fits row 0 (5 + 3), 2 fits row 1, 4 opens row 2.
  assert batching.pack_rows([5, 4, 3, 2, 4], 8) == [[0, 2], [1, 3], [4]]
  with pytest.raises(ValueError, match="longer than the row width"):
    batching.pack_rows([9], 8)


def test_pack_layout_by_hand():
  out = batching.pack([[5, 6], [7], [8, 9]], [[1, 2], [3], [4]], [[0, 1], [2]], row_width=6, pad_id=0,
                      advantages=[0.5, -1.0, 2.0], sampler_logps=[np.array([-0.1, -0.2]), np.array([-0.3]),
                                                                  np.array([-0.4])])
  np.testing.assert_array_equal(out["input_ids"], [[5, 6, 1, 2, 7, 3], [8, 9, 4, 0, 0, 0]])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]])
  np.testing.assert_array_equal(out["response_mask"], [[0, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0]])
  np.testing.assert_allclose(out["advantages"], [[0, 0, 0.5, 0.5, 0, -1.0], [0, 0, 2.0, 0, 0, 0]])
  np.testing.assert_allclose(out["sampler_logp"], [[0, 0, -0.1, -0.2, 0, -0.3], [0, 0, -0.4, 0, 0, 0]])
