"""Random-weight transformers Qwen2 checkpoints that the model tests make for themselves."""
import json
import os

import numpy as np
import torch
import transformers

# name -> transformers Qwen2Config keyword arguments
HF_CONFIGS = {
    "tied_gqa": dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "untied_mqa": dict(vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=False,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-5),
    "untied_mha": dict(vocab_size=72, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                       rope_theta=10000.0),
    "bf16_stored": dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                        rope_theta=10000.0),
}


def make_hf_model(name: str, seed: int = 0, weight_scale: float = 0.15) -> transformers.Qwen2ForCausalLM:
  """A float32 Qwen2ForCausalLM whose weights are random and large enough that logits are far from uniform.

  Biases and norm weights are randomised too (transformers initialises them to 0 and 1, which would leave
  the bias and norm paths untested).
  """
  torch.manual_seed(seed)
  config = transformers.Qwen2Config(max_position_embeddings=512, **HF_CONFIGS[name])
  model = transformers.Qwen2ForCausalLM(config).to(torch.float32).eval()
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if "norm" in param_name:
        param.copy_(1.0 + 0.1 * torch.randn_like(param))
      else:
        param.copy_(weight_scale * torch.randn_like(param))
  return model


def save_hf_model(model, directory: str, *, bf16: bool = False, max_shard_size=None) -> str:
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  if bf16:
    model = model.to(torch.bfloat16)
  model.save_pretrained(directory, safe_serialization=True, **kwargs)
  return directory


def rewrite_config_transformers4_style(directory: str) -> None:
  """Rewrites a transformers 5 config.json with transformers 4 keys (rope_theta, torch_dtype)."""
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  rope = config.pop("rope_parameters", None) or {}
  config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta"))
  if "dtype" in config:
    config["torch_dtype"] = config.pop("dtype")
  with open(path, "w") as f:
    json.dump(config, f)


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  """transformers' logits; position ids as its generate() makes them for left-padded rows."""
  ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
  kwargs = {}
  if attention_mask is not None:
    mask = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(attention_mask=mask, position_ids=positions)
  with torch.no_grad():
    return model(ids, **kwargs).logits.float().numpy()
