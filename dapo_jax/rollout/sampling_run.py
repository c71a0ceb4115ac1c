"""One sampling run of a `GroupSampler` (`sampler.py`): the queue of prompts, the decode slots and the groups in
flight, driven one `step()` (one device call of decode steps, plus any prefills and inserts) at a time.

Pages. A response is started when a free slot's shard has the pages of its prompt and of one decode call's
growth; before each decode call every live response gets the pages of its next `steps_per_call` tokens, lowest
group id first. When a shard's pool runs dry, the response of the highest group id there is preempted (vLLM's
recompute preemption): its pages go back, its tokens and log-probs stay on the host, and when pages free up it is
readmitted before anything new: its prompt and tokens are prefilled again and its next token sampled with the key
of its position. Since every token's key depends only on (seed, prompt, sample, position), a preempted response
continues as it would have (up to the rounding of a prefill against decode steps). The pool holds at least one
full-length response per shard (`GroupSampler` checks), so the response of the lowest group id always
progresses and nothing is preempted forever.
"""
from collections.abc import Iterable, Sequence
import collections
import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import numpy as np

from dapo_jax.model import qwen2
from dapo_jax.rl import batching
from dapo_jax.rollout import decode_state
from dapo_jax.rollout import decoding
from dapo_jax.rollout import page_table
from dapo_jax.rollout.responses import FINISH_EOS, FINISH_LENGTH, Group, Response
from dapo_jax.rollout.sampling import SamplingParams

if TYPE_CHECKING:
  from dapo_jax.rollout.sampler import GroupSampler  # pylint: disable=g-import-not-at-top  (a cycle otherwise)


@dataclasses.dataclass
class SamplerStats:
  """Counts of device calls and of the paged KV cache's use, for tests, metrics and benchmarks."""
  prefill_calls: int = 0
  prefilled_prompts: int = 0
  insert_calls: int = 0
  decode_calls: int = 0
  decode_steps: int = 0
  generated_tokens: int = 0
  preemptions: int = 0          # responses whose pages were taken back mid-way (their cache recomputed later)
  readmissions: int = 0
  used_pages: int = 0           # summed over decode calls: pages held
  pool_pages: int = 0           # summed over decode calls: pages in the pool
  reserved_kv_entries: int = 0  # summed over decode calls: entries of the pages held (pages x page size)
  live_kv_entries: int = 0      # summed over decode calls: cache entries the live responses use

  @property
  def kv_pool_utilization(self) -> float:
    """The mean share of the pool's pages held during decode calls."""
    return self.used_pages / self.pool_pages if self.pool_pages else 0.0


@dataclasses.dataclass
class _PendingGroup:
  """A prompt that is queued, prefilled, or decoding, and what has come back of it so far."""
  prompt_index: int
  prompt_ids: np.ndarray
  max_tokens: int
  prefix: decode_state.Prefix | None = None
  prefix_row: int = 0
  samples_inserted: int = 0
  responses: dict[int, Response] = dataclasses.field(default_factory=dict)
  shared_pages: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # page shard -> full prompt pages


@dataclasses.dataclass
class _SlotResponse:
  """A response in progress (in a decode slot, or preempted), accumulated on the host chunk by chunk."""
  group: _PendingGroup
  sample_index: int
  tokens: list[np.ndarray] = dataclasses.field(default_factory=list)
  logp_sampled: list[np.ndarray] = dataclasses.field(default_factory=list)
  logp_full: list[np.ndarray] = dataclasses.field(default_factory=list)
  length: int = 0

  @property
  def order(self) -> tuple[int, int]:
    """Preemption order: the highest group id goes first (selection takes groups in prompt order)."""
    return self.group.prompt_index, self.sample_index

  @property
  def cache_entries(self) -> int:
    """Cache entries in use: the prompt and every response token returned (each was fed)."""
    return self.group.prompt_ids.size + self.length

  @property
  def final_entries(self) -> int:
    """Cache entries the response can ever use (its last token is never fed)."""
    return self.group.prompt_ids.size + self.group.max_tokens - 1


class SamplingRun:
  """One sampling run of a `GroupSampler`: a queue of prompts, the decode slots and their pages, and the groups
  in flight.

  Use as a context manager (or call `close()`), which frees the decode state (the pool).
  """

  def __init__(self, sampler: "GroupSampler", params: qwen2.Params, *, n: int, seed: int, sampling: SamplingParams):
    self._sampler = sampler
    # The run's one copy of the weights: unstacked layers (and, greedy, a [vocab, embed] LM head), read by
    # prefill and decode steps alike.
    self._weights = sampler.decode_weights(params, greedy=sampling.greedy)
    self.n = n
    self.seed = seed
    self.sampling = sampling
    self.stats = SamplerStats()
    self.closed = False
    self._queue: collections.deque[_PendingGroup] = collections.deque()
    self._groups: dict[int, _PendingGroup] = {}      # every submitted, unfinished, uncancelled prompt
    self._prefilled: collections.deque[_PendingGroup] = collections.deque()  # samples still to insert
    self._preempted: list[_SlotResponse] = []        # waiting to be readmitted, lowest group id first
    self._slots: list[_SlotResponse | None] = [None] * sampler.num_slots
    num_pages = sampler.pool_pages()
    self._pages = page_table.PageTable(
        num_slots=sampler.num_slots, page_shards=sampler.page_shards,
        pages_per_shard=num_pages // sampler.page_shards, page_size=sampler.page_size,
        pages_per_slot=sampler.pages_per_slot)
    self._state = decode_state.init_decode_state(sampler.config, sampler.num_slots, num_pages, sampler.page_size,
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
    self._preempted.clear()
    self._groups.clear()
    self._slots = [None] * self._sampler.num_slots
    self._sampler.last_run_stats = self.stats

  # ---------------------------------------------------------------------------------------------------------
  # What the caller sees

  @property
  def free_slots(self) -> int:
    return sum(slot is None for slot in self._slots)

  @property
  def waiting_samples(self) -> int:
    """Responses of submitted prompts that have no slot now (never started, or preempted)."""
    queued = len(self._queue) * self.n
    return queued + sum(self.n - group.samples_inserted for group in self._prefilled) + len(self._preempted)

  def has_room(self) -> bool:
    """Whether a newly submitted prompt would start decoding at the next `step()`: some slot would be idle, and
    its pages would fit."""
    if self.free_slots <= self.waiting_samples:
      return False
    sampler = self._sampler
    longest = min(sampler.max_prompt_length + sampler.steps_per_call, sampler.cache_length)
    return max(self._pages.free_pages(shard) for shard in range(self._pages.page_shards)) >= \
        self._pages.pages_for(longest)

  @property
  def idle(self) -> bool:
    """Nothing submitted is unfinished: `step()` would do nothing."""
    return not self._groups

  def submit(self, prompt_index: int, prompt_ids: Sequence[int], max_tokens: int | None = None) -> None:
    """Queues a prompt; it is prefilled (once) when slots and pages are free, in submission order. Its responses
    end after `max_tokens` tokens (default and at most: the sampler's max_response_length), or at an eos."""
    self._check_open()
    prompt_ids = np.asarray(prompt_ids, np.int32).reshape(-1)
    if not 1 <= prompt_ids.size <= self._sampler.max_prompt_length:
      raise ValueError(f"prompt {prompt_index}: {prompt_ids.size} tokens; the sampler takes 1 to "
                       f"{self._sampler.max_prompt_length} (max_prompt_length)")
    if prompt_ids.min() < 0 or prompt_ids.max() >= self._sampler.config.vocab_size:
      raise ValueError(f"prompt {prompt_index}: token ids must be in [0, {self._sampler.config.vocab_size})")
    if prompt_index in self._groups:
      raise ValueError(f"prompt index {prompt_index} is already in flight")
    limit = self._sampler.max_response_length
    max_tokens = limit if max_tokens is None else int(max_tokens)
    if not 1 <= max_tokens <= limit:
      raise ValueError(f"prompt {prompt_index}: max_tokens must be in [1, {limit}] (max_response_length), "
                       f"got {max_tokens}")
    group = _PendingGroup(prompt_index=int(prompt_index), prompt_ids=prompt_ids, max_tokens=max_tokens)
    self._groups[group.prompt_index] = group
    self._queue.append(group)

  def cancel(self, prompt_indices: Iterable[int]) -> None:
    """Drops these prompts: queued ones are never prefilled, running responses are abandoned (their slots and
    pages free up at once), and their groups are never returned. Unknown or finished indices are ignored."""
    cancelled = {int(index) for index in prompt_indices} & set(self._groups)
    if not cancelled:
      return
    for index in cancelled:
      self._release_shared(self._groups.pop(index))
    self._queue = collections.deque(g for g in self._queue if g.prompt_index not in cancelled)
    self._prefilled = collections.deque(g for g in self._prefilled if g.prompt_index not in cancelled)
    self._preempted = [r for r in self._preempted if r.group.prompt_index not in cancelled]
    for slot, response in enumerate(self._slots):
      if response is not None and response.group.prompt_index in cancelled:
        self._free_slot(slot)

  def cancel_all(self) -> None:
    self.cancel(list(self._groups))

  def step(self) -> list[Group]:
    """Fills free slots (readmitting preempted responses, prefilling queued prompts as needed), gives every live
    response the pages of `steps_per_call` more tokens (preempting where the pool runs dry), runs
    `steps_per_call` decode steps, and returns the groups that finished, in the order they finished (by slot
    within one call)."""
    self._check_open()
    self._fill_slots()
    self._reserve_pages()
    live = [response for response in self._slots if response is not None]
    if not live:
      return []
    sampler = self._sampler
    needed = max(response.cache_entries for response in live) + sampler.steps_per_call
    page_table = self._pages.window(needed, whole=sampler.attention_reads_visible_only)
    self._state, output = sampler.functions.decode_steps(
        self._weights, self._state, page_table, num_steps=sampler.steps_per_call, sampling=self.sampling)
    self.stats.decode_calls += 1
    self.stats.decode_steps += sampler.steps_per_call
    used = self._pages.used_pages()
    self.stats.used_pages += used
    self.stats.pool_pages += self._pages.num_pages
    self.stats.reserved_kv_entries += used * sampler.page_size
    self.stats.live_kv_entries += sum(response.cache_entries for response in live)
    tokens, logp_sampled, logp_full = jax.device_get(tuple(output))
    return self._collect(tokens, logp_sampled, logp_full)

  # ---------------------------------------------------------------------------------------------------------
  # Slots and pages

  def _check_open(self) -> None:
    if self.closed:
      raise RuntimeError("this sampling run is closed")

  def _free_slot(self, slot: int) -> None:
    self._pages.clear(slot)
    self._slots[slot] = None

  def _release_shared(self, group: _PendingGroup) -> None:
    """Lets go of the group's hold on its shared prompt pages (the slots that use them keep their own)."""
    for shard, pages in group.shared_pages.items():
      self._pages.release(shard, pages)
    group.shared_pages.clear()

  def _growth_pages(self, entries: int, final_entries: int) -> int:
    """Pages a response holding `entries` cache entries needs for one more decode call."""
    return self._pages.pages_for(min(entries + self._sampler.steps_per_call, final_entries))

  def _slot_with_pages(self, pages_needed) -> int | None:
    """A free slot whose shard has the pages `pages_needed(shard)` asks for; the shard with most free pages
    first (one shard: the lowest free slot)."""
    by_shard: dict[int, int] = {}
    for slot, response in enumerate(self._slots):
      if response is None:
        by_shard.setdefault(self._pages.shard_of(slot), slot)
    for shard in sorted(by_shard, key=lambda s: (-self._pages.free_pages(s), s)):
      if self._pages.free_pages(shard) >= pages_needed(shard):
        return by_shard[shard]
    return None

  def _fill_slots(self) -> None:
    """Starts waiting responses in free slots whose shard has their pages: preempted ones first, then new
    samples, lowest group id first; prefills queued prompts when needed. A response that does not fit waits,
    and so does everything behind it (so preemption and readmission cannot reorder the groups)."""
    while self._preempted:
      response = self._preempted[0]
      need = self._growth_pages(response.cache_entries, response.final_entries)
      slot = self._slot_with_pages(lambda shard, need=need: need)
      if slot is None:
        return
      self._preempted.pop(0)
      self._readmit(response, slot)
    while True:
      if not self._prefilled:
        if not self._queue or self.free_slots == 0 or self._slot_with_pages(
            functools.partial(self._pages_for_sample, self._queue[0])) is None:
          return
        self._prefill_next(num_wanted=-(-self.free_slots // self.n))
        continue
      group = self._prefilled[0]
      slots = []
      while len(slots) < self.n - group.samples_inserted:
        slot = self._slot_with_pages(functools.partial(self._pages_for_sample, group, pending=slots))
        if slot is None:
          break
        slots.append(slot)
        self._slots[slot] = _SlotResponse(group=group, sample_index=-1)  # taken; filled in by `_insert`
      if not slots:
        return
      self._insert(group, slots)
      if group.samples_inserted == self.n:
        self._prefilled.popleft()
        group.prefix = None  # every sample has its pages: the prefix can go
        self._release_shared(group)

  def _pages_for_sample(self, group: _PendingGroup, shard: int, pending: Sequence[int] = ()) -> int:
    """Pages one more sample of the group needs in `shard` to start and run one decode call: the prompt's full
    pages (unless the group holds them there already, or a sample being placed in this call takes them), then
    its own pages. `pending`: slots already chosen for this insertion."""
    length = group.prompt_ids.size
    full = length // self._pages.page_size
    own = self._growth_pages(length, length + group.max_tokens - 1) - full
    placed_here = sum(self._pages.shard_of(slot) == shard for slot in pending)
    return (0 if shard in group.shared_pages else full) + (placed_here + 1) * own

  def _reserve_pages(self) -> None:
    """Gives every live response the pages of its next `steps_per_call` tokens, lowest group id first. Where a
    shard's pool runs dry, the response of the highest group id in that shard is preempted (its pages freed,
    its tokens kept; its cache is recomputed when it is readmitted), possibly the one asking."""
    live = sorted((slot for slot, response in enumerate(self._slots) if response is not None),
                  key=lambda slot: self._slots[slot].order)
    for slot in live:
      response = self._slots[slot]
      if response is None:
        continue  # preempted for a response before it
      shard = self._pages.shard_of(slot)
      wanted = self._growth_pages(response.cache_entries, response.final_entries) - self._pages.pages_held(slot)
      while wanted > self._pages.free_pages(shard):
        victim = max((s for s, r in enumerate(self._slots) if r is not None and self._pages.shard_of(s) == shard),
                     key=lambda s: self._slots[s].order)
        if victim == slot and self._drop_prompt_holds(shard):
          continue  # prompt pages of groups still starting came back: try again before preempting itself
        self._preempt(victim)
        if victim == slot:
          break
      if self._slots[slot] is not None and wanted > 0:
        self._pages.give(slot, self._pages.allocate(shard, wanted))

  def _drop_prompt_holds(self, shard: int) -> bool:
    """Lets go of the shared prompt pages that groups still starting hold in `shard` (a later sample there
    writes them again from the group's prefix); whether there were any."""
    dropped = False
    for group in self._prefilled:
      if shard in group.shared_pages:
        self._pages.release(shard, group.shared_pages.pop(shard))
        dropped = True
    return dropped

  def _preempt(self, slot: int) -> None:
    response = self._slots[slot]
    self._free_slot(slot)
    self._preempted.append(response)
    self._preempted.sort(key=lambda r: r.order)
    self.stats.preemptions += 1

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
    prefix = self._prefill([group.prompt_ids for group in batch], bucket)
    self.stats.prefilled_prompts += len(batch)
    for row, group in enumerate(batch):
      group.prefix, group.prefix_row = prefix, row
      self._prefilled.append(group)

  def _prefill(self, sequences: Sequence[np.ndarray], bucket: int) -> decode_state.Prefix:
    """One prefill call of right-padded sequences; the batch dimension is padded to a power of two too, which
    bounds the number of compilations."""
    padded_count = 1 << (len(sequences) - 1).bit_length()
    tokens = np.zeros((padded_count, bucket), np.int32)
    lengths = np.ones((padded_count,), np.int32)
    for row, sequence in enumerate(sequences):
      tokens[row, :sequence.size] = sequence
      lengths[row] = sequence.size
    self.stats.prefill_calls += 1
    return self._sampler.functions.prefill(self._weights, tokens, lengths)

  def _insert(self, group: _PendingGroup, slots: list[int]) -> None:
    """Starts the group's next `len(slots)` samples in these slots, in one device call: the prompt's full pages
    written once per shard (shared by the group's samples there), each sample's partial last page its own."""
    pages = self._pages
    length = group.prompt_ids.size
    full = length // pages.page_size
    bucket_pages = group.prefix.v.shape[3] // pages.page_size
    writes = []  # page lists, one per write of the prefix row
    for shard in sorted({pages.shard_of(slot) for slot in slots}):
      if shard not in group.shared_pages:
        group.shared_pages[shard] = pages.allocate(shard, full)
        writes.append(pages.global_pages(shard, group.shared_pages[shard]))
    for slot in slots:
      shard = pages.shard_of(slot)
      pages.give(slot, group.shared_pages[shard], retain=True)
      if length % pages.page_size:
        own = pages.allocate(shard, 1)
        pages.give(slot, own)
        writes.append([None] * full + pages.global_pages(shard, own))
    sample_indices = np.arange(group.samples_inserted, group.samples_inserted + len(slots), dtype=np.int32)
    keys = self._sampler.response_keys(np.uint32(self.seed), np.full(len(slots), group.prompt_index, np.int32),
                                       sample_indices)
    self._start(group.prefix, [group.prefix_row] * len(writes), writes, bucket_pages,
                [group.prefix_row] * len(slots), slots, [0] * len(slots), np.asarray(keys))
    for slot, sample_index in zip(slots, sample_indices):
      self._slots[slot] = _SlotResponse(group=group, sample_index=int(sample_index))
    group.samples_inserted += len(slots)

  def _readmit(self, response: _SlotResponse, slot: int) -> None:
    """Restarts a preempted response in `slot`: its prompt and the tokens it has returned are prefilled again
    (into pages of its own) and its next token sampled anew, with the key of its position, so the response
    continues as it would have."""
    sequence = np.concatenate([response.group.prompt_ids] + response.tokens)
    bucket = batching.bucket_length(sequence.size, self._sampler.min_prefill_bucket)
    prefix = self._prefill([sequence], bucket)
    shard = self._pages.shard_of(slot)
    own = self._pages.allocate(shard, self._pages.pages_for(sequence.size))
    self._pages.give(slot, own)
    keys = self._sampler.response_keys(np.uint32(self.seed), np.array([response.group.prompt_index], np.int32),
                                       np.array([response.sample_index], np.int32))
    self._start(prefix, [0], [self._pages.global_pages(shard, own)], bucket // self._pages.page_size, [0], [slot],
                [response.length], np.asarray(keys))
    self._slots[slot] = response
    self.stats.readmissions += 1

  def _start(self, prefix, write_rows, write_pages, bucket_pages, start_rows, slots, positions, keys) -> None:
    """One `insert` call; both lists are padded to a power of two (with entries that write and start nothing),
    which bounds the number of compilations."""
    drop_page, drop_slot = self._pages.num_pages, self._sampler.num_slots
    num_writes = 1 << max(len(write_rows) - 1, 0).bit_length()
    page_array = np.full((num_writes, bucket_pages), drop_page, np.int32)
    row_array = np.zeros((num_writes,), np.int32)
    for i, (row, pages) in enumerate(zip(write_rows, write_pages)):
      row_array[i] = row
      page_array[i, :len(pages)] = [drop_page if page is None else page for page in pages][:bucket_pages]
    num_starts = 1 << (len(slots) - 1).bit_length()
    starts = decoding.SlotStarts(
        rows=np.zeros((num_starts,), np.int32), slots=np.full((num_starts,), drop_slot, np.int32),
        positions=np.zeros((num_starts,), np.int32), response_keys=np.zeros((num_starts, 2), np.uint32))
    starts.rows[:len(slots)], starts.slots[:len(slots)] = start_rows, slots
    starts.positions[:len(slots)], starts.response_keys[:len(slots)] = positions, keys
    self._state = self._sampler.functions.insert(prefix, self._state, decoding.PageWrites(row_array, page_array),
                                                 starts, sampling=self.sampling)
    self.stats.insert_calls += 1

  def _collect(self, tokens: np.ndarray, logp_sampled: np.ndarray, logp_full: np.ndarray) -> list[Group]:
    """Appends one call's tokens [slots, steps] to the running responses; ends those that hit an eos or their
    length limit, frees their slots and pages, and returns the groups that became complete."""
    sampler = self._sampler
    finished_groups = []
    for slot, response in enumerate(self._slots):
      if response is None:
        continue
      group = response.group
      room = group.max_tokens - response.length
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
      elif response.length >= group.max_tokens:
        reason = FINISH_LENGTH
      else:
        continue
      self._free_slot(slot)
      group.responses[response.sample_index] = Response(
          prompt_index=group.prompt_index, sample_index=response.sample_index,
          token_ids=np.concatenate(response.tokens), logp_sampled=np.concatenate(response.logp_sampled),
          logp_full=np.concatenate(response.logp_full), finish_reason=reason)
      if len(group.responses) == self.n:
        del self._groups[group.prompt_index]
        finished_groups.append(Group(prompt_index=group.prompt_index, prompt_ids=group.prompt_ids,
                                     responses=[group.responses[i] for i in range(self.n)]))
    return finished_groups
