"""Tests for dapo_jax.rl.rewards: reward-function resolution and overlong shaping."""

import numpy as np
import pytest

from dapo_jax.rl import rewards
from dapo_jax.rl.math_answers import math_dapo_score
from dapo_jax.rl.reward_pool import score_batch
from dapo_jax.rl.rewards import load_reward_function, overlong_penalties
from tests.rl.reward_fixtures import always_half

# --------------------------------------------------------------------------------------------------------------
# Overlong penalty (docs/algorithm.md section 2)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, max_length, buffer, factor, expected", [
    (0, 20480, 4096, 1.0, 0.0),
    (10000, 20480, 4096, 1.0, 0.0),
    (16384, 20480, 4096, 1.0, 0.0),
    (16385, 20480, 4096, 1.0, -1 / 4096),
    (18432, 20480, 4096, 1.0, -0.5),
    (19456, 20480, 4096, 1.0, -0.75),
    (20480, 20480, 4096, 1.0, -1.0),
    (20480, 20480, 4096, 0.5, -0.5),
    (18432, 20480, 4096, 0.0, 0.0),
    (50, 100, 100, 1.0, -0.5),
])
def test_overlong_penalty(length, max_length, buffer, factor, expected):
  assert overlong_penalties(np.array([length]), max_length, buffer, factor)[0] == pytest.approx(expected, abs=1e-15)


def test_overlong_penalty_is_never_negative_zero():
  assert str(overlong_penalties([16384], 20480, 4096, 1.0)[0]) == "0.0"


def test_overlong_penalties_keep_the_shape_of_the_lengths():
  lengths = np.array([[0, 16000, 16384], [17000, 19999, 20480]])
  penalties = overlong_penalties(lengths, 20480, 4096, 1.0)
  assert penalties.shape == (2, 3) and penalties.dtype == np.float64
  # Past 16384 tokens: -(L - 16384) / 4096, exact in binary.
  np.testing.assert_array_equal(penalties, [[0.0, 0.0, 0.0], [-616 / 4096, -3615 / 4096, -1.0]])


@pytest.mark.parametrize("kwargs, argument", [
    (dict(max_response_length=20480, buffer_length=0, penalty_factor=1.0), "buffer_length"),
    (dict(max_response_length=20480, buffer_length=-1, penalty_factor=1.0), "buffer_length"),
    (dict(max_response_length=4096, buffer_length=4097, penalty_factor=1.0), "buffer_length"),
    (dict(max_response_length=0, buffer_length=0, penalty_factor=1.0), "max_response_length"),
    (dict(max_response_length=20480, buffer_length=4096, penalty_factor=-1.0), "penalty_factor"),
    (dict(max_response_length=20480, buffer_length=4096, penalty_factor=float("nan")), "penalty_factor"),
])
def test_overlong_penalty_validates_its_arguments(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    overlong_penalties([100], **kwargs)


def test_overlong_penalty_rejects_negative_lengths():
  with pytest.raises(ValueError, match="response_lengths"):
    overlong_penalties([5, -1], 20480, 4096, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------------------------


def test_score_result_normalisation():
  assert rewards.as_score_result(True) == {"score": 1.0, "acc": True, "pred": None}
  assert rewards.as_score_result(0) == {"score": 0.0, "acc": False, "pred": None}
  assert rewards.as_score_result({"score": 2, "extra": 1}) == {"score": 2.0, "acc": True, "pred": None, "extra": 1}
  with pytest.raises(ValueError, match="score"):
    rewards.as_score_result({"acc": True})
  with pytest.raises(TypeError, match="str"):
    rewards.as_score_result("1.0")


def test_reward_functions_default_to_math_dapo_for_every_source():
  table = rewards.reward_functions(["math_dapo", "aime"])
  assert table == {"math_dapo": math_dapo_score, "aime": math_dapo_score}
  strict = rewards.reward_functions(["math_dapo"], strict_box=True)["math_dapo"]
  assert strict("Answer: 7", "7")["score"] == -1.0  # no \boxed{} in strict-box mode
  assert strict("so \\boxed{7}", "7")["score"] == 1.0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_custom_reward_function_receives_the_data_source(num_workers):
  table = rewards.reward_functions(["exact", "math_dapo"], function="tests.rl.reward_fixtures:source_aware")
  solutions = ["Answer: 7", "Answer: 7", "7"]
  scored = score_batch(solutions, ["7", "7", "7"], data_sources=["exact", "math_dapo", "exact"], score_fns=table,
                       default_score_fn=None, num_workers=num_workers)
  np.testing.assert_array_equal(scored.scores, [-1.0, 1.0, 1.0])  # "exact" compares whole strings
  # A plain (solution, ground_truth) function works too, for every source.
  plain = rewards.reward_functions(["exact"], function="tests.rl.reward_fixtures:always_half")
  assert score_batch(["x"], ["7"], data_sources=["exact"], score_fns=plain, default_score_fn=None,
                     num_workers=num_workers).scores.tolist() == [0.5]


def test_unknown_data_source_is_an_error_naming_it():
  table = rewards.reward_functions(["math_dapo"])
  with pytest.raises(KeyError, match="no reward function for data_source 'gsm8k'"):
    score_batch(["Answer: 1"], ["1"], data_sources=["gsm8k"], score_fns=table, default_score_fn=None,
                num_workers=0)


def test_load_reward_function_finds_module_functions():
  assert load_reward_function("dapo_jax.rl.math_answers:math_dapo_score") is math_dapo_score
  assert load_reward_function("tests.rl.reward_fixtures:always_half") is always_half


@pytest.mark.parametrize("spec, error", [
    ("dapo_jax.rl.rewards", ValueError),
    ("dapo_jax.rl.rewards:", ValueError),
    (":math_dapo_score", ValueError),
    ("a:b:c", ValueError),
    ("no_such_module_for_dapo_tests:score", ImportError),
    ("dapo_jax.rl.rewards:no_such_function", ImportError),
    ("dapo_jax.rl.math_answers:RESPONSE_TAIL_CHARS", TypeError),
])
def test_load_reward_function_errors_name_the_string(spec, error):
  with pytest.raises(error) as raised:
    load_reward_function(spec)
  assert repr(spec) in str(raised.value)
