"""Tests for dapo_jax.rl.reward_pool: bounded-time batch scoring in worker processes."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dapo_jax.rl.math_answers import math_verify_score
from dapo_jax.rl.reward_pool import BatchScores, RewardFunctionError, RewardPool, score_batch
from tests.rl.reward_fixtures import (always_half, exit_on_request, hang_on_request, raise_on_request,
                                      sleep_then_echo, worker_pid)

# --------------------------------------------------------------------------------------------------------------
# Batch scoring
# --------------------------------------------------------------------------------------------------------------

BATCH_SOLUTIONS = ["Answer: 1", "Answer: a 2", "no answer", "Answer: 4.0", "Answer: \\boxed{5}"]
BATCH_GROUND_TRUTHS = ["1", "2", "3", "4", "5"]
BATCH_EXPECTED_ACCS = [True, True, False, False, True]
BATCH_EXPECTED_PREDS = ["1", "2", "[INVALID]", "4.0", "5"]


@pytest.fixture(scope="module")
def pool():
  with RewardPool(num_workers=2) as reward_pool:
    yield reward_pool


def test_score_batch_in_process():
  batch = score_batch(BATCH_SOLUTIONS, BATCH_GROUND_TRUTHS, num_workers=0)
  assert isinstance(batch, BatchScores)
  assert [result["acc"] for result in batch.results] == BATCH_EXPECTED_ACCS
  assert [result["pred"] for result in batch.results] == BATCH_EXPECTED_PREDS
  np.testing.assert_array_equal(batch.scores, [1.0, 1.0, -1.0, -1.0, 1.0])
  np.testing.assert_array_equal(batch.accs, BATCH_EXPECTED_ACCS)
  assert batch.num_timeouts == 0 and not batch.errors


def test_score_batch_in_workers_matches_in_process(pool):
  batch = score_batch(BATCH_SOLUTIONS * 20, BATCH_GROUND_TRUTHS * 20, pool=pool)
  assert [result["acc"] for result in batch.results] == BATCH_EXPECTED_ACCS * 20
  assert [result["pred"] for result in batch.results] == BATCH_EXPECTED_PREDS * 20
  assert batch.num_timeouts == 0 and not batch.errors


def test_score_batch_runs_outside_this_process(pool):
  batch = pool.score(["a", "b", "c", "d"], ["", "", "", ""], default_score_fn=worker_pid, chunk_size=1)
  pids = {int(result["pred"]) for result in batch.results}
  assert os.getpid() not in pids
  assert 1 <= len(pids) <= 2


def test_score_batch_keeps_input_order_when_items_finish_out_of_order(pool):
  # Two workers, one item per chunk: item 0 sleeps longest and finishes last.
  delays = ["0.3", "0.2", "0.1", "0.0"]
  batch = pool.score(delays, [""] * 4, default_score_fn=sleep_then_echo, chunk_size=1)
  assert [result["pred"] for result in batch.results] == delays


def test_score_batch_times_out_a_hung_item_and_counts_it():
  solutions = ["Answer: 1", "hang", "Answer: 3", "hang", "Answer: 5"]
  start = time.monotonic()
  batch = score_batch(solutions, ["1", "2", "3", "4", "5"], default_score_fn=hang_on_request, num_workers=2,
                      timeout_s=0.5)
  assert time.monotonic() - start < 15.0
  assert batch.num_timeouts == 2 and batch.timed_out_indices == (1, 3)
  assert batch.results[1] == {"score": -1.0, "acc": False, "pred": None}
  assert batch.results[3] == {"score": -1.0, "acc": False, "pred": None}
  assert [batch.results[i]["acc"] for i in (0, 2, 4)] == [True, True, True]


def test_pool_requeues_the_rest_of_a_killed_workers_chunk_and_stays_usable():
  with RewardPool(num_workers=1) as one_worker:
    # One chunk of five on one worker: each hang kills the worker; the items after it go to its replacement.
    batch = one_worker.score(["hang", "Answer: 2", "hang", "Answer: 4", "Answer: 5"], ["1", "2", "3", "4", "5"],
                             default_score_fn=hang_on_request, timeout_s=0.4, chunk_size=5)
    assert batch.timed_out_indices == (0, 2)
    assert [result["acc"] for result in batch.results] == [False, True, False, True, True]
    again = one_worker.score(["Answer: 7"], ["7"])
    assert again.results[0]["acc"] is True and again.num_timeouts == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_score_batch_errors_raise_by_default(num_workers):
  with pytest.raises(RewardFunctionError, match=r"raise_on_request failed on item 1: ValueError: boom"):
    score_batch(["Answer: 1", "boom"], ["1", "2"], default_score_fn=raise_on_request, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_score_batch_errors_score_wrong_when_asked(num_workers):
  batch = score_batch(["Answer: 1", "boom", "Answer: 3"], ["1", "2", "3"], default_score_fn=raise_on_request,
                      num_workers=num_workers, on_error="wrong")
  assert [result["acc"] for result in batch.results] == [True, False, True]
  assert batch.results[1] == {"score": -1.0, "acc": False, "pred": None}
  assert len(batch.errors) == 1 and batch.errors[0][0] == 1 and "boom requested" in batch.errors[0][1]
  assert batch.num_timeouts == 0


def test_a_crashing_worker_is_replaced(pool):
  batch = pool.score(["Answer: 1", "crash", "Answer: 3"], ["1", "2", "3"], default_score_fn=exit_on_request,
                     on_error="wrong", chunk_size=3)
  assert [result["acc"] for result in batch.results] == [True, False, True]
  assert len(batch.errors) == 1 and "exited with code 3" in batch.errors[0][1]


def test_score_batch_dispatches_by_data_source(pool):
  sources = ["math_dapo", "half", "math_dapo", "other"]
  solutions = ["Answer: 1", "anything", "Answer: 3", "Answer: 4"]
  for workers in (0, 2):
    batch = score_batch(solutions, ["1", "2", "9", "4"], data_sources=sources, score_fns={"half": always_half},
                        num_workers=workers, pool=pool if workers else None)
    # "other" has no entry: it falls back to the default, math_dapo.
    assert batch.results == [
        {"score": 1.0, "acc": True, "pred": "1"},
        {"score": 0.5, "acc": True, "pred": None},
        {"score": -1.0, "acc": False, "pred": "3"},
        {"score": 1.0, "acc": True, "pred": "4"},
    ]


def test_score_batch_without_default_names_the_unknown_data_source():
  with pytest.raises(KeyError, match="code_contests"):
    score_batch(["x"], ["y"], data_sources=["code_contests"], score_fns={"half": always_half},
                default_score_fn=None, num_workers=0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(solutions=["a", "b"], ground_truths=["a"]), ValueError, "ground_truths"),
    (dict(solutions=["a"], ground_truths=["a"], data_sources=["x", "y"]), ValueError, "data_sources"),
    (dict(solutions=["a"], ground_truths=["a"], timeout_s=0), ValueError, "timeout_s"),
    (dict(solutions=["a"], ground_truths=["a"], on_error="ignore"), ValueError, "on_error"),
    (dict(solutions=["a"], ground_truths=["a"], num_workers=-1), ValueError, "num_workers"),
])
def test_score_batch_validates_its_arguments(kwargs, error, message):
  with pytest.raises(error, match=message):
    score_batch(**{"num_workers": 0, **kwargs})


def test_pool_rejects_functions_that_cannot_reach_the_workers(pool):
  with pytest.raises(TypeError, match="module-level"):
    pool.score(["a"], ["a"], default_score_fn=lambda solution, ground_truth: 1.0)


def test_pool_refuses_fork():
  with pytest.raises(ValueError, match="fork"):
    RewardPool(1, start_method="fork")


# --------------------------------------------------------------------------------------------------------------
# math_verify_score (optional)
# --------------------------------------------------------------------------------------------------------------


def test_math_verify_score_never_runs_in_process():
  with pytest.raises(ValueError, match="num_workers > 0"):
    score_batch(["Answer: 1"], ["1"], default_score_fn=math_verify_score, num_workers=0)


def test_math_verify_score_in_workers(pool):
  pytest.importorskip("math_verify")
  solutions = ["Answer: 1/2", "Answer: 42.0", "Answer: 43", "Answer: \\frac{\\pi}{2}", "no answer", "Answer: 7"]
  ground_truths = ["\\frac{1}{2}", "42", "42", "\\pi/2", "1", "7"]
  batch = pool.score(solutions, ground_truths, default_score_fn=math_verify_score, timeout_s=10.0)
  assert batch.num_timeouts == 0 and not batch.errors
  assert [result["acc"] for result in batch.results] == [True, True, False, True, False, True]
  # The prediction is math_dapo's normalised one.
  assert [result["pred"] for result in batch.results] == ["1/2", "42.0", "43", "\\frac{\\pi}{2}", "[INVALID]",
                                                          "7"]


def test_workers_do_not_import_the_parents_main_module(tmp_path):
  # The trainer's main module imports JAX (and TensorFlow, through clu); a worker needs only the scoring code.
  script = tmp_path / "main_with_jax.py"
  script.write_text(
      "import jax  # what the trainer's main module brings\n"
      "from dapo_jax.rl.reward_pool import RewardPool, score_batch\n"
      "from tests.rl.reward_fixtures import heavy_modules_loaded\n"
      "if __name__ == '__main__':\n"
      "  with RewardPool(1) as pool:\n"
      "    scored = score_batch(['x'], ['y'], pool=pool, default_score_fn=heavy_modules_loaded)\n"
      "  print('HEAVY=' + scored.results[0]['pred'])\n")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "HEAVY=\n" in result.stdout  # no jax, tensorflow, flax or torch in the worker
