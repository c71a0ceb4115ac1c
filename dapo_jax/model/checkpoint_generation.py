"""What a Hugging Face checkpoint directory says about generation: its tokenizer (if any) and its stop ids.

Shared by the entry points that sample from a checkpoint (`dapo_jax.generate`, `dapo_jax.serve`), which do not
import each other.
"""
import json
import os

from dapo_jax.model import tokenizer as tokenizer_lib


def generation_config_eos_ids(checkpoint: str | os.PathLike) -> list[int] | None:
  """The `eos_token_id`s (one id or a list) of the checkpoint's generation_config.json, or None when the file
  is absent or names none."""
  path = os.path.join(checkpoint, tokenizer_lib.GENERATION_CONFIG)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      value = json.load(f).get("eos_token_id")
    except json.JSONDecodeError as error:
      raise ValueError(f"{path} is not valid JSON: {error}") from None
  if value is None:
    return None
  values = value if isinstance(value, list) else [value]
  if not all(isinstance(token_id, int) and not isinstance(token_id, bool) for token_id in values):
    raise ValueError(f"{path}: eos_token_id should be an integer id or a list of them; found {value!r}")
  return values


def load_optional_tokenizer(checkpoint: str | os.PathLike) -> tokenizer_lib.Tokenizer | None:
  """The tokenizer beside the weights, or None when the directory holds no tokenizer file at all.

  A tokenizer file that is there but cannot be loaded is an error, not an absence.
  """
  has_tokenizer = (os.path.exists(os.path.join(checkpoint, tokenizer_lib.TOKENIZER_JSON)) or
                   any(name.endswith(".model") for name in os.listdir(checkpoint)))
  return tokenizer_lib.load_tokenizer(checkpoint) if has_tokenizer else None


def stop_ids(checkpoint: str | os.PathLike, tokenizer: tokenizer_lib.Tokenizer | None) -> list[int]:
  """The ids that end a response, as transformers' generate takes them: generation_config.json's eos ids when
  it names some, else the tokenizer's eos ids (none without a tokenizer)."""
  from_generation_config = generation_config_eos_ids(checkpoint)
  if from_generation_config is not None:
    return from_generation_config
  return list(tokenizer.eos_ids) if tokenizer is not None else []
