"""Tests for dapo_jax.data.prompts: prompt tokenization (chat template, left truncation, the error mode, over-long
filtering) and validation deduplication (docs/algorithm.md 7, 8).

Prompts are tokenized with the synthetic task's character tokenizer (one character, one token), so lengths and
truncation points can be read off the text.
"""

import json
import logging

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dapo_jax.data import math_parquet
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.data import synthetic
from dapo_jax.model import tokenizer as tokenizer_lib
from tests.data.math_fixtures import numbered_rows, write_rows

# ----------------------------------------------------------------------------------------------------------------
# Prompt tokenization
# ----------------------------------------------------------------------------------------------------------------


def test_chat_template_with_generation_prompt(tmp_path):
  directory = tmp_path / "chatml"
  synthetic.write_char_tokenizer(directory)
  config = json.loads((directory / tokenizer_lib.TOKENIZER_CONFIG).read_text())
  config["chat_template"] = tokenizer_lib.CHATML_CHAT_TEMPLATE
  (directory / tokenizer_lib.TOKENIZER_CONFIG).write_text(json.dumps(config))
  chatml = tokenizer_lib.load_tokenizer(str(directory))
  messages = [{"role": "user", "content": "What is 1+1?"}]
  options = prompts_lib.PromptOptions()
  assert prompts_lib.render_prompt(messages, chatml, options) == (
      "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
  # Asked not to use it, or with a tokenizer that has none, the plain rendering is used.
  assert prompts_lib.render_prompt(messages, chatml, prompts_lib.PromptOptions(use_chat_template=False)) == (
      "What is 1+1?")
  plain = prompts_lib.PromptOptions(use_chat_template=False, plain_format="{role}: {content}\n")
  assert prompts_lib.render_prompt(messages, chatml, plain) == "user: What is 1+1?\n"


def bos_tokenizer(tmp_path):
  """A character tokenizer with a bos token and no chat template."""
  vocabulary = {token: index for index, token in enumerate(["<s>", "</s>", "<unk>", *"What is1+?"])}
  backend = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens(["<s>", "</s>", "<unk>"])
  (tmp_path / "tokenizer.json").write_text(backend.to_str())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  return tokenizer_lib.load_tokenizer(str(tmp_path))


def test_plain_rendering_without_chat_template_adds_bos(tmp_path):
  tokenizer = bos_tokenizer(tmp_path)
  assert tokenizer.chat_template is None
  ids = prompts_lib.prompt_token_ids([{"role": "user", "content": "What is 1+1?"}], tokenizer,
                                     prompts_lib.PromptOptions())
  assert ids[0] == tokenizer.bos_id
  assert tokenizer.decode(ids[1:]) == "What is 1+1?"


def test_left_truncation_keeps_the_end(tmp_path, char_tokenizer):
  rows = [math_parquet.make_math_row("What is 12+3*4?", 24, index=0, prompt_template="{problem}"),
          math_parquet.make_math_row("What is 1+2*3?", 7, index=1, prompt_template="{problem}")]
  path = write_rows(tmp_path / "long.parquet", rows)
  prompts = prompts_lib.training_prompts(path, char_tokenizer, prompts_lib.PromptOptions(max_prompt_length=15))
  # "What is 12+3*4?\n" is 16 characters = 16 tokens: the first is cut; "What is 1+2*3?\n" (15) fits.
  assert char_tokenizer.decode(prompts[0].prompt_ids) == "hat is 12+3*4?\n"
  assert prompts[0].num_truncated_tokens == 1
  assert char_tokenizer.decode(prompts[1].prompt_ids) == "What is 1+2*3?\n"
  assert prompts[1].num_truncated_tokens == 0
  assert prompts.num_truncated_rows == 1
  assert prompts[0].prompt_ids.dtype == np.int32
  assert not prompts[0].prompt_ids.flags.writeable


def test_error_mode_names_the_row(tmp_path, char_tokenizer):
  rows = numbered_rows(3) + [math_parquet.make_math_row("What is 12+3*4?", 24, index=3, prompt_template="{problem}")]
  path = write_rows(tmp_path / "long.parquet", rows)
  options = prompts_lib.PromptOptions(max_prompt_length=15, truncation="error")
  with pytest.raises(ValueError) as error:
    prompts_lib.training_prompts(path, char_tokenizer, options)
  message = str(error.value)
  assert message.startswith(f"{path}, row 3: the prompt is 16 tokens long, more than data.max_prompt_length=15")
  assert "data.truncation='left'" in message and "data.filter_overlong_prompts" in message


def test_filter_overlong_prompts_drops_and_logs(tmp_path, char_tokenizer, caplog):
  rows = numbered_rows(4) + [
      math_parquet.make_math_row("What is 12+3*4?", 24, index=4, prompt_template="{problem}")] + numbered_rows(2)
  path = write_rows(tmp_path / "long.parquet", rows)
  options = prompts_lib.PromptOptions(max_prompt_length=15, filter_overlong_prompts=True)
  with caplog.at_level(logging.WARNING):
    prompts = prompts_lib.training_prompts(path, char_tokenizer, options)
  assert len(prompts) == 6
  assert prompts.dropped_rows == (f"{path}, row 4",)
  assert "dropped 1 of 7 rows" in caplog.text and f"{path}, row 4" in caplog.text
  # The rows after the dropped one keep their positions in the file.
  assert [example.row_index for example in prompts] == [0, 1, 2, 3, 5, 6]
  assert prompts[4].location == f"{path}, row 5"
  assert prompts.num_truncated_rows == 0


def test_prompt_options_are_checked():
  with pytest.raises(ValueError, match="data.truncation"):
    prompts_lib.PromptOptions(truncation="right")
  with pytest.raises(ValueError, match="data.max_prompt_length"):
    prompts_lib.PromptOptions(max_prompt_length=0)


def test_prompt_example_fields(tmp_path, char_tokenizer):
  path = write_rows(tmp_path / "rows.parquet", numbered_rows(3, data_source="synthetic_arith"))
  example = prompts_lib.training_prompts(path, char_tokenizer)[2]
  assert example.prompt_text == "problem 2"
  assert example.ground_truth == "2"
  assert example.data_source == "synthetic_arith"
  assert example.row_index == 2
  assert example.location == f"{path}, row 2"
  assert example.num_duplicates == 1
  assert example.draw_index == -1
  np.testing.assert_array_equal(example.prompt_ids, char_tokenizer.encode("problem 2\n"))


# ----------------------------------------------------------------------------------------------------------------
# Validation sets
# ----------------------------------------------------------------------------------------------------------------


def test_validation_deduplicates_per_data_source(tmp_path, char_tokenizer):
  aime = numbered_rows(3, data_source="aime") * 4  # 3 problems x 4 rows, interleaved
  other = numbered_rows(2, data_source="other") * 2 + [
      # Same prompt as problem 0 but another ground truth: a different problem.
      math_parquet.make_math_row("problem 0", 99, index=9, data_source="other", prompt_template="{problem}")]
  first = write_rows(tmp_path / "aime.parquet", aime)
  second = write_rows(tmp_path / "other.parquet", other)
  validation = prompts_lib.validation_prompts([first, second], char_tokenizer)
  assert [(example.data_source, example.ground_truth, example.num_duplicates) for example in validation] == [
      ("aime", "0", 4), ("aime", "1", 4), ("aime", "2", 4), ("other", "0", 2), ("other", "1", 2),
      ("other", "99", 1)]
  # Each example is the first row of its problem, in file order.
  assert [example.row_index for example in validation] == [0, 1, 2, 12, 13, 16]
  assert validation[5].location == f"{second}, row 4"
  # Deduplicating again changes nothing and keeps the counts.
  rows = math_parquet.read_math_files([first, second]).deduplicated()
  again = rows.deduplicated()
  np.testing.assert_array_equal(again.num_duplicates, rows.num_duplicates)
