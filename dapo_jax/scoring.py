"""A finished group of responses, scored: what training (dynamic sampling, advantages) and validation (avg@k,
maj@k) both read, and the one JSON form of it that checkpoints hold (docs/algorithm.md sections 1, 2 and 4).

`score_group` decodes a group's responses, scores them with the reward function of the prompt's data source
(in the reward pool, each response bounded in time), and adds the overlong shaping when it is on.
"""
from collections import Counter
from collections.abc import Mapping, Sequence
import dataclasses
import time
from typing import Any

import numpy as np

from dapo_jax.data import prompts as prompts_lib
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.rl import math_answers
from dapo_jax.rl import reward_pool as reward_pool_lib
from dapo_jax.rl import rewards
from dapo_jax.rollout import responses as responses_lib


@dataclasses.dataclass(frozen=True)
class OverlongShaping:
  """The soft overlong punishment's settings (`reward.overlong_buffer`, `data.max_response_length`)."""
  max_response_length: int
  buffer_length: int
  penalty_factor: float


@dataclasses.dataclass(frozen=True, eq=False)
class ScoredGroup:
  """One prompt's `n` responses and how each scored.

  Attributes:
    group_id: the group's id: its draw position in training (docs/algorithm.md section 4), its problem's
      position among the validation prompts in validation.
    example: the prompt (token ids, ground truth, data source, location).
    responses: the sampler's responses, in sample order.
    texts: the decoded responses (special tokens skipped): what the reward function read.
    scores: float32 [n]: the reward function's scores, unshaped.
    rewards: float32 [n]: the scores plus the overlong penalty (the scores when shaping is off).
    accs: float32 [n]: 1 where the response is correct.
    predictions: the answers maj@k votes over (`vote_keys`).
    num_timeouts: responses whose scoring ran out of time (scored as wrong).
  """
  group_id: int
  example: prompts_lib.PromptExample
  responses: list[responses_lib.Response]
  texts: list[str]
  scores: np.ndarray
  rewards: np.ndarray
  accs: np.ndarray
  predictions: list[str | None]
  num_timeouts: int = 0

  @property
  def lengths(self) -> np.ndarray:
    """int64 [n]: each response's token count, EOS included."""
    return np.array([len(r.token_ids) for r in self.responses], np.int64)

  @property
  def truncated(self) -> np.ndarray:
    """bool [n]: which responses hit the maximum response length."""
    return np.array([r.finish_reason == responses_lib.FINISH_LENGTH for r in self.responses])

  @property
  def num_correct(self) -> int:
    return int(self.accs.sum())

  @property
  def majority_prediction(self) -> str | None:
    """The most common prediction (ties go to the one seen first)."""
    return Counter(self.predictions).most_common(1)[0][0]

  def filter_values(self) -> dict[str, np.ndarray]:
    """The per-response values dynamic sampling may filter on, by `rl.filtering.FILTER_METRICS` name."""
    return {"acc": self.accs, "score": self.scores, "reward": self.rewards}

  def to_json(self) -> dict[str, Any]:
    """The group as JSON values (float32 values round-trip exactly through JSON numbers)."""
    def plain(value):
      return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value

    return {"group_id": self.group_id,
            "example": {k: plain(v) for k, v in dataclasses.asdict(self.example).items()},
            "responses": [{k: plain(v) for k, v in dataclasses.asdict(r).items()} for r in self.responses],
            "texts": list(self.texts), "scores": plain(self.scores), "rewards": plain(self.rewards),
            "accs": plain(self.accs), "predictions": list(self.predictions), "num_timeouts": self.num_timeouts}

  @classmethod
  def from_json(cls, encoded: Mapping[str, Any]) -> "ScoredGroup":
    """The group `to_json` encoded."""
    example = prompts_lib.PromptExample(**{**encoded["example"],
                                           "prompt_ids": np.asarray(encoded["example"]["prompt_ids"], np.int32)})
    responses = [responses_lib.Response(**{**r, "token_ids": np.asarray(r["token_ids"], np.int32),
                                           "logp_sampled": np.asarray(r["logp_sampled"], np.float32),
                                           "logp_full": np.asarray(r["logp_full"], np.float32)})
                 for r in encoded["responses"]]
    return cls(group_id=int(encoded["group_id"]), example=example, responses=responses,
               texts=list(encoded["texts"]), scores=np.asarray(encoded["scores"], np.float32),
               rewards=np.asarray(encoded["rewards"], np.float32), accs=np.asarray(encoded["accs"], np.float32),
               predictions=list(encoded["predictions"]), num_timeouts=int(encoded["num_timeouts"]))


def vote_keys(texts: Sequence[str], score_results: Sequence[Mapping]) -> list[str | None]:
  """The answers of one problem's responses that maj@k votes over.

  The reward function's `pred` (math_dapo's normalized answer, so "$42$" and "42" vote together, as in verl).
  When the function gave no prediction for any response of the problem (a custom function that returns bare
  scores, or strict-box responses without a box), the responses' last "Answer:" lines vote instead: one shared
  None would make the first sample's accuracy the majority's for every draw.
  """
  predictions = [result.get("pred") for result in score_results]
  if any(pred is not None for pred in predictions):
    return [None if pred is None else str(pred) for pred in predictions]
  return [math_answers.last_answer_line(text[-math_answers.RESPONSE_TAIL_CHARS:]) for text in texts]


class GroupScorer:
  """Scores finished groups with the reward functions of their data sources, and counts the time it takes.

  Attributes:
    seconds: total time spent scoring since construction (decoding included): `timing_s/reward`, which
      overlaps generation when groups are scored as they finish.
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, score_fns: Mapping[str, rewards.ScoreFn], *,
               pool: reward_pool_lib.RewardPool | None = None,
               timeout_s: float = reward_pool_lib.DEFAULT_TIMEOUT_S, shaping: OverlongShaping | None = None):
    """Args:
      tokenizer: decodes responses for the reward functions.
      score_fns: `{data_source: reward function}` (`rl.rewards.reward_functions`).
      pool: reward worker processes (each response bounded by `timeout_s`); None scores in this process with no
        time bound.
      timeout_s: per-response scoring bound with a pool.
      shaping: the overlong punishment added to the scores; None: rewards are the scores.
    """
    self.tokenizer = tokenizer
    self.score_fns = score_fns
    self.pool = pool
    self.timeout_s = timeout_s
    self.shaping = shaping
    self.seconds = 0.0

  def __call__(self, group_id: int, example: prompts_lib.PromptExample,
               responses: Sequence[responses_lib.Response]) -> ScoredGroup:
    start = time.perf_counter()
    texts = [self.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in responses]
    scored = reward_pool_lib.score_batch(
        texts, [example.ground_truth] * len(texts), data_sources=[example.data_source] * len(texts),
        score_fns=self.score_fns, default_score_fn=None, num_workers=0 if self.pool is None else None,
        pool=self.pool, timeout_s=self.timeout_s)
    scores = scored.scores.astype(np.float32)
    shaped = scores.copy()
    if self.shaping is not None:
      lengths = np.array([len(r.token_ids) for r in responses])
      shaped = shaped + rewards.overlong_penalties(lengths, self.shaping.max_response_length,
                                                   self.shaping.buffer_length,
                                                   self.shaping.penalty_factor).astype(np.float32)
    group = ScoredGroup(group_id=int(group_id), example=example, responses=list(responses), texts=texts,
                        scores=scores, rewards=shaped, accs=scored.accs.astype(np.float32),
                        predictions=vote_keys(texts, scored.results), num_timeouts=scored.num_timeouts)
    self.seconds += time.perf_counter() - start
    return group
