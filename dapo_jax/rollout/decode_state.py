"""The decode state (`DecodeState`): the paged KV cache and the per-slot next tokens that decode steps transform,
its layout and shardings; and what a prefill hands to it (`Prefix`) and a call of decode steps returns
(`DecodeOutput`).

Each of `num_slots` rows holds one response in progress: the position of its next cache entry and its *next
token*: already sampled (with its two log-probs) but not yet returned or fed to the model. The KV cache is a pool
of `num_pages` pages of `page_size` entries per layer, each layer's its own buffer, updated in place across steps;
a slot's entries live in the pages its row of the page table names (`page_table.py`, kept by the host), so a slot
holds memory for the tokens it has, not for the longest response it could have. Pool layout per layer: values
[kv_heads, num_pages, page_size, head_dim], the layout of JAX's paged-attention kernels; keys the same, but on
CPU [kv_heads, num_pages, head_dim, page_size] (`keys_transposed_on`).

Sharding: KV heads over `tensor`; slots over the data-parallel axes and the pages over the same axes, so that a
slot's pages are on its own devices: the pool is `page_shards` blocks of pages, one per slot shard, and page
table entries number pages within their block (decode steps run the attention per device: `decoding.py`).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from dapo_jax import sharding as sharding_lib
from dapo_jax.model.config import Qwen2Config

# Logical axes (dapo_jax/sharding.py rules) of the per-slot vectors; the pool's KV heads follow `kv_heads`, its
# pages the slots' mesh axes (`pool_spec`).
SLOT_AXES = ("cache_batch",)


def keys_transposed_on(platform: str) -> bool:
  """Whether the pool on `platform` ("cpu", "tpu", "gpu") stores keys [kv_heads, num_pages, head_dim, page_size]
  rather than [kv_heads, num_pages, page_size, head_dim] like the values.

  On CPU the transposed keys make attention's scores a run of contiguous products per page, which the CPU
  kernel (`cpu_attention.cc`) and XLA:CPU run faster than keys laid out like the values (docs/benchmarks.md,
  "Measurements behind design choices"). On TPU and GPU the paged-attention kernels take keys laid out like the
  values, and writing one position per slot is then a row of the (8, 128) memory tiles rather than a column.
  """
  return platform == "cpu"


class Prefix(NamedTuple):
  """The result of prefilling P prompts: their KV caches and the logits of each prompt's next token."""
  k: jax.Array        # [layers, P, kv_heads, head_dim, bucket_length], or like v (`keys_transposed_on`)
  v: jax.Array        # [layers, P, kv_heads, bucket_length, head_dim]
  lengths: jax.Array  # [P] int32: true prompt lengths (cache entries beyond them are padding)
  logits: jax.Array   # [P, vocab] float32: logits after each prompt's last token


class DecodeState(NamedTuple):
  """Everything a decode step transforms: the KV pool and, for `num_slots` rows (decode slots), their next
  tokens."""
  k: tuple[jax.Array, ...]   # per layer [kv_heads, num_pages, page_size, head_dim], or with head_dim and
                             # page_size swapped (`keys_transposed_on`)
  v: tuple[jax.Array, ...]   # per layer [kv_heads, num_pages, page_size, head_dim]
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
  def num_pages(self) -> int:
    return self.v[0].shape[1]

  @property
  def page_size(self) -> int:
    return self.v[0].shape[2]


class DecodeOutput(NamedTuple):
  """The tokens a call to `decode_steps` returned, per slot in step order."""
  tokens: jax.Array        # [slots, num_steps] int32
  logp_sampled: jax.Array  # [slots, num_steps] float32
  logp_full: jax.Array     # [slots, num_steps] float32


def init_decode_state(config: Qwen2Config, num_slots: int, num_pages: int, page_size: int, dtype=None,
                      shardings: DecodeState | None = None, keys_transposed: bool = True) -> DecodeState:
  """Empty decode state: every slot free, every page unused (contents are junk until written).

  With `shardings` (`decode_state_shardings`) each array is created directly in its sharding.
  """
  key_shape, value_shape = pool_shapes(config, num_pages, page_size, keys_transposed)
  dtype = dtype or config.dtype

  def zeros() -> DecodeState:
    return DecodeState(
        k=tuple(jnp.zeros(key_shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(value_shape, dtype) for _ in range(config.num_layers)),
        lengths=jnp.zeros((num_slots,), jnp.int32), tokens=jnp.zeros((num_slots,), jnp.int32),
        logp_sampled=jnp.zeros((num_slots,), jnp.float32), logp_full=jnp.zeros((num_slots,), jnp.float32),
        positions=jnp.zeros((num_slots,), jnp.int32), response_keys=jnp.zeros((num_slots, 2), jnp.uint32))

  return jax.jit(zeros, out_shardings=shardings)() if shardings is not None else zeros()


def pool_shapes(config: Qwen2Config, num_pages: int, page_size: int, keys_transposed: bool):
  """Shapes of one layer's key and value pages."""
  value_shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
  key_shape = (config.num_kv_heads, num_pages, config.head_dim, page_size) if keys_transposed else value_shape
  return key_shape, value_shape


def page_bytes(config: Qwen2Config, page_size: int, dtype=None) -> int:
  """Bytes of one page over all layers, keys and values (over all devices)."""
  itemsize = jnp.dtype(dtype or config.dtype).itemsize
  return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * itemsize


class StateLayout(NamedTuple):
  """How a decode state lies on a mesh: the PartitionSpecs of slot vectors and of the pool, and into how many
  blocks the pool's pages are split (one per shard of the slots)."""
  slot_spec: PartitionSpec   # of a [slots] vector
  pool_spec: PartitionSpec   # of a layer's pool, either layout
  page_shards: int


def state_layout(config: Qwen2Config, mesh: jax.sharding.Mesh | None, num_slots: int, rules=None) -> StateLayout:
  """Slots over the data-parallel axes (where they divide `num_slots`), pages over the same axes, KV heads over
  `tensor` (where it divides them); one block of pages without a mesh."""
  if mesh is None:
    return StateLayout(PartitionSpec(), PartitionSpec(), 1)
  rules = rules or sharding_lib.DEFAULT_RULES
  slot_spec = sharding_lib.logical_to_spec(SLOT_AXES, rules, mesh, (num_slots,))
  heads = sharding_lib.logical_to_spec(("kv_heads",), rules, mesh, (config.num_kv_heads,))[0]
  slot_axes = slot_spec[0]
  shards = 1
  for axis in ((slot_axes,) if isinstance(slot_axes, str) else slot_axes or ()):
    shards *= mesh.shape[axis]
  return StateLayout(slot_spec, PartitionSpec(heads, slot_axes, None, None), shards)


def decode_state_shardings(config: Qwen2Config, mesh: jax.sharding.Mesh, num_slots: int, rules=None) -> DecodeState:
  """NamedShardings of a decode state on `mesh` (`state_layout`); the pool's page count must be a multiple of
  its page shards."""
  layout = state_layout(config, mesh, num_slots, rules)
  slot = NamedSharding(mesh, layout.slot_spec)
  pool = NamedSharding(mesh, layout.pool_spec)
  keys = NamedSharding(mesh, PartitionSpec(layout.slot_spec[0], None))
  return DecodeState(k=(pool,) * config.num_layers, v=(pool,) * config.num_layers, lengths=slot, tokens=slot,
                     logp_sampled=slot, logp_full=slot, positions=slot, response_keys=keys)
