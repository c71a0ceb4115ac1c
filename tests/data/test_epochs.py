"""Tests for dapo_jax.data.epochs: the grain pipeline (seeded shuffle, drop remainder, draw order, sharding,
checkpointable iterator), docs/algorithm.md 7."""

import json

import pytest

from dapo_jax.data import epochs
from dapo_jax.data import prompts as prompts_lib
from tests.data.math_fixtures import numbered_rows, write_rows

# ----------------------------------------------------------------------------------------------------------------
# The grain pipeline
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ten_prompts(tmp_path, char_tokenizer):
  return prompts_lib.training_prompts(write_rows(tmp_path / "ten.parquet", numbered_rows(10)), char_tokenizer)


def batch_rows(batch):
  return [example.row_index for example in batch]


def test_shuffle_is_seeded_and_drops_the_last_incomplete_batch(ten_prompts):
  batches = list(epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=4, seed=0)))
  again = list(epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=4, seed=0)))
  other_seed = list(epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=4, seed=1)))
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
  batches = list(epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=3, seed=None)))
  assert [batch_rows(batch) for batch in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_iterator_state_resumes_exactly(ten_prompts):
  dataset = epochs.epoch_batches(ten_prompts, batch_size=2, seed=3)
  uninterrupted = [batch_rows(batch) for batch in epochs.batch_iterator(dataset)]
  assert len(uninterrupted) == 5

  iterator = epochs.batch_iterator(dataset)
  first_two = [batch_rows(next(iterator)) for _ in range(2)]
  state = iterator.get_state()
  json.dumps(state)  # a checkpoint stores it as JSON
  # A fresh pipeline, built the same way, picks up where the first stopped.
  resumed = epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=2, seed=3))
  resumed.set_state(state)
  assert first_two + [batch_rows(batch) for batch in resumed] == uninterrupted
  # One epoch: the restored iterator is exhausted too.
  with pytest.raises(StopIteration):
    next(resumed)


def test_sharding_by_process_splits_each_global_batch(ten_prompts):
  unsharded = [batch_rows(batch) for batch in epochs.batch_iterator(
      epochs.epoch_batches(ten_prompts, batch_size=4, seed=5, shard_by_process=False))]
  shards = [[batch for batch in epochs.batch_iterator(epochs.epoch_batches(
      ten_prompts, batch_size=4, seed=5, process_index=index, process_count=2))] for index in range(2)]
  assert [len(shard) for shard in shards] == [2, 2]
  for batch_index, global_batch in enumerate(unsharded):
    local = [shards[index][batch_index] for index in range(2)]
    assert all(len(batch) == 2 for batch in local)
    assert sorted(batch_rows(local[0]) + batch_rows(local[1])) == sorted(global_batch)
    # Draw positions are global: process p holds draws p, p + 2, ...
    assert [example.draw_index for example in local[1]] == [4 * batch_index + 1, 4 * batch_index + 3]
  # A single-process run shards trivially (jax.process_count() is 1 here).
  default = [batch_rows(batch) for batch in epochs.batch_iterator(
      epochs.epoch_batches(ten_prompts, batch_size=4, seed=5))]
  assert default == unsharded


def test_pipeline_arguments_are_checked(ten_prompts):
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    epochs.epoch_batches(ten_prompts, batch_size=4, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index 2"):
    epochs.epoch_batches(ten_prompts, batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    epochs.epoch_batches(ten_prompts, batch_size=0, seed=0)
  # Fewer prompts than one batch: an empty epoch, not an error.
  assert len(epochs.epoch_batches(ten_prompts, batch_size=11, seed=0)) == 0


def test_each_epoch_reshuffles_and_a_resume_in_the_second_epoch_is_exact(ten_prompts):
  one = [batch_rows(b) for b in epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=4, seed=0))]
  iterator = epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=4, seed=0, num_epochs=2))
  batches = list(iterator)
  rows = [batch_rows(b) for b in batches]
  # Two epochs of two batches: the first is the one-epoch run's, the second another draw of 8 of the 10.
  assert len(rows) == 4 and rows[:2] == one
  second = rows[2] + rows[3]
  assert len(set(second)) == 8 and second != rows[0] + rows[1]
  assert [example.draw_index for batch in batches for example in batch] == list(range(16))

  # Stopped after the first batch of the second epoch, a new iterator resumes where it left off.
  interrupted = epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=4, seed=0, num_epochs=2))
  for _ in range(3):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = epochs.batch_iterator(epochs.epoch_batches(ten_prompts, batch_size=4, seed=0, num_epochs=2))
  resumed.set_state(state)
  assert [batch_rows(b) for b in resumed] == rows[3:]
