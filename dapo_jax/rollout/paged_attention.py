"""A decode step's attention over a paged KV cache, per platform: one query token per sequence.

    out = paged_attention(q, k_pages, v_pages, lengths, page_table)   # q [seqs, heads, d] -> [seqs, heads, d]

Sequence s sees cache entries 0 .. lengths[s] - 1; entry e lives in page page_table[s, e // page_size] at offset
e % page_size of k_pages/v_pages [kv_heads, num_pages, page_size, head_dim]. Query head h reads KV head
h // (heads // kv_heads). Table entries past a sequence's last page may name any page (a shared prefix's pages, a
freed page, page 0): no implementation lets them change the result, provided every page holds finite values (a
pool's pages are zeros until written). A sequence of length 0 gets zeros. q is not scaled yet (the scale is
1/sqrt(head_dim)); scores and softmax are float32. Local to one device: on a mesh the caller runs it per device
(`shard_map`), as XLA cannot partition the kernels.

Implementations:
  "xla":  plain XLA: each sequence's pages gathered into one contiguous [kv_heads, seqs, pages * page_size, d]
          block, scores masked at and past the length, softmax, weighted sum. Every entry of the table is read,
          seen or not. The only one that takes keys in the CPU layout (`keys_transposed`: [kv_heads, num_pages,
          head_dim, page_size]). Any platform; the reference the kernels are tested against.
  "tpu":  jax's Pallas TPU paged attention kernel (`jax.experimental.pallas.ops.tpu.paged_attention`): reads only
          the blocks of pages a sequence can see (a block is `tpu_pages_per_block` pages). It rounds K and V to
          bfloat16 whatever their dtype, and needs the default matmul precision: under
          jax_default_matmul_precision "highest" Mosaic refuses its dots ("Mosaic failed to compile TPU kernel:
          Bad rhs type"). Its page table lives in the core's scalar memory (SMEM, 1 MiB on v4, v5e, v5p and
          v6e), so sequences are passed to it in groups whose tables fit `TPU_PAGE_TABLE_BYTES`.
  "gpu":  jax's Pallas (Triton) paged attention for GPUs (`jax.experimental.pallas.ops.gpu.paged_attention`),
          which splits each sequence's pages between `k_splits` programs and combines their partial softmaxes.
  "auto": the kernel of the platform the program is lowered for (`lax.platform_dependent`: "tpu" on TPU, "gpu"
          on CUDA, "xla" elsewhere), chosen at lowering, so a program compiled ahead of time for a TPU from a CPU
          host gets the TPU kernel. On TPU only bfloat16 pages take the kernel: a float32 cache is chosen for its
          precision, which the kernel would round away.

Shapes a kernel cannot take run "xla" instead, decided in Python from the shapes (`tpu_unfit`, `gpu_unfit` say
why), for "auto" and for a kernel named explicitly alike:
  TPU: keys_transposed; head_dim not a multiple of 128 (the kernel's [groups, head_dim] blocks of its [groups, 1]
       softmax statistics must span whole 128-lane vector registers); page_size 1 (Mosaic fails to verify the
       kernel); one sequence's table alone over TPU_PAGE_TABLE_BYTES.
  GPU: keys_transposed; head_dim or page_size not a power of two (Triton's blocks must be); head_dim under 16,
       or a sequence's whole table under 16 entries (Triton's dots need every dimension >= 16); pages whose
       dtype is not floating.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_kernel
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_kernel

IMPLEMENTATIONS = ("auto", "xla", "tpu", "gpu")

TPU_BLOCK_TOKENS = 512
"""Most cache entries per block of the TPU kernel (its `pages_per_compute_block` pages, fetched into VMEM
together, twice buffered): a sequence's last block reads up to this many entries it cannot see."""
TPU_PAGE_TABLE_BYTES = 768 * 1024
"""Most bytes of page table (int32 entries) per TPU kernel call; 960 KiB still compiled for v4, v5e, v5p and v6e,
1020 KiB did not ("Ran out of memory in memory space smem")."""
GPU_BLOCK_TOKENS = 128
"""Most cache entries per block of the GPU kernel (the kernel's default: 8 pages of 16)."""
GPU_K_SPLITS = 16
"""Most programs one sequence's pages are split between on a GPU (the kernel's default)."""
_GPU_MIN_DOT = 16  # Triton's dots need each dimension to be at least 16


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                    page_table: jax.Array, *, keys_transposed: bool = False,
                    implementation: str = "auto") -> jax.Array:
  """One query per sequence against its paged cache entries (the module docstring): q [seqs, heads, head_dim],
  k_pages/v_pages [kv_heads, num_pages, page_size, head_dim] (k_pages [kv_heads, num_pages, head_dim, page_size]
  with `keys_transposed`), lengths [seqs] int, at most pages_per_seq * page_size, page_table [seqs, pages_per_seq]
  int in [0, num_pages) -> [seqs, heads, head_dim] in q's dtype."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"paged attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  lengths, page_table = lengths.astype(jnp.int32), page_table.astype(jnp.int32)
  xla_fn = functools.partial(xla_paged_attention, keys_transposed=keys_transposed)
  tpu_fn = xla_fn if tpu_unfit(q, k_pages, page_table, keys_transposed) else tpu_paged_attention
  gpu_fn = xla_fn if gpu_unfit(q, k_pages, page_table, keys_transposed) else gpu_paged_attention
  if implementation == "xla":
    return xla_fn(q, k_pages, v_pages, lengths, page_table)
  if implementation == "tpu":
    return tpu_fn(q, k_pages, v_pages, lengths, page_table)
  if implementation == "gpu":
    return gpu_fn(q, k_pages, v_pages, lengths, page_table)
  if k_pages.dtype != jnp.bfloat16:  # the TPU kernel would round a float32 (or float16) cache to bfloat16
    tpu_fn = xla_fn
  return jax.lax.platform_dependent(q, k_pages, v_pages, lengths, page_table, tpu=tpu_fn, cuda=gpu_fn,
                                    default=xla_fn)


def _largest_power_of_two_divisor(n: int, at_most: int) -> int:
  """The largest power of two that divides n and is at most `at_most` (1 when `at_most` < 1)."""
  size = 1
  while n % (2 * size) == 0 and 2 * size <= at_most:
    size *= 2
  return size


# --- XLA -----------------------------------------------------------------------------------------------------

def xla_paged_attention(q, k_pages, v_pages, lengths, page_table, *, keys_transposed: bool = False):
  """The "xla" implementation (the module docstring)."""
  seqs, num_heads, head_dim = q.shape
  num_kv_heads = v_pages.shape[0]
  pages_per_seq, page_size = page_table.shape[1], v_pages.shape[2]
  qg = q.reshape(seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
  k = k_pages[:, page_table]  # [kv_heads, seqs, pages_per_seq, page_size, d] ([.., d, page_size] transposed)
  v = v_pages[:, page_table].reshape(num_kv_heads, seqs, pages_per_seq * page_size, head_dim)
  if keys_transposed:
    scores = jnp.einsum("skgd,ksjdp->skgjp", qg, k, preferred_element_type=jnp.float32)
  else:
    scores = jnp.einsum("skgd,ksjpd->skgjp", qg, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(seqs, num_kv_heads, num_heads // num_kv_heads, pages_per_seq * page_size)
  scores = scores * head_dim ** -0.5
  visible = (jnp.arange(pages_per_seq * page_size, dtype=jnp.int32)[None] < lengths[:, None])[:, None, None]
  # The float32 minimum rather than -inf keeps the maximum of a sequence with nothing visible finite.
  scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
  p = jnp.where(visible, jnp.exp(scores - scores.max(axis=-1, keepdims=True)), 0.0)
  out = jnp.einsum("skgt,kstd->skgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  # The largest visible score contributes exp(0) = 1, so the sum is at least 1 unless nothing is visible; then
  # out is 0 and stays 0.
  out = out / jnp.maximum(p.sum(axis=-1), 1.0)[..., None]
  return out.reshape(q.shape).astype(q.dtype)


# --- TPU: Pallas paged attention -----------------------------------------------------------------------------

def tpu_unfit(q, k_pages, page_table, keys_transposed: bool = False) -> str | None:
  """Why the TPU kernel cannot take these shapes, or None when it can."""
  head_dim, page_size, pages_per_seq = q.shape[-1], k_pages.shape[2], page_table.shape[1]
  if keys_transposed:
    return "the kernel takes keys as [kv_heads, num_pages, page_size, head_dim] only"
  if head_dim % 128:
    return f"head_dim {head_dim} is not a multiple of 128"
  if page_size < 2:
    return "Mosaic fails to verify the kernel with pages of one entry"
  if 4 * pages_per_seq > TPU_PAGE_TABLE_BYTES:
    return f"one sequence's {pages_per_seq} pages overflow the kernel's scalar memory"
  return None


def tpu_pages_per_block(page_size: int, pages_per_seq: int) -> int:
  """The TPU kernel's `pages_per_compute_block`, which must divide pages_per_seq: the largest power of two that
  does and covers at most TPU_BLOCK_TOKENS entries (one page at least)."""
  return _largest_power_of_two_divisor(pages_per_seq, TPU_BLOCK_TOKENS // page_size)


def tpu_paged_attention(q, k_pages, v_pages, lengths, page_table):
  """The "tpu" implementation: the kernel (which does not scale the scores) on q scaled in float32 and kept in
  float32 (the kernel computes in float32 from any q dtype), on groups of sequences whose page table fits
  TPU_PAGE_TABLE_BYTES.

  Its default `inline_seq_dim` matters: that variant sets a sequence's output to zeros before its loop over the
  blocks it can see, so a sequence of length 0 gets zeros (the other one leaves its output unwritten). Its
  `megacore_mode` stays None, one TensorCore per call: the other modes hang a chip without megacore, and which
  chip runs the program is not known where it is lowered.
  """
  seqs, _, head_dim = q.shape
  pages_per_seq = page_table.shape[1]
  kernel = functools.partial(tpu_kernel, pages_per_compute_block=tpu_pages_per_block(k_pages.shape[2],
                                                                                     pages_per_seq))
  scaled = q.astype(jnp.float32) * head_dim ** -0.5
  group = max(1, min(seqs, TPU_PAGE_TABLE_BYTES // (4 * pages_per_seq)))
  out = [kernel(scaled[s:s + group], k_pages, v_pages, lengths[s:s + group], page_table[s:s + group])
         for s in range(0, seqs, group)]
  return jnp.concatenate(out).astype(q.dtype)


# --- GPU: Pallas (Triton) paged attention --------------------------------------------------------------------

def gpu_unfit(q, k_pages, page_table, keys_transposed: bool = False) -> str | None:
  """Why the GPU kernel cannot take these shapes, or None when it can."""
  head_dim, page_size, pages_per_seq = q.shape[-1], k_pages.shape[2], page_table.shape[1]
  if keys_transposed:
    return "the kernel takes keys as [kv_heads, num_pages, page_size, head_dim] only"
  if not jnp.issubdtype(k_pages.dtype, jnp.floating):
    return f"pages of {k_pages.dtype} are not floating point"
  if head_dim & (head_dim - 1) or page_size & (page_size - 1):
    return f"head_dim {head_dim} or page_size {page_size} is not a power of two"
  if head_dim < _GPU_MIN_DOT:
    return f"head_dim {head_dim} is under {_GPU_MIN_DOT}"
  if page_size * gpu_pages_per_block(page_size, pages_per_seq) < _GPU_MIN_DOT:
    return f"a block of at most {pages_per_seq} pages of {page_size} holds under {_GPU_MIN_DOT} entries"
  return None


def gpu_pages_per_block(page_size: int, pages_per_seq: int) -> int:
  """The GPU kernel's `pages_per_compute_block`: the largest power of two that divides pages_per_seq and covers
  at most GPU_BLOCK_TOKENS entries (one page at least)."""
  return _largest_power_of_two_divisor(pages_per_seq, GPU_BLOCK_TOKENS // page_size)


def gpu_paged_attention(q, k_pages, v_pages, lengths, page_table, interpret: bool = False):
  """The "gpu" implementation: the kernel (which does not scale the scores) on q scaled in float32, then cast to
  the pages' dtype (Triton's dots take operands of one dtype; the programs' partial outputs are kept in it too).
  Each sequence's pages are split between the most programs, up to GPU_K_SPLITS, that take whole blocks each; a
  program whose pages are all past the length does nothing, and a sequence of length 0 gets zeros. The kernel
  pads each KV head's query heads to its 16-row blocks (`block_h`), so groups of fewer compute padding rows.
  `interpret` runs it in Pallas's interpreter (tests on CPU).
  """
  head_dim, page_size, pages_per_seq = q.shape[-1], k_pages.shape[2], page_table.shape[1]
  pages_per_block = gpu_pages_per_block(page_size, pages_per_seq)
  k_splits = _largest_power_of_two_divisor(pages_per_seq // pages_per_block, GPU_K_SPLITS)
  scaled = (q.astype(jnp.float32) * head_dim ** -0.5).astype(k_pages.dtype)
  out = gpu_kernel.paged_attention(scaled, k_pages, v_pages, page_table, lengths,
                                   pages_per_compute_block=pages_per_block, k_splits=k_splits,
                                   interpret=interpret)
  return out.astype(q.dtype)
