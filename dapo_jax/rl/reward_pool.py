"""Bounded-time batch scoring: `score_batch` / `RewardPool` score many responses in worker processes.

Each item has a time bound: an item that runs out of time scores as wrong and is counted (`reward/timeouts`,
docs/algorithm.md section 10), and the hung worker is killed and replaced. Workers are started with "forkserver" (or
"spawn"), never by forking the training process, which has JAX loaded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import multiprocessing
import os
import pickle
import signal
import sys
import time
import types
from multiprocessing import connection as mp_connection
from typing import Any, Mapping, Sequence

import numpy as np

from dapo_jax.rl.math_answers import math_dapo_score
from dapo_jax.rl.rewards import ScoreFn, SourceBoundFunction, as_score_result, resolve_score_fns

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_WARM_UP_TIMEOUT_S = 60.0
DEFAULT_NUM_WORKERS = min(8, os.cpu_count() or 1)


class RewardFunctionError(RuntimeError):
  """A reward function raised (or its worker died) on an item, with `on_error="raise"`."""


class RewardWorkerStartupError(RuntimeError):
  """A worker process failed to get ready (start, import, warm up), or did not within `warm_up_timeout_s`."""


@dataclasses.dataclass(frozen=True)
class BatchScores:
  """Results of `score_batch`, in input order.

  Attributes:
    results: one `{"score", "acc", "pred", ...}` dict per input. A timed-out or (with `on_error="wrong"`)
      failed item is `{"score": failure_score, "acc": False, "pred": None}`.
    timed_out_indices: inputs that ran out of time (`reward/timeouts` is their count).
    errors: `(index, message)` for inputs whose reward function raised or whose worker died.
  """
  results: list[dict[str, Any]]
  timed_out_indices: tuple[int, ...] = ()
  errors: tuple[tuple[int, str], ...] = ()

  @property
  def num_timeouts(self) -> int:
    return len(self.timed_out_indices)

  @property
  def scores(self) -> np.ndarray:
    return np.array([result["score"] for result in self.results], dtype=np.float64)

  @property
  def accs(self) -> np.ndarray:
    return np.array([result["acc"] for result in self.results], dtype=bool)


def _failed_result(failure_score: float) -> dict[str, Any]:
  return {"score": float(failure_score), "acc": False, "pred": None}


def _check_batch_args(solutions: Sequence[str], ground_truths: Sequence[str], timeout_s: float,
                      on_error: str) -> None:
  if len(solutions) != len(ground_truths):
    raise ValueError(f"{len(solutions)} solutions but {len(ground_truths)} ground_truths")
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  if on_error not in ("raise", "wrong"):
    raise ValueError(f"on_error must be 'raise' or 'wrong', got {on_error!r}")


def _function_name(fn: ScoreFn) -> str:
  if isinstance(fn, SourceBoundFunction):
    return f"{_function_name(fn.fn)} (data_source {fn.data_source!r})"
  return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _error_message(index: int, fn: ScoreFn, detail: str) -> str:
  return f"reward function {_function_name(fn)} failed on item {index}: {detail}"


def _score_in_process(fns: Sequence[ScoreFn], solutions: Sequence[str], ground_truths: Sequence[str],
                      on_error: str, failure_score: float) -> BatchScores:
  """Scores in this process, one item after another, with no time bound."""
  for fn in set(fns):
    if getattr(fn, "requires_isolation", False):
      raise ValueError(f"{_function_name(fn)} may run unbounded on untrusted text: score it with "
                       "num_workers > 0 (worker processes with a time bound), not in-process")
  results, errors = [], []
  for index, (fn, solution, ground_truth) in enumerate(zip(fns, solutions, ground_truths)):
    try:
      results.append(as_score_result(fn(solution, ground_truth)))
    except Exception as error:  # pylint: disable=broad-except  (a reward function may raise anything)
      message = _error_message(index, fn, f"{type(error).__name__}: {error}")
      if on_error == "raise":
        raise RewardFunctionError(message) from error
      results.append(_failed_result(failure_score))
      errors.append((index, message))
  return BatchScores(results=results, errors=tuple(errors))


def _worker_main(connection: mp_connection.Connection) -> None:
  """A worker process: receives chunks of `(index, fn, solution, ground_truth)`, answers item by item.

  Messages back: `("ready", None, None)` once a chunk's functions are warmed up (or
  `("warm_up_error", None, message)`, and the worker exits), then per item
  `("ok", index, result)` or `("error", index, message)`. The parent times each item from the previous
  message, so the answers must go out one at a time.
  """
  # Ctrl-C reaches the whole process group: let the parent decide, instead of every worker dying noisily.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  warmed_up = set()
  while True:
    try:
      chunk = connection.recv()
    except EOFError:
      return
    if chunk is None:
      return
    try:
      for fn in {fn for _, fn, _, _ in chunk} - warmed_up:
        warm_up = getattr(fn, "warm_up", None)
        if warm_up is not None:
          warm_up()
        warmed_up.add(fn)
    except Exception as error:  # pylint: disable=broad-except  (reported to the parent, which stops)
      connection.send(("warm_up_error", None, f"{_function_name(fn)}: {type(error).__name__}: {error}"))
      return
    connection.send(("ready", None, None))
    for index, fn, solution, ground_truth in chunk:
      try:
        message = ("ok", index, as_score_result(fn(solution, ground_truth)))
      except Exception as error:  # pylint: disable=broad-except  (reported to the parent)
        message = ("error", index, f"{type(error).__name__}: {error}")
      try:
        connection.send(message)
      except (pickle.PicklingError, TypeError, AttributeError) as error:
        connection.send(("error", index, f"result cannot be sent back: {type(error).__name__}: {error}"))


@dataclasses.dataclass
class _Worker:
  process: multiprocessing.process.BaseProcess
  connection: mp_connection.Connection
  pending: collections.deque = dataclasses.field(default_factory=collections.deque)
  ready: bool = False
  last_progress: float = 0.0

  def deadline(self, timeout_s: float, warm_up_timeout_s: float) -> float:
    return self.last_progress + (timeout_s if self.ready else warm_up_timeout_s)

  def kill(self) -> None:
    self.process.kill()
    self.process.join(timeout=5.0)
    self.connection.close()


@contextlib.contextmanager
def _main_module_hidden():
  """Starts a worker without the parent's main module.

  A forkserver or spawn child first imports its parent's `__main__` (for `python -m dapo_jax.train`, the whole
  trainer: JAX, TensorFlow through clu, hundreds of MB and start-up banners per worker), so that functions
  defined there unpickle. Reward functions are importable module-level functions and the worker's entry point
  lives here, so the child needs none of it: while a worker starts, `__main__` is an empty module, which the
  child does not import; the forkserver, started by the first worker, then preloads only this module.
  """
  main = sys.modules["__main__"]
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


class RewardPool:
  """Worker processes for reward scoring, reused across calls (e.g. kept for a whole training run).

  Each worker scores one item at a time; the parent gives every item `timeout_s` seconds from the moment the
  worker reported the previous one. A worker past its deadline is killed (SIGKILL: a hung regex or sympy
  call cannot block it), its item is scored as wrong and counted as timed out, the rest of its chunk is
  queued again, and a fresh worker replaces it. Workers start with the "forkserver" method where the platform
  has it, else "spawn": never by forking this (JAX-holding) process. As with any multiprocessing start
  method other than fork, the main module must be import-safe (`if __name__ == "__main__":`).

  Reward functions cross to the workers by pickle: they must be importable module-level functions.
  Optional function attributes: `warm_up` (called once per worker before its first item, bounded by
  `warm_up_timeout_s`, e.g. to import sympy) and `requires_isolation` (refuse in-process scoring).
  Workers are daemonic: they die with this process, and cannot start processes of their own.
  """

  def __init__(self, num_workers: int = DEFAULT_NUM_WORKERS, *, start_method: str | None = None):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1 for a pool, got {num_workers} (use score_batch with "
                       "num_workers=0 to score in-process)")
    if start_method is None:
      start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if start_method == "fork":
      raise ValueError("start_method 'fork' would copy the JAX runtime into workers: use forkserver or spawn")
    self.num_workers = num_workers
    self._context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
      self._context.set_forkserver_preload([__name__])
    self._workers: list[_Worker] = []
    self._closed = False

  def __enter__(self) -> RewardPool:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Stops the workers (politely, then by force)."""
    for worker in self._workers:
      try:
        worker.connection.send(None)
      except (OSError, ValueError):
        pass
    for worker in self._workers:
      worker.process.join(timeout=2.0)
      if worker.process.is_alive():
        worker.process.kill()
        worker.process.join(timeout=5.0)
      worker.connection.close()
    self._workers = []
    self._closed = True

  def _start_worker(self) -> _Worker:
    parent_end, child_end = self._context.Pipe(duplex=True)
    process = self._context.Process(target=_worker_main, args=(child_end,), daemon=True,
                                    name="dapo-reward-worker")
    with _main_module_hidden():
      process.start()
    child_end.close()
    return _Worker(process=process, connection=parent_end)

  def _replace(self, worker: _Worker) -> None:
    worker.kill()
    self._workers.remove(worker)

  def _abort_busy_workers(self) -> None:
    """Kills workers still holding items, so the next call starts from a clean state."""
    for worker in [worker for worker in self._workers if worker.pending]:
      self._replace(worker)

  def score(self, solutions: Sequence[str], ground_truths: Sequence[str], *,
            data_sources: Sequence[str] | None = None, score_fns: Mapping[str, ScoreFn] | None = None,
            default_score_fn: ScoreFn | None = math_dapo_score, timeout_s: float = DEFAULT_TIMEOUT_S,
            warm_up_timeout_s: float = DEFAULT_WARM_UP_TIMEOUT_S, on_error: str = "raise",
            failure_score: float = -1.0, chunk_size: int | None = None) -> BatchScores:
    """Scores a batch in the workers; see `score_batch` for the arguments."""
    if self._closed:
      raise RuntimeError("RewardPool is closed")
    _check_batch_args(solutions, ground_truths, timeout_s, on_error)
    fns = resolve_score_fns(len(solutions), data_sources, score_fns, default_score_fn)
    _check_picklable(fns)
    tasks = list(zip(range(len(solutions)), fns, solutions, ground_truths))
    try:
      return self._run(tasks, timeout_s, warm_up_timeout_s, on_error, failure_score, chunk_size)
    except BaseException:
      self._abort_busy_workers()
      raise

  def _run(self, tasks: list[tuple], timeout_s: float, warm_up_timeout_s: float, on_error: str,
           failure_score: float, chunk_size: int | None) -> BatchScores:
    if chunk_size is None:
      # About four chunks per worker balances the load; small chunks also limit what a kill re-queues.
      chunk_size = max(1, min(256, math.ceil(len(tasks) / (4 * self.num_workers))))
    run = _BatchRun(tasks, chunk_size, on_error, failure_score)
    while run.remaining:
      self._assign_chunks(run)
      busy = [worker for worker in self._workers if worker.pending]
      next_deadline = min(worker.deadline(timeout_s, warm_up_timeout_s) for worker in busy)
      # Wakes on a message, on a worker's death (its sentinel) or at the earliest deadline.
      mp_connection.wait([worker.connection for worker in busy] + [worker.process.sentinel for worker in busy],
                         timeout=max(0.0, next_deadline - time.monotonic()))
      for worker in busy:
        run.drain(worker)
        if worker.pending and not worker.process.is_alive():
          if not worker.ready:
            raise RewardWorkerStartupError(
                f"a reward worker exited with code {worker.process.exitcode} before it was ready (its stderr "
                "says why; the main module must be importable by the workers)")
          run.fail_current(worker, f"worker process exited with code {worker.process.exitcode}", False)
          self._replace(worker)
      now = time.monotonic()
      for worker in [worker for worker in self._workers if worker.pending]:
        if now >= worker.deadline(timeout_s, warm_up_timeout_s):
          if not worker.ready:
            names = sorted({_function_name(fn) for _, fn, _, _ in worker.pending})
            raise RewardWorkerStartupError(f"a reward worker did not start and warm up {names} within "
                                           f"warm_up_timeout_s={warm_up_timeout_s} s")
          run.fail_current(worker, "", True)
          self._replace(worker)
    return run.batch_scores()

  def _assign_chunks(self, run: _BatchRun) -> None:
    """Tops the pool up to `num_workers` live workers and gives each idle one the next chunk."""
    for worker in [worker for worker in self._workers if not worker.pending]:
      if not worker.process.is_alive():
        self._replace(worker)  # Died while idle (killed from outside): a send to it would fail.
    while len(self._workers) < self.num_workers:
      self._workers.append(self._start_worker())
    for worker in self._workers:
      if not worker.pending and run.queue:
        chunk = run.queue.popleft()
        worker.pending.extend(chunk)
        worker.ready = False
        worker.last_progress = time.monotonic()
        worker.connection.send(chunk)


class _BatchRun:
  """The bookkeeping of one `RewardPool.score` call: queued chunks, results, timeouts and errors."""

  def __init__(self, tasks: list[tuple], chunk_size: int, on_error: str, failure_score: float):
    self.tasks = tasks
    self.queue = collections.deque(tasks[start:start + chunk_size] for start in range(0, len(tasks), chunk_size))
    self.results: list[dict[str, Any] | None] = [None] * len(tasks)
    self.timed_out: list[int] = []
    self.errors: list[tuple[int, str]] = []
    self.remaining = len(tasks)
    self.on_error = on_error
    self.failure_score = failure_score

  def _record(self, index: int, result: dict[str, Any]) -> None:
    self.results[index] = result
    self.remaining -= 1

  def _record_error(self, index: int, detail: str) -> None:
    message = _error_message(index, self.tasks[index][1], detail)
    if self.on_error == "raise":
      raise RewardFunctionError(message)
    self.errors.append((index, message))
    self._record(index, _failed_result(self.failure_score))

  def drain(self, worker: _Worker) -> None:
    """Takes every message the worker has sent so far."""
    try:
      while worker.pending and worker.connection.poll():
        kind, index, payload = worker.connection.recv()
        worker.last_progress = time.monotonic()
        if kind == "ready":
          worker.ready = True
        elif kind == "warm_up_error":
          raise RewardWorkerStartupError(f"a reward worker failed to warm up {payload}")
        else:
          worker.pending.popleft()
          if kind == "ok":
            self._record(index, payload)
          else:
            self._record_error(index, payload)
    except (EOFError, OSError):
      pass  # The worker died mid-message: the caller sees it from the process.

  def fail_current(self, worker: _Worker, detail: str, is_timeout: bool) -> None:
    """Scores the worker's current item as failed and queues the rest of its chunk again (first in line)."""
    index = worker.pending.popleft()[0]
    if worker.pending:
      self.queue.appendleft(list(worker.pending))
      worker.pending.clear()
    if is_timeout:
      self.timed_out.append(index)
      self._record(index, _failed_result(self.failure_score))
    else:
      self._record_error(index, detail)

  def batch_scores(self) -> BatchScores:
    return BatchScores(results=self.results, timed_out_indices=tuple(sorted(self.timed_out)),
                       errors=tuple(sorted(self.errors)))


def _check_picklable(fns: Sequence[ScoreFn]) -> None:
  """Reward functions travel to workers by reference: fail here, naming the function, if one cannot."""
  for fn in set(fns):
    try:
      pickle.dumps(fn)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
      raise TypeError(f"reward function {fn!r} cannot be sent to worker processes: it must be a module-level "
                      f"function importable by name ({error})") from error


def score_batch(solutions: Sequence[str], ground_truths: Sequence[str], *,
                data_sources: Sequence[str] | None = None, score_fns: Mapping[str, ScoreFn] | None = None,
                default_score_fn: ScoreFn | None = math_dapo_score, num_workers: int | None = None,
                pool: RewardPool | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                warm_up_timeout_s: float = DEFAULT_WARM_UP_TIMEOUT_S, on_error: str = "raise",
                failure_score: float = -1.0) -> BatchScores:
  """Scores `solutions` against `ground_truths`, each item within `timeout_s` seconds.

  Args:
    solutions: decoded responses.
    ground_truths: reference answers, one per solution.
    data_sources: optional per-item data source; item i is scored by `score_fns[data_sources[i]]`, or by
      `default_score_fn` when the table has no entry (KeyError when neither exists).
    score_fns: dispatch table `{data_source: fn}`, e.g. with `load_reward_function(reward.function)`.
    default_score_fn: the function for items without a table entry (`math_dapo_score`).
    num_workers: worker processes; 0 scores in this process with no time bound (small batches, tests).
      Defaults to the pool's size when `pool` is given, else `DEFAULT_NUM_WORKERS`.
    pool: a `RewardPool` to reuse; without one, a temporary pool is started and stopped.
    timeout_s: per-item bound; an item past it scores `failure_score`, acc False, pred None, and is counted.
    warm_up_timeout_s: bound on a worker's start-up and warm-up (RewardWorkerStartupError past it).
    on_error: "raise" (RewardFunctionError) or "wrong" (score `failure_score`, counted in `errors`) when a
      reward function raises or its worker dies.
    failure_score: the score of a timed-out or failed item (-1, math_dapo's wrong answer).

  Returns:
    BatchScores with the results in input order, the timed-out indices and the errors.
  """
  if pool is not None:
    if num_workers not in (None, pool.num_workers):
      raise ValueError(f"num_workers={num_workers} disagrees with the given pool's {pool.num_workers}")
    num_workers = pool.num_workers
  elif num_workers is None:
    num_workers = DEFAULT_NUM_WORKERS
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  options = dict(data_sources=data_sources, score_fns=score_fns, default_score_fn=default_score_fn,
                 timeout_s=timeout_s, on_error=on_error, failure_score=failure_score)
  if num_workers == 0:
    _check_batch_args(solutions, ground_truths, timeout_s, on_error)
    fns = resolve_score_fns(len(solutions), data_sources, score_fns, default_score_fn)
    return _score_in_process(fns, solutions, ground_truths, on_error, failure_score)
  if pool is not None:
    return pool.score(solutions, ground_truths, warm_up_timeout_s=warm_up_timeout_s, **options)
  with RewardPool(num_workers) as temporary_pool:
    return temporary_pool.score(solutions, ground_truths, warm_up_timeout_s=warm_up_timeout_s, **options)
