"""`MathRows`: checked rows of DAPO-Math files, in file order, stored as ids into tables of distinct values.

`math_parquet` reads files into them; `prompts` tokenizes them.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import numpy as np


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
    sets is scored under each set's name (docs/algorithm.md 8)."""
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


def concatenate_rows(parts: Sequence[MathRows]) -> MathRows:
  """The rows of `parts`, one after the other, with merged tables of distinct values."""
  if len(parts) == 1:
    return parts[0]
  sources, source_num_rows = [], []
  prompts, ground_truths, data_sources = Interner(), Interner(), Interner()
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


class Interner:
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
