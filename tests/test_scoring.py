"""Scoring a finished group: decode, reward by data source, overlong shaping, vote keys, time spent."""
import numpy as np
import pytest

from dapo_jax import scoring
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.rl import rewards
from dapo_jax.rollout.responses import Response
from tests import tokenizer_fixtures


def _group(tokenizer, texts, finish_reasons):
  responses = []
  for j, (text, reason) in enumerate(zip(texts, finish_reasons)):
    ids = np.array(tokenizer.encode(text) + ([tokenizer.eos_id] if reason == "eos" else []), np.int32)
    responses.append(Response(7, j, ids, np.zeros(len(ids), np.float32), np.zeros(len(ids), np.float32), reason))
  return responses


def test_scores_shaping_and_vote_keys_by_hand():
  tokenizer = tokenizer_fixtures.char_tokenizer()
  example = prompts_lib.PromptExample(prompt_ids=np.array([1, 2], np.int32), prompt_text="What is 2+3*4?",
                                      ground_truth="14", data_source="math_dapo", row_index=0, location="t, row 0")
  # 10, 10 and 12 characters; the first two end with an eos (11 tokens), the third is cut at 12 tokens.
  texts = ["Answer: 14", "Answer: 20", "Answer: 1414"]
  shaping = scoring.OverlongShaping(max_response_length=12, buffer_length=4, penalty_factor=1.0)
  scorer = scoring.GroupScorer(tokenizer, rewards.reward_functions(["math_dapo"]), shaping=shaping)
  group = scorer(7, example, _group(tokenizer, texts, ["eos", "eos", "length"]))
  assert group.group_id == 7 and group.texts == texts
  np.testing.assert_array_equal(group.lengths, [11, 11, 12])
  np.testing.assert_array_equal(group.truncated, [False, False, True])
  np.testing.assert_array_equal(group.scores, [1.0, -1.0, -1.0])
  np.testing.assert_array_equal(group.accs, [1.0, 0.0, 0.0])
  # Penalty min(-(L - (12 - 4)) / 4, 0): 11 tokens -> -0.75, 12 -> -1.
  np.testing.assert_allclose(group.rewards, [0.25, -1.75, -2.0])
  assert group.predictions == ["14", "20", "1414"] and group.majority_prediction == "14"
  assert group.filter_values()["reward"] is group.rewards
  assert scorer.seconds > 0

  unshaped = scoring.GroupScorer(tokenizer, rewards.reward_functions(["math_dapo"]))
  np.testing.assert_array_equal(unshaped(7, example, group.responses).rewards, group.scores)


def test_a_data_source_without_a_reward_function_is_an_error():
  tokenizer = tokenizer_fixtures.char_tokenizer()
  example = prompts_lib.PromptExample(prompt_ids=np.array([1], np.int32), prompt_text="x", ground_truth="1",
                                      data_source="elsewhere", row_index=0, location="t, row 0")
  scorer = scoring.GroupScorer(tokenizer, rewards.reward_functions(["math_dapo"]))
  with pytest.raises(KeyError, match="elsewhere"):
    scorer(0, example, _group(tokenizer, ["Answer: 1"], ["eos"]))
