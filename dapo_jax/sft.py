"""Supervised fine-tuning on (prompt, response) token pairs: the warm-up that makes the CPU demo's base model.

DAPO starts from a pretrained base model that already solves some problems; the embedded default has no such
model, so it makes one with a short supervised warm-up (docs/algorithm.md section 12). The loss is the mean
negative log-likelihood of the response tokens given the prompt, in the same batch layout as the RL passes.
"""
from collections.abc import Sequence
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dapo_jax.model import attention as attention_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.rl import batching, step


def sft_loss(params: qwen2.Params, batch: dict, *, model_config: Qwen2Config,
             mesh_layout: attention_lib.MeshLayout | None = None) -> jax.Array:
  """Mean negative log-likelihood over the response tokens of the batch."""
  logp = step.response_logprobs(params, model_config, batch, temperature=1.0, mesh_layout=mesh_layout)
  mask = batch["response_mask"].astype(jnp.float32)
  return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@functools.partial(jax.jit, static_argnames=("model_config", "optimizer", "mesh_layout"), donate_argnums=(0, 1))
def sft_step(params, opt_state, batch, *, model_config: Qwen2Config, optimizer: optax.GradientTransformation,
             mesh_layout: attention_lib.MeshLayout | None = None):
  loss, grads = jax.value_and_grad(sft_loss)(params, batch, model_config=model_config, mesh_layout=mesh_layout)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def supervised_warmup(params: qwen2.Params, model_config: Qwen2Config,
                      examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, steps: int, batch_size: int,
                      learning_rate: float, pad_id: int, seed: int = 0, log_every: int = 100):
  """Trains on random batches of `examples` for `steps` steps (AdamW, cosine decay); returns (params, losses).

  All batches share one padded shape (the buckets of the longest prompt and response), so the step compiles
  once. With params spread over several processes every process must pass the same examples and seed: each
  batch is a host value that the jitted step takes as the same on every process.
  """
  if not examples:
    raise ValueError("supervised_warmup: no examples")
  prompt_width = batching.bucket_length(max(len(p) for p, _ in examples))
  response_width = batching.bucket_length(max(len(r) for _, r in examples))
  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 20), steps),
                          b1=0.9, b2=0.99, weight_decay=0.01)
  opt_state = optimizer.init(params)
  # Params on a mesh: the attention kernels run per device of it (`attention.per_device`).
  shardings = step.mesh_shardings(params)
  mesh_layout = attention_lib.MeshLayout(jax.tree.leaves(shardings)[0].mesh) if shardings is not None else None
  rng = np.random.default_rng(seed)
  losses = []
  start = time.time()
  for i in range(steps):
    picked = rng.integers(0, len(examples), batch_size)
    batch = batching.collate([examples[j][0] for j in picked], [examples[j][1] for j in picked], pad_id=pad_id,
                             prompt_width=prompt_width, response_width=response_width)
    params, opt_state, loss = sft_step(params, opt_state, batch, model_config=model_config, optimizer=optimizer,
                                       mesh_layout=mesh_layout)
    losses.append(float(loss))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      logging.info("warm-up step %d/%d: loss %.4f (%.1f s)", i + 1, steps, losses[-1], time.time() - start)
  return params, losses
