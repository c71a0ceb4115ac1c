"""Causal grouped-query self-attention over rows of packed segments, per platform.

    out = attention(q, k, v, segment_ids=segment_ids)   # q [b, s, heads, d], k/v [b, s, kv_heads, d]

Token i of a row attends to token j of the same row when j <= i and segment_ids[i] == segment_ids[j]. Segments
are contiguous runs of one id, so causal by index within a segment is causal by position, and the kernels need
no positions (RoPE, applied before, does). A row with one sequence and padding uses id 1 on real tokens and 0 on
padding; padding then attends to earlier padding (every token sees at least itself, so no softmax is empty),
and its output is never read, exactly as a packed row's trailing padding.

Implementations, all with float32 scores and softmax:
  "splash": TPU, jax's Pallas splash attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`):
            forward and backward kernels that skip the blocks above the diagonal.
            With bfloat16 inputs it needs the default matmul precision: under jax_default_matmul_precision
            "highest" Mosaic refuses its dots ("Mosaic failed to compile TPU kernel: Bad lhs type").
  "gpu":    jax's Pallas flash attention for GPUs (`jax.experimental.pallas.ops.gpu.attention.mha`).
  "xla":    plain XLA, block-wise over query blocks: a block of queries is scored against the keys up to
            its last query (its causal prefix) with an exact softmax, and a flash-style backward pass
            (`custom_vjp`) recomputes each block's probabilities from the saved log-sum-exp. Neither a [s, s]
            mask nor a [.., s, s] score array exists; the keys after a block are never scored, so about half
            of the full rows' arithmetic is skipped (what a causal kernel skips, at block granularity).
  "auto":   the kernel of the platform the program is lowered for (`lax.platform_dependent`: splash on TPU,
            the GPU kernel on CUDA, xla elsewhere). The choice is made at lowering, not from the default backend,
            so a program compiled ahead of time for a TPU topology from a CPU host gets the TPU kernel.

On a mesh, pass `mesh_layout`: XLA cannot partition the TPU and GPU kernels (Mosaic says "Mosaic kernels cannot
be automatically partitioned. Please wrap the call in a shard_map."), so each device runs them on its own rows
and heads, split as the sharding rules split the batch and the heads (`shard_map`).
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from dapo_jax import sharding as sharding_lib
from dapo_jax.model.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

XLA_QUERY_BLOCK = 128
"""Queries per block of the XLA implementation; its largest score array is [b, heads, block, s]."""
XLA_MAX_QUERY_BLOCKS = 32
"""The XLA implementation's blocks are unrolled in the program: longer rows get larger blocks rather than more."""
SPLASH_BLOCK = 512
"""The splash kernel's largest query and key tile (smaller when the padded length is not a multiple)."""
_LANES = 128  # the splash kernel's key tiles are multiples of a TPU vector register's 128 lanes


@dataclasses.dataclass(frozen=True)
class MeshLayout:
  """The mesh a program's activations live on and the rules that place them (`dapo_jax/sharding.py`)."""
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...] = sharding_lib.DEFAULT_RULES


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array,
              implementation: str = "auto", mesh_layout: MeshLayout | None = None) -> jax.Array:
  """Causal grouped-query attention within segments: q [b, s, heads, d], k/v [b, s, kv_heads, d], segment_ids
  [b, s] int -> [b, s, heads, d] in v's dtype. Query head h reads key/value head h // (heads // kv_heads)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  segment_ids = segment_ids.astype(jnp.int32)
  splash_fn = per_device(splash_attention, mesh_layout)
  gpu_fn = per_device(gpu_flash_attention, mesh_layout)
  if implementation == "xla":
    return xla_attention(q, k, v, segment_ids)
  if implementation == "splash":
    return splash_fn(q, k, v, segment_ids)
  if implementation == "gpu":
    return gpu_fn(q, k, v, segment_ids)
  return jax.lax.platform_dependent(q, k, v, segment_ids, tpu=splash_fn, cuda=gpu_fn, default=xla_attention)


def per_device(kernel, mesh_layout: MeshLayout | None):
  """`kernel(q, k, v, segment_ids)` run by each device of the layout's mesh on its rows and heads.

  Rows split as the rules' `batch` axis, heads as `heads` when the key/value heads split the same way (each
  device then holds whole groups of query heads with their key/value head), else whole; sequences never
  split, as the causal mask runs along them.
  """
  if mesh_layout is None:
    return kernel

  def run(q, k, v, segment_ids):
    def spec(x, heads_axis):
      return sharding_lib.logical_to_spec(("batch", None, heads_axis, None), mesh_layout.rules, mesh_layout.mesh,
                                          x.shape)
    q_spec, kv_spec = spec(q, "heads"), spec(k, "kv_heads")
    if q_spec[2] != kv_spec[2]:
      q_spec, kv_spec = PartitionSpec(q_spec[0], None, None, None), PartitionSpec(kv_spec[0], None, None, None)
    in_specs = (q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0]))
    return jax.shard_map(kernel, mesh=mesh_layout.mesh, in_specs=in_specs, out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)

  return run


def _pad_length(x: jax.Array, length: int, value=0) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


# --- XLA -----------------------------------------------------------------------------------------------------

def _query_blocks(length: int, block: int) -> list[tuple[int, int]]:
  """[start, stop) of each query block: `block` queries each (the last may be shorter), fewer and larger blocks
  when a row would need more than XLA_MAX_QUERY_BLOCKS, so that the unrolled program stays small."""
  block = max(block, -(-length // XLA_MAX_QUERY_BLOCKS))
  return [(start, min(start + block, length)) for start in range(0, length, block)]


def _grouped(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """[b, s, heads, d] -> [b, kv_heads, group, s, d]: each key/value head's query heads side by side."""
  b, s, num_heads, d = x.shape
  return jnp.transpose(x.reshape(b, s, num_kv_heads, num_heads // num_kv_heads, d), (0, 2, 3, 1, 4))


def _ungrouped(x: jax.Array) -> jax.Array:
  b, num_kv_heads, group, s, d = x.shape
  return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b, s, num_kv_heads * group, d)


def _prefix_scores(qg, kt, segment_ids, start, stop):
  """Scores [b, kv_heads, group, stop - start, stop] (float32) of queries start..stop-1 against keys 0..stop-1
  (the causal prefix of the block: the keys after `stop` are invisible to all of them), and which are visible."""
  scores = jnp.einsum("bkgqd,bktd->bkgqt", qg[:, :, :, start:stop], kt[:, :, :stop],
                      preferred_element_type=jnp.float32) * qg.shape[-1] ** -0.5
  same_segment = segment_ids[:, start:stop, None] == segment_ids[:, None, :stop]
  causal = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
  return scores, (same_segment & causal)[:, None, None]


def _xla_forward(q, k, v, segment_ids, block):
  num_kv_heads = k.shape[2]
  qg = _grouped(q, num_kv_heads)
  kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)              # [b, kv_heads, s, d]
  outs, logsumexps = [], []
  for start, stop in _query_blocks(q.shape[1], block):
    scores, visible = _prefix_scores(qg, kt, segment_ids, start, stop)
    # Every query sees at least itself, so the row maximum is finite and the float32 minimum of the masked
    # scores vanishes in exp.
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    row_max = scores.max(axis=-1, keepdims=True)
    p = jnp.exp(scores - row_max)
    denominator = p.sum(axis=-1, keepdims=True)
    outs.append(jnp.einsum("bkgqt,bktd->bkgqd", p.astype(v.dtype), vt[:, :, :stop],
                           preferred_element_type=jnp.float32) / denominator)
    logsumexps.append((row_max + jnp.log(denominator))[..., 0])
  out = _ungrouped(jnp.concatenate(outs, axis=3)).astype(v.dtype)
  return out, jnp.concatenate(logsumexps, axis=3)                     # logsumexp [b, kv_heads, group, s]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xla_attention(q, k, v, segment_ids, block):
  return _xla_forward(q, k, v, segment_ids, block)[0]


def _xla_attention_fwd(q, k, v, segment_ids, block):
  out, logsumexp = _xla_forward(q, k, v, segment_ids, block)
  return out, (q, k, v, segment_ids, out, logsumexp)


def _xla_attention_bwd(block, residuals, d_out):
  """Flash attention's backward pass: each query block's probabilities are recomputed from the saved
  log-sum-exp, so the backward pass holds one block of scores at a time, as the forward pass does."""
  q, k, v, segment_ids, out, logsumexp = residuals
  length, num_kv_heads = q.shape[1], k.shape[2]
  qg = _grouped(q, num_kv_heads)
  kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  d_out = _grouped(d_out, num_kv_heads).astype(jnp.float32)
  # D_i = sum_d dO_i * O_i, the softmax's backward correction per query.
  delta = jnp.sum(d_out * _grouped(out, num_kv_heads).astype(jnp.float32), axis=-1)
  scale = q.shape[-1] ** -0.5
  to_length = lambda x, stop: jnp.pad(x, ((0, 0), (0, 0), (0, length - stop), (0, 0)))
  dqs, dk, dv = [], 0.0, 0.0
  for start, stop in _query_blocks(length, block):
    scores, visible = _prefix_scores(qg, kt, segment_ids, start, stop)
    p = jnp.where(visible, jnp.exp(scores - logsumexp[:, :, :, start:stop, None]), 0.0)
    d_out_block = d_out[:, :, :, start:stop]
    dv = dv + to_length(jnp.einsum("bkgqt,bkgqd->bktd", p, d_out_block), stop)
    dp = jnp.einsum("bkgqd,bktd->bkgqt", d_out_block, vt[:, :, :stop], preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, :, :, start:stop, None]) * scale
    dqs.append(jnp.einsum("bkgqt,bktd->bkgqd", ds, kt[:, :, :stop], preferred_element_type=jnp.float32))
    dk = dk + to_length(jnp.einsum("bkgqt,bkgqd->bktd", ds, qg[:, :, :, start:stop],
                                   preferred_element_type=jnp.float32), stop)
  dq = _ungrouped(jnp.concatenate(dqs, axis=3))
  return (dq.astype(q.dtype), jnp.swapaxes(dk, 1, 2).astype(k.dtype), jnp.swapaxes(dv, 1, 2).astype(v.dtype),
          np.zeros(segment_ids.shape, jax.dtypes.float0))


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def xla_attention(q, k, v, segment_ids, block: int = XLA_QUERY_BLOCK):
  """The "xla" implementation (see the module docstring), in query blocks of `block` queries."""
  return _xla_attention(q, k, v, segment_ids, block)


# --- TPU: splash attention -----------------------------------------------------------------------------------

def splash_block_sizes(length: int) -> splash.BlockSizes:
  """Forward and backward tiles of the splash kernel for a row of `length` (a multiple of 128) tokens: the
  largest of SPLASH_BLOCK, 256 and 128 that divides it."""
  block = next(size for size in (SPLASH_BLOCK, 256, _LANES) if length % size == 0)
  return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def splash_attention(q, k, v, segment_ids):
  """The "splash" implementation: the multi-head splash kernel, whose query head h reads key/value head
  h // (heads // kv_heads), so grouped-query attention needs no copies of k and v. Rows are padded to a
  multiple of 128 tokens (the kernel's tiles must divide them) with segment id 0 and cut back after."""
  b, s, num_heads, d = q.shape
  length = -(-s // _LANES) * _LANES
  # The kernel does not scale the scores: scaling q first is the same product.
  q = _pad_length(q * jnp.asarray(d ** -0.5, q.dtype), length)
  k, v, segment_ids = _pad_length(k, length), _pad_length(v, length), _pad_length(segment_ids, length)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  kernel = splash.make_splash_mha(mask, block_sizes=splash_block_sizes(length), head_shards=1, q_seq_shards=1)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel's layout: [heads, s, d] per row

  def row(args):
    q_row, k_row, v_row, segments = args
    return kernel(q_row, k_row, v_row, splash.SegmentIds(q=segments, kv=segments))

  # A loop over rows rather than `jax.vmap(kernel)`: jax 0.10.2's TPU interpreter cannot run a vmapped kernel
  # (its grid gains the batch dimension but not its dimension semantics: "safe_zip() argument 1 has length 3
  # but argument 0 has length 4"), and the loop keeps the program tested on CPU the one that runs on TPU. Each
  # call is a whole row, and the kernel's own grid already splits heads between a megacore's cores.
  out = jax.lax.map(row, (heads_major(q), heads_major(k), heads_major(v), segment_ids))
  return heads_major(out)[:, :s].astype(v.dtype)


# --- GPU: Pallas flash attention -----------------------------------------------------------------------------

def gpu_flash_attention(q, k, v, segment_ids, interpret: bool = False):
  """The "gpu" implementation: jax's Pallas (Triton) flash attention with a causal mask and segment ids.

  That kernel has one key/value head per query head, so k and v are repeated over each group of query heads.
  Rows are padded to a multiple of its 128-token forward tiles (which its 32-token backward tiles divide) with
  segment id 0 and cut back after.
  `interpret` runs it in Pallas's interpreter (tests on CPU).
  """
  b, s, num_heads, d = q.shape
  group = num_heads // k.shape[2]
  tile = gpu_attention.BlockSizes.get_default().block_q
  length = -(-s // tile) * tile
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  q, k, v, segment_ids = (_pad_length(x, length) for x in (q, k, v, segment_ids))
  out = gpu_attention.mha(q, k, v, segment_ids, sm_scale=d ** -0.5, causal=True, interpret=interpret)
  return out[:, :s].astype(v.dtype)
