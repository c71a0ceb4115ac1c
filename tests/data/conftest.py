"""Fixtures of the data tests."""

import pytest

from tests import tokenizer_fixtures


@pytest.fixture(scope="module")
def char_tokenizer():
  """The synthetic task's character tokenizer (one character, one token), so lengths and truncation points can
  be read off the text."""
  return tokenizer_fixtures.char_tokenizer()
