"""Tokenized prompts -> epochs of prompt batches: a grain pipeline with a checkpointable iterator (docs/algorithm.md 7).

  batches = epoch_batches(prompts, batch_size=..., seed=...)       # grain: shuffle, shard, drop remainder
  iterator = batch_iterator(batches)                               # checkpointable: get_state() / set_state()
  for batch in iterator: ...                                       # batch: list[PromptExample]
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import grain

from dapo_jax.data.prompts import PromptExample


def epoch_batches(
    prompts: Sequence[PromptExample],
    *,
    batch_size: int,
    seed: int | None,
    num_epochs: int = 1,
    shard_by_process: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
  """`num_epochs` passes over the prompts, in batches: a grain MapDataset whose elements are lists of
  `PromptExample`s (verl's `trainer.total_epochs`).

  Each epoch shuffles the prompts anew (from `seed` and the epoch's number; None keeps file order in every
  epoch) and is cut to a whole number of global batches (its last incomplete batch is dropped, docs/algorithm.md
  7). The batches of all epochs are numbered in draw order (`PromptExample.draw_index`) and, with
  `shard_by_process`, dealt out to the processes of a multi-host run: process p takes draws p, p + P, p + 2P, ...
  so that its i-th batch holds its share of global batch i, and every process has the same number of batches.

  Args:
    prompts: a `PromptSet` (or any sequence of `PromptExample`s).
    batch_size: prompts per global batch (`data.gen_batch_size` for rollouts); with sharding, each process gets
      batch_size / process_count of them.
    seed: the shuffle seed; None for no shuffle.
    num_epochs: passes over the prompts.
    shard_by_process: split the batches between JAX processes.
    process_index, process_count: the process and how many there are; default `jax.process_index()` and
      `jax.process_count()`.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size should be a positive integer; got {batch_size!r}")
  if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1:
    raise ValueError(f"num_epochs should be a positive integer; got {num_epochs!r}")
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
  # Each epoch after the first reshuffles: grain reseeds the shuffle above per epoch.
  dataset = dataset.repeat(num_epochs)
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
