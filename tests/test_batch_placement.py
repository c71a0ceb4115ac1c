"""Batches placed on a mesh: padding rows that change nothing, and rows sharded over the data-parallel axes."""
import numpy as np
import pytest

from dapo_jax import batch_placement
from dapo_jax import sharding
from dapo_jax.rl import step


def _micro_batch(rows, prompt_width, response_width, seed=0):
  rng = np.random.default_rng(seed)
  response_mask = (np.arange(response_width)[None] < rng.integers(1, response_width + 1, (rows, 1))).astype(np.int32)
  prompt_mask = (np.arange(prompt_width)[None] >= prompt_width - rng.integers(1, prompt_width + 1, (rows, 1)))
  return {"prompt_ids": rng.integers(1, 50, (rows, prompt_width)).astype(np.int32),
          "prompt_mask": prompt_mask.astype(np.int32),
          "response_ids": rng.integers(1, 50, (rows, response_width)).astype(np.int32),
          "response_mask": response_mask, "advantages": rng.normal(size=rows).astype(np.float32),
          "old_logp": -rng.random((rows, response_width)).astype(np.float32)}


def test_put_micro_batches_pads_rows_with_masked_copies_and_shards_them():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = _micro_batch(5, 3, 4)
  (placed,) = batch_placement.put_micro_batches([batch], mesh)
  assert sharding.data_parallel_size(mesh) == 4
  for key, value in placed.items():
    assert value.shape == (8,) + batch[key].shape[1:]
    assert value.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(value)[:5], batch[key])
    np.testing.assert_array_equal(np.asarray(value)[5:], np.repeat(batch[key][:1], 3, axis=0)
                                  if key != "response_mask" else 0)
  # Counts are those of the real rows.
  totals = step.mini_batch_totals([placed])
  assert float(totals["num_tokens"]) == batch["response_mask"].sum()
  assert float(totals["num_seqs"]) == 5


def test_put_micro_batches_keeps_each_shape_and_rows_that_already_divide():
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  small, large = _micro_batch(8, 3, 4, seed=1), _micro_batch(2, 6, 2, seed=2)
  placed = batch_placement.put_micro_batches([small, large], mesh)
  assert [p["prompt_ids"].shape for p in placed] == [(8, 3), (8, 6)]
  assert [p["response_mask"].shape for p in placed] == [(8, 4), (8, 2)]
  np.testing.assert_array_equal(np.asarray(placed[0]["old_logp"]), small["old_logp"])


def test_padding_widths_leaves_the_model_input_unchanged():
  # Across processes, micro-batches are widened to the widest one: prompts on the left, responses on the right.
  batch = _micro_batch(3, 3, 4)
  wide = batch_placement._pad_to(batch, 4, 6, 7)
  np.testing.assert_array_equal(wide["prompt_ids"][:3, 3:], batch["prompt_ids"])
  np.testing.assert_array_equal(wide["prompt_mask"][:, :3], 0)
  np.testing.assert_array_equal(wide["response_ids"][:3, :4], batch["response_ids"])
  np.testing.assert_array_equal(wide["response_mask"][:, 4:], 0)
  np.testing.assert_array_equal(wide["old_logp"][:3, :4], batch["old_logp"])
  assert wide["response_mask"][3].sum() == 0 and wide["prompt_mask"][3].sum() == batch["prompt_mask"][0].sum()
  with pytest.raises(ValueError, match="wider"):
    batch_placement._pad_to(batch, 4, 2, 7)
  with pytest.raises(ValueError, match="no response_mask"):
    batch_placement._pad_to({"prompt_ids": batch["prompt_ids"]}, 4, 6, 7)


def test_packed_micro_batches_grow_on_the_right_with_padding_segments():
  from tests import batch_fixtures
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = batch_fixtures.random_packed_micro_batch(np.random.default_rng(3), 5, 12, 50)
  (placed,) = batch_placement.put_micro_batches([batch], mesh)
  assert placed["input_ids"].shape == (8, 12) and placed["input_ids"].sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(placed["segment_ids"])[:5], batch["segment_ids"])
  assert np.asarray(placed["response_mask"])[5:].sum() == 0
  wide = batch_placement._pad_to(batch, 5, 0, 16)
  np.testing.assert_array_equal(wide["segment_ids"][:, 12:], 0)
  np.testing.assert_array_equal(wide["input_ids"][:, :12], batch["input_ids"])
  totals = step.mini_batch_totals([placed])
  assert float(totals["num_seqs"]) == batch["segment_ids"].max(axis=1).sum()
