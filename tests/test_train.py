"""End to end: a scaled-down embedded default learns, and writes the spec's metrics."""
import os
import subprocess
import sys

import pytest

from dapo_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The spec-10 metrics that apply to the embedded default (no TPU, so no perf/mfu).
EXPECTED_METRICS = [
    "actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/entropy",
    "actor/grad_norm", "actor/lr", "actor/skipped_updates", "critic/score/mean", "critic/score/max",
    "critic/score/min", "critic/rewards/mean", "critic/advantages/mean", "response_length/mean",
    "response_length/max", "response_length/min", "response_length/clip_ratio", "prompt_length/mean",
    "train/num_gen_batches", "train/kept_groups", "train/dropped_groups", "train/raw_acc",
    "train/overlong_masked", "reward/timeouts", "rollout/logprob_abs_diff", "rollout/ratio_mean",
    "rollout/ratio_max", "timing_s/gen", "timing_s/old_log_prob", "timing_s/update_actor", "timing_s/step",
    "perf/throughput", "perf/time_per_step", "perf/padding_fraction", "train/unshaped_score/mean", "timing_s/reward",
    "prompt_length/clip_ratio",
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  """The default recipe, shortened: the same warm-up, 40 RL steps, validation before and after.

  Run as `python -m dapo_jax.train` in a process of its own, as a user runs it.
  """
  workdir = str(tmp_path_factory.mktemp("default_run"))
  env = dict(os.environ, PYTHONPATH=REPO)
  run = subprocess.run([sys.executable, "-m", "dapo_jax.train", f"--workdir={workdir}",
                        "--config.trainer.total_training_steps=40", "--config.trainer.test_freq=40",
                        "--config.trainer.save_freq=20"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1800)
  assert run.returncode == 0, run.stderr[-4000:]
  return workdir, run.stderr, metrics.read_scalars(workdir)


def test_heldout_accuracy_rises(default_run):
  _, _, scalars = default_run
  curve = scalars["val-core/synthetic_arith/acc/mean@4"]
  assert [step for step, _ in curve] == [0, 40]
  before, after = curve[0][1], curve[-1][1]
  assert after >= before + 0.08, f"held-out avg@4 went from {before:.3f} to {after:.3f}"


def test_dynamic_sampling_dropped_groups_and_metrics_were_written(default_run):
  workdir, log, scalars = default_run
  assert sum(v for _, v in scalars["train/dropped_groups"]) > 0
  missing = [name for name in EXPECTED_METRICS if name not in scalars]
  assert not missing, f"metrics not written: {missing}"
  assert len(scalars["actor/pg_loss"]) == 40
  assert all(v == 0 for _, v in scalars["actor/skipped_updates"])
  assert os.path.exists(os.path.join(workdir, "checkpoints", "40"))
  assert "step 40 validation" in log
