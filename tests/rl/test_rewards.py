"""Tests for dapo_jax.rl.rewards: verl's math_dapo rule, overlong shaping and bounded-time batch scoring.

Every expected prediction below was worked out by hand from verl's rules (DAPO_SPEC.md section 1), in order:
last `Answer:` line of the last 300 characters -> keep what follows the last "=" -> substitutions ("an ",
"a ", ".$" -> "$", "\\$", "\\ ", all spaces, ...) -> removed expressions (units, `^\\circ`, `{,}`, ...) ->
`$..$`, `\\text{}`, `\\textbf{}`, `\\overline{}`, `\\boxed{}` unwrapping -> `\\frac`/`\\sqrt` shorthands ->
drop `$` -> drop commas of all-digit strings -> strip.
"""

import os
import sys
import time

import numpy as np
import pytest

from dapo_jax.rl import rewards
from dapo_jax.rl.rewards import (BatchScores, RewardFunctionError, RewardPool, load_reward_function,
                                 math_dapo_score, math_verify_score, overlong_penalties, overlong_penalty,
                                 score_batch)

# --------------------------------------------------------------------------------------------------------------
# Reward functions for the worker processes: module-level, so the workers can import them by name.
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# math_dapo_score (DAPO_SPEC.md section 1)
# --------------------------------------------------------------------------------------------------------------

# (solution, ground truth, expected acc, expected normalised prediction)
MATH_DAPO_CASES = [
    # `Answer:` variants: case, spacing, newline after the colon.
    ("Answer: 42", "42", True, "42"),
    ("answer: 42", "42", True, "42"),
    ("ANSWER:42", "42", True, "42"),
    ("Answer : 42", "42", True, "42"),
    ("Answer:\n42", "42", True, "42"),
    ("Answer:  \t 42", "42", True, "42"),
    ("Final Answer: 42", "42", True, "42"),
    ("So we are done.\nAnswer: 42\nThat's all.", "42", True, "42"),
    ("Final answer:\n\n\\boxed{7}", "7", True, "7"),
    # Several answer lines: the last one wins.
    ("Answer: 41\nAnswer: 42", "42", True, "42"),
    ("Answer: 42\nAnswer: 41", "42", False, "41"),
    ("answer: 3\nAnswer: 4\nANSWER: 5", "5", True, "5"),
    # A bare trailing "Answer:" matches nothing (`[^\n]+` needs a character), so the earlier line stands.
    ("Answer: 5\nAnswer:", "5", True, "5"),
    # Two answers on one line are one match: "3 Answer: 4" loses its spaces.
    ("Answer: 3 Answer: 4", "4", False, "3Answer:4"),
    # `\s*` crosses blank lines to the next text.
    ("Answer:\n\nThe end.", "5", False, "Theend."),
    # Spaces then a newline: `\s*` backtracks one space for `[^\n]+`, which normalises to "".
    ("Answer:  \n", "5", False, ""),
    # No `Answer:` line.
    ("The answer is 42.", "42", False, "[INVALID]"),
    ("", "42", False, "[INVALID]"),
    ("Answer 42", "42", False, "[INVALID]"),
    # Filler words are not removed: only listed expressions are.
    ("Answer: The answer is 42", "42", False, "Theansweris42"),
    ("Answer: **42**", "42", False, "**42**"),
    # "an " and "a " are deleted.
    ("Answer: a 5", "5", True, "5"),
    ("Answer: an 8", "8", True, "8"),
    ("Answer: a5", "5", False, "a5"),
    # "an " goes before "a ": deleting "a " from "aa n 5" then leaves "an5", which nothing deletes.
    ("Answer: aa n 5", "5", False, "an5"),
    # No numeric equivalence.
    ("Answer: 42.0", "42", False, "42.0"),
    ("Answer: 42.", "42", False, "42."),
    ("Answer: 0.5", "\\frac{1}{2}", False, "0.5"),
    ("Answer: 1/2", "\\frac{1}{2}", False, "1/2"),
    # Dollars: ".$" -> "$", escaped dollars dropped, only the first $..$ span survives.
    ("Answer: $42$", "42", True, "42"),
    ("Answer: $42.$", "42", True, "42"),
    ("Answer: \\$42", "42", True, "42"),
    ("Answer: $\\frac{1}{2}$ or $\\frac{3}{4}$", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\(42\\)", "42", False, "\\(42\\)"),
    # \boxed{}: greedy to the last brace, text after it stays.
    ("Answer: \\boxed{42}", "42", True, "42"),
    ("Answer: $\\boxed{42}$", "42", True, "42"),
    ("Answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\boxed{5}.", "5", False, "5."),
    # \frac and \sqrt shorthands.
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\dfrac12", "\\frac{1}{2}", False, "\\dfrac{1}{2}"),
    ("Answer: \\dfrac12", "\\dfrac{1}{2}", True, "\\dfrac{1}{2}"),
    ("Answer: \\sqrt3", "\\sqrt{3}", True, "\\sqrt{3}"),
    ("Answer: 2\\sqrt3", "2\\sqrt{3}", True, "2\\sqrt{3}"),
    ("Answer: \\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True, "\\frac{\\sqrt{3}}{2}"),
    # \text{}, \textbf{}, \overline{} unwrapping.
    ("Answer: \\text{(B)}", "(B)", True, "(B)"),
    ("Answer: \\textbf{7}", "7", True, "7"),
    ("Answer: \\overline{3}", "3", True, "3"),
    ("Answer: \\mbox{Yes}", "Yes", True, "Yes"),
    # Units and filler words.
    ("Answer: 30^\\circ", "30", True, "30"),
    ("Answer: 30^{\\circ}", "30", True, "30"),
    ("Answer: 30 degrees", "30", True, "30"),
    ("Answer: 5 cm", "5", True, "5"),
    ("Answer: 5\\text{ cm}", "5", True, "5"),
    ("Answer: 12 units", "12", True, "12"),
    ("Answer: 10 ways", "10", True, "10"),
    ("Answer: 7 points", "7", True, "7"),
    ("Answer: 42 dollars", "42", True, "42"),
    ("Answer: 15 minutes", "15", True, "15"),
    ("Answer: 5\\%", "5", False, "5\\%"),
    # Commas in numbers: dropped only when the rest is all digits.
    ("Answer: 1,000", "1000", True, "1000"),
    ("Answer: 1,000,000", "1000000", True, "1000000"),
    ("Answer: 1{,}000", "1000", True, "1000"),
    ("Answer: -1,000", "-1000", False, "-1,000"),
    # The all-digits test runs before the final strip: a trailing tab keeps the comma.
    ("Answer: 1,000\t", "1000", False, "1,000"),
    ("Answer: 42\r\nDone.", "42", True, "42"),
    # "\text{and}" becomes a comma, and then the all-digits rule drops it: "3 and 4" reads as 34.
    ("Answer: 3 \\text{and} 4", "3, 4", True, "34"),
    # Negative numbers.
    ("Answer: -5", "-5", True, "-5"),
    ("Answer: - 5", "-5", True, "-5"),
    ("Answer: -5", "5", False, "-5"),
    # Only what follows the last "=" counts.
    ("Answer: x = 5", "5", True, "5"),
    ("Answer: $x = 5$", "5", True, "5"),
    ("Answer: x=3, y=5", "5", True, "5"),
    # The ground truth is normalised the same way.
    ("Answer: 1000", "1,000", True, "1000"),
    ("Answer: 12", "\\boxed{12}", True, "12"),
    ("Answer: \\frac34", "$\\frac{3}{4}$", True, "\\frac{3}{4}"),
    ("Answer: 7", " 7 ", True, "7"),
    ("Answer: 10", "10^\\circ", True, "10"),
    # Only the last 300 characters are read: 10 + 1 + 289 = 300 keeps "Answer: 42", 301 cuts its "A".
    ("Answer: 42\n" + "y" * 289, "42", True, "42"),
    ("Answer: 42\n" + "y" * 290, "42", False, "[INVALID]"),
    ("Answer: 42\n" + "x" * 5000, "42", False, "[INVALID]"),
    ("Answer: 41\n" + "z" * 1000 + "\nAnswer: 42", "42", True, "42"),
]


@pytest.mark.parametrize("solution, ground_truth, acc, pred", MATH_DAPO_CASES)
def test_math_dapo_score(solution, ground_truth, acc, pred):
  assert math_dapo_score(solution, ground_truth) == {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


# (solution, ground truth, expected acc, expected raw prediction)
STRICT_BOX_CASES = [
    ("So the result is \\boxed{42}", "42", True, "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    # Raw content, no normalisation, on either side.
    ("\\boxed{ 42 }", "42", False, " 42 "),
    ("\\boxed{42}", " 42", False, "42"),
    # The last box wins; an unclosed last box does not fall back to an earlier one.
    ("\\boxed{1} and \\boxed{2}", "2", True, "2"),
    ("\\boxed{1} and \\boxed{2", "1", False, None),
    # No box, or an `Answer:` line only: pred None.
    ("Answer: 42", "42", False, None),
    ("no box here", "42", False, None),
    # The box must lie within the last 100 characters: 9 + 91 = 100 keeps it, 9 + 92 cuts its backslash.
    ("\\boxed{7}" + "z" * 91, "7", True, "7"),
    ("\\boxed{7}" + "z" * 92, "7", False, None),
]


@pytest.mark.parametrize("solution, ground_truth, acc, pred", STRICT_BOX_CASES)
def test_math_dapo_score_strict_box(solution, ground_truth, acc, pred):
  expected = {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}
  assert math_dapo_score(solution, ground_truth, strict_box=True) == expected


@pytest.mark.parametrize("text, expected", [
    ("x \\boxed{a{b}c} y", "a{b}c"),
    ("\\boxed{}", ""),
    ("\\boxed{{{", None),
    ("boxed{3}", None),
])
def test_last_boxed_content(text, expected):
  assert rewards.last_boxed_content(text) == expected


# --------------------------------------------------------------------------------------------------------------
# Adversarial inputs: bounded time, correct results
# --------------------------------------------------------------------------------------------------------------

ADVERSARIAL_CASES = {
    "1 MB response": ("x" * 1_000_000 + "\nAnswer: 42", "42", True, "42"),
    "10,000 answer lines": ("".join(f"Answer: {i}\n" for i in range(10_000)), "9999", True, "9999"),
    # The last 300 characters are closing braces, with no `Answer:` in them.
    "10k nested braces": ("Answer: " + "\\boxed{" * 10_000 + "7" + "}" * 10_000, "7", False, "[INVALID]"),
    "backtracking spaces": ("Answer:" + " " * 100_000 + "x", "x", False, "[INVALID]"),
    "one dollar, 290 chars": ("Answer: $" + "a" * 290, "1", False, "a" * 290),
    "many dollars": ("Answer: " + "$" * 291, "1", False, ""),
    "unclosed text": ("Answer: " + "\\text{" * 48, "1", False, "\\text{" * 48),
    "spaces then x, 300 chars": ("Answer:" + " " * 292 + "x", "x", True, "x"),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL_CASES))
def test_math_dapo_score_adversarial_is_fast_and_right(name):
  solution, ground_truth, acc, pred = ADVERSARIAL_CASES[name]
  start = time.perf_counter()
  result = math_dapo_score(solution, ground_truth)
  elapsed = time.perf_counter() - start
  assert elapsed < 1.0, f"{name}: {elapsed:.3f} s"
  assert result == {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


def test_strict_box_adversarial_nesting_is_fast():
  solution = "\\boxed{" * 10_000 + "7" + "}" * 10_000
  start = time.perf_counter()
  result = math_dapo_score(solution, "7", strict_box=True)
  assert time.perf_counter() - start < 1.0
  # The last 100 characters are closing braces only: no box.
  assert result == {"score": -1.0, "acc": False, "pred": None}


# --------------------------------------------------------------------------------------------------------------
# Overlong penalty (DAPO_SPEC.md section 2)
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
  assert overlong_penalty(length, max_length, buffer, factor) == pytest.approx(expected, abs=1e-15)
  assert overlong_penalties(np.array([length]), max_length, buffer, factor)[0] == pytest.approx(expected,
                                                                                               abs=1e-15)


def test_overlong_penalty_is_never_negative_zero():
  assert str(overlong_penalty(16384, 20480, 4096, 1.0)) == "0.0"
  assert str(overlong_penalties([16384], 20480, 4096, 1.0)[0]) == "0.0"


def test_overlong_penalties_match_the_scalar_version():
  lengths = np.array([[0, 16000, 16384], [17000, 19999, 20480]])
  penalties = overlong_penalties(lengths, 20480, 4096, 1.0)
  assert penalties.shape == (2, 3) and penalties.dtype == np.float64
  expected = [[overlong_penalty(int(n), 20480, 4096, 1.0) for n in row] for row in lengths]
  np.testing.assert_array_equal(penalties, expected)


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
    overlong_penalty(100, **kwargs)
  with pytest.raises(ValueError, match=argument):
    overlong_penalties([100], **kwargs)


def test_overlong_penalty_rejects_negative_lengths():
  with pytest.raises(ValueError, match="response_length"):
    overlong_penalty(-1, 20480, 4096, 1.0)
  with pytest.raises(ValueError, match="response_lengths"):
    overlong_penalties([5, -1], 20480, 4096, 1.0)


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
  assert batch.num_timeouts == 0 and batch.num_errors == 0


def test_score_batch_in_workers_matches_in_process(pool):
  batch = score_batch(BATCH_SOLUTIONS * 20, BATCH_GROUND_TRUTHS * 20, pool=pool)
  assert [result["acc"] for result in batch.results] == BATCH_EXPECTED_ACCS * 20
  assert [result["pred"] for result in batch.results] == BATCH_EXPECTED_PREDS * 20
  assert batch.num_timeouts == 0 and batch.num_errors == 0


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
  assert batch.num_errors == 1 and batch.errors[0][0] == 1 and "boom requested" in batch.errors[0][1]
  assert batch.num_timeouts == 0


def test_a_crashing_worker_is_replaced(pool):
  batch = pool.score(["Answer: 1", "crash", "Answer: 3"], ["1", "2", "3"], default_score_fn=exit_on_request,
                     on_error="wrong", chunk_size=3)
  assert [result["acc"] for result in batch.results] == [True, False, True]
  assert batch.num_errors == 1 and "exited with code 3" in batch.errors[0][1]


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


def test_score_result_normalisation():
  assert rewards.as_score_result(True) == {"score": 1.0, "acc": True, "pred": None}
  assert rewards.as_score_result(0) == {"score": 0.0, "acc": False, "pred": None}
  assert rewards.as_score_result({"score": 2, "extra": 1}) == {"score": 2.0, "acc": True, "pred": None, "extra": 1}
  with pytest.raises(ValueError, match="score"):
    rewards.as_score_result({"acc": True})
  with pytest.raises(TypeError, match="str"):
    rewards.as_score_result("1.0")


# --------------------------------------------------------------------------------------------------------------
# load_reward_function
# --------------------------------------------------------------------------------------------------------------


def test_reward_functions_default_to_math_dapo_for_every_source():
  table = rewards.reward_functions(["math_dapo", "aime"])
  assert table == {"math_dapo": math_dapo_score, "aime": math_dapo_score}
  strict = rewards.reward_functions(["math_dapo"], strict_box=True)["math_dapo"]
  assert strict("Answer: 7", "7")["score"] == -1.0  # no \boxed{} in strict-box mode
  assert strict("so \\boxed{7}", "7")["score"] == 1.0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_custom_reward_function_receives_the_data_source(num_workers):
  table = rewards.reward_functions(["exact", "math_dapo"], function="tests.rl.test_rewards:source_aware")
  solutions = ["Answer: 7", "Answer: 7", "7"]
  scored = score_batch(solutions, ["7", "7", "7"], data_sources=["exact", "math_dapo", "exact"], score_fns=table,
                       default_score_fn=None, num_workers=num_workers)
  np.testing.assert_array_equal(scored.scores, [-1.0, 1.0, 1.0])  # "exact" compares whole strings
  # A plain (solution, ground_truth) function works too, for every source.
  plain = rewards.reward_functions(["exact"], function="tests.rl.test_rewards:always_half")
  assert score_batch(["x"], ["7"], data_sources=["exact"], score_fns=plain, default_score_fn=None,
                     num_workers=num_workers).scores.tolist() == [0.5]


def test_unknown_data_source_is_an_error_naming_it():
  table = rewards.reward_functions(["math_dapo"])
  with pytest.raises(KeyError, match="no reward function for data_source 'gsm8k'"):
    score_batch(["Answer: 1"], ["1"], data_sources=["gsm8k"], score_fns=table, default_score_fn=None,
                num_workers=0)


def test_load_reward_function_finds_module_functions():
  assert load_reward_function("dapo_jax.rl.rewards:math_dapo_score") is math_dapo_score
  assert load_reward_function("tests.rl.test_rewards:always_half") is always_half


@pytest.mark.parametrize("spec, error", [
    ("dapo_jax.rl.rewards", ValueError),
    ("dapo_jax.rl.rewards:", ValueError),
    (":math_dapo_score", ValueError),
    ("a:b:c", ValueError),
    ("no_such_module_for_dapo_tests:score", ImportError),
    ("dapo_jax.rl.rewards:no_such_function", ImportError),
    ("dapo_jax.rl.rewards:RESPONSE_TAIL_CHARS", TypeError),
])
def test_load_reward_function_errors_name_the_string(spec, error):
  with pytest.raises(error) as raised:
    load_reward_function(spec)
  assert repr(spec) in str(raised.value)


# --------------------------------------------------------------------------------------------------------------
# math_verify_score (optional)
# --------------------------------------------------------------------------------------------------------------


def test_math_verify_score_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)  # Makes `import math_verify` fail.
  with pytest.raises(ImportError, match="pip install math-verify"):
    math_verify_score("Answer: 1", "1")


def test_math_verify_score_never_runs_in_process():
  with pytest.raises(ValueError, match="num_workers > 0"):
    score_batch(["Answer: 1"], ["1"], default_score_fn=math_verify_score, num_workers=0)


def test_math_verify_score_in_workers(pool):
  pytest.importorskip("math_verify")
  solutions = ["Answer: 1/2", "Answer: 42.0", "Answer: 43", "Answer: \\frac{\\pi}{2}", "no answer", "Answer: 7"]
  ground_truths = ["\\frac{1}{2}", "42", "42", "\\pi/2", "1", "7"]
  batch = pool.score(solutions, ground_truths, default_score_fn=math_verify_score, timeout_s=10.0)
  assert batch.num_timeouts == 0 and batch.num_errors == 0
  assert [result["acc"] for result in batch.results] == [True, True, False, True, False, True]
  # The prediction is math_dapo's normalised one.
  assert [result["pred"] for result in batch.results] == ["1/2", "42.0", "43", "\\frac{\\pi}{2}", "[INVALID]",
                                                          "7"]
