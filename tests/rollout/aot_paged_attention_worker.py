"""Run by test_paged_attention.py in its own process (libtpu loaded beside the CPU backend): compiles
`paged_attention(..., implementation="auto")` ahead of time for one chip of a v5p:2x2x1 slice and prints how many
TPU kernel calls each compiled program has: bfloat16 pages; float32 pages (which stay on XLA); a page table
too large for one kernel call's scalar memory (split between calls); and the sampler's decode steps of a small
bfloat16 model on a 2 x 2 mesh of the slice (slots and pages over `data`, KV heads over `tensor`), two steps per
call."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
# The default matmul precision, as rollouts run (tests/conftest.py sets "highest", under which Mosaic refuses the
# kernel's dots: "Mosaic failed to compile TPU kernel: Bad rhs type").
os.environ.pop("JAX_DEFAULT_MATMUL_PRECISION", None)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from jax.experimental import topologies

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.planner import inputs as plan_inputs
from dapo_jax.rollout import decode_state
from dapo_jax.rollout import paged_attention as paged_attention_lib
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import SamplingParams


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


def decode_step_kernel_calls() -> tuple[int, int]:
  """TPU kernel calls in the compiled decode steps (2 per call) and the model's layer count."""
  devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
  mesh, _ = plan_inputs.mesh_for(devices, {"data": 2, "fsdp": 1, "tensor": 2})
  config = Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=128, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  sampler = sampler_lib.GroupSampler(config, num_slots=8, max_prompt_length=64, max_response_length=192,
                                     steps_per_call=2, mesh=mesh, page_size=16, num_pages=8 * 16,
                                     rules=sharding_lib.DEFAULT_RULES)
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                        qwen2.abstract_model(config).params,
                        sharding_lib.param_shardings(qwen2.abstract_model(config), mesh, sharding_lib.DECODE_RULES))
  weights = jax.eval_shape(lambda p: sampler.functions.decode_weights(p), params)
  weights = jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec())), weights)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(lambda: decode_state.init_decode_state(
                           config, 8, sampler.pool_pages(), 16, keys_transposed=sampler.keys_transposed)),
                       sampler.state_shardings)
  table = jax.ShapeDtypeStruct((8, sampler.pages_per_slot), jnp.int32, sharding=jax.sharding.NamedSharding(
      mesh, decode_state.state_layout(config, mesh, 8).slot_spec))
  compiled = sampler.functions.decode_steps.lower(weights, state, table, num_steps=2,
                                                  sampling=SamplingParams(temperature=1.0)).compile()
  return compiled.as_text().count("tpu_custom_call"), config.num_layers


if __name__ == "__main__":
  # 256 sequences of 2048 pages: a 2 MiB table, over the 1 MiB of scalar memory one call has.
  print(kernel_calls(jnp.bfloat16, 4, 8), kernel_calls(jnp.float32, 4, 8), kernel_calls(jnp.bfloat16, 256, 2048),
        *decode_step_kernel_calls())
