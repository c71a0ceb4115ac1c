"""Metric reductions: validation accuracy over n samples per problem (docs/algorithm.md sections 8 and 10).

For a problem with n samples, values v_1..v_n (the 0/1 accuracies) of which c are correct:
  * mean@n (avg@n): the mean of the values; std@n their (population) standard deviation.
  * pass@k: the unbiased estimator 1 - C(n - c, k) / C(n, k) of "at least one of k samples is correct"
    (Chen et al. 2021), k samples drawn without replacement from the n.
  * best@k / worst@k: the largest / smallest value of k samples drawn with replacement; `/mean` is its
    expectation, `/std` its standard deviation over draws. With the values sorted, v_(1) <= ... <= v_(n),
    P(max = v_(i)) = (i/n)^k - ((i-1)/n)^k, so for 0/1 values best@k/mean = 1 - (1 - c/n)^k.
  * maj@k: the value of the majority answer of k samples drawn with replacement (`/mean`, `/std` as above).
    Ties between answers drawn equally often go to the answer drawn first, as in verl's `calc_maj_val` (the
    first key to reach the top count in its insertion-ordered dict); over draws that is each tied answer with
    equal probability. The value of the winning answer is that of its first drawn sample: in expectation the
    mean value of the samples that gave the answer (samples with equal answers have equal accuracy under
    exact matching, so this only matters for graded rewards). `None` (no extractable answer) is one answer.
verl estimates best@k, worst@k and maj@k with a bootstrap of 1000 draws per problem and k
(`metric_utils.bootstrap_metric`); we compute the quantities that bootstrap estimates exactly, so ours differ
from a verl run on the same samples by verl's bootstrap noise only.
"""
from collections import defaultdict
from collections.abc import Iterable, Sequence
import dataclasses
import functools
import math

import numpy as np

# verl's metric sections (`RayPPOTrainer._validate`): the headline numbers, and everything else.
CORE_PREFIX = "val-core"
AUX_PREFIX = "val-aux"
# The statistics that go to the core section when taken at k = n (verl: names starting with these).
_CORE_STATISTICS = ("mean@", "best@", "maj@")


def k_values(num_samples: int) -> list[int]:
  """1, 2, 4, ... up to num_samples, and num_samples itself: the k of pass@k."""
  ks = [2 ** i for i in range(int(math.log2(num_samples)) + 1)] if num_samples >= 1 else []
  if ks and ks[-1] != num_samples:
    ks.append(num_samples)
  return ks


def bootstrap_k_values(num_samples: int) -> list[int]:
  """2, 4, 8, ... below num_samples, and num_samples itself; none for one sample: the k of best@k, worst@k and
  maj@k, as verl's `process_validation_metrics` picks them (k = 1 would repeat mean@n)."""
  return [k for k in k_values(num_samples) if k > 1]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """Unbiased pass@k = 1 - C(n - c, k) / C(n, k), as a numerically stable product."""
  if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={num_samples} c={num_correct} k={k}")
  if num_samples - num_correct < k:
    return 1.0
  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
  return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def extreme_of_k(values: np.ndarray, ks: Sequence[int], *, largest: bool) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard deviation of the largest (or smallest) of k values drawn with replacement, exactly.

  Args:
    values: [..., n] the samples' values (any real numbers), one row per problem.
    ks: the draw sizes.
    largest: max (best@k) or min (worst@k).

  Returns:
    (mean, std), each [..., len(ks)].
  """
  values = np.sort(np.asarray(values, np.float64), axis=-1)
  if not largest:
    values = values[..., ::-1]  # the min of the values is the max of their order reversed, weight for weight
  n = values.shape[-1]
  fractions = np.arange(n + 1) / n
  ks = np.asarray(ks, np.float64)[:, None]
  # P(the extreme is the i-th of the ordered values) = (i/n)^k - ((i-1)/n)^k: [len(ks), n].
  weights = np.diff(fractions[None, :] ** ks, axis=-1)
  mean = values @ weights.T
  # The variance as E[(v - mean)^2], not E[v^2] - mean^2, which cancels to rounding noise when v is constant.
  variance = np.einsum("...kn,kn->...k", (values[..., None, :] - mean[..., :, None]) ** 2, weights)
  return mean, np.sqrt(variance)


def _truncated_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The product of power series in z (coefficients on the last axis), cut at the arrays' degree."""
  degree = a.shape[-1]
  out = np.zeros(np.broadcast_shapes(a.shape, b.shape))
  for i in range(degree):
    out[..., i:] += a[..., i:i + 1] * b[..., :degree - i]
  return out


def _power(series: np.ndarray, exponent: int) -> np.ndarray | None:
  """series**exponent (truncated), by squaring; None for exponent 0 (the series 1)."""
  result = None
  while exponent:
    if exponent & 1:
      result = series if result is None else _truncated_product(result, series)
    exponent >>= 1
    if exponent:
      series = _truncated_product(series, series)
  return result


def _times(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
  if a is None or b is None:
    return b if a is None else a
  return _truncated_product(a, b)


@functools.lru_cache(maxsize=4096)
def _win_probabilities(multiplicities: tuple[int, ...], max_k: int) -> tuple[tuple[int, ...], np.ndarray]:
  """P(one given answer with each multiplicity wins the vote of k draws), for k = 0..max_k.

  `multiplicities` are the answers' sample counts (sorted; n is their sum). Draw probabilities depend only on
  them, so answers with equal counts win equally often and the result depends on nothing else (hence the
  cache: a validation set's problems share few count patterns). Returns (the distinct counts, P[count, k]).

  For k draws the answers' counts x are multinomial, P(x) = k! prod_b p_b^x_b / x_b! with p_b = n_b / n.
  Answer a wins when x_a = c is the largest count, shared by J other answers, with probability 1 / (J + 1)
  (ties go to whichever tied answer is drawn first; exchangeable draws make each equally likely), and
  1 / (J + 1) = integral_0^1 u^J du. So
    P(a wins) = k! sum_c p_a^c / c! integral_0^1 [z^(k-c)] prod_{b != a} g_b(z; c, u) du,
    g_b(z; c, u) = sum_{x < c} (p_b z)^x / x! + u (p_b z)^c / c!,
  where the marker u counts the answers tied at c. The integrand is a polynomial in u of degree below the
  number of answers, which Gauss-Legendre quadrature integrates exactly; every term is non-negative, so the
  sums lose no precision to cancellation. The work grows about as max_k^4 (products of degree-max_k series for
  max_k winner counts at up to max_k / 2 quadrature nodes): made for validation's tens of samples a problem.
  """
  n, num_answers = sum(multiplicities), len(multiplicities)
  classes = tuple(sorted(set(multiplicities)))
  repeats = [multiplicities.count(m) for m in classes]
  degree = max_k + 1  # power-series coefficients z^0 .. z^max_k
  x = np.arange(degree)
  inverse_factorial = np.array([1.0 / math.factorial(i) for i in range(degree)])
  tie_degree = min(num_answers - 1, max_k - 1)
  nodes, weights = np.polynomial.legendre.leggauss(tie_degree // 2 + 1)
  u, w = (nodes + 1.0) / 2.0, weights / 2.0
  c = np.arange(1, max_k + 1)  # the winner's count
  below = (x[None, :] < c[:, None]).astype(np.float64)  # [c, x]
  at = (x[None, :] == c[:, None]).astype(np.float64)
  marker = below[:, None, :] + at[:, None, :] * u[None, :, None]  # [c, node, x]

  series = []  # g for an answer of each class: [c, node, x]
  for m in classes:
    series.append(marker * ((m / n) ** x * inverse_factorial)[None, None, :])
  others = []  # prod over every answer of the class but one: g^(r-1)
  whole = []   # prod over every answer of the class: g^r
  for g, r in zip(series, repeats):
    others.append(_power(g, r - 1))
    whole.append(_times(others[-1], g))
  prefix, suffix = [None], [None]
  for i in range(len(classes) - 1):
    prefix.append(_times(prefix[-1], whole[i]))
    suffix.append(_times(suffix[-1], whole[len(classes) - 1 - i]))
  suffix.reverse()

  k = np.arange(degree)
  remaining = k[None, :] - c[:, None]  # [c, k]: the others' total draws, k - c
  valid = remaining >= 0
  factorial_k = np.array([float(math.factorial(i)) for i in range(degree)])
  win = np.zeros((len(classes), degree))
  for i, m in enumerate(classes):
    product = _times(_times(prefix[i], suffix[i]), others[i])
    if product is None:  # the only answer: it wins every draw
      win[i, 1:] = 1.0
      continue
    integral = np.einsum("q,cqx->cx", w, product)  # [c, z-degree]
    coefficient = np.where(valid, integral[np.arange(max_k)[:, None], np.where(valid, remaining, 0)], 0.0)
    own = (m / n) ** c * inverse_factorial[c]  # p_a^c / c!
    win[i] = factorial_k * (own[:, None] * coefficient).sum(axis=0)
  win.setflags(write=False)  # shared by every caller through the cache
  return classes, win


def majority_vote(predictions: Sequence[str | None], values: Sequence[float],
                  ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard deviation over draws of maj@k (see the module docstring for the rule), exactly.

  Args:
    predictions: each sample's answer (None: no answer, which votes like any other answer).
    values: each sample's value (its accuracy).
    ks: the draw sizes, each >= 1.

  Returns:
    (mean, std), each [len(ks)].
  """
  if len(predictions) != len(values) or not predictions:
    raise ValueError(f"majority_vote needs one value per prediction, at least one; got {len(predictions)} "
                     f"predictions and {len(values)} values")
  if min(ks) < 1:
    raise ValueError(f"majority_vote: every k must be >= 1, got {list(ks)}")
  by_answer: dict[str | None, list[float]] = defaultdict(list)
  for pred, value in zip(predictions, values):
    by_answer[pred].append(float(value))
  groups = [np.asarray(v) for v in by_answer.values()]
  counts = [len(v) for v in groups]
  classes, win = _win_probabilities(tuple(sorted(counts)), max(ks))
  row = {m: i for i, m in enumerate(classes)}
  wins = [win[row[len(group)], list(ks)] for group in groups]  # P(this answer wins), [len(ks)] each
  mean = sum(p * group.mean() for p, group in zip(wins, groups))
  # E[(v - mean)^2]: the winner's value is a uniform draw from its group's values.
  variance = sum(p * ((group[:, None] - mean[None, :]) ** 2).mean(axis=0) for p, group in zip(wins, groups))
  return mean, np.sqrt(variance)


def is_core_metric(name: str, num_samples: int) -> bool:
  """Whether verl files the statistic `name` (e.g. "maj@32/mean") of a data source's `acc` under val-core.

  verl's rule (`_validate`): names starting with mean, maj or best whose k is the largest, n; so mean@n,
  best@n/{mean,std} and maj@n/{mean,std} are core and every other k, std@n, worst@k and our pass@k are aux.
  """
  if not name.startswith(_CORE_STATISTICS):
    return False
  return int(name.split("@", 1)[1].split("/", 1)[0]) == num_samples


def metric_key(data_source: str, name: str, num_samples: int, *, prefix: str = CORE_PREFIX,
               aux_prefix: str = AUX_PREFIX) -> str:
  """The full name `validation_metrics` gives statistic `name` (e.g. "pass@4") of `data_source`'s accuracy."""
  section = prefix if is_core_metric(name, num_samples) else aux_prefix
  return f"{section}/{data_source}/acc/{name}"


def at_k(metrics: dict[str, float], data_source: str, statistic: str, k: int, num_samples: int, *,
         prefix: str = CORE_PREFIX, aux_prefix: str = AUX_PREFIX) -> float:
  """The expected value of `statistic` ("pass", "best", "worst" or "maj") at k from `validation_metrics`' output,
  for tables by k: best@1, worst@1 and maj@1 (one draw, whose value is the mean, so not computed) are mean@n."""
  if statistic == "pass":
    name = f"pass@{k}"
  elif k == 1:
    name = f"mean@{num_samples}"
  else:
    name = f"{statistic}@{k}/mean"
  return metrics[metric_key(data_source, name, num_samples, prefix=prefix, aux_prefix=aux_prefix)]


@dataclasses.dataclass
class SampleResult:
  """One validation sample: which problem (of which data source) and how it scored."""
  data_source: str
  problem_id: str
  acc: float
  pred: str | None = None


def validation_metrics(results: Iterable[SampleResult], *, prefix: str = CORE_PREFIX,
                       aux_prefix: str = AUX_PREFIX) -> dict[str, float]:
  """verl's validation metrics of each data source's accuracy, averaged over its problems, plus pass@k.

  With n samples per problem, the names are `{section}/{data_source}/acc/{statistic}` for the statistics
  mean@n, std@n (n > 1), pass@k (k in `k_values(n)`), and best@k, worst@k and maj@k, each `/mean` and `/std`
  (k in `bootstrap_k_values(n)`); the section is `prefix` (verl's val-core) for mean@n, best@n/* and maj@n/*,
  and `aux_prefix` (val-aux) for the rest (`is_core_metric`). Every problem of a source must have the same n.
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
    accs = np.asarray([[s.acc for s in samples] for samples in problems], np.float64)  # [problems, n]
    stats = {f"mean@{n}": accs.mean()}
    if n > 1:
      stats[f"std@{n}"] = accs.std(axis=1).mean()
    for k in k_values(n):
      stats[f"pass@{k}"] = np.mean([pass_at_k(n, int(c), k) for c in (accs > 0).sum(axis=1)])
    ks = bootstrap_k_values(n)
    if ks:
      votes = [majority_vote([s.pred for s in samples], row, ks) for samples, row in zip(problems, accs)]
      per_k = {"best": extreme_of_k(accs, ks, largest=True), "worst": extreme_of_k(accs, ks, largest=False),
               "maj": (np.stack([m for m, _ in votes]), np.stack([s for _, s in votes]))}
      for i, k in enumerate(ks):
        for name, (mean, std) in per_k.items():
          stats[f"{name}@{k}/mean"] = mean[:, i].mean()
          stats[f"{name}@{k}/std"] = std[:, i].mean()
    for name, value in stats.items():
      metrics[metric_key(source, name, n, prefix=prefix, aux_prefix=aux_prefix)] = float(value)
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
