"""The training program on two processes joined over loopback (jax.distributed, CPU collectives).

Each process (tests/train_multihost_worker.py, the program's own `main` and flags) has 2 fake CPU devices; the
mesh is data 2 (one replica per process) x fsdp 2 (within a process), so every process holds a whole copy of the
params, which must agree. Two rollout steps of a small default run with a deterministic reward
(tests/test_resume.py's) after a brief warm-up; then the run is extended by one step, every process resuming
from its own entry of the checkpoint's loop state, and validated (the problems split between the processes).
"""
import glob
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dapo_jax import checkpoint
from dapo_jax import metrics
from dapo_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
TIMEOUT_S = 300
FLAGS = [
    "--config.trainer.total_training_steps=2", "--config.trainer.save_freq=1", "--config.trainer.test_freq=0",
    "--config.trainer.val_before_train=False", "--config.trainer.log_freq=1", "--config.warmup.steps=2",
    "--config.synthetic.num_heldout=8", "--config.data.train_batch_size=4", "--config.data.gen_batch_size=4",
    "--config.rollout.n=4", "--config.actor.ppo_mini_batch_size=2", "--config.rollout.max_concurrent_decodes=8",
    "--config.rollout.val_kwargs.n=2", "--config.reward.function=tests.test_resume:even_length_reward",
    "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1",
]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_program(workdir: pathlib.Path, records: pathlib.Path, extra_flags=()) -> list[str]:
  """Both processes of one run; their logs. Kills both at the deadline; fails with their output."""
  address = f"127.0.0.1:{_free_port()}"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                   "JAX_PROCESS_ID"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  workers = []
  for process_id in range(NUM_PROCESSES):
    flags = [f"--workdir={workdir}", *FLAGS, *extra_flags, f"--config.distributed.coordinator_address={address}",
             f"--config.distributed.num_processes={NUM_PROCESSES}", f"--config.distributed.process_id={process_id}"]
    log = open(records / f"worker_{process_id}_{len(list(records.glob('worker_*')))}.log", "w+")
    workers.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_multihost_worker.py"),
                                      str(records), *flags], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                    log))
  deadline = time.monotonic() + TIMEOUT_S
  timed_out = False
  for process, _ in workers:
    try:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      timed_out = True
      break
  logs = []
  for process, log in workers:
    if process.poll() is None:
      process.kill()
      process.wait()
    log.seek(0)
    logs.append(log.read())
    log.close()
  failed = [i for i, (process, _) in enumerate(workers) if process.returncode != 0]
  if timed_out or failed:
    report = "\n".join(f"--- process {i} (exit code {workers[i][0].returncode}) ---\n{logs[i][-6000:]}"
                       for i in range(NUM_PROCESSES))
    pytest.fail(f"{f'timed out after {TIMEOUT_S} s' if timed_out else f'processes {failed} failed'}\n{report}")
  return logs


def _recorded(records: pathlib.Path, process: int, step: int) -> dict:
  return dict(np.load(records / f"params_{process}_{step}.npz"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("train_multihost")
  records = tmp_path_factory.mktemp("records")
  logs = _run_program(workdir, records)
  return workdir, records, logs


def test_one_set_of_files_and_the_step_metrics(run):
  workdir, _, logs = run
  assert all("distributed: process %d of 2" % p in log for p, log in enumerate(logs))
  assert len(glob.glob(str(workdir / "events.out.tfevents.*"))) == 1  # process 1 only logs its metrics
  assert json.loads((workdir / "config.json").read_text())["distributed"]["num_processes"] == 2
  assert (workdir / "base_model" / "config.json").exists() and (workdir / "data" / "train.parquet").exists()
  scalars = metrics.read_scalars(str(workdir))
  assert [s for s, _ in scalars["actor/pg_loss"]] == [1, 2]
  # Each process keeps at least its 2 of the 4 groups: the written count is the sum over both.
  assert all(v >= 4 for _, v in scalars["train/kept_groups"])
  assert all(v == 0 for _, v in scalars["actor/skipped_updates"])


def test_processes_end_each_step_with_the_checkpointed_params(run):
  workdir, records, _ = run
  restored = checkpoint.load_policy(str(workdir / "checkpoints" / "2")).params
  paths = jax.tree_util.tree_leaves_with_path(restored)
  for step in (1, 2):
    first, second = _recorded(records, 0, step), _recorded(records, 1, step)
    assert sorted(first) == sorted(jax.tree_util.keystr(p) for p, _ in paths)
    for key in first:
      np.testing.assert_array_equal(first[key], second[key], err_msg=f"step {step} {key}")
  for path, leaf in paths:
    np.testing.assert_array_equal(np.asarray(leaf), first[jax.tree_util.keystr(path)], err_msg=jax.tree_util.keystr(path))
  assert any(not np.array_equal(_recorded(records, 0, 1)[k], first[k]) for k in first)  # the steps trained


def test_each_process_resumes_from_its_own_loop_state(run):
  workdir, records, _ = run
  checkpoints = checkpoint.Checkpointer(str(workdir / "checkpoints"))
  _, meta = checkpoints.restore(2, {})
  checkpoints.close()
  assert meta["rollout_step"] == 2 and len(meta["processes"]) == NUM_PROCESSES
  assert all({"data_iterator", "dynamic_sampling"} <= set(state) for state in meta["processes"])

  logs = _run_program(workdir, records, ["--config.trainer.total_training_steps=3", "--config.trainer.test_freq=3"])
  assert all("Resumed from rollout step 2" in log for log in logs)
  assert all("Validation: 4/4 problems x 2 samples" in log for log in logs)  # each process 4 of the 8
  scalars = metrics.read_scalars(str(workdir))
  assert [s for s, _ in scalars["actor/pg_loss"]] == [1, 2, 3]
  assert [s for s, _ in scalars["val-core/synthetic_arith/acc/mean@2"]] == [3]
  for key, value in _recorded(records, 0, 3).items():
    np.testing.assert_array_equal(value, _recorded(records, 1, 3)[key], err_msg=key)


def _process_share(scores, response_lengths, prompt_lengths, truncated, selection, overlong_masked=0, timeouts=0):
  return {"scores": scores, "rewards": scores, "advantages": [0.0] * len(scores),
          "response_lengths": response_lengths, "prompt_lengths": prompt_lengths, "truncated": truncated,
          "overlong_masked": overlong_masked, "timeouts": timeouts, "selection": selection}


def _selection(gen_batches, kept, dropped, unfinished, raw_acc):
  return {"train/num_gen_batches": gen_batches, "train/kept_groups": kept, "train/dropped_groups": dropped,
          "train/surplus_groups": 0.0, "train/carried_groups": 0.0, "train/unfinished_groups": unfinished,
          "train/raw_acc": raw_acc}


def test_step_metrics_of_two_processes_by_hand():
  first = _process_share([1.0, -1.0], [3, 5], [4, 4], [False, True], _selection(1.0, 2.0, 0.0, 1.0, 0.25),
                         overlong_masked=1)
  second = _process_share([1.0, 1.0], [7, 9], [6, 6], [True, True], _selection(2.0, 3.0, 3.0, 0.0, 0.5),
                          timeouts=2)
  out, response_lengths, num_tokens = train._step_statistics([first, second])
  np.testing.assert_array_equal(response_lengths, [3, 5, 7, 9])
  assert num_tokens == 24 + 20
  assert (out["response_length/mean"], out["response_length/max"], out["response_length/min"]) == (6.0, 9.0, 3.0)
  assert out["response_length/clip_ratio"] == 0.75 and out["prompt_length/mean"] == 5.0
  assert out["critic/score/mean"] == 0.5 and out["critic/score/min"] == -1.0
  assert (out["train/kept_groups"], out["train/dropped_groups"], out["train/unfinished_groups"]) == (5.0, 3.0, 1.0)
  assert out["train/num_gen_batches"] == 1.5  # prompts drawn / data.gen_batch_size
  assert out["train/raw_acc"] == (0.25 * 2 + 0.5 * 6) / 8  # over the 8 finished groups
  assert (out["train/overlong_masked"], out["reward/timeouts"]) == (1.0, 2.0)
  # One process: its own values, exactly.
  alone, _, _ = train._step_statistics([second])
  assert alone["train/raw_acc"] == 0.5 and alone["train/num_gen_batches"] == 2.0

