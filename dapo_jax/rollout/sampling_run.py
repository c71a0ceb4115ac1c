"""One sampling run of a `GroupSampler` (`sampler.py`): the queue of prompts, the decode slots and the groups in
flight, driven one `step()` (one device call of decode steps, plus any prefills) at a time."""
from collections.abc import Iterable, Sequence
import collections
import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from dapo_jax.model import qwen2
from dapo_jax.rl import batching
from dapo_jax.rollout import decode_state
from dapo_jax.rollout import decoding
from dapo_jax.rollout.responses import FINISH_EOS, FINISH_LENGTH, Group, Response
from dapo_jax.rollout.sampling import SamplingParams

if TYPE_CHECKING:
  from dapo_jax.rollout.sampler import GroupSampler  # pylint: disable=g-import-not-at-top  (a cycle otherwise)


@dataclasses.dataclass
class SamplerStats:
  """Counts of device calls, for tests and for throughput metrics."""
  prefill_calls: int = 0
  prefilled_prompts: int = 0
  insert_calls: int = 0
  decode_calls: int = 0
  decode_steps: int = 0
  generated_tokens: int = 0


@dataclasses.dataclass
class _PendingGroup:
  """A prompt that is queued, prefilled, or decoding, and what has come back of it so far."""
  prompt_index: int
  prompt_ids: np.ndarray
  prefix: decode_state.Prefix | None = None
  prefix_row: int = 0
  samples_inserted: int = 0
  responses: dict[int, Response] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _SlotResponse:
  """The response a decode slot is producing, accumulated on the host chunk by chunk."""
  group: _PendingGroup
  sample_index: int
  tokens: list[np.ndarray] = dataclasses.field(default_factory=list)
  logp_sampled: list[np.ndarray] = dataclasses.field(default_factory=list)
  logp_full: list[np.ndarray] = dataclasses.field(default_factory=list)
  length: int = 0


class SamplingRun:
  """One sampling run of a `GroupSampler`: a queue of prompts, the decode slots, and the groups in flight.

  Use as a context manager (or call `close()`), which frees the decode state.
  """

  def __init__(self, sampler: "GroupSampler", params: qwen2.Params, *, n: int, seed: int, sampling: SamplingParams):
    self._sampler = sampler
    self._params = params  # prefill reads the model's stacked layers
    # Decode steps read unstacked layers (and, greedy, a [vocab, embed] LM head).
    self._weights = sampler.functions.decode_weights(params, greedy=sampling.greedy)
    self.n = n
    self.seed = seed
    self.sampling = sampling
    self.stats = SamplerStats()
    self.closed = False
    self._queue: collections.deque[_PendingGroup] = collections.deque()
    self._groups: dict[int, _PendingGroup] = {}      # every submitted, unfinished, uncancelled prompt
    self._prefilled: collections.deque[_PendingGroup] = collections.deque()  # samples still to insert
    self._slots: list[_SlotResponse | None] = [None] * sampler.num_slots
    self._state = decode_state.init_decode_state(sampler.config, sampler.num_slots, sampler.cache_length,
                                                 shardings=sampler.state_shardings,
                                                 keys_transposed=sampler.keys_transposed)

  def __enter__(self) -> "SamplingRun":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Ends the run and frees the decode state; unfinished groups are dropped."""
    self.closed = True
    self._state = None
    self._weights = None
    self._queue.clear()
    self._prefilled.clear()
    self._groups.clear()
    self._slots = [None] * self._sampler.num_slots

  # ---------------------------------------------------------------------------------------------------------
  # What the caller sees

  @property
  def free_slots(self) -> int:
    return sum(slot is None for slot in self._slots)

  @property
  def waiting_samples(self) -> int:
    """Responses of submitted prompts that have no slot yet."""
    queued = len(self._queue) * self.n
    return queued + sum(self.n - group.samples_inserted for group in self._prefilled)

  def has_room(self) -> bool:
    """Whether a newly submitted prompt would start decoding at the next `step()` (some slot would be idle)."""
    return self.free_slots > self.waiting_samples

  @property
  def idle(self) -> bool:
    """Nothing submitted is unfinished: `step()` would do nothing."""
    return not self._groups

  def submit(self, prompt_index: int, prompt_ids: Sequence[int]) -> None:
    """Queues a prompt; it is prefilled (once) when slots are free, in submission order."""
    self._check_open()
    prompt_ids = np.asarray(prompt_ids, np.int32).reshape(-1)
    if not 1 <= prompt_ids.size <= self._sampler.max_prompt_length:
      raise ValueError(f"prompt {prompt_index}: {prompt_ids.size} tokens; the sampler takes 1 to "
                       f"{self._sampler.max_prompt_length} (max_prompt_length)")
    if prompt_ids.min() < 0 or prompt_ids.max() >= self._sampler.config.vocab_size:
      raise ValueError(f"prompt {prompt_index}: token ids must be in [0, {self._sampler.config.vocab_size})")
    if prompt_index in self._groups:
      raise ValueError(f"prompt index {prompt_index} is already in flight")
    group = _PendingGroup(prompt_index=int(prompt_index), prompt_ids=prompt_ids)
    self._groups[group.prompt_index] = group
    self._queue.append(group)

  def cancel(self, prompt_indices: Iterable[int]) -> None:
    """Drops these prompts: queued ones are never prefilled, running responses are abandoned (their slots
    free up at once), and their groups are never returned. Unknown or finished indices are ignored."""
    cancelled = {int(index) for index in prompt_indices} & set(self._groups)
    if not cancelled:
      return
    for index in cancelled:
      del self._groups[index]
    self._queue = collections.deque(g for g in self._queue if g.prompt_index not in cancelled)
    self._prefilled = collections.deque(g for g in self._prefilled if g.prompt_index not in cancelled)
    for slot, response in enumerate(self._slots):
      if response is not None and response.group.prompt_index in cancelled:
        self._slots[slot] = None

  def cancel_all(self) -> None:
    self.cancel(list(self._groups))

  def step(self) -> list[Group]:
    """Fills free slots (prefilling queued prompts as needed), runs `steps_per_call` decode steps, and returns
    the groups that finished, in the order they finished (by slot within one call)."""
    self._check_open()
    self._fill_slots()
    if all(slot is None for slot in self._slots):
      return []
    sampler = self._sampler
    # Attention reads only the cache entries the live slots can reach during these steps.
    needed = max(response.group.prompt_ids.size + response.length for response in self._slots
                 if response is not None) + sampler.steps_per_call
    self._state, output = sampler.functions.decode_steps(
        self._weights, self._state, num_steps=sampler.steps_per_call, sampling=self.sampling,
        attend_length=decoding.attention_window(needed, sampler.cache_length))
    self.stats.decode_calls += 1
    self.stats.decode_steps += sampler.steps_per_call
    tokens, logp_sampled, logp_full = jax.device_get(tuple(output))
    return self._collect(tokens, logp_sampled, logp_full)

  # ---------------------------------------------------------------------------------------------------------
  # Slots

  def _check_open(self) -> None:
    if self.closed:
      raise RuntimeError("this sampling run is closed")

  def _free_slot_indices(self) -> list[int]:
    return [slot for slot, response in enumerate(self._slots) if response is None]

  def _fill_slots(self) -> None:
    """Inserts waiting samples into free slots, oldest prompt first, prefilling queued prompts when needed."""
    while True:
      free = self._free_slot_indices()
      if not free:
        return
      if not self._prefilled:
        if not self._queue:
          return
        self._prefill_next(num_wanted=-(-len(free) // self.n))
        continue
      group = self._prefilled[0]
      count = min(len(free), self.n - group.samples_inserted)
      self._insert(group, free[:count])
      if group.samples_inserted == self.n:
        self._prefilled.popleft()
        group.prefix = None  # every sample has its copy: the prefix can go

  def _prefill_next(self, num_wanted: int) -> None:
    """Prefills the next queued prompts that share the first one's length bucket, in one device call.

    Batching only prompts of one bucket keeps each prompt's prefill independent of the others (its padding,
    hence its arithmetic, is its own), so results do not depend on which prompts were queued together.
    """
    sampler = self._sampler
    bucket = batching.bucket_length(self._queue[0].prompt_ids.size, sampler.min_prefill_bucket)
    limit = max(1, min(num_wanted, sampler.prefill_token_budget // bucket))
    batch = []
    while (self._queue and len(batch) < limit and
           batching.bucket_length(self._queue[0].prompt_ids.size, sampler.min_prefill_bucket) == bucket):
      batch.append(self._queue.popleft())
    # The batch dimension is padded to a power of two too, which bounds the number of compilations.
    padded_count = 1 << (len(batch) - 1).bit_length()
    tokens = np.zeros((padded_count, bucket), np.int32)
    lengths = np.ones((padded_count,), np.int32)
    for row, group in enumerate(batch):
      tokens[row, :group.prompt_ids.size] = group.prompt_ids
      lengths[row] = group.prompt_ids.size
    prefix = sampler.functions.prefill(self._params, tokens, lengths)
    self.stats.prefill_calls += 1
    self.stats.prefilled_prompts += len(batch)
    for row, group in enumerate(batch):
      group.prefix, group.prefix_row = prefix, row
      self._prefilled.append(group)

  def _insert(self, group: _PendingGroup, slots: list[int]) -> None:
    """Starts the group's next `len(slots)` samples in these slots, in one device call."""
    sampler = self._sampler
    count = len(slots)
    padded_count = 1 << (count - 1).bit_length()
    sample_indices = np.arange(group.samples_inserted, group.samples_inserted + padded_count, dtype=np.int32)
    # Padding entries point past the last slot; `insert` drops them.
    slot_array = np.full((padded_count,), sampler.num_slots, np.int32)
    slot_array[:count] = slots
    keys = sampler.response_keys(
        np.uint32(self.seed), np.full((padded_count,), group.prompt_index, np.int32), sample_indices)
    self._state = sampler.functions.insert(
        group.prefix, self._state, np.full((padded_count,), group.prefix_row, np.int32), slot_array, keys,
        sampling=self.sampling)
    self.stats.insert_calls += 1
    for slot, sample_index in zip(slots, sample_indices[:count]):
      self._slots[slot] = _SlotResponse(group=group, sample_index=int(sample_index))
    group.samples_inserted += count

  def _collect(self, tokens: np.ndarray, logp_sampled: np.ndarray, logp_full: np.ndarray) -> list[Group]:
    """Appends one call's tokens [slots, steps] to the running responses; ends those that hit an eos or the
    length limit, frees their slots, and returns the groups that became complete."""
    sampler = self._sampler
    finished_groups = []
    for slot, response in enumerate(self._slots):
      if response is None:
        continue
      room = sampler.max_response_length - response.length
      chunk = tokens[slot, :room]
      eos_positions = np.flatnonzero(np.isin(chunk, sampler.eos_ids)) if sampler.eos_ids.size else []
      take = int(eos_positions[0]) + 1 if len(eos_positions) else chunk.size
      response.tokens.append(chunk[:take])
      response.logp_sampled.append(logp_sampled[slot, :take])
      response.logp_full.append(logp_full[slot, :take])
      response.length += take
      self.stats.generated_tokens += take
      if len(eos_positions):
        reason = FINISH_EOS
      elif response.length >= sampler.max_response_length:
        reason = FINISH_LENGTH
      else:
        continue
      self._slots[slot] = None
      group = response.group
      group.responses[response.sample_index] = Response(
          prompt_index=group.prompt_index, sample_index=response.sample_index,
          token_ids=np.concatenate(response.tokens), logp_sampled=np.concatenate(response.logp_sampled),
          logp_full=np.concatenate(response.logp_full), finish_reason=reason)
      if len(group.responses) == self.n:
        del self._groups[group.prompt_index]
        finished_groups.append(Group(prompt_index=group.prompt_index, prompt_ids=group.prompt_ids,
                                     responses=[group.responses[i] for i in range(self.n)]))
    return finished_groups
