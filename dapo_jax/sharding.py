"""Device mesh and shardings, declared apart from the model.

The model annotates each weight with logical axis names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`,
`layers`, ...). Rules, kept in the config (big_vision style), map each logical name to mesh axes (`data`,
`fsdp`, `tensor`); the shardings of params and batches are derived from the two. A dimension that a mesh axis
does not divide (e.g. 2 KV heads on a tensor axis of 4) is replicated over that axis instead.
"""
from collections.abc import Mapping, Sequence
import logging
import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from flax import nnx
import optax

MESH_AXES = ("data", "fsdp", "tensor")

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


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); one size may be -1 for "all remaining devices".

  Axis types are Auto: the compiler propagates shardings (jax 0.10's make_mesh defaults to Explicit).
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
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_from_config(mesh_config: Mapping[str, Any]) -> Mesh:
  """The mesh of a config's `mesh` section: keys `data`, `fsdp`, `tensor` (other keys, e.g. rules, ignored)."""
  return make_mesh({name: mesh_config[name] for name in MESH_AXES if name in mesh_config})


def _as_tuple(mesh_axes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


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
      raise ValueError(f"No sharding rule for logical axis {name!r}; add it to the config's mesh rules "
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


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] array: batch over the data-parallel axes, the rest replicated."""
  return logical_sharding(("batch",) + (None,) * (ndim - 1), rules, mesh)


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
