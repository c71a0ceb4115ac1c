"""A DAPO update on a mesh of the 8 fake CPU devices equals the single-device update, for several mesh shapes.

Old log-probs, the mini-batch's gradients and the loss metrics are compared with a run on one device (float32,
highest matmul precision: tests/conftest.py) at 1e-5 relative. The optimizer step is compared on its own: the
params after a sharded update equal DAPO's AdamW applied on one device to that update's gradients. (Comparing
whole updates would measure Adam rather than sharding: its first steps move each weight by about
lr * g / (|g| + eps), so a weight whose gradient is near eps, or pure rounding like the key bias's, whose exact
gradient is 0, turns a 1e-7 difference in g into a difference of a percent of lr.) Params and optimizer state
must come back in their declared shardings after each of two updates.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dapo_jax import batch_placement
from dapo_jax import sharding
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rl import step
from tests import batch_fixtures

# Every weight dimension divides by the mesh axes used below (embed 64 over fsdp <= 8, heads 4 and mlp 176 over
# tensor <= 4), except the 2 KV heads on tensor = 4, which are replicated there.
CONFIG = get_preset("tiny").replace(vocab_size=64)
MESH_SHAPES = [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 2, "tensor": 4},
    {"data": 1, "fsdp": 8, "tensor": 1},
]
LEARNING_RATE = 1e-3
# One optimizer object for every run: it is a static argument of the jitted step, so a new one would recompile.
OPTIMIZER = step.make_optimizer(learning_rate=LEARNING_RATE)


def _micro_batch(rng, rows, row_width):
  return batch_fixtures.random_packed_micro_batch(rng, rows, row_width, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def case():
  """Initial params, two packed micro-batches of different shapes (5 and 3 rows: neither divides 8, so rows
  are padded) and the single-device reference for each aggregation mode."""
  rng = np.random.default_rng(0)
  params = jax.device_get(qwen2.Qwen2(CONFIG, rngs=nnx.Rngs(0)).params)
  micro_batches = [_micro_batch(rng, 5, 13), _micro_batch(rng, 3, 16)]
  device = jax.devices()[0]
  on_one = jax.device_put(params, device)
  single_device = _updater("token-mean")
  for mb in micro_batches:
    old = np.asarray(single_device.old_log_probs(on_one, mb))
    # Ratios away from 1 so that the clipped branches take part.
    mb["old_logp"] = (old + rng.normal(0, 0.3, old.shape).astype(np.float32)) * mb["response_mask"]
  references = {}
  for agg_mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
    updater = _updater(agg_mode)
    grads, _ = updater.gradients(on_one, micro_batches)
    p = jax.device_put(params, device)
    _, _, metrics = updater(p, OPTIMIZER.init(p), micro_batches, learning_rate=LEARNING_RATE)
    references[agg_mode] = dict(grads=jax.device_get(grads), metrics=jax.device_get(metrics))
  old_logps = [np.asarray(single_device.old_log_probs(on_one, mb)) for mb in micro_batches]
  return dict(params=params, micro_batches=micro_batches, references=references, old_logps=old_logps)


def _assert_trees_close(actual, expected, rtol, what):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    a, b = np.asarray(a), np.asarray(b)
    # Relative to each array's scale too: elements that are ~0 in a large array carry only rounding.
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()),
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _updater(agg_mode, **shardings):
  return step.Updater(optimizer=OPTIMIZER, model_config=CONFIG,
                      loss_config=step.LossConfig(agg_mode=agg_mode, temperature=0.9, entropy_coeff=0.01),
                      **shardings)


def _apply_on_one_device(params, opt_state, grads):
  """DAPO's optimizer step (clipping, AdamW, skip on non-finite) on device 0, from host copies."""
  device = jax.devices()[0]
  params, opt_state, grads = jax.device_put(jax.device_get((params, opt_state, grads)), device)
  params, opt_state, _, _ = _updater("token-mean").apply_fn(params, opt_state, grads, LEARNING_RATE)
  return jax.device_get(params), jax.device_get(opt_state)


def _assert_in_shardings(tree, shardings, what):
  leaves = jax.tree.leaves(tree)
  targets = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  assert len(leaves) == len(targets)
  for leaf, target in zip(leaves, targets):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim), f"{what}: {leaf.sharding} is not {target}"


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=lambda s: "x".join(str(v) for v in s.values()))
def test_update_on_a_mesh_equals_the_single_device_update(case, mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  params_shardings = sharding.param_shardings(qwen2.abstract_model(CONFIG), mesh)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(params_shardings))
  placed = batch_placement.put_micro_batches(case["micro_batches"], mesh)
  for mb, host, expected_old in zip(placed, case["micro_batches"], case["old_logps"]):
    rows = host["response_mask"].shape[0]
    assert mb["response_mask"].shape[0] % sharding.data_parallel_size(mesh) == 0
    assert mb["response_mask"].sharding.spec[0] is not None or sharding.data_parallel_size(mesh) == 1
    old = _updater("token-mean", params_shardings=params_shardings).old_log_probs(
        sharding.shard_params(case["params"], params_shardings), mb)
    assert old.sharding.is_equivalent_to(mb["response_mask"].sharding, 2)
    np.testing.assert_allclose(np.asarray(old)[:rows], expected_old, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(old)[rows:], 0.0)

  for agg_mode, reference in case["references"].items():
    optimizer = OPTIMIZER
    params = sharding.shard_params(case["params"], params_shardings)
    opt_state = sharding.init_optimizer_state(optimizer, params, mesh)
    state_shardings = sharding.optimizer_state_shardings(optimizer, opt_state, params_shardings, mesh)
    updater = _updater(agg_mode, params_shardings=params_shardings, opt_state_shardings=state_shardings)
    grads, _ = updater.gradients(params, placed)
    _assert_in_shardings(grads, params_shardings, "gradients")
    _assert_trees_close(grads, reference["grads"], 1e-5, f"{agg_mode} gradient")

    for update in (1, 2):
      grads, _ = updater.gradients(params, placed)
      expected_params, expected_state = _apply_on_one_device(params, opt_state, grads)
      params, opt_state, metrics = updater(params, opt_state, placed, learning_rate=LEARNING_RATE)
      _assert_in_shardings(params, params_shardings, f"params after update {update}")
      _assert_in_shardings(opt_state, state_shardings, f"optimizer state after update {update}")
      _assert_trees_close(params, expected_params, 1e-6, f"{agg_mode} params after update {update}")
      _assert_trees_close(opt_state, expected_state, 1e-6, f"{agg_mode} optimizer state after update {update}")
      if update == 1:
        for name, expected in reference["metrics"].items():
          np.testing.assert_allclose(np.asarray(metrics[name]), expected, rtol=1e-5, atol=1e-7,
                                     err_msg=f"{agg_mode} {name}")
    assert float(metrics["actor/pg_clipfrac"]) > 0  # the clipped branch takes part


def test_host_and_device_totals_and_mismatch_agree(case):
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  micro_batches = [dict(mb, sampler_logp=mb["old_logp"] * 0.9) for mb in case["micro_batches"]]
  placed = batch_placement.put_micro_batches(micro_batches, mesh)
  host = step.mini_batch_totals(micro_batches)
  device = step.mini_batch_totals(placed)
  assert {k: float(v) for k, v in device.items()} == {k: float(v) for k, v in host.items()}
  # The padded rows are not counted.
  assert float(host["num_seqs"]) == sum(int(mb["segment_ids"].max(axis=1).sum()) for mb in case["micro_batches"])
  assert jnp.ndim(device["num_tokens"]) == 0
  expected = step.logprob_mismatch(micro_batches)
  assert step.logprob_mismatch(placed) == pytest.approx(expected, rel=1e-6)
  assert expected["rollout/logprob_abs_diff"] > 0
