"""Validation metrics with hand-computed numbers."""
import itertools
import math
import time

import numpy as np
import pytest

from dapo_jax import metrics


def test_k_values():
  assert metrics.k_values(32) == [1, 2, 4, 8, 16, 32]
  assert metrics.k_values(6) == [1, 2, 4, 6]
  assert metrics.k_values(1) == [1]


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 0.25),
    (4, 1, 2, 1 - 3 / 6),        # 1 - C(3,2)/C(4,2)
    (4, 2, 2, 1 - 1 / 6),        # 1 - C(2,2)/C(4,2)
    (4, 3, 2, 1.0),              # fewer than k wrong samples: always a correct one
    (4, 0, 4, 0.0),
    (32, 8, 4, 1 - (24 * 23 * 22 * 21) / (32 * 31 * 30 * 29)),
])
def test_pass_at_k(n, c, k, expected):
  assert metrics.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_bad_counts():
  with pytest.raises(ValueError, match="pass_at_k"):
    metrics.pass_at_k(4, 5, 1)


def test_bootstrap_k_values_follow_verl():
  assert metrics.bootstrap_k_values(32) == [2, 4, 8, 16, 32]
  assert metrics.bootstrap_k_values(6) == [2, 4, 6]
  assert metrics.bootstrap_k_values(1) == []


def _best_at_k(values, k):
  return float(metrics.extreme_of_k(np.asarray(values, np.float64)[None], [k], largest=True)[0][0, 0])


def _worst_at_k(values, k):
  return float(metrics.extreme_of_k(np.asarray(values, np.float64)[None], [k], largest=False)[0][0, 0])


def _maj_at_k(predictions, accuracies, k):
  return float(metrics.majority_vote(predictions, accuracies, [k])[0][0])


def test_best_and_worst_at_k():
  # 1 of 4 correct: best@2 = 1 - (3/4)^2, a 0/1 outcome, so its std is sqrt(p (1 - p)).
  assert _best_at_k([1, 0, 0, 0], 2) == pytest.approx(7 / 16)
  mean, std = metrics.extreme_of_k(np.array([[1, 0, 0, 0]]), [2], largest=True)
  assert (mean[0, 0], std[0, 0]) == pytest.approx((7 / 16, math.sqrt(7 / 16 * 9 / 16)))
  assert _worst_at_k([1, 1, 0, 0], 2) == pytest.approx(1 / 4)  # both draws correct
  # Graded values 0, 0.5, 1, k = 2: P(max = 0) = 1/9, P(max <= 0.5) = 4/9, so P(max = 0.5) = 3/9, P(max = 1) = 5/9.
  assert _best_at_k([0, 0.5, 1], 2) == pytest.approx(0.5 * 3 / 9 + 5 / 9)
  # min: P(min = 1) = 1/9, P(min = 0.5) = 3/9.
  assert _worst_at_k([0, 0.5, 1], 2) == pytest.approx(1 / 9 + 0.5 * 3 / 9)
  mean, std = metrics.extreme_of_k(np.array([[3.0, 3.0]]), [1, 2], largest=False)
  np.testing.assert_array_equal(std, [[0.0, 0.0]])  # a constant has no spread, exactly


@pytest.mark.parametrize("k, expected", [
    (1, 2 / 3),                    # the one draw is a with probability 2/3
    (2, 4 / 9 + 0.5 * 4 / 9),      # aa: a; bb: b; ab or ba (4/9): a tie, won by the first drawn, a half the time
    (3, 3 * (2 / 3) ** 2 / 3 + (2 / 3) ** 3),  # a drawn at least twice: 12/27 + 8/27
])
def test_maj_at_k_by_hand(k, expected):
  assert _maj_at_k(["a", "a", "b"], [1, 1, 0], k) == pytest.approx(expected, abs=1e-12)
  mean, std = metrics.majority_vote(["a", "a", "b"], [1, 1, 0], [k])
  assert std[0] == pytest.approx(math.sqrt(expected * (1 - expected)), abs=1e-12)  # a 0/1 outcome


def test_maj_at_k_ties_go_to_the_answer_drawn_first():
  # [a, b], k = 2: aa (1/4) is right, bb (1/4) wrong, and of the tied ab / ba (1/2) the first draw wins: 1/2.
  # (Ties to the answer first in sample order, a, would give 3/4.)
  assert _maj_at_k(["a", "b"], [1, 0], 2) == pytest.approx(0.5)
  # [a, a, b, c], k = 3 (p = 1/2, 1/4, 1/4): a twice or more, 3/8 + 1/8; or one each of a, b, c
  # (3! / 4^2 / 2 = 3/16), a three-way tie a wins a third of the time.
  assert _maj_at_k(["a", "a", "b", "c"], [1, 1, 0, 0], 3) == pytest.approx(1 / 2 + 3 / 16 / 3)
  # k = 2: aa 1/4, and the a-b and a-c ties (1/4 each) half the time.
  assert _maj_at_k(["a", "a", "b", "c"], [1, 1, 0, 0], 2) == pytest.approx(1 / 4 + 1 / 8 + 1 / 8)


def test_maj_at_k_values_and_missing_answers():
  # Equal answers with different (graded) values: the winner's value is its first drawn sample's, 1 or 0.5.
  mean, std = metrics.majority_vote(["7", "7"], [1.0, 0.5], [1, 2])
  np.testing.assert_allclose(mean, [0.75, 0.75])
  np.testing.assert_allclose(std, [0.25, 0.25])
  # None votes like an answer: "5" must be drawn at least twice of three: 3 (1/3)^2 (2/3) + (1/3)^3 = 7/27.
  assert _maj_at_k([None, None, "5"], [0, 0, 1], 3) == pytest.approx(7 / 27)
  assert _maj_at_k(["5"] * 4, [1, 1, 1, 1], 3) == 1.0
  with pytest.raises(ValueError, match="one value per prediction"):
    metrics.majority_vote(["a"], [1, 0], [1])


def _verl_majority_value(draws):
  """verl's calc_maj_val on one bootstrap draw: the most common answer, ties to the one drawn first (dicts keep
  insertion order and max returns the first maximum), valued by its first drawn sample."""
  values_of = {}
  for pred, value in draws:
    values_of.setdefault(pred, []).append(value)
  winner = max(values_of, key=lambda pred: len(values_of[pred]))
  return values_of[winner][0]


def test_maj_mean_and_std_equal_verls_bootstrap_enumerated():
  rng = np.random.default_rng(0)
  for _ in range(40):
    n = int(rng.integers(1, 6))
    predictions = [rng.choice(["a", "b", "c", None]) for _ in range(n)]
    values = rng.choice([0.0, 0.25, 0.5, 1.0], size=n)
    ks = [1, 2, 3, 4]
    outcomes = [[_verl_majority_value([(predictions[i], values[i]) for i in draw])
                 for draw in itertools.product(range(n), repeat=k)] for k in ks]  # every draw, equally likely
    mean, std = metrics.majority_vote(predictions, values, ks)
    np.testing.assert_allclose(mean, [np.mean(o) for o in outcomes], rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, [np.std(o) for o in outcomes], rtol=0, atol=1e-12)


@pytest.mark.parametrize("counts", [(1,) * 32, (32,), (16, 16), (1, 1, 2, 3, 5, 8, 12), (4,) * 8, (1,) * 20 + (12,)])
def test_win_probabilities_of_32_samples_sum_to_one(counts):
  classes, win = metrics._win_probabilities(tuple(sorted(counts)), 32)  # pylint: disable=protected-access
  total = sum(win[classes.index(m)] * counts.count(m) for m in classes)
  np.testing.assert_allclose(total[1:], 1.0, rtol=0, atol=1e-12)
  if len(counts) == 2:  # two equal answers: each wins half the time at every k
    np.testing.assert_allclose(win[0, 1:], 0.5, atol=1e-12)


def test_validation_metrics_per_data_source():
  results = []
  for i, acc in enumerate([1, 0, 0, 0]):
    results.append(metrics.SampleResult("aime", "p1", acc, "5" if acc else str(i)))
  for _ in range(4):
    results.append(metrics.SampleResult("aime", "p2", 1, "12"))
  results += [metrics.SampleResult("amc", "q1", 0, "3"), metrics.SampleResult("amc", "q1", 1, "4")]
  out = metrics.validation_metrics(results)
  core, aux = "val-core/aime/acc", "val-aux/aime/acc"
  assert out[f"{core}/mean@4"] == pytest.approx((0.25 + 1) / 2)
  assert out[f"{aux}/std@4"] == pytest.approx((math.sqrt(0.25 * 0.75) + 0) / 2)
  assert out[f"{aux}/pass@1"] == pytest.approx((0.25 + 1) / 2)
  assert out[f"{aux}/pass@2"] == pytest.approx((0.5 + 1) / 2)
  assert out[f"{aux}/pass@4"] == pytest.approx(1.0)
  assert out[f"{aux}/best@2/mean"] == pytest.approx((1 - 0.75 ** 2 + 1) / 2)
  assert out[f"{core}/best@4/mean"] == pytest.approx((1 - 0.75 ** 4 + 1) / 2)
  assert out[f"{aux}/worst@2/mean"] == pytest.approx((0.25 ** 2 + 1) / 2)
  # p1's answers 5, 1, 2, 3 are all different: every draw of k ties or picks by count, and "5" (1 of 4 samples)
  # wins as often as each wrong answer, 1/4 of the time at every k (the four answers are exchangeable).
  assert out[f"{core}/maj@4/mean"] == pytest.approx((0.25 + 1) / 2)
  assert out[f"{core}/maj@4/std"] == pytest.approx((math.sqrt(0.25 * 0.75) + 0) / 2)
  assert out["val-core/amc/acc/mean@2"] == pytest.approx(0.5)
  assert out["val-aux/amc/acc/pass@2"] == pytest.approx(1.0)
  assert out["val-core/amc/acc/maj@2/mean"] == pytest.approx(0.5)  # 3 and 4 tie half the time: symmetric
  # verl's split: core holds mean@n, best@n and maj@n (each /mean and /std); the rest is aux.
  assert {k[len(core) + 1:] for k in out if k.startswith(core)} == {
      "mean@4", "best@4/mean", "best@4/std", "maj@4/mean", "maj@4/std"}
  assert {k[len(aux) + 1:] for k in out if k.startswith(aux)} == {
      "std@4", "pass@1", "pass@2", "pass@4", "best@2/mean", "best@2/std", "worst@2/mean", "worst@2/std",
      "worst@4/mean", "worst@4/std", "maj@2/mean", "maj@2/std"}


def test_validation_metrics_of_one_sample_and_custom_sections():
  out = metrics.validation_metrics([metrics.SampleResult("s", "p", 1.0, "1")], prefix="eval-core",
                                   aux_prefix="eval-aux")
  assert out == {"eval-core/s/acc/mean@1": 1.0, "eval-aux/s/acc/pass@1": 1.0}


def test_metric_key_names_the_section():
  assert metrics.metric_key("aime", "maj@32/mean", 32) == "val-core/aime/acc/maj@32/mean"
  assert metrics.metric_key("aime", "maj@16/mean", 32) == "val-aux/aime/acc/maj@16/mean"
  assert metrics.metric_key("aime", "pass@32", 32) == "val-aux/aime/acc/pass@32"
  assert metrics.metric_key("aime", "worst@32/mean", 32) == "val-aux/aime/acc/worst@32/mean"
  assert metrics.metric_key("aime", "std@32", 32) == "val-aux/aime/acc/std@32"
  assert metrics.metric_key("aime", "mean@32", 32) == "val-core/aime/acc/mean@32"


def test_at_k_reads_tables_by_k():
  results = [metrics.SampleResult("s", "p", acc, pred) for acc, pred in [(1, "a"), (1, "a"), (0, "b"), (0, "c")]]
  out = metrics.validation_metrics(results)
  assert metrics.at_k(out, "s", "pass", 1, 4) == out["val-aux/s/acc/pass@1"] == pytest.approx(0.5)
  assert metrics.at_k(out, "s", "maj", 1, 4) == out["val-core/s/acc/mean@4"]  # one draw: the mean
  assert metrics.at_k(out, "s", "best", 2, 4) == out["val-aux/s/acc/best@2/mean"] == pytest.approx(0.75)
  assert metrics.at_k(out, "s", "maj", 4, 4) == out["val-core/s/acc/maj@4/mean"]


def _random_results(num_problems: int, n: int, num_answers: int, seed: int = 0) -> list:
  rng = np.random.default_rng(seed)
  return [metrics.SampleResult("aime", str(p), float(a == 0), str(a))
          for p in range(num_problems) for a in rng.integers(0, num_answers, size=n)]


def test_validation_metrics_of_200_problems_by_4_samples_is_fast():
  results = _random_results(200, 4, 4)
  metrics._win_probabilities.cache_clear()  # pylint: disable=protected-access  (time the vote computation too)
  start = time.perf_counter()
  out = metrics.validation_metrics(results)
  elapsed = time.perf_counter() - start
  assert elapsed <= 0.5, f"validation_metrics took {elapsed:.2f} s on 200 problems x 4 samples"
  assert 0 < out["val-core/aime/acc/maj@4/mean"] < 1


def test_unequal_sample_counts_are_an_error():
  results = [metrics.SampleResult("aime", "p1", 1), metrics.SampleResult("aime", "p2", 1),
             metrics.SampleResult("aime", "p2", 0)]
  with pytest.raises(ValueError, match="different sample counts"):
    metrics.validation_metrics(results)


def test_read_scalars_keeps_the_newest_write_of_a_step(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  killed = metric_writers.create_default_writer(str(tmp_path), just_logging=False)
  killed.write_scalars(1, {"loss": 1.0})
  killed.write_scalars(2, {"loss": 2.0})  # flushed, then the run dies before checkpointing step 2
  killed.close()
  time.sleep(1.1)  # event file names carry the time in seconds: the resumed run's file sorts after
  resumed = metric_writers.create_default_writer(str(tmp_path), just_logging=False)
  resumed.write_scalars(2, {"loss": 2.5})
  resumed.write_scalars(3, {"loss": 3.0})
  resumed.close()
  assert metrics.read_scalars(str(tmp_path))["loss"] == [(1, 1.0), (2, 2.5), (3, 3.0)]
