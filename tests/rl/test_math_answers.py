"""Tests for dapo_jax.rl.math_answers: verl's math_dapo rule and the optional math-verify scorer.

Every expected prediction below was worked out by hand from verl's rules (docs/algorithm.md section 1), in order:
last `Answer:` line of the last 300 characters -> keep what follows the last "=" -> substitutions ("an ",
"a ", ".$" -> "$", "\\$", "\\ ", all spaces, ...) -> removed expressions (units, `^\\circ`, `{,}`, ...) ->
`$..$`, `\\text{}`, `\\textbf{}`, `\\overline{}`, `\\boxed{}` unwrapping -> `\\frac`/`\\sqrt` shorthands ->
drop `$` -> drop commas of all-digit strings -> strip.
"""

import sys
import time

import pytest

from dapo_jax.rl import math_answers
from dapo_jax.rl.math_answers import math_dapo_score, math_verify_score

# --------------------------------------------------------------------------------------------------------------
# math_dapo_score (docs/algorithm.md section 1)
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
  assert math_answers.last_boxed_content(text) == expected


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
# math_verify_score (optional; scoring it in workers is tested in test_reward_pool.py)
# --------------------------------------------------------------------------------------------------------------


def test_math_verify_score_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)  # Makes `import math_verify` fail.
  with pytest.raises(ImportError, match="pip install math-verify"):
    math_verify_score("Answer: 1", "1")
