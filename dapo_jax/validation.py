"""Validation: k sampled responses per unique problem, scored by the problem's data source, reduced to
avg@k / best@k / maj@k / pass@k (DAPO_SPEC.md sections 1 and 8).

One function for both callers: the trainer's periodic validation (with the trainer's sampler and reward pool)
and `python -m dapo_jax.evaluate` (which also writes every problem's responses out). Deduplicated prompts
(`data.math.validation_prompts`) are sampled k times each with one prefill per problem, which gives the same
avg@k as verl's one sample per row of a k-times duplicated file.
"""
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import logging
import time

import numpy as np

from dapo_jax import metrics as metrics_lib
from dapo_jax.data import math as math_data
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.rl import rewards
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import SamplingParams

# Seconds between two progress lines while sampling (the first and the last group are always logged).
DEFAULT_LOG_EVERY_S = 60.0


@dataclasses.dataclass(frozen=True)
class ProblemResult:
  """One problem's k responses and how each scored.

  Attributes:
    index: the problem's position in the prompts given to `validate` (its prompt index in the sampler and its
      problem id in the metrics).
    example: the problem (prompt ids, ground truth, data source, location, number of duplicate rows).
    responses: the sampler's responses, in sample order.
    texts: the decoded responses (special tokens skipped): what the reward function read.
    scores: float64 [k]: the reward functions' scores (no overlong shaping: validation reports accuracy).
    accs: bool [k]: whether each response is correct.
    predictions: the k answers majority voting goes over (see `vote_keys`).
    num_timeouts: responses whose scoring ran out of time (scored as wrong).
  """
  index: int
  example: math_data.PromptExample
  responses: list[sampler_lib.Response]
  texts: list[str]
  scores: np.ndarray
  accs: np.ndarray
  predictions: list[str | None]
  num_timeouts: int = 0

  @property
  def num_correct(self) -> int:
    return int(self.accs.sum())

  @property
  def accuracy(self) -> float:
    return float(self.accs.mean())

  @property
  def majority_prediction(self) -> str | None:
    """The most common prediction (ties go to the one seen first, as in `metrics.maj_at_k`)."""
    return Counter(self.predictions).most_common(1)[0][0]

  @property
  def finish_reasons(self) -> list[str]:
    return [r.finish_reason for r in self.responses]

  @property
  def response_lengths(self) -> list[int]:
    return [len(r.token_ids) for r in self.responses]


@dataclasses.dataclass(frozen=True)
class ValidationResult:
  """What `validate` found.

  Attributes:
    metrics: `{prefix}/{data_source}/acc/{mean@k, best@k, maj@k, pass@k}` (`metrics.validation_metrics`).
    problems: one `ProblemResult` per prompt, in prompt order.
    samples: one `metrics.SampleResult` per response (what `metrics` was computed from).
    num_timeouts: responses whose scoring timed out, over all problems.
    elapsed_s: seconds spent sampling and scoring.
  """
  metrics: dict[str, float]
  problems: list[ProblemResult]
  samples: list[metrics_lib.SampleResult]
  num_timeouts: int
  elapsed_s: float

  @property
  def generated_tokens(self) -> int:
    return sum(sum(p.response_lengths) for p in self.problems)


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
  return [rewards.last_answer_line(text[-rewards.RESPONSE_TAIL_CHARS:]) for text in texts]


def score_problem(index: int, example: math_data.PromptExample, responses: Sequence[sampler_lib.Response], *,
                  tokenizer: tokenizer_lib.Tokenizer, score_fns: Mapping[str, rewards.ScoreFn],
                  pool: rewards.RewardPool | None = None,
                  timeout_s: float = rewards.DEFAULT_TIMEOUT_S) -> ProblemResult:
  """Decodes and scores one problem's responses with the reward function of its data source (DAPO_SPEC.md 1).

  Without a pool, scoring runs in this process with no time bound.
  """
  texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in responses]
  scored = rewards.score_batch(texts, [example.ground_truth] * len(texts),
                               data_sources=[example.data_source] * len(texts), score_fns=score_fns,
                               default_score_fn=None, num_workers=0 if pool is None else None, pool=pool,
                               timeout_s=timeout_s)
  return ProblemResult(index=index, example=example, responses=list(responses), texts=texts,
                       scores=scored.scores, accs=scored.accs, predictions=vote_keys(texts, scored.results),
                       num_timeouts=scored.num_timeouts)


def validate(params, sampler: sampler_lib.GroupSampler, prompts: Sequence[math_data.PromptExample], *,
             tokenizer: tokenizer_lib.Tokenizer, n: int, sampling: SamplingParams, seed: int,
             score_fns: Mapping[str, rewards.ScoreFn], pool: rewards.RewardPool | None = None,
             timeout_s: float = rewards.DEFAULT_TIMEOUT_S, prefix: str = "val-core",
             log_every_s: float = DEFAULT_LOG_EVERY_S,
             on_problem_done: Callable[[ProblemResult], object] | None = None) -> ValidationResult:
  """Samples `n` responses per problem, scores each group as it finishes, and reduces them to the metrics.

  Args:
    params: the policy's weights, in the sampler's sharding.
    sampler: a group sampler for the policy's shape whose `max_prompt_length` fits every prompt.
    prompts: the problems (deduplicated: `data.math.validation_prompts`).
    tokenizer: decodes responses for the reward functions.
    n: responses per problem: the k of avg@k (DAPO: 32).
    sampling: temperature / top-p / top-k (DAPO validation: 1.0 / 0.7 / none).
    seed: the sampler's seed, in [0, 2**31).
    score_fns: `{data_source: reward function}` (`rl.rewards.reward_functions`) covering every prompt's source.
    pool: reward worker processes (each response bounded by `timeout_s`); None scores in this process.
    timeout_s: per-response scoring bound with a pool.
    prefix: the metric names' first component.
    log_every_s: seconds between progress lines.
    on_problem_done: called with each problem's result as soon as it is scored (in completion order), e.g. to
      write it out before a long run ends.

  Returns:
    The metrics, every problem's responses and scores, and the per-response results.
  """
  examples = list(prompts)
  if not examples:
    raise ValueError("validate: no problems to validate on (the validation files gave no rows)")
  missing = sorted({e.data_source for e in examples} - set(score_fns))
  if missing:
    raise KeyError(f"validate: no reward function for data source(s) {missing}; score_fns covers "
                   f"{sorted(score_fns)}")
  start = time.time()
  last_log = [start]
  problems: dict[int, ProblemResult] = {}

  def on_group_done(prompt_index: int, responses: list[sampler_lib.Response]) -> None:
    problems[prompt_index] = score_problem(prompt_index, examples[prompt_index], responses, tokenizer=tokenizer,
                                           score_fns=score_fns, pool=pool, timeout_s=timeout_s)
    if on_problem_done is not None:
      on_problem_done(problems[prompt_index])
    now = time.time()
    done = len(problems)
    if done in (1, len(examples)) or now - last_log[0] >= log_every_s:
      last_log[0] = now
      elapsed = now - start
      tokens = sum(sum(p.response_lengths) for p in problems.values())
      logging.info("Validation: %d/%d problems x %d samples in %.0f s (%.0f tokens/s), ETA %.0f s", done,
                   len(examples), n, elapsed, tokens / max(elapsed, 1e-9),
                   elapsed / done * (len(examples) - done))

  groups = sampler.sample(params, [e.prompt_ids for e in examples], n=n, seed=seed, sampling=sampling,
                          on_group_done=on_group_done)
  if len(groups) != len(examples) or len(problems) != len(examples):
    raise RuntimeError(f"validate: the sampler returned {len(groups)} of {len(examples)} groups")
  ordered = [problems[i] for i in range(len(examples))]
  samples = [metrics_lib.SampleResult(p.example.data_source, str(p.index), float(acc), pred)
             for p in ordered for acc, pred in zip(p.accs, p.predictions)]
  return ValidationResult(metrics=metrics_lib.validation_metrics(samples, prefix=prefix), problems=ordered,
                          samples=samples, num_timeouts=sum(p.num_timeouts for p in ordered),
                          elapsed_s=time.time() - start)
