"""Checked rows -> tokenized prompts: the chat template, and left truncation, an error or a filter for prompts
longer than data.max_prompt_length (docs/algorithm.md 7, 8).

`training_prompts(config.data.train_files, tokenizer, options)` tokenizes every row; `validation_prompts(
config.data.val_files, tokenizer, options)` merges rows with the same data_source, prompt and ground truth (AIME's
960 rows are 30 problems x 32) so that the evaluator draws k samples per unique problem. Each distinct prompt is
rendered and tokenized once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import logging
import os

import numpy as np

from dapo_jax.data.math_parquet import read_math_files
from dapo_jax.data.math_rows import MathRows
from dapo_jax.model import tokenizer as tokenizer_lib

TRUNCATION_MODES = ("left", "error")

# How many row locations a log line or error message lists before it says "and N more".
_LISTED_LOCATIONS = 20


@dataclasses.dataclass(frozen=True)
class PromptOptions:
  """How prompts become token ids (config keys `data.*`, docs/algorithm.md 7 and 11).

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
      docs/algorithm.md 4); -1 outside `epoch_batches`.
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
  """The validation files (`data.val_files`) with duplicate rows merged, in file order (docs/algorithm.md 8).

  Rows with the same data_source, prompt and ground truth become one example whose `num_duplicates` says how many
  rows it stands for; the evaluator draws k samples per example (AIME-2024: 30 problems, k = 32 gives avg@32).
  """
  rows = files if isinstance(files, MathRows) else read_math_files(files)
  return PromptSet(rows.deduplicated(), tokenizer, options)
