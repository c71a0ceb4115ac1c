"""DAPO-Math-17k / AIME parquet files: the schema, its check, and reading and writing rows (docs/algorithm.md 7).

The file schema (docs/algorithm.md section 7, the layout of verl's parquet files):

  data_source   string                                   e.g. "math_dapo"; rewards are dispatched on it
  prompt        list<struct<role: string, content: string>>  the chat messages, usually one user message
  ability       string                                   "MATH" (carried, not read)
  reward_model  struct<ground_truth: string, style: string>
  extra_info    struct<index: ...>                       (carried, not read)

Files are read column by column with pyarrow; the strings are read as dictionaries, so DAPO-Math-17k's 1.79M rows
(~17.9k problems repeated ~100 times) take a few integer arrays and one copy of each distinct text (`MathRows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs as arrow_fs
import pyarrow.parquet as pq

from dapo_jax.data.math_rows import Interner, MathRows, concatenate_rows

# The user message of every DAPO-Math-17k and AIME row: the problem inside DAPO's instruction (docs/algorithm.md 7).
DAPO_PROMPT_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\nRemember to put "
    "your answer on its own line after \"Answer:\".")

DAPO_DATA_SOURCE = "math_dapo"
DAPO_ABILITY = "MATH"
DAPO_REWARD_STYLE = "rule-lighteval/MATH_v2"

# The columns the pipeline reads; `ability` and `extra_info` are carried by the files but not needed.
REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")

SCHEMA_DESCRIPTION = (
    "the DAPO-Math schema: data_source: string, prompt: list<struct<role: string, content: string>>, "
    "ability: string, reward_model: struct<ground_truth: string, style: string>, extra_info: struct<index>")

# The arrow schema `write_math_parquet` writes: the field order of the published DAPO-Math-17k file.
MATH_PARQUET_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("index", pa.int64())])),
])


class DataSchemaError(ValueError):
  """A data file is not in the DAPO-Math schema. The message names the file and, where they are known, the row
  (0-based, in file order) and the column."""


# ----------------------------------------------------------------------------------------------------------------
# Writing rows (scripts/prepare_data.py, the synthetic task, tests)
# ----------------------------------------------------------------------------------------------------------------


def make_math_row(
    problem: str,
    ground_truth: str | int,
    *,
    index: int,
    data_source: str = DAPO_DATA_SOURCE,
    prompt_template: str = DAPO_PROMPT_TEMPLATE,
    ability: str = DAPO_ABILITY,
) -> dict[str, Any]:
  """One row in the DAPO-Math schema.

  Args:
    problem: the problem statement.
    ground_truth: the answer; an integer is written as its decimal string (math_dapo compares strings).
    index: the problem's `extra_info.index`.
    data_source: the row's data source (rewards and validation metrics are grouped by it).
    prompt_template: a format string with a `{problem}` field; the default is DAPO's instruction. A short task
      (the synthetic one) passes "{problem}" to use the problem text as the whole prompt.
    ability: the `ability` column.
  """
  if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int)):
    raise TypeError(f"ground_truth should be a string (or an integer answer); got {ground_truth!r}")
  return {
      "data_source": data_source,
      "prompt": [{"content": prompt_template.format(problem=problem), "role": "user"}],
      "ability": ability,
      "reward_model": {"ground_truth": str(ground_truth), "style": DAPO_REWARD_STYLE},
      "extra_info": {"index": index},
  }


def write_math_parquet(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
  """Writes rows made by `make_math_row` to a parquet file in `MATH_PARQUET_SCHEMA`."""
  pq.write_table(pa.Table.from_pylist(list(rows), schema=MATH_PARQUET_SCHEMA), os.fspath(path))


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking rows
# ----------------------------------------------------------------------------------------------------------------


def read_math_parquet(path: str | os.PathLike[str]) -> MathRows:
  """Reads and checks one parquet file in the DAPO-Math schema.

  Raises:
    FileNotFoundError: there is no file at `path`.
    DataSchemaError: the file is not parquet, lacks a column the pipeline reads, has a column of the wrong type,
      or has a row with a null or empty data source, an empty or malformed prompt, or a missing or empty ground
      truth. The message names the file, the column, and for row errors the first bad row and how many there are.
  """
  path = os.fspath(path)
  # URIs (gs://, s3://, file://) go through pyarrow's file systems; plain paths are local files.
  filesystem, file_path = arrow_fs.FileSystem.from_uri(path) if "://" in path else (None, path)
  try:
    parquet_file = pq.ParquetFile(file_path, filesystem=filesystem)
  except FileNotFoundError:
    raise
  except (pa.ArrowException, OSError) as error:
    if filesystem is None and not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such data file") from error
    raise DataSchemaError(
        f"{path} is not a parquet file (pyarrow could not read its footer: {error}); expected a parquet file in "
        f"{SCHEMA_DESCRIPTION}") from error
  string_paths = _check_schema(parquet_file.schema_arrow, path)
  # Reading the strings as dictionaries keeps one copy of each distinct text however often the file repeats it.
  table = pq.read_table(file_path, columns=list(REQUIRED_COLUMNS), read_dictionary=string_paths,
                        filesystem=filesystem)
  return math_rows_from_table(table, path)


def read_math_files(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> MathRows:
  """Reads and checks several DAPO-Math parquet files (or one); the rows follow in the order of `paths`."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = list(paths)
  if not paths:
    raise ValueError("No data files given: expected at least one parquet file in the DAPO-Math schema")
  return concatenate_rows([read_math_parquet(path) for path in paths])


def math_rows_from_table(table: pa.Table, source: str) -> MathRows:
  """Checks an arrow table in the DAPO-Math schema and returns its rows; `source` names it in messages."""
  _check_schema(table.schema, source)
  builder = _RowsBuilder(source)
  row_offset = 0
  for batch in table.select(list(REQUIRED_COLUMNS)).to_batches():
    builder.add_batch(batch, row_offset)
    row_offset += batch.num_rows
  return builder.build()


def _check_schema(schema: pa.Schema, source: str) -> list[str]:
  """Raises DataSchemaError unless the columns the pipeline reads exist with the right types; returns the parquet
  paths of their string leaves (to be read as dictionaries)."""
  names = schema.names
  missing = [name for name in REQUIRED_COLUMNS if name not in names]
  if missing:
    raise DataSchemaError(
        f"{source}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} (found "
        f"{', '.join(map(repr, names)) or 'no columns'}); expected {SCHEMA_DESCRIPTION}")

  def wrong_type(column: str, found: pa.DataType, expected: str) -> DataSchemaError:
    return DataSchemaError(
        f"{source}: column '{column}' has type {found}, expected {expected} (in every row); {SCHEMA_DESCRIPTION}")

  data_source_type = schema.field("data_source").type
  if not _is_string_type(data_source_type):
    raise wrong_type("data_source", data_source_type, "string")

  prompt_type = schema.field("prompt").type
  if not (pa.types.is_list(prompt_type) or pa.types.is_large_list(prompt_type)) or not pa.types.is_struct(
      prompt_type.value_type):
    raise wrong_type("prompt", prompt_type, "a list of {role, content} structs")
  message_type = prompt_type.value_type
  for field_name in ("role", "content"):
    if message_type.get_field_index(field_name) < 0:
      raise wrong_type("prompt", prompt_type, f"a list of {{role, content}} structs (no '{field_name}' field)")
    field_type = message_type.field(field_name).type
    if not _is_string_type(field_type):
      raise wrong_type(f"prompt[].{field_name}", field_type, "string")

  reward_model_type = schema.field("reward_model").type
  if not pa.types.is_struct(reward_model_type):
    raise wrong_type("reward_model", reward_model_type, "a struct with a 'ground_truth' string")
  if reward_model_type.get_field_index("ground_truth") < 0:
    raise wrong_type("reward_model", reward_model_type, "a struct with a 'ground_truth' string (it has none)")
  ground_truth_type = reward_model_type.field("ground_truth").type
  if not _is_string_type(ground_truth_type):
    raise wrong_type("reward_model.ground_truth", ground_truth_type, "string")

  # Leaves already dictionary-typed (a table built in memory) must not be named again.
  leaves = [("data_source", data_source_type), ("prompt.list.element.role", message_type.field("role").type),
            ("prompt.list.element.content", message_type.field("content").type),
            ("reward_model.ground_truth", ground_truth_type)]
  return [leaf for leaf, leaf_type in leaves if not pa.types.is_dictionary(leaf_type)]


def _is_string_type(data_type: pa.DataType) -> bool:
  if pa.types.is_dictionary(data_type):
    data_type = data_type.value_type
  return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


class _RowsBuilder:
  """Checks record batches of one source and collects their rows as ids into tables of distinct values."""

  def __init__(self, source: str):
    self.source = source
    self.data_sources = Interner()
    self.roles = Interner()
    self.contents = Interner()
    self.ground_truths = Interner()
    self.prompts = Interner()  # tuples of (role id, content id) pairs
    self.parts: dict[str, list[np.ndarray]] = {
        "data_source_id": [], "prompt_id": [], "ground_truth_id": [], "source_row": []}
    # (column, problem) -> the rows of the file that have it, per batch; reported once every batch is seen.
    self.bad_rows: dict[tuple[str, str], list[np.ndarray]] = {}

  def _string_ids(self, array: pa.Array, interner: Interner) -> tuple[np.ndarray, np.ndarray]:
    """Per element, its id in `interner` (-1 for null), and per element whether it is null or blank."""
    if not pa.types.is_dictionary(array.type):
      array = pc.dictionary_encode(array)
    dictionary = array.dictionary.to_pylist()
    remap = np.array([interner.id_of(value) for value in dictionary] + [-1], np.int64)
    blank = np.array([not value.strip() for value in dictionary] + [True])
    # Null entries point at the extra last slot: id -1, blank.
    indices = pc.fill_null(array.indices, len(dictionary)).to_numpy(zero_copy_only=False).astype(np.int64)
    return remap[indices], blank[indices]

  def _record_bad_rows(self, bad: np.ndarray, row_offset: int, column: str, problem: str,
                       positions: np.ndarray | None = None) -> None:
    """Notes the rows (of the file) where `bad` is set; `positions` maps per-message flags to their rows."""
    bad_rows = np.flatnonzero(bad) if positions is None else np.unique(positions[bad])
    if len(bad_rows):
      self.bad_rows.setdefault((column, problem), []).append(bad_rows + row_offset)

  def _raise_for_bad_rows(self) -> None:
    """Raises for the first bad row of the file (the earliest check where several fail on it), saying how many
    rows have the same problem."""
    if not self.bad_rows:
      return
    found = {check: np.unique(np.concatenate(parts)) for check, parts in self.bad_rows.items()}
    (column, problem), bad_rows = min(found.items(), key=lambda item: item[1][0])
    more = f" (and {len(bad_rows) - 1} more rows)" if len(bad_rows) > 1 else ""
    raise DataSchemaError(
        f"{self.source}, row {bad_rows[0]}, column '{column}': {problem}{more}; expected {SCHEMA_DESCRIPTION}")

  def add_batch(self, batch: pa.RecordBatch, row_offset: int) -> None:
    num_rows = batch.num_rows
    data_source_ids, data_source_blank = self._string_ids(batch.column("data_source"), self.data_sources)
    self._record_bad_rows(data_source_ids < 0, row_offset, "data_source", "is null")
    self._record_bad_rows(data_source_blank, row_offset, "data_source", "is empty")

    prompt = batch.column("prompt")
    self._record_bad_rows(prompt.is_null().to_numpy(zero_copy_only=False), row_offset, "prompt",
                          "is null (empty prompt)")
    lengths = pc.fill_null(pc.list_value_length(prompt), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    self._record_bad_rows((lengths == 0) & prompt.is_valid().to_numpy(zero_copy_only=False), row_offset, "prompt",
                          "has no messages (empty prompt)")
    messages = pc.list_flatten(prompt)
    message_row = pc.list_parent_indices(prompt).to_numpy(zero_copy_only=False).astype(np.int64)
    self._record_bad_rows(messages.is_null().to_numpy(zero_copy_only=False), row_offset, "prompt",
                          "holds a null message", message_row)
    role_ids, role_blank = self._string_ids(pc.struct_field(messages, "role"), self.roles)
    self._record_bad_rows(role_blank, row_offset, "prompt[].role", "is null or empty", message_row)
    content_ids, content_blank = self._string_ids(pc.struct_field(messages, "content"), self.contents)
    self._record_bad_rows(content_blank, row_offset, "prompt[].content", "is null or blank (empty prompt)",
                          message_row)

    reward_model = batch.column("reward_model")
    self._record_bad_rows(reward_model.is_null().to_numpy(zero_copy_only=False), row_offset, "reward_model",
                          "is null (no ground truth)")
    ground_truth_ids, ground_truth_blank = self._string_ids(
        pc.struct_field(reward_model, "ground_truth"), self.ground_truths)
    self._record_bad_rows(ground_truth_ids < 0, row_offset, "reward_model.ground_truth", "is null (missing)")
    self._record_bad_rows(ground_truth_blank, row_offset, "reward_model.ground_truth", "is empty")

    # A prompt's key is its (role id, content id) pairs; rows are padded to the longest prompt with -1 so that
    # the distinct prompts of a batch are found with one np.unique over rows rather than a Python loop.
    width = int(lengths.max()) if num_rows else 0
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(message_row)) - starts[message_row]
    keys = np.full((num_rows, 2 * width), -1, np.int64)
    keys[message_row, 2 * position] = role_ids
    keys[message_row, 2 * position + 1] = content_ids
    if num_rows:
      distinct_keys, inverse = np.unique(keys, axis=0, return_inverse=True)
      distinct_ids = np.array([
          self.prompts.id_of(tuple((int(key[i]), int(key[i + 1])) for i in range(0, len(key), 2) if key[i] >= 0))
          for key in distinct_keys], np.int32)
      prompt_ids = distinct_ids[inverse.reshape(-1)]
    else:
      prompt_ids = np.zeros(0, np.int32)

    self.parts["data_source_id"].append(data_source_ids.astype(np.int32))
    self.parts["prompt_id"].append(prompt_ids)
    self.parts["ground_truth_id"].append(ground_truth_ids.astype(np.int32))
    self.parts["source_row"].append(np.arange(row_offset, row_offset + num_rows, dtype=np.int64))

  def build(self) -> MathRows:
    self._raise_for_bad_rows()
    columns = {name: (np.concatenate(parts) if parts else np.zeros(0, np.int64))
               for name, parts in self.parts.items()}
    num_rows = len(columns["source_row"])
    return MathRows(
        sources=(self.source,),
        source_num_rows=(num_rows,),
        source_id=np.zeros(num_rows, np.int32),
        source_row=columns["source_row"].astype(np.int64),
        prompts=tuple(tuple((self.roles.values[role], self.contents.values[content]) for role, content in prompt)
                      for prompt in self.prompts.values),
        prompt_id=columns["prompt_id"].astype(np.int32),
        ground_truths=tuple(self.ground_truths.values),
        ground_truth_id=columns["ground_truth_id"].astype(np.int32),
        data_sources=tuple(self.data_sources.values),
        data_source_id=columns["data_source_id"].astype(np.int32),
        num_duplicates=np.ones(num_rows, np.int64),
    )
