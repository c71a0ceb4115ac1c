"""Qwen2 / Qwen2.5 architecture hyperparameters and the presets of the published base models."""
import dataclasses
from typing import Any

import jax.numpy as jnp

# The implementations of dapo_jax/model/attention.py (named here, where the config checks them).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "gpu")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Shape and numerics of a Qwen2-architecture decoder.

  `dtype` is the compute dtype (activations, matmul inputs); `param_dtype` is how weights are stored.
  On TPU the usual choice is bf16 compute with bf16 or f32 weights; on CPU keep float32 (XLA:CPU's bf16
  matrix-vector products are slow).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads, as in transformers' Qwen2
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each decoder layer in the backward pass
  # Attention over whole rows (dapo_jax/model/attention.py): "auto" (the lowering platform's kernel), "xla",
  # "splash" (TPU) or "gpu".
  attention: str = "auto"

  def __post_init__(self):
    positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"Qwen2Config.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Qwen2Config.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads}) for grouped-query attention")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"Qwen2Config.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"Qwen2Config.hidden_size ({self.hidden_size}) is not divisible by num_heads "
                         f"({self.num_heads}); set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"Qwen2Config.head_dim must be even for rotary embeddings, got {self.head_dim}")

  def replace(self, **changes) -> "Qwen2Config":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Number of weights, counted from the shapes (the tied head is counted once)."""
    h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    attention = h * q + q + 2 * (h * kv + kv) + q * h
    per_layer = attention + 3 * h * i + 2 * h
    head = 0 if self.tie_word_embeddings else h * self.vocab_size
    return self.vocab_size * h + self.num_layers * per_layer + h + head


# The published Qwen2.5 base models (config.json of Qwen/Qwen2.5-*). The vocabulary is padded beyond the
# tokenizer's 151,665 tokens to a multiple that suits the hardware, as in the released checkpoints.
_QWEN2_5 = dict(rope_theta=1_000_000.0)
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                num_heads=14, num_kv_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                max_position_embeddings=32768, **_QWEN2_5),
    "qwen2.5-1.5b": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                num_heads=12, num_kv_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                max_position_embeddings=32768, **_QWEN2_5),
    "qwen2.5-3b": Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                              num_heads=16, num_kv_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                              max_position_embeddings=32768, **_QWEN2_5),
    "qwen2.5-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                              num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                              max_position_embeddings=131072, **_QWEN2_5),
    "qwen2.5-14b": Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48,
                               num_heads=40, num_kv_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
                               max_position_embeddings=131072, **_QWEN2_5),
    "qwen2.5-32b": Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                               num_heads=40, num_kv_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
                               max_position_embeddings=131072, **_QWEN2_5),
    # Tiny shapes for tests and the CPU demo (random or task-trained weights, never a released model).
    "tiny": Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                        num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=2048,
                        rope_theta=10_000.0),
    # The embedded default's policy (docs/algorithm.md section 12): ~0.8M weights, character vocabulary.
    "tiny-demo": Qwen2Config(vocab_size=32, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                             num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
                             rope_theta=10_000.0),
}


def get_preset(name: str, **overrides) -> Qwen2Config:
  """A preset by name, with optional field overrides (e.g. `dtype=jnp.bfloat16`)."""
  try:
    config = PRESETS[name]
  except KeyError:
    raise ValueError(f"Unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
  return config.replace(**overrides) if overrides else config
