"""Resume: a run stopped by SIGTERM, then killed by SIGKILL between checkpoints, and restarted each time, ends with
the same params and the same non-timing metrics as an uninterrupted run with the same seed."""
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dapo_jax import checkpoint
from dapo_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 6
# A short default run: small batches, a brief warm-up, checkpoints every 2 steps, validation every 3.
FLAGS = [
    f"--config.trainer.total_training_steps={TOTAL_STEPS}", "--config.trainer.save_freq=2",
    "--config.trainer.test_freq=3", "--config.trainer.log_freq=1", "--config.warmup.steps=20",
    "--config.synthetic.num_heldout=16", "--config.data.train_batch_size=4", "--config.data.gen_batch_size=4",
    "--config.rollout.n=4", "--config.actor.ppo_mini_batch_size=2", "--config.rollout.max_num_seqs=16",
    "--config.rollout.val_kwargs.n=2",
    # A deterministic reward with spread inside groups, so updates are real and dynamic sampling keeps groups
    # without the long warm-up a correct base model needs.
    "--config.reward.function=tests.test_resume:even_length_reward",
]
# Metrics that measure time rather than the computation.
TIMING_PREFIXES = ("timing_s/", "perf/")


def even_length_reward(data_source, solution_str, ground_truth, extra_info=None):
  del data_source, ground_truth, extra_info
  correct = len(solution_str) % 2 == 0
  return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": None}


class _Run:
  """`python -m dapo_jax.train` in a subprocess whose log lines are read as they come."""

  def __init__(self, workdir):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    self.process = subprocess.Popen(
        [sys.executable, "-m", "dapo_jax.train", f"--workdir={workdir}", *FLAGS], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    self.log: list[str] = []

  def wait_for(self, text: str) -> None:
    for line in self.process.stderr:
      self.log.append(line)
      if text in line:
        return
    self.finish()
    pytest.fail(f"the run ended before logging {text!r}:\n{''.join(self.log[-40:])}")

  def finish(self, timeout: float = 600) -> int:
    _, rest = self.process.communicate(timeout=timeout)
    self.log.append(rest)
    return self.process.returncode

  @property
  def text(self) -> str:
    return "".join(self.log)


def _final_params(workdir):
  return checkpoint.load_policy(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS))).params


def _non_timing(scalars):
  return {tag: values for tag, values in scalars.items() if not tag.startswith(TIMING_PREFIXES)}


def test_sigterm_and_sigkill_resume_like_an_uninterrupted_run(tmp_path):
  uninterrupted = str(tmp_path / "uninterrupted")
  run = _Run(uninterrupted)
  assert run.finish() == 0, run.text[-4000:]

  interrupted = str(tmp_path / "interrupted")
  os.makedirs(interrupted)
  shutil.copytree(os.path.join(uninterrupted, "base_model"), os.path.join(interrupted, "base_model"))

  # SIGTERM during step 3 or 4: the step finishes, a checkpoint is saved, the process exits cleanly.
  run = _Run(interrupted)
  run.wait_for("step 3/6")
  run.process.send_signal(signal.SIGTERM)
  assert run.finish() == 0, run.text[-4000:]
  assert "Preempted: stopped after rollout step" in run.text
  checkpoints = checkpoint.Checkpointer(os.path.join(interrupted, "checkpoints"))
  preempted_at = checkpoints.latest_step()
  checkpoints.close()
  assert 3 <= preempted_at < TOTAL_STEPS

  # Resumed, then killed outright after step 5 logs its metrics, before any checkpoint of step 5.
  run = _Run(interrupted)
  run.wait_for(f"Resumed from rollout step {preempted_at}")
  run.wait_for("step 5/6")
  run.process.kill()
  run.finish()
  assert "Validation at rollout step 0" not in run.text  # the validation before training is not repeated

  run = _Run(interrupted)
  assert run.finish() == 0, run.text[-4000:]
  assert "Resumed from rollout step 4" in run.text
  assert "Validation at rollout step 0" not in run.text

  for a, b in zip(jax.tree.leaves(_final_params(interrupted)), jax.tree.leaves(_final_params(uninterrupted))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  expected = _non_timing(metrics.read_scalars(uninterrupted))
  got = _non_timing(metrics.read_scalars(interrupted))
  assert sorted(got) == sorted(expected)
  assert [s for s, _ in expected["actor/pg_loss"]] == list(range(1, TOTAL_STEPS + 1))
  assert [s for s, _ in expected["val-core/synthetic_arith/acc/mean@2"]] == [0, 3, 6]
  assert expected["train/kept_groups"][0][1] > 0 and any(v != 0 for _, v in expected["actor/pg_loss"])
  for tag in expected:
    assert [s for s, _ in got[tag]] == [s for s, _ in expected[tag]], tag
    np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in expected[tag]], rtol=1e-6, atol=1e-7,
                               err_msg=tag)
