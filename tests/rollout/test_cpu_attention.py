"""Tests for dapo_jax.rollout.cpu_attention: the CPU decode attention kernel against XLA's attention, and when
decoding uses it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax.model.config import get_preset
from dapo_jax.rollout import cpu_attention
from dapo_jax.rollout import decoding

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU attention kernel does not build "
                                  "here (no C++ compiler?); decoding uses XLA's attention")


@needs_kernel
@pytest.mark.parametrize("group,head_dim,max_length", [
    (1, 16, 37), (2, 32, 16), (4, 64, 192), (3, 16, 1), (7, 128, 50), (8, 256, 20), (5, 128, 400)])
def test_kernel_matches_xla_attention(group, head_dim, max_length):
  slots, kv_heads = 6, 2
  rng = np.random.default_rng(group * 1000 + max_length)
  q = jnp.asarray(rng.standard_normal((slots, kv_heads, group, head_dim)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((slots, kv_heads, head_dim, max_length)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((slots, kv_heads, max_length, head_dim)), jnp.float32)
  # Lengths of a fresh slot (0), a full cache, a finished slot writing past the end, and some in between.
  lengths = np.array([0, max_length - 1, max_length + 5] + list(rng.integers(0, max_length, slots - 3)), np.int32)
  visible = jnp.arange(max_length)[None, :] <= lengths[:, None]
  expected = decoding._slot_attention(q, keys, values, visible).reshape(q.shape)
  got = jax.jit(cpu_attention.decode_attention)(q, keys, values, jnp.asarray(lengths))
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)



@needs_kernel
@pytest.mark.parametrize("group,max_length", [(4, 200), (1, 400), (8, 96)])
def test_kernel_matches_xla_attention_at_every_length(group, max_length):
  # One slot per cache length: every count of score vectors, whole passes and the pass of leftover vectors, and
  # (max_length 200, not a multiple of the vector width) the last vector computed entry by entry.
  head_dim, slots = 64, max_length
  rng = np.random.default_rng(group)
  q = jnp.asarray(rng.standard_normal((slots, 1, group, head_dim)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((slots, 1, head_dim, max_length)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((slots, 1, max_length, head_dim)), jnp.float32)
  lengths = np.arange(slots, dtype=np.int32)
  visible = jnp.arange(max_length)[None, :] <= lengths[:, None]
  expected = decoding._slot_attention(q, keys, values, visible).reshape(q.shape)
  got = jax.jit(cpu_attention.decode_attention)(q, keys, values, jnp.asarray(lengths))
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)

def test_decoding_uses_the_kernel_only_where_it_applies():
  config = get_preset("tiny")  # 2 query heads per KV head, head size 16, float32
  assert cpu_attention.supports(2, 16) and cpu_attention.supports(7, 128)
  assert not any(cpu_attention.supports(*shape) for shape in ((9, 64), (4, 48), (6, 8)))
  assert decoding.attention_kernel_on("cpu", 1, config) == cpu_attention.available()
  assert not decoding.attention_kernel_on("cpu", 8, config)  # a mesh: XLA's attention splits over it
  assert not decoding.attention_kernel_on("tpu", 1, config)
  assert not decoding.attention_kernel_on("cpu", 1, config.replace(dtype=jnp.bfloat16))


def test_switched_off_or_unbuildable_kernel_leaves_xla_attention(monkeypatch, tmp_path):
  monkeypatch.setenv("DAPO_JAX_CPU_ATTENTION", "0")
  assert cpu_attention._load.__wrapped__() is None
  monkeypatch.setenv("DAPO_JAX_CPU_ATTENTION", "1")
  monkeypatch.setenv("DAPO_JAX_CACHE", str(tmp_path))  # nothing built here yet
  monkeypatch.setenv("CXX", "no-such-compiler-dapo")
  assert cpu_attention._load.__wrapped__() is None
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-dapo'"):
    cpu_attention._build()
