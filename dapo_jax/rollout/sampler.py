"""Continuous-batching group sampler: prompts in, groups of `n` finished responses out (docs/algorithm.md 4, 8).

A fixed number of decode slots runs on the device over a paged KV cache (`decode_state.py`, `page_table.py`).
Each admitted prompt is prefilled once and started in `n` slots (one group) that share its full prompt pages; a
response takes pages as it grows and gives them back when it ends, and its slot is refilled at once, so one long
response never holds a whole batch, nor memory for the longest response it could have been; every group is
handed back the moment its last response ends. When the pool runs dry, the response of the highest group id is
preempted and later recomputed (`sampling_run.py`). The host looks at the tokens only
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
prompts run beside it, on `num_slots`, `steps_per_call`, the page size or the pool's size (the tests check this
token for token on CPU, preemptions included; a
backend whose matrix products round differently for different batch shapes could, rarely, flip a near-tie).

This module does not import JetStream (which loads TensorFlow); `engine.py` wraps the same device functions in
JetStream's Engine API for its orchestrator and server.
"""
from collections.abc import Callable, Iterable, Sequence
import functools
import os
from typing import Any

import jax
import numpy as np

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import attention as attention_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.rl import batching
from dapo_jax.rollout import decode_state
from dapo_jax.rollout import decoding
from dapo_jax.rollout import sampling as sampling_lib
from dapo_jax.rollout import weight_layout
from dapo_jax.rollout.responses import Group, Response
from dapo_jax.rollout.sampling import SamplingParams
from dapo_jax.rollout.sampling_run import SamplerStats, SamplingRun


@functools.partial(jax.jit, static_argnums=1)
def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


class PoolTooSmall(ValueError):
  """The KV pool cannot hold one response of the longest prompt and response in each page shard."""


class GroupSampler:
  """Samples groups of responses with continuous batching over decode slots and a paged KV cache.

  Build one per model shape and reuse it: compilations are cached per (prompt bucket, batch sizes, sampling
  parameters). Parameters are passed to every `sample`/`start`, in any layout and dtype (the trainer's, e.g.
  FSDP and float32): each run lays out its own copy on the sampler's mesh (`decode_weights`: tensor parallel
  only, `sharding.DECODE_RULES`, in the compute dtype; with several hosts the mesh may be each process's own
  devices, `sharding.process_local_mesh`).

  Memory: while a run is open it holds the KV pool (`pool_pages()` pages of `page_size` entries; a response
  takes pages as it grows, so the pool serves many more responses than it could at full length) and one copy of
  the weights laid out for prefill and decode steps (`weight_layout.DecodeWeights`); both are freed when the
  run closes, before the update (verl's free_cache_engine).
  """

  def __init__(self, config: Qwen2Config, *, num_slots: int, max_prompt_length: int, max_response_length: int,
               eos_ids: Iterable[int] = (), steps_per_call: int = 16, mesh: jax.sharding.Mesh | None = None,
               rules=sharding_lib.DEFAULT_RULES, prefill_token_budget: int = 8192,
               min_prefill_bucket: int = decoding.MIN_PREFILL_BUCKET, page_size: int = 16,
               num_pages: int | None = None, memory_utilization: float = 0.5):
    """Configures the sampler.

    Args:
      config: the model's shape.
      num_slots: decode slots (responses decoded together, vLLM's max_num_seqs); a group of n needs no more
        than one slot at a time, but fills n when it can.
      max_prompt_length: longest prompt accepted (prompts are truncated by the data pipeline, not here).
      max_response_length: a response that reaches this many tokens ends with finish reason "length" (or
        fewer: a prompt's own `max_tokens`).
      eos_ids: token ids that end a response (finish reason "eos"; the eos is part of the response). Empty:
        responses end by length only.
      steps_per_call: decode steps fused into one device call between looks at the tokens on the host.
      mesh: where the decode state lives: slots and their pages over the mesh's data-parallel axes, KV heads
        over `tensor` (per `rules`). None: the default device.
      rules: logical-axis rules for the decode state's sharding.
      prefill_token_budget: at most this many (padded) prompt tokens are prefilled in one device call.
      min_prefill_bucket: the shortest prefill length bucket (buckets are powers of two, at least a page).
      page_size: cache entries per page, a power of two (a multiple of 16 for the CPU attention kernel).
      num_pages: pages in the pool; None: as many as `memory_utilization` of the devices' free memory holds
        (`pool_pages`), but never more than every slot at full length needs.
      memory_utilization: the share of the devices' free memory (after the decode weights) the pool may take.
    """
    for name, value in (("num_slots", num_slots), ("max_prompt_length", max_prompt_length),
                        ("max_response_length", max_response_length), ("steps_per_call", steps_per_call),
                        ("page_size", page_size)):
      if value < 1:
        raise ValueError(f"GroupSampler: {name} must be positive, got {value}")
    if page_size & (page_size - 1):
      raise ValueError(f"GroupSampler: page_size must be a power of two, got {page_size}")
    if not 0 < memory_utilization <= 1:
      raise ValueError(f"GroupSampler: memory_utilization must be in (0, 1], got {memory_utilization}")
    self.config = config
    self.num_slots = num_slots
    self.max_prompt_length = max_prompt_length
    self.max_response_length = max_response_length
    self.eos_ids = np.asarray(sorted(set(int(i) for i in eos_ids)), np.int32)
    self.steps_per_call = steps_per_call
    self.mesh = mesh
    self.prefill_token_budget = prefill_token_budget
    self.min_prefill_bucket = max(min_prefill_bucket, page_size)
    self.page_size = page_size
    self.memory_utilization = memory_utilization
    self._num_pages = num_pages
    # A response's cache holds its prompt and every response token but the last (which is never fed).
    self.cache_length = max_prompt_length + max_response_length
    self.pages_per_slot = -(-self.cache_length // page_size)
    # Where the decode state lives (None: the default device), its key layout, and the device functions
    # compiled for it (on one CPU device, with the CPU attention kernel).
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    self.keys_transposed = decode_state.keys_transposed_on(platform)
    self.page_shards = decode_state.state_layout(config, mesh, num_slots, rules).page_shards
    self.state_shardings = (decode_state.decode_state_shardings(config, mesh, num_slots, rules)
                            if mesh is not None else None)
    attention_kernel = decoding.attention_kernel_on(platform, mesh.size if mesh is not None else 1, config,
                                                    page_size)
    # The CPU kernel and the TPU and GPU kernels read each slot's visible entries only, whatever the page table's
    # width: decode calls then pass the whole table (one compilation); XLA's attention gathers every page passed.
    self.attention_reads_visible_only = attention_kernel or platform in ("tpu", "gpu")
    mesh_layout = attention_lib.MeshLayout(mesh, tuple(rules)) if mesh is not None else None
    self.param_shardings = (sharding_lib.param_shardings(qwen2.abstract_model(config), mesh,
                                                         sharding_lib.decode_rules(rules))
                            if mesh is not None else None)
    self.functions = decoding.jitted_functions(config, self.state_shardings, self.keys_transposed, attention_kernel,
                                               mesh_layout)
    self.response_keys = jax.jit(jax.vmap(sampling_lib.response_key, in_axes=(None, 0, 0)))
    self.last_run_stats: SamplerStats | None = None
    self._active_run: SamplingRun | None = None

  def decode_weights(self, params: qwen2.Params, greedy: bool = False) -> weight_layout.DecodeWeights:
    """The run's copy of `params` (any layout and dtype, e.g. the trainer's), laid out for prefill and decode
    steps on the sampler's mesh, in one program where the params are on the sampler's devices. Where they are
    not (a sampler on each host's own devices), they are first cast and moved onto them (`sharding.reshard`),
    and that interim copy is freed as soon as the decode weights are made."""
    devices = {device for leaf in jax.tree.leaves(params) for device in leaf.sharding.device_set}
    if self.mesh is None or devices == set(self.mesh.devices.flat):
      return self.functions.decode_weights(params, greedy=greedy)
    interim = sharding_lib.reshard(_cast(params, self.config.dtype), self.param_shardings)
    weights = self.functions.decode_weights(interim, greedy=greedy)
    for leaf in jax.tree.leaves(interim):
      leaf.delete()
    return weights

  def _devices(self) -> list[jax.Device]:
    return list(self.mesh.devices.flat) if self.mesh is not None else jax.devices()[:1]

  def page_bytes_per_device(self) -> int:
    """Bytes one page takes on each device that holds it (its KV heads' share, over all layers)."""
    layout = decode_state.state_layout(self.config, self.mesh, self.num_slots)
    heads_axes = layout.pool_spec[0] if len(layout.pool_spec) else None
    heads_shards = 1
    for axis in ((heads_axes,) if isinstance(heads_axes, str) else heads_axes or ()):
      heads_shards *= self.mesh.shape[axis]
    return decode_state.page_bytes(self.config, self.page_size) // heads_shards

  def pages_for_memory(self, free_bytes_per_device: int) -> int:
    """The pool's pages when each device has `free_bytes_per_device` free: `memory_utilization` of it in pages,
    no more than every slot at full length needs, a whole number per page shard."""
    per_shard = int(free_bytes_per_device * self.memory_utilization) // self.page_bytes_per_device()
    per_shard = min(per_shard, self.num_slots // self.page_shards * self.pages_per_slot)
    return per_shard * self.page_shards

  def pool_pages(self, decode_weights_made: bool = True) -> int:
    """Pages in the pool of every run: `num_pages`, or sized from the devices' free memory the first time it is
    asked (`pages_for_memory`; before the first run, `decode_weights_made=False` sets aside the decode weights
    that a run lays out). Raises PoolTooSmall when a page shard cannot hold one full-length response."""
    if self._num_pages is None:
      free = self._free_memory_per_device()
      if not decode_weights_made:
        free -= self._decode_weights_bytes_per_device()
      self._num_pages = self.pages_for_memory(max(free, 0))
    per_shard = self._num_pages // self.page_shards
    if self._num_pages % self.page_shards or per_shard < self.pages_per_slot:
      raise PoolTooSmall(
          f"the rollout's KV pool of {self._num_pages} pages of {self.page_size} entries "
          f"({self.page_shards} page shard(s)) cannot hold one response of max_prompt_length + max_response_length "
          f"= {self.cache_length} tokens ({self.pages_per_slot} pages) per shard; set rollout.num_pages to at "
          f"least {self.pages_per_slot * self.page_shards} (a multiple of {self.page_shards}), raise "
          "rollout.gpu_memory_utilization, or shorten data.max_prompt_length / data.max_response_length")
    return self._num_pages

  def _free_memory_per_device(self) -> int:
    """Free bytes per device: the allocators' limits less what is in use (TPU, GPU); on CPU the host's available
    memory, shared by its devices."""
    devices = self._devices()
    if devices[0].platform == "cpu":
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // len(devices)
    stats = [device.memory_stats() or {} for device in devices]
    return min(s.get("bytes_limit", 0) - s.get("bytes_in_use", 0) for s in stats)

  def _decode_weights_bytes_per_device(self) -> int:
    """The decode weights a run lays out, per device (tensor parallel: split over `tensor`, when there is one)."""
    arrays = jax.eval_shape(functools.partial(weight_layout.new_decode_arrays, config=self.config),
                            qwen2.abstract_model(self.config).params)
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(arrays))
    return total // (self.mesh.shape.get("tensor", 1) if self.mesh is not None else 1)

  def decode_state_bytes(self) -> int:
    """Bytes of the decode state a run holds (the pool and the slots' vectors), over all its devices."""
    state = jax.eval_shape(lambda: decode_state.init_decode_state(self.config, self.num_slots, self.pool_pages(),
                                                                  self.page_size, keys_transposed=self.keys_transposed))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))

  def start(self, params: qwen2.Params, *, n: int, seed: int,
            sampling: SamplingParams = SamplingParams()) -> SamplingRun:
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
             first_prompt_index: int = 0, max_tokens: Sequence[int] | None = None) -> list[Group]:
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
      max_tokens: per prompt (in order), the most tokens its responses may have (vLLM's max_tokens); default:
        max_response_length for all.

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
          run.submit(next_index, prompt,
                     None if max_tokens is None else max_tokens[next_index - first_prompt_index])
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
