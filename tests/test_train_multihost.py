"""The training program on two processes joined over loopback (jax.distributed, CPU collectives).

Each process (tests/train_multihost_worker.py: the program's own `main` and flags) has 2 fake CPU devices; the
mesh is data 2 (one replica per process) x fsdp 2 (within a process), so every process holds a whole copy of the
params, which must agree. A small default run with a deterministic reward (tests/test_resume.py's) after a brief
warm-up, in which only process 1 is sent SIGTERM: both processes stop after rollout step 1 with a checkpoint.
The restarted run resumes every process from its own entry of the checkpoint's loop state, takes step 2 and
validates (the problems split between the processes).
"""
import glob
import json
import os
import pathlib
import signal
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
    "--config.trainer.total_training_steps=2", "--config.trainer.save_freq=1", "--config.trainer.test_freq=2",
    "--config.trainer.val_before_train=False", "--config.trainer.log_freq=1", "--config.warmup.steps=2",
    "--config.synthetic.num_heldout=8", "--config.data.train_batch_size=4", "--config.data.gen_batch_size=4",
    "--config.rollout.n=4", "--config.actor.ppo_mini_batch_size=2", "--config.rollout.max_num_seqs=8",
    "--config.rollout.val_kwargs.n=2", "--config.reward.function=tests.test_resume:even_length_reward",
    "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1",
]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_program(workdir: pathlib.Path, records: pathlib.Path, name: str, sigterm: tuple[int, str] | None = None
                 ) -> list[str]:
  """Both processes of one run; their logs. `sigterm` = (process, text): that process is sent SIGTERM once its
  log shows the text. A process that fails or the deadline ends both; the test then fails with their output."""
  address = f"127.0.0.1:{_free_port()}"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                   "JAX_PROCESS_ID"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  paths = [records / f"{name}_{process_id}.log" for process_id in range(NUM_PROCESSES)]
  processes = []
  for process_id, path in enumerate(paths):
    flags = [f"--workdir={workdir}", *FLAGS, f"--config.distributed.coordinator_address={address}",
             f"--config.distributed.num_processes={NUM_PROCESSES}", f"--config.distributed.process_id={process_id}"]
    with open(path, "w") as log:
      processes.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_multihost_worker.py"),
                                         str(records), *flags], stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=ROOT))
  deadline = time.monotonic() + TIMEOUT_S
  while (time.monotonic() < deadline and any(p.poll() is None for p in processes)
         and all(p.returncode in (None, 0) for p in processes)):
    if sigterm is not None and sigterm[1] in paths[sigterm[0]].read_text(errors="replace"):
      processes[sigterm[0]].send_signal(signal.SIGTERM)
      sigterm = None
    time.sleep(0.2)
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()
  logs = [path.read_text(errors="replace") for path in paths]
  if any(p.returncode != 0 for p in processes):
    report = "\n".join(f"--- process {i} (exit code {p.returncode}) ---\n{logs[i][-6000:]}"
                       for i, p in enumerate(processes))
    pytest.fail(f"{name} run: {'timed out' if time.monotonic() >= deadline else 'a process failed'}\n{report}")
  return logs


def _recorded(records: pathlib.Path, process: int, step: int) -> dict:
  return dict(np.load(records / f"params_{process}_{step}.npz"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(workdir, records, logs of the preempted run, event files after it, logs of the resumed run)."""
  workdir = tmp_path_factory.mktemp("train_multihost")
  records = tmp_path_factory.mktemp("records")
  preempted = _run_program(workdir, records, "preempted", sigterm=(1, "warm-up step 2/2"))
  event_files = glob.glob(str(workdir / "events.out.tfevents.*"))
  resumed = _run_program(workdir, records, "resumed")
  return workdir, records, preempted, event_files, resumed


def test_sigterm_to_one_process_stops_both_after_the_same_step(runs):
  workdir, _, preempted, event_files, _ = runs
  assert all(f"distributed: process {p} of 2" in log for p, log in enumerate(preempted))
  assert "SIGTERM received" in preempted[1] and "SIGTERM received" not in preempted[0]
  assert all("Preempted: stopped after rollout step 1" in log for log in preempted)
  # One set of files, from process 0 (process 1 only logs its metrics).
  assert len(event_files) == 1
  assert json.loads((workdir / "config.json").read_text())["distributed"]["num_processes"] == 2
  assert (workdir / "base_model" / "config.json").exists() and (workdir / "data" / "train.parquet").exists()
  checkpoints = checkpoint.Checkpointer(str(workdir / "checkpoints"))
  _, meta = checkpoints.restore(1, {})
  checkpoints.close()
  assert meta["rollout_step"] == 1 and len(meta["processes"]) == NUM_PROCESSES
  assert all({"data_iterator", "dynamic_sampling"} <= set(state) for state in meta["processes"])


def test_each_process_resumes_from_its_own_loop_state(runs):
  workdir, _, _, _, resumed = runs
  assert all("Resumed from rollout step 1" in log for log in resumed)
  assert all("Validation: 4/4 problems x 2 samples" in log for log in resumed)  # each process 4 of the 8
  scalars = metrics.read_scalars(str(workdir))
  assert [s for s, _ in scalars["actor/pg_loss"]] == [1, 2]
  # Each process keeps at least its 2 of the 4 groups: the written count is the sum over both.
  assert all(v >= 4 for _, v in scalars["train/kept_groups"])
  assert all(v == 0 for _, v in scalars["actor/skipped_updates"])
  assert [s for s, _ in scalars["val-core/synthetic_arith/acc/mean@2"]] == [2]


def test_processes_end_each_step_with_the_checkpointed_params(runs):
  workdir, records, _, _, _ = runs
  for step in (1, 2):
    policy = checkpoint.load_policy(str(workdir / "checkpoints" / str(step)))
    restored = jax.tree_util.tree_leaves_with_path(policy.params)
    first, second = _recorded(records, 0, step), _recorded(records, 1, step)
    assert sorted(first) == sorted(jax.tree_util.keystr(p) for p, _ in restored)
    for path, leaf in restored:
      key = jax.tree_util.keystr(path)
      np.testing.assert_array_equal(first[key], second[key], err_msg=f"step {step} {key}")
      np.testing.assert_array_equal(np.asarray(leaf), first[key], err_msg=f"step {step} {key}")
  assert any(not np.array_equal(_recorded(records, 0, 1)[k], _recorded(records, 0, 2)[k]) for k in first)

