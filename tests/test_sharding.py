"""Mesh construction and logical-axis rules."""
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
