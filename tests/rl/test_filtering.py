"""Tests for dapo_jax.rl.filtering: the DAPO keep rule and the streaming dynamic sampler (docs/algorithm.md 4)."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_jax.rl.filtering import DynamicSampler, DynamicSamplingExhausted, filter_groups, keeps_group

# Per-response values of a group with disagreeing responses (kept) and with agreeing ones (dropped), n = 2.
MIXED = {"acc": [1.0, 0.0]}
ALL_RIGHT = {"acc": [1.0, 1.0]}
ALL_WRONG = {"acc": [0.0, 0.0]}


def test_keep_rule():
  # Spread > 0 kept; all equal dropped; a single response always kept.
  np.testing.assert_array_equal(filter_groups([[1, 1, 1], [0, 1, 0], [0, 0, 0], [5]]), [False, True, False, True])
  np.testing.assert_array_equal(filter_groups(np.array([[-1.0, -1.0], [-1.0, 1.0]])), [False, True])
  # np.std of three 0.1s is 1.4e-17 > 0; the values are equal all the same, so the group is dropped.
  assert not keeps_group([0.1, 0.1, 0.1])
  assert keeps_group([0.1, 0.1, 0.2])
  with pytest.raises(ValueError):
    keeps_group([])


def test_selection_is_by_prompt_order_not_completion_order():
  sampler = DynamicSampler(train_batch_size=2, n=2, gen_batch_size=4, max_num_gen_batches=3)
  assert sampler.needs_more_prompts()
  assert sampler.open_gen_batch() == [0, 1, 2, 3]
  assert not sampler.needs_more_prompts()  # 0 kept + 4 unfinished >= 2
  assert sampler.add_group(0, {"acc": [1, 0]}, payload="g0")
  # The last prompt finishes first and is kept: two kept groups, but groups 1 and 2, drawn earlier, still run.
  assert sampler.add_group(3, {"acc": [0, 1]}, payload="g3")
  assert not sampler.is_decided()
  assert sampler.add_group(2, {"acc": [1, 0]}, payload="g2")
  assert not sampler.is_decided()  # group 1 still decides whether group 2 or group 3 gets the last slot
  assert not sampler.add_group(1, {"acc": [1, 1]}, payload="g1")
  # Prompt order: 0 kept, 1 dropped, 2 kept -> full; group 3 finished first but comes after.
  assert sampler.is_decided()
  batch = sampler.take_batch()
  assert batch.group_ids == [0, 2]
  assert batch.payloads == ["g0", "g2"]
  assert batch.discarded_group_ids == []
  # raw acc over all 8 responses: (1 + 0 + 0 + 1 + 1 + 0 + 1 + 1) / 8 = 5 / 8.
  assert batch.metrics == {
      "train/num_gen_batches": 1.0, "train/kept_groups": 3.0, "train/dropped_groups": 1.0,
      "train/surplus_groups": 1.0, "train/carried_groups": 0.0, "train/unfinished_groups": 0.0,
      "train/raw_acc": 0.625}


def test_decided_before_later_groups_finish_discards_them():
  sampler = DynamicSampler(train_batch_size=2, n=2, gen_batch_size=6)
  sampler.open_gen_batch()
  assert sampler.wants_group(5)
  sampler.add_group(1, MIXED, payload="g1")
  # One kept group before id 4 so far: 4 could still make the batch.
  assert sampler.wants_group(4)
  sampler.add_group(0, MIXED, payload="g0")
  assert sampler.is_decided()
  # Two kept groups drawn before 2: groups 2.. cannot make the batch any more.
  assert not sampler.wants_group(2) and not sampler.wants_group(5)
  assert not sampler.needs_more_prompts()
  batch = sampler.take_batch()
  assert batch.group_ids == [0, 1]
  assert batch.discarded_group_ids == [2, 3, 4, 5]
  assert batch.metrics["train/unfinished_groups"] == 4.0
  # Discarded groups belong to the finished step; reporting one now is a bug in the loop.
  with pytest.raises(KeyError, match="not opened"):
    sampler.add_group(3, MIXED)
  # The next step's ids continue the draw.
  assert sampler.open_gen_batch(3) == [6, 7, 8]


def test_wants_group_is_false_after_enough_certain_kept_groups():
  sampler = DynamicSampler(train_batch_size=1, n=2, gen_batch_size=4)
  sampler.open_gen_batch()
  sampler.add_group(2, MIXED)
  # Group 2 is kept: group 3 is after it and cannot be selected; 0 and 1 still can.
  assert sampler.wants_group(0) and sampler.wants_group(1)
  assert not sampler.wants_group(3)
  assert not sampler.is_decided()


def test_max_num_gen_batches_error_names_the_config_keys():
  sampler = DynamicSampler(train_batch_size=2, n=2, gen_batch_size=2, max_num_gen_batches=2)
  sampler.open_gen_batch()
  sampler.add_group(0, ALL_RIGHT)
  sampler.add_group(1, ALL_WRONG)
  assert sampler.needs_more_prompts()
  assert sampler.open_gen_batch() == [2, 3]
  sampler.add_group(3, MIXED)
  # One kept group, one unfinished: the two could still fill the batch, so no new generation batch is needed.
  assert not sampler.needs_more_prompts()
  with pytest.raises(RuntimeError, match="may still fill the batch"):
    sampler.open_gen_batch()
  sampler.add_group(2, ALL_WRONG)
  assert sampler.needs_more_prompts()
  with pytest.raises(DynamicSamplingExhausted) as error:
    sampler.open_gen_batch()
  message = str(error.value)
  assert "kept 1 of the 2 groups" in message
  assert "after 2 generation batches" in message
  for key in ("algorithm.filter_groups.max_num_gen_batches", "data.gen_batch_size",
              "algorithm.filter_groups.enable"):
    assert key in message


def test_error_comes_as_soon_as_the_budget_cannot_fill_the_batch():
  # One generation batch allowed; the first of its two groups is dropped: even if the second is kept, 1 < 2.
  sampler = DynamicSampler(train_batch_size=2, n=2, gen_batch_size=2, max_num_gen_batches=1)
  sampler.open_gen_batch()
  assert not sampler.needs_more_prompts()
  sampler.add_group(0, ALL_WRONG)
  assert sampler.needs_more_prompts()
  with pytest.raises(DynamicSamplingExhausted, match="kept 0 of the 2 groups"):
    sampler.open_gen_batch()


def test_unlimited_generation_batches():
  sampler = DynamicSampler(train_batch_size=1, n=2, gen_batch_size=1, max_num_gen_batches=0)
  for group_id in range(20):
    assert sampler.open_gen_batch() == [group_id]
    sampler.add_group(group_id, ALL_WRONG)
  sampler.open_gen_batch()
  sampler.add_group(20, MIXED, payload="found")
  batch = sampler.take_batch()
  assert batch.group_ids == [20] and batch.payloads == ["found"]
  assert batch.metrics["train/num_gen_batches"] == 21.0
  assert batch.metrics["train/dropped_groups"] == 20.0


def test_batch_is_truncated_to_the_first_train_batch_size_groups():
  # 5 kept groups for a batch of 3 prompts x n=2: the batch is groups 0-2, i.e. the first 3 * 2 = 6 trajectories.
  sampler = DynamicSampler(train_batch_size=3, n=2, gen_batch_size=5)
  sampler.open_gen_batch()
  trajectories = {group_id: [f"t{group_id}a", f"t{group_id}b"] for group_id in range(5)}
  for group_id in (4, 2, 0, 3, 1):
    sampler.add_group(group_id, MIXED, payload=trajectories[group_id])
  batch = sampler.take_batch()
  assert batch.group_ids == [0, 1, 2]
  assert [t for group in batch.payloads for t in group] == ["t0a", "t0b", "t1a", "t1b", "t2a", "t2b"]
  assert batch.metrics["train/surplus_groups"] == 2.0


def test_disabled_filter_keeps_every_group_and_ignores_the_budget():
  sampler = DynamicSampler(train_batch_size=3, n=2, gen_batch_size=2, max_num_gen_batches=1, enabled=False)
  sampler.open_gen_batch()
  assert sampler.add_group(1, ALL_RIGHT)
  assert sampler.add_group(0, ALL_WRONG)
  assert sampler.needs_more_prompts()
  assert sampler.open_gen_batch() == [2, 3]  # the filter's budget does not apply
  # Every group is kept, so group 3 could only be the 4th: not wanted.
  assert sampler.wants_group(2) and not sampler.wants_group(3)
  assert not sampler.needs_more_prompts()
  sampler.add_group(2, ALL_WRONG)
  batch = sampler.take_batch()
  assert batch.group_ids == [0, 1, 2]
  assert batch.discarded_group_ids == [3]
  assert batch.metrics["train/kept_groups"] == 3.0 and batch.metrics["train/dropped_groups"] == 0.0


def test_single_response_groups_are_kept():
  sampler = DynamicSampler(train_batch_size=2, n=1, gen_batch_size=3)
  sampler.open_gen_batch()
  assert not sampler.wants_group(2)  # groups 0 and 1 will be kept whatever they score
  assert sampler.add_group(1, {"acc": [0.0]})
  assert sampler.add_group(0, {"acc": [1.0]})
  assert sampler.take_batch().group_ids == [0, 1]


def test_filter_metric_choice():
  # Same accuracy, different shaped rewards (one response is overlong-penalised): kept on "reward" only.
  values = {"acc": [0.0, 0.0], "score": [-1.0, -1.0], "reward": [-1.0, -1.25]}
  for metric, kept in (("acc", False), ("score", False), ("reward", True)):
    sampler = DynamicSampler(train_batch_size=1, n=2, gen_batch_size=1, metric=metric)
    sampler.open_gen_batch()
    assert sampler.add_group(0, values) == kept
  sampler = DynamicSampler(train_batch_size=1, n=2, gen_batch_size=1, metric="score")
  sampler.open_gen_batch()
  with pytest.raises(KeyError, match="'score'"):
    sampler.add_group(0, {"acc": [1.0, 0.0]})
  with pytest.raises(ValueError, match="metric"):
    DynamicSampler(train_batch_size=1, n=2, gen_batch_size=1, metric="seq_reward")


def test_add_group_rejects_bad_reports():
  sampler = DynamicSampler(train_batch_size=2, n=2, gen_batch_size=2)
  with pytest.raises(KeyError):
    sampler.add_group(0, MIXED)  # nothing opened
  sampler.open_gen_batch()
  with pytest.raises(ValueError, match="n=2"):
    sampler.add_group(0, {"acc": [1.0, 0.0, 1.0]})
  sampler.add_group(0, MIXED)
  with pytest.raises(ValueError, match="already reported"):
    sampler.add_group(0, MIXED)
  with pytest.raises(RuntimeError, match="not decided"):
    sampler.take_batch()


def test_carry_over_puts_surplus_groups_first_in_the_next_step():
  sampler = DynamicSampler(train_batch_size=2, n=2, gen_batch_size=5, carry_over=True)
  sampler.open_gen_batch()
  for group_id in (0, 1, 2, 3):
    sampler.add_group(group_id, MIXED, payload=f"g{group_id}")
  batch = sampler.take_batch()
  assert batch.group_ids == [0, 1] and batch.discarded_group_ids == [4]
  assert batch.metrics["train/carried_groups"] == 2.0
  # Groups 2 and 3 fill the next batch on their own: decided without sampling.
  assert sampler.is_decided() and not sampler.needs_more_prompts()
  batch = sampler.take_batch()
  assert batch.group_ids == [2, 3] and batch.payloads == ["g2", "g3"]
  assert batch.metrics["train/num_gen_batches"] == 0.0
  assert math.isnan(batch.metrics["train/raw_acc"])
  # Nothing carried now: the next step samples again, ids continuing after 4.
  assert sampler.needs_more_prompts()
  assert sampler.open_gen_batch(2) == [5, 6]


def test_carried_group_takes_the_first_slot():
  sampler = DynamicSampler(train_batch_size=2, n=2, gen_batch_size=3, carry_over=True)
  sampler.open_gen_batch()
  for group_id in (2, 1, 0):
    sampler.add_group(group_id, MIXED, payload=f"g{group_id}")
  assert sampler.take_batch().group_ids == [0, 1]
  # Group 2 is carried: one kept group, so the next step needs one more.
  assert sampler.num_kept == 1 and not sampler.is_decided()
  assert sampler.open_gen_batch() == [3, 4, 5]
  sampler.add_group(4, MIXED, payload="g4")
  assert not sampler.is_decided()  # group 3 may still take the slot
  sampler.add_group(3, MIXED, payload="g3")
  batch = sampler.take_batch()
  assert batch.group_ids == [2, 3] and batch.payloads == ["g2", "g3"]
  assert batch.discarded_group_ids == [5]


def test_state_dict_round_trip_through_json():
  sampler = DynamicSampler(train_batch_size=1, n=2, gen_batch_size=3, carry_over=True)
  sampler.open_gen_batch()
  for group_id in (0, 1, 2):
    sampler.add_group(group_id, {"acc": [True, False]}, payload=np.array([group_id, 7]))
  sampler.take_batch()
  state = json.loads(json.dumps(sampler.state_dict(encode_payload=lambda a: a.tolist())))
  assert state["next_group_id"] == 3
  assert [g["group_id"] for g in state["carried_groups"]] == [1, 2]

  restored = DynamicSampler(train_batch_size=1, n=2, gen_batch_size=3, carry_over=True)
  restored.load_state_dict(state, decode_payload=np.array)
  batch = restored.take_batch()
  assert batch.group_ids == [1]
  np.testing.assert_array_equal(batch.payloads[0], [1, 7])
  batch = restored.take_batch()
  assert batch.group_ids == [2]
  assert restored.open_gen_batch() == [3, 4, 5]
  with pytest.raises(RuntimeError, match="between rollout steps"):
    restored.state_dict()
  # A carried-over state does not load into a sampler without carry-over, or with another n.
  with pytest.raises(ValueError, match="carry_over"):
    DynamicSampler(train_batch_size=1, n=2, gen_batch_size=3).load_state_dict(state)
  with pytest.raises(ValueError, match="rollout.n"):
    DynamicSampler(train_batch_size=1, n=4, gen_batch_size=3, carry_over=True).load_state_dict(state)


def test_state_dict_without_carry_over_holds_the_counter_only():
  sampler = DynamicSampler(train_batch_size=1, n=2, gen_batch_size=2)
  sampler.open_gen_batch()
  sampler.add_group(0, MIXED, payload=object())  # payloads of dropped surplus are never saved
  sampler.add_group(1, MIXED, payload=object())
  sampler.take_batch()
  state = sampler.state_dict()
  assert state == {"version": 1, "next_group_id": 2, "carried_groups": []}
  restored = DynamicSampler(train_batch_size=1, n=2, gen_batch_size=2)
  restored.load_state_dict(json.loads(json.dumps(state)))
  assert restored.open_gen_batch() == [2, 3]


# --------------------------------------------------------------------------------------------------------------
# Property: streaming with any completion order selects what verl selects on whole generation batches.
# --------------------------------------------------------------------------------------------------------------


def _verl_selection(acc_of_draw, train_batch_size, gen_batch_size, max_num_gen_batches):
  """verl's DAPO loop on whole generation batches: (selected draw ids, num_gen_batches), or None if it raises."""
  kept, num_gen_batches, start = [], 0, 0
  while True:
    num_gen_batches += 1
    draws = range(start, start + gen_batch_size)
    start += gen_batch_size
    mask = filter_groups([acc_of_draw(i) for i in draws])
    kept += [i for i, keep in zip(draws, mask) if keep]
    if len(kept) >= train_batch_size:
      return kept[:train_batch_size], num_gen_batches
    if 0 < max_num_gen_batches <= num_gen_batches:
      return None


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), train_batch_size=st.integers(1, 6), n=st.integers(1, 3),
       gen_batch_size=st.integers(1, 8), max_num_gen_batches=st.integers(0, 4), engine_slots=st.integers(1, 6))
def test_streaming_matches_whole_batch_selection(seed, train_batch_size, n, gen_batch_size, max_num_gen_batches,
                                                 engine_slots):
  rng = np.random.default_rng(seed)
  keep_probability = rng.uniform(0.1, 0.9)
  accs = {}

  def acc_of_draw(draw):
    if draw not in accs:  # a fixed outcome per draw, shared by both simulations
      accs[draw] = [1.0, 0.0] * n if rng.random() < keep_probability else [float(rng.random() < 0.5)] * n
      accs[draw] = accs[draw][:n]
    return accs[draw]

  expected = _verl_selection(acc_of_draw, train_batch_size, gen_batch_size, max_num_gen_batches)
  sampler = DynamicSampler(train_batch_size=train_batch_size, n=n, gen_batch_size=gen_batch_size,
                           max_num_gen_batches=max_num_gen_batches)
  queue, running = [], []
  try:
    while not sampler.is_decided():
      if sampler.needs_more_prompts():
        queue += sampler.open_gen_batch()
      while queue and len(running) < engine_slots and sampler.wants_group(queue[0]):
        running.append(queue.pop(0))
      # Following the protocol never stalls: undecided and nothing to open means something runs.
      assert running, "the dynamic-sampling protocol stalled"
      finished = running.pop(int(rng.integers(len(running))))  # completion order: random
      sampler.add_group(finished, {"acc": acc_of_draw(finished)}, payload=finished)
  except DynamicSamplingExhausted:
    assert expected is None
    return
  assert expected is not None
  batch = sampler.take_batch()
  assert batch.group_ids == expected[0]
  assert batch.payloads == expected[0]
  assert batch.metrics["train/num_gen_batches"] == expected[1]
  assert set(batch.discarded_group_ids) == set(queue) | set(running)


def test_an_abandoned_step_drops_its_groups_and_can_be_saved():
  sampler = DynamicSampler(train_batch_size=2, n=2, gen_batch_size=3)
  ids = sampler.open_gen_batch()
  sampler.add_group(ids[0], {"acc": [1.0, 0.0]})
  with pytest.raises(RuntimeError, match="middle of a rollout step"):
    sampler.state_dict()
  sampler.abandon_step()  # the data ran out before the batch was decided
  assert sampler.state_dict()["next_group_id"] == 3  # the opened prompts count as consumed
  assert sampler.open_gen_batch() == [3, 4, 5] and sampler.num_kept == 0
