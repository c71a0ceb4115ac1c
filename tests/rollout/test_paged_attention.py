"""dapo_jax/rollout/paged_attention.py: the XLA implementation against a dense float64 reference, the TPU and GPU
kernels against it in Pallas's interpreters, the platform each lowering picks, and the TPU kernel compiled for a
v5p chip."""
import importlib.util
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from dapo_jax.rollout import paged_attention as paged_attention_lib
from dapo_jax.rollout.paged_attention import paged_attention

REPO = pathlib.Path(__file__).resolve().parents[2]


def make_case(rng, *, page_size, lengths, pages_per_seq, num_heads=4, num_kv_heads=2, head_dim=16,
              dtype=jnp.float32, shared_pages=2):
  """q, a pool of pages and a page table for sequences of `lengths`: each sequence's pages drawn from a shuffled
  pool, sequences 0 and 1 sharing their first `shared_pages` pages (a common prefix), and the table's entries
  past a sequence's last page random pages of the pool (any page, used or not)."""
  lengths = np.asarray(lengths, np.int32)
  needed = -(-lengths // page_size)
  assert needed.max() <= pages_per_seq
  num_pages = int(needed.sum()) + 3  # a few pages nobody uses
  free = list(rng.permutation(num_pages))
  table = rng.integers(0, num_pages, (len(lengths), pages_per_seq)).astype(np.int32)
  for s, n in enumerate(needed):
    table[s, :n] = [free.pop() for _ in range(n)]
  shared = min(shared_pages, needed[0], needed[1]) if len(lengths) > 1 else 0
  table[1, :shared] = table[0, :shared]
  q = rng.normal(size=(len(lengths), num_heads, head_dim))
  k, v = rng.normal(size=(2, num_kv_heads, num_pages, page_size, head_dim))
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths),
          jnp.asarray(table))


def dense_reference(q, k_pages, v_pages, lengths, page_table):
  """The definition in float64: each sequence's first `length` entries laid out contiguously, softmax over them;
  zeros for a sequence of length 0."""
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  seqs, num_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  out = np.zeros_like(q)
  for s in range(seqs):
    n = int(lengths[s])
    if n == 0:
      continue
    pages = np.asarray(page_table[s])[:-(-n // page_size)]
    k = k_pages[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :n]  # [kv_heads, n, d]
    v = v_pages[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :n]
    for h in range(num_heads):
      kv = h // (num_heads // num_kv_heads)
      scores = k[kv] @ q[s, h] / np.sqrt(head_dim)
      p = np.exp(scores - scores.max())
      out[s, h] = p @ v[kv] / p.sum()
  return out


def round_to_bf16(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


def uses_kernel(fn, *args) -> bool:
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


# Lengths: 1; exactly one and two pages; ragged; the whole table; 0.
@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("keys_transposed", [False, True])
def test_xla_matches_dense_reference(page_size, keys_transposed):
  rng = np.random.default_rng(page_size)
  pages_per_seq = 4
  lengths = [3 * page_size + 5, 2 * page_size, 1, page_size, pages_per_seq * page_size, 0, page_size + 1]
  q, k, v, lengths, table = make_case(rng, page_size=page_size, lengths=lengths, pages_per_seq=pages_per_seq)
  keys = jnp.swapaxes(k, 2, 3) if keys_transposed else k
  got = jax.jit(lambda *a: paged_attention(*a, keys_transposed=keys_transposed, implementation="xla"))(
      q, keys, v, lengths, table)
  assert got.dtype == q.dtype
  np.testing.assert_allclose(got, dense_reference(q, k, v, lengths, table), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got[5], 0.0)  # length 0: zeros, not NaN


@pytest.mark.parametrize("num_heads,num_kv_heads", [(3, 3), (4, 1)])
def test_xla_head_groups(num_heads, num_kv_heads):
  rng = np.random.default_rng(num_heads)
  case = make_case(rng, page_size=8, lengths=[13, 20, 7], pages_per_seq=3, num_heads=num_heads,
                   num_kv_heads=num_kv_heads)
  np.testing.assert_allclose(paged_attention(*case, implementation="xla"), dense_reference(*case), atol=1e-5,
                             rtol=0)


def test_unseen_entries_change_nothing():
  """New junk in the table past each sequence's pages and in the unseen part of its last page leaves every
  output bit the same."""
  rng = np.random.default_rng(1)
  q, k, v, lengths, table = make_case(rng, page_size=8, lengths=[5, 9, 16, 0], pages_per_seq=3)
  needed = -(-np.asarray(lengths) // 8)
  new_table, new_k, new_v = np.array(table), np.array(k), np.array(v)
  for s, n in enumerate(np.asarray(lengths)):
    new_table[s, needed[s]:] = rng.integers(0, k.shape[1], table.shape[1] - needed[s])
    if n % 8 and s > 1:  # the unseen end of the last page, where no other sequence sees it
      page = table[s, needed[s] - 1]
      new_k[:, page, n % 8:] = new_v[:, page, n % 8:] = 1e4
  fn = jax.jit(lambda *a: paged_attention(*a, implementation="xla"))
  np.testing.assert_array_equal(fn(q, k, v, lengths, table),
                                fn(q, jnp.asarray(new_k), jnp.asarray(new_v), lengths, jnp.asarray(new_table)))


@pytest.mark.parametrize("page_size,block_tokens,lengths", [
    (8, 512, [1, 8, 29, 0]),         # one block of 4 pages per sequence
    (8, 16, [0, 8, 17, 32]),         # blocks of 2 pages: partly seen blocks, a sequence of 0 first
    (16, 16, [33, 16, 64, 0])])      # blocks of 1 page, a full table
def test_tpu_kernel_matches_xla_in_interpret_mode(monkeypatch, page_size, block_tokens, lengths):
  """Float32 pages: the kernel rounds K and V to bfloat16 itself, so it equals the XLA implementation on rounded
  pages to float32 precision."""
  monkeypatch.setattr(paged_attention_lib, "TPU_BLOCK_TOKENS", block_tokens)
  rng = np.random.default_rng(page_size + block_tokens)
  q, k, v, lengths, table = make_case(rng, page_size=page_size, lengths=lengths, pages_per_seq=4, num_heads=4,
                                      num_kv_heads=2, head_dim=128)
  assert uses_kernel(lambda *a: paged_attention(*a, implementation="tpu"), q, k, v, lengths, table)
  with pltpu.force_tpu_interpret_mode():
    got = paged_attention(q, k, v, lengths, table, implementation="tpu")
  want = dense_reference(q, round_to_bf16(k), round_to_bf16(v), lengths, table)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got[np.asarray(lengths) == 0], 0.0)


def test_tpu_kernel_in_bfloat16_and_groups_of_sequences(monkeypatch):
  """bfloat16 q and pages, 8 query heads per KV head (the kernel's other q layout), and a page table budget of
  two sequences per kernel call (two calls for three sequences)."""
  monkeypatch.setattr(paged_attention_lib, "TPU_PAGE_TABLE_BYTES", 2 * 4 * 4)
  rng = np.random.default_rng(2)
  case = make_case(rng, page_size=16, lengths=[40, 17, 64], pages_per_seq=4, num_heads=8, num_kv_heads=1,
                   head_dim=128, dtype=jnp.bfloat16)
  fn = lambda *a: paged_attention(*a, implementation="tpu")
  assert str(jax.make_jaxpr(fn)(*case)).count("pallas_call") == 2
  with pltpu.force_tpu_interpret_mode():
    got = fn(*case)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), dense_reference(*case), atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_gpu_kernel_matches_reference_in_interpret_mode(dtype, tol):
  """Pages of 8 in blocks of 16 (2 pages) split between 2 programs, ragged lengths and one of 0."""
  rng = np.random.default_rng(3)
  case = make_case(rng, page_size=8, lengths=[1, 16, 25, 0, 32], pages_per_seq=4, num_heads=4, num_kv_heads=2,
                   head_dim=16, dtype=dtype)
  got = paged_attention_lib.gpu_paged_attention(*case, interpret=True)
  assert got.dtype == dtype
  np.testing.assert_allclose(got.astype(jnp.float32), dense_reference(*case), atol=tol, rtol=0)
  np.testing.assert_array_equal(got[3].astype(jnp.float32), 0.0)


def test_kernel_block_sizes():
  assert paged_attention_lib.tpu_pages_per_block(16, 1024) == 32      # 512 entries
  assert paged_attention_lib.tpu_pages_per_block(16, 12) == 4         # must divide the table
  assert paged_attention_lib.tpu_pages_per_block(1024, 4) == 1        # at least one page
  assert paged_attention_lib.gpu_pages_per_block(16, 1024) == 8       # 128 entries
  assert paged_attention_lib.gpu_pages_per_block(16, 6) == 2


def test_shapes_a_kernel_cannot_take_run_xla():
  rng = np.random.default_rng(4)
  q, k, v, lengths, table = make_case(rng, page_size=8, lengths=[5, 12], pages_per_seq=2, head_dim=64)
  assert "multiple of 128" in paged_attention_lib.tpu_unfit(q, k, table)
  assert paged_attention_lib.gpu_unfit(q, k, table) is None
  assert "keys" in paged_attention_lib.gpu_unfit(q, k, table, keys_transposed=True)
  assert "under 16" in paged_attention_lib.gpu_unfit(q[..., :8], k[..., :8], table)
  assert "power of two" in paged_attention_lib.gpu_unfit(q[..., :48], k[..., :48], table)
  assert not uses_kernel(lambda *a: paged_attention(*a, implementation="tpu"), q, k, v, lengths, table)
  assert not uses_kernel(lambda *a: paged_attention(*a, implementation="gpu"), q[..., :8], k[..., :8],
                         v[..., :8], lengths, table)
  np.testing.assert_allclose(paged_attention(q, k, v, lengths, table, implementation="tpu"),
                             dense_reference(q, k, v, lengths, table), atol=1e-5, rtol=0)


def test_unknown_implementation_is_refused():
  case = make_case(np.random.default_rng(5), page_size=8, lengths=[3, 4], pages_per_seq=1)
  with pytest.raises(ValueError, match="not one of"):
    paged_attention(*case, implementation="splash")


@pytest.mark.parametrize("dtype,head_dim,want", [
    (jnp.bfloat16, 128, {"cpu": None, "tpu": "tpu_custom_call", "cuda": "triton"}),
    (jnp.float32, 128, {"tpu": None, "cuda": "triton"}),       # the TPU kernel would round a float32 cache
    (jnp.bfloat16, 64, {"tpu": None, "cuda": "triton"})])      # a head_dim the TPU kernel cannot take
def test_auto_lowers_to_the_lowering_platforms_kernel(dtype, head_dim, want):
  case = make_case(np.random.default_rng(6), page_size=16, lengths=[20, 33], pages_per_seq=4, head_dim=head_dim,
                   dtype=dtype)
  traced = jax.jit(lambda *a: paged_attention(*a, implementation="auto")).trace(*case)
  for platform, kernel in want.items():
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert ("tpu_custom_call" in text) == (kernel == "tpu_custom_call"), platform
    assert ("triton" in text) == (kernel == "triton"), platform
  np.testing.assert_allclose(traced.lower().compile()(*case).astype(jnp.float32), dense_reference(*case),
                             atol=2e-2 if dtype == jnp.bfloat16 else 1e-5, rtol=0)


def test_tpu_kernel_compiles_for_v5p():
  """`paged_attention(..., implementation="auto")` compiled ahead of time for one v5p chip from this CPU host
  with libtpu: bfloat16 pages take the TPU kernel, float32 pages XLA, and a 2 MiB page table three kernel calls
  (one would overflow the chip's 1 MiB of scalar memory)."""
  if importlib.util.find_spec("libtpu") is None:
    reason = "libtpu is not installed (pip install -r requirements-tpu.txt), so no TPU program can be compiled here"
    warnings.warn(reason)
    pytest.skip(reason)
  result = subprocess.run([sys.executable, "-m", "tests.rollout.aot_paged_attention_worker"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  bfloat16_calls, float32_calls, large_table_calls, decode_calls, num_layers = (
      int(n) for n in result.stdout.split())
  assert bfloat16_calls >= 1 and float32_calls == 0 and large_table_calls >= 3
  assert decode_calls >= num_layers  # the sampler's decode step runs every layer's attention in the kernel
