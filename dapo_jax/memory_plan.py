"""Per-chip memory of a training config on a TPU slice, planned on any host by ahead-of-time compilation.

With libtpu installed (`requirements-tpu.txt`), XLA's TPU compiler builds programs for a slice that is not
attached (`jax.experimental.topologies`). Each device function of a rollout step is compiled here exactly as
the training program calls it, with the config's worst-case shapes and the program's shardings:

  rollout: `decode_weights`, `prefill` (a full prefill batch of the longest prompt bucket) and `decode_steps`
           (the config's decode slots, each with a KV cache of prompt + response length, attending to all of
           it), from `dapo_jax/rollout/decoding.py` through a `GroupSampler` on the sampler's mesh (the
           trainer's on one host; with several hosts each samples on its own chips, tensor parallel, as
           `train.py` does), reading the sampler's copy of the params (`sharding.decode_rules`, in the compute
           dtype);
  update:  `old_log_probs`, `_micro_batch_gradients` and `_apply` from `dapo_jax/rl/step.py`, on the
           micro-batch that `batching.split_by_token_budget` and `batching.collate` make when every trajectory
           of a mini-batch has the longest prompt and response: on each host its share of the mini-batch
           (actor.ppo_mini_batch_size / hosts groups) split by actor.micro_batch_tokens, every host's rows
           stacked into one global micro-batch as `sharding.put_micro_batches` does (hosts = the distinct
           `process_index` of the topology's devices); the mesh is laid out as `sharding.make_mesh` lays it.

`compiled.memory_analysis()` gives each program's per-chip argument, output, temporary and aliased bytes and
its peak. A program alone can miss what stays on the chip while it runs (the optimizer state during the
forward passes, the gradient sum between micro-batches), so the plan adds those: a phase's peak is the resident
buffers that are not the program's arguments plus the program's peak. A program that cannot fit at all fails to
compile with RESOURCE_EXHAUSTED; the plan keeps the compiler's numbers and marks it as not fitting.

FLOPs are counted analytically: XLA's `cost_analysis()` counts a scanned layer loop's body once.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from dapo_jax import config as config_lib
from dapo_jax import sharding as sharding_lib
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model.config import PRESETS, Qwen2Config, get_preset
from dapo_jax.rl import batching
from dapo_jax.rl import step
from dapo_jax.rollout import decoding
from dapo_jax.rollout import sampler as sampler_lib
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


# ------------------------------------------------------------------------------------------------------------
# What is planned: the model, the mesh and the shapes of the config.


def model_config(config: ml_collections.ConfigDict, model: str | None = None) -> tuple[str, Qwen2Config]:
  """(name, shape and numerics) of the policy: `model` (a preset name or a Hugging Face directory), else the
  config's `model.hf_checkpoint` (its config.json), else its `model.preset`, as the training program picks."""
  numerics = dict(dtype=config_lib.DTYPES[config.model.dtype], param_dtype=config_lib.DTYPES[config.model.param_dtype],
                  remat=bool(config.model.remat))
  for source in (model, config.model.hf_checkpoint, config.model.preset):
    if not source:
      continue
    path = os.path.join(os.path.expanduser(source), hf_io.CONFIG_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        return source, hf_io.config_from_hf(json.load(f), source=path, **numerics)
    if source in PRESETS:
      return source, get_preset(source, **numerics)
    if source == model:
      raise ValueError(f"model {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory "
                       f"with a {hf_io.CONFIG_FILE}")
  raise ValueError("No model shape: the config's model.hf_checkpoint has no config.json here and it sets no "
                   "model.preset; pass the model (a preset name such as qwen2.5-32b, or a checkpoint directory)")


def model_from_file_name(path: str) -> str | None:
  """The Qwen2.5 preset a config file is named after (dapo_qwen2_5_32b.py -> qwen2.5-32b), if any."""
  match = re.search(r"qwen2_5_(\d+(?:_\d+)?)b", os.path.basename(path))
  name = match and f"qwen2.5-{match.group(1).replace('_', '.')}b"
  return name if name in PRESETS else None


def mesh_for(devices: Sequence[jax.Device], mesh_config: Mapping[str, Any], rules=sharding_lib.DEFAULT_RULES
             ) -> tuple[jax.sharding.Mesh, str]:
  """The config's mesh over a topology's devices as `sharding.make_mesh` lays it out on a real slice (with
  several hosts, tensor groups within a host), and the sentence saying which layout that is and why.

  TPU v4 topologies list each chip's two TensorCores as devices, which jax's physical mesh layout refuses
  (it wants one device per chip); on one host the devices are then taken in order, which changes no memory
  figure.
  """
  shape = {name: mesh_config[name] for name in sharding_lib.MESH_AXES if name in mesh_config}
  try:
    return sharding_lib.mesh_and_layout(shape, devices, rules)
  except NotImplementedError as error:
    # On one host jax lays each mesh axis along whole physical axes of the slice and refuses other sizes, as
    # the training program would on this slice (with several hosts make_mesh lays them out process-major).
    raise ValueError(f"mesh {shape} cannot be laid out on this slice: {error}") from None
  except AssertionError:
    sizes = [int(shape.get(name, 1)) for name in sharding_lib.MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    grid = np.asarray(list(devices)[:math.prod(sizes)], dtype=object).reshape(sizes)
    return (jax.sharding.Mesh(grid, sharding_lib.MESH_AXES,
                              axis_types=(jax.sharding.AxisType.Auto,) * len(sharding_lib.MESH_AXES)),
            "devices in order (jax's physical layout refuses this topology's devices)")


def sampler_mesh_for(devices: Sequence[jax.Device], mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """Where `train.py` samples: on the trainer's mesh when the slice has one host, else each host on its own
  devices (`sharding.process_local_mesh()`: all of them on the tensor axis, in id order), planned here for the
  host of process 0 (every host's share is the same)."""
  own = sorted((d for d in devices if d.process_index == devices[0].process_index), key=lambda d: d.id)
  if len(own) == len(devices):
    return mesh
  grid = np.asarray(own, dtype=object).reshape(1, 1, len(own))
  return jax.sharding.Mesh(grid, sharding_lib.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(sharding_lib.MESH_AXES))


def config_error(config: ml_collections.ConfigDict, model: str, num_processes: int) -> str | None:
  """What `config.validate` says of the config on a slice of `num_processes` hosts (e.g. batch sizes that the
  hosts cannot share equally), with the planned model standing in for the checkpoint; None if it is valid."""
  checked = ml_collections.ConfigDict(config.to_dict())
  if not (checked.model.hf_checkpoint or checked.model.preset):
    checked.model.preset = model
  extra = tuple(key for key in checked if key not in config_lib.base_config())
  try:
    config_lib.validate(checked, extra_sections=extra, num_processes=num_processes)
  except config_lib.ConfigError as error:
    return str(error)
  return None


def _rules(config: ml_collections.ConfigDict):
  return tuple(config.mesh.rules) if "rules" in config.mesh else sharding_lib.DEFAULT_RULES


def num_processes_of(devices: Sequence[jax.Device]) -> int:
  """Processes (hosts) of a topology: one per distinct `process_index` among its devices."""
  return len({d.process_index for d in devices})


def _max_widths(config: ml_collections.ConfigDict) -> dict[str, int]:
  # train.py's cap on the length buckets (`batching.collate`).
  return dict(max_prompt_width=config.data.max_prompt_length, max_response_width=config.data.max_response_length)


def micro_batch_rows(config: ml_collections.ConfigDict, num_processes: int = 1) -> int:
  """Rows of a process's largest micro-batch: its share of a mini-batch (actor.ppo_mini_batch_size /
  `num_processes` groups of rollout.n, as `train.py` deals them out) of full-length trajectories, split by the
  config's token budget (`batching.split_by_token_budget`, which train.py runs on each process's share).
  Attention makes the longest rows the worst case: its scores grow with the square of the row width."""
  d = config.data
  count = max(1, config.actor.ppo_mini_batch_size // num_processes) * config.rollout.n
  groups = batching.split_by_token_budget([d.max_prompt_length] * count, [d.max_response_length] * count,
                                          config.actor.micro_batch_tokens, **_max_widths(config))
  return len(groups[0])


def global_micro_batch_rows(config: ml_collections.ConfigDict, data_parallel: int = 1, num_processes: int = 1
                            ) -> int:
  """Rows of the global micro-batch that `sharding.put_micro_batches` builds from every process's largest one:
  each process's rows padded up to a multiple of the row blocks it holds (data_parallel / num_processes; a mesh
  from `sharding.make_mesh` gives every process the same number), stacked over the processes."""
  if data_parallel % num_processes:
    raise ValueError(f"{num_processes} processes cannot split {data_parallel} blocks of batch rows between them "
                     "(sharding.rows_split_between_processes)")
  blocks = data_parallel // num_processes
  return num_processes * (-(-micro_batch_rows(config, num_processes) // blocks) * blocks)


def worst_case_micro_batch(config: ml_collections.ConfigDict, data_parallel: int = 1, num_processes: int = 1
                           ) -> dict[str, np.ndarray]:
  """The largest global micro-batch (`global_micro_batch_rows`) padded by `batching.collate` as train.py pads
  it (length buckets capped at data.max_prompt_length / data.max_response_length), with the arrays `train.py`
  adds (advantages, sampler and old log-probs)."""
  d = config.data
  rows = global_micro_batch_rows(config, data_parallel, num_processes)
  batch = batching.collate([[1] * d.max_prompt_length] * rows, [[1] * d.max_response_length] * rows, pad_id=0,
                           **_max_widths(config))
  width = batch["response_ids"].shape[1]
  batch["advantages"] = np.zeros((rows,), np.float32)
  batch["sampler_logp"] = np.zeros((rows, width), np.float32)
  batch["old_logp"] = np.zeros((rows, width), np.float32)
  return batch


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda leaf, s: _abstract(leaf.shape, leaf.dtype, s), tree, shardings)


def per_device_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded `ShapeDtypeStruct`s."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------------------
# Analytic FLOPs (the programs compute attention over the full rectangle of positions and mask it).


def _layer_matmul_params(mc: Qwen2Config) -> int:
  q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
  return mc.num_layers * (mc.hidden_size * (2 * q + 2 * kv) + 3 * mc.hidden_size * mc.intermediate_size)


def _attention_flops(mc: Qwen2Config, queries: int, keys: int) -> int:
  return 4 * mc.num_layers * mc.num_heads * mc.head_dim * queries * keys


def forward_flops(mc: Qwen2Config, rows: int, length: int, head_positions: int) -> int:
  """FLOPs of one forward pass of `rows` sequences of `length` tokens, the LM head on `head_positions` each."""
  return rows * (2 * _layer_matmul_params(mc) * length + 2 * mc.hidden_size * mc.vocab_size * head_positions
                 + _attention_flops(mc, length, length))


def decode_step_flops(mc: Qwen2Config, slots: int, cache_length: int) -> int:
  """FLOPs of one decode step of every slot (attention over the whole cache, masked)."""
  return slots * (2 * (_layer_matmul_params(mc) + mc.hidden_size * mc.vocab_size)
                  + _attention_flops(mc, 1, cache_length))


# ------------------------------------------------------------------------------------------------------------
# Compiling and reporting.


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
  micro_batch: dict[str, Any]   # the global micro-batch: rows, prompt_width, response_width, tokens,
                                # padding_rows (added to fill the data-parallel shards), rows_per_device,
                                # data_parallel; and each host's part: rows_per_host (the token budget's rows,
                                # unpadded), mini_batch_rows_per_host, micro_batches_per_update (per host)
  decode: dict[str, Any]        # slots, cache_length, steps_per_call, prefill_rows, prefill_width
  per_chip: dict[str, int | None]  # bytes: params, optimizer_state, gradients, sampler_params, decode_weights,
                                # kv_cache
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


def plan(config: ml_collections.ConfigDict, topology: str, *, model: str | None = None) -> Plan:
  """Compiles the rollout step's device functions of `config` for a TPU `topology` (e.g. "v5p:4x4x4")."""
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

  # The trainer's params and optimizer state, and the sampler's copy of the params (tensor parallel only:
  # `sharding.decode_rules`), which the rollout holds beside them.
  abstract = qwen2.abstract_model(mc)
  param_shardings = sharding_lib.param_shardings(abstract, mesh, rules)
  params = _with_shardings(abstract.params, param_shardings)
  sampler_mesh = sampler_mesh_for(devices, mesh)
  # In the compute dtype, as `train.py` makes it (`_sampler_params`).
  sampler_params = _with_shardings(
      jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(mc.dtype), p), abstract.params),
      sharding_lib.param_shardings(abstract, sampler_mesh, sharding_lib.decode_rules(rules)))
  optim = config.actor.optim
  optimizer = step.make_optimizer(learning_rate=optim.lr, b1=optim.b1, b2=optim.b2,
                                  weight_decay=optim.weight_decay, grad_clip=optim.grad_clip)
  abstract_opt_state = jax.eval_shape(optimizer.init, params)
  opt_state = _with_shardings(abstract_opt_state, sharding_lib.optimizer_state_shardings(
      optimizer, abstract_opt_state, param_shardings, mesh))
  params_bytes, opt_bytes = per_device_bytes(params), per_device_bytes(opt_state)
  sampler_params_bytes = per_device_bytes(sampler_params)
  # The sampler params' embedding, final norm and LM head, which decode steps read in place.
  head_bytes = per_device_bytes({name: sampler_params[name] for name in ("embed", "final_norm", "lm_head")
                                 if name in sampler_params})

  # The largest micro-batch, placed as `sharding.put_micro_batches` places it: every host's largest one (its
  # share of a mini-batch split by the token budget), stacked over the hosts.
  data_parallel = sharding_lib.data_parallel_size(mesh, rules)
  batch_np = worst_case_micro_batch(config, data_parallel, num_processes)
  process_rows = micro_batch_rows(config, num_processes)
  process_share = max(1, config.actor.ppo_mini_batch_size // num_processes) * config.rollout.n
  rows, prompt_width = batch_np["prompt_ids"].shape
  response_width = batch_np["response_ids"].shape[1]
  update_batch = {k: _abstract(v.shape, v.dtype, sharding_lib.logical_sharding(
      ("batch",) + (None,) * (v.ndim - 1), rules, mesh, v.shape)) for k, v in batch_np.items()}
  old_logp_batch = {k: v for k, v in update_batch.items() if k != "old_logp"}
  rows_per_device = update_batch["prompt_ids"].sharding.shard_shape(update_batch["prompt_ids"].shape)[0]
  totals = {"num_tokens": _abstract((), jnp.float32, replicated), "num_seqs": _abstract((), jnp.float32, replicated)}
  loss_config = step.LossConfig(
      clip_low=config.actor.clip_ratio_low, clip_high=config.actor.clip_ratio_high,
      clip_c=config.actor.clip_ratio_c, agg_mode=config.actor.loss_agg_mode,
      entropy_coeff=config.actor.entropy_coeff, temperature=config.rollout.temperature,
      tis_cap=config.actor.tis_cap, logits_chunk_size=config.actor.logits_chunk_size)
  # The static sharding declarations `update_step` passes (params and optimizer state come back in place).
  # pylint: disable=protected-access
  params_declared = step._declared_shardings(params)
  state_declared = step._optimizer_state_declared(optimizer, opt_state, params_declared)
  # pylint: enable=protected-access

  # The sampler as the training program builds it, on the sampler's mesh.
  sampler = sampler_lib.GroupSampler(mc, num_slots=config.rollout.max_concurrent_decodes,
                                     max_prompt_length=d.max_prompt_length,
                                     max_response_length=d.max_response_length,
                                     steps_per_call=config.rollout.decode_steps_per_call, mesh=sampler_mesh)
  sampler_replicated = NamedSharding(sampler_mesh, PartitionSpec())
  slots = sampler.num_slots
  state = _with_shardings(
      jax.eval_shape(lambda: decoding.init_decode_state(mc, slots, sampler.cache_length,
                                                        keys_transposed=sampler.keys_transposed)),
      sampler.state_shardings)
  kv_bytes = per_device_bytes(state)
  # A prefill call takes the prompts of one length bucket up to the sampler's token budget, padded to a power
  # of two rows (`SamplingRun._prefill_next`); the longest bucket is the largest call.
  prefill_width = decoding.bucket_length(d.max_prompt_length, sampler.min_prefill_bucket)
  prefill_rows = 1 << (max(1, min(slots, sampler.prefill_token_budget // prefill_width)) - 1).bit_length()
  sampling = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                            top_k=config.rollout.top_k)

  programs: dict[str, ProgramMemory] = {}
  length = prompt_width + response_width
  fwd = forward_flops(mc, rows, length, response_width)
  functions = sampler.functions
  # The decode weights: the arrays `new_decode_arrays` lays out anew, and the sampler params' own head.
  programs["decode_weights"], weights_compiled = _compile("decode_weights", 0, functions.new_decode_arrays,
                                                          sampler_params, greedy=sampling.greedy)
  weights_bytes = programs["decode_weights"].output_bytes if weights_compiled is not None else None
  programs["prefill"], _ = _compile(
      "prefill", forward_flops(mc, prefill_rows, prefill_width, 1), functions.prefill, sampler_params,
      _abstract((prefill_rows, prefill_width), jnp.int32, sampler_replicated),
      _abstract((prefill_rows,), jnp.int32, sampler_replicated))
  if weights_compiled is not None:
    new_arrays = jax.eval_shape(functools.partial(functions.new_decode_arrays, greedy=sampling.greedy),
                                sampler_params)
    weights = decoding.assemble_decode_weights(
        sampler_params, _with_shardings(new_arrays, weights_compiled.output_shardings), sampling.greedy)
    programs["decode_steps"], _ = _compile(
        "decode_steps", sampler.steps_per_call * decode_step_flops(mc, slots, sampler.cache_length),
        functions.decode_steps, weights, state, num_steps=sampler.steps_per_call, sampling=sampling)
  # pylint: disable=protected-access
  programs["old_log_probs"], _ = _compile(
      "old_log_probs", fwd, step._old_log_probs, params, old_logp_batch, model_config=mc,
      temperature=config.rollout.temperature, chunk_size=config.actor.logits_chunk_size,
      out_sharding=old_logp_batch["response_mask"].sharding)
  programs["micro_batch_gradients"], _ = _compile(
      "micro_batch_gradients", 3 * fwd, step._micro_batch_gradients, params, update_batch, totals,
      model_config=mc, loss_config=loss_config, declared=params_declared)
  grads = _with_shardings(jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params),
                          param_shardings)
  grads_bytes = per_device_bytes(grads)
  programs["apply"], _ = _compile("apply", 0, step._apply, params, opt_state, grads, float(optim.lr),
                                  optimizer=optimizer, params_declared=params_declared,
                                  state_declared=state_declared)
  # pylint: enable=protected-access

  # What stays on the chip beside each program. The rollout keeps the trainer's params and optimizer state;
  # its run holds the decode weights and the decode state from `decode_weights` on, so the prefill phase
  # covers `insert` too (which writes a prefill's output into that state in place). `_add` (gradient sum +
  # new gradients) holds no more than the gradient phase at its end.
  trainer = {"params": params_bytes, "optimizer_state": opt_bytes}
  phase_specs = [
      ("rollout: decode weights", "decode_weights", dict(trainer)),
      ("rollout: prefill", "prefill", dict(trainer, decode_weights=weights_bytes, kv_cache=kv_bytes)),
      # decode_steps reads the sampler params' head among its arguments; the rest of them stays beside it.
      ("rollout: decode steps", "decode_steps", dict(trainer, sampler_params=sampler_params_bytes - head_bytes)),
      ("old log-probs", "old_log_probs", {"optimizer_state": opt_bytes}),
      ("micro-batch gradients", "micro_batch_gradients", {"optimizer_state": opt_bytes,
                                                          "gradient_sum": grads_bytes}),
      ("optimizer update", "apply", {}),
  ]
  phases = []
  for name, program_name, resident in phase_specs:
    # Without a compiled decode_weights, neither the decode weights' size nor their layout (which decode_steps
    # is compiled for) is known: such a phase has no peak and counts as not fitting.
    program = programs.get(program_name)
    program_peak = None if program is None else program.peak_bytes if program.fits else program.required_bytes
    known = program_peak is not None and None not in resident.values()
    peak = sum(resident.values()) + program_peak if known else None
    phases.append(Phase(name, program_name, resident, peak, known and program.fits and peak <= hbm))
  sized = [p for p in phases if p.peak_bytes is not None]
  worst = max(sized, key=lambda p: p.peak_bytes) if sized else phases[0]
  return Plan(
      topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices), hbm_bytes=hbm,
      hbm_source=hbm_source, mesh=dict(mesh.shape), mesh_layout=mesh_layout, num_processes=num_processes,
      rows_split_between_hosts=sharding_lib.rows_split_between_processes(mesh, rules),
      config_error=config_error(config, model_name, num_processes),
      sampler_mesh=dict(sampler_mesh.shape),
      model=model_name, num_params=mc.num_params(),
      micro_batch=dict(rows=rows, prompt_width=prompt_width, response_width=response_width, tokens=rows * length,
                       padding_rows=rows - num_processes * process_rows, rows_per_device=rows_per_device,
                       data_parallel=data_parallel, rows_per_host=process_rows,
                       mini_batch_rows_per_host=process_share,
                       micro_batches_per_update=-(-process_share // process_rows)),
      decode=dict(slots=slots, cache_length=sampler.cache_length, steps_per_call=sampler.steps_per_call,
                  prefill_rows=prefill_rows, prefill_width=prefill_width),
      per_chip=dict(params=params_bytes, optimizer_state=opt_bytes, gradients=grads_bytes,
                    sampler_params=sampler_params_bytes, decode_weights=weights_bytes, kv_cache=kv_bytes),
      programs=list(programs.values()), phases=phases, peak_bytes=worst.peak_bytes, peak_phase=worst.name,
      fits=all(p.fits for p in phases), plan_seconds=time.perf_counter() - plan_start)


def gib(value: int | None) -> str:
  """Bytes as GiB with two decimals ("?" for unknown)."""
  return "?" if value is None else f"{value / GIB:.2f}"


def format_plan(p: Plan) -> str:
  """A human-readable report of one plan (GiB per chip)."""
  mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
  mb, dec = p.micro_batch, p.decode
  sharded = f"{mb['rows_per_device']} per device"
  if mb["padding_rows"]:
    sharded += f", {mb['padding_rows']} of them padding (the token budget gives fewer rows than data x fsdp)"
  share = "a mini-batch" if p.num_processes == 1 else f"each of the {p.num_processes} hosts' share of a mini-batch"
  count = mb["micro_batches_per_update"]
  made = (f"  {share} ({mb['mini_batch_rows_per_host']} rows) is split by actor.micro_batch_tokens into "
          f"{count} micro-batch{'es' if count > 1 else ''} of up to {mb['rows_per_host']} "
          f"row{'s' if mb['rows_per_host'] > 1 else ''}")
  where = ""
  if p.num_processes > 1:
    sampler_mesh = " ".join(f"{k}={v}" for k, v in p.sampler_mesh.items())
    where = f" per host (each of the {p.num_processes} hosts samples on its own chips: mesh {sampler_mesh})"
  lines = [
      f"{p.topology}: {p.num_devices} x {p.device_kind}, {gib(p.hbm_bytes)} GiB HBM each ({p.hbm_source}); "
      f"mesh {mesh}; model {p.model} ({p.num_params / 1e9:.2f}B params)",
      f"  mesh layout: {p.mesh_layout}",
      f"  micro-batch: {mb['rows']} rows x ({mb['prompt_width']} + {mb['response_width']}) tokens, {sharded};",
      made,
      f"  rollout: {dec['slots']} decode slots{where} x {dec['cache_length']} cache entries, "
      f"{dec['steps_per_call']} decode step{'s' if dec['steps_per_call'] > 1 else ''} per call; "
      f"prefill {dec['prefill_rows']} x {dec['prefill_width']}",
      "  per chip (GiB): " + ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in p.per_chip.items()),
      f"  {'program':<22} {'args':>8} {'out':>8} {'temp':>8} {'alias':>8} {'peak':>8} {'compile s':>10} "
      f"{'TFLOP/call':>11}",
  ]
  for r in p.programs:
    if r.fits:
      lines.append(f"  {r.name:<22} {gib(r.argument_bytes):>8} {gib(r.output_bytes):>8} {gib(r.temp_bytes):>8} "
                   f"{gib(r.alias_bytes):>8} {gib(r.peak_bytes):>8} {r.compile_seconds:>10.1f} "
                   f"{r.flops / 1e12:>11.1f}")
    else:
      lines.append(f"  {r.name:<22} does not fit: needs {gib(r.required_bytes)} of {gib(r.available_bytes)} "
                   f"GiB ({r.compile_seconds:.1f} s)")
  lines.append(f"  {'phase':<24} {'resident':>9} {'peak':>8}  fits")
  for ph in p.phases:
    resident = None if None in ph.resident.values() else sum(ph.resident.values())
    lines.append(f"  {ph.name:<24} {gib(resident):>9} {gib(ph.peak_bytes):>8}  "
                 f"{'yes' if ph.fits else 'NO'}")
  if not p.rows_split_between_hosts:
    lines.append(f"  !! sharding.put_micro_batches refuses this mesh on {p.num_processes} hosts: blocks of batch rows "
                 "span several hosts (lay the non-batch mesh axes, e.g. tensor, within a host)")
  if p.config_error:
    lines.append(f"  !! the training program refuses the config on {p.num_processes} hosts: {p.config_error}")
  verdict = "fits in HBM" if p.fits else "DOES NOT FIT in HBM"
  lines.append(f"  => {verdict}: peak {gib(p.peak_bytes)} of {gib(p.hbm_bytes)} GiB per chip ({p.peak_phase}); "
               f"planned in {p.plan_seconds:.0f} s")
  return "\n".join(lines)


def format_summary(plans: Sequence[Plan]) -> str:
  """One line per plan: the table of the README."""
  lines = ["| topology | chips (hosts) | mesh (data, fsdp, tensor) | micro-batch rows x tokens (per device) | "
           "decode slots per host | peak GiB (phase) | HBM GiB | fits | rows placeable |",
           "|---|---|---|---|---|---|---|---|---|"]
  for p in plans:
    mb = p.micro_batch
    mesh = ", ".join(str(v) for v in p.mesh.values())
    lines.append(f"| {p.topology} | {p.num_devices} ({p.num_processes}) | {mesh} | "
                 f"{mb['rows']} x {mb['tokens'] // mb['rows']} ({mb['rows_per_device']}) | {p.decode['slots']} | "
                 f"{gib(p.peak_bytes)} ({p.peak_phase}) | {gib(p.hbm_bytes)} | {'yes' if p.fits else 'no'} | "
                 f"{'yes' if p.rows_split_between_hosts else 'no'} |")
  return "\n".join(lines)
