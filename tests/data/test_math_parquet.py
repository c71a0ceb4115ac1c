"""Tests for dapo_jax.data.math_parquet (and the `MathRows` it reads): the DAPO-Math parquet reader and its
schema check, rows over several files, multi-message prompts and the real AIME file (docs/algorithm.md 7, 8)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_jax.data import math_parquet
from dapo_jax.data import prompts as prompts_lib
from tests.data.math_fixtures import numbered_rows, write_rows


def write_table(path, columns):
  pq.write_table(pa.table(columns), path)
  return str(path)


def dapo_prompt(problem):
  """The user message of a DAPO-Math row for `problem`, as `make_math_row` writes it."""
  return math_parquet.make_math_row(problem, 0, index=0)["prompt"][0]["content"]


def good_columns(num_rows=4):
  return {
      "data_source": ["math_dapo"] * num_rows,
      "prompt": [[{"role": "user", "content": f"question {i}"}] for i in range(num_rows)],
      "ability": ["MATH"] * num_rows,
      "reward_model": [{"ground_truth": str(i), "style": math_parquet.DAPO_REWARD_STYLE} for i in range(num_rows)],
      "extra_info": [{"index": i} for i in range(num_rows)],
  }


# ----------------------------------------------------------------------------------------------------------------
# Rows and the prompt template
# ----------------------------------------------------------------------------------------------------------------


def test_prompt_template_is_dapos_text():
  assert dapo_prompt("What is 1+1?") == (
      "Solve the following math problem step by step. The last line of your response should be of the form "
      "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 1+1?\n\nRemember to "
      "put your answer on its own line after \"Answer:\".")
  # Braces in a problem are text, not format fields.
  assert "\\frac{1}{2}" in dapo_prompt("Compute \\frac{1}{2}.")


def test_make_math_row_and_round_trip(tmp_path):
  row = math_parquet.make_math_row("Find x.", 42, index=7)
  assert row == {
      "data_source": "math_dapo",
      "prompt": [{"content": dapo_prompt("Find x."), "role": "user"}],
      "ability": "MATH",
      "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"},
      "extra_info": {"index": 7},
  }
  with pytest.raises(TypeError, match="ground_truth"):
    math_parquet.make_math_row("Find x.", 4.2, index=0)
  path = write_rows(tmp_path / "one.parquet", [row])
  assert pq.read_table(path).to_pylist() == [row]
  rows = math_parquet.read_math_parquet(path)
  assert len(rows) == 1
  assert rows.messages(0) == [{"role": "user", "content": dapo_prompt("Find x.")}]
  assert rows.ground_truth(0) == "42" and rows.data_source(0) == "math_dapo"
  assert rows.location(0) == f"{path}, row 0"


def test_rows_over_several_files_and_row_groups(tmp_path):
  first = write_rows(tmp_path / "a.parquet", numbered_rows(10), row_group_size=3)
  second = write_rows(tmp_path / "b.parquet", numbered_rows(5, data_source="other")[::-1])
  rows = math_parquet.read_math_files([first, second])
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
    math_parquet.read_math_files([])


def test_multi_message_prompts_are_kept_whole(tmp_path, char_tokenizer):
  system = {"role": "system", "content": "Be brief."}
  rows = [
      {**math_parquet.make_math_row("What is 1+1?", 2, index=0),
       "prompt": [system, {"role": "user", "content": "What is 1+1?"}]},
      {**math_parquet.make_math_row("What is 1+1?", 2, index=1), "prompt": [{"role": "user", "content": "What is 1+1?"}]},
  ]
  path = write_rows(tmp_path / "multi.parquet", rows)
  loaded = math_parquet.read_math_parquet(path)
  assert loaded.messages(0) == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is 1+1?"}]
  assert loaded.messages(1) == [{"role": "user", "content": "What is 1+1?"}]
  assert loaded.prompt_text(0) == "Be brief.\n\nWhat is 1+1?"
  assert loaded.num_problems == 2
  # The chat template renders every message.
  options = prompts_lib.PromptOptions(max_prompt_length=64)
  assert prompts_lib.render_prompt(loaded.messages(0), char_tokenizer, options) == "Be brief.\nWhat is 1+1?\n"
  prompts = prompts_lib.PromptSet(loaded, char_tokenizer, options)
  np.testing.assert_array_equal(prompts[0].prompt_ids, char_tokenizer.encode("Be brief.\nWhat is 1+1?\n"))


def test_real_aime_file(shared_data_dir, char_tokenizer):
  path = shared_data_dir / "aime-2024.parquet"
  rows = math_parquet.read_math_parquet(path)
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
    assert record["prompt"][0]["content"] == dapo_prompt(record["extra_info"]["raw_problem"])
  validation = prompts_lib.validation_prompts(
      path, char_tokenizer, prompts_lib.PromptOptions(max_prompt_length=4096, use_chat_template=False))
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
  with pytest.raises(math_parquet.DataSchemaError) as error:
    math_parquet.read_math_parquet(path)
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
  with pytest.raises(math_parquet.DataSchemaError) as error:
    math_parquet.read_math_parquet(path)
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
  with pytest.raises(math_parquet.DataSchemaError) as error:
    math_parquet.read_math_parquet(path)
  message = str(error.value)
  assert message.startswith(f"{path}, row 5, column '{named}': ")
  assert problem in message
  assert "(and 1 more rows)" in message


def test_not_parquet_and_missing_file(tmp_path):
  path = tmp_path / "data.parquet"
  path.write_text(json.dumps(good_columns()))
  with pytest.raises(math_parquet.DataSchemaError, match=f"^{path} is not a parquet file"):
    math_parquet.read_math_parquet(path)
  with pytest.raises(FileNotFoundError, match="nothing.parquet"):
    math_parquet.read_math_parquet(tmp_path / "nothing.parquet")


def test_uri_paths_read_through_pyarrow_file_systems(tmp_path):
  path = write_rows(tmp_path / "rows.parquet", numbered_rows(3))
  rows = math_parquet.read_math_parquet(f"file://{path}")
  assert [rows.prompt_text(i) for i in range(3)] == ["problem 0", "problem 1", "problem 2"]
  assert rows.location(1) == f"file://{path}, row 1"
  with pytest.raises(FileNotFoundError):
    math_parquet.read_math_parquet(f"file://{tmp_path}/nothing.parquet")


def test_extra_columns_and_large_types_are_accepted(tmp_path):
  columns = good_columns()
  table = pa.table({
      **columns,
      "data_source": pa.array(columns["data_source"], pa.large_string()),
      "__index_level_0__": list(range(4)),
  })
  path = str(tmp_path / "extra.parquet")
  pq.write_table(table, path)
  rows = math_parquet.read_math_parquet(path)
  assert [rows.ground_truth(i) for i in range(4)] == ["0", "1", "2", "3"]
