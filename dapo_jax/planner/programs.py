"""Each device function of a rollout step compiled for a TPU slice (see the package's docstring): the chip's HBM,
each program's per-chip memory, and the `Plan` of a config on a topology."""
import dataclasses
import functools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from dapo_jax import config as config_lib
from dapo_jax import old_log_probs
from dapo_jax import sharding as sharding_lib
from dapo_jax.model import qwen2
from dapo_jax.planner.inputs import (concurrent_sequences, config_error, decode_step_flops, forward_flops, mesh_for,
                                     micro_batch_rows, model_config, num_processes_of, sampler_mesh_for,
                                     worst_case_micro_batch)
from dapo_jax.rl import batching
from dapo_jax.rl import step
from dapo_jax.rollout import decode_state
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout import weight_layout
from dapo_jax.rollout.sampling import SamplingParams

GIB = 1 << 30

# HBM per chip where the compiler's own figure cannot be read (Cloud TPU system architecture pages). The
# compiler's figure, from its out-of-memory message, is what a program may really use (e.g. 95.74 GiB on v5p).
HBM_GIB_BY_DEVICE_KIND = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int | None:
  """Bytes of an XLA size like "95.74G" or "512.00M" (binary units, as XLA prints them); None if not one."""
  match = re.fullmatch(r"\s*([\d.]+)\s*([KMGTP]?)i?B?\s*", text)
  if not match:
    return None
  return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_out_of_memory(message: str) -> tuple[int | None, int | None]:
  """(required, available) bytes from a TPU compiler's RESOURCE_EXHAUSTED message (None where absent).

  XLA words it as "... required for HLO temporaries (1.00T) exceeds available HBM (95.74G)" or as
  "Used 120.5G of 95.74G hbm".
  """
  required = available = None
  match = re.search(r"required for [^(]*\(([^)]+)\)\s*exceeds available HBM \(([^)]+)\)", message)
  if match:
    required, available = parse_size(match.group(1)), parse_size(match.group(2))
  match = re.search(r"Used (\S+) of (\S+) hbm", message)
  if match:
    required = required or parse_size(match.group(1))
    available = available or parse_size(match.group(2))
  return required, available


def usable_hbm_bytes(device: jax.Device) -> tuple[int, str]:
  """(bytes a program may use on this device, where the figure comes from).

  jax does not expose the HBM of a compile-only device (`memory_stats()` needs an attached one), but the
  compiler states it when a program cannot fit, so compiling a program that needs far more than any chip has
  reads it off; the documented per-chip HBM is the fallback.
  """
  too_big = jax.jit(lambda: jnp.zeros((1 << 44,), jnp.int8),
                    out_shardings=jax.sharding.SingleDeviceSharding(device))
  try:
    too_big.lower().compile()
  except jax.errors.JaxRuntimeError as error:
    _, available = parse_out_of_memory(str(error))
    if available:
      return available, "compiler"
  if device.device_kind not in HBM_GIB_BY_DEVICE_KIND:
    raise ValueError(f"HBM of {device.device_kind!r} unknown: the compiler did not state it and it is not in "
                     f"HBM_GIB_BY_DEVICE_KIND ({sorted(HBM_GIB_BY_DEVICE_KIND)})")
  return HBM_GIB_BY_DEVICE_KIND[device.device_kind] * GIB, "documented"


def _rules(config: ml_collections.ConfigDict):
  return tuple(config.mesh.rules) if "rules" in config.mesh else sharding_lib.DEFAULT_RULES


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda leaf, s: _abstract(leaf.shape, leaf.dtype, s), tree, shardings)


def per_device_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded `ShapeDtypeStruct`s."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass
class ProgramMemory:
  """Per-chip memory of one compiled device function (or the compiler's reason it does not fit)."""
  name: str
  compile_seconds: float
  flops: int                    # analytic FLOPs of one call, all chips together
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0           # activations and temporaries
  alias_bytes: int = 0          # outputs written in place of donated arguments
  peak_bytes: int = 0           # the compiler's peak; arguments + outputs + temporaries - aliased if it has none
  error: str | None = None      # the RESOURCE_EXHAUSTED message when it does not fit
  required_bytes: int | None = None   # from that message
  available_bytes: int | None = None  # from that message

  @property
  def fits(self) -> bool:
    return self.error is None


@dataclasses.dataclass
class Phase:
  """A moment of the rollout step: a program running while other buffers stay on the chip."""
  name: str
  program: str
  resident: dict[str, int | None]  # bytes per chip held outside the program's arguments (None: unknown)
  peak_bytes: int | None        # resident + the program's peak (its required bytes when it does not fit)
  fits: bool


@dataclasses.dataclass
class Plan:
  """The memory plan of one config on one topology."""
  topology: str
  device_kind: str
  num_devices: int
  hbm_bytes: int
  hbm_source: str               # "compiler" (its out-of-memory message) or "documented"
  mesh: dict[str, int]
  mesh_layout: str              # which device layout `sharding.make_mesh` gives the mesh on this slice, and why
  num_processes: int            # hosts of the slice, one process each
  rows_split_between_hosts: bool  # `sharding.rows_split_between_processes`: batches can be placed (always on
                                # one host; `sharding.make_mesh` refuses a mesh that breaks it on several)
  config_error: str | None      # `config.validate` on this many hosts (None: valid)
  sampler_mesh: dict[str, int]  # the trainer's mesh on one host; else each host's own devices
  model: str
  num_params: int
  micro_batch: dict[str, Any]   # the global micro-batch: rows, width (packed), tokens,
                                # padding_rows (added to fill the data-parallel shards), rows_per_device,
                                # data_parallel; and each host's part: rows_per_host (the token budget's rows,
                                # unpadded), mini_batch_rows_per_host, micro_batches_per_update (per host);
                                # log_prob_rows: the old-log-prob pass's global micro-batch rows
  rollout: dict[str, Any]       # the sampler of one host (`rollout_section`): its decode rows (slots), steps
                                # per call, prefill call, KV pool (pages, page size, bytes per chip, how it was
                                # sized), the rollout's weights per chip (the decode weights) and the sequences it
                                # decodes at once
  per_chip: dict[str, int | None]  # bytes: params, optimizer_state, gradients, sampler_params (the interim copy
                                # the decode weights are made from on several hosts; 0 on one), decode_weights
                                # (the rollout's copy), kv_pool (the decode state: the pool and the slots' vectors)
  programs: list[ProgramMemory]
  phases: list[Phase]
  peak_bytes: int | None
  peak_phase: str
  fits: bool
  plan_seconds: float

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for program, record in zip(self.programs, out["programs"]):
      record["fits"] = program.fits
    return out


def _compile(name: str, flops: int, jitted, *args, **kwargs) -> tuple[ProgramMemory, Any]:
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args, **kwargs).compile()
  except jax.errors.JaxRuntimeError as error:
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    required, available = parse_out_of_memory(message)
    return ProgramMemory(name, time.perf_counter() - start, flops, error=message.strip().splitlines()[0],
                         required_bytes=required, available_bytes=available), None
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  peak = m.peak_memory_in_bytes or (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                    - m.alias_size_in_bytes)
  return ProgramMemory(name, seconds, flops, argument_bytes=m.argument_size_in_bytes,
                       output_bytes=m.output_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
                       alias_bytes=m.alias_size_in_bytes, peak_bytes=peak), compiled


DEFAULT_MEAN_RESPONSE_LENGTH = 4096
"""The mean response length the rollout's concurrency is planned for (`rollout_section`)."""


def plan(config: ml_collections.ConfigDict, topology: str, *, model: str | None = None,
         mean_response_length: int = DEFAULT_MEAN_RESPONSE_LENGTH) -> Plan:
  """Compiles the rollout step's device functions of `config` for a TPU `topology` (e.g. "v5p:4x4x4"); the KV
  pool's concurrency is reported for responses of `mean_response_length` tokens."""
  # Imported here: jax loads libtpu only for this, so the rest of the module imports without it.
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  plan_start = time.perf_counter()
  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  hbm, hbm_source = usable_hbm_bytes(devices[0])
  rules = _rules(config)
  mesh, mesh_layout = mesh_for(devices, config.mesh, rules)
  num_processes = num_processes_of(devices)
  replicated = NamedSharding(mesh, PartitionSpec())
  model_name, mc = model_config(config, model)
  d = config.data

  # The trainer's params and optimizer state. The rollout lays out its one copy of the weights from the params
  # (`GroupSampler.decode_weights`): in one program where the sampler's mesh is the trainer's (one host); with
  # several hosts, each samples on its own chips from an interim copy of the params, cast to the compute dtype and
  # moved onto them (tensor parallel only: `sharding.decode_rules`), freed once the decode weights are made.
  abstract = qwen2.abstract_model(mc)
  param_shardings = sharding_lib.param_shardings(abstract, mesh, rules)
  params = _with_shardings(abstract.params, param_shardings)
  sampler_mesh = sampler_mesh_for(devices, mesh)
  interim = set(sampler_mesh.devices.flat) != set(mesh.devices.flat)
  sampler_params = _with_shardings(
      jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(mc.dtype), p), abstract.params),
      sharding_lib.param_shardings(abstract, sampler_mesh, sharding_lib.decode_rules(rules))) if interim else None
  optimizer = step.optimizer_from_config(config.actor.optim)
  abstract_opt_state = jax.eval_shape(optimizer.init, params)
  opt_state_shardings = sharding_lib.optimizer_state_shardings(optimizer, abstract_opt_state, param_shardings,
                                                               mesh)
  opt_state = _with_shardings(abstract_opt_state, opt_state_shardings)
  params_bytes, opt_bytes = per_device_bytes(params), per_device_bytes(opt_state)
  sampler_params_bytes = per_device_bytes(sampler_params) if interim else 0

  # The largest micro-batch, placed as `batch_placement.put_micro_batches` places it: every host's largest one (its
  # share of a mini-batch split by the token budget), stacked over the hosts.
  data_parallel = sharding_lib.data_parallel_size(mesh, rules)
  batch_np = worst_case_micro_batch(config, data_parallel, num_processes)
  process_rows = micro_batch_rows(config, num_processes)
  process_share = max(1, config.actor.ppo_mini_batch_size // num_processes) * config.rollout.n
  rows, width = batch_np["input_ids"].shape

  def placed(batch: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:  # rows over the data axes
    return {k: _abstract(v.shape, v.dtype, sharding_lib.logical_sharding(
        ("batch",) + (None,) * (v.ndim - 1), rules, mesh, v.shape)) for k, v in batch.items()}

  update_batch = placed(batch_np)
  # The old-log-prob pass's largest micro-batch: the same rows grouped by its own budget.
  log_prob_np = worst_case_micro_batch(config, data_parallel, num_processes,
                                       config_lib.log_prob_micro_batch_tokens(config))
  log_prob_rows = log_prob_np["input_ids"].shape[0]
  old_logp_batch = placed({k: log_prob_np[k] for k in old_log_probs.INPUTS})
  rows_per_device = update_batch["input_ids"].sharding.shard_shape(update_batch["input_ids"].shape)[0]
  totals = {"num_tokens": _abstract((), jnp.float32, replicated), "num_seqs": _abstract((), jnp.float32, replicated)}
  loss_config = step.LossConfig.from_config(config)
  # The update's programs as the training program builds them (params and optimizer state come back in place).
  updater = step.Updater(optimizer=optimizer, model_config=mc, loss_config=loss_config,
                         params_shardings=param_shardings, opt_state_shardings=opt_state_shardings, rules=rules)

  # The sampler as the training program builds it (`rollout_collection.make_sampler`), on the sampler's mesh. The
  # pool is sized below (`pool_pages`): these devices have no memory to ask.
  r = config.rollout

  def make_sampler(num_pages: int | None) -> sampler_lib.GroupSampler:
    return sampler_lib.GroupSampler(
        mc, num_slots=r.max_num_seqs, max_prompt_length=d.max_prompt_length,
        max_response_length=d.max_response_length, steps_per_call=r.decode_steps_per_call, mesh=sampler_mesh,
        page_size=r.page_size, num_pages=num_pages, memory_utilization=r.gpu_memory_utilization)

  sampler = make_sampler(r.num_pages or None)
  sampler_replicated = NamedSharding(sampler_mesh, PartitionSpec())
  slots = sampler.num_slots
  # A prefill call takes the prompts of one length bucket up to the sampler's token budget, padded to a power
  # of two rows (`SamplingRun._prefill_next`); the longest bucket is the largest call.
  prefill_width = batching.bucket_length(d.max_prompt_length, sampler.min_prefill_bucket)
  prefill_rows = 1 << (max(1, min(slots, sampler.prefill_token_budget // prefill_width)) - 1).bit_length()
  sampling = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                            top_k=config.rollout.top_k)

  programs: dict[str, ProgramMemory] = {}
  fwd = forward_flops(mc, rows, width, width)  # packed rows: the LM head runs on every position
  functions = sampler.functions
  # The decode weights: every array of them is new (`new_decode_arrays`), made from the interim copy of the
  # params, or from the trainer's params on one host.
  weights_source = sampler_params if interim else params
  programs["decode_weights"], weights_compiled = _compile("decode_weights", 0, functions.new_decode_arrays,
                                                          weights_source, greedy=sampling.greedy)
  weights = weights_bytes = None
  if weights_compiled is not None:
    new_arrays = jax.eval_shape(functools.partial(functions.new_decode_arrays, greedy=sampling.greedy),
                                weights_source)
    weights = weight_layout.with_tied_unembed(_with_shardings(new_arrays, weights_compiled.output_shardings), mc,
                                              sampling.greedy)
    weights_bytes = programs["decode_weights"].output_bytes

  # The KV pool: rollout.num_pages, else what `GroupSampler.pool_pages(decode_weights_made=False)` takes at the
  # training program's start, gpu_memory_utilization of each chip's free memory after what is resident then (the
  # trainer's params and optimizer state) and the decode weights that a run lays out.
  resident_at_sizing = params_bytes + opt_bytes + (
      weights_bytes if weights_bytes is not None
      else sampler._decode_weights_bytes_per_device())  # pylint: disable=protected-access
  free_at_sizing = max(hbm - resident_at_sizing, 0)
  num_pages = r.num_pages or sampler.pages_for_memory(free_at_sizing)
  # At least one page per shard, so that the programs have a shape to compile for (a pool too small to run is
  # reported as `pool_error`).
  num_pages = max(num_pages, sampler.page_shards)
  sampler = make_sampler(num_pages)
  try:
    sampler.pool_pages()
    pool_error = None
  except sampler_lib.PoolTooSmall as error:
    pool_error = str(error)
  state = _with_shardings(
      jax.eval_shape(lambda: decode_state.init_decode_state(mc, slots, num_pages, sampler.page_size,
                                                            keys_transposed=sampler.keys_transposed)),
      sampler.state_shardings)
  kv_bytes = per_device_bytes(state)
  pool_bytes = per_device_bytes((state.k, state.v))
  page_table = _abstract((slots, sampler.pages_per_slot), jnp.int32, sampler_replicated)

  # Prefill and decode steps read the decode weights (unknown without a compiled decode_weights: then neither is
  # compiled, and their phases count as not fitting).
  if weights is not None:
    programs["prefill"], _ = _compile(
        "prefill", forward_flops(mc, prefill_rows, prefill_width, 1), functions.prefill, weights,
        _abstract((prefill_rows, prefill_width), jnp.int32, sampler_replicated),
        _abstract((prefill_rows,), jnp.int32, sampler_replicated))
    programs["decode_steps"], _ = _compile(
        "decode_steps", sampler.steps_per_call * decode_step_flops(mc, slots, sampler.cache_length),
        functions.decode_steps, weights, state, page_table, num_steps=sampler.steps_per_call, sampling=sampling)
  programs["old_log_probs"], _ = _compile("old_log_probs", forward_flops(mc, log_prob_rows, width, width),
                                          updater.old_log_probs_fn, params, old_logp_batch)
  programs["micro_batch_gradients"], _ = _compile("micro_batch_gradients", 3 * fwd, updater.gradients_fn, params,
                                                  update_batch, totals)
  grads = _with_shardings(jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params),
                          param_shardings)
  grads_bytes = per_device_bytes(grads)
  programs["apply"], _ = _compile("apply", 0, updater.apply_fn, params, opt_state, grads,
                                  _abstract((), jnp.float32, replicated))

  # What stays on the chip beside each program. The rollout keeps the trainer's params and optimizer state (on one
  # host the params are decode_weights' argument); its run holds the decode weights and the decode state (the KV
  # pool) from `decode_weights` on, so the prefill phase covers `insert` too (which writes a prefill's output into
  # the pool in place). The pool is freed when the run closes, before the update. Summing gradients (sum + new
  # gradients) holds no more than the gradient phase at its end.
  trainer = {"params": params_bytes, "optimizer_state": opt_bytes}
  phase_specs = [
      ("rollout: decode weights", "decode_weights", dict(trainer) if interim else {"optimizer_state": opt_bytes}),
      # prefill reads the decode weights; decode_steps the decode weights and the pool.
      ("rollout: prefill", "prefill", dict(trainer, kv_pool=kv_bytes)),
      ("rollout: decode steps", "decode_steps", dict(trainer)),
      ("old log-probs", "old_log_probs", {"optimizer_state": opt_bytes}),
      ("micro-batch gradients", "micro_batch_gradients", {"optimizer_state": opt_bytes,
                                                          "gradient_sum": grads_bytes}),
      ("optimizer update", "apply", {}),
  ]
  phases = []
  for name, program_name, resident in phase_specs:
    # Without a compiled decode_weights, neither the decode weights' size nor their layout (which prefill and
    # decode_steps are compiled for) is known: such a phase has no peak and counts as not fitting.
    program = programs.get(program_name)
    program_peak = None if program is None else program.peak_bytes if program.fits else program.required_bytes
    known = program_peak is not None and None not in resident.values()
    peak = sum(resident.values()) + program_peak if known else None
    phases.append(Phase(name, program_name, resident, peak, known and program.fits and peak <= hbm))
  sized = [p for p in phases if p.peak_bytes is not None]
  worst = max(sized, key=lambda p: p.peak_bytes) if sized else phases[0]
  rollout = rollout_section(
      sampler, num_pages=num_pages, sized_by=("rollout.num_pages" if r.num_pages else "gpu_memory_utilization"),
      free_bytes_at_sizing=free_at_sizing, pool_bytes=pool_bytes,
      weight_bytes=weights_bytes,
      group_size=r.n, mean_response_length=mean_response_length, prefill_rows=prefill_rows,
      prefill_width=prefill_width, pool_error=pool_error)
  return Plan(
      topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices), hbm_bytes=hbm,
      hbm_source=hbm_source, mesh=dict(mesh.shape), mesh_layout=mesh_layout, num_processes=num_processes,
      rows_split_between_hosts=sharding_lib.rows_split_between_processes(mesh, rules),
      config_error=config_error(config, model_name, num_processes),
      sampler_mesh=dict(sampler_mesh.shape),
      model=model_name, num_params=mc.num_params(),
      micro_batch=dict(rows=rows, width=width, tokens=rows * width,
                       padding_rows=rows - num_processes * process_rows, rows_per_device=rows_per_device,
                       data_parallel=data_parallel, rows_per_host=process_rows,
                       mini_batch_rows_per_host=process_share,
                       micro_batches_per_update=-(-process_share // process_rows),
                       log_prob_rows=log_prob_rows),
      rollout=rollout,
      per_chip=dict(params=params_bytes, optimizer_state=opt_bytes, gradients=grads_bytes,
                    sampler_params=sampler_params_bytes, decode_weights=weights_bytes, kv_pool=kv_bytes),
      programs=list(programs.values()), phases=phases, peak_bytes=worst.peak_bytes, peak_phase=worst.name,
      fits=pool_error is None and all(p.fits for p in phases), plan_seconds=time.perf_counter() - plan_start)


def rollout_section(sampler: sampler_lib.GroupSampler, *, num_pages: int, sized_by: str, free_bytes_at_sizing: int,
                    pool_bytes: int, weight_bytes: int | None, group_size: int, mean_response_length: int,
                    prefill_rows: int, prefill_width: int, pool_error: str | None = None) -> dict[str, Any]:
  """The plan's `rollout` section: one host's sampler (its mesh is the host's own devices, or the one host's), its
  KV pool and the sequences of max_prompt_length + `mean_response_length` tokens it decodes at once
  (`concurrent_sequences`: no more than its decode rows, nor than its pool's pages hold; responses longer than
  max_response_length are counted at that length, `counted_response_length`)."""
  counted = min(mean_response_length, sampler.max_response_length)
  return dict(
      decode_rows_per_host=sampler.num_slots, steps_per_call=sampler.steps_per_call,
      prefill_rows=prefill_rows, prefill_width=prefill_width,
      page_size=sampler.page_size, pages=num_pages, pages_per_host=num_pages, page_shards=sampler.page_shards,
      pages_per_slot=sampler.pages_per_slot, cache_length=sampler.cache_length,
      pool_bytes_per_chip=pool_bytes, pool_gib_per_chip=round(pool_bytes / GIB, 2),
      page_bytes_per_chip=sampler.page_bytes_per_device(),
      sized_by=sized_by, memory_utilization=sampler.memory_utilization,
      free_bytes_per_chip_at_sizing=free_bytes_at_sizing, weight_bytes_per_chip=weight_bytes,
      mean_response_length=mean_response_length, counted_response_length=counted,
      concurrent_sequences_per_host=concurrent_sequences(
          num_slots=sampler.num_slots, page_shards=sampler.page_shards,
          pages_per_shard=num_pages // sampler.page_shards, page_size=sampler.page_size,
          prompt_length=sampler.max_prompt_length, response_length=counted, group_size=group_size),
      pool_error=pool_error)
