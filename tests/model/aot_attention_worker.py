"""Run by test_attention.py in its own process (libtpu loaded beside the CPU backend): compiles the update's
gradient program of a tiny model for a v5p:2x2x1 slice with attention "auto" and "xla", and prints how many
TPU kernel calls each compiled program has."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
# The default matmul precision, as the trainer runs (tests/conftest.py sets "highest", under which Mosaic refuses
# the splash kernel's dots on bfloat16 operands: "Mosaic failed to compile TPU kernel: Bad lhs type").
os.environ.pop("JAX_DEFAULT_MATMUL_PRECISION", None)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.planner import inputs as plan_inputs
from dapo_jax.rl import step
from tests import batch_fixtures


def kernel_calls(attention: str) -> int:
  devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
  mesh, _ = plan_inputs.mesh_for(devices, {"data": 1, "fsdp": 4, "tensor": 1})
  config = get_preset("tiny-demo", remat=True, dtype=jnp.bfloat16, attention=attention)
  abstract = qwen2.abstract_model(config)
  param_shardings = sharding_lib.param_shardings(abstract, mesh)
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), abstract.params,
                        param_shardings)
  batch = batch_fixtures.random_micro_batch(np.random.default_rng(0), 8, 128, 384, config.vocab_size,
                                            with_old_logp=True)
  rows = sharding_lib.logical_sharding(("batch", None), sharding_lib.DEFAULT_RULES, mesh)
  batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows if x.ndim == 2 else
                                      NamedSharding(mesh, PartitionSpec(rows.spec[0])))
           for name, x in batch.items()}
  replicated = NamedSharding(mesh, PartitionSpec())
  totals = {name: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated) for name in ("num_tokens", "num_seqs")}
  updater = step.Updater(optimizer=step.make_optimizer(learning_rate=1e-6), model_config=config,
                         loss_config=step.LossConfig(), params_shardings=param_shardings)
  return updater.gradients_fn.lower(params, batch, totals).compile().as_text().count("tpu_custom_call")


if __name__ == "__main__":
  print(kernel_calls("auto"), kernel_calls("xla"))
