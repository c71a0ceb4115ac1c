"""Multi-host start-up and the few cross-process helpers the training program needs.

One JAX program runs per host (README, "Running the real recipe on a TPU VM"); on a TPU pod slice or a
multi-node GPU/CPU cluster the processes find each other through `jax.distributed.initialize()`, which must run
before anything touches a device. `initialize` decides whether this is such a run (explicit values, JAX's own
environment variables, or a launcher that JAX auto-detects), calls it, and logs what it did; on one host it does
nothing.

After that, every array built on a mesh over `jax.devices()` is global: each process holds the shards of its
own devices. Writing files (metrics, config, checkpoint metadata, exported weights) is process 0's job
(`is_primary`); small host values that must agree between processes (batch shapes, micro-batch counts) go
through `global_max`.
"""
from collections.abc import Sequence
import json
import logging
import os
import signal

import jax
from jax.experimental import multihost_utils
import numpy as np

MODES = ("auto", "always", "never")

# Environment variables of launchers whose processes JAX's cluster detection finds by itself (SLURM, Open MPI,
# Cloud TPU on GKE, multislice TPU): when one says there are several processes, `initialize()` with no
# arguments is enough.
_PROCESS_COUNT_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_NUM_SLICES")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _launcher_process_count() -> tuple[str, int] | None:
  """(what said so, process count) when a known multi-process launcher environment is present."""
  for name in _PROCESS_COUNT_VARIABLES:
    count = _env_int(name)
    if count is not None and count > 1:
      return name, count
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "TPU_WORKER_HOSTNAMES", len(hosts.split(","))
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = "auto") -> bool:
  """Joins the processes of a multi-host run (`jax.distributed.initialize`); returns whether it did.

  Call it first, before any other JAX call. Values left at None come from the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or from JAX's cluster auto-detection.

  Args:
    coordinator_address: "host:port" of process 0's coordinator service (config `distributed.coordinator_address`).
    num_processes: how many processes take part.
    process_id: this process's index, 0 .. num_processes - 1.
    mode: "auto": initialize when a coordinator address or a process count above 1 is given (arguments or
      environment), or a multi-process launcher (SLURM, Open MPI, Cloud TPU on GKE, multislice) is detected;
      otherwise stay single-process. "always": call `jax.distributed.initialize` in any case (a TPU pod slice
      whose workers are known only to the metadata server, as with `gcloud compute tpus tpu-vm ssh --worker=all`;
      JAX detects the rest). "never": do nothing.

  Raises:
    ValueError: on an unknown mode, or values that cannot describe a run.
    RuntimeError: from JAX when a device was already used (initialize came too late).
  """
  if mode not in MODES:
    raise ValueError(f"distributed.initialize mode must be one of {MODES}, got {mode!r}")
  if jax.distributed.is_initialized():
    logging.info("distributed: already initialized (process %d of %d)", jax.process_index(), jax.process_count())
    return True
  if mode == "never":
    logging.info("distributed: single process (mode 'never')")
    return False
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"distributed.num_processes must be at least 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"distributed.process_id {process_id} is not in [0, {num_processes})")

  if mode == "auto":
    launcher = _launcher_process_count()
    if num_processes == 1 or (coordinator_address is None and num_processes is None and launcher is None):
      logging.info("distributed: single process (no coordinator address, process count or multi-process "
                   "launcher in the environment)")
      return False
    reason = (f"coordinator {coordinator_address}" if coordinator_address is not None else
              f"{num_processes} processes" if num_processes is not None else f"{launcher[0]}={launcher[1]}")
  else:
    reason = "mode 'always'"
  logging.info("distributed: initializing (%s; coordinator %s, %s processes, process id %s; unset values are "
               "auto-detected by JAX)", reason, coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("distributed: process %d of %d, %d local of %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def initialize_from_config(config) -> bool:
  """`initialize` with the values of a config's optional `distributed` section: coordinator_address (str),
  num_processes and process_id (int), initialize (a mode). A missing section or key, None, "" or -1 means
  unset (so a ConfigDict can declare typed defaults that flags override)."""
  section = config.get("distributed") if hasattr(config, "get") else None
  section = section if section is not None else {}

  def value(key, default=None):
    found = section.get(key, default) if hasattr(section, "get") else default
    return default if found is None or (isinstance(found, (str, int)) and found in ("", -1)) else found

  return initialize(value("coordinator_address"), value("num_processes"), value("process_id"),
                    mode=value("initialize", "auto"))


def is_primary() -> bool:
  """Whether this is process 0, the one that writes files every process would otherwise write alike."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (e.g. until process 0 has written a file the others
  read next); returns at once on one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def global_max(values: Sequence[int]) -> np.ndarray:
  """The element-wise maximum over processes of a small vector of integers (every process passes the same
  length); on one process, the values themselves."""
  local = np.asarray(values, np.int32).reshape(-1)
  if jax.process_count() == 1:
    return local
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, n]
  return gathered.reshape(jax.process_count(), -1).max(axis=0)


def allgather_json(value) -> list:
  """Every process's JSON-serialisable `value`, in process order, on every process (a collective: all processes
  call it). For small host state that differs between processes: per-process loop state for the checkpoint's
  metadata (which process 0 writes), or per-process statistics for the metrics."""
  text = json.dumps(value)
  if jax.process_count() == 1:
    return [json.loads(text)]  # the round trip of several processes (tuples come back as lists)
  encoded = np.frombuffer(text.encode(), np.uint8)
  length = int(global_max([encoded.size])[0])
  padded = np.zeros((length,), np.uint8)
  padded[:encoded.size] = encoded
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([encoded.size], np.int32))).reshape(-1)
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
  return [json.loads(bytes(row[:size]).decode()) for row, size in zip(gathered, sizes)]


class PreemptionSignal:
  """Turns SIGTERM (a TPU VM's preemption notice) into a flag the training loop checks after each step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: finishing this step, saving a checkpoint and exiting")
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was sent SIGTERM. A collective (every process asks at the same point of the loop),
    so that all of them stop after the same step: one alone would leave the others waiting for it."""
    return bool(global_max([self.requested])[0])
