"""Tests for dapo_jax.rollout.cpu_attention: the CPU decode attention kernel against XLA's attention, and when
decoding uses it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rollout import cpu_attention
from dapo_jax.rollout import decode_state
from dapo_jax.rollout import decoding
from dapo_jax.rollout import sampling as sampling_lib
from dapo_jax.rollout import weight_layout

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU attention kernel does not build "
                                  "here (no C++ compiler?); decoding uses XLA's attention")


def xla_attention_step(qkv, cos, sin, keys, values, lengths):
  """The kernel's contract in XLA ops: RoPE on the queries and the key, the cache writes (dropped past the end),
  attention to entries 0 .. lengths."""
  slots, kv_heads, group, head_dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] - 2, qkv.shape[3]
  rotated = qwen2.apply_rotary(qkv[:, :, :group + 1].reshape(slots, 1, -1, head_dim), cos[:, None], sin[:, None])
  rotated = rotated.reshape(slots, kv_heads, group + 1, head_dim)
  rows = jnp.arange(slots)
  keys = keys.at[rows, :, :, lengths].set(rotated[:, :, group], mode="drop")
  values = values.at[rows, :, lengths].set(qkv[:, :, group + 1], mode="drop")
  visible = jnp.arange(keys.shape[3])[None, :] <= lengths[:, None]
  out = decoding._slot_attention(rotated[:, :, :group], keys, values, visible)
  return out.reshape(slots, kv_heads, group, head_dim), keys, values


def check_kernel_step(group, head_dim, max_length, kv_heads, lengths, seed):
  slots = len(lengths)
  rng = np.random.default_rng(seed)
  qkv = jnp.asarray(rng.standard_normal((slots, kv_heads, group + 2, head_dim)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((slots, kv_heads, head_dim, max_length)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((slots, kv_heads, max_length, head_dim)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 5000, (slots, 1)))
  cos, sin = qwen2.rotary_cos_sin(positions, head_dim, 1_000_000.0)
  lengths = jnp.asarray(lengths, jnp.int32)
  expected = jax.jit(xla_attention_step)(qkv, cos[:, 0], sin[:, 0], keys, values, lengths)
  got = jax.jit(cpu_attention.decode_attention_step)(qkv, cos[:, 0], sin[:, 0], keys, values, lengths)
  for name, want, have in zip(("attention", "keys", "values"), expected, got):
    np.testing.assert_allclose(have, want, rtol=2e-5, atol=2e-6, err_msg=name)


@needs_kernel
@pytest.mark.parametrize("group,head_dim,max_length", [
    (1, 16, 37), (2, 32, 16), (4, 64, 192), (3, 16, 1), (7, 128, 50), (8, 256, 20), (5, 128, 400)])
def test_kernel_matches_xla_attention(group, head_dim, max_length):
  rng = np.random.default_rng(group * 1000 + max_length)
  # Lengths of a fresh slot (0), a full cache, a finished slot writing past the end, and some in between.
  lengths = [0, max_length - 1, max_length + 5] + list(rng.integers(0, max_length, 3))
  check_kernel_step(group, head_dim, max_length, kv_heads=2, lengths=lengths, seed=group * 1000 + max_length)


@needs_kernel
@pytest.mark.parametrize("group,max_length", [(4, 200), (1, 400), (8, 96)])
def test_kernel_matches_xla_attention_at_every_length(group, max_length):
  # One slot per cache length: every count of score vectors, whole passes and the pass of leftover vectors, and
  # (max_length 200, not a multiple of the vector width) the last vector computed entry by entry.
  check_kernel_step(group, 64, max_length, kv_heads=1, lengths=list(range(max_length)), seed=group)


@needs_kernel
def test_decode_steps_update_the_caches_in_place():
  # The kernel's results alias its cache inputs: a compiled decode step copies no layer's cache (a copy per layer
  # and step would cost more than the kernel saves).
  config = get_preset("tiny")
  num_slots, max_length = 4, 48
  functions = decoding.jitted_functions(config, None, keys_transposed=True, attention_kernel=True)
  params = qwen2.abstract_model(config).params
  weights = jax.eval_shape(lambda p: weight_layout.decode_weights(p, config), params)
  state = jax.eval_shape(lambda: decode_state.init_decode_state(config, num_slots, max_length))
  sampling = sampling_lib.SamplingParams()
  text = functions.decode_steps.lower(weights, state, num_steps=2, sampling=sampling).compile().as_text()
  assert "dapo_decode_attention" in text
  key_shape = f"f32[{num_slots},{config.num_kv_heads},{config.head_dim},{max_length}]"
  value_shape = f"f32[{num_slots},{config.num_kv_heads},{max_length},{config.head_dim}]"
  copies = [line for line in text.splitlines()
            if ("copy(" in line or "copy-start" in line) and (key_shape in line or value_shape in line)]
  assert not copies, copies


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
