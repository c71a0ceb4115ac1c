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


def xla_attention_step(qkv, cos, sin, keys, values, lengths, page_table):
  """The kernel's contract in XLA ops (`decoding._attend_layer` without the kernel): RoPE on the queries and the
  key, the writes into the pages (dropped where the table names none), attention to entries 0 .. lengths."""
  return decoding._attend_layer(qkv, cos, sin, keys, values, lengths, page_table, keys_transposed=True,
                                attention_kernel=False)


def check_kernel_step(group, head_dim, page_size, table_width, kv_heads, lengths, seed, extra_pages=3):
  """The kernel against XLA on pages handed out in a shuffled order, one slot's table names no page past its
  length, and pages of the last two slots are shared (as a group's prompt pages are)."""
  slots = len(lengths)
  num_pages = slots * table_width + extra_pages
  rng = np.random.default_rng(seed)
  qkv = jnp.asarray(rng.standard_normal((slots, kv_heads, group + 2, head_dim)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((kv_heads, num_pages, head_dim, page_size)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), jnp.float32)
  table = rng.permutation(num_pages)[:slots * table_width].reshape(slots, table_width).astype(np.int32)
  if slots >= 2:
    table[-1, 0] = table[-2, 0]  # a shared first page, read by both (written by neither: lengths below)
    lengths[-1] = lengths[-2] = max(lengths[-2], page_size)
  table[0, lengths[0] // page_size + 1:] = num_pages  # no page past what the slot holds
  positions = jnp.asarray(rng.integers(0, 5000, (slots, 1)))
  cos, sin = qwen2.rotary_cos_sin(positions, head_dim, 1_000_000.0)
  lengths = jnp.asarray(lengths, jnp.int32)
  expected = jax.jit(xla_attention_step)(qkv, cos[:, 0], sin[:, 0], keys, values, lengths, table)
  got = jax.jit(cpu_attention.decode_attention_step)(qkv, cos[:, 0], sin[:, 0], keys, values, lengths, table)
  for name, want, have in zip(("attention", "keys", "values"), expected, got):
    np.testing.assert_allclose(have, want, rtol=2e-5, atol=2e-6, err_msg=name)


@needs_kernel
@pytest.mark.parametrize("group,head_dim,page_size,table_width", [
    (1, 16, 16, 3), (2, 32, 16, 1), (4, 64, 32, 6), (3, 16, 64, 1), (7, 128, 16, 4), (8, 256, 16, 2),
    (5, 128, 32, 13)])
def test_kernel_matches_xla_attention(group, head_dim, page_size, table_width):
  rng = np.random.default_rng(group * 1000 + table_width)
  capacity = page_size * table_width
  # Lengths of a fresh slot (0), a full table, a finished slot writing past the end, a page boundary, and some in
  # between.
  lengths = [0, capacity - 1, capacity + 5, min(page_size, capacity - 1)] + list(rng.integers(0, capacity, 3))
  check_kernel_step(group, head_dim, page_size, table_width, kv_heads=2, lengths=lengths, seed=group * 1000 + 7)


@needs_kernel
@pytest.mark.parametrize("group,page_size,table_width", [(4, 16, 13), (1, 32, 13), (8, 64, 2)])
def test_kernel_matches_xla_attention_at_every_length(group, page_size, table_width):
  # One slot per cache length: every count of score vectors within a page and across pages, whole passes and
  # the pass of leftover vectors.
  capacity = page_size * table_width
  check_kernel_step(group, 64, page_size, table_width, kv_heads=1, lengths=list(range(capacity)), seed=group)


@needs_kernel
def test_decode_steps_update_the_pool_in_place():
  # The kernel's results alias its pool inputs: a compiled decode step copies no layer's pages (a copy per layer
  # and step would cost more than the kernel saves).
  config = get_preset("tiny")
  num_slots, num_pages, page_size = 4, 12, 16
  functions = decoding.jitted_functions(config, None, keys_transposed=True, attention_kernel=True)
  params = qwen2.abstract_model(config).params
  weights = jax.eval_shape(lambda p: weight_layout.decode_weights(p, config), params)
  state = jax.eval_shape(lambda: decode_state.init_decode_state(config, num_slots, num_pages, page_size))
  table = jax.ShapeDtypeStruct((num_slots, 3), jnp.int32)
  sampling = sampling_lib.SamplingParams()
  text = functions.decode_steps.lower(weights, state, table, num_steps=2, sampling=sampling).compile().as_text()
  assert "dapo_decode_attention" in text
  key_shape = f"f32[{config.num_kv_heads},{num_pages},{config.head_dim},{page_size}]"
  value_shape = f"f32[{config.num_kv_heads},{num_pages},{page_size},{config.head_dim}]"
  copies = [line for line in text.splitlines()
            if ("copy(" in line or "copy-start" in line) and (key_shape in line or value_shape in line)]
  assert not copies, copies


def test_decoding_uses_the_kernel_only_where_it_applies():
  config = get_preset("tiny")  # 2 query heads per KV head, head size 16, float32
  assert cpu_attention.supports(2, 16, 16) and cpu_attention.supports(7, 128, 64)
  assert not any(cpu_attention.supports(*shape) for shape in ((9, 64, 16), (4, 48, 16), (6, 8, 16), (2, 16, 8)))
  assert decoding.attention_kernel_on("cpu", 1, config, 16) == cpu_attention.available()
  assert not decoding.attention_kernel_on("cpu", 8, config, 16)  # a mesh: XLA's attention splits over it
  assert not decoding.attention_kernel_on("tpu", 1, config, 16)
  assert not decoding.attention_kernel_on("cpu", 1, config.replace(dtype=jnp.bfloat16), 16)
  assert not decoding.attention_kernel_on("cpu", 1, config, 8)  # pages of fewer entries than a vector


def test_switched_off_or_unbuildable_kernel_leaves_xla_attention(monkeypatch, tmp_path):
  monkeypatch.setenv("DAPO_JAX_CPU_ATTENTION", "0")
  assert cpu_attention._load.__wrapped__() is None
  monkeypatch.setenv("DAPO_JAX_CPU_ATTENTION", "1")
  monkeypatch.setenv("DAPO_JAX_CACHE", str(tmp_path))  # nothing built here yet
  monkeypatch.setenv("CXX", "no-such-compiler-dapo")
  assert cpu_attention._load.__wrapped__() is None
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-dapo'"):
    cpu_attention._build()
