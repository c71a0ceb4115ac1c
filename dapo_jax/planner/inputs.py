"""What is planned: the model, the mesh and the worst-case shapes of a training config, and analytic FLOPs.

FLOPs are counted analytically: XLA's `cost_analysis()` counts a scanned layer loop's body once.
"""
from collections.abc import Mapping, Sequence
import json
import math
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from dapo_jax import config as config_lib
from dapo_jax import sharding as sharding_lib
from dapo_jax.model import hf_io
from dapo_jax.model.config import PRESETS, Qwen2Config, get_preset
from dapo_jax.rl import batching


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
  # The plan needs no data: file names stand in for the recipe's required data keys (they are not opened).
  checked.data.train_files = checked.data.train_files or "planned.parquet"
  checked.data.val_files = checked.data.val_files or ""
  extra = tuple(key for key in checked if key not in config_lib.base_config())
  try:
    config_lib.validate(checked, extra_sections=extra, num_processes=num_processes)
  except config_lib.ConfigError as error:
    return str(error)
  return None


def num_processes_of(devices: Sequence[jax.Device]) -> int:
  """Processes (hosts) of a topology: one per distinct `process_index` among its devices."""
  return len({d.process_index for d in devices})


def _row_width(config: ml_collections.ConfigDict) -> int:
  """The packed row width of full-length trajectories (`batching.packed_row_width`, capped as train.py caps it)."""
  d = config.data
  longest = d.max_prompt_length + d.max_response_length
  return batching.packed_row_width([longest], longest)


def micro_batch_rows(config: ml_collections.ConfigDict, num_processes: int = 1, budget: int | None = None) -> int:
  """Rows of a process's largest micro-batch: its share of a mini-batch (actor.ppo_mini_batch_size /
  `num_processes` groups of rollout.n, as `train.py` deals them out) of full-length trajectories, one a row,
  packed into micro-batches of `budget` // row width rows (`batching.training_batches`, which runs on each
  process's share). `budget` defaults to the update's, actor.micro_batch_tokens; the old-log-prob pass's is
  `config.log_prob_micro_batch_tokens(config)` (`old_log_probs.add_old_log_probs`).
  Attention makes the longest rows the worst case: its scores grow with the square of the row width."""
  budget = config.actor.micro_batch_tokens if budget is None else budget
  count = max(1, config.actor.ppo_mini_batch_size // num_processes) * config.rollout.n
  return min(count, max(1, budget // _row_width(config)))


def global_micro_batch_rows(config: ml_collections.ConfigDict, data_parallel: int = 1, num_processes: int = 1,
                            budget: int | None = None) -> int:
  """Rows of the global micro-batch that `batch_placement.put_micro_batches` builds from every process's largest one:
  each process's rows padded up to a multiple of the row blocks it holds (data_parallel / num_processes; a mesh
  from `sharding.make_mesh` gives every process the same number), stacked over the processes."""
  if data_parallel % num_processes:
    raise ValueError(f"{num_processes} processes cannot split {data_parallel} blocks of batch rows between them "
                     "(sharding.rows_split_between_processes)")
  blocks = data_parallel // num_processes
  return num_processes * (-(-micro_batch_rows(config, num_processes, budget) // blocks) * blocks)


def worst_case_micro_batch(config: ml_collections.ConfigDict, data_parallel: int = 1, num_processes: int = 1,
                           budget: int | None = None) -> dict[str, np.ndarray]:
  """The largest global micro-batch (`global_micro_batch_rows` for `budget`) of full-length trajectories packed by
  `batching.pack` as the training program packs them (one a row), with the arrays it adds (advantages and
  sampler log-probs in `batching.training_batches`, old log-probs in `old_log_probs.add_old_log_probs`)."""
  d = config.data
  rows = global_micro_batch_rows(config, data_parallel, num_processes, budget)
  batch = batching.pack([[1] * d.max_prompt_length] * rows, [[1] * d.max_response_length] * rows,
                        [[i] for i in range(rows)], row_width=_row_width(config), pad_id=0,
                        advantages=np.zeros(rows, np.float32),
                        sampler_logps=[np.zeros(d.max_response_length, np.float32)] * rows)
  batch["old_logp"] = np.zeros_like(batch["sampler_logp"])
  return batch


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
# The rollout's KV pool.


def concurrent_sequences(*, num_slots: int, page_shards: int, pages_per_shard: int, page_size: int,
                         prompt_length: int, response_length: int, group_size: int) -> int:
  """Sequences of `prompt_length` + `response_length` tokens that decode at once on a sampler's slots and pool:
  in each of its `page_shards` blocks of pages (a slot takes pages of its own block only: `page_table.py`), no
  more than the block's slots (num_slots / page_shards), nor more than its pages hold, where the samples of a
  group of `group_size` share the prompt's full pages (floor(prompt_length / page_size), written once per group
  and block, as `sampling_run` writes them) and each sequence holds the rest of its pages on its own
  (ceil((prompt_length + response_length) / page_size) minus the shared ones). Whole groups first; the pages left
  over hold a last group's first samples."""
  if min(num_slots, page_shards, page_size, response_length, group_size) < 1 or prompt_length < 0:
    raise ValueError("concurrent_sequences: sizes must be positive")
  shared = prompt_length // page_size
  own = -(-(prompt_length + response_length) // page_size) - shared
  groups, left = divmod(pages_per_shard, shared + group_size * own)
  sequences = groups * group_size + max(0, min(group_size - 1, (left - shared) // own))
  return page_shards * min(num_slots // page_shards, sequences)
