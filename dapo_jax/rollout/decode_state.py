"""The decode state (`DecodeState`): the per-slot KV caches and next tokens that decode steps transform, its
layout and shardings; and what a prefill hands to it (`Prefix`) and a call of decode steps returns (`DecodeOutput`).

Each of `num_slots` rows holds one response in progress: its KV cache, the position of its next cache entry, and
the *next token*: already sampled (with its two log-probs) but not yet returned or fed to the model. Each layer's KV
cache is its own buffer, updated in place across steps. The caches are laid out so that both attention
contractions are batched matrix products over (slot, KV head) (on CPU far faster than attention over the model's
own [slots, length, kv_heads, head_dim] layout): values [slots, kv_heads, length, head_dim], and keys on CPU
[slots, kv_heads, head_dim, length], elsewhere like the values (`keys_transposed_on`).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dapo_jax import sharding as sharding_lib
from dapo_jax.model.config import Qwen2Config

# Logical axes (dapo_jax/sharding.py rules) of the decode state's per-layer key and value caches and per-slot
# vectors. Keys are stored transposed (head_dim before length) on CPU only: see `keys_transposed_on`.
TRANSPOSED_KEY_CACHE_AXES = ("cache_batch", "kv_heads", "head_dim", "cache_length")
VALUE_CACHE_AXES = ("cache_batch", "kv_heads", "cache_length", "head_dim")
SLOT_AXES = ("cache_batch",)


def keys_transposed_on(platform: str) -> bool:
  """Whether decode caches on `platform` ("cpu", "tpu", "gpu") store keys [slots, kv_heads, head_dim, length]
  rather than [slots, kv_heads, length, head_dim] like the values.

  On CPU the transposed keys make attention's scores a plain matrix product per (slot, KV head), which XLA:CPU
  runs faster than the product with keys laid out like the values (docs/benchmarks.md, "Measurements behind
  design choices"). On TPU they cost more than they save: writing one position per slot is then a column of the
  (8, 128) memory tiles, and XLA copies each layer's key cache into another layout and back on every step (seen
  in AOT-compiled v5p decode steps); keys laid out like the values take a row write and no copy.
  """
  return platform == "cpu"


def key_cache_axes(keys_transposed: bool) -> tuple[str, ...]:
  return TRANSPOSED_KEY_CACHE_AXES if keys_transposed else VALUE_CACHE_AXES


class Prefix(NamedTuple):
  """The result of prefilling P prompts: their KV caches and the logits of each prompt's next token."""
  k: jax.Array        # [layers, P, kv_heads, head_dim, bucket_length], or like v (`keys_transposed_on`)
  v: jax.Array        # [layers, P, kv_heads, bucket_length, head_dim]
  lengths: jax.Array  # [P] int32: true prompt lengths (cache entries beyond them are padding)
  logits: jax.Array   # [P, vocab] float32: logits after each prompt's last token


class DecodeState(NamedTuple):
  """Everything a decode step transforms, for `num_slots` rows (decode slots)."""
  k: tuple[jax.Array, ...]   # per layer [slots, kv_heads, head_dim, max_length], or like v (`keys_transposed_on`)
  v: tuple[jax.Array, ...]   # per layer [slots, kv_heads, max_length, head_dim]
  lengths: jax.Array         # [slots] int32: cache entries in use, i.e. the cache index of `tokens` when fed
  tokens: jax.Array          # [slots] int32: the next token of each response, sampled but not yet returned
  logp_sampled: jax.Array    # [slots] float32: its log-prob under the distribution it was drawn from
  logp_full: jax.Array       # [slots] float32: its log-prob under the untruncated temperature-scaled softmax
  positions: jax.Array       # [slots] int32: its position in the response (0 for the first response token)
  response_keys: jax.Array   # [slots, 2] uint32: raw key data of each slot's response

  @property
  def num_slots(self) -> int:
    return self.tokens.shape[0]

  @property
  def max_length(self) -> int:
    return self.v[0].shape[2]


class DecodeOutput(NamedTuple):
  """The tokens a call to `decode_steps` returned, per slot in step order."""
  tokens: jax.Array        # [slots, num_steps] int32
  logp_sampled: jax.Array  # [slots, num_steps] float32
  logp_full: jax.Array     # [slots, num_steps] float32


def init_decode_state(config: Qwen2Config, num_slots: int, max_length: int, dtype=None,
                      shardings: DecodeState | None = None, keys_transposed: bool = True) -> DecodeState:
  """Empty decode state: every slot free (its outputs are junk until something is inserted into it).

  With `shardings` (`decode_state_shardings`) each array is created directly in its sharding.
  """
  key_shape, value_shape = _cache_shapes(config, num_slots, max_length, keys_transposed)
  dtype = dtype or config.dtype

  def zeros() -> DecodeState:
    return DecodeState(
        k=tuple(jnp.zeros(key_shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(value_shape, dtype) for _ in range(config.num_layers)),
        lengths=jnp.zeros((num_slots,), jnp.int32), tokens=jnp.zeros((num_slots,), jnp.int32),
        logp_sampled=jnp.zeros((num_slots,), jnp.float32), logp_full=jnp.zeros((num_slots,), jnp.float32),
        positions=jnp.zeros((num_slots,), jnp.int32), response_keys=jnp.zeros((num_slots, 2), jnp.uint32))

  return jax.jit(zeros, out_shardings=shardings)() if shardings is not None else zeros()


def _cache_shapes(config: Qwen2Config, num_slots: int, max_length: int, keys_transposed: bool):
  value_shape = (num_slots, config.num_kv_heads, max_length, config.head_dim)
  key_shape = (num_slots, config.num_kv_heads, config.head_dim, max_length) if keys_transposed else value_shape
  return key_shape, value_shape


def decode_state_shardings(config: Qwen2Config, mesh: jax.sharding.Mesh, num_slots: int, max_length: int,
                           rules=None, keys_transposed: bool = True) -> DecodeState:
  """NamedShardings of a decode state on `mesh`: slots over the data-parallel axes, KV heads over `tensor`.

  An axis that does not divide its dimension is replicated instead (as for the weights, `dapo_jax/sharding.py`).
  """
  rules = rules or sharding_lib.DEFAULT_RULES
  key_shape, value_shape = _cache_shapes(config, num_slots, max_length, keys_transposed)
  key_cache = sharding_lib.logical_sharding(key_cache_axes(keys_transposed), rules, mesh, key_shape)
  value_cache = sharding_lib.logical_sharding(VALUE_CACHE_AXES, rules, mesh, value_shape)
  slot = sharding_lib.logical_sharding(SLOT_AXES, rules, mesh, (num_slots,))
  keys = sharding_lib.logical_sharding(SLOT_AXES + (None,), rules, mesh, (num_slots, 2))
  return DecodeState(k=(key_cache,) * config.num_layers, v=(value_cache,) * config.num_layers, lengths=slot,
                     tokens=slot, logp_sampled=slot, logp_full=slot, positions=slot, response_keys=keys)
