"""DAPO-Math-17k / AIME parquet files -> checked rows -> tokenized prompts -> a grain pipeline (DAPO_SPEC.md 7, 8).

The path a training run takes:

  rows = read_math_files(config.data.train_files)                 # schema check, compact columnar rows
  prompts = PromptSet(rows, tokenizer, PromptOptions(...))         # chat template, left truncation / error / filter
  batches = epoch_batches(prompts, batch_size=..., seed=...)       # grain: shuffle, shard, drop remainder
  iterator = batch_iterator(batches)                               # checkpointable: get_state() / set_state()
  for batch in iterator: ...                                       # batch: list[PromptExample]

and for validation `validation_prompts(config.data.val_files, tokenizer, options)`, which merges rows with the same
data_source, prompt and ground truth (AIME's 960 rows are 30 problems x 32) so that the evaluator draws k samples per
unique problem.

The file schema (DAPO_SPEC.md section 7, the layout of verl's parquet files):

  data_source   string                                   e.g. "math_dapo"; rewards are dispatched on it
  prompt        list<struct<role: string, content: string>>  the chat messages, usually one user message
  ability       string                                   "MATH" (carried, not read)
  reward_model  struct<ground_truth: string, style: string>
  extra_info    struct<index: ...>                       (carried, not read)

Files are read column by column with pyarrow; the strings are read as dictionaries, so DAPO-Math-17k's 1.79M rows
(~17.9k problems repeated ~100 times) take a few integer arrays and one copy of each distinct text, and each
distinct prompt is rendered and tokenized once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import logging
import os
from typing import Any

import grain
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs as arrow_fs
import pyarrow.parquet as pq

from dapo_jax.model import tokenizer as tokenizer_lib

# The user message of every DAPO-Math-17k and AIME row: the problem inside DAPO's instruction (DAPO_SPEC.md 7).
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

TRUNCATION_MODES = ("left", "error")

# How many row locations a log line or error message lists before it says "and N more".
_LISTED_LOCATIONS = 20


class DataSchemaError(ValueError):
  """A data file is not in the DAPO-Math schema. The message names the file and, where they are known, the row
  (0-based, in file order) and the column."""


# ----------------------------------------------------------------------------------------------------------------
# Writing rows (scripts/prepare_data.py, the synthetic task, tests)
# ----------------------------------------------------------------------------------------------------------------


def dapo_prompt(problem: str) -> str:
  """The user message DAPO-Math-17k and AIME give the model for `problem`."""
  return DAPO_PROMPT_TEMPLATE.format(problem=problem)


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


@dataclasses.dataclass(frozen=True, eq=False)
class MathRows:
  """Rows of one or more DAPO-Math files, checked, in file order, stored as ids into tables of distinct values.

  Attributes:
    sources: the files the rows came from (any name, for messages).
    source_num_rows: per source, how many rows it has (before any selection).
    source_id: per row, its file's position in `sources`.
    source_row: per row, its 0-based row number in that file.
    prompts: the distinct prompts, each a tuple of (role, content) messages.
    prompt_id: per row, its prompt's position in `prompts`.
    ground_truths: the distinct ground truths.
    ground_truth_id: per row, its ground truth's position in `ground_truths`.
    data_sources: the distinct data sources.
    data_source_id: per row, its data source's position in `data_sources`.
    num_duplicates: per row, how many rows of the files it stands for (1, or more after `deduplicated`).
  """

  sources: tuple[str, ...]
  source_num_rows: tuple[int, ...]
  source_id: np.ndarray
  source_row: np.ndarray
  prompts: tuple[tuple[tuple[str, str], ...], ...]
  prompt_id: np.ndarray
  ground_truths: tuple[str, ...]
  ground_truth_id: np.ndarray
  data_sources: tuple[str, ...]
  data_source_id: np.ndarray
  num_duplicates: np.ndarray

  def __len__(self) -> int:
    return len(self.prompt_id)

  def row_positions(self) -> np.ndarray:
    """Per row, its position in the files as read (all sources one after the other, before any selection)."""
    offsets = np.concatenate([[0], np.cumsum(self.source_num_rows)[:-1]]).astype(np.int64)
    return offsets[self.source_id] + self.source_row

  def location(self, row: int) -> str:
    """Where row `row` came from, as "FILE, row N"."""
    return f"{self.sources[self.source_id[row]]}, row {self.source_row[row]}"

  def messages(self, row: int) -> list[dict[str, str]]:
    """The chat messages of row `row`, as {"role", "content"} dicts."""
    return [{"role": role, "content": content} for role, content in self.prompts[self.prompt_id[row]]]

  def prompt_text(self, row: int) -> str:
    """The text of row `row`'s prompt: its message contents joined by blank lines (usually just one message)."""
    return "\n\n".join(content for _, content in self.prompts[self.prompt_id[row]])

  def ground_truth(self, row: int) -> str:
    return self.ground_truths[self.ground_truth_id[row]]

  def data_source(self, row: int) -> str:
    return self.data_sources[self.data_source_id[row]]

  def problem_keys(self) -> np.ndarray:
    """Per row, an id shared by exactly the rows with the same data_source, prompt and ground truth."""
    if not len(self):
      return np.zeros(0, np.int64)
    triples = np.stack([self.data_source_id, self.prompt_id, self.ground_truth_id], axis=1)
    _, keys = np.unique(triples, axis=0, return_inverse=True)
    return keys.reshape(-1)

  @property
  def num_problems(self) -> int:
    """The number of distinct (data_source, prompt, ground truth) triples."""
    return int(self.problem_keys().max()) + 1 if len(self) else 0

  def select(self, rows: np.ndarray | Sequence[int]) -> MathRows:
    """The rows at positions `rows`, in that order (the tables of distinct values are shared)."""
    rows = np.asarray(rows, np.int64)
    return dataclasses.replace(
        self, source_id=self.source_id[rows], source_row=self.source_row[rows], prompt_id=self.prompt_id[rows],
        ground_truth_id=self.ground_truth_id[rows], data_source_id=self.data_source_id[rows],
        num_duplicates=self.num_duplicates[rows])

  def deduplicated(self) -> MathRows:
    """One row per distinct (data_source, prompt, ground truth), the first in file order; its `num_duplicates`
    counts the rows it stands for. The data source is part of the key so that the same problem in two validation
    sets is scored under each set's name (DAPO_SPEC.md 8)."""
    keys = self.problem_keys()
    _, first_rows = np.unique(keys, return_index=True)
    first_rows = np.sort(first_rows)
    counts = np.bincount(keys, weights=self.num_duplicates, minlength=len(first_rows)).astype(np.int64)
    deduplicated = self.select(first_rows)
    return dataclasses.replace(deduplicated, num_duplicates=counts[keys[first_rows]])

  def summary(self) -> dict[str, Any]:
    """Counts for people: rows, distinct problems, rows and problems per data source, files."""
    per_source = {}
    keys = self.problem_keys()
    for source_index, name in enumerate(self.data_sources):
      selected = self.data_source_id == source_index
      if selected.any():
        per_source[name] = {"rows": int(self.num_duplicates[selected].sum()),
                            "problems": int(len(np.unique(keys[selected])))}
    return {
        "files": list(self.sources),
        "rows": int(self.num_duplicates.sum()),
        "problems": self.num_problems,
        "data_sources": per_source,
    }


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


def concatenate_rows(parts: Sequence[MathRows]) -> MathRows:
  """The rows of `parts`, one after the other, with merged tables of distinct values."""
  if len(parts) == 1:
    return parts[0]
  sources, source_num_rows = [], []
  prompts, ground_truths, data_sources = _Interner(), _Interner(), _Interner()
  fields: dict[str, list[np.ndarray]] = {name: [] for name in (
      "source_id", "source_row", "prompt_id", "ground_truth_id", "data_source_id", "num_duplicates")}
  for part in parts:
    fields["source_id"].append(np.asarray(part.source_id, np.int32) + len(sources))
    sources.extend(part.sources)
    source_num_rows.extend(part.source_num_rows)
    fields["source_row"].append(part.source_row)
    fields["num_duplicates"].append(part.num_duplicates)
    for name, interner, values in (("prompt_id", prompts, part.prompts),
                                   ("ground_truth_id", ground_truths, part.ground_truths),
                                   ("data_source_id", data_sources, part.data_sources)):
      remap = np.array([interner.id_of(value) for value in values], np.int32)
      fields[name].append(remap[getattr(part, name)] if len(values) else np.zeros(0, np.int32))
  return MathRows(
      sources=tuple(sources), source_num_rows=tuple(source_num_rows), prompts=tuple(prompts.values),
      ground_truths=tuple(ground_truths.values), data_sources=tuple(data_sources.values),
      **{name: np.concatenate(arrays) for name, arrays in fields.items()})


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


class _Interner:
  """Distinct values in first-seen order, each with its id."""

  def __init__(self):
    self.values: list[Any] = []
    self._ids: dict[Any, int] = {}

  def id_of(self, value: Any) -> int:
    value_id = self._ids.get(value)
    if value_id is None:
      value_id = self._ids[value] = len(self.values)
      self.values.append(value)
    return value_id

  def __len__(self) -> int:
    return len(self.values)


class _RowsBuilder:
  """Checks record batches of one source and collects their rows as ids into tables of distinct values."""

  def __init__(self, source: str):
    self.source = source
    self.data_sources = _Interner()
    self.roles = _Interner()
    self.contents = _Interner()
    self.ground_truths = _Interner()
    self.prompts = _Interner()  # tuples of (role id, content id) pairs
    self.parts: dict[str, list[np.ndarray]] = {
        "data_source_id": [], "prompt_id": [], "ground_truth_id": [], "source_row": []}
    # (column, problem) -> the rows of the file that have it, per batch; reported once every batch is seen.
    self.bad_rows: dict[tuple[str, str], list[np.ndarray]] = {}

  def _string_ids(self, array: pa.Array, interner: _Interner) -> tuple[np.ndarray, np.ndarray]:
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


# ----------------------------------------------------------------------------------------------------------------
# Prompts -> token ids
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptOptions:
  """How prompts become token ids (config keys `data.*`, DAPO_SPEC.md 7 and 11).

  Attributes:
    max_prompt_length: the most prompt tokens (`data.max_prompt_length`; DAPO: 2048).
    truncation: what a longer prompt gets (`data.truncation`): "left" keeps its last `max_prompt_length` tokens
      (DAPO), "error" raises naming the row.
    filter_overlong_prompts: drop longer prompts before anything else (`data.filter_overlong_prompts`); how many
      and which rows is logged and kept in `PromptSet.dropped_rows`.
    use_chat_template: render the messages with the tokenizer's chat template and its generation prompt. When it
      is off, or the tokenizer has no chat template, `plain_format` renders them instead.
    plain_format: the plain rendering of one message, a format string with `{role}` and `{content}` fields; the
      messages' renderings are concatenated. The tokenizer's bos token, if it has one, goes in front (as
      transformers' `tokenizer(text)` adds it).
  """

  max_prompt_length: int = 2048
  truncation: str = "left"
  filter_overlong_prompts: bool = False
  use_chat_template: bool = True
  plain_format: str = "{content}"

  def __post_init__(self):
    if self.truncation not in TRUNCATION_MODES:
      raise ValueError(f"data.truncation should be one of {TRUNCATION_MODES}; got {self.truncation!r}")
    if isinstance(self.max_prompt_length, bool) or not isinstance(self.max_prompt_length, int) or (
        self.max_prompt_length < 1):
      raise ValueError(f"data.max_prompt_length should be a positive integer; got {self.max_prompt_length!r}")


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: tokenizer_lib.Tokenizer,
                  options: PromptOptions) -> str:
  """The text the model sees before its response: chat template + generation prompt, or the plain rendering."""
  if options.use_chat_template and tokenizer.chat_template is not None:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  return "".join(options.plain_format.format(role=message["role"], content=message["content"])
                 for message in messages)


def prompt_token_ids(messages: Sequence[Mapping[str, str]], tokenizer: tokenizer_lib.Tokenizer,
                     options: PromptOptions) -> list[int]:
  """The untruncated token ids of a prompt, rendered as `render_prompt` renders it."""
  text = render_prompt(messages, tokenizer, options)
  ids = tokenizer.encode(text, add_special_tokens=False)
  # A chat template writes its own bos token (as text); the plain rendering gets the tokenizer's, if any.
  uses_template = options.use_chat_template and tokenizer.chat_template is not None
  if not uses_template and tokenizer.bos_id is not None:
    ids = [tokenizer.bos_id] + ids
  return ids


# eq=False: examples compare by identity, since their token ids are arrays (== on them is elementwise).
@dataclasses.dataclass(frozen=True, eq=False)
class PromptExample:
  """One prompt as the rollout and the reward need it.

  Attributes:
    prompt_ids: the prompt's token ids (int32, read-only; shared by the rows with the same prompt), at most
      `max_prompt_length` long.
    prompt_text: the prompt as stored (its message contents; the chat template is not applied).
    ground_truth: the reference answer for the reward.
    data_source: the row's data source (selects the reward function and names validation metrics).
    row_index: the row's position in the files as read (all files in order, before filtering or deduplication).
    location: "FILE, row N", for messages.
    num_duplicates: how many rows of the files this example stands for (1 unless deduplicated).
    num_truncated_tokens: how many tokens left truncation removed from the front of the prompt.
    draw_index: the example's position in its epoch's draw order, counted over all processes (the group id of
      DAPO_SPEC.md 4); -1 outside `epoch_batches`.
  """

  prompt_ids: np.ndarray
  prompt_text: str
  ground_truth: str
  data_source: str
  row_index: int
  location: str
  num_duplicates: int = 1
  num_truncated_tokens: int = 0
  draw_index: int = -1


class PromptSet(Sequence[PromptExample]):
  """Checked rows with tokenized prompts: a random-access sequence of `PromptExample`s (a grain data source).

  Each distinct prompt is rendered and tokenized once, when the set is built, so over-long prompts are found
  (and dropped, or reported) before training starts rather than in the middle of an epoch.

  Attributes:
    rows: the rows kept, in file order.
    options: the prompt options used.
    dropped_rows: the locations of the rows dropped as over-long (`filter_overlong_prompts`).
    num_truncated_rows: how many kept rows were left-truncated.
  """

  def __init__(self, rows: MathRows, tokenizer: tokenizer_lib.Tokenizer, options: PromptOptions):
    self.options = options
    self.tokenizer_source = tokenizer.source
    self._row_index = rows.row_positions()

    used_prompts = np.unique(rows.prompt_id)
    token_ids: dict[int, np.ndarray] = {}
    for prompt in used_prompts.tolist():
      messages = [{"role": role, "content": content} for role, content in rows.prompts[prompt]]
      token_ids[prompt] = np.asarray(prompt_token_ids(messages, tokenizer, options), np.int32)
    lengths = np.zeros(len(rows.prompts), np.int64)
    for prompt, ids in token_ids.items():
      lengths[prompt] = len(ids)
    overlong_rows = np.flatnonzero(lengths[rows.prompt_id] > options.max_prompt_length)

    self.dropped_rows: tuple[str, ...] = ()
    if len(overlong_rows) and options.filter_overlong_prompts:
      self.dropped_rows = tuple(rows.location(row) for row in overlong_rows.tolist())
      logging.warning(
          "data.filter_overlong_prompts: dropped %d of %d rows whose prompt is longer than max_prompt_length=%d "
          "tokens: %s", len(overlong_rows), len(rows), options.max_prompt_length,
          _list_locations(self.dropped_rows))
      kept = np.ones(len(rows), bool)
      kept[overlong_rows] = False
      rows = rows.select(np.flatnonzero(kept))
      self._row_index = self._row_index[kept]
      overlong_rows = overlong_rows[:0]
    elif len(overlong_rows) and options.truncation == "error":
      first = int(overlong_rows[0])
      more = f" ({len(overlong_rows) - 1} more rows are too long as well)" if len(overlong_rows) > 1 else ""
      raise ValueError(
          f"{rows.location(first)}: the prompt is {lengths[rows.prompt_id[first]]} tokens long, more than "
          f"data.max_prompt_length={options.max_prompt_length}{more}. Set data.truncation='left' to keep the last "
          f"{options.max_prompt_length} tokens, data.filter_overlong_prompts=True to drop such rows, or raise "
          "data.max_prompt_length.")
    elif len(overlong_rows):
      logging.info("Left-truncated %d of %d prompts to max_prompt_length=%d tokens: %s", len(overlong_rows),
                   len(rows), options.max_prompt_length,
                   _list_locations([rows.location(row) for row in overlong_rows[:_LISTED_LOCATIONS + 1].tolist()],
                                   total=len(overlong_rows)))

    # Left truncation keeps the end of the prompt, where the question and the generation prompt are.
    self._prompt_ids: dict[int, np.ndarray] = {}
    self._num_truncated: dict[int, int] = {}
    for prompt, ids in token_ids.items():
      kept_ids = ids[-options.max_prompt_length:].copy()
      kept_ids.flags.writeable = False
      self._prompt_ids[prompt] = kept_ids
      self._num_truncated[prompt] = len(ids) - len(kept_ids)
    self.rows = rows
    self.num_truncated_rows = len(overlong_rows)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index):  # grain passes ints; Sequence also allows slices.
    if isinstance(index, slice):
      return [self[position] for position in range(*index.indices(len(self)))]
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} is out of range for {len(self)} prompts")
    index %= len(self)
    rows = self.rows
    prompt = int(rows.prompt_id[index])
    return PromptExample(
        prompt_ids=self._prompt_ids[prompt],
        prompt_text=rows.prompt_text(index),
        ground_truth=rows.ground_truth(index),
        data_source=rows.data_source(index),
        row_index=int(self._row_index[index]),
        location=rows.location(index),
        num_duplicates=int(rows.num_duplicates[index]),
        num_truncated_tokens=self._num_truncated[prompt],
    )

  def __repr__(self) -> str:
    return (f"PromptSet({len(self)} prompts from {', '.join(self.rows.sources)}, "
            f"max_prompt_length={self.options.max_prompt_length}, truncation={self.options.truncation!r}, "
            f"dropped={len(self.dropped_rows)}, truncated={self.num_truncated_rows})")


def _list_locations(locations: Sequence[str], total: int | None = None) -> str:
  total = len(locations) if total is None else total
  listed = "; ".join(locations[:_LISTED_LOCATIONS])
  return listed + (f"; and {total - _LISTED_LOCATIONS} more" if total > _LISTED_LOCATIONS else "")


def training_prompts(
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | MathRows,
    tokenizer: tokenizer_lib.Tokenizer,
    options: PromptOptions = PromptOptions(),
) -> PromptSet:
  """Every row of the training files (`data.train_files`), tokenized; files or already-read rows."""
  rows = files if isinstance(files, MathRows) else read_math_files(files)
  return PromptSet(rows, tokenizer, options)


def validation_prompts(
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | MathRows,
    tokenizer: tokenizer_lib.Tokenizer,
    options: PromptOptions = PromptOptions(),
) -> PromptSet:
  """The validation files (`data.val_files`) with duplicate rows merged, in file order (DAPO_SPEC.md 8).

  Rows with the same data_source, prompt and ground truth become one example whose `num_duplicates` says how many
  rows it stands for; the evaluator draws k samples per example (AIME-2024: 30 problems, k = 32 gives avg@32).
  """
  rows = files if isinstance(files, MathRows) else read_math_files(files)
  return PromptSet(rows.deduplicated(), tokenizer, options)


# ----------------------------------------------------------------------------------------------------------------
# grain pipeline
# ----------------------------------------------------------------------------------------------------------------


def epoch_batches(
    prompts: Sequence[PromptExample],
    *,
    batch_size: int,
    seed: int | None,
    shard_by_process: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
  """One epoch of prompt batches: a grain MapDataset whose elements are lists of `PromptExample`s.

  The prompts are shuffled with `seed` (None keeps file order), cut to a whole number of global batches (the last
  incomplete batch is dropped, DAPO_SPEC.md 7), numbered in draw order (`PromptExample.draw_index`), and, with
  `shard_by_process`, dealt out to the processes of a multi-host run: process p takes draws p, p + P, p + 2P, ...
  so that its i-th batch holds its share of global batch i, and every process has the same number of batches.

  Args:
    prompts: a `PromptSet` (or any sequence of `PromptExample`s).
    batch_size: prompts per global batch (`data.gen_batch_size` for rollouts); with sharding, each process gets
      batch_size / process_count of them.
    seed: the shuffle seed; None for no shuffle.
    shard_by_process: split the batches between JAX processes.
    process_index, process_count: the process and how many there are; default `jax.process_index()` and
      `jax.process_count()`.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size should be a positive integer; got {batch_size!r}")
  if shard_by_process:
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top  (only sharded pipelines need JAX)
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
  else:
    process_index, process_count = 0, 1
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise ValueError(
        f"The batch size {batch_size} is not divisible by the {process_count} processes that share it; pick a "
        "multiple of the process count")

  dataset = grain.MapDataset.source(prompts)
  if seed is not None:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset[:len(dataset) // batch_size * batch_size]
  dataset = dataset.map_with_index(_with_draw_index)
  if process_count > 1:
    dataset = dataset[process_index::process_count]
  return dataset.batch(batch_size // process_count, drop_remainder=True, batch_fn=list)


def _with_draw_index(draw_index: int, example: PromptExample) -> PromptExample:
  return dataclasses.replace(example, draw_index=draw_index)


def batch_iterator(batches: grain.MapDataset) -> grain.DatasetIterator:
  """An iterator over `batches` whose position is saved by `get_state()` (a small dict, e.g. {"next_index": 3})
  and restored by `set_state(state)` on an iterator of the same pipeline (same files, options, seed, batch size,
  processes). Elements are read in the calling thread: they are cheap lookups, and threads would compete with the
  sampler for the host's cores."""
  return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
