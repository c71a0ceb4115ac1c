"""Qwen2 / Qwen2.5 decoder in Flax NNX, with a functional core and an explicit KV cache.

The computation lives in pure functions over a plain nested dict of arrays (`params`), so the trainer, the
sampler and jitted code can call the model with parameters passed in on every call:

    model = Qwen2(config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))   # {'embed': ..., 'layers': {...}, ...}
    logits = forward(params, config, input_ids, attention_mask)
    logits = forward(params, config, packed_ids, segment_ids=segment_ids)   # several sequences a row
    cache = init_cache(config, batch_size=8, max_length=1024)
    logits, cache = extend(params, config, cache, prompt_ids, num_new=prompt_lengths)   # prefill
    h, cache = prefill_hidden_states(params, config, prompt_ids, prompt_lengths)       # the same, cheaper
    logits, cache = extend(params, config, cache, next_ids[:, None])                    # one decode step

Attention over a whole row (training, old log-probs, prefill) is `dapo_jax/model/attention.py`: per-platform
kernels that take segment ids and build no [query, key] mask. Attention against a KV cache is `cache_attention`.

`Qwen2` is the NNX module that owns the weights (each annotated with logical axis names for sharding, see
`dapo_jax/sharding.py`); calling it runs `forward` on its own weights. Decoder layers are stacked along a
leading `layers` axis and run with `lax.scan`, which keeps compile time flat in depth (64 layers for 32B).

Weight layout (shapes without the leading `layers` axis of the stacked decoder weights):
  embed [vocab, embed]; layers: attn_norm [embed], q_kernel [embed, heads, head_dim], q_bias [heads, head_dim],
  k_kernel / v_kernel [embed, kv_heads, head_dim], k_bias / v_bias [kv_heads, head_dim],
  o_kernel [heads, head_dim, embed], mlp_norm [embed], gate_kernel / up_kernel [embed, mlp],
  down_kernel [mlp, embed]; final_norm [embed]; lm_head [embed, vocab] (absent when tied to embed).
"""
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dapo_jax.model import attention as attention_lib
from dapo_jax.model.config import Qwen2Config

Params = dict[str, Any]

# Logical axis names of every weight; `dapo_jax/sharding.py` maps them to mesh axes through config rules.
LAYER_WEIGHT_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("embed",),
    "q_kernel": ("embed", "heads", "head_dim"),
    "q_bias": ("heads", "head_dim"),
    "k_kernel": ("embed", "kv_heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_kernel": ("embed", "kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "o_kernel": ("heads", "head_dim", "embed"),
    "mlp_norm": ("embed",),
    "gate_kernel": ("embed", "mlp"),
    "up_kernel": ("embed", "mlp"),
    "down_kernel": ("mlp", "embed"),
}
EMBED_AXES = ("vocab", "embed")
FINAL_NORM_AXES = ("embed",)
LM_HEAD_AXES = ("embed", "vocab")
# Logical axes of the KV cache [layers, batch, length, kv_heads, head_dim].
CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")


def layer_weight_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
  """Shape of each decoder-layer weight, without the leading `layers` axis."""
  e, h, kv, d, m = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                    config.intermediate_size)
  return {
      "attn_norm": (e,), "q_kernel": (e, h, d), "q_bias": (h, d), "k_kernel": (e, kv, d), "k_bias": (kv, d),
      "v_kernel": (e, kv, d), "v_bias": (kv, d), "o_kernel": (h, d, e), "mlp_norm": (e,),
      "gate_kernel": (e, m), "up_kernel": (e, m), "down_kernel": (m, e),
  }


class KVCache(NamedTuple):
  """Keys and values of every layer, left-aligned per row.

  Row b holds the keys/values of positions 0 .. lengths[b]-1 at cache indices 0 .. lengths[b]-1, so a token's
  rotary position is its cache index and each row (a decode slot) advances independently of the others.
  """
  k: jax.Array        # [layers, batch, max_length, kv_heads, head_dim]
  v: jax.Array        # [layers, batch, max_length, kv_heads, head_dim]
  lengths: jax.Array  # [batch] int32: valid entries per row, i.e. the position of the row's next token

  @property
  def max_length(self) -> int:
    return self.k.shape[2]


def init_cache(config: Qwen2Config, batch_size: int, max_length: int, dtype=None) -> KVCache:
  """An empty cache (all rows of length 0); `dtype` defaults to the compute dtype."""
  shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
  dtype = dtype or config.dtype
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 lengths=jnp.zeros((batch_size,), jnp.int32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32 and cast back before the scale, as transformers' Qwen2RMSNorm does."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [..., head_dim] for integer positions, in the rotate-half layout (float32)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [batch, seq, heads, head_dim] by position; cos/sin are [batch, seq, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention of new tokens against a KV cache. q [b, s, heads, d], k/v [b, t, kv_heads, d],
  mask [b, s, t] (True = attend); s is a decode step's few tokens, so the dense mask is small.

  Scores and softmax are float32. A query row with no visible key (a padding position) gets uniform weights
  instead of NaN; its output is never used.
  """
  b, s, num_heads, d = q.shape
  num_kv_heads = k.shape[2]
  q = q.reshape(b, s, num_kv_heads, num_heads // num_kv_heads, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, num_heads, d)


def _dense(x: jax.Array, kernel: jax.Array, in_dims: int = 1) -> jax.Array:
  """x [..., in...] contracted with kernel [in..., out...] over the last `in_dims` axes of x, as one 2-D matrix
  product over the flattened tokens.

  The same product as the einsum, in the form every backend's matmul handles best, forward and backward: XLA:CPU
  ran the backward pass of the 3-D [batch, seq, ...] einsums off its fast matrix-product path
  (docs/benchmarks.md, "Measurements behind design choices").
  """
  lead = x.shape[:x.ndim - in_dims]
  contracted = math.prod(kernel.shape[:in_dims])
  out = (x.reshape(-1, contracted) @ kernel.reshape(contracted, -1))
  return out.reshape(*lead, *kernel.shape[in_dims:])


def _project_qkv(layer: Params, x: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  def proj(name):
    return _dense(x, layer[f"{name}_kernel"].astype(dtype)) + layer[f"{name}_bias"].astype(dtype)
  return proj("q"), proj("k"), proj("v")


def _attention_out_and_mlp(layer: Params, h: jax.Array, attn: jax.Array, config: Qwen2Config) -> jax.Array:
  dtype = config.dtype
  h = h + _dense(attn, layer["o_kernel"].astype(dtype), in_dims=2)
  x = rms_norm(h, layer["mlp_norm"], config.rms_norm_eps)
  gate = _dense(x, layer["gate_kernel"].astype(dtype))
  up = _dense(x, layer["up_kernel"].astype(dtype))
  return h + _dense(jax.nn.silu(gate) * up, layer["down_kernel"].astype(dtype))


def embed_tokens(params: Params, config: Qwen2Config, input_ids: jax.Array) -> jax.Array:
  """Token embeddings of input_ids [...] in the compute dtype."""
  return jnp.take(params["embed"], input_ids, axis=0).astype(config.dtype)


def logits_from_hidden(params: Params, config: Qwen2Config, h: jax.Array) -> jax.Array:
  """Final norm and LM head: hidden states [..., embed] -> logits [..., vocab] in the compute dtype."""
  h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
  if config.tie_word_embeddings:
    return jnp.einsum("...e,ve->...v", h, params["embed"].astype(config.dtype))
  return jnp.einsum("...e,ev->...v", h, params["lm_head"].astype(config.dtype))


def _maybe_remat(fn, config: Qwen2Config):
  # Inside scan the layer boundary is already a CSE barrier, so prevent_cse can be off.
  return jax.checkpoint(fn, prevent_cse=False) if config.remat else fn


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Rotary positions [batch, length] of packed rows: each run of one segment id counts from 0."""
  index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], jnp.bool_),
                            segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


def hidden_states(params: Params, config: Qwen2Config, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None,
                  mesh_layout: attention_lib.MeshLayout | None = None) -> jax.Array:
  """The decoder's last hidden states [batch, length, embed], before the final norm.

  A row is either one sequence with padding (`attention_mask`, 1 on real tokens; prompts left-padded,
  responses right-padded) or several sequences packed one after another (`segment_ids` [batch, length], a
  distinct positive id per sequence and 0 on padding; see `dapo_jax/model/attention.py`). Tokens attend
  causally within their sequence. `positions` defaults to counting each sequence's tokens from 0. On a mesh,
  `mesh_layout` says how the attention kernels split their work (see `attention.per_device`).
  """
  batch, length = input_ids.shape
  if segment_ids is None:
    attention_mask = (jnp.ones((batch, length), jnp.bool_) if attention_mask is None
                      else attention_mask.astype(jnp.bool_))
    segment_ids = attention_mask.astype(jnp.int32)
    if positions is None:
      # As transformers' generate: left-padded rows start counting at their first real token.
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
  elif attention_mask is not None:
    raise ValueError("hidden_states: pass attention_mask or segment_ids, not both")
  if positions is None:
    positions = segment_positions(segment_ids)
  return _decoder(params, config, input_ids, positions, segment_ids, mesh_layout, keep_kv=False)[0]


def _decoder(params: Params, config: Qwen2Config, input_ids: jax.Array, positions: jax.Array,
             segment_ids: jax.Array, mesh_layout, keep_kv: bool) -> tuple[jax.Array, Any]:
  """The decoder layers over whole rows: last hidden states, and with `keep_kv` every layer's rotated keys and
  values [layers, batch, length, kv_heads, head_dim]."""
  cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)

  def layer_fn(h, layer):
    x = rms_norm(h, layer["attn_norm"], config.rms_norm_eps)
    q, k, v = _project_qkv(layer, x, config.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    attn = attention_lib.attention(q, k, v, segment_ids=segment_ids, implementation=config.attention,
                                   mesh_layout=mesh_layout)
    return _attention_out_and_mlp(layer, h, attn, config), (k, v) if keep_kv else None

  return jax.lax.scan(_maybe_remat(layer_fn, config), embed_tokens(params, config, input_ids), params["layers"])


def prefill_hidden_states(params: Params, config: Qwen2Config, tokens: jax.Array, lengths: jax.Array,
                          mesh_layout: attention_lib.MeshLayout | None = None) -> tuple[jax.Array, KVCache]:
  """`extend_hidden_states` of right-padded prompts `tokens` [batch, s] with true `lengths` [batch] on an empty
  cache of s positions, with the prompts attending to themselves through `dapo_jax/model/attention.py` (no
  [s, s] mask; the padding, segment id 0, attends only to padding) rather than to a cache."""
  batch, s = tokens.shape
  index = jnp.arange(s, dtype=jnp.int32)
  segment_ids = (index[None, :] < lengths[:, None]).astype(jnp.int32)
  positions = jnp.broadcast_to(index, (batch, s))
  h, (k, v) = _decoder(params, config, tokens, positions, segment_ids, mesh_layout, keep_kv=True)
  return h, KVCache(k=k, v=v, lengths=lengths.astype(jnp.int32))


def forward(params: Params, config: Qwen2Config, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
  """Logits [batch, length, vocab] of a (possibly padded or packed: see `hidden_states`) batch; padding
  positions' logits are junk."""
  return logits_from_hidden(params, config,
                            hidden_states(params, config, input_ids, attention_mask, positions, segment_ids))


def extend(params: Params, config: Qwen2Config, cache: KVCache, tokens: jax.Array,
           num_new: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """Appends `tokens` [batch, s] to each row of the cache and returns their logits [batch, s, vocab].

  It is `extend_hidden_states` (see there for how each row advances) followed by the final norm and LM head.
  """
  h, cache = extend_hidden_states(params, config, cache, tokens, num_new)
  return logits_from_hidden(params, config, h), cache


def extend_hidden_states(params: Params, config: Qwen2Config, cache: KVCache, tokens: jax.Array,
                         num_new: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """Appends `tokens` [batch, s] to each row of the cache; returns their last hidden states [batch, s, embed].

  The hidden states are before the final norm (`logits_from_hidden` finishes them), so a prefill can apply the
  LM head to the last prompt position only.

  Row b's tokens go to cache indices lengths[b] .. lengths[b]+s-1 (positions likewise) and attend causally to
  everything before them. `num_new` [batch] (default s) says how many of the s tokens are real: a
  right-padded prefill passes the prompt lengths, and the row's length advances by num_new[b] only (the
  padding's keys are written but stay beyond the row's length, so they are never attended to and are
  overwritten by the next tokens). Prefill is `extend` on an empty cache; one decode step is s = 1. Writes
  past the cache's end are dropped: callers keep lengths[b] + s <= max_length.
  """
  batch, s = tokens.shape
  offsets = cache.lengths
  if num_new is None:
    num_new = jnp.full((batch,), s, jnp.int32)
  positions = offsets[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
  key_index = jnp.arange(cache.max_length, dtype=jnp.int32)
  mask = key_index[None, None, :] <= positions[:, :, None]
  cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)
  rows = jnp.arange(batch)[:, None]

  def layer_fn(h, layer_and_cache):
    layer, k_cache, v_cache = layer_and_cache
    x = rms_norm(h, layer["attn_norm"], config.rms_norm_eps)
    q, k, v = _project_qkv(layer, x, config.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype), mode="drop")
    attn = cache_attention(q, k_cache.astype(config.dtype), v_cache.astype(config.dtype), mask)
    return _attention_out_and_mlp(layer, h, attn, config), (k_cache, v_cache)

  h, (k, v) = jax.lax.scan(layer_fn, embed_tokens(params, config, tokens), (params["layers"], cache.k, cache.v))
  new_cache = KVCache(k=k, v=v, lengths=offsets + num_new.astype(jnp.int32))
  return h, new_cache


def _param(rng: jax.Array, shape: tuple[int, ...], axes: tuple[str, ...], config: Qwen2Config,
           init: str) -> nnx.Param:
  if init == "normal":
    value = 0.02 * jax.random.normal(rng, shape, jnp.float32)  # transformers' initializer_range
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  # eager_sharding=False: building the model needs no mesh; dapo_jax.sharding places the weights.
  return nnx.Param(value.astype(config.param_dtype), out_sharding=axes, eager_sharding=False)


class DecoderLayers(nnx.Module):
  """All decoder layers' weights, stacked along a leading `layers` axis."""

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    inits = {"attn_norm": "ones", "mlp_norm": "ones", "q_bias": "zeros", "k_bias": "zeros", "v_bias": "zeros"}
    for name, shape in layer_weight_shapes(config).items():
      setattr(self, name, _param(rngs.params(), (config.num_layers, *shape), ("layers", *LAYER_WEIGHT_AXES[name]),
                                 config, inits.get(name, "normal")))


class Qwen2(nnx.Module):
  """Qwen2 / Qwen2.5 causal language model: `model(input_ids, attention_mask=None, positions=None,
  segment_ids=None)`."""

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = _param(rngs.params(), (config.vocab_size, config.hidden_size), EMBED_AXES, config, "normal")
    self.layers = DecoderLayers(config, rngs=rngs)
    self.final_norm = _param(rngs.params(), (config.hidden_size,), FINAL_NORM_AXES, config, "ones")
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs.params(), (config.hidden_size, config.vocab_size), LM_HEAD_AXES, config,
                            "normal")

  @property
  def params(self) -> Params:
    """The weights as a plain nested dict of arrays, the input of the functional API."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    return forward(self.params, self.config, input_ids, attention_mask, positions, segment_ids)

  def extend(self, cache: KVCache, tokens: jax.Array, num_new: jax.Array | None = None):
    return extend(self.params, self.config, cache, tokens, num_new)


def abstract_model(config: Qwen2Config) -> Qwen2:
  """The model with shape-only weights (no memory), e.g. to count parameters or derive shardings."""
  return nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
