"""The old-log-prob pass in micro-batches of its own budget gives every update micro-batch the log-probs of its
rows, on one device and on a mesh of the 8 fake CPU devices, whatever the budget."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from dapo_jax import batch_placement
from dapo_jax import old_log_probs
from dapo_jax import sharding
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rl import batching
from dapo_jax.rl import step

CONFIG = get_preset("tiny").replace(vocab_size=64)
ROW = 16  # the rows' width: the bucket of the longest trajectory (5 + 11 tokens)


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(0)
  count = 13
  prompts = [rng.integers(1, 64, rng.integers(1, 6)).tolist() for _ in range(count)]
  responses = [rng.integers(1, 64, rng.integers(1, 12)).tolist() for _ in range(count)]
  for i in (0, 8):  # a trajectory of 16 tokens in each mini-batch: the rows are 16 wide
    prompts[i], responses[i] = prompts[i][:1] + [1] * 4, responses[i][:1] + [1] * 10

  def mini_batches():  # two mini-batches (8 and 5 trajectories), micro-batches of 2 rows
    return batching.training_batches(prompts, responses, [np.zeros(len(r), np.float32) for r in responses],
                                     rng.standard_normal(count).astype(np.float32), np.zeros(count, bool),
                                     rows_per_update=8, micro_batch_tokens=2 * ROW, pad_id=0, max_prompt_width=5,
                                     max_response_width=11)

  params = jax.device_get(qwen2.Qwen2(CONFIG, rngs=nnx.Rngs(0)).params)
  updater = step.Updater(optimizer=step.make_optimizer(learning_rate=1e-3), model_config=CONFIG,
                         loss_config=step.LossConfig(temperature=0.9))
  on_one = jax.device_put(params, jax.devices()[0])
  expected = [[np.asarray(updater.old_log_probs(on_one, mb)) for mb in micro_batches]
              for micro_batches in mini_batches()]
  return mini_batches, params, expected


@pytest.mark.parametrize("rows_per_call", [1, 2, 3, 100])
def test_each_micro_batch_gets_the_log_probs_of_its_rows_on_one_device(case, rows_per_call):
  mini_batches, params, expected = case
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  updater = step.Updater(optimizer=step.make_optimizer(learning_rate=1e-3), model_config=CONFIG,
                         loss_config=step.LossConfig(temperature=0.9))
  calls = []

  def log_probs(batch):
    calls.append(batch["input_ids"].shape)
    return updater.old_log_probs(jax.device_put(params, jax.devices()[0]), batch)

  batches = mini_batches()
  old_log_probs.add_old_log_probs(batches, log_probs, micro_batch_tokens=rows_per_call * ROW + ROW - 1, mesh=mesh)
  assert [mb["input_ids"].shape[1] for mbs in batches for mb in mbs] == [ROW] * sum(map(len, batches))
  rows = [sum(len(mb["input_ids"]) for mb in mbs) for mbs in batches]
  assert calls == [(min(rows_per_call, count - first), ROW) for count in rows
                   for first in range(0, count, rows_per_call)]
  for mbs, want in zip(batches, expected):
    for mb, reference in zip(mbs, want):
      assert mb["old_logp"].dtype == np.float32
      np.testing.assert_allclose(mb["old_logp"], reference, rtol=1e-5, atol=1e-6)


def test_on_a_mesh_the_rows_come_back_in_order(case):
  mini_batches, params, expected = case
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = qwen2.abstract_model(CONFIG)
  sharded = jax.device_put(params, sharding.param_shardings(abstract, mesh))
  updater = step.Updater(optimizer=step.make_optimizer(learning_rate=1e-3), model_config=CONFIG,
                         loss_config=step.LossConfig(temperature=0.9), params_shardings=step.mesh_shardings(sharded))
  batches = mini_batches()
  # 3 rows a call: each call's rows padded to 4 for the 4 data-parallel shards.
  old_log_probs.add_old_log_probs(batches, functools.partial(updater.old_log_probs, sharded),
                                  micro_batch_tokens=3 * ROW, mesh=mesh)
  for mbs, want in zip(batches, expected):
    for mb, reference in zip(mbs, want):
      np.testing.assert_allclose(mb["old_logp"], reference, rtol=1e-5, atol=1e-6)
  placed = batch_placement.put_micro_batches(batches[0], mesh)
  np.testing.assert_array_equal(batch_placement.process_rows(placed[0]["old_logp"])[:2], batches[0][0]["old_logp"])
