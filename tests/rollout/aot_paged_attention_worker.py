"""Run by test_paged_attention.py in its own process (libtpu loaded beside the CPU backend): compiles
`paged_attention(..., implementation="auto")` ahead of time for one chip of a v5p:2x2x1 slice and prints how many
TPU kernel calls each compiled program has: bfloat16 pages; float32 pages (which stay on XLA); and a page table
too large for one kernel call's scalar memory (split between calls)."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
# The default matmul precision, as rollouts run (tests/conftest.py sets "highest", under which Mosaic refuses the
# kernel's dots: "Mosaic failed to compile TPU kernel: Bad rhs type").
os.environ.pop("JAX_DEFAULT_MATMUL_PRECISION", None)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from jax.experimental import topologies

from dapo_jax.rollout import paged_attention as paged_attention_lib


def kernel_calls(dtype, seqs: int, pages_per_seq: int, page_size: int = 16) -> int:
  device = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]
  one_chip = jax.sharding.SingleDeviceSharding(device)
  num_heads, num_kv_heads, head_dim, num_pages = 8, 2, 128, 64

  def abstract(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=one_chip)

  args = (abstract((seqs, num_heads, head_dim), dtype),
          abstract((num_kv_heads, num_pages, page_size, head_dim), dtype),
          abstract((num_kv_heads, num_pages, page_size, head_dim), dtype),
          abstract((seqs,), jnp.int32), abstract((seqs, pages_per_seq), jnp.int32))
  fn = jax.jit(lambda *a: paged_attention_lib.paged_attention(*a, implementation="auto"))
  return fn.lower(*args).compile().as_text().count("tpu_custom_call")


if __name__ == "__main__":
  # 256 sequences of 2048 pages: a 2 MiB table, over the 1 MiB of scalar memory one call has.
  print(kernel_calls(jnp.bfloat16, 4, 8), kernel_calls(jnp.float32, 4, 8), kernel_calls(jnp.bfloat16, 256, 2048))
