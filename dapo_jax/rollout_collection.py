"""Rollout collection: the sampling phase of a rollout step, from drawn prompts to the selected, scored groups.

This module is where the streaming dynamic-sampling protocol lives (docs/algorithm.md section 4); the group
sampler (`rollout/sampler.py`) and the dynamic sampler (`rl/filtering.py`) each describe only their own side.
One rollout step:

  1. While dynamic sampling needs more prompts (the groups opened so far cannot fill the batch even if every
     unfinished one were kept), draw a generation batch from the data iterator and open it: each prompt gets
     a group id, its position in the draw.
  2. Admit queued prompts to the sampler in draw order, while it has free decode slots and dynamic sampling
     still wants the group (once it does not, no later group can make the batch either).
  3. Run the sampler one device call at a time; score every group the moment it finishes and report it to
     dynamic sampling, in whatever order groups finish.
  4. The batch is decided when every group drawn before the `train_batch_size`-th kept one has finished:
     groups still in flight are cancelled, and the selection is taken in draw order (never completion order,
     which would favour short responses).

With several processes each runs this on its own prompts and devices; they then agree on how the phase ended
(`Outcome`), so that all go on to the update only when every one has decided its batch.
"""
import collections
from collections.abc import Iterator
import dataclasses
import enum
import logging
from typing import Any

import jax
import numpy as np

from dapo_jax import config as config_lib
from dapo_jax import distributed
from dapo_jax import scoring
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.rl import filtering
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import SamplingParams
from dapo_jax.rollout.sampling_run import SamplerStats


class Outcome(enum.IntEnum):
  """How a process's sampling phase ended, numbered by severity: the processes go on with the most severe one
  among them (`agree`), so a failure anywhere stops everyone and a data end anywhere ends the run."""
  BATCH_DECIDED = 0
  DATA_RAN_OUT = 1
  GEN_BATCHES_SPENT = 2


def agree(outcome: Outcome) -> Outcome:
  """The most severe outcome over every process (a collective: all processes call it)."""
  return Outcome(int(distributed.global_max([int(outcome)])[0]))


@dataclasses.dataclass(frozen=True)
class CollectedBatch:
  """This process's share of a rollout step's training batch.

  Attributes:
    groups: the selected groups, in draw order.
    selection_metrics: dynamic sampling's counts of this step (`rl.filtering.SelectedBatch.metrics`).
    num_timeouts: responses whose scoring timed out, over every group scored this step (selected or not).
    sampler_stats: the sampling run's counts (device calls, the KV pool's use, preemptions).
  """
  groups: list[scoring.ScoredGroup]
  selection_metrics: dict[str, float]
  num_timeouts: int
  sampler_stats: SamplerStats

  # The trajectories, group after group, each group's responses in sample order.

  @property
  def prompts(self) -> list[list[int]]:
    return [list(g.example.prompt_ids) for g in self.groups for _ in g.responses]

  @property
  def responses(self) -> list[list[int]]:
    return [list(r.token_ids) for g in self.groups for r in g.responses]

  @property
  def sampler_logps(self) -> list[np.ndarray]:
    """Each response's per-token log-probs under the sampler's untruncated distribution."""
    return [np.asarray(r.logp_full, np.float32) for g in self.groups for r in g.responses]

  @property
  def group_index(self) -> np.ndarray:
    """Each trajectory's group: its position in `groups`."""
    return np.repeat(np.arange(len(self.groups)), [len(g.responses) for g in self.groups])

  @property
  def rewards(self) -> np.ndarray:
    return np.concatenate([g.rewards for g in self.groups])

  @property
  def truncated(self) -> np.ndarray:
    return np.concatenate([g.truncated for g in self.groups])


class RolloutCollector:
  """Runs the sampling phase of each rollout step over one stream of prompts; holds the loop state a checkpoint
  must keep (the data iterator's position and the dynamic sampler's carried-over groups)."""

  def __init__(self, sampler: sampler_lib.GroupSampler, dynamic: filtering.DynamicSampler,
               data_iterator: Iterator[list[prompts_lib.PromptExample]], scorer: scoring.GroupScorer):
    self.sampler = sampler
    self.dynamic = dynamic
    self.data_iterator = data_iterator
    self.scorer = scorer

  def collect(self, params: Any, *, seed: int, sampling: SamplingParams, rollout_step: int
              ) -> CollectedBatch | None:
    """Samples, scores and filters groups until the batch is decided (the module docstring's steps 1-4).

    Returns None when the data ran out (on this process or another) before the batch was decided; the step is
    then abandoned, so that the loop state can still be saved.

    Raises:
      filtering.DynamicSamplingExhausted: this process or another spent its generation batches.
    """
    drawn: dict[int, prompts_lib.PromptExample] = {}
    queue: collections.deque[int] = collections.deque()
    num_timeouts = 0
    spent: filtering.DynamicSamplingExhausted | None = None
    with self.sampler.start(params, n=self.dynamic.n, seed=seed, sampling=sampling) as run:
      try:
        while not self.dynamic.is_decided():
          if not queue and self.dynamic.needs_more_prompts():
            examples = next(self.data_iterator, None)
            if examples is not None:
              group_ids = self.dynamic.open_gen_batch(len(examples))
              drawn.update(zip(group_ids, examples))
              queue.extend(group_ids)
          while queue and run.has_room() and self.dynamic.wants_group(queue[0]):
            group_id = queue.popleft()
            run.submit(group_id, drawn[group_id].prompt_ids)
          if run.idle:
            break  # nothing in flight and nothing left to admit: only when the data ran out
          for finished in run.step():
            group = self.scorer(finished.prompt_index, drawn[finished.prompt_index], finished.responses)
            num_timeouts += group.num_timeouts
            self.dynamic.add_group(group.group_id, group.filter_values(), group)
      except filtering.DynamicSamplingExhausted as error:
        spent = error  # raised below, once the other processes know
      selection = self.dynamic.take_batch() if self.dynamic.is_decided() else None
      if selection is not None:
        run.cancel(selection.discarded_group_ids)
    outcome = agree(Outcome.GEN_BATCHES_SPENT if spent else
                    Outcome.BATCH_DECIDED if selection is not None else Outcome.DATA_RAN_OUT)
    if outcome == Outcome.GEN_BATCHES_SPENT:
      raise spent or filtering.DynamicSamplingExhausted(
          f"Dynamic sampling spent its generation batches at rollout step {rollout_step} on another process "
          "(its log says how many groups it kept): raise algorithm.filter_groups.max_num_gen_batches or "
          "data.gen_batch_size, or turn off algorithm.filter_groups.enable")
    if outcome == Outcome.DATA_RAN_OUT:
      if selection is None:
        self.dynamic.abandon_step()
      return None
    warn_on_preemptions(run.stats, rollout_step)
    return CollectedBatch(groups=list(selection.payloads), selection_metrics=selection.metrics,
                          num_timeouts=num_timeouts, sampler_stats=run.stats)

  def state_dict(self) -> dict[str, Any]:
    """This process's loop state, as JSON values (between rollout steps only)."""
    return {"data_iterator": self.data_iterator.get_state(),
            "dynamic_sampling": self.dynamic.state_dict(scoring.ScoredGroup.to_json)}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self.data_iterator.set_state(state["data_iterator"])
    self.dynamic.load_state_dict(state["dynamic_sampling"], decode_payload=scoring.ScoredGroup.from_json)


def make_sampler(config, model_config, mesh, eos_ids) -> sampler_lib.GroupSampler:
  """The rollout's group sampler on `mesh` as the config's `rollout` section sets it up, its KV pool sized at
  start (`check_rollout_memory`)."""
  r = config.rollout
  sampler = sampler_lib.GroupSampler(
      model_config, num_slots=r.max_num_seqs, max_prompt_length=config.data.max_prompt_length,
      max_response_length=config.data.max_response_length, eos_ids=eos_ids, steps_per_call=r.decode_steps_per_call,
      mesh=mesh, page_size=r.page_size, num_pages=r.num_pages or None, memory_utilization=r.gpu_memory_utilization)
  check_rollout_memory(sampler)
  return sampler


def check_rollout_memory(sampler: sampler_lib.GroupSampler) -> None:
  """Sizes the rollout's KV pool now and says how large it is; refuses a pool that cannot hold one response of
  the longest prompt and response (which would otherwise preempt it forever)."""
  try:
    num_pages = sampler.pool_pages(decode_weights_made=False)
  except sampler_lib.PoolTooSmall as error:
    raise config_lib.ConfigError(str(error)) from None
  full_length = sampler.num_slots * sampler.pages_per_slot
  logging.info("Rollout: %d decode slots over a KV pool of %d pages of %d entries (%.2f GiB while sampling); at "
               "full length (%d tokens) it holds %d responses%s", sampler.num_slots, num_pages, sampler.page_size,
               sampler.decode_state_bytes() / 2**30, sampler.cache_length, num_pages // sampler.pages_per_slot,
               "" if num_pages >= full_length else ", shorter ones take fewer pages")


def warn_on_preemptions(stats: SamplerStats, rollout_step: int) -> None:
  """Warns when the KV pool ran dry often enough that recomputing preempted responses costs real time."""
  if stats.readmissions and stats.preemptions * 10 > stats.prefilled_prompts:
    logging.warning("Rollout step %d: %d responses preempted (the KV pool ran dry) and recomputed; raise "
                    "rollout.gpu_memory_utilization or rollout.num_pages, or lower rollout.max_num_seqs",
                    rollout_step, stats.preemptions)


def own_loop_state(meta: dict) -> dict:
  """This process's `RolloutCollector.state_dict` from a checkpoint's metadata: a list indexed by process
  (checkpoints of single-process runs saved before multi-host support keep it at the top level)."""
  states = meta.get("processes") or [{"data_iterator": meta["data_iterator"],
                                      "dynamic_sampling": meta["dynamic_sampling"]}]
  if len(states) != jax.process_count():
    raise ValueError(
        f"The checkpoint was saved by {len(states)} processes and this run has {jax.process_count()}: each "
        "process's data stream and dynamic-sampling state resume only with the process count they were saved with")
  return states[jax.process_index()]
