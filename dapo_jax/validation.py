"""Validation: k sampled responses per unique problem, scored by the problem's data source, reduced to
avg@k / best@k / maj@k / pass@k (docs/algorithm.md sections 1 and 8).

One function for both callers: the trainer's periodic validation (with the trainer's sampler and reward pool)
and `python -m dapo_jax.evaluate` (which also writes every problem's responses out). Deduplicated prompts
(`data.prompts.validation_prompts`) are sampled k times each with one prefill per problem, which gives the same
avg@k as verl's one sample per row of a k-times duplicated file.
"""
from collections.abc import Callable, Sequence
import dataclasses
import logging
import time

import jax

from dapo_jax import distributed
from dapo_jax import metrics as metrics_lib
from dapo_jax import scoring
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.rollout import responses as responses_lib
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import SamplingParams

# Seconds between two progress lines while sampling (the first and the last group are always logged).
DEFAULT_LOG_EVERY_S = 60.0


def validation_seed(trainer_seed: int) -> int:
  """The sampling seed of a training run's validations (kept apart from its rollout seeds); `evaluate` on the
  run's checkpoints derives the same one, so both give the same numbers."""
  return trainer_seed + 10**6


@dataclasses.dataclass(frozen=True)
class ValidationResult:
  """What `validate` found.

  Attributes:
    metrics: `metrics.validation_metrics` of every problem's samples (every process's, with several).
    problems: this process's problems (`scoring.ScoredGroup`, `group_id` = the problem's position among the
      prompts given to `validate`), in prompt order.
    num_timeouts: this process's responses whose scoring timed out.
    elapsed_s: seconds spent sampling and scoring.
  """
  metrics: dict[str, float]
  problems: list[scoring.ScoredGroup]
  num_timeouts: int
  elapsed_s: float

  @property
  def generated_tokens(self) -> int:
    return sum(int(p.lengths.sum()) for p in self.problems)


def validate(params, sampler: sampler_lib.GroupSampler, prompts: Sequence[prompts_lib.PromptExample], *, n: int,
             sampling: SamplingParams, seed: int, scorer: scoring.GroupScorer, prefix: str = "val-core",
             log_every_s: float = DEFAULT_LOG_EVERY_S,
             on_problem_done: Callable[[scoring.ScoredGroup], object] | None = None) -> ValidationResult:
  """Samples `n` responses per problem, scores each group as it finishes, and reduces them to the metrics.

  With several processes (a collective: every process calls it), process p samples problems p, p + P, ... with
  seed `seed + p`, and the metrics are those of every process's samples, on every process.

  Args:
    params: the policy's weights, in the sampler's sharding.
    sampler: a group sampler for the policy's shape whose `max_prompt_length` fits every prompt.
    prompts: the problems (deduplicated: `data.prompts.validation_prompts`).
    n: responses per problem: the k of avg@k (DAPO: 32).
    sampling: temperature / top-p / top-k (DAPO validation: 1.0 / 0.7 / none).
    seed: the sampler's seed, in [0, 2**31 - process count).
    scorer: scores each finished group with the reward function of its data source.
    prefix: the metric names' first component.
    log_every_s: seconds between progress lines.
    on_problem_done: called with each problem's result as soon as it is scored (in completion order), e.g. to
      write it out before a long run ends.
  """
  examples = list(prompts)
  if not examples:
    raise ValueError("validate: no problems to validate on (the validation files gave no rows)")
  missing = sorted({e.data_source for e in examples} - set(scorer.score_fns))
  if missing:
    raise KeyError(f"validate: no reward function for data source(s) {missing}; score_fns covers "
                   f"{sorted(scorer.score_fns)}")
  start = time.time()
  mine = list(range(jax.process_index(), len(examples), jax.process_count()))
  problems = _sample_and_score(params, sampler, [examples[i] for i in mine], n=n, sampling=sampling,
                               seed=seed + jax.process_index(), scorer=scorer, log_every_s=log_every_s,
                               on_problem_done=on_problem_done, group_ids=mine)
  samples = [(p.group_id, p.example.data_source, p.accs.tolist(), p.predictions) for p in problems]
  if jax.process_count() > 1:
    samples = sorted((s for process in distributed.allgather_json(samples) for s in process), key=lambda s: s[0])
  results = [metrics_lib.SampleResult(source, str(index), float(acc), pred)
             for index, source, accs, predictions in samples for acc, pred in zip(accs, predictions)]
  return ValidationResult(metrics=metrics_lib.validation_metrics(results, prefix=prefix), problems=problems,
                          num_timeouts=sum(p.num_timeouts for p in problems), elapsed_s=time.time() - start)


def _sample_and_score(params, sampler, examples, *, n, sampling, seed, scorer, log_every_s, on_problem_done,
                      group_ids) -> list[scoring.ScoredGroup]:
  """This process's problems, sampled and scored, in prompt order."""
  if not examples:
    return []
  start = time.time()
  last_log = start
  first_done = None  # the rate for the ETA counts from the first finished problem: compiling is behind it
  problems: dict[int, scoring.ScoredGroup] = {}

  def on_group_done(prompt_index: int, responses: list[responses_lib.Response]) -> None:
    nonlocal last_log, first_done
    problems[prompt_index] = scorer(group_ids[prompt_index], examples[prompt_index], responses)
    if on_problem_done is not None:
      on_problem_done(problems[prompt_index])
    now = time.time()
    done = len(problems)
    first_done = first_done or now
    if done in (1, len(examples)) or now - last_log >= log_every_s:
      last_log = now
      elapsed = now - start
      tokens = sum(int(p.lengths.sum()) for p in problems.values())
      eta = f", ETA {(now - first_done) / (done - 1) * (len(examples) - done):.0f} s" if done > 1 else ""
      logging.info("Validation: %d/%d problems x %d samples in %.0f s (%.0f tokens/s)%s", done, len(examples), n,
                   elapsed, tokens / max(elapsed, 1e-9), eta)

  groups = sampler.sample(params, [e.prompt_ids for e in examples], n=n, seed=seed, sampling=sampling,
                          on_group_done=on_group_done)
  if len(groups) != len(examples) or len(problems) != len(examples):
    raise RuntimeError(f"validate: the sampler returned {len(groups)} of {len(examples)} groups")
  return [problems[i] for i in range(len(examples))]
