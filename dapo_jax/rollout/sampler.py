"""Continuous-batching group sampler: prompts in, groups of `n` finished responses out (DAPO_SPEC.md 4, 8).

A fixed number of decode slots runs on the device. Each admitted prompt is prefilled once and its cache copied
into `n` slots (one group); a slot is refilled as soon as its response ends, so one long response never holds a
whole batch; every group is handed back the moment its last response ends. The host looks at the tokens only
every `steps_per_call` decode steps (those steps run fused in one device call, the tokens staying on the
device), so stopping at an eos costs at most `steps_per_call - 1` wasted steps for that slot.

Two ways to drive it, over the same machinery:

    sampler = GroupSampler(config, num_slots=64, max_prompt_length=2048, max_response_length=20480,
                           eos_ids=tokenizer.eos_ids)

    # 1. All at once, groups streamed to a callback as they finish:
    groups = sampler.sample(params, prompts, n=16, seed=step, sampling=SamplingParams(temperature=1.0),
                            on_group_done=lambda prompt_index, responses: ...,
                            admit=lambda prompt_index: True,   # False: stop admitting prompts, for good
                            is_done=lambda: False)             # True: cancel what is in flight and return

    # 2. Step by step, the protocol of `rl/filtering.DynamicSampler` (prompts admitted in draw order while the
    #    dynamic sampler still wants them; in-flight groups cancelled when the batch is decided):
    with sampler.start(params, n=16, seed=step, sampling=...) as run:
      while not dynamic.is_decided():
        ...
        while queue and run.has_room() and dynamic.wants_group(queue[0][0]):
          run.submit(*queue.popleft())
        for group in run.step():                       # one device call of decode steps (plus any prefills)
          dynamic.add_group(group.prompt_index, scores(group), payload=group)
      run.cancel(dynamic.take_batch().discarded_group_ids)

Determinism: response j of prompt i draws its token t with a key made from (seed, i, j, t) only, so the output
is a function of the seed, the prompts and the parameters: it does not depend on slot assignment, on which other
prompts run beside it, on `num_slots` or on `steps_per_call` (the tests check this token for token on CPU; a
backend whose matrix products round differently for different batch shapes could, rarely, flip a near-tie).

This module does not import JetStream (which loads TensorFlow); `engine.py` wraps the same device functions in
JetStream's Engine API for its orchestrator and server.
"""
from collections.abc import Callable, Iterable, Sequence
import collections
import dataclasses
from typing import Any

import jax
import numpy as np

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.rollout import decoding
from dapo_jax.rollout import sampling as sampling_lib
from dapo_jax.rollout.sampling import SamplingParams

FINISH_EOS = "eos"
FINISH_LENGTH = "length"


@dataclasses.dataclass(frozen=True)
class Response:
  """One finished response.

  Attributes:
    prompt_index: the prompt (group) it answers.
    sample_index: its place in the group, 0 .. n-1.
    token_ids: int32 [length]: the response tokens, the eos included when one ended it.
    logp_sampled: float32 [length]: each token's log-prob under the distribution it was drawn from (after
      top-k / top-p truncation; 0 for greedy).
    logp_full: float32 [length]: each token's log-prob under the untruncated temperature-scaled distribution.
    finish_reason: "eos" (an eos id ended it) or "length" (it reached the maximum response length).
  """
  prompt_index: int
  sample_index: int
  token_ids: np.ndarray
  logp_sampled: np.ndarray
  logp_full: np.ndarray
  finish_reason: str


@dataclasses.dataclass(frozen=True)
class Group:
  """The `n` responses of one prompt, in sample order."""
  prompt_index: int
  prompt_ids: np.ndarray
  responses: list[Response]


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
  prefix: decoding.Prefix | None = None
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


class GroupSampler:
  """Samples groups of responses with continuous batching over a fixed number of decode slots.

  Build one per model shape and reuse it: compilations are cached per (prompt bucket, batch sizes, sampling
  parameters). Parameters are passed to every `sample`/`start`, so the trainer's updated weights are used as
  they are. For a layout of its own (tensor-parallel decode without the trainer's FSDP, or, with several hosts,
  a mesh of each process's own devices: `sharding.process_local_mesh`), move them first with
  `sharding.reshard(params, sharding.param_shardings(model, mesh, sharding.DECODE_RULES))`.

  Memory: while a run is open it holds the decode state (the KV cache of `num_slots` responses of up to
  `max_prompt_length + max_response_length` tokens) and a second copy of the decoder-layer weights, unstacked
  for fast decode steps (`decoding.decode_weights`); both are freed when the run closes.
  """

  def __init__(self, config: Qwen2Config, *, num_slots: int, max_prompt_length: int, max_response_length: int,
               eos_ids: Iterable[int] = (), steps_per_call: int = 16, mesh: jax.sharding.Mesh | None = None,
               rules=sharding_lib.DEFAULT_RULES, prefill_token_budget: int = 8192, min_prefill_bucket: int = 16):
    """Configures the sampler.

    Args:
      config: the model's shape.
      num_slots: decode slots (responses decoded together); a group of n needs no more than one slot at a
        time, but fills n when it can.
      max_prompt_length: longest prompt accepted (prompts are truncated by the data pipeline, not here).
      max_response_length: a response that reaches this many tokens ends with finish reason "length".
      eos_ids: token ids that end a response (finish reason "eos"; the eos is part of the response). Empty:
        responses end by length only.
      steps_per_call: decode steps fused into one device call between looks at the tokens on the host.
      mesh: where the decode state lives: slots over the mesh's data-parallel axes, KV heads over `tensor`
        (per `rules`). None: the default device.
      rules: logical-axis rules for the decode state's sharding.
      prefill_token_budget: at most this many (padded) prompt tokens are prefilled in one device call.
      min_prefill_bucket: the shortest prefill length bucket (buckets are powers of two).
    """
    for name, value in (("num_slots", num_slots), ("max_prompt_length", max_prompt_length),
                        ("max_response_length", max_response_length), ("steps_per_call", steps_per_call)):
      if value < 1:
        raise ValueError(f"GroupSampler: {name} must be positive, got {value}")
    self.config = config
    self.num_slots = num_slots
    self.max_prompt_length = max_prompt_length
    self.max_response_length = max_response_length
    self.eos_ids = np.asarray(sorted(set(int(i) for i in eos_ids)), np.int32)
    self.steps_per_call = steps_per_call
    self.mesh = mesh
    self.prefill_token_budget = prefill_token_budget
    self.min_prefill_bucket = min_prefill_bucket
    # Prefixes are at most one bucket long; responses write up to max_prompt + max_response - 1.
    self.cache_length = max(decoding.bucket_length(max_prompt_length, min_prefill_bucket),
                            max_prompt_length + max_response_length)
    # Where the decode state lives (None: the default device), its key cache layout, and the device functions
    # compiled for it (on one CPU device, with the CPU attention kernel).
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    self.keys_transposed = decoding.keys_transposed_on(platform)
    self.state_shardings = (decoding.decode_state_shardings(config, mesh, num_slots, self.cache_length, rules,
                                                            self.keys_transposed)
                            if mesh is not None else None)
    attention_kernel = decoding.attention_kernel_on(platform, mesh.size if mesh is not None else 1, config)
    self.functions = decoding.jitted_functions(config, self.state_shardings, self.keys_transposed, attention_kernel)
    self.response_keys = jax.jit(jax.vmap(sampling_lib.response_key, in_axes=(None, 0, 0)))
    self._active_run: "SamplingRun | None" = None

  def start(self, params: qwen2.Params, *, n: int, seed: int,
            sampling: SamplingParams = SamplingParams()) -> "SamplingRun":
    """Opens a sampling run (one at a time per sampler): submit prompts, call `step()` until `idle`, close.

    The run keeps `params` for prefills and lays out a copy of the layer weights for decode steps.

    Args:
      params: the model weights (the plain dict of `Qwen2.params`).
      n: responses per prompt (the group size).
      seed: with the prompt and sample indices, decides every random draw; in [0, 2**31).
      sampling: temperature / top-p / top-k.
    """
    if self._active_run is not None and not self._active_run.closed:
      raise RuntimeError("GroupSampler: a sampling run is already open; close it before starting another")
    if n < 1:
      raise ValueError(f"GroupSampler: n must be positive, got {n}")
    if not 0 <= seed < 2**31:
      raise ValueError(f"GroupSampler: seed must be in [0, 2**31), got {seed}")
    self._active_run = SamplingRun(self, params, n=n, seed=seed, sampling=sampling)
    return self._active_run

  def sample(self, params: qwen2.Params, prompts: Iterable[Sequence[int]], *, n: int, seed: int,
             sampling: SamplingParams = SamplingParams(),
             on_group_done: Callable[[int, list[Response]], Any] | None = None,
             admit: Callable[[int], bool] | None = None, is_done: Callable[[], bool] | None = None,
             first_prompt_index: int = 0) -> list[Group]:
    """Samples `n` responses for each prompt; returns the finished groups in prompt order.

    Args:
      params: the model weights.
      prompts: token id sequences, pulled lazily (one when a slot can take it), numbered from
        `first_prompt_index` in order (the index is the prompt's group id and part of its random keys).
      n: responses per prompt.
      seed: see `start`.
      sampling: temperature / top-p / top-k.
      on_group_done: called as `on_group_done(prompt_index, responses)` the moment a group's last response
        ends, in completion order.
      admit: asked `admit(prompt_index)` before each prompt is admitted; False stops admission for good
        (what remains in flight still finishes).
      is_done: asked after each finished group; True cancels everything in flight and returns.
      first_prompt_index: the index of the first prompt.

    Returns:
      The groups that finished (all of them unless `admit` or `is_done` stopped early), in prompt order.
    """
    finished: dict[int, Group] = {}
    prompt_iterator = iter(prompts)
    next_index = first_prompt_index
    admitting = True
    with self.start(params, n=n, seed=seed, sampling=sampling) as run:
      while True:
        while admitting and run.has_room():
          if admit is not None and not admit(next_index):
            admitting = False
            break
          try:
            prompt = next(prompt_iterator)
          except StopIteration:
            admitting = False
            break
          run.submit(next_index, prompt)
          next_index += 1
        if run.idle:
          break
        for group in run.step():
          finished[group.prompt_index] = group
          if on_group_done is not None:
            on_group_done(group.prompt_index, group.responses)
          if is_done is not None and is_done():
            run.cancel_all()
            return [finished[index] for index in sorted(finished)]
    return [finished[index] for index in sorted(finished)]


class SamplingRun:
  """One sampling run of a `GroupSampler`: a queue of prompts, the decode slots, and the groups in flight.

  Use as a context manager (or call `close()`), which frees the decode state.
  """

  def __init__(self, sampler: GroupSampler, params: qwen2.Params, *, n: int, seed: int, sampling: SamplingParams):
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
    self._state = decoding.init_decode_state(sampler.config, sampler.num_slots, sampler.cache_length,
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
  def in_flight(self) -> list[int]:
    """Prompt indices submitted and neither finished nor cancelled, in submission order."""
    return list(self._groups)

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
    bucket = decoding.bucket_length(self._queue[0].prompt_ids.size, sampler.min_prefill_bucket)
    limit = max(1, min(num_wanted, sampler.prefill_token_budget // bucket))
    batch = []
    while (self._queue and len(batch) < limit and
           decoding.bucket_length(self._queue[0].prompt_ids.size, sampler.min_prefill_bucket) == bucket):
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
