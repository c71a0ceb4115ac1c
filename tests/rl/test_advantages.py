"""Tests for dapo_jax.rl.advantages (docs/algorithm.md section 3); expected values worked out by hand below."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_jax.rl.advantages import group_advantages


def test_one_group_unbiased_std():
  # rewards [1, -1, -1]: mean -1/3, deviations [4/3, -2/3, -2/3],
  # unbiased variance (16/9 + 4/9 + 4/9) / 2 = 4/3, std sqrt(4/3) = 1.1547005,
  # A = [4/3, -2/3, -2/3] / 1.1547005 = [1.1547005, -0.5773503, -0.5773503].
  advantages = group_advantages([1.0, -1.0, -1.0], [7, 7, 7])
  assert advantages.dtype == np.float32
  np.testing.assert_allclose(advantages, [1.1547005, -0.5773503, -0.5773503], rtol=1e-5)


def test_interleaved_groups_with_string_ids():
  # group "b" = [0.5, 1.5]: mean 1, deviations [-0.5, 0.5], unbiased variance 0.5 / 1, std 0.7071068,
  #   A = [-0.7071068, 0.7071068].
  # group "a" = [2, 4, 3]: mean 3, deviations [-1, 1, 0], unbiased variance 2 / 2 = 1, std 1, A = [-1, 1, 0].
  rewards = [0.5, 2.0, 1.5, 4.0, 3.0]
  ids = ["b", "a", "b", "a", "a"]
  np.testing.assert_allclose(group_advantages(rewards, ids), [-0.7071068, -1.0, 0.7071068, 1.0, 0.0],
                             rtol=1e-5, atol=1e-7)


def test_tuple_ids_and_numpy_ids():
  # Group (0, "x") = [3, 1]: mean 2, deviations [1, -1], unbiased std sqrt(2) = 1.4142136, A = [0.7071068, -0.7071068].
  np.testing.assert_allclose(group_advantages(np.array([3.0, 1.0]), [(0, "x"), (0, "x")]), [0.7071068, -0.7071068],
                             rtol=1e-5)
  np.testing.assert_allclose(group_advantages([3.0, 1.0], np.array([5, 5])), [0.7071068, -0.7071068], rtol=1e-5)


def test_singleton_groups_use_mean_zero_std_one():
  # verl: a lone response has mean 0 and std 1, so A = r / (1 + 1e-6).
  # 0.7 / 1.000001 = 0.6999993; -1 / 1.000001 = -0.999999.
  np.testing.assert_allclose(group_advantages([0.7, -1.0], [10, 11]), [0.6999993, -0.999999], rtol=1e-6)
  # Without std normalisation A = r - 0 = r.
  np.testing.assert_allclose(group_advantages([0.7, -1.0], [10, 11], norm_by_std=False), [0.7, -1.0], rtol=1e-7)


def test_all_equal_group_is_exactly_zero():
  # mean of three 0.1s is 0.10000000000000002 in float64; the advantage must still be exactly 0.
  advantages = group_advantages([0.1, 0.1, 0.1, -1.0, -1.0, 1.0, 0.0], [0, 0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(advantages[:5], np.zeros(5, np.float32))
  # group 2 = [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.7071068, A = [0.7071068, -0.7071068].
  np.testing.assert_allclose(advantages[5:], [0.7071068, -0.7071068], rtol=1e-5)
  np.testing.assert_array_equal(group_advantages([0.1, 0.1, 0.1], [0, 0, 0], norm_by_std=False), np.zeros(3))


def test_without_std_normalisation():
  # rewards [1, -1, -1]: mean -1/3, A = r - mean = [4/3, -2/3, -2/3].
  np.testing.assert_allclose(group_advantages([1.0, -1.0, -1.0], [0, 0, 0], norm_by_std=False),
                             [1.3333334, -0.6666667, -0.6666667], rtol=1e-6)


def test_eps_is_added_to_the_std():
  # [0, 1]: mean 0.5, deviations [-0.5, 0.5], unbiased std 0.7071068; with eps 1: 0.5 / 1.7071068 = 0.2928932.
  np.testing.assert_allclose(group_advantages([0.0, 1.0], [0, 0], eps=1.0), [-0.2928932, 0.2928932], rtol=1e-6)


def test_empty_and_malformed_inputs():
  assert group_advantages([], []).shape == (0,)
  with pytest.raises(ValueError, match="group ids"):
    group_advantages([1.0, 2.0], [0])
  with pytest.raises(ValueError, match="num_responses"):
    group_advantages([[1.0, 2.0]], [0])


@settings(max_examples=30, deadline=None)
@given(group_sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_group_properties_and_order_independence(group_sizes, seed):
  rng = np.random.default_rng(seed)
  ids = np.repeat(np.arange(len(group_sizes)), group_sizes)
  rewards = rng.choice([-1.0, 0.0, 0.5, 1.0], size=ids.size)
  advantages = group_advantages(rewards, ids)
  for group, size in enumerate(group_sizes):
    in_group = ids == group
    if size > 1:
      # Centred within each group; unit unbiased std unless all equal (then 0).
      assert abs(advantages[in_group].sum()) < 1e-5
      if np.ptp(rewards[in_group]) > 0:
        assert abs(np.std(advantages[in_group], ddof=1) - 1.0) < 1e-4
      else:
        assert np.all(advantages[in_group] == 0.0)
  # Shuffling the responses shuffles the advantages the same way.
  permutation = rng.permutation(ids.size)
  np.testing.assert_allclose(group_advantages(rewards[permutation], ids[permutation]), advantages[permutation],
                             rtol=1e-6, atol=1e-7)
