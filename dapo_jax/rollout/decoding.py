"""The device side of rollouts: prefill, insert into decode slots, and k fused decode steps.

Pure functions over arrays (no JetStream here, so the training program can import them cheaply); the group
sampler (`sampler.py`) and the JetStream engine (`engine.py`) are two drivers of the same three functions:

    weights = decode_weights(params, config)                                   # once per run of decoding
    prefix = prefill(params, config, padded_prompts, prompt_lengths)           # once per prompt
    state = insert(prefix, state, prefix_rows, slots, response_keys, sampling)  # into n slots: a group
    state, out = decode_steps(weights, config, state, num_steps, sampling)      # all slots, num_steps tokens

(`decode_weights` is in `weight_layout.py`, the decode state in `decode_state.py`.)

Decode state. Each slot holds the *next token* of its response: already sampled but not yet returned or fed to
the model. A decode step returns the next tokens, feeds them, and samples the following ones; `insert` samples a
response's first token from the prefill's logits. So a step's output is exactly the tokens of the responses in
order, and JetStream's orchestrator, which streams only what `generate` returns, loses no first token.

Randomness. The token at response position t is drawn with `fold_in(response_key, t)`, and the response key
comes from (seed, prompt index, sample index) (`sampling.response_key`), so a response does not depend on the
slot it runs in or on what runs beside it.

Speed (decode is most of an RL step). Decode steps read `DecodeWeights` (`weight_layout.py`: unstacked layers,
fused matrices). The layer loop is unrolled in Python (not scanned) so that each layer's KV cache is its own
buffer, updated in place across steps, where a scan over stacked layers copies every layer's cache in and out of
the loop on every step. The caches are laid out so that both attention contractions are batched matrix products
(`decode_state.py`). On one CPU device attention runs in a C++ kernel that also applies RoPE and writes the caches
in place (`cpu_attention.py`, `attention_kernel_on`). The prefill applies the LM head to each prompt's last token
only.
"""
from collections.abc import Callable
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dapo_jax.model import attention as attention_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.rollout import cpu_attention
from dapo_jax.rollout import sampling as sampling_lib
from dapo_jax.rollout.decode_state import DecodeOutput, DecodeState, Prefix
from dapo_jax.rollout.sampling import SamplingParams
from dapo_jax.rollout.weight_layout import DecodeWeights, assemble_decode_weights, new_decode_arrays

MIN_PREFILL_BUCKET = 16
"""The shortest prefill length bucket (`batching.bucket_length`'s minimum for prompts): prompts are padded to a
power of two of at least this many tokens, which bounds the number of prefill compilations."""


def attention_kernel_on(platform: str, num_devices: int, config: Qwen2Config) -> bool:
  """Whether decode steps of `config` on `num_devices` devices of `platform` run attention with the CPU kernel
  (`cpu_attention.py`: RoPE, the cache writes and attention in one call, which made decode steps faster on every
  CPU measured: docs/benchmarks.md) rather than XLA's ops.

  The kernel needs one CPU device (it does not split across a mesh), float32 compute and caches, the transposed
  key cache of `decode_state.keys_transposed_on("cpu")`, a supported shape, and a C++ compiler to build it
  (checked here, so the first call may take a few seconds).
  """
  group = config.num_heads // config.num_kv_heads
  return (platform == "cpu" and num_devices == 1 and config.dtype == jnp.float32
          and cpu_attention.supports(group, config.head_dim) and cpu_attention.available())


def prefill(params: qwen2.Params, config: Qwen2Config, tokens: jax.Array, lengths: jax.Array,
            keys_transposed: bool = True, mesh_layout: attention_lib.MeshLayout | None = None) -> Prefix:
  """Runs P right-padded prompts `tokens` [P, bucket_length] with true `lengths` [P] through the model
  (`qwen2.prefill_hidden_states`; `mesh_layout`: the mesh the prompts are on, for the attention kernels).

  Each row's padding is written into its cache beyond its length, where it is never attended to and is
  overwritten by the response; the LM head runs on each prompt's last real token only.
  """
  num_prompts = tokens.shape[0]
  hidden, cache = qwen2.prefill_hidden_states(params, config, tokens, lengths, mesh_layout)
  last_hidden = hidden[jnp.arange(num_prompts), lengths - 1]
  logits = qwen2.logits_from_hidden(params, config, last_hidden).astype(jnp.float32)
  # [layers, P, length, kv_heads, head_dim] -> the decode layouts (values [.., kv_heads, length, head_dim], keys
  # the same or [.., kv_heads, head_dim, length]).
  k = jnp.transpose(cache.k, (0, 1, 3, 4, 2)) if keys_transposed else jnp.swapaxes(cache.k, 2, 3)
  return Prefix(k=k, v=jnp.swapaxes(cache.v, 2, 3), lengths=lengths.astype(jnp.int32), logits=logits)


def insert(prefix: Prefix, state: DecodeState, prefix_rows: jax.Array, slots: jax.Array,
           response_keys: jax.Array, sampling: SamplingParams, keys_transposed: bool = True) -> DecodeState:
  """Starts responses: slot `slots[j]` gets prompt `prefix_rows[j]` of the prefix and the key `response_keys[j]`.

  Several slots may take the same prefix row (the samples of one group share one prefill). A slot index
  >= num_slots marks an unused entry (padding the call to a fixed size) and is dropped. Each response's first
  token is sampled here, from the prefix logits, with the key of response position 0.
  """
  bucket_length = prefix.v.shape[3]
  if bucket_length > state.max_length:
    raise ValueError(f"insert: the prefix holds {bucket_length} positions but the decode cache only "
                     f"{state.max_length}; make the cache longer than the prompt bucket")
  rows = jnp.asarray(prefix_rows, jnp.int32)
  slots = jnp.asarray(slots, jnp.int32)
  first = sampling_lib.sample_tokens(
      prefix.logits[rows], sampling_lib.token_keys(response_keys, jnp.zeros_like(rows)), sampling)

  def put_keys(cache_layer, prefix_layer):
    if not keys_transposed:
      return put_values(cache_layer, prefix_layer)
    return cache_layer.at[slots, :, :, :bucket_length].set(prefix_layer[rows].astype(cache_layer.dtype),
                                                           mode="drop")

  def put_values(cache_layer, prefix_layer):
    return cache_layer.at[slots, :, :bucket_length].set(prefix_layer[rows].astype(cache_layer.dtype), mode="drop")

  def set_rows(values, new_values):
    return values.at[slots].set(new_values.astype(values.dtype), mode="drop")

  return DecodeState(
      k=tuple(put_keys(cache, prefix.k[i]) for i, cache in enumerate(state.k)),
      v=tuple(put_values(cache, prefix.v[i]) for i, cache in enumerate(state.v)),
      lengths=set_rows(state.lengths, prefix.lengths[rows]),
      tokens=set_rows(state.tokens, first.tokens),
      logp_sampled=set_rows(state.logp_sampled, first.logp_sampled),
      logp_full=set_rows(state.logp_full, first.logp_full),
      positions=set_rows(state.positions, jnp.zeros_like(rows)),
      response_keys=set_rows(state.response_keys, response_keys))


def decode_steps(weights: DecodeWeights, config: Qwen2Config, state: DecodeState, num_steps: int,
                 sampling: SamplingParams, attend_length: int | None = None, keys_transposed: bool = True,
                 attention_kernel: bool = False) -> tuple[DecodeState, DecodeOutput]:
  """`num_steps` decode steps for every slot in one device call.

  Each step returns the slots' next tokens, feeds them to the model and samples the following ones. Slots
  whose response has ended keep going (their tokens are junk the caller ignores); a slot's cache writes past
  the cache's end are dropped.

  `attend_length` (static; default: the whole cache) bounds the cache entries attention reads: the caller
  passes one that covers every live slot's cache through these steps (`attention_window`), so early in a long
  rollout a step reads the few thousand entries in use rather than all 22k of a 2k + 20k cache.
  `attention_kernel` (`attention_kernel_on`) runs attention with the CPU kernel, which reads exactly the
  entries each slot can see (`attend_length` is then not needed).
  """
  attend_length = state.max_length if attend_length is None else min(attend_length, state.max_length)

  def step(state: DecodeState, _):
    logits, k, v = _decode_forward(weights, config, state, attend_length, keys_transposed, attention_kernel)
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

  state, (tokens, logp_sampled, logp_full) = jax.lax.scan(step, state, None, length=num_steps)
  return state, DecodeOutput(tokens=tokens.T, logp_sampled=logp_sampled.T, logp_full=logp_full.T)


def _decode_forward(weights: DecodeWeights, config: Qwen2Config, state: DecodeState, attend_length: int,
                    keys_transposed: bool, attention_kernel: bool = False
                    ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """One token per slot through the model: logits (float32; [slots, vocab], or [vocab, slots] with weights made
  for greedy decoding) and the updated per-layer caches.

  The arithmetic of `qwen2.extend` for one new token, on `DecodeWeights`, attending to the first
  `attend_length` cache entries.
  """
  num_slots, dtype = state.num_slots, config.dtype
  num_heads, head_dim = config.num_heads, config.head_dim
  group = num_heads // config.num_kv_heads
  slots = jnp.arange(num_slots)
  positions = state.lengths[:, None]  # [slots, 1]: the fed token's position is its cache index
  cos, sin = qwen2.rotary_cos_sin(positions, head_dim, config.rope_theta)
  visible = jnp.arange(attend_length)[None, :] <= state.lengths[:, None]  # [slots, attend_length]
  h = qwen2.embed_tokens(weights.head, config, state.tokens)  # [slots, embed]
  new_k, new_v = [], []
  for layer, k_cache, v_cache in zip(weights.layers, state.k, state.v):
    x = qwen2.rms_norm(h, layer["attn_norm"], config.rms_norm_eps)
    qkv = jnp.einsum("be,ekhd->bkhd", x, layer["qkv_kernel"]) + layer["qkv_bias"]
    if attention_kernel:  # RoPE, the cache writes and attention in one call
      attn, k_cache, v_cache = cpu_attention.decode_attention_step(qkv, cos[:, 0], sin[:, 0], k_cache, v_cache,
                                                                   state.lengths)
      attn = attn.reshape(num_slots, -1)
    else:
      # RoPE on the queries and the key at once: [slots, 1 position, kv_heads * (group + 1) heads, head_dim].
      qk = qwen2.apply_rotary(qkv[:, :, :group + 1].reshape(num_slots, 1, -1, head_dim), cos, sin)
      qk = qk.reshape(num_slots, -1, group + 1, head_dim)
      q, k, v = qk[:, :, :group], qk[:, :, group], qkv[:, :, group + 1]  # [slots, kv, group, d], [slots, kv, d] x2
      if keys_transposed:
        k_cache = k_cache.at[slots, :, :, state.lengths].set(k.astype(k_cache.dtype), mode="drop")
      else:
        k_cache = k_cache.at[slots, :, state.lengths].set(k.astype(k_cache.dtype), mode="drop")
      v_cache = v_cache.at[slots, :, state.lengths].set(v.astype(v_cache.dtype), mode="drop")
      keys = k_cache[..., :attend_length] if keys_transposed else k_cache[:, :, :attend_length]
      attn = _slot_attention(q, keys.astype(dtype), v_cache[:, :, :attend_length].astype(dtype), visible,
                             keys_transposed)
    h = h + attn @ layer["o_kernel"]
    x = qwen2.rms_norm(h, layer["mlp_norm"], config.rms_norm_eps)
    gate_up = jnp.einsum("be,etm->btm", x, layer["gate_up_kernel"])
    h = h + (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ layer["down_kernel"]
    new_k.append(k_cache)
    new_v.append(v_cache)
  if "unembed" not in weights.head:
    return qwen2.logits_from_hidden(weights.head, config, h).astype(jnp.float32), tuple(new_k), tuple(new_v)
  # Greedy decoding: the LM head as [vocab, embed] @ [embed, slots], which measured faster on CPU than
  # [slots, embed] @ [embed, vocab] or [slots, embed] @ a tied [vocab, embed]^T (docs/benchmarks.md, "Measurements
  # behind design choices"), and the greedy choice reads the [vocab, slots] logits as fast. (Sampling reads the
  # vocabulary in a row per slot; transposing these logits for it costs more than the product gains.)
  x = qwen2.rms_norm(h, weights.head["final_norm"], config.rms_norm_eps)
  logits = (weights.head["unembed"].astype(dtype) @ x.T).astype(jnp.float32)
  return logits, tuple(new_k), tuple(new_v)


def _slot_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                    keys_transposed: bool = True) -> jax.Array:
  """Grouped-query attention of one query per slot: q [slots, kv_heads, group, d], k [slots, kv_heads, d, length]
  (keys_transposed) or [slots, kv_heads, length, d], v [slots, kv_heads, length, d], visible [slots, length];
  returns [slots, heads * d] (heads kv-major, as the model numbers them).

  The same arithmetic as `qwen2.cache_attention` (float32 scores and softmax), in the cache's layout.
  """
  num_slots, num_kv_heads, group, head_dim = q.shape
  scores = jnp.einsum("bkgd,bkdt->bkgt" if keys_transposed else "bkgd,bktd->bkgt", q, k,
                      preferred_element_type=jnp.float32) * (head_dim ** -0.5)
  scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgt,bktd->bkgd", probs, v)
  return out.reshape(num_slots, num_kv_heads * group * head_dim)


def attention_window(cache_lengths_needed: int, max_length: int, minimum: int = 64) -> int:
  """The `attend_length` for decode steps that will use up to `cache_lengths_needed` cache entries: the next power
  of two (at least `minimum`), so a rollout compiles a handful of window sizes; or the whole cache
  (`max_length`) where a window would not pay for itself.

  XLA materialises the window (a slice of each layer's key and value caches) before attention reads it, on CPU
  and on TPU alike, so a window of w entries costs about 3w entry reads (the copy's read and write, then
  attention's) against `max_length` for attending to the whole cache. Windows longer than a third of the cache
  are therefore not used (on CPU such a window measured slower than attending to the whole cache:
  docs/benchmarks.md).
  """
  window = max(minimum, 1 << max(cache_lengths_needed - 1, 0).bit_length())
  return window if 3 * window <= max_length else max_length


class JittedFunctions(NamedTuple):
  """`new_decode_arrays(params, greedy=False)`, `prefill(params, tokens, lengths)`,
  `insert(prefix, state, prefix_rows, slots, response_keys, sampling)` and
  `decode_steps(weights, state, num_steps, sampling, attend_length=None)`, jitted for one config (and
  decode-state sharding); `decode_weights(params, greedy=False)` assembles `new_decode_arrays`' output with the
  params' own head arrays (a jitted function would return copies of those)."""
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

  `insert` and `decode_steps` donate the decode state, whose caches are then updated in place; with
  `state_shardings` (`decode_state.decode_state_shardings`), the state they return keeps that sharding.
  `keys_transposed` is the key cache layout of `decode_state.keys_transposed_on` the platform; `attention_kernel`
  (`attention_kernel_on`) has decode steps run attention with the CPU kernel; `mesh_layout` is the decode
  state's mesh, on which the prefill runs the attention kernels per device.
  """
  def constrain(state: DecodeState) -> DecodeState:
    if state_shardings is None:
      return state
    return jax.lax.with_sharding_constraint(state, state_shardings)

  def prefill_fn(params, tokens, lengths):
    return prefill(params, config, tokens, lengths, keys_transposed, mesh_layout)

  def insert_fn(prefix, state, prefix_rows, slots, response_keys, sampling):
    return constrain(insert(prefix, state, prefix_rows, slots, response_keys, sampling, keys_transposed))

  def decode_fn(weights, state, num_steps, sampling, attend_length=None):
    state, output = decode_steps(weights, config, state, num_steps, sampling, attend_length, keys_transposed,
                                 attention_kernel)
    return constrain(state), output

  new_arrays_fn = jax.jit(functools.partial(new_decode_arrays, config=config), static_argnames=("greedy",))

  def weights_fn(params, greedy=False):
    return assemble_decode_weights(params, new_arrays_fn(params, greedy=greedy), greedy)

  return JittedFunctions(
      decode_weights=weights_fn,
      new_decode_arrays=new_arrays_fn,
      prefill=jax.jit(prefill_fn),
      insert=jax.jit(insert_fn, static_argnames=("sampling",), donate_argnames=("state",)),
      decode_steps=jax.jit(decode_fn, static_argnames=("num_steps", "sampling", "attend_length"),
                           donate_argnames=("state",)))
