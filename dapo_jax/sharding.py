"""Device mesh and shardings, declared apart from the model.

The model annotates each weight with logical axis names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`,
`layers`, ...). Rules, the tuples `DEFAULT_RULES` (the trainer's) and `DECODE_RULES` (the sampler's) in this
module, map each logical name to mesh axes (`data`, `fsdp`, `tensor`); the shardings of params and batches are
derived from the two. A dimension that a mesh axis does not divide (e.g. 2 KV heads on a tensor axis of 4) is
replicated over that axis instead.

The whole program's layout:
  * the mesh: `make_mesh` (with several processes, the axes outside the data-parallel ones, i.e. `tensor`,
    stay within one process's devices, so that each process holds its own blocks of batch rows);
  * params: `param_shardings` (trainer: FSDP over `fsdp`, tensor parallel over `tensor`);
  * optimizer state: `optimizer_state_shardings` (Adam's moments like the params), created in place by
    `init_optimizer_state`;
  * batches: `batch_placement.put_micro_batches` (rows over `data` x `fsdp`, padded with rows that change no
    loss, gradient or metric; on several hosts each process supplies its own rows);
  * KV caches: `rollout/decode_state.decode_state_shardings` (slots over `data` x `fsdp`, KV heads over `tensor`);
  * the sampler's copy of the params: `param_shardings(model, sampler_mesh, DECODE_RULES)`, reached from the
    trainer's layout by `reshard` (a `jax.device_put` on the devices, never a copy through the host); with
    several hosts the sampler may run on each process's own devices (`process_local_mesh`).
"""
from collections.abc import Mapping, Sequence
import logging
import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from flax import nnx
import numpy as np
import optax

MESH_AXES = ("data", "fsdp", "tensor")


def _as_tuple(mesh_axes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)

_BATCH_AXES = ("batch", "cache_batch")


def decode_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
  """Rules for the sampler's copy of the weights: `rules` with the data-parallel axes (those of `batch`) taken
  off every weight axis.

  Decode reads every weight once per generated token, so weights split over the data-parallel axes (FSDP) would
  be all-gathered on every step; only tensor parallelism stays, and the slots spread over the data axes.
  """
  data_axes = set(_as_tuple(dict(rules).get("batch")))
  return tuple((name, axes if name in _BATCH_AXES else
                tuple(a for a in _as_tuple(axes) if a not in data_axes) or None) for name, axes in rules)


DECODE_RULES = decode_rules(DEFAULT_RULES)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None,
              rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); one size may be -1 for "all remaining devices".

  Axis types are Auto: the compiler propagates shardings (jax 0.10's make_mesh defaults to Explicit). When the
  devices belong to several processes, the layout keeps every row block of a batch (the data-parallel axes of
  the `batch` rule) on one process's devices, which `batch_placement.put_micro_batches` needs: see
  `mesh_and_layout`.
  """
  mesh, layout = mesh_and_layout(shape, devices, rules)
  several_processes = len({d.process_index for d in mesh.devices.flat}) > 1
  logging.log(logging.INFO if several_processes else logging.DEBUG, "mesh %s: %s", dict(mesh.shape), layout)
  return mesh


def mesh_and_layout(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> tuple[Mesh, str]:
  """`make_mesh`'s mesh and a sentence saying which device layout it has and why (for logs and reports).

  One process: `jax.make_mesh`'s layout, which follows the physical torus. Several processes: that layout if
  the processes split the batch rows between them (`rows_split_between_processes`), else a process-major one:
  the processes in index order along the data-parallel axes, and the other axes (`tensor`) within each
  process's devices. On a v5p slice (a host is a 2x2 block of chips) jax lays a tensor axis of 4 along a torus
  dimension of 4, across two hosts; process-major keeps it in one host.
  """
  shape = dict(shape or {"data": 1, "fsdp": -1, "tensor": 1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  devices = list(devices) if devices is not None else jax.devices()
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise ValueError(f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} do not fit {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) < len(devices):
    # Explicit sizes that leave devices out (a CPU demo on a multi-device host, a debugging run) are allowed,
    # but never silently: the unused devices are named in the log.
    logging.warning("mesh: axis sizes %s use %d of the %d devices; the rest stay idle (use -1 for one axis to "
                    "take them all)", dict(zip(MESH_AXES, sizes)), math.prod(sizes), len(devices))
    devices = devices[:math.prod(sizes)]
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if len({d.process_index for d in devices}) == 1:
    return (jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices),
            "jax.make_mesh's physical layout (one process)")
  try:
    physical = jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
  except (NotImplementedError, AssertionError, ValueError) as error:
    # jax lays each mesh axis along whole dimensions of the physical torus and refuses sizes that do not
    # match one (e.g. an axis of 2 on a 4x4x4 slice); grouping devices by process needs no such match.
    first_sentence = str(error).split(". ")[0]
    reason = f"jax.make_mesh cannot lay these sizes on the devices ({type(error).__name__}: {first_sentence})"
  else:
    if rows_split_between_processes(physical, rules):
      return physical, "jax.make_mesh's physical layout, in which each process holds its own blocks of batch rows"
    spread = " x ".join(a for a in _non_batch_axes(rules) if physical.shape[a] > 1)
    reason = (f"jax.make_mesh's physical layout puts the devices of a block of batch rows (mesh axes {spread}) on "
              "several processes, which put_micro_batches cannot fill from each process's own rows")
  grid = _process_major_grid(dict(zip(MESH_AXES, sizes)), devices, rules)
  return Mesh(grid, MESH_AXES, axis_types=axis_types), f"process-major layout, because {reason}"


def _batch_axes(rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
  return tuple(a for a in _as_tuple(dict(rules).get("batch")) if a in MESH_AXES)


def _non_batch_axes(rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
  return tuple(a for a in MESH_AXES if a not in _batch_axes(rules))


def _process_major_grid(sizes: Mapping[str, int], devices: Sequence[jax.Device], rules) -> np.ndarray:
  """Devices arranged as a (data, fsdp, tensor) array in which every block of batch rows lies in one process.

  Row blocks are numbered as `logical_to_spec` numbers them (the `batch` rule's axes, first one outermost);
  process p (in index order) takes the next run of blocks, and each block's devices (the non-batch axes) are
  consecutive devices of that process, in `mesh_utils.create_device_mesh`'s order for the process's devices
  (it follows the host's own torus) or, where that refuses them, in id order.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  by_process: dict[int, list[jax.Device]] = {}
  for device in sorted(devices, key=lambda d: d.id):
    by_process.setdefault(device.process_index, []).append(device)
  per_process = {len(own) for own in by_process.values()}
  if len(per_process) > 1:
    raise ValueError(f"mesh: the processes hold different numbers of the mesh's devices ({sorted(per_process)}); "
                     "give the mesh all of every process's devices (one axis -1)")
  (local_count,) = per_process
  batch_axes, other_axes = _batch_axes(rules), _non_batch_axes(rules)
  group = math.prod(sizes[a] for a in other_axes)
  if local_count % group:
    names = " x ".join(f"mesh.{a} ({sizes[a]})" for a in other_axes if sizes[a] > 1) or "1"
    raise ValueError(
        f"mesh: {names} must divide each process's {local_count} devices: with several processes every process "
        "must hold its own blocks of batch rows, so the axes outside the data-parallel ones (data x fsdp) must lie "
        f"within one process. Choose sizes that divide {local_count} (e.g. mesh.tensor = 4 on v5p, 4 chips a host)")
  blocks_per_process = local_count // group
  local_grids = []
  for process in sorted(by_process):
    own = by_process[process]
    try:
      local = mesh_utils.create_device_mesh((blocks_per_process, group), devices=own)
    except (NotImplementedError, AssertionError, ValueError):
      local = np.asarray(own, dtype=object).reshape(blocks_per_process, group)
    local_grids.append(local)
  # [blocks, group] -> the batch axes (in the rule's order) and the other axes, then (data, fsdp, tensor).
  grid = np.concatenate(local_grids).reshape([sizes[a] for a in batch_axes] + [sizes[a] for a in other_axes])
  return np.transpose(grid, [(batch_axes + other_axes).index(a) for a in MESH_AXES])


def mesh_from_config(mesh_config: Mapping[str, Any]) -> Mesh:
  """The mesh of a config's `mesh` section: keys `data`, `fsdp`, `tensor` (other keys, e.g. rules, ignored)."""
  return make_mesh({name: mesh_config[name] for name in MESH_AXES if name in mesh_config})


def logical_to_spec(logical_axes: Sequence[str | None], rules: Sequence[tuple[str, Any]], mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes (and, when given, this shape).

  A mesh axis is used at most once per array (the first logical axis claiming it wins), and a mesh axis
  that does not divide its dimension is dropped for that dimension.
  """
  rule_map = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    if name is not None and name not in rule_map:
      raise ValueError(f"No sharding rule for logical axis {name!r}; add it to sharding.DEFAULT_RULES "
                       f"(known: {sorted(rule_map)})")
    chosen = []
    for axis in _as_tuple(rule_map.get(name)):
      if axis in used or axis not in mesh.shape or mesh.shape[axis] == 1:
        continue
      if shape is not None and shape[dim] % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]):
        logging.debug("Replicating %s (size %d) over mesh axis %s, which does not divide it", name,
                      shape[dim], axis)
        continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def logical_sharding(logical_axes, rules, mesh, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))


def param_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, Any]:
  """NamedShardings of the model's weights, as a plain nested dict matching `model.params`.

  `model` may be abstract (`qwen2.abstract_model(config)`): only shapes and annotations are read.
  """
  state = nnx.state(model, nnx.Param)

  def sharding_of(variable):
    axes = variable.get_metadata().get("out_sharding")
    if axes is None:
      raise ValueError(f"Weight of shape {variable.get_value().shape} has no logical axis annotation")
    return logical_sharding(axes, rules, mesh, variable.get_value().shape)

  shardings = jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def shard_params(params, shardings):
  """Places a params pytree into its shardings."""
  return jax.device_put(params, shardings)


def optimizer_state_shardings(optimizer, abstract_opt_state, params_shardings, mesh: Mesh):
  """NamedShardings of an optimizer state: every copy of the params tree inside it (Adam's moments) sharded like
  the params, everything else (step counts, injected hyperparameters) replicated.

  `abstract_opt_state` is `jax.eval_shape(optimizer.init, params)` (or a concrete state).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(optimizer, lambda _, param_sharding: param_sharding, abstract_opt_state,
                               params_shardings, transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def init_optimizer_state(optimizer, params, mesh: Mesh):
  """`optimizer.init(params)` created directly in `optimizer_state_shardings` (the params' own shardings for
  the moments), so no part of it starts on one device."""
  params_shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(optimizer.init, params)
  shardings = optimizer_state_shardings(optimizer, abstract, params_shardings, mesh)
  return jax.jit(optimizer.init, out_shardings=shardings)(params)


# ------------------------------------------------------------------------------------------------------------
# The sampler's layout


def process_local_mesh(shape: Mapping[str, int] | None = None) -> Mesh:
  """A mesh (data, fsdp, tensor) over this process's own devices (all of them), e.g. for a sampler that each
  host runs on its own: one size may be -1. Devices are taken in id order, so every process builds the same
  arrangement of its devices (what `reshard` relies on)."""
  devices = sorted(jax.local_devices(), key=lambda d: d.id)
  shape = dict(shape or {"data": 1, "fsdp": 1, "tensor": -1})
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"process_local_mesh: bad axis sizes {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"process_local_mesh: axis sizes {dict(zip(MESH_AXES, sizes))} do not cover this "
                     f"process's {len(devices)} devices")
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _is_process_local(mesh: Mesh) -> bool:
  return jax.process_count() > 1 and all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def _stacked_process_mesh(local_mesh: Mesh) -> Mesh:
  """The global mesh whose slice for process p is p's analogue of `local_mesh` (same positions of p's devices
  in id order), with a leading `process` axis: a sharding of it that leaves `process` out is, on every
  process, exactly the local mesh's sharding."""
  by_process: dict[int, list[jax.Device]] = {}
  for device in sorted(jax.devices(), key=lambda d: d.id):
    by_process.setdefault(device.process_index, []).append(device)
  mine = by_process[jax.process_index()]
  if sorted(local_mesh.devices.flat, key=lambda d: d.id) != mine:
    raise ValueError("reshard: a process-local target mesh must cover all of this process's devices "
                     "(build it with sharding.process_local_mesh)")
  position = {device: mine.index(device) for device in mine}
  local_positions = np.vectorize(position.__getitem__, otypes=[int])(local_mesh.devices)
  stacked = np.stack([np.asarray(by_process[p], dtype=object)[local_positions] for p in sorted(by_process)])
  return Mesh(stacked, ("process",) + tuple(local_mesh.axis_names),
              axis_types=(AxisType.Auto,) * (1 + len(local_mesh.axis_names)))


def reshard(tree, shardings):
  """`tree`'s arrays moved into `shardings` (a matching pytree of NamedShardings) on the devices.

  The trainer -> sampler weight sync: a `jax.device_put` from the trainer's layout to the sampler's (e.g. FSDP
  to tensor-parallel decode); nothing passes through the host. With several processes the target may also be a
  mesh of this process's devices only (`process_local_mesh`), for a sampler each host drives on its own: the
  arrays are then first replicated across processes (one collective that every process must call) and each
  process keeps the copy on its own devices.
  """
  leaves, treedef = jax.tree.flatten(tree)
  targets = treedef.flatten_up_to(shardings)
  meshes = {target.mesh for target in targets}
  if not any(_is_process_local(mesh) for mesh in meshes):
    return jax.device_put(tree, shardings)
  if len(meshes) != 1:
    raise ValueError("reshard: process-local targets must all use one mesh")
  local_mesh = meshes.pop()
  stacked = _stacked_process_mesh(local_mesh)
  staged = jax.device_put(leaves, [NamedSharding(stacked, target.spec) for target in targets])
  out = []
  for array, target in zip(staged, targets):
    by_device = {shard.device: shard.data for shard in array.addressable_shards}
    out.append(jax.make_array_from_single_device_arrays(
        array.shape, target, [by_device[d] for d in target.addressable_devices_indices_map(array.shape)]))
  return treedef.unflatten(out)


# ------------------------------------------------------------------------------------------------------------
# Batch rows on the mesh (placing batches there: `batch_placement.py`)


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """Into how many shards a batch's rows are split: the product of the mesh axes of the `batch` rule."""
  return math.prod(mesh.shape[a] for a in _as_tuple(dict(rules).get("batch")) if a in mesh.shape)


def rows_split_between_processes(mesh: Mesh, rules=DEFAULT_RULES) -> bool:
  """Whether every process of the mesh holds its own blocks of a batch's rows, the same number each, and no
  other process holds them: what `batch_placement.put_micro_batches` needs with several processes, each of
  which supplies the rows of its blocks from its share of the data. Equivalently, the mesh axes outside the
  `batch` rule (tensor) lie within one process's devices. Always true on one process.
  """
  size = data_parallel_size(mesh, rules)
  row_sharding = logical_sharding(("batch",), rules, mesh, (size,))
  blocks: dict[int, set[int]] = {}
  for device, index in row_sharding.devices_indices_map((size,)).items():
    blocks.setdefault(device.process_index, set()).add(index[0].start)
  return all(len(held) * len(blocks) == size for held in blocks.values())
