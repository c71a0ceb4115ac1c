"""Tests for dapo_jax.data.math: the DAPO-Math parquet reader and its schema check, prompt tokenization (chat
template, left truncation, the error mode, over-long filtering), the grain pipeline (seeded shuffle, drop
remainder, draw order, sharding, checkpointable iterator) and validation deduplication (DAPO_SPEC.md 7, 8).

Prompts are tokenized with the synthetic task's character tokenizer (one character, one token), so lengths and
truncation points can be read off the text.
"""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dapo_jax.data import math as math_data
from dapo_jax.data import synthetic
from dapo_jax.model import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def char_tokenizer():
  return synthetic.char_tokenizer()


def write_rows(path, rows, **write_options):
  """Writes rows in the DAPO-Math schema; `write_options` go to pq.write_table (e.g. row_group_size)."""
  pq.write_table(pa.Table.from_pylist(rows, schema=math_data.MATH_PARQUET_SCHEMA), path, **write_options)
  return str(path)


def numbered_rows(count, data_source="math_dapo", template="{problem}"):
  """Rows whose prompt is "problem N" and ground truth is N, distinct problems."""
  return [math_data.make_math_row(f"problem {i}", i, index=i, data_source=data_source, prompt_template=template)
          for i in range(count)]


def write_table(path, columns):
  pq.write_table(pa.table(columns), path)
  return str(path)


def good_columns(num_rows=4):
  return {
      "data_source": ["math_dapo"] * num_rows,
      "prompt": [[{"role": "user", "content": f"question {i}"}] for i in range(num_rows)],
      "ability": ["MATH"] * num_rows,
      "reward_model": [{"ground_truth": str(i), "style": math_data.DAPO_REWARD_STYLE} for i in range(num_rows)],
      "extra_info": [{"index": i} for i in range(num_rows)],
  }


# ----------------------------------------------------------------------------------------------------------------
# Rows and the prompt template
# ----------------------------------------------------------------------------------------------------------------


def test_prompt_template_is_dapos_text():
  assert math_data.dapo_prompt("What is 1+1?") == (
      "Solve the following math problem step by step. The last line of your response should be of the form "
      "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 1+1?\n\nRemember to "
      "put your answer on its own line after \"Answer:\".")
  # Braces in a problem are text, not format fields.
  assert "\\frac{1}{2}" in math_data.dapo_prompt("Compute \\frac{1}{2}.")


def test_make_math_row_and_round_trip(tmp_path):
  row = math_data.make_math_row("Find x.", 42, index=7)
  assert row == {
      "data_source": "math_dapo",
      "prompt": [{"content": math_data.dapo_prompt("Find x."), "role": "user"}],
      "ability": "MATH",
      "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"},
      "extra_info": {"index": 7},
  }
  with pytest.raises(TypeError, match="ground_truth"):
    math_data.make_math_row("Find x.", 4.2, index=0)
  path = write_rows(tmp_path / "one.parquet", [row])
  assert pq.read_table(path).to_pylist() == [row]
  rows = math_data.read_math_parquet(path)
  assert len(rows) == 1
  assert rows.messages(0) == [{"role": "user", "content": math_data.dapo_prompt("Find x.")}]
  assert rows.ground_truth(0) == "42" and rows.data_source(0) == "math_dapo"
  assert rows.location(0) == f"{path}, row 0"


def test_rows_over_several_files_and_row_groups(tmp_path):
  first = write_rows(tmp_path / "a.parquet", numbered_rows(10), row_group_size=3)
  second = write_rows(tmp_path / "b.parquet", numbered_rows(5, data_source="other")[::-1])
  rows = math_data.read_math_files([first, second])
  assert len(rows) == 15
  assert [rows.prompt_text(i) for i in range(15)] == [f"problem {i}" for i in range(10)] + [
      f"problem {i}" for i in range(4, -1, -1)]
  assert [rows.data_source(i) for i in (0, 9, 10, 14)] == ["math_dapo", "math_dapo", "other", "other"]
  assert rows.location(12) == f"{second}, row 2"
  np.testing.assert_array_equal(rows.row_positions(), np.arange(15))
  # The same prompt in both files is stored once; the problems differ by data source.
  assert len(rows.prompts) == 10
  assert rows.num_problems == 15
  assert rows.summary() == {
      "files": [first, second], "rows": 15, "problems": 15,
      "data_sources": {"math_dapo": {"rows": 10, "problems": 10}, "other": {"rows": 5, "problems": 5}}}
  with pytest.raises(ValueError, match="No data files"):
    math_data.read_math_files([])


def test_multi_message_prompts_are_kept_whole(tmp_path, char_tokenizer):
  system = {"role": "system", "content": "Be brief."}
  rows = [
      {**math_data.make_math_row("What is 1+1?", 2, index=0), "prompt": [system, {"role": "user",
                                                                                "content": "What is 1+1?"}]},
      {**math_data.make_math_row("What is 1+1?", 2, index=1), "prompt": [{"role": "user",
                                                                        "content": "What is 1+1?"}]},
  ]
  path = write_rows(tmp_path / "multi.parquet", rows)
  loaded = math_data.read_math_parquet(path)
  assert loaded.messages(0) == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is 1+1?"}]
  assert loaded.messages(1) == [{"role": "user", "content": "What is 1+1?"}]
  assert loaded.prompt_text(0) == "Be brief.\n\nWhat is 1+1?"
  assert loaded.num_problems == 2
  # The chat template renders every message.
  options = math_data.PromptOptions(max_prompt_length=64)
  assert math_data.render_prompt(loaded.messages(0), char_tokenizer, options) == "Be brief.\nWhat is 1+1?\n"
  prompts = math_data.PromptSet(loaded, char_tokenizer, options)
  np.testing.assert_array_equal(prompts[0].prompt_ids, char_tokenizer.encode("Be brief.\nWhat is 1+1?\n"))


def test_real_aime_file(shared_data_dir, char_tokenizer):
  path = shared_data_dir / "aime-2024.parquet"
  rows = math_data.read_math_parquet(path)
  assert len(rows) == 960
  assert rows.num_problems == 30
  assert set(rows.data_sources) == {"math_dapo"}
  deduplicated = rows.deduplicated()
  assert len(deduplicated) == 30
  assert deduplicated.num_duplicates.tolist() == [32] * 30
  for row in range(30):
    int(deduplicated.ground_truth(row))  # AIME answers are integers
  # Every AIME prompt is DAPO's template around the problem that extra_info keeps.
  table = pq.read_table(path, columns=["prompt", "extra_info"]).to_pylist()
  for record in table:
    assert record["prompt"][0]["content"] == math_data.dapo_prompt(record["extra_info"]["raw_problem"])
  validation = math_data.validation_prompts(
      path, char_tokenizer, math_data.PromptOptions(max_prompt_length=4096, use_chat_template=False))
  assert len(validation) == 30
  assert {example.data_source for example in validation} == {"math_dapo"}
  assert all(example.num_duplicates == 32 for example in validation)
  assert sum(example.num_duplicates for example in validation) == 960


# ----------------------------------------------------------------------------------------------------------------
# The schema check
# ----------------------------------------------------------------------------------------------------------------


def test_missing_column_names_file_and_column(tmp_path):
  columns = good_columns()
  del columns["reward_model"]
  path = write_table(tmp_path / "missing.parquet", columns)
  with pytest.raises(math_data.DataSchemaError) as error:
    math_data.read_math_parquet(path)
  assert str(error.value).startswith(f"{path}: missing column 'reward_model'")
  assert "'prompt'" in str(error.value)  # the columns found are listed


@pytest.mark.parametrize("column, values, named, found", [
    ("reward_model", [{"ground_truth": 1, "style": "x"}] * 4, "reward_model.ground_truth", "int64"),
    ("reward_model", ["4"] * 4, "reward_model", "string"),
    ("prompt", ["What is 1+1?"] * 4, "prompt", "string"),
    ("prompt", [[{"role": "user", "text": "hi"}]] * 4, "prompt", "no 'content' field"),
    ("prompt", [[{"role": "user", "content": 1}]] * 4, "prompt[].content", "int64"),
    ("data_source", [1, 2, 3, 4], "data_source", "int64"),
])
def test_wrong_type_names_file_and_column(tmp_path, column, values, named, found):
  path = write_table(tmp_path / "wrong_type.parquet", {**good_columns(), column: values})
  with pytest.raises(math_data.DataSchemaError) as error:
    math_data.read_math_parquet(path)
  message = str(error.value)
  assert message.startswith(f"{path}: column '{named}' has type")
  assert found in message


@pytest.mark.parametrize("column, bad_value, named, problem", [
    ("prompt", [{"role": "user", "content": ""}], "prompt[].content", "empty prompt"),
    ("prompt", [{"role": "user", "content": "  \n"}], "prompt[].content", "empty prompt"),
    ("prompt", [], "prompt", "has no messages"),
    ("prompt", None, "prompt", "is null"),
    ("prompt", [None], "prompt", "null message"),
    ("prompt", [{"role": None, "content": "hi"}], "prompt[].role", "null or empty"),
    ("reward_model", {"ground_truth": None, "style": "x"}, "reward_model.ground_truth", "is null (missing)"),
    ("reward_model", {"ground_truth": "", "style": "x"}, "reward_model.ground_truth", "is empty"),
    ("reward_model", None, "reward_model", "no ground truth"),
    ("data_source", None, "data_source", "is null"),
    ("data_source", "", "data_source", "is empty"),
])
def test_bad_row_names_file_row_and_column(tmp_path, column, bad_value, named, problem):
  # Eleven rows in row groups of four: the bad rows (5 and 9) sit in later batches, so the row numbers reported
  # must count the rows before them.
  columns = good_columns(11)
  columns[column] = list(columns[column])
  columns[column][5] = bad_value
  columns[column][9] = bad_value
  schema = pa.schema([("data_source", pa.string()),
                      ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                      ("ability", pa.string()),
                      ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
                      ("extra_info", pa.struct([("index", pa.int64())]))])
  path = str(tmp_path / "bad_row.parquet")
  pq.write_table(pa.table(columns, schema=schema), path, row_group_size=4)
  with pytest.raises(math_data.DataSchemaError) as error:
    math_data.read_math_parquet(path)
  message = str(error.value)
  assert message.startswith(f"{path}, row 5, column '{named}': ")
  assert problem in message
  assert "(and 1 more rows)" in message


def test_not_parquet_and_missing_file(tmp_path):
  path = tmp_path / "data.parquet"
  path.write_text(json.dumps(good_columns()))
  with pytest.raises(math_data.DataSchemaError, match=f"^{path} is not a parquet file"):
    math_data.read_math_parquet(path)
  with pytest.raises(FileNotFoundError, match="nothing.parquet"):
    math_data.read_math_parquet(tmp_path / "nothing.parquet")


def test_uri_paths_read_through_pyarrow_file_systems(tmp_path):
  path = write_rows(tmp_path / "rows.parquet", numbered_rows(3))
  rows = math_data.read_math_parquet(f"file://{path}")
  assert [rows.prompt_text(i) for i in range(3)] == ["problem 0", "problem 1", "problem 2"]
  assert rows.location(1) == f"file://{path}, row 1"
  with pytest.raises(FileNotFoundError):
    math_data.read_math_parquet(f"file://{tmp_path}/nothing.parquet")


def test_extra_columns_and_large_types_are_accepted(tmp_path):
  columns = good_columns()
  table = pa.table({
      **columns,
      "data_source": pa.array(columns["data_source"], pa.large_string()),
      "__index_level_0__": list(range(4)),
  })
  path = str(tmp_path / "extra.parquet")
  pq.write_table(table, path)
  rows = math_data.read_math_parquet(path)
  assert [rows.ground_truth(i) for i in range(4)] == ["0", "1", "2", "3"]


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
  options = math_data.PromptOptions()
  assert math_data.render_prompt(messages, chatml, options) == (
      "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
  # Asked not to use it, or with a tokenizer that has none, the plain rendering is used.
  assert math_data.render_prompt(messages, chatml, math_data.PromptOptions(use_chat_template=False)) == (
      "What is 1+1?")
  plain = math_data.PromptOptions(use_chat_template=False, plain_format="{role}: {content}\n")
  assert math_data.render_prompt(messages, chatml, plain) == "user: What is 1+1?\n"


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
  ids = math_data.prompt_token_ids([{"role": "user", "content": "What is 1+1?"}], tokenizer,
                                   math_data.PromptOptions())
  assert ids[0] == tokenizer.bos_id
  assert tokenizer.decode(ids[1:]) == "What is 1+1?"


def test_left_truncation_keeps_the_end(tmp_path, char_tokenizer):
  rows = [math_data.make_math_row("What is 12+3*4?", 24, index=0, prompt_template="{problem}"),
          math_data.make_math_row("What is 1+2*3?", 7, index=1, prompt_template="{problem}")]
  path = write_rows(tmp_path / "long.parquet", rows)
  prompts = math_data.training_prompts(path, char_tokenizer, math_data.PromptOptions(max_prompt_length=15))
  # "What is 12+3*4?\n" is 16 characters = 16 tokens: the first is cut; "What is 1+2*3?\n" (15) fits.
  assert char_tokenizer.decode(prompts[0].prompt_ids) == "hat is 12+3*4?\n"
  assert prompts[0].num_truncated_tokens == 1
  assert char_tokenizer.decode(prompts[1].prompt_ids) == "What is 1+2*3?\n"
  assert prompts[1].num_truncated_tokens == 0
  assert prompts.num_truncated_rows == 1
  assert prompts[0].prompt_ids.dtype == np.int32
  assert not prompts[0].prompt_ids.flags.writeable


def test_error_mode_names_the_row(tmp_path, char_tokenizer):
  rows = numbered_rows(3) + [math_data.make_math_row("What is 12+3*4?", 24, index=3, prompt_template="{problem}")]
  path = write_rows(tmp_path / "long.parquet", rows)
  options = math_data.PromptOptions(max_prompt_length=15, truncation="error")
  with pytest.raises(ValueError) as error:
    math_data.training_prompts(path, char_tokenizer, options)
  message = str(error.value)
  assert message.startswith(f"{path}, row 3: the prompt is 16 tokens long, more than data.max_prompt_length=15")
  assert "data.truncation='left'" in message and "data.filter_overlong_prompts" in message


def test_filter_overlong_prompts_drops_and_logs(tmp_path, char_tokenizer, caplog):
  rows = numbered_rows(4) + [
      math_data.make_math_row("What is 12+3*4?", 24, index=4, prompt_template="{problem}")] + numbered_rows(2)
  path = write_rows(tmp_path / "long.parquet", rows)
  options = math_data.PromptOptions(max_prompt_length=15, filter_overlong_prompts=True)
  with caplog.at_level(logging.WARNING):
    prompts = math_data.training_prompts(path, char_tokenizer, options)
  assert len(prompts) == 6
  assert prompts.dropped_rows == (f"{path}, row 4",)
  assert "dropped 1 of 7 rows" in caplog.text and f"{path}, row 4" in caplog.text
  # The rows after the dropped one keep their positions in the file.
  assert [example.row_index for example in prompts] == [0, 1, 2, 3, 5, 6]
  assert prompts[4].location == f"{path}, row 5"
  assert prompts.num_truncated_rows == 0


def test_prompt_options_are_checked():
  with pytest.raises(ValueError, match="data.truncation"):
    math_data.PromptOptions(truncation="right")
  with pytest.raises(ValueError, match="data.max_prompt_length"):
    math_data.PromptOptions(max_prompt_length=0)


def test_prompt_example_fields(tmp_path, char_tokenizer):
  path = write_rows(tmp_path / "rows.parquet", numbered_rows(3, data_source="synthetic_arith"))
  example = math_data.training_prompts(path, char_tokenizer)[2]
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
      math_data.make_math_row("problem 0", 99, index=9, data_source="other", prompt_template="{problem}")]
  first = write_rows(tmp_path / "aime.parquet", aime)
  second = write_rows(tmp_path / "other.parquet", other)
  validation = math_data.validation_prompts([first, second], char_tokenizer)
  assert [(example.data_source, example.ground_truth, example.num_duplicates) for example in validation] == [
      ("aime", "0", 4), ("aime", "1", 4), ("aime", "2", 4), ("other", "0", 2), ("other", "1", 2),
      ("other", "99", 1)]
  # Each example is the first row of its problem, in file order.
  assert [example.row_index for example in validation] == [0, 1, 2, 12, 13, 16]
  assert validation[5].location == f"{second}, row 4"
  # Deduplicating again changes nothing and keeps the counts.
  rows = math_data.read_math_files([first, second]).deduplicated()
  again = rows.deduplicated()
  np.testing.assert_array_equal(again.num_duplicates, rows.num_duplicates)


# ----------------------------------------------------------------------------------------------------------------
# The grain pipeline
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ten_prompts(tmp_path, char_tokenizer):
  return math_data.training_prompts(write_rows(tmp_path / "ten.parquet", numbered_rows(10)), char_tokenizer)


def batch_rows(batch):
  return [example.row_index for example in batch]


def test_shuffle_is_seeded_and_drops_the_last_incomplete_batch(ten_prompts):
  batches = list(math_data.batch_iterator(math_data.epoch_batches(ten_prompts, batch_size=4, seed=0)))
  again = list(math_data.batch_iterator(math_data.epoch_batches(ten_prompts, batch_size=4, seed=0)))
  other_seed = list(math_data.batch_iterator(math_data.epoch_batches(ten_prompts, batch_size=4, seed=1)))
  assert [batch_rows(batch) for batch in batches] == [batch_rows(batch) for batch in again]
  assert [batch_rows(batch) for batch in batches] != [batch_rows(batch) for batch in other_seed]
  # 10 prompts in batches of 4: two batches, 8 distinct prompts, the other 2 dropped.
  assert [len(batch) for batch in batches] == [4, 4]
  drawn = sum((batch_rows(batch) for batch in batches), [])
  assert len(set(drawn)) == 8 and set(drawn) <= set(range(10))
  assert drawn != sorted(drawn)
  # Draw positions number the epoch's prompts in order.
  assert [example.draw_index for batch in batches for example in batch] == list(range(8))
  # Examples carry what the rollout and the reward need.
  example = batches[0][0]
  assert example.prompt_text == f"problem {example.row_index}" and example.ground_truth == str(example.row_index)


def test_no_shuffle_keeps_file_order(ten_prompts):
  batches = list(math_data.batch_iterator(math_data.epoch_batches(ten_prompts, batch_size=3, seed=None)))
  assert [batch_rows(batch) for batch in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_iterator_state_resumes_exactly(ten_prompts):
  dataset = math_data.epoch_batches(ten_prompts, batch_size=2, seed=3)
  uninterrupted = [batch_rows(batch) for batch in math_data.batch_iterator(dataset)]
  assert len(uninterrupted) == 5

  iterator = math_data.batch_iterator(dataset)
  first_two = [batch_rows(next(iterator)) for _ in range(2)]
  state = iterator.get_state()
  json.dumps(state)  # a checkpoint stores it as JSON
  # A fresh pipeline, built the same way, picks up where the first stopped.
  resumed = math_data.batch_iterator(math_data.epoch_batches(ten_prompts, batch_size=2, seed=3))
  resumed.set_state(state)
  assert first_two + [batch_rows(batch) for batch in resumed] == uninterrupted
  # One epoch: the restored iterator is exhausted too.
  with pytest.raises(StopIteration):
    next(resumed)


def test_sharding_by_process_splits_each_global_batch(ten_prompts):
  unsharded = [batch_rows(batch) for batch in math_data.batch_iterator(
      math_data.epoch_batches(ten_prompts, batch_size=4, seed=5, shard_by_process=False))]
  shards = [[batch for batch in math_data.batch_iterator(math_data.epoch_batches(
      ten_prompts, batch_size=4, seed=5, process_index=index, process_count=2))] for index in range(2)]
  assert [len(shard) for shard in shards] == [2, 2]
  for batch_index, global_batch in enumerate(unsharded):
    local = [shards[index][batch_index] for index in range(2)]
    assert all(len(batch) == 2 for batch in local)
    assert sorted(batch_rows(local[0]) + batch_rows(local[1])) == sorted(global_batch)
    # Draw positions are global: process p holds draws p, p + 2, ...
    assert [example.draw_index for example in local[1]] == [4 * batch_index + 1, 4 * batch_index + 3]
  # A single-process run shards trivially (jax.process_count() is 1 here).
  default = [batch_rows(batch) for batch in math_data.batch_iterator(
      math_data.epoch_batches(ten_prompts, batch_size=4, seed=5))]
  assert default == unsharded


def test_pipeline_arguments_are_checked(ten_prompts):
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    math_data.epoch_batches(ten_prompts, batch_size=4, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index 2"):
    math_data.epoch_batches(ten_prompts, batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    math_data.epoch_batches(ten_prompts, batch_size=0, seed=0)
  # Fewer prompts than one batch: an empty epoch, not an error.
  assert len(math_data.epoch_batches(ten_prompts, batch_size=11, seed=0)) == 0
