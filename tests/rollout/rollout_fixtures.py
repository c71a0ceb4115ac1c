"""Helpers of the rollout tests: random-weight transformers checkpoints in both frameworks, reference outputs."""
import json
import pathlib

import numpy as np
import scipy.stats
import tokenizers
import torch

from dapo_jax.model import hf_io
from dapo_jax.model.tokenizer import CHATML_CHAT_TEMPLATE
from tests.model import hf_fixtures

# The checkpoints the parity tests run on (hf_fixtures.HF_CONFIGS): tied head with GQA, untied head with MQA
# and three layers, untied head with plain multi-head attention.
PARITY_CONFIGS = ("tied_gqa", "untied_mqa", "untied_mha")


class Checkpoint:
  """A saved random-weight transformers Qwen2 checkpoint, the same weights loaded into our model."""

  def __init__(self, name: str, directory: pathlib.Path):
    self.name = name
    self.directory = directory
    self.hf_model = hf_fixtures.make_hf_model(name)
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


_TOKENIZER_TEXT = [
    "the cat sat on the mat and the dog sat on the log",
    "a model samples a response for every prompt in the batch",
    "one two three four five six seven eight nine ten",
    "sampling stops at the end of the response or at the length limit",
]
TOKENIZER_SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")


def save_small_tokenizer(directory: pathlib.Path, vocab_size: int) -> dict[str, int]:
  """Writes a small BPE tokenizer.json (Metaspace, so decode restores spaces) with ChatML special tokens, a
  tokenizer_config.json naming eos/pad and a ChatML chat template, in a layout transformers loads too.

  Returns the ids of the special tokens by name. The vocabulary fits models with `vocab_size` >= its size.
  """
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  bpe.decoder = tokenizers.decoders.Metaspace()
  bpe.train_from_iterator(_TOKENIZER_TEXT * 10, tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(TOKENIZER_SPECIAL_TOKENS), show_progress=False))
  assert bpe.get_vocab_size() <= vocab_size
  directory.mkdir(parents=True, exist_ok=True)
  bpe.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "unk_token": "<unk>", "add_bos_token": False, "chat_template": CHATML_CHAT_TEMPLATE}))
  return {token: bpe.token_to_id(token) for token in TOKENIZER_SPECIAL_TOKENS}
