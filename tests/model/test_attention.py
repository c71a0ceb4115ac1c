"""dapo_jax/model/attention.py: each implementation against a dense reference, values and gradients."""
import importlib.util
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from dapo_jax.model import attention as attention_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset

REPO = pathlib.Path(__file__).resolve().parents[2]
TOL = 2e-6


def dense_attention(q, k, v, segment_ids):
  """The definition: a [s, s] mask of causal pairs within one segment, softmax over the full score matrix."""
  b, s, num_heads, d = q.shape
  num_kv_heads = k.shape[2]
  qg = q.reshape(b, s, num_kv_heads, num_heads // num_kv_heads, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k) * d ** -0.5
  mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & jnp.tril(jnp.ones((s, s), bool))[None]
  probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
  return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(q.shape)


def packed_segments(rng, rows, length):
  """Rows of contiguous segments of random lengths (ids 1, 2, ...), some with left or right padding (id 0)."""
  out = np.zeros((rows, length), np.int32)
  for row in range(rows):
    start = rng.integers(0, length // 4) if row % 2 else 0
    end = length - (rng.integers(0, length // 4) if row % 3 == 2 else 0)
    cuts = np.sort(rng.choice(np.arange(start + 1, end), size=min(3, end - start - 1), replace=False))
    for segment, (a, z) in enumerate(zip([start, *cuts], [*cuts, end]), start=1):
      out[row, a:z] = segment
  return jnp.asarray(out)


def random_qkv(rng, rows, length, num_heads, num_kv_heads, head_dim):
  return tuple(jnp.asarray(rng.normal(size=(rows, length, n, head_dim)), jnp.float32)
               for n in (num_heads, num_kv_heads, num_kv_heads))


def values_and_gradients(fn, q, k, v, segment_ids):
  """fn's output and the gradients of a weighted sum of it (different weights per position) wrt q, k, v."""
  weights = jnp.cos(jnp.arange(q.shape[1] * q.shape[2] * q.shape[3], dtype=jnp.float32)).reshape(q.shape[1:])
  loss = lambda q, k, v: (fn(q, k, v, segment_ids) * weights).sum()
  return fn(q, k, v, segment_ids), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_same(got, want, tol=TOL):
  (out, grads), (ref_out, ref_grads) = got, want
  np.testing.assert_allclose(out, ref_out, atol=tol, rtol=0)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("length,block,num_heads,num_kv_heads", [
    (37, 8, 4, 2),      # several query blocks, the last one shorter
    (37, 1, 4, 2),      # more blocks than XLA_MAX_QUERY_BLOCKS: fewer, larger ones
    (37, 512, 4, 2),    # one block
    (24, 8, 3, 3),      # multi-head attention
    (16, 16, 4, 1)])    # one key/value head
def test_xla_matches_dense_attention(length, block, num_heads, num_kv_heads):
  rng = np.random.default_rng(length + block)
  q, k, v = random_qkv(rng, 3, length, num_heads, num_kv_heads, 16)
  segment_ids = packed_segments(rng, 3, length)
  got = values_and_gradients(lambda *a: attention_lib.xla_attention(*a, block=block), q, k, v, segment_ids)
  assert_same(got, values_and_gradients(dense_attention, q, k, v, segment_ids))


def test_xla_builds_no_score_array_of_the_full_length():
  length, block = 2048, 256
  q, k, v = random_qkv(np.random.default_rng(0), 1, length, 2, 1, 8)
  segment_ids = jnp.ones((1, length), jnp.int32)
  loss = lambda q, k, v: attention_lib.xla_attention(q, k, v, segment_ids, block=block).sum()
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  def inner(value):  # the jaxprs of a scan's or custom_vjp's body
    if isinstance(value, jax.extend.core.ClosedJaxpr):
      yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
      yield value
    elif isinstance(value, (tuple, list)):
      for item in value:
        yield from inner(item)

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(getattr(var.aval, "shape", ())))
      for value in eqn.params.values():
        for sub in inner(value):
          yield from sizes(sub)

  largest = max(sizes(jaxpr.jaxpr))
  assert largest == 2 * block * length  # the last query block's scores per head, never [length, length]


@pytest.mark.parametrize("length,num_heads,num_kv_heads", [
    (37, 4, 2),     # padded to one 128-token tile
    (384, 2, 1)])   # three 128-token tiles: blocks above the diagonal skipped, blocks across segments masked
def test_splash_kernel_matches_xla_in_interpret_mode(length, num_heads, num_kv_heads):
  rng = np.random.default_rng(length)
  q, k, v = random_qkv(rng, 2, length, num_heads, num_kv_heads, 16)
  segment_ids = packed_segments(rng, 2, length)
  with pltpu.force_tpu_interpret_mode():
    got = values_and_gradients(attention_lib.splash_attention, q, k, v, segment_ids)
  assert_same(got, values_and_gradients(attention_lib.xla_attention, q, k, v, segment_ids))


def test_splash_block_sizes_divide_the_padded_length():
  assert attention_lib.splash_block_sizes(2048).block_q == 512
  sizes = attention_lib.splash_block_sizes(384)
  assert (sizes.block_q, sizes.block_kv, sizes.block_q_dkv, sizes.block_kv_dq) == (128, 128, 128, 128)
  assert attention_lib.splash_block_sizes(22528 + 256).block_kv == 256


def test_gpu_kernel_matches_xla_in_interpret_mode():
  rng = np.random.default_rng(1)
  q, k, v = random_qkv(rng, 2, 45, 4, 2, 16)
  segment_ids = packed_segments(rng, 2, 45)
  kernel = lambda *a: attention_lib.gpu_flash_attention(*a, interpret=True)
  got = values_and_gradients(kernel, q, k, v, segment_ids)
  assert_same(got, values_and_gradients(attention_lib.xla_attention, q, k, v, segment_ids))


def test_auto_lowers_to_the_lowering_platforms_kernel():
  q, k, v = random_qkv(np.random.default_rng(2), 1, 128, 2, 1, 128)
  segment_ids = jnp.ones((1, 128), jnp.int32)
  fn = jax.jit(lambda q, k, v, s: attention_lib.attention(q, k, v, segment_ids=s))
  np.testing.assert_allclose(fn(q, k, v, segment_ids), dense_attention(q, k, v, segment_ids), atol=TOL, rtol=0)
  traced = fn.trace(q, k, v, segment_ids)
  assert "tpu_custom_call" not in traced.lower(lowering_platforms=("cpu",)).as_text()
  assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()


def test_unknown_implementation_is_refused():
  q, k, v = random_qkv(np.random.default_rng(3), 1, 4, 2, 1, 8)
  with pytest.raises(ValueError, match="not one of"):
    attention_lib.attention(q, k, v, segment_ids=jnp.ones((1, 4), jnp.int32), implementation="flash")
  with pytest.raises(ValueError, match="attention must be one of"):
    get_preset("tiny-demo", attention="flash")


def test_segment_positions_restart_with_each_segment():
  segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(qwen2.segment_positions(segment_ids),
                                [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 0, 1, 2, 3, 4, 0]])


def test_a_row_is_either_masked_or_packed():
  config, params = _tiny_model()
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="not both"):
    qwen2.hidden_states(params, config, ids, jnp.ones((1, 4)), segment_ids=jnp.ones((1, 4), jnp.int32))


def _tiny_model(**changes):
  config = get_preset("tiny-demo", num_layers=2, vocab_size=64, **changes)
  return config, qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params


def test_packed_rows_give_each_sequence_its_own_logits():
  config, params = _tiny_model()
  rng = np.random.default_rng(4)
  sequences = [rng.integers(0, config.vocab_size, n) for n in (5, 9, 3)]
  alone = [np.asarray(qwen2.forward(params, config, jnp.asarray(s[None])))[0] for s in sequences]
  packed = np.concatenate([*sequences, np.zeros(4, np.int64)])[None]
  segment_ids = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(sequences)] + [np.zeros(4)])[None]
  logits = np.asarray(qwen2.forward(params, config, jnp.asarray(packed), segment_ids=jnp.asarray(segment_ids)))[0]
  start = 0
  for s, ref in zip(sequences, alone):
    np.testing.assert_allclose(logits[start:start + len(s)], ref, atol=1e-5, rtol=0)
    start += len(s)


def test_model_gradients_with_the_splash_kernel_match_xla_in_interpret_mode():
  config, params = _tiny_model(attention="xla")
  rng = np.random.default_rng(5)
  ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 40)))
  segment_ids = packed_segments(rng, 2, 40)

  def loss(params, config):
    logits = qwen2.forward(params, config, ids, segment_ids=segment_ids)
    return (jax.nn.log_softmax(logits)[..., 0] * (segment_ids > 0)).sum()

  want = jax.value_and_grad(loss)(params, config)
  with pltpu.force_tpu_interpret_mode():
    got = jax.value_and_grad(loss)(params, config.replace(attention="splash"))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4), got[1], want[1])


def test_update_with_the_splash_kernel_compiles_for_v5p():
  """The update's gradient program, on a v5p:2x2x1 mesh (rows split 4 ways), compiled ahead of time from this
  CPU host with libtpu (as the memory planner does): "auto" picks the splash kernel, run per device."""
  if importlib.util.find_spec("libtpu") is None:
    reason = "libtpu is not installed (pip install -r requirements-tpu.txt), so no TPU program can be compiled here"
    warnings.warn(reason)
    pytest.skip(reason)
  result = subprocess.run([sys.executable, "-m", "tests.model.aot_attention_worker"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  kernels, xla_kernels = (int(n) for n in result.stdout.split())
  assert kernels >= 3 and xla_kernels == 0  # forward, and the backward pass's dq and dk/dv kernels


def test_prefill_equals_extending_an_empty_cache():
  config, params = _tiny_model()
  rng = np.random.default_rng(6)
  lengths = jnp.asarray([5, 12, 1], jnp.int32)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 12))) * (jnp.arange(12)[None] < lengths[:, None])
  h, cache = qwen2.prefill_hidden_states(params, config, tokens, lengths)
  want_h, want = qwen2.extend_hidden_states(params, config, qwen2.init_cache(config, 3, 12), tokens, lengths)
  np.testing.assert_array_equal(cache.lengths, want.lengths)
  for row, n in enumerate(lengths):  # the padding's hidden states and cache entries are never read
    np.testing.assert_allclose(h[row, :n], want_h[row, :n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache.k[:, row, :n], want.k[:, row, :n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache.v[:, row, :n], want.v[:, row, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_kv_heads", [2, 1])  # key/value heads split over `tensor` with the query heads, or not
def test_kernels_run_per_device_on_a_mesh(num_kv_heads):
  """`per_device` on the 8 CPU devices, with the XLA implementation standing in for a kernel (the TPU
  interpreter does not run inside `shard_map` on CPU devices: it waits forever), so each device computes its
  rows and heads alone."""
  from dapo_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rng = np.random.default_rng(7)
  q, k, v = random_qkv(rng, 4, 40, 4, num_kv_heads, 16)
  segment_ids = packed_segments(rng, 4, 40)
  local_shapes = []

  def kernel(q, k, v, segment_ids):
    local_shapes.append((q.shape, k.shape, segment_ids.shape))
    return attention_lib.xla_attention(q, k, v, segment_ids)

  fn = jax.jit(attention_lib.per_device(kernel, attention_lib.MeshLayout(mesh)))
  got = values_and_gradients(fn, q, k, v, segment_ids)
  assert_same(got, values_and_gradients(attention_lib.xla_attention, q, k, v, segment_ids))
  heads = (2, num_kv_heads // 2) if num_kv_heads == 2 else (4, 1)  # whole heads when kv heads cannot split
  assert local_shapes[0] == ((1, 40, heads[0], 16), (1, 40, heads[1], 16), (1, 40))
