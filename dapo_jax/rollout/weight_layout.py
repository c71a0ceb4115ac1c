"""The model's weights laid out for rollouts: `DecodeWeights`, made once per run of decoding, the rollout's one
copy of the weights beside the trainer's.

Prefill and decode steps read the decoder layers' weights unstacked into one array per layer and weight, in the
compute dtype, with the q, k and v projections fused into one matrix and the MLP's gate and up into another
(fewer, larger matrix products). Slicing a layer out of the stacked weights inside the step function would copy
it on every call. The embedding, final norm and LM head are copied in the compute dtype too; greedy runs also get
the LM head as [vocab, embed] (the embedding itself when tied, else a transposed copy of the LM head).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config


class DecodeWeights(NamedTuple):
  """The model's weights laid out for rollouts (see the module docstring); build with `decode_weights`."""
  head: dict[str, jax.Array]               # embed, final_norm and (untied) lm_head, in the compute dtype; for
                                            # greedy decoding also unembed, the LM head as [vocab, embed] (the
                                            # embedding itself when tied, else lm_head transposed)
  layers: tuple[dict[str, jax.Array], ...]  # per layer: attn_norm, qkv_kernel [embed, kv_heads, group + 2,
                                            # head_dim], qkv_bias [kv_heads, group + 2, head_dim], o_kernel
                                            # [heads * head_dim, embed], mlp_norm, gate_up_kernel
                                            # [embed, 2, mlp], down_kernel [mlp, embed]


def decode_weights(params: qwen2.Params, config: Qwen2Config, greedy: bool = False) -> DecodeWeights:
  """`params` (the model's plain dict, any dtype) as `DecodeWeights` for sampling (`greedy` False) or greedy
  decoding: the arrays `new_decode_arrays` makes, with the tied LM head shared."""
  return with_tied_unembed(new_decode_arrays(params, config, greedy), config, greedy)


def new_decode_arrays(params: qwen2.Params, config: Qwen2Config, greedy: bool = False) -> DecodeWeights:
  """Every array of `DecodeWeights`, new, but the tied greedy `unembed` (the embedding itself:
  `with_tied_unembed`), which a jitted function would return as a second copy."""
  head = {name: params[name].astype(config.dtype) for name in ("embed", "final_norm", "lm_head") if name in params}
  if greedy and not config.tie_word_embeddings:
    head["unembed"] = head["lm_head"].T
  return DecodeWeights(head=head, layers=decode_layers(params, config))


def with_tied_unembed(weights: DecodeWeights, config: Qwen2Config, greedy: bool) -> DecodeWeights:
  if greedy and config.tie_word_embeddings:
    return weights._replace(head=dict(weights.head, unembed=weights.head["embed"]))
  return weights


def decode_layers(params: qwen2.Params, config: Qwen2Config) -> tuple[dict[str, jax.Array], ...]:
  """Unstacks the decoder layers of `params` into `DecodeWeights.layers`.

  The query, key and value projections become one matrix, grouped by KV head: for each KV head, the `group`
  query heads that share it, then its key, then its value ([embed, kv_heads, group + 2, head_dim]). One matrix
  product then gives q, k and v already in the attention's (KV head, group) layout, and a `tensor` sharding of
  the KV heads keeps each shard's q, k and v together. Gate and up are stacked on a new axis for the same
  reasons. Matrices are cast to the compute dtype once here rather than on every step.
  """
  e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  group = h // kv
  dtype = config.dtype
  layers = []
  for i in range(config.num_layers):
    layer = jax.tree.map(lambda weight, i=i: weight[i], params["layers"])
    qkv_kernel = jnp.concatenate([layer["q_kernel"].reshape(e, kv, group, d), layer["k_kernel"][:, :, None],
                                  layer["v_kernel"][:, :, None]], axis=2)
    qkv_bias = jnp.concatenate([layer["q_bias"].reshape(kv, group, d), layer["k_bias"][:, None],
                                layer["v_bias"][:, None]], axis=1)
    layers.append({
        "attn_norm": layer["attn_norm"],
        "qkv_kernel": qkv_kernel.astype(dtype),
        "qkv_bias": qkv_bias.astype(dtype),
        "o_kernel": layer["o_kernel"].reshape(h * d, e).astype(dtype),
        "mlp_norm": layer["mlp_norm"],
        "gate_up_kernel": jnp.stack([layer["gate_kernel"], layer["up_kernel"]], axis=1).astype(dtype),
        "down_kernel": layer["down_kernel"].astype(dtype),
    })
  return tuple(layers)
