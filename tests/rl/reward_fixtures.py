"""Reward functions for the reward tests' worker processes: module-level, so the workers can import them by name."""

import os
import sys
import time

from dapo_jax.rl.math_answers import math_dapo_score


def hang_on_request(solution, ground_truth):
  """math_dapo, except that the solution "hang" never returns."""
  if solution == "hang":
    time.sleep(3600)
  return math_dapo_score(solution, ground_truth)


def raise_on_request(solution, ground_truth):
  """math_dapo, except that the solution "boom" raises."""
  if solution == "boom":
    raise ValueError("boom requested")
  return math_dapo_score(solution, ground_truth)


def exit_on_request(solution, ground_truth):
  """math_dapo, except that the solution "crash" kills its process with exit code 3."""
  if solution == "crash":
    os._exit(3)  # pylint: disable=protected-access  (simulates a segfaulting native extension)
  return math_dapo_score(solution, ground_truth)


def sleep_then_echo(solution, ground_truth):
  """Sleeps `float(solution)` seconds and echoes the solution as pred: early items finish last."""
  time.sleep(float(solution))
  return {"score": 1.0, "acc": True, "pred": solution}


def always_half(solution, ground_truth):
  """A custom reward function that returns a bare number, as verl's custom functions may."""
  return 0.5


def source_aware(data_source, solution_str, ground_truth, extra_info=None):
  """A verl-style custom reward function that dispatches on the data source itself."""
  if data_source == "exact":
    return {"score": 1.0 if solution_str == ground_truth else -1.0, "pred": solution_str}
  return math_dapo_score(solution_str, ground_truth)


def worker_pid(solution, ground_truth):
  """Reports the worker's process id, to check that scoring happens outside the test process."""
  return {"score": -1.0, "acc": False, "pred": str(os.getpid())}


def heavy_modules_loaded(solution, ground_truth):
  """Scores 1; its prediction names the heavy packages loaded in the worker that ran it."""
  del solution, ground_truth
  heavy = sorted({name.split(".")[0] for name in sys.modules} & {"jax", "tensorflow", "flax", "torch"})
  return {"score": 1.0, "acc": True, "pred": ",".join(heavy)}
