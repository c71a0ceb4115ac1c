"""Two processes on loopback run a DAPO training step together and match the single-process result.

Each worker (tests/multihost_worker.py) has 4 fake CPU devices; `jax.distributed.initialize` joins them into one
mesh of 8 (data 2 x fsdp 2 x tensor 2, the processes along `data`) with CPU collectives (gloo). Each process
holds its own share of the mini-batch, in micro-batches of its own count and widths (the placement agrees on
shapes across processes). Compared with this process's single-device computation on the whole mini-batch:
old log-probs and gradients (1e-5 relative), the loss metrics, the optimizer step (the params after the update
equal AdamW applied on one device to the gradients the processes computed together), the HF import into the
global sharding, an orbax save/restore of the global train state, and greedy sampling that each process runs
on its own devices.
"""
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
from flax import nnx

from dapo_jax import distributed
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rl import step
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import GREEDY
from tests import batch_fixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
TIMEOUT_S = 240
CONFIG = get_preset("tiny").replace(vocab_size=64)
SETTINGS = dict(mesh={"data": 2, "fsdp": 2, "tensor": 2}, agg_mode="token-mean", temperature=0.9,
                learning_rate=1e-3, new_tokens=5, prompts=[[3, 14, 15, 9, 2], [6, 5, 35]])


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rows(rng, rows, prompt_width, response_width):
  return batch_fixtures.random_micro_batch(rng, rows, prompt_width, response_width, CONFIG.vocab_size,
                                           with_old_logp=True)


def _run_workers(workdir: pathlib.Path) -> None:
  """Starts the processes, waits for all of them (killing all at the deadline), fails with their output."""
  address = f"127.0.0.1:{_free_port()}"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                   "JAX_PROCESS_ID"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(ROOT))
  workers = []
  for process_id in range(NUM_PROCESSES):
    log = open(workdir / f"worker_{process_id}.log", "w")
    workers.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(process_id),
                                      str(NUM_PROCESSES), address, str(workdir)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
  deadline = time.monotonic() + TIMEOUT_S
  timed_out = False
  for process, _ in workers:
    try:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      timed_out = True
      break
  for process, log in workers:
    if process.poll() is None:
      process.kill()
      process.wait()
    log.close()
  failed = [i for i, (process, _) in enumerate(workers) if process.returncode != 0]
  if timed_out or failed:
    report = "\n".join(f"--- worker {i} (exit code {workers[i][0].returncode}) ---\n"
                       + (workdir / f"worker_{i}.log").read_text()[-6000:] for i in range(NUM_PROCESSES))
    pytest.fail(f"{'timed out after %d s' % TIMEOUT_S if timed_out else f'workers {failed} failed'}\n{report}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The workers' outputs beside this process's single-device reference."""
  workdir = tmp_path_factory.mktemp("multihost")
  params = jax.device_get(qwen2.Qwen2(CONFIG, rngs=nnx.Rngs(0)).params)
  hf_io.save_hf_checkpoint(params, CONFIG, workdir / "hf")
  (workdir / "settings.json").write_text(json.dumps(SETTINGS))
  rng = np.random.default_rng(0)
  # Process 0: two micro-batches (5 rows: an odd count; 3 rows); process 1: one, of other widths.
  shares = [[_rows(rng, 5, 6, 7), _rows(rng, 3, 4, 5)], [_rows(rng, 6, 9, 4)]]
  np.savez(workdir / "inputs.npz", **{f"{p}/{m}/{k}": v for p, share in enumerate(shares)
                                     for m, mb in enumerate(share) for k, v in mb.items()})
  _run_workers(workdir)
  outputs = dict(np.load(workdir / "outputs.npz"))
  greedy = [json.loads((workdir / f"greedy_{p}.json").read_text()) for p in range(NUM_PROCESSES)]
  return dict(params=params, shares=shares, outputs=outputs, greedy=greedy)


def _output(outputs, prefix, tree):
  """The gathered arrays named by the workers' key paths, in the structure of `tree`."""
  paths = jax.tree_util.tree_leaves_with_path(tree)
  return jax.tree.unflatten(jax.tree.structure(tree), [outputs[prefix + jax.tree_util.keystr(p)] for p, _ in paths])


def _assert_close(actual_tree, expected_tree, rtol, what):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual_tree), jax.tree.leaves(expected_tree)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()),
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _single_device_updater():
  return step.Updater(optimizer=step.make_optimizer(learning_rate=SETTINGS["learning_rate"]), model_config=CONFIG,
                      loss_config=step.LossConfig(agg_mode=SETTINGS["agg_mode"], temperature=SETTINGS["temperature"]))


def test_two_processes_train_like_one(run):
  updater = _single_device_updater()
  device = jax.devices()[0]
  params = jax.device_put(run["params"], device)
  every_row = [mb for share in run["shares"] for mb in share]
  grads, _ = updater.gradients(params, every_row)
  opt_state = updater.optimizer.init(params)
  _, _, metrics = updater(jax.device_put(run["params"], device), updater.optimizer.init(params), every_row,
                          learning_rate=SETTINGS["learning_rate"])
  outputs = run["outputs"]

  # The HF import placed the same weights; the gradients computed together equal the whole mini-batch's.
  before_params, before_state, before_grads = _output(outputs, "before", (run["params"], opt_state, grads))
  _assert_close(before_params, run["params"], 0.0, "imported params")
  _assert_close(before_grads, jax.device_get(grads), 1e-5, "gradients")
  # One optimizer step on one device from the processes' gradients gives their updated params and state.
  expected = updater.apply_fn(jax.device_put(before_params, device), jax.device_put(before_state, device),
                              jax.device_put(before_grads, device), SETTINGS["learning_rate"])
  after_params, after_state, after_metrics = _output(outputs, "after", (run["params"], opt_state, metrics))
  _assert_close(after_params, jax.device_get(expected[0]), 1e-6, "updated params")
  _assert_close(after_state, jax.device_get(expected[1]), 1e-6, "optimizer state")
  for name, value in jax.device_get(metrics).items():
    np.testing.assert_allclose(after_metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
  assert float(after_metrics["actor/skipped_updates"]) == 0


def test_old_log_probs_of_each_process_rows(run):
  # Global rows: process 0's (padded to its 2 row blocks) then process 1's, per micro-batch.
  device = jax.devices()[0]
  params = jax.device_put(run["params"], device)
  count = max(len(share) for share in run["shares"])
  for micro in range(count):
    gathered = run["outputs"][f"after[3][{micro}]"]
    local_rows = gathered.shape[0] // NUM_PROCESSES
    for process, share in enumerate(run["shares"]):
      block = gathered[process * local_rows:(process + 1) * local_rows]
      if micro >= len(share):  # a fully masked micro-batch added to match the other process's count
        np.testing.assert_array_equal(block, 0.0)
        continue
      mb = share[micro]
      expected = np.asarray(_single_device_updater().old_log_probs(params, mb))
      rows, width = expected.shape
      np.testing.assert_allclose(block[:rows, :width], expected, rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(block[rows:], 0.0)
      np.testing.assert_array_equal(block[:, width:], 0.0)


def test_each_process_samples_greedily_on_its_own_devices(run):
  # From the updated weights the processes hold: this process samples from the same update on one device.
  after_params = _output(run["outputs"], "after", (run["params"],))[0]
  sampler = sampler_lib.GroupSampler(CONFIG, num_slots=2, max_prompt_length=8,
                                     max_response_length=SETTINGS["new_tokens"])
  for process, prompt in enumerate(SETTINGS["prompts"]):
    group = sampler.sample(jax.device_put(after_params, jax.devices()[0]), [prompt], n=1, seed=0,
                           sampling=GREEDY)[0]
    assert run["greedy"][process] == group.responses[0].token_ids.tolist()


def test_initialize_is_a_no_op_on_one_host(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "MEGASCALE_NUM_SLICES", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  assert distributed.initialize(mode="never") is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.initialize() is False
  assert distributed.is_primary()
  np.testing.assert_array_equal(distributed.global_max([3, 1]), [3, 1])
  assert distributed.allgather_json({"a": [1, "b"]}) == [{"a": [1, "b"]}]
  distributed.sync("single process: returns at once")
  with pytest.raises(ValueError, match="mode"):
    distributed.initialize(mode="sometimes")
  with pytest.raises(ValueError, match="process_id 2"):
    distributed.initialize("127.0.0.1:1", 2, 2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed.initialize()


def test_initialize_from_config_reads_the_distributed_section(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "MEGASCALE_NUM_SLICES", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  unset = {"distributed": {"coordinator_address": "", "num_processes": -1, "process_id": -1, "initialize": "auto"}}
  assert distributed.initialize_from_config(unset) is False
  assert distributed.initialize_from_config({}) is False
  with pytest.raises(ValueError, match="process_id 3"):
    distributed.initialize_from_config({"distributed": {"coordinator_address": "127.0.0.1:1", "num_processes": 2,
                                                        "process_id": 3}})
  with pytest.raises(ValueError, match="mode"):
    distributed.initialize_from_config({"distributed": {"initialize": "maybe"}})
