"""The device side of rollouts: prefill, insert into decode slots and their pages, and k fused decode steps.

Pure functions over arrays (no JetStream here, so the training program can import them cheaply); the group
sampler (`sampler.py`) and the JetStream engine (`engine.py`) are two drivers of the same three functions:

    weights = decode_weights(params, config)                                   # once per run of decoding
    prefix = prefill(weights, config, padded_prompts, prompt_lengths)          # once per prompt
    state = insert(prefix, state, writes, starts, sampling)                    # into pages, then n slots: a group
    state, out = decode_steps(weights, config, state, page_table, num_steps, sampling)  # all slots, num_steps tokens

(`decode_weights` is in `weight_layout.py`, the decode state in `decode_state.py`, the host's page bookkeeping
in `page_table.py`.)

Decode state. Each slot holds the *next token* of its response: already sampled but not yet returned or fed to
the model. A decode step returns the next tokens, feeds them, and samples the following ones; `insert` samples a
response's first token from the prefill's logits. So a step's output is exactly the tokens of the responses in
order, and JetStream's orchestrator, which streams only what `generate` returns, loses no first token.

Paged KV cache. Keys and values live in a pool of pages; the page table (the host's, passed to every call)
names each slot's pages. `insert` copies a prefix into pages: the n samples of a group share its prompt's full
pages, so those are written once, and each sample gets its own copy of the last, partial page. A decode step
writes each slot's new key and value into the page its table names for that cache index (dropped where the
table names none) and attends over the slot's pages: on one CPU device with the C++ kernel
(`cpu_attention.py`, `attention_kernel_on`), elsewhere with `paged_attention.py` (JAX's TPU or GPU
paged-attention kernel, or XLA), run per device on a mesh, where each device holds its slots' pages.

Randomness. The token at response position t is drawn with `fold_in(response_key, t)`, and the response key
comes from (seed, prompt index, sample index) (`sampling.response_key`), so a response does not depend on the
slot it runs in, the pages it holds, or on what runs beside it.

Speed (decode is most of an RL step). Prefill and decode steps read `DecodeWeights` (`weight_layout.py`:
unstacked layers, fused matrices; the rollout's one copy of the weights). The layer loop is unrolled in Python (not scanned) so that each layer's pool is its own buffer,
updated in place across steps, where a scan over stacked layers copies every layer's pool in and out of the loop
on every step. The prefill applies the LM head to each prompt's last token only.
"""
from collections.abc import Callable
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import attention as attention_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.rollout import cpu_attention
from dapo_jax.rollout import decode_state as decode_state_lib
from dapo_jax.rollout import paged_attention as paged_attention_lib
from dapo_jax.rollout import sampling as sampling_lib
from dapo_jax.rollout.decode_state import DecodeOutput, DecodeState, Prefix
from dapo_jax.rollout.sampling import SamplingParams
from dapo_jax.rollout.weight_layout import DecodeWeights, new_decode_arrays, with_tied_unembed

MIN_PREFILL_BUCKET = 16
"""The shortest prefill length bucket (`batching.bucket_length`'s minimum for prompts): prompts are padded to a
power of two of at least this many tokens, which bounds the number of prefill compilations."""
UNROLLED_STEPS = 4
"""`decode_steps` runs up to this many steps unrolled in Python, more in a `lax.scan`: XLA's TPU compiler gives a
scan that carries the pool temporaries as large as the pool, which a chip the pool fills has no room for, where
two unrolled steps need little beyond it (`scripts/plan_memory.py` reports a call's temporaries). The steps are
the same operations either way, so the tokens are too."""


def attention_kernel_on(platform: str, num_devices: int, config: Qwen2Config, page_size: int) -> bool:
  """Whether decode steps of `config` on `num_devices` devices of `platform` run attention with the CPU kernel
  (`cpu_attention.py`: RoPE, the cache writes and attention in one call, which made decode steps faster on every
  CPU measured: docs/benchmarks.md) rather than XLA's ops.

  The kernel needs one CPU device (it does not split across a mesh), float32 compute and pages, the transposed
  keys of `decode_state.keys_transposed_on("cpu")`, a supported shape and page size, and a C++ compiler to build
  it (checked here, so the first call may take a few seconds).
  """
  group = config.num_heads // config.num_kv_heads
  return (platform == "cpu" and num_devices == 1 and config.dtype == jnp.float32
          and cpu_attention.supports(group, config.head_dim, page_size) and cpu_attention.available())


def prefill(weights: DecodeWeights, config: Qwen2Config, tokens: jax.Array, lengths: jax.Array,
            keys_transposed: bool = True, mesh_layout: attention_lib.MeshLayout | None = None) -> Prefix:
  """Runs P right-padded prompts `tokens` [P, bucket_length] with true `lengths` [P] through the model, on the
  decode weights: the arithmetic of `qwen2.prefill_hidden_states`, with the prompts attending to themselves
  through `dapo_jax/model/attention.py` (`mesh_layout`: the mesh the prompts are on, for the attention kernels).

  Each row's padding is written into its cache beyond its length, where it is never attended to and is
  overwritten by the response; the LM head runs on each prompt's last real token only.
  """
  num_prompts, length = tokens.shape
  kv_heads, head_dim = config.num_kv_heads, config.head_dim
  group = config.num_heads // kv_heads
  index = jnp.arange(length, dtype=jnp.int32)
  segment_ids = (index[None, :] < lengths[:, None]).astype(jnp.int32)
  cos, sin = qwen2.rotary_cos_sin(jnp.broadcast_to(index, (num_prompts, length)), head_dim, config.rope_theta)
  h = qwen2.embed_tokens(weights.head, config, tokens)  # [P, s, embed]
  keys, values = [], []
  for layer in weights.layers:
    x = qwen2.rms_norm(h, layer["attn_norm"], config.rms_norm_eps)
    qkv = jnp.einsum("bse,ekhd->bskhd", x, layer["qkv_kernel"]) + layer["qkv_bias"]
    q = qwen2.apply_rotary(qkv[:, :, :, :group].reshape(num_prompts, length, -1, head_dim), cos, sin)
    k = qwen2.apply_rotary(qkv[:, :, :, group], cos, sin)  # [P, s, kv_heads, d]
    v = qkv[:, :, :, group + 1]
    attn = attention_lib.attention(q, k, v, segment_ids=segment_ids, implementation=config.attention,
                                   mesh_layout=mesh_layout)
    h = h + attn.reshape(num_prompts, length, -1).astype(config.dtype) @ layer["o_kernel"]
    x = qwen2.rms_norm(h, layer["mlp_norm"], config.rms_norm_eps)
    gate_up = jnp.einsum("bse,etm->bstm", x, layer["gate_up_kernel"])
    h = h + (jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]) @ layer["down_kernel"]
    # [P, s, kv_heads, head_dim] -> the pool's layouts (values [P, kv_heads, s, head_dim], keys the same or
    # [P, kv_heads, head_dim, s]).
    keys.append(jnp.transpose(k, (0, 2, 3, 1)) if keys_transposed else jnp.swapaxes(k, 1, 2))
    values.append(jnp.swapaxes(v, 1, 2))
  last_hidden = h[jnp.arange(num_prompts), lengths - 1]
  logits = qwen2.logits_from_hidden(weights.head, config, last_hidden).astype(jnp.float32)
  return Prefix(k=jnp.stack(keys), v=jnp.stack(values), lengths=lengths.astype(jnp.int32), logits=logits)


class PageWrites(NamedTuple):
  """Prefix rows to copy into pages: row `rows[i]` of a prefix, its j-th page of `page_size` entries into pool page
  `pages[i, j]` (a global page index; one past the pool's last page drops that page, e.g. padding of the
  prompt bucket, or full prompt pages another write already put in shared pages)."""
  rows: jax.Array   # [W] int32
  pages: jax.Array  # [W, bucket_length // page_size] int32


class SlotStarts(NamedTuple):
  """Responses to start: slot `slots[i]` (>= num_slots: an unused entry, dropped) continues from prefix row
  `rows[i]` at response position `positions[i]` (0 for a new response; a readmitted response continues where it
  was preempted), with key `response_keys[i]`; its cache holds the row's `lengths` entries."""
  rows: jax.Array           # [S] int32
  slots: jax.Array          # [S] int32
  positions: jax.Array      # [S] int32
  response_keys: jax.Array  # [S, 2] uint32


def insert(prefix: Prefix, state: DecodeState, writes: PageWrites, starts: SlotStarts, sampling: SamplingParams,
           keys_transposed: bool = True) -> DecodeState:
  """Copies prefix rows into pages (`writes`) and starts responses in slots (`starts`).

  Several slots may start from the same prefix row (the samples of one group share one prefill and its full
  prompt pages). Each response's next token is sampled here, from the prefix logits, with the key of its
  response position.
  """
  page_size = state.page_size
  bucket_length = prefix.v.shape[3]
  if bucket_length % page_size:
    raise ValueError(f"insert: the prefix holds {bucket_length} positions, not a whole number of {page_size}-entry "
                     "pages; prefill buckets must be multiples of the page size")
  num_writes, bucket_pages = writes.pages.shape
  pages = writes.pages.reshape(-1)

  def put(pool, prefix_layer, transposed):
    rows = prefix_layer[writes.rows].astype(pool.dtype)  # [W, kv, bucket, d] or [W, kv, d, bucket]
    kv_heads, head_dim = rows.shape[1], pool.shape[3] if not transposed else pool.shape[2]
    if transposed:  # -> [kv, W * bucket_pages, d, page_size]
      blocks = rows.reshape(num_writes, kv_heads, head_dim, bucket_pages, page_size).transpose(1, 0, 3, 2, 4)
      return pool.at[:, pages].set(blocks.reshape(kv_heads, -1, head_dim, page_size), mode="drop")
    blocks = rows.reshape(num_writes, kv_heads, bucket_pages, page_size, head_dim).transpose(1, 0, 2, 3, 4)
    return pool.at[:, pages].set(blocks.reshape(kv_heads, -1, page_size, head_dim), mode="drop")

  rows, slots = starts.rows.astype(jnp.int32), starts.slots.astype(jnp.int32)
  first = sampling_lib.sample_tokens(
      prefix.logits[rows], sampling_lib.token_keys(starts.response_keys, starts.positions), sampling)

  def set_rows(values, new_values):
    return values.at[slots].set(new_values.astype(values.dtype), mode="drop")

  return DecodeState(
      k=tuple(put(pool, prefix.k[i], keys_transposed) for i, pool in enumerate(state.k)),
      v=tuple(put(pool, prefix.v[i], False) for i, pool in enumerate(state.v)),
      lengths=set_rows(state.lengths, prefix.lengths[rows]),
      tokens=set_rows(state.tokens, first.tokens),
      logp_sampled=set_rows(state.logp_sampled, first.logp_sampled),
      logp_full=set_rows(state.logp_full, first.logp_full),
      positions=set_rows(state.positions, starts.positions),
      response_keys=set_rows(state.response_keys, starts.response_keys))


def decode_steps(weights: DecodeWeights, config: Qwen2Config, state: DecodeState, page_table: jax.Array,
                 num_steps: int, sampling: SamplingParams, keys_transposed: bool = True,
                 attention_kernel: bool = False, mesh_layout: attention_lib.MeshLayout | None = None
                 ) -> tuple[DecodeState, DecodeOutput]:
  """`num_steps` decode steps for every slot in one device call.

  Each step returns the slots' next tokens, feeds them to the model and samples the following ones. Slots
  whose response has ended keep going (their tokens are junk the caller ignores); a write to a cache entry for
  which `page_table` names no page is dropped.

  `page_table` [slots, width] int32 names each slot's pages (within the slot's block of pages on a mesh:
  `decode_state.state_layout`); entries outside the block mean "no page". Its width bounds what attention may
  read: the caller passes the columns that cover every live slot's cache through these steps
  (`page_table.PageTable.window`), so early in a long rollout the XLA path gathers the pages in use rather than
  all pages a full-length response could hold. `attention_kernel` (`attention_kernel_on`) runs attention with
  the CPU kernel; `mesh_layout` is the state's mesh, on which attention runs per device.
  """
  def step(state: DecodeState, _):
    logits, k, v = _decode_forward(weights, config, state, page_table, keys_transposed, attention_kernel,
                                   mesh_layout)
    if "unembed" in weights.head:
      if not sampling.greedy:
        raise ValueError("decode_steps: these weights were made for greedy decoding (decode_weights(greedy=True))")
      following = sampling_lib.greedy_vocab_major(logits)
    else:
      following = sampling_lib.sample_tokens(
          logits, sampling_lib.token_keys(state.response_keys, state.positions + 1), sampling)
    emitted = (state.tokens, state.logp_sampled, state.logp_full)
    state = state._replace(k=k, v=v, lengths=state.lengths + 1, tokens=following.tokens,
                           logp_sampled=following.logp_sampled, logp_full=following.logp_full,
                           positions=state.positions + 1)
    return state, emitted

  if num_steps <= UNROLLED_STEPS:
    emitted = []
    for _ in range(num_steps):
      state, out = step(state, None)
      emitted.append(out)
    tokens, logp_sampled, logp_full = (jnp.stack(values) for values in zip(*emitted))
  else:
    state, (tokens, logp_sampled, logp_full) = jax.lax.scan(step, state, None, length=num_steps)
  return state, DecodeOutput(tokens=tokens.T, logp_sampled=logp_sampled.T, logp_full=logp_full.T)


def _decode_forward(weights: DecodeWeights, config: Qwen2Config, state: DecodeState, page_table: jax.Array,
                    keys_transposed: bool, attention_kernel: bool, mesh_layout: attention_lib.MeshLayout | None
                    ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """One token per slot through the model: logits (float32; [slots, vocab], or [vocab, slots] with weights made
  for greedy decoding) and the updated per-layer pools.

  The arithmetic of `qwen2.extend` for one new token, on `DecodeWeights`, attending to each slot's pages.
  """
  num_slots, dtype = state.num_slots, config.dtype
  positions = state.lengths[:, None]  # [slots, 1]: the fed token's position is its cache index
  cos, sin = qwen2.rotary_cos_sin(positions, config.head_dim, config.rope_theta)
  attend = _per_device(functools.partial(_attend_layer, keys_transposed=keys_transposed,
                                         attention_kernel=attention_kernel),
                       config, mesh_layout, num_slots)
  h = qwen2.embed_tokens(weights.head, config, state.tokens)  # [slots, embed]
  new_k, new_v = [], []
  for layer, k_pool, v_pool in zip(weights.layers, state.k, state.v):
    x = qwen2.rms_norm(h, layer["attn_norm"], config.rms_norm_eps)
    qkv = jnp.einsum("be,ekhd->bkhd", x, layer["qkv_kernel"]) + layer["qkv_bias"]
    attn, k_pool, v_pool = attend(qkv, cos[:, 0], sin[:, 0], k_pool, v_pool, state.lengths, page_table)
    h = h + attn.reshape(num_slots, -1).astype(dtype) @ layer["o_kernel"]
    x = qwen2.rms_norm(h, layer["mlp_norm"], config.rms_norm_eps)
    gate_up = jnp.einsum("be,etm->btm", x, layer["gate_up_kernel"])
    h = h + (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ layer["down_kernel"]
    new_k.append(k_pool)
    new_v.append(v_pool)
  if "unembed" not in weights.head:
    return qwen2.logits_from_hidden(weights.head, config, h).astype(jnp.float32), tuple(new_k), tuple(new_v)
  # Greedy decoding: the LM head as [vocab, embed] @ [embed, slots], which measured faster on CPU than
  # [slots, embed] @ [embed, vocab] or [slots, embed] @ a tied [vocab, embed]^T (docs/benchmarks.md, "Measurements
  # behind design choices"), and the greedy choice reads the [vocab, slots] logits as fast. (Sampling reads the
  # vocabulary in a row per slot; transposing these logits for it costs more than the product gains.)
  x = qwen2.rms_norm(h, weights.head["final_norm"], config.rms_norm_eps)
  logits = (weights.head["unembed"].astype(dtype) @ x.T).astype(jnp.float32)
  return logits, tuple(new_k), tuple(new_v)


def _attend_layer(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                  lengths: jax.Array, page_table: jax.Array, *, keys_transposed: bool, attention_kernel: bool
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One layer's attention of the fed tokens on one device's slots and pages: RoPE on the queries and key, the
  key and value written at each slot's cache index `lengths`, attention to entries 0 .. lengths.

  qkv [slots, kv_heads, group + 2, head_dim] (per KV head its query heads, key and value); returns the output
  [slots, kv_heads, group, head_dim] and the updated pools.
  """
  if attention_kernel:  # RoPE, the cache writes and attention in one call
    return cpu_attention.decode_attention_step(qkv, cos, sin, k_pool, v_pool, lengths, page_table)
  num_slots, kv_heads, group = qkv.shape[0], qkv.shape[1], qkv.shape[2] - 2
  head_dim, num_pages, page_size = qkv.shape[3], v_pool.shape[1], v_pool.shape[2]
  # RoPE on the queries and the key at once: [slots, 1 position, kv_heads * (group + 1) heads, head_dim].
  qk = qwen2.apply_rotary(qkv[:, :, :group + 1].reshape(num_slots, 1, -1, head_dim), cos[:, None], sin[:, None])
  qk = qk.reshape(num_slots, kv_heads, group + 1, head_dim)
  q, k, v = qk[:, :, :group], qk[:, :, group], qkv[:, :, group + 1]  # [slots, kv, group, d], [slots, kv, d] x2
  # The page of each slot's cache index (none past the table: the write is then dropped) and the entry in it.
  column = lengths // page_size
  page = jnp.where(column < page_table.shape[1],
                   page_table[jnp.arange(num_slots), jnp.minimum(column, page_table.shape[1] - 1)], num_pages)
  page = jnp.where((page >= 0) & (page < num_pages), page, num_pages)
  offset = lengths % page_size
  # The KV head is an index of the writes, not a slice: with a sliced head axis XLA's TPU compiler changes the
  # pool's memory layout around each write after a call's first step (a copy of the layer's pool per write).
  heads = jnp.arange(kv_heads)[:, None]
  if keys_transposed:  # [kv, pages, d, page_size][:, page, :, offset] is [slots, kv, d]
    k_pool = k_pool.at[:, page, :, offset].set(k.astype(k_pool.dtype), mode="drop")
  else:  # [kv, pages, page_size, d][heads, page, offset] is [kv, slots, d]
    k_pool = k_pool.at[heads, page[None], offset[None]].set(jnp.swapaxes(k, 0, 1).astype(k_pool.dtype), mode="drop")
  v_pool = v_pool.at[heads, page[None], offset[None]].set(jnp.swapaxes(v, 0, 1).astype(v_pool.dtype), mode="drop")
  out = paged_attention_lib.paged_attention(
      q.reshape(num_slots, kv_heads * group, head_dim), k_pool, v_pool, lengths + 1,
      jnp.clip(page_table, 0, num_pages - 1), keys_transposed=keys_transposed)
  return out.reshape(num_slots, kv_heads, group, head_dim), k_pool, v_pool


def _per_device(attend, config: Qwen2Config, mesh_layout: attention_lib.MeshLayout | None, num_slots: int):
  """`attend` (`_attend_layer`) run by each device of the state's mesh on its own slots, KV heads and pages
  (page table entries number pages within a device's block), since XLA cannot see that a slot's pages are on
  its own devices, and the TPU and GPU kernels cannot be partitioned automatically."""
  if mesh_layout is None:
    return attend
  layout = decode_state_lib.state_layout(config, mesh_layout.mesh, num_slots, mesh_layout.rules)
  slots, heads = layout.slot_spec[0], layout.pool_spec[0]
  qkv_spec = PartitionSpec(slots, heads, None, None)
  in_specs = (qkv_spec, PartitionSpec(slots, None), PartitionSpec(slots, None), layout.pool_spec,
              layout.pool_spec, PartitionSpec(slots), PartitionSpec(slots, None))
  return jax.shard_map(attend, mesh=mesh_layout.mesh, in_specs=in_specs,
                       out_specs=(qkv_spec, layout.pool_spec, layout.pool_spec), check_vma=False)


class JittedFunctions(NamedTuple):
  """`decode_weights(params, greedy=False)`, `prefill(weights, tokens, lengths)`,
  `insert(prefix, state, writes, starts, sampling)` and `decode_steps(weights, state, page_table, num_steps,
  sampling)`, jitted for one config (and decode-state sharding). `decode_weights` lays out the rollout's copy of
  the weights (`weight_layout.decode_weights`), in the decode layout of the state's mesh where there is one;
  `new_decode_arrays` is its jitted part (the planner compiles it)."""
  decode_weights: Callable
  new_decode_arrays: Callable
  prefill: Callable
  insert: Callable
  decode_steps: Callable


@functools.lru_cache(maxsize=None)
def jitted_functions(config: Qwen2Config, state_shardings: DecodeState | None = None,
                     keys_transposed: bool = True, attention_kernel: bool = False,
                     mesh_layout: attention_lib.MeshLayout | None = None) -> JittedFunctions:
  """The device functions jitted for one model config; cached, so samplers and engines share compilations.

  `insert` and `decode_steps` donate the decode state, whose pool is then updated in place; with
  `state_shardings` (`decode_state.decode_state_shardings`), the state they return keeps that sharding.
  `keys_transposed` is the key layout of `decode_state.keys_transposed_on` the platform; `attention_kernel`
  (`attention_kernel_on`) has decode steps run attention with the CPU kernel; `mesh_layout` is the decode
  state's mesh, on which the decode weights are laid out tensor parallel (`sharding.decode_rules`), and the
  prefill runs the attention kernels, and decode steps their attention, per device.
  """
  def constrain(state: DecodeState) -> DecodeState:
    if state_shardings is None:
      return state
    return jax.lax.with_sharding_constraint(state, state_shardings)

  def new_arrays(params, greedy=False):
    if mesh_layout is not None:  # the weights in the sampler's layout first: the layout below follows them
      shardings = sharding_lib.param_shardings(qwen2.abstract_model(config), mesh_layout.mesh,
                                               sharding_lib.decode_rules(mesh_layout.rules))
      params = jax.lax.with_sharding_constraint(jax.tree.map(lambda x: x.astype(config.dtype), params), shardings)
    return new_decode_arrays(params, config, greedy)

  def prefill_fn(weights, tokens, lengths):
    return prefill(weights, config, tokens, lengths, keys_transposed, mesh_layout)

  def insert_fn(prefix, state, writes, starts, sampling):
    return constrain(insert(prefix, state, writes, starts, sampling, keys_transposed))

  def decode_fn(weights, state, page_table, num_steps, sampling):
    state, output = decode_steps(weights, config, state, page_table, num_steps, sampling, keys_transposed,
                                 attention_kernel, mesh_layout)
    return constrain(state), output

  new_arrays_fn = jax.jit(new_arrays, static_argnames=("greedy",))

  def weights_fn(params, greedy=False):
    return with_tied_unembed(new_arrays_fn(params, greedy=greedy), config, greedy)

  return JittedFunctions(
      decode_weights=weights_fn,
      new_decode_arrays=new_arrays_fn,
      prefill=jax.jit(prefill_fn),
      insert=jax.jit(insert_fn, static_argnames=("sampling",), donate_argnames=("state",)),
      decode_steps=jax.jit(decode_fn, static_argnames=("num_steps", "sampling"), donate_argnames=("state",)))
