"""Mesh construction and logical-axis rules."""
import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from dapo_jax import sharding
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rl import step


def test_make_mesh_fills_the_minus_one_axis_with_auto_axis_types():
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}


@pytest.mark.parametrize("shape, message", [
    ({"data": 3, "fsdp": -1}, "do not fit 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"model": 8}, "unknown axes"),
])
def test_make_mesh_errors(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape)


def test_one_process_keeps_jaxs_own_layout():
  mesh, layout = sharding.mesh_and_layout({"data": 2, "fsdp": -1, "tensor": 2})
  expected = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  assert mesh == expected and "one process" in layout
  assert sharding.rows_split_between_processes(mesh)


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
  """What the process-major layout reads of a device (a CPU platform, so jax arranges them in the given order)."""
  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def _fake_devices(num_processes, per_process):
  # Ids interleaved across processes, as on a TPU slice (a v5p host's chips are not consecutive ids).
  return [_FakeDevice(local * num_processes + p, p) for p in range(num_processes) for local in range(per_process)]


def test_process_major_grid_keeps_each_block_of_rows_in_one_process():
  devices = _fake_devices(4, 4)
  grid = sharding._process_major_grid({"data": 1, "fsdp": 8, "tensor": 2}, devices, sharding.DEFAULT_RULES)
  assert grid.shape == (1, 8, 2)
  # Row block b (fsdp index) belongs to process b // 2; its two tensor devices are that process's devices in
  # id order: process 1 holds ids 1, 5, 9, 13.
  assert [[d.process_index for d in block] for block in grid[0]] == [[b // 2] * 2 for b in range(8)]
  assert [[d.id for d in block] for block in grid[0, 2:4]] == [[1, 5], [9, 13]]
  # data x fsdp: blocks numbered data-major, so process p holds (data, fsdp) blocks 2p and 2p + 1.
  grid = sharding._process_major_grid({"data": 2, "fsdp": 4, "tensor": 2}, devices, sharding.DEFAULT_RULES)
  assert [[grid[i, j, 0].process_index for j in range(4)] for i in range(2)] == [[0, 0, 1, 1], [2, 2, 3, 3]]
  # Rules that split rows over `data` only: fsdp and tensor both stay within a process.
  rules = (("batch", "data"),)
  grid = sharding._process_major_grid({"data": 4, "fsdp": 2, "tensor": 2}, devices, rules)
  assert [{d.process_index for d in grid[i].flat} for i in range(4)] == [{0}, {1}, {2}, {3}]


def test_process_major_grid_errors_name_the_mesh_key():
  with pytest.raises(ValueError, match=r"mesh.tensor \(8\) must divide each process's 4 devices"):
    sharding._process_major_grid({"data": 1, "fsdp": 2, "tensor": 8}, _fake_devices(4, 4), sharding.DEFAULT_RULES)
  uneven = _fake_devices(2, 4)[:6]
  with pytest.raises(ValueError, match="different numbers of the mesh's devices"):
    sharding._process_major_grid({"data": 1, "fsdp": 3, "tensor": 2}, uneven, sharding.DEFAULT_RULES)


_TOPOLOGY_MESHES = """
import json, os
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
import jax
from jax.experimental import topologies
from dapo_jax import sharding
out = {}
for topology in ("v5p:4x4x4", "v5p:4x4x8"):
  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  for tensor, data in ((4, 1), (2, 1), (4, 2), (1, 1), (8, 1)):
    key = f"{topology} data={data} tensor={tensor}"
    try:
      mesh, layout = sharding.mesh_and_layout({"data": data, "fsdp": -1, "tensor": tensor}, devices)
    except ValueError as error:
      out[key] = {"error": str(error)}
      continue
    groups = mesh.devices.reshape(-1, tensor)
    out[key] = {"shape": dict(mesh.shape), "layout": layout,
                "tensor_within_a_process": all(len({d.process_index for d in g}) == 1 for g in groups),
                "rows_split": sharding.rows_split_between_processes(mesh),
                "processes": len({d.process_index for d in devices}),
                "same_as_jax": key.endswith("tensor=1") and mesh == jax.make_mesh(
                    tuple(mesh.shape.values()), sharding.MESH_AXES, devices=devices,
                    axis_types=mesh.axis_types)}
print(json.dumps(out))
"""


def test_make_mesh_keeps_tensor_groups_within_a_tpu_host():
  """On v5p slices (4 chips a host) jax lays a tensor axis of 4 along a torus dimension that spans two hosts;
  make_mesh lays it out process-major instead, and refuses a tensor axis of 8 with a clear error."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -r requirements-tpu.txt), so no TPU topology can be built")
  repo = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, "-c", _TOPOLOGY_MESHES], cwd=repo, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  for topology, hosts in (("v5p:4x4x4", 16), ("v5p:4x4x8", 32)):
    for data, tensor in ((1, 4), (1, 2), (2, 4), (1, 1)):
      mesh = out[f"{topology} data={data} tensor={tensor}"]
      assert mesh["processes"] == hosts
      assert mesh["shape"] == {"data": data, "fsdp": 4 * hosts // (data * tensor), "tensor": tensor}
      assert mesh["tensor_within_a_process"] and mesh["rows_split"], (topology, data, tensor)
    # Tensor 4: jax's physical layout crosses hosts; tensor 2 or data 2 x tensor 4: jax cannot lay it at all.
    assert out[f"{topology} data=1 tensor=4"]["layout"].startswith("process-major layout, because jax.make_mesh's "
                                                                   "physical layout puts the devices of a block")
    assert "cannot lay these sizes" in out[f"{topology} data=1 tensor=2"]["layout"]
    # FSDP only: jax's physical layout already splits rows between hosts and is kept.
    assert out[f"{topology} data=1 tensor=1"]["same_as_jax"]
    assert out[f"{topology} data=1 tensor=1"]["layout"].startswith("jax.make_mesh's physical layout")
    assert "mesh.tensor (8) must divide each process's 4 devices" in out[f"{topology} data=1 tensor=8"]["error"]


def test_explicit_sizes_may_leave_devices_idle():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1}
  assert list(mesh.devices.flat) == jax.devices()[:2]


def test_logical_rules_respect_divisibility_and_use_each_mesh_axis_once():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules, mesh, (4, 64, 8, 16)) == \
      P(None, "fsdp", "tensor", None)
  # A single KV head cannot be split over tensor=2: replicated on that dimension.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), rules, mesh, (64, 1, 16)) == \
      P("fsdp", None, None)
  # batch takes data and fsdp together; an odd batch keeps only the axes that divide it.
  assert sharding.logical_to_spec(("batch", None), rules, mesh, (8, 3)) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("batch", None), rules, mesh, (2, 3)) == P("data", None)
  # vocab and heads both map to tensor: the first claim wins.
  assert sharding.logical_to_spec(("vocab", "heads"), rules, mesh, (8, 8)) == P("tensor", None)


def test_unknown_logical_axis_names_the_rules():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match="No sharding rule for logical axis 'experts'"):
    sharding.logical_to_spec(("experts",), sharding.DEFAULT_RULES, mesh)


def test_optimizer_state_is_sharded_like_the_params():
  model = qwen2.abstract_model(get_preset("tiny"))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  shardings = sharding.param_shardings(model, mesh)
  optimizer = step.make_optimizer(learning_rate=1e-3)
  abstract_state = jax.eval_shape(optimizer.init, model.params)
  state_shardings = sharding.optimizer_state_shardings(optimizer, abstract_state, shardings, mesh)
  param_specs = sorted(str(s.spec) for s in jax.tree.leaves(shardings))
  assert sorted(str(s.spec) for s in jax.tree.leaves(state_shardings.inner_state[1][0].mu)) == param_specs
  assert sorted(str(s.spec) for s in jax.tree.leaves(state_shardings.inner_state[1][0].nu)) == param_specs
  assert state_shardings.inner_state[1][0].count.spec == P()
  assert any(spec != "PartitionSpec()" for spec in param_specs)
  # The state really lands there: init under jit with those out_shardings.
  params = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), model.params, shardings)
  state = jax.jit(optimizer.init, out_shardings=state_shardings)(params)
  for leaf, target in zip(jax.tree.leaves(state), jax.tree.leaves(state_shardings)):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim)


def test_decode_rules_keep_tensor_parallelism_and_drop_fsdp_from_weights():
  rules = dict(sharding.DECODE_RULES)
  assert rules["embed"] is None and rules["heads"] == ("tensor",) and rules["vocab"] == ("tensor",)
  assert rules["batch"] == ("data", "fsdp") and rules["cache_batch"] == ("data", "fsdp")
  custom = sharding.decode_rules((("batch", "data"), ("embed", ("data", "tensor")), ("mlp", "fsdp")))
  assert dict(custom) == {"batch": "data", "embed": ("tensor",), "mlp": ("fsdp",)}


def test_reshard_moves_params_from_the_trainer_layout_to_the_samplers():
  model = qwen2.abstract_model(get_preset("tiny"))
  trainer_mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  sampler_mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), model.params)
  trainer = sharding.shard_params(host, sharding.param_shardings(model, trainer_mesh))
  targets = sharding.param_shardings(model, sampler_mesh, sharding.DECODE_RULES)
  moved = sharding.reshard(trainer, targets)
  assert targets["layers"]["q_kernel"].spec == P(None, None, "tensor", None)
  for leaf, target, expected in zip(jax.tree.leaves(moved), jax.tree.leaves(targets), jax.tree.leaves(host)):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
    np.testing.assert_array_equal(np.asarray(leaf), expected)


def test_process_local_mesh_covers_this_processes_devices():
  mesh = sharding.process_local_mesh({"data": 2, "tensor": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.local_devices())
  with pytest.raises(ValueError, match="do not cover"):
    sharding.process_local_mesh({"data": 3, "tensor": 1})
