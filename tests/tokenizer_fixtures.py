"""The synthetic task's character tokenizer, for tests that need a small real tokenizer."""

import tempfile

from dapo_jax.data import synthetic
from dapo_jax.model import tokenizer as tokenizer_lib


def char_tokenizer() -> tokenizer_lib.Tokenizer:
  """The character tokenizer, loaded from a temporary copy (save it with `Tokenizer.save(directory)`)."""
  with tempfile.TemporaryDirectory() as directory:
    return synthetic.write_char_tokenizer(directory)
