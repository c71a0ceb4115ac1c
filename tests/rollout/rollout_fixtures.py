"""Helpers of the rollout tests: random-weight transformers checkpoints in both frameworks, reference outputs."""
import pathlib

import numpy as np
import scipy.stats
import torch
import transformers

from dapo_jax.model import hf_io
from tests.model import hf_fixtures
from tests.model.test_tokenizer import _train_qwen_like_tokenizer as train_qwen_like_tokenizer

# The checkpoints the parity tests run on (hf_fixtures.HF_CONFIGS): tied head with GQA, untied head with MQA
# and three layers, untied head with plain multi-head attention.
PARITY_CONFIGS = ("tied_gqa", "untied_mqa", "untied_mha")


class Checkpoint:
  """A saved random-weight transformers Qwen2 checkpoint (hf_fixtures.HF_CONFIGS[name] unless `hf_model` is
  given), the same weights loaded into our model."""

  def __init__(self, name: str, directory: pathlib.Path, hf_model=None):
    self.name = name
    self.directory = directory
    self.hf_model = hf_model if hf_model is not None else hf_fixtures.make_hf_model(name)
    self.hf_model.generation_config.eos_token_id = None
    self.hf_model.generation_config.pad_token_id = 0
    hf_fixtures.save_hf_model(self.hf_model, str(directory))
    self.config, model = hf_io.load_hf_checkpoint(directory)
    self.params = model.params

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  def greedy(self, prompt, max_new_tokens: int, eos_ids=()) -> list[int]:
    """transformers' greedy `generate` of one prompt: the new tokens, ending with the eos when one came."""
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
      out = self.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids) or None,
                                   pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def random_prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab_size, size=length).tolist() for length in lengths]


def eos_ids_hit_by(references: list[list[int]], positions) -> list[int]:
  """Stop ids that end some of these greedy responses early: the token at `positions[i]` of reference i."""
  return sorted({references[i][position] for i, position in enumerate(positions)})


def truncate_at_eos(tokens: list[int], eos_ids) -> list[int]:
  for index, token in enumerate(tokens):
    if token in eos_ids:
      return tokens[:index + 1]
  return tokens


def chi_square_p_value(tokens: np.ndarray, probs: np.ndarray, min_expected: float = 10.0) -> float:
  """p-value of the draws against `probs`; categories expected fewer than `min_expected` times are pooled."""
  probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
  expected = probs * tokens.size
  observed = np.bincount(tokens, minlength=probs.size).astype(np.float64)
  big = expected >= min_expected
  observed_bins = np.append(observed[big], observed[~big].sum())
  expected_bins = np.append(expected[big], expected[~big].sum())
  if expected_bins[-1] == 0:  # nothing to pool: no impossible token may have been drawn either
    assert observed_bins[-1] == 0
    observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
  return scipy.stats.chisquare(observed_bins, expected_bins).pvalue



# A model for the tokenizer tests: its vocabulary covers the Qwen-style tokenizer of tests/model/test_tokenizer.py.
QWEN_LIKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                       max_position_embeddings=512)


def make_qwen_like_checkpoint(directory: pathlib.Path) -> "Checkpoint":
  """A random-weight checkpoint with a Qwen2.5-style tokenizer beside it: byte-level BPE, Qwen's special tokens
  and chat template (the tokenizer the model tests check against transformers)."""
  hf_tokenizer = train_qwen_like_tokenizer()
  vocab_size = -(-len(hf_tokenizer) // 8) * 8  # padded, as released checkpoints pad theirs
  torch.manual_seed(1)
  config = transformers.Qwen2Config(vocab_size=vocab_size, **QWEN_LIKE_MODEL)
  hf_model = transformers.Qwen2ForCausalLM(config).to(torch.float32).eval()
  with torch.no_grad():
    for name, param in hf_model.named_parameters():
      param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.15 * torch.randn_like(param))
  directory.mkdir(parents=True, exist_ok=True)
  hf_tokenizer.save_pretrained(directory)
  return Checkpoint("qwen_like", directory, hf_model=hf_model)
