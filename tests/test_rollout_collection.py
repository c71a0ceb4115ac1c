"""The rollout collector's state between rollout steps, as checkpoints hold it: each process's entry, and the
scored groups dynamic sampling carries over to the next step."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import config as config_lib
from dapo_jax import rollout_collection
from dapo_jax import scoring
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.model.config import get_preset
from dapo_jax.rl import filtering
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.responses import Response


def test_loop_state_of_this_process():
  state = {"data_iterator": {"next_index": 3}, "dynamic_sampling": {"version": 1}}
  own = rollout_collection.own_loop_state
  assert own({"rollout_step": 2, "processes": [state], "validation_due": False}) == state
  assert own({"rollout_step": 2, **state}) == state  # a single-process checkpoint's layout
  with pytest.raises(ValueError, match="saved by 2 processes and this run has 1"):
    rollout_collection.own_loop_state({"rollout_step": 2, "processes": [state, state]})


def _scored_group(group_id: int, accs) -> scoring.ScoredGroup:
  example = prompts_lib.PromptExample(prompt_ids=np.array([5, 6, 7], np.int32), prompt_text="What is 2+3*4?",
                                      ground_truth="14", data_source="synthetic_arith", row_index=np.int64(9),
                                      location="train.parquet, row 9", draw_index=group_id)
  responses = [Response(prompt_index=group_id, sample_index=i, token_ids=np.array([1, 2 + i], np.int32),
                        logp_sampled=np.array([-0.1, -1 / 3], np.float32),
                        logp_full=np.array([-0.2, -2 / 7], np.float32), finish_reason="eos")
               for i in range(len(accs))]
  accs = np.asarray(accs, np.float32)
  return scoring.ScoredGroup(group_id=group_id, example=example, responses=responses, texts=["a", "bb"],
                             scores=2 * accs - 1, rewards=2 * accs - 1.125, accs=accs, predictions=["1", None],
                             num_timeouts=1)


def test_carried_over_groups_survive_a_checkpoint_exactly():
  sampler = filtering.DynamicSampler(train_batch_size=1, n=2, gen_batch_size=3, carry_over=True)
  ids = sampler.open_gen_batch()
  groups = {i: _scored_group(i, [1.0, 0.0]) for i in ids}
  for i in ids:
    sampler.add_group(i, groups[i].filter_values(), groups[i])
  sampler.take_batch()  # keeps group 0; groups 1 and 2 are carried over
  state = json.loads(json.dumps(sampler.state_dict(scoring.ScoredGroup.to_json)))  # what the checkpoint's JSON holds

  restored = filtering.DynamicSampler(train_batch_size=1, n=2, gen_batch_size=3, carry_over=True)
  restored.load_state_dict(state, decode_payload=scoring.ScoredGroup.from_json)
  carried = restored.take_batch().payloads + restored.take_batch().payloads
  assert [g.example.draw_index for g in carried] == [1, 2]
  for got, expected in zip(carried, (groups[1], groups[2])):
    assert got.example.prompt_text == expected.example.prompt_text
    np.testing.assert_array_equal(got.example.prompt_ids, expected.example.prompt_ids)
    for key in ("scores", "rewards", "accs", "lengths"):
      assert getattr(got, key).dtype == getattr(expected, key).dtype
      np.testing.assert_array_equal(getattr(got, key), getattr(expected, key))
    assert (got.group_id, got.texts, got.predictions, got.num_timeouts) == (
        expected.group_id, expected.texts, expected.predictions, expected.num_timeouts)
    for a, b in zip(got.responses, expected.responses):
      assert (a.prompt_index, a.sample_index, a.finish_reason) == (b.prompt_index, b.sample_index, b.finish_reason)
      for key in ("token_ids", "logp_sampled", "logp_full"):
        assert getattr(a, key).dtype == getattr(b, key).dtype
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_a_rollout_whose_kv_pool_cannot_hold_one_response_is_refused_at_start():
  config = get_preset("tiny", dtype=jnp.float32)
  sampler = sampler_lib.GroupSampler(config, num_slots=4, max_prompt_length=16, max_response_length=48,
                                     num_pages=16)
  rollout_collection.check_rollout_memory(sampler)  # 16 pages: four full-length responses
  assert sampler.decode_state_bytes() >= 2 * config.num_layers * 16 * 16 * config.num_kv_heads * config.head_dim * 4
  sampler = sampler_lib.GroupSampler(config, num_slots=4, max_prompt_length=16, max_response_length=48,
                                     num_pages=3)
  with pytest.raises(config_lib.ConfigError, match=r"64 tokens \(4 pages\).*rollout\.num_pages to at least 4"):
    rollout_collection.check_rollout_memory(sampler)
