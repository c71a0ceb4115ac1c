"""Reward functions of a run and overlong shaping for DAPO.

* `reward_functions` / `load_reward_function` pick the reward function of each data source (the math_dapo rule of
  `math_answers`, or the user's `reward.function`); `as_score_result` brings what they return to one form.
* `overlong_penalties` implements the soft overlong punishment (docs/algorithm.md section 2).

Scoring a batch within a time bound is `reward_pool.score_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from dapo_jax.rl.math_answers import math_dapo_score

ScoreFn = Callable[[str, str], Any]
"""A reward function: `(solution, ground_truth) -> {"score": float, "acc": bool, "pred": ...} | float`."""

# --------------------------------------------------------------------------------------------------------------
# Overlong reward shaping (docs/algorithm.md section 2)
# --------------------------------------------------------------------------------------------------------------


def _check_overlong_args(max_response_length: float, buffer_length: float, penalty_factor: float) -> None:
  if not max_response_length > 0:
    raise ValueError(f"max_response_length must be > 0, got {max_response_length}")
  if not 0 < buffer_length <= max_response_length:
    raise ValueError(f"buffer_length must be > 0 and <= max_response_length ({max_response_length}), "
                     f"got {buffer_length}")
  if not (math.isfinite(penalty_factor) and penalty_factor >= 0):
    raise ValueError(f"penalty_factor must be finite and >= 0, got {penalty_factor}")


def overlong_penalties(response_lengths: npt.ArrayLike, max_response_length: int, buffer_length: int,
                       penalty_factor: float) -> np.ndarray:
  """Soft overlong punishment `min(-(L - (Lmax - Lbuf)) / Lbuf * f, 0)` per response length (docs/algorithm.md 2).

  0 up to `Lmax - Lbuf` tokens, then linear down to `-f` at `Lmax`. A response length counts the valid response
  tokens, EOS included. Returns float64 of the shape of `response_lengths`. Raises ValueError naming the offending
  argument.
  """
  _check_overlong_args(max_response_length, buffer_length, penalty_factor)
  lengths = np.asarray(response_lengths, dtype=np.float64)
  if np.any(lengths < 0):
    raise ValueError(f"response_lengths must be >= 0, got a minimum of {lengths.min()}")
  exceed = lengths - (max_response_length - buffer_length)
  # `+ 0.0` turns a -0.0 at the threshold into 0.0.
  return np.minimum(-exceed / buffer_length * penalty_factor, 0.0) + 0.0


# --------------------------------------------------------------------------------------------------------------
# Loading and dispatching reward functions
# --------------------------------------------------------------------------------------------------------------


def load_reward_function(spec: str) -> ScoreFn:
  """Imports the reward function named by `reward.function = "package.module:function"`.

  The module must be importable (on sys.path), which worker processes need anyway to unpickle the function.
  The attribute may be dotted ("module:Class.method"). Raises ValueError for a malformed string, ImportError
  when the module or attribute is missing and TypeError when it is not callable, each naming `spec`.
  """
  module_name, separator, attribute_path = spec.partition(":")
  if not separator or not module_name.strip() or not attribute_path.strip() or ":" in attribute_path:
    raise ValueError(f"reward function {spec!r} must have the form 'package.module:function'")
  try:
    target = importlib.import_module(module_name)
  except ImportError as error:
    raise ImportError(f"reward function {spec!r}: cannot import module {module_name!r}: {error}") from error
  for attribute in attribute_path.split("."):
    try:
      target = getattr(target, attribute)
    except AttributeError as error:
      raise ImportError(f"reward function {spec!r}: {module_name!r} has no attribute {attribute_path!r}") \
        from error
  if not callable(target):
    raise TypeError(f"reward function {spec!r} is a {type(target).__name__}, not a callable")
  return target


@dataclasses.dataclass(frozen=True)
class SourceBoundFunction:
  """A user's reward function with its data source bound, called the way verl calls a custom reward function:
  `fn(data_source=..., solution_str=..., ground_truth=..., extra_info=None)` when its signature names
  `data_source`, else `fn(solution, ground_truth)`. A frozen dataclass, so worker processes can unpickle it."""
  fn: ScoreFn
  data_source: str

  def __call__(self, solution: str, ground_truth: str) -> Any:
    try:
      parameters = inspect.signature(self.fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature: call them plainly
      parameters = {}
    if "data_source" not in parameters:
      return self.fn(solution, ground_truth)
    kwargs = {"data_source": self.data_source, "solution_str": solution, "ground_truth": ground_truth}
    if "extra_info" in parameters:
      kwargs["extra_info"] = None
    return self.fn(**kwargs)


def reward_functions(data_sources: Sequence[str], *, function: str | None = None,
                     strict_box: bool = False) -> dict[str, ScoreFn]:
  """The dispatch table `{data_source: fn}` of a run (config keys `reward.function`, `reward.strict_box`).

  Without `function`, every source is scored by `math_dapo_score`. With `function = "module:function"`, every
  source is scored by the user's function, which receives the data source (verl's custom reward function) and
  so may dispatch on it itself.
  """
  if function is None:
    default = functools.partial(math_dapo_score, strict_box=strict_box) if strict_box else math_dapo_score
    return {source: default for source in data_sources}
  custom = load_reward_function(function)
  return {source: SourceBoundFunction(custom, source) for source in data_sources}


def resolve_score_fns(num_items: int, data_sources: Sequence[str] | None,
                      score_fns: Mapping[str, ScoreFn] | None,
                      default_score_fn: ScoreFn | None) -> list[ScoreFn]:
  """The reward function of each item: `score_fns[data_source]`, else `default_score_fn`.

  Raises KeyError naming the data source when it has no entry and there is no default.
  """
  if data_sources is None:
    if default_score_fn is None:
      raise ValueError("no data_sources given and default_score_fn is None: nothing to score with")
    return [default_score_fn] * num_items
  if len(data_sources) != num_items:
    raise ValueError(f"data_sources has {len(data_sources)} entries for {num_items} solutions")
  table = dict(score_fns or {})
  resolved = []
  for source in data_sources:
    fn = table.get(source, default_score_fn)
    if fn is None:
      raise KeyError(f"no reward function for data_source {source!r} (known: {sorted(table)}) and no default")
    resolved.append(fn)
  return resolved


def as_score_result(raw: Any) -> dict[str, Any]:
  """Brings a reward function's return value to `{"score": float, "acc": bool, "pred": ..., ...}`.

  A dict keeps its extra keys; `acc` defaults to `score > 0` and `pred` to None. A bare number (verl's
  custom functions may return one) becomes `{"score": float(x), "acc": x > 0, "pred": None}`.
  """
  if isinstance(raw, Mapping):
    if "score" not in raw:
      raise ValueError(f"reward function returned a mapping without 'score': keys {sorted(raw)}")
    result = dict(raw)
    result["score"] = float(result["score"])
    result["acc"] = bool(result.get("acc", result["score"] > 0))
    result.setdefault("pred", None)
    return result
  if isinstance(raw, (bool, int, float, np.number, np.bool_)):
    score = float(raw)
    return {"score": score, "acc": score > 0, "pred": None}
  raise TypeError(f"reward function returned a {type(raw).__name__}; expected a dict with 'score' or a number")
