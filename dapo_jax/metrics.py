"""Metric reductions: validation accuracy over k samples per problem (DAPO_SPEC.md sections 8 and 10).

For a problem with n samples of which c are correct:
  * mean@n (avg@n): c / n, averaged over problems (AIME's avg@32).
  * pass@k: the unbiased estimator 1 - C(n - c, k) / C(n, k) of "at least one of k samples is correct"
    (Chen et al. 2021), k samples drawn without replacement from the n.
  * best@k: the expected best accuracy of k samples drawn with replacement, 1 - (1 - c / n)^k; verl estimates the
    same quantity by bootstrap, we compute it exactly.
  * maj@k: the expected accuracy of the majority answer of k samples drawn with replacement (ties go to the
    answer seen first), estimated by a seeded bootstrap as verl does.
"""
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
import dataclasses
import math

import numpy as np


def k_values(num_samples: int) -> list[int]:
  """1, 2, 4, ... up to num_samples, and num_samples itself."""
  ks = [2 ** i for i in range(int(math.log2(num_samples)) + 1)] if num_samples >= 1 else []
  if ks and ks[-1] != num_samples:
    ks.append(num_samples)
  return ks


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """Unbiased pass@k = 1 - C(n - c, k) / C(n, k), as a numerically stable product."""
  if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={num_samples} c={num_correct} k={k}")
  if num_samples - num_correct < k:
    return 1.0
  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
  return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def best_at_k(accuracies: Sequence[float], k: int) -> float:
  """Expected max accuracy of k samples drawn with replacement, for 0/1 accuracies: 1 - (1 - mean)^k."""
  return float(1.0 - (1.0 - np.mean(accuracies)) ** k)


def maj_at_k(predictions: Sequence[str | None], accuracies: Sequence[float], k: int, *, num_bootstrap: int = 1000,
             seed: int = 42) -> float:
  """Expected accuracy of the most common prediction among k samples drawn with replacement (bootstrap)."""
  rng = np.random.default_rng(seed)
  n = len(predictions)
  total = 0.0
  accuracy_of = {}
  for pred, acc in zip(predictions, accuracies):
    accuracy_of.setdefault(pred, acc)  # equal predictions have equal accuracy under exact matching
  for _ in range(num_bootstrap):
    picked = rng.integers(0, n, size=k)
    majority, _ = Counter(predictions[i] for i in picked).most_common(1)[0]
    total += accuracy_of[majority]
  return total / num_bootstrap


@dataclasses.dataclass
class SampleResult:
  """One validation sample: which problem (of which data source) and how it scored."""
  data_source: str
  problem_id: str
  acc: float
  pred: str | None = None


def validation_metrics(results: Iterable[SampleResult], *, prefix: str = "val-core") -> dict[str, float]:
  """`{prefix}/{data_source}/acc/{mean@n, best@k, maj@k, pass@k}` averaged over each source's problems.

  Every problem of a source must have the same number of samples n; k runs over `k_values(n)`.
  """
  by_problem: dict[tuple[str, str], list[SampleResult]] = defaultdict(list)
  for r in results:
    by_problem[(r.data_source, r.problem_id)].append(r)
  by_source: dict[str, list[list[SampleResult]]] = defaultdict(list)
  for (source, _), samples in by_problem.items():
    by_source[source].append(samples)
  metrics = {}
  for source, problems in sorted(by_source.items()):
    counts = {len(samples) for samples in problems}
    if len(counts) != 1:
      raise ValueError(f"data source {source!r}: problems have different sample counts {sorted(counts)}")
    n = counts.pop()
    accs = [np.asarray([s.acc for s in samples], np.float64) for samples in problems]
    preds = [[s.pred for s in samples] for samples in problems]
    key = f"{prefix}/{source}/acc"
    metrics[f"{key}/mean@{n}"] = float(np.mean([a.mean() for a in accs]))
    for k in k_values(n):
      metrics[f"{key}/pass@{k}"] = float(np.mean([pass_at_k(n, int((a > 0).sum()), k) for a in accs]))
      metrics[f"{key}/best@{k}"] = float(np.mean([best_at_k(a, k) for a in accs]))
      metrics[f"{key}/maj@{k}"] = float(np.mean([maj_at_k(p, a, k) for p, a in zip(preds, accs)]))
  return metrics


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar a run wrote to its TensorBoard event files: {tag: [(step, value), ...]} in step order.

  A step written more than once (a run killed after writing it but before its checkpoint, then resumed, writes
  it again) keeps the newest value, as TensorBoard shows it.
  """
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  out = {}
  for tag in accumulator.Tags()["tensors"]:
    values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)]
    if all(v.ndim == 0 and v.dtype.kind == "f" for _, v in values):  # scalars, not texts or histograms
      newest = {step: float(v) for step, v in values}  # event files are read oldest first
      out[tag] = sorted(newest.items())
  return out
