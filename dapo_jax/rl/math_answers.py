"""The math_dapo answer rule: answer extraction, normalisation and comparison, and its symbolic variant.

* `math_dapo_score` reproduces verl's `verl/utils/reward_score/math_dapo.py` (reference commit 4f80e465) rule
  for rule: answer extraction from the last 300 characters, Minerva-style normalisation, exact comparison
  (docs/algorithm.md section 1). The model's text is untrusted: nothing here evaluates it, and every regex is at
  worst quadratic on the (at most 300 characters of) text it sees.
* `math_verify_score` is an optional symbolic verifier (the `math-verify` package) behind the same interface.

Only the standard library is imported here (math-verify on first use), so reward worker processes load little.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

# --------------------------------------------------------------------------------------------------------------
# math_dapo (docs/algorithm.md section 1)
# --------------------------------------------------------------------------------------------------------------

RESPONSE_TAIL_CHARS = 300
"""Only this many trailing characters of a response are read (verl: the longest MATH-500 answer is 159)."""

STRICT_BOX_TAIL_CHARS = 100
"""Strict-box mode looks for the last `\\boxed{}` within this many trailing characters (of the 300 above)."""

INVALID_PREDICTION = "[INVALID]"
"""The prediction when a response has no `Answer:` line."""

# `\s*` crosses newlines, so "Answer:\n42" is read as 42; `[^\n]+` stops at the end of the answer's line.
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# verl's SUBSTITUTIONS, in verl's order (plain `str.replace`). "an " and "a " come first, so `Answer: a 5`
# reads as 5, and all spaces are removed before any of the removed expressions below are matched.
ANSWER_SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)

# verl's REMOVED_EXPRESSIONS, in verl's order: plain substring deletions (so "issue" loses its "sue" too).
REMOVED_EXPRESSIONS: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)

# The LaTeX unwrapping regexes, in verl's order, with verl's replacement templates. Without DOTALL `.` stops
# at a newline; a prediction never holds one (`[^\n]+`), a ground truth might.
_UNWRAP_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # Keeps only the first $...$ span, dropping text before and after it.
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), "$\\3$"),
    # Lazy: `\text{a}b}` becomes `ab}`.
    (re.compile(r"(\\text\{)(.*?)(\})"), "\\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), "\\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), "\\2"),
    # Greedy: up to the last closing brace, so `\boxed{\frac{1}{2}}` becomes `\frac{1}{2}`.
    (re.compile(r"(\\boxed\{)(.*)(\})"), "\\2"),
)

# TeX shorthand: `\fracab` -> `\frac{a}{b}`, `\sqrta` -> `\sqrt{a}` (also inside `\dfrac`, `\tfrac`).
_FRAC_SHORTHAND = re.compile(r"(frac)([^{])(.)")
_SQRT_SHORTHAND = re.compile(r"(sqrt)([^{])")

_BOXED_OPEN = "\\boxed{"


def last_answer_line(text: str) -> str | None:
  """The text after the last case-insensitive `Answer:` in `text` (to the end of its line), or None."""
  answer = None
  # A scan instead of `findall`: same matches (non-overlapping, left to right), without building the list.
  for match in _ANSWER_LINE.finditer(text):
    answer = match.group(1)
  return answer


def normalize_final_answer(answer: str) -> str:
  """verl's Minerva-style normalisation of a final answer (docs/algorithm.md section 1), steps in verl's order."""
  # Keep what follows the last "=": "x = 5" reads as 5.
  answer = answer.split("=")[-1]
  for before, after in ANSWER_SUBSTITUTIONS:
    answer = answer.replace(before, after)
  for expression in REMOVED_EXPRESSIONS:
    answer = answer.replace(expression, "")
  for pattern, template in _UNWRAP_RULES:
    answer = pattern.sub(template, answer)
  answer = _FRAC_SHORTHAND.sub("frac{\\2}{\\3}", answer)
  answer = _SQRT_SHORTHAND.sub("sqrt{\\2}", answer)
  answer = answer.replace("$", "")
  # Thousands separators go only when the rest is all digits (unicode digits included, as `str.isdigit`),
  # so "-1,000" and "1,000.5" keep their commas. This test runs before the final strip, as in verl.
  if answer.replace(",", "").isdigit():
    answer = answer.replace(",", "")
  return answer.strip()


def last_boxed_content(text: str) -> str | None:
  """The raw content of the last `\\boxed{...}` in `text`; None if there is none or its braces never close.

  Like verl, only the last `\\boxed{` is tried: an unclosed last box does not fall back to an earlier one.
  """
  start = text.rfind(_BOXED_OPEN)
  if start < 0:
    return None
  depth = 0
  # One linear scan from the box's own opening brace.
  for position in range(start + len(_BOXED_OPEN) - 1, len(text)):
    character = text[position]
    if character == "{":
      depth += 1
    elif character == "}":
      depth -= 1
      if depth == 0:
        return text[start + len(_BOXED_OPEN):position]
  return None


def _score_dict(correct: bool, pred: str | None) -> dict[str, Any]:
  return {"score": 1.0 if correct else -1.0, "acc": bool(correct), "pred": pred}


def math_dapo_score(solution: str, ground_truth: str, strict_box: bool = False) -> dict[str, Any]:
  """Scores a response with verl's `math_dapo` rule (docs/algorithm.md section 1).

  Args:
    solution: the decoded response (untrusted). Only its last 300 characters are read.
    ground_truth: the reference answer.
    strict_box: verl's strict-box mode: the prediction is the raw (unnormalised) content of the last
      `\\boxed{}` within the last 100 characters, compared with the raw ground truth.

  Returns:
    `{"score": +1.0 or -1.0, "acc": bool, "pred": str | None}`. `pred` is the normalised prediction,
    `"[INVALID]"` when there is no `Answer:` line, and None in strict-box mode when there is no box (the
    reference commit; newer verl says "[INVALID]").
  """
  tail = solution[-RESPONSE_TAIL_CHARS:]
  if strict_box:
    pred = last_boxed_content(tail[-STRICT_BOX_TAIL_CHARS:])
    return _score_dict(pred == ground_truth, pred)
  answer = last_answer_line(tail)
  pred = normalize_final_answer(INVALID_PREDICTION if answer is None else answer)
  return _score_dict(pred == normalize_final_answer(ground_truth), pred)


# --------------------------------------------------------------------------------------------------------------
# Optional symbolic verifier (math-verify)
# --------------------------------------------------------------------------------------------------------------


def _import_math_verify():
  """Imports the optional `math_verify` package, or says how to install it."""
  try:
    return importlib.import_module("math_verify")
  except ImportError as error:
    raise ImportError(
        "math_verify_score needs the optional package math-verify: `pip install math-verify` "
        "(the tested version is pinned in requirements-optional.txt)") from error


def _warm_up_math_verify() -> None:
  """Imports math-verify and parses once, so the first real item is not charged for loading sympy/ANTLR."""
  math_verify = _import_math_verify()
  math_verify.parse("$1$", extraction_config=[math_verify.LatexExtractionConfig()])


def math_verify_score(solution: str, ground_truth: str) -> dict[str, Any]:
  """`math_dapo_score` with symbolic equivalence (math-verify) where the exact comparison fails.

  The prediction is extracted as in `math_dapo` (last `Answer:` line of the last 300 characters). An exact
  match after normalisation is correct without touching sympy; otherwise math-verify parses the ground truth
  (boxed, as verl's `math_verify` scorer does) and the raw prediction (as LaTeX math) and decides. This is
  more lenient than `math_dapo` (`42.0` == `42`, `1/2` == `\\frac{1}{2}`), so rewards differ from DAPO's.

  sympy on untrusted text can take unbounded time: score_batch refuses to run this in-process and only
  runs it in worker processes with a time bound. Calling it directly runs it unbounded.

  Returns:
    `{"score": +1.0 or -1.0, "acc": bool, "pred": normalised prediction}`, as `math_dapo_score`.
  """
  math_verify = _import_math_verify()
  answer = last_answer_line(solution[-RESPONSE_TAIL_CHARS:])
  if answer is None:
    return _score_dict(False, normalize_final_answer(INVALID_PREDICTION))
  pred = normalize_final_answer(answer)
  if pred == normalize_final_answer(ground_truth):
    return _score_dict(True, pred)
  latex_only = [math_verify.LatexExtractionConfig()]
  gold = math_verify.parse("\\boxed{" + ground_truth + "}", extraction_config=latex_only)
  # A bare answer ("\frac12", "x^2+1") is only found by the LaTeX extractor inside math delimiters.
  candidate = answer if "$" in answer else f"${answer.strip()}$"
  target = math_verify.parse(candidate, extraction_config=latex_only + [math_verify.ExprExtractionConfig()])
  correct = bool(gold) and bool(target) and bool(math_verify.verify(gold, target))
  return _score_dict(correct, pred)


# Worker hooks (see reward_pool.RewardPool): run only with a time bound, and warm up once per worker process.
math_verify_score.requires_isolation = True
math_verify_score.warm_up = _warm_up_math_verify
