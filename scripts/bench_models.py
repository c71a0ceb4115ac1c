"""The random-weight Qwen2 shapes that scripts/bench_rollout.py and scripts/bench_update.py benchmark.

A module of its own, without absl flags, so that both scripts can import it (each defines flags of the same names).
"""
import torch
import transformers

# transformers Qwen2Config keyword arguments of the benchmarked shapes.
CONFIGS = {
    # The model preset "tiny" of dapo_jax.model.config.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10_000.0),
    # ~55M weights (39M of them in the embedding and the untied head), as in issue 4.
    "60m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1_000_000.0),
}


def random_hf_model(name: str) -> transformers.Qwen2ForCausalLM:
  """transformers' Qwen2 of shape `name` with random weights (torch seed 0), in float32."""
  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(max_position_embeddings=4096, **CONFIGS[name])
  return transformers.Qwen2ForCausalLM(hf_config).to(torch.float32)
