"""The supervised warm-up learns a deterministic mapping."""
import numpy as np
from flax import nnx

from dapo_jax import sft
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rl import batching, step


def test_warmup_lowers_the_loss_and_teaches_the_responses():
  config = get_preset("tiny").replace(vocab_size=32)
  params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params
  # Prompt [a, b] -> response [a + b mod 16 + 16, 1]: learnable, not copyable.
  examples = [([a + 2, b + 2], [(a + b) % 16 + 16, 1]) for a in range(4) for b in range(4)]
  params, losses = sft.supervised_warmup(params, config, examples, steps=150, batch_size=16, learning_rate=3e-3,
                                         pad_id=0, log_every=50)
  assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:10])
  batch = batching.collate([p for p, _ in examples], [r for _, r in examples], pad_id=0)
  logp = np.asarray(step.response_logprobs(params, config, batch, temperature=1.0))
  # Most response tokens are now likely under the model.
  assert np.exp(logp[batch["response_mask"] > 0]).mean() > 0.7
