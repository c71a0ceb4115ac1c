"""Batches placed on the mesh: rows over the data-parallel axes, each process supplying its own rows.

`put_micro_batches` pads every micro-batch with rows that change no loss, gradient or metric, and on several hosts
has the processes agree on the micro-batches' number and shapes so that each runs the same computations.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh
import numpy as np

from dapo_jax import distributed
from dapo_jax.sharding import DEFAULT_RULES, data_parallel_size, logical_sharding, rows_split_between_processes


def _local_row_shards(mesh: Mesh, rules) -> int:
  """How many distinct row blocks of a batch this process's devices hold; checks that the processes split the
  rows between them (rather than each holding all rows, which per-process data cannot fill)."""
  size = data_parallel_size(mesh, rules)
  sharding = logical_sharding(("batch",), rules, mesh, (size,))
  blocks = {index[0].start for index in sharding.addressable_devices_indices_map((size,)).values()}
  if not rows_split_between_processes(mesh, rules) or len(blocks) * jax.process_count() != size:
    raise ValueError(
        f"put_micro_batches: the mesh {dict(mesh.shape)} splits batch rows into {size} blocks, of which each of the "
        f"{jax.process_count()} processes holds {len(blocks)}: the processes do not divide the rows between them. "
        "Make the data-parallel axes (data x fsdp) span the processes (e.g. fsdp = -1, tensor within a host) and "
        "build the mesh with sharding.make_mesh, which keeps the other axes within a process")
  return len(blocks)


def _pad_to(batch: Mapping[str, np.ndarray], rows: int, prompt_width: int, response_width: int
            ) -> dict[str, np.ndarray]:
  """The batch grown to `rows` rows and these widths, without changing what it contributes to a loss.

  Added rows repeat row 0 (finite inputs, so no NaN can reach a gradient through them) with `response_mask`
  0, so they hold no response token: token and sequence counts, losses, gradients and metrics are unchanged.
  Prompt columns are added on the left with mask 0 (positions count from the first real token, so the model
  sees the same sequence), response columns on the right with mask 0. Packed batches (`rl/batching.pack`)
  grow on the right with zeros: segment id 0 (padding), response mask 0.
  """
  if "response_mask" not in batch:
    raise ValueError("put_micro_batches: the batch has no response_mask, which padding rows must zero")
  out = {}
  count = None
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"put_micro_batches: {key!r} is a scalar; every batch entry needs a leading batch dimension")
    count = value.shape[0] if count is None else count
    if value.shape[0] != count:
      raise ValueError(f"put_micro_batches: {key!r} has {value.shape[0]} rows, other entries {count}")
    if count == 0:
      raise ValueError("put_micro_batches: an empty batch cannot be padded")
    if count < rows:
      value = np.concatenate([value, np.repeat(value[:1], rows - count, axis=0)])
    if value.ndim >= 2:
      width = prompt_width if key.startswith("prompt_") else response_width
      extra = width - value.shape[1]
      if extra < 0:
        raise ValueError(f"put_micro_batches: {key!r} is wider ({value.shape[1]}) than its target width {width}")
      pad = [(0, 0)] * value.ndim
      pad[1] = (extra, 0) if key.startswith("prompt_") else (0, extra)
      value = np.pad(value, pad)  # zeros: a mask of 0 on every added column
    out[key] = value
  out["response_mask"] = out["response_mask"].copy()
  out["response_mask"][count:] = 0
  return out


def _local_shape(batch: Mapping[str, Any]) -> tuple[int, int, int]:
  """(rows, prompt width, width of the other columns); packed batches (`rl/batching.pack`) have no prompt
  columns: every column is padded on the right."""
  prompt_width = int(np.shape(batch["prompt_ids"])[1]) if "prompt_ids" in batch else 0
  return (int(np.shape(batch["response_mask"])[0]), prompt_width, int(np.shape(batch["response_mask"])[1]))


def _place(batch: Mapping[str, np.ndarray], mesh: Mesh, rules, local_rows: int, prompt_width: int,
           response_width: int) -> dict[str, jax.Array]:
  padded = _pad_to(batch, local_rows, prompt_width, response_width)
  global_rows = local_rows * jax.process_count()
  out = {}
  for key, value in padded.items():
    global_shape = (global_rows,) + value.shape[1:]
    target = logical_sharding(("batch",) + (None,) * (value.ndim - 1), rules, mesh, global_shape)
    out[key] = jax.make_array_from_process_local_data(target, value, global_shape)
  return out


def put_micro_batches(micro_batches: Sequence[Mapping[str, np.ndarray]], mesh: Mesh, rules=DEFAULT_RULES
                      ) -> list[dict[str, jax.Array]]:
  """Places a mini-batch's micro-batches (dicts of numpy arrays: packed, `rl/batching.pack`, or unpacked,
  `rl/batching.collate`) on the mesh: rows over the data-parallel axes (`batch` rule), the rest replicated.

  Each micro-batch's rows are padded to a multiple of the data-parallel size (see `_pad_to`: padded rows hold
  no response token, so the update is unchanged). With several processes, each passes its own rows (its share
  of the data) and the arrays are global: the processes first agree (one small all-gather) on the number of
  micro-batches (a process with fewer adds fully masked ones) and on every micro-batch's row count and widths
  (the largest), so every process runs the same computations on the same shapes.
  """
  if not micro_batches:
    raise ValueError("put_micro_batches: no micro-batches")
  shards = _local_row_shards(mesh, rules)
  micro_batches = list(micro_batches)
  count = int(distributed.global_max([len(micro_batches)])[0])
  while len(micro_batches) < count:
    empty = dict(micro_batches[-1])
    empty["response_mask"] = np.zeros_like(np.asarray(empty["response_mask"]))
    micro_batches.append(empty)
  shapes = distributed.global_max(np.concatenate([_local_shape(mb) for mb in micro_batches])).reshape(count, 3)
  return [_place(mb, mesh, rules, -(-int(rows) // shards) * shards, int(prompt_width), int(response_width))
          for mb, (rows, prompt_width, response_width) in zip(micro_batches, shapes)]


def process_rows(array: jax.Array) -> np.ndarray:
  """The rows of a placed batch entry that this process supplied (`put_micro_batches`), with the padding rows it
  added, in the order it supplied them: its devices' distinct row blocks in order of their first row (the order
  in which `jax.make_array_from_process_local_data` laid them out)."""
  blocks = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
  return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])
