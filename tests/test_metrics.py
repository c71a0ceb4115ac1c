"""Validation metrics with hand-computed numbers."""
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


def test_best_and_maj_at_k():
  assert metrics.best_at_k([1, 0, 0, 0], 2) == pytest.approx(1 - 0.75 ** 2)
  assert metrics.maj_at_k(["5"] * 4, [1, 1, 1, 1], 3) == 1.0
  # One draw: the majority is the drawn answer, correct with probability 2/4 (bootstrap of 1000, seeded).
  assert metrics.maj_at_k(["5", "5", "7", "9"], [1, 1, 0, 0], 1) == pytest.approx(0.5, abs=0.05)


def test_validation_metrics_per_data_source():
  results = []
  for i, acc in enumerate([1, 0, 0, 0]):
    results.append(metrics.SampleResult("aime", "p1", acc, "5" if acc else str(i)))
  for _ in range(4):
    results.append(metrics.SampleResult("aime", "p2", 1, "12"))
  results += [metrics.SampleResult("amc", "q1", 0, "3"), metrics.SampleResult("amc", "q1", 1, "4")]
  out = metrics.validation_metrics(results)
  assert out["val-core/aime/acc/mean@4"] == pytest.approx((0.25 + 1) / 2)
  assert out["val-core/aime/acc/pass@1"] == pytest.approx((0.25 + 1) / 2)
  assert out["val-core/aime/acc/pass@2"] == pytest.approx((0.5 + 1) / 2)
  assert out["val-core/aime/acc/pass@4"] == pytest.approx(1.0)
  assert out["val-core/aime/acc/best@2"] == pytest.approx((1 - 0.75 ** 2 + 1) / 2)
  assert out["val-core/amc/acc/mean@2"] == pytest.approx(0.5)
  assert out["val-core/amc/acc/pass@2"] == pytest.approx(1.0)
  assert set(k.split("/")[-1] for k in out if k.startswith("val-core/aime")) == {
      "mean@4", "pass@1", "pass@2", "pass@4", "best@1", "best@2", "best@4", "maj@1", "maj@2", "maj@4"}


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
