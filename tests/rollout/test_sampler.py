"""Tests for dapo_jax.rollout.sampler: the continuous-batching group sampler.

Greedy output is checked token for token against transformers' greedy `generate` on random-weight checkpoints;
sampled output against the softmax and against itself under different batching (it must not depend on it).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rollout import decode_state
from dapo_jax.rollout import decoding
from dapo_jax.rollout import page_table
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout import sampling as sampling_lib
from dapo_jax.rollout.responses import Group
from dapo_jax.rollout.sampling import GREEDY, SamplingParams
from tests.rollout.rollout_fixtures import (PARITY_CONFIGS, chi_square_p_value, eos_ids_hit_by, random_prompts,
                                            truncate_at_eos)

MAX_NEW_TOKENS = 10
PROMPT_LENGTHS = (5, 11, 20)  # two prefill buckets (16, 32)


def _tokens(group: Group) -> list[list[int]]:
  return [response.token_ids.tolist() for response in group.responses]


@pytest.mark.parametrize("with_eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_greedy_matches_transformers_generate(checkpoints, name, with_eos):
  checkpoint = checkpoints[name]
  prompts = random_prompts(checkpoint.vocab_size, PROMPT_LENGTHS, seed=1)
  references = [checkpoint.greedy(prompt, MAX_NEW_TOKENS) for prompt in prompts]
  eos_ids = eos_ids_hit_by(references, positions=(2, 6, 9)) if with_eos else []
  if with_eos:
    references = [checkpoint.greedy(prompt, MAX_NEW_TOKENS, eos_ids) for prompt in prompts]
    assert any(len(reference) < MAX_NEW_TOKENS for reference in references)
  # Fewer slots than responses, and a call length that does not divide the response length: slots are refilled
  # mid-call boundaries and responses end inside calls.
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=2, max_prompt_length=24,
                                     max_response_length=MAX_NEW_TOKENS, eos_ids=eos_ids, steps_per_call=3)
  groups = sampler.sample(checkpoint.params, prompts, n=2, seed=0, sampling=GREEDY)
  assert [group.prompt_index for group in groups] == [0, 1, 2]
  for group, prompt, reference in zip(groups, prompts, references):
    assert group.prompt_ids.tolist() == prompt
    for response in group.responses:
      assert response.token_ids.tolist() == reference
      ended_by_eos = bool(eos_ids) and reference[-1] in eos_ids
      assert response.finish_reason == ("eos" if ended_by_eos else "length")
      np.testing.assert_array_equal(response.logp_sampled, 0.0)
      assert response.logp_full.shape == response.token_ids.shape and np.all(response.logp_full <= 0)


def test_page_table_windows_grow_with_the_responses():
  # XLA's attention gathers every page passed: decode calls pass a power of two of page table columns that
  # covers the live responses, or all columns where attention reads only visible entries anyway.
  table = page_table.PageTable(num_slots=2, page_shards=1, pages_per_shard=60, page_size=16, pages_per_slot=27)
  assert [table.window(n, whole=False).shape[1] for n in (1, 16, 17, 33, 65, 400)] == [1, 1, 2, 4, 8, 27]
  assert table.window(1, whole=True).shape[1] == 27


@pytest.mark.parametrize("page_size", [16, 32])
def test_long_responses_over_many_pages_match_generate(checkpoints, page_size):
  # A cache of 20 + 400 entries: responses cross page after page (and, with XLA's attention, windows of 1 .. 32
  # pages); the tokens are still transformers' greedy ones.
  checkpoint = checkpoints["tied_gqa"]
  prompts = random_prompts(checkpoint.vocab_size, PROMPT_LENGTHS, seed=2)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=2, max_prompt_length=20, max_response_length=400,
                                     steps_per_call=8, page_size=page_size)
  groups = sampler.sample(checkpoint.params, prompts, n=1, seed=0, sampling=GREEDY)
  for group, prompt in zip(groups, prompts):
    assert group.responses[0].token_ids.tolist() == checkpoint.greedy(prompt, 400)


def _start(functions, prefix, state, num_slots, bucket_length, keys, sampling, page_size=16):
  """Inserts prefix row i into slot i, each slot owning a full-length run of pages; returns the state and the
  page table."""
  table = page_table.full_length_table(num_slots, state.num_pages // num_slots)
  writes, starts = page_table.prefix_into_slots(table, np.arange(num_slots), np.arange(num_slots), bucket_length,
                                                page_size, keys)
  return functions.insert(prefix, state, writes, starts, sampling=sampling), table


@pytest.mark.parametrize("name", ["tied_gqa", "untied_mha"])
def test_greedy_decode_weights_give_the_same_steps_and_refuse_sampling(checkpoints, name):
  # Weights made for greedy decoding carry a [vocab, embed] LM head (the embedding itself when tied) and produce
  # [vocab, slots] logits; the tokens and log-probs are those of the sampling-layout weights.
  checkpoint = checkpoints[name]
  config, params = checkpoint.config, checkpoint.params
  functions = decoding.jitted_functions(config)
  prompts = jnp.asarray(random_prompts(config.vocab_size, (8, 8, 8), seed=5), jnp.int32)
  prefix = functions.prefill(functions.decode_weights(params), prompts, jnp.full((3,), 8, jnp.int32))
  keys = jnp.zeros((3, 2), jnp.uint32)
  outputs = []
  for greedy in (False, True):
    weights = functions.decode_weights(params, greedy=greedy)
    assert ("unembed" in weights.head) == greedy
    if greedy and config.tie_word_embeddings:
      assert weights.head["unembed"] is weights.head["embed"]  # one copy of the tied matrix
    state = decode_state.init_decode_state(config, 3, 3 * 4, 8)  # 8-entry pages: the prompts' bucket is one
    state, table = _start(functions, prefix, state, 3, 8, keys, GREEDY, page_size=8)
    state, out = functions.decode_steps(weights, state, table, num_steps=6, sampling=GREEDY)
    outputs.append(out)
  np.testing.assert_array_equal(outputs[0].tokens, outputs[1].tokens)
  np.testing.assert_allclose(outputs[0].logp_full, outputs[1].logp_full, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="greedy"):
    functions.decode_steps(weights, state, table, num_steps=1, sampling=SamplingParams(temperature=1.0))


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0, top_p=0.9)])
@pytest.mark.parametrize("name", ["untied_mqa", "tied_gqa"])
def test_key_cache_layouts_and_the_cpu_attention_kernel_decode_the_same_tokens(checkpoints, name, sampling):
  # CPU stores keys [kv_heads, pages, head_dim, page_size]; TPU and GPU store them like the values
  # (`decode_state.keys_transposed_on`). Forced here on CPU, the second layout gives the same responses, and so does
  # the CPU attention kernel (`cpu_attention.py`) on the first, where it applies (tied_gqa's head size 16; not
  # untied_mqa's 8) and builds; so does a window of the page table.
  checkpoint = checkpoints[name]
  config, params = checkpoint.config, checkpoint.params
  assert decode_state.keys_transposed_on("cpu") and not decode_state.keys_transposed_on("tpu")
  prompts = random_prompts(config.vocab_size, (5, 11, 16), seed=6)
  tokens = np.zeros((4, 16), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  lengths = np.asarray([len(p) for p in prompts] + [1], np.int32)
  keys = jax.vmap(sampling_lib.response_key, in_axes=(None, 0, None))(0, jnp.arange(4), 0)
  variants = [(True, False), (False, False)] + ([(True, True)] if decoding.attention_kernel_on("cpu", 1, config, 16)
                                                 else [])
  outputs = []
  for keys_transposed, attention_kernel in variants:
    functions = decoding.jitted_functions(config, None, keys_transposed, attention_kernel)
    weights = functions.decode_weights(params, greedy=sampling.greedy)
    state = decode_state.init_decode_state(config, 4, 4 * 3, 16, keys_transposed=keys_transposed)
    prefix = functions.prefill(weights, tokens, lengths)
    state, table = _start(functions, prefix, state, 4, 16, keys, sampling)
    state, first = functions.decode_steps(weights, state, table[:, :2], num_steps=8, sampling=sampling)
    state, second = functions.decode_steps(weights, state, table, num_steps=8, sampling=sampling)
    outputs.append(jax.tree.map(lambda a, b: np.concatenate([a, b], axis=1), tuple(first), tuple(second)))
  for output in outputs[1:]:
    np.testing.assert_array_equal(output[0], outputs[0][0])
    for got, expected in zip(output[1:], outputs[0][1:]):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_greedy_logp_full_is_the_models_log_softmax(checkpoints):
  checkpoint = checkpoints["tied_gqa"]
  prompt = random_prompts(checkpoint.vocab_size, (7,), seed=2)[0]
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=1, max_prompt_length=8, max_response_length=6)
  response = sampler.sample(checkpoint.params, [prompt], n=1, seed=0, sampling=GREEDY)[0].responses[0]
  sequence = jnp.asarray([prompt + response.token_ids.tolist()])
  log_probs = jax.nn.log_softmax(qwen2.forward(checkpoint.params, checkpoint.config, sequence)[0], axis=-1)
  expected = log_probs[len(prompt) - 1:-1][jnp.arange(6), response.token_ids]
  np.testing.assert_allclose(response.logp_full, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def mixed_run(checkpoints):
  """Sampled groups of prompts whose responses end at many different lengths, in one batched run."""
  checkpoint = checkpoints["untied_mha"]
  prompts = random_prompts(checkpoint.vocab_size, (3, 9, 17, 4, 12, 6), seed=3)
  # A fifth of the vocabulary ends a response: lengths spread over 1 .. max.
  eos_ids = list(range(0, checkpoint.vocab_size, 5))
  sampling = SamplingParams(temperature=1.0, top_p=0.95)
  kwargs = dict(max_prompt_length=20, max_response_length=12, eos_ids=eos_ids)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=5, steps_per_call=4, **kwargs)
  order = []
  groups = sampler.sample(checkpoint.params, prompts, n=3, seed=7, sampling=sampling,
                          on_group_done=lambda index, responses: order.append(index))
  return dict(checkpoint=checkpoint, prompts=prompts, sampling=sampling, kwargs=kwargs, groups=groups, order=order)


def test_continuous_batching_returns_what_each_prompt_alone_returns(mixed_run):
  checkpoint, groups = mixed_run["checkpoint"], mixed_run["groups"]
  lengths = {len(response.token_ids) for group in groups for response in group.responses}
  reasons = {response.finish_reason for group in groups for response in group.responses}
  assert len(lengths) >= 4 and reasons == {"eos", "length"}, "the case should mix response lengths"
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=5, steps_per_call=4, **mixed_run["kwargs"])
  for index, prompt in enumerate(mixed_run["prompts"]):
    alone = sampler.sample(checkpoint.params, [prompt], n=3, seed=7, sampling=mixed_run["sampling"],
                           first_prompt_index=index)
    assert len(alone) == 1 and alone[0].prompt_index == index
    assert _tokens(alone[0]) == _tokens(groups[index])
    for ours, theirs in zip(alone[0].responses, groups[index].responses):
      assert ours.finish_reason == theirs.finish_reason
      np.testing.assert_allclose(ours.logp_full, theirs.logp_full, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(ours.logp_sampled, theirs.logp_sampled, rtol=1e-5, atol=1e-6)


def test_output_does_not_depend_on_slot_count_or_call_length(mixed_run):
  checkpoint = mixed_run["checkpoint"]
  for num_slots, steps_per_call in ((1, 1), (2, 5)):
    sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=num_slots, steps_per_call=steps_per_call,
                                       **mixed_run["kwargs"])
    groups = sampler.sample(checkpoint.params, mixed_run["prompts"], n=3, seed=7, sampling=mixed_run["sampling"])
    assert [_tokens(group) for group in groups] == [_tokens(group) for group in mixed_run["groups"]]


@pytest.mark.parametrize("page_size,num_pages", [(32, 64), (16, 2), (32, 1)], ids=["32x64", "16x2", "32x1"])
def test_output_does_not_depend_on_pages_pool_size_or_admission_order(mixed_run, page_size, num_pages):
  # Pool sizes down to one full-length response (20 + 12 entries: two 16-entry pages, where responses grow into
  # a second page and are preempted and recomputed over and over; or one 32-entry page, where one response runs
  # at a time); prompts submitted in reverse order.
  checkpoint = mixed_run["checkpoint"]
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=5, steps_per_call=4, page_size=page_size,
                                     num_pages=num_pages, **mixed_run["kwargs"])
  with sampler.start(checkpoint.params, n=3, seed=7, sampling=mixed_run["sampling"]) as run:
    for index in reversed(range(len(mixed_run["prompts"]))):
      run.submit(index, mixed_run["prompts"][index])
    groups = []
    while not run.idle:
      groups += run.step()
  groups.sort(key=lambda group: group.prompt_index)
  if page_size == 16:
    assert run.stats.preemptions > 0 and run.stats.readmissions == run.stats.preemptions
  if num_pages == 1:
    assert run.stats.used_pages == run.stats.decode_calls
  assert [_tokens(group) for group in groups] == [_tokens(group) for group in mixed_run["groups"]]
  for group, reference in zip(groups, mixed_run["groups"]):
    for ours, theirs in zip(group.responses, reference.responses):
      assert ours.finish_reason == theirs.finish_reason
      np.testing.assert_allclose(ours.logp_full, theirs.logp_full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_eos", [False, True], ids=["no_eos", "eos"])
def test_greedy_with_preemptions_matches_transformers_generate(checkpoints, with_eos):
  # A pool of two 16-entry pages, the least that holds one response of 24 + 8 entries: the response of the lowest
  # group id runs, the others wait or are preempted and recomputed, and every response is still transformers'.
  checkpoint = checkpoints["tied_gqa"]  # head size 16: the CPU attention kernel's paths
  prompts = random_prompts(checkpoint.vocab_size, PROMPT_LENGTHS, seed=11)
  references = [checkpoint.greedy(prompt, 8) for prompt in prompts]
  eos_ids = eos_ids_hit_by(references, positions=(2, 5)) if with_eos else []
  if with_eos:
    references = [checkpoint.greedy(prompt, 8, eos_ids) for prompt in prompts]
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=3, max_prompt_length=24, max_response_length=8,
                                     eos_ids=eos_ids, steps_per_call=3, num_pages=2)
  groups = sampler.sample(checkpoint.params, prompts, n=2, seed=0, sampling=GREEDY)
  assert sampler.last_run_stats.preemptions > 0
  for group, reference in zip(groups, references):
    assert [response.token_ids.tolist() for response in group.responses] == [reference, reference]


def test_a_pool_too_small_for_one_response_is_refused():
  config = get_preset("tiny", dtype=jnp.float32)
  sampler = sampler_lib.GroupSampler(config, num_slots=2, max_prompt_length=20, max_response_length=30,
                                     num_pages=3)  # 50 entries need four 16-entry pages
  with pytest.raises(sampler_lib.PoolTooSmall, match=r"rollout\.num_pages to at least 4"):
    sampler.pool_pages()
  assert sampler_lib.GroupSampler(config, num_slots=2, max_prompt_length=20, max_response_length=30,
                                  num_pages=4).pool_pages() == 4
  # Sized from memory: never more than every slot at full length needs; too little memory is refused too.
  sampler = sampler_lib.GroupSampler(config, num_slots=2, max_prompt_length=20, max_response_length=30)
  assert sampler.pages_for_memory(1 << 40) == 2 * 4
  assert sampler.pages_for_memory(3 * sampler.page_bytes_per_device() * 2) == 3  # half of the free memory
  monkey = sampler_lib.GroupSampler(config, num_slots=2, max_prompt_length=20, max_response_length=30,
                                    memory_utilization=0.01)
  monkey._free_memory_per_device = lambda: 100 * monkey.page_bytes_per_device()
  with pytest.raises(sampler_lib.PoolTooSmall, match="rollout.gpu_memory_utilization"):
    monkey.pool_pages()


def test_samples_of_a_group_differ_and_seeds_matter(mixed_run):
  checkpoint, groups = mixed_run["checkpoint"], mixed_run["groups"]
  assert any(len({tuple(tokens) for tokens in _tokens(group)}) > 1 for group in groups)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=5, steps_per_call=4, **mixed_run["kwargs"])
  other_seed = sampler.sample(checkpoint.params, mixed_run["prompts"], n=3, seed=8, sampling=mixed_run["sampling"])
  assert [_tokens(group) for group in other_seed] != [_tokens(group) for group in groups]


def test_truncated_sampling_logprobs_are_consistent(mixed_run):
  for group in mixed_run["groups"]:
    for response in group.responses:
      # Truncation only removes mass: the kept distribution gives each kept token at least its full probability.
      assert np.all(response.logp_sampled >= response.logp_full - 1e-6)
      assert np.all(response.logp_sampled <= 1e-6)


def test_groups_stream_out_in_completion_order(mixed_run):
  order, groups = mixed_run["order"], mixed_run["groups"]
  assert sorted(order) == list(range(len(groups)))
  assert order != sorted(order), "the case should have a later prompt finish before an earlier one"


def test_groups_come_out_of_step_as_they_finish(checkpoints):
  checkpoint = checkpoints["tied_gqa"]
  prompts = random_prompts(checkpoint.vocab_size, (6, 8), seed=4)
  long_reference = checkpoint.greedy(prompts[0], 12)
  short_reference = checkpoint.greedy(prompts[1], 12)
  # An eos that ends prompt 1's response after two tokens but never appears in prompt 0's.
  eos = short_reference[1]
  assert eos not in long_reference and eos not in short_reference[:1]
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=4, max_prompt_length=8, max_response_length=12,
                                     eos_ids=[eos], steps_per_call=2)
  finished_at = {}
  with sampler.start(checkpoint.params, n=2, seed=0, sampling=GREEDY) as run:
    run.submit(0, prompts[0])
    run.submit(1, prompts[1])
    while not run.idle:
      for group in run.step():
        finished_at[group.prompt_index] = run.stats.decode_calls
  # Prompt 1 ends in the first call (2 tokens); prompt 0 runs 12 tokens, 6 calls.
  assert finished_at == {1: 1, 0: 6}


def test_a_group_shares_one_prefill(checkpoints):
  checkpoint = checkpoints["untied_mqa"]
  prompts = random_prompts(checkpoint.vocab_size, (5, 6, 30, 7), seed=5)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=3, max_prompt_length=32, max_response_length=4,
                                     steps_per_call=2)
  # Groups of 5 over 3 slots: every group is inserted in parts, from the one prefix.
  with sampler.start(checkpoint.params, n=5, seed=0, sampling=SamplingParams(temperature=1.0)) as run:
    for index, prompt in enumerate(prompts):
      run.submit(index, prompt)
    groups = []
    while not run.idle:
      groups += run.step()
    stats = run.stats
  assert sorted(group.prompt_index for group in groups) == [0, 1, 2, 3]
  assert all(len(group.responses) == 5 for group in groups)
  assert stats.prefilled_prompts == 4
  assert stats.prefill_calls <= 4
  assert stats.generated_tokens == 4 * 5 * 4


def test_prompts_of_one_bucket_are_prefilled_together(checkpoints):
  checkpoint = checkpoints["untied_mqa"]
  prompts = random_prompts(checkpoint.vocab_size, (5, 6, 7, 8), seed=6)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=8, max_prompt_length=16, max_response_length=2)
  with sampler.start(checkpoint.params, n=2, seed=0, sampling=GREEDY) as run:
    for index, prompt in enumerate(prompts):
      run.submit(index, prompt)
    while not run.idle:
      run.step()
    assert run.stats.prefill_calls == 1 and run.stats.prefilled_prompts == 4


def test_admit_stops_admission_and_is_done_cancels(checkpoints):
  checkpoint = checkpoints["tied_gqa"]
  prompts = random_prompts(checkpoint.vocab_size, (4,) * 6, seed=7)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=2, max_prompt_length=8, max_response_length=3)
  pulled = []

  def prompt_stream():
    for prompt in prompts:
      pulled.append(len(pulled))
      yield prompt

  groups = sampler.sample(checkpoint.params, prompt_stream(), n=1, seed=0, admit=lambda index: index < 3)
  assert [group.prompt_index for group in groups] == [0, 1, 2]
  assert pulled == [0, 1, 2]  # prompts are pulled lazily: nothing past the refusal
  done = []
  groups = sampler.sample(checkpoint.params, prompts, n=1, seed=0, on_group_done=lambda i, r: done.append(i),
                          is_done=lambda: len(done) >= 1)
  assert len(groups) == 1 and len(done) == 1


def test_cancel_drops_queued_and_running_prompts(checkpoints):
  checkpoint = checkpoints["tied_gqa"]
  prompts = random_prompts(checkpoint.vocab_size, (4, 5, 6), seed=8)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=2, max_prompt_length=8, max_response_length=8,
                                     steps_per_call=2)
  with sampler.start(checkpoint.params, n=2, seed=0, sampling=GREEDY) as run:
    for index, prompt in enumerate(prompts):
      run.submit(index, prompt)
    assert not run.has_room()
    assert run.step() == []  # prompt 0 runs in both slots
    run.cancel([0, 2])  # one running, one queued
    assert run.free_slots == 2 and not run.idle  # prompt 1 is still queued
    groups = []
    while not run.idle:
      groups += run.step()
  assert [group.prompt_index for group in groups] == [1]
  assert _tokens(groups[0]) == [checkpoint.greedy(prompts[1], 8)] * 2


def test_bad_prompts_are_rejected(checkpoints):
  checkpoint = checkpoints["tied_gqa"]
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=1, max_prompt_length=4, max_response_length=2)
  with sampler.start(checkpoint.params, n=1, seed=0) as run:
    with pytest.raises(ValueError, match="max_prompt_length"):
      run.submit(0, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="max_prompt_length"):
      run.submit(0, [])
    with pytest.raises(ValueError, match="token ids"):
      run.submit(0, [checkpoint.vocab_size])
    run.submit(0, [1])
    with pytest.raises(ValueError, match="already in flight"):
      run.submit(0, [2])
    with pytest.raises(RuntimeError, match="already open"):
      sampler.start(checkpoint.params, n=1, seed=0)


def test_first_token_distribution_matches_the_softmax(checkpoints):
  checkpoint = checkpoints["untied_mha"]
  prompt = random_prompts(checkpoint.vocab_size, (6,), seed=9)[0]
  temperature = 1.5  # flattens the random model's peaked distribution: more categories get tested
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=256, max_prompt_length=8, max_response_length=1,
                                     steps_per_call=1)
  group = sampler.sample(checkpoint.params, [prompt], n=4096, seed=11,
                         sampling=SamplingParams(temperature=temperature))[0]
  first_tokens = np.array([response.token_ids[0] for response in group.responses])
  logits = qwen2.forward(checkpoint.params, checkpoint.config, jnp.asarray([prompt]))[0, -1]
  probs = np.asarray(jax.nn.softmax(logits / temperature), np.float64)
  assert np.sum(probs * first_tokens.size >= 10) >= 5  # enough frequent tokens for the test to have power
  assert chi_square_p_value(first_tokens, probs) > 1e-3


SAMPLER_MESH_SHAPES = [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 2, "tensor": 4},
    {"data": 1, "fsdp": 8, "tensor": 1},
]


@pytest.fixture(scope="module")
def one_device_greedy(checkpoints):
  """Greedy groups on one device of prompts in two prefill buckets, some responses ended by an eos."""
  checkpoint = checkpoints["untied_mha"]  # 4 KV heads and vocab 72: every axis below divides them
  prompts = random_prompts(checkpoint.vocab_size, (5, 11, 20, 3, 9), seed=10)
  references = [checkpoint.greedy(prompt, MAX_NEW_TOKENS) for prompt in prompts]
  eos_ids = eos_ids_hit_by(references, positions=(3, 7))
  kwargs = dict(max_prompt_length=24, max_response_length=MAX_NEW_TOKENS, eos_ids=eos_ids, steps_per_call=3)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=8, **kwargs)
  groups = sampler.sample(checkpoint.params, prompts, n=2, seed=0, sampling=GREEDY)
  assert any(len(response.token_ids) < MAX_NEW_TOKENS for group in groups for response in group.responses)
  return dict(checkpoint=checkpoint, prompts=prompts, kwargs=kwargs, groups=groups)


@pytest.mark.parametrize("mesh_shape", SAMPLER_MESH_SHAPES, ids=lambda s: "x".join(str(v) for v in s.values()))
def test_greedy_on_a_mesh_matches_one_device(one_device_greedy, mesh_shape):
  checkpoint = one_device_greedy["checkpoint"]
  mesh = sharding_lib.make_mesh(mesh_shape)
  model = qwen2.abstract_model(checkpoint.config)
  # The trainer's layout (FSDP + tensor parallel), then the weight sync into the sampler's (tensor parallel only).
  trainer_params = sharding_lib.shard_params(checkpoint.params, sharding_lib.param_shardings(model, mesh))
  decode_shardings = sharding_lib.param_shardings(model, mesh, sharding_lib.DECODE_RULES)
  params = sharding_lib.reshard(trainer_params, decode_shardings)
  for leaf, target in zip(jax.tree.leaves(params), jax.tree.leaves(decode_shardings)):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=8, mesh=mesh, **one_device_greedy["kwargs"])
  expected_pool = sampler.state_shardings.k[0]  # [kv_heads, pages, ...]: pages over the slots' axes
  assert expected_pool.spec[1] is not None or mesh_shape["data"] * mesh_shape["fsdp"] == 1
  with sampler.start(params, n=2, seed=0, sampling=GREEDY) as run:
    for index, prompt in enumerate(one_device_greedy["prompts"]):
      run.submit(index, prompt)
    groups = []
    while not run.idle:
      groups += run.step()
      # The KV pool stays in its declared sharding (pages over data x fsdp, KV heads over tensor).
      for cache, target in zip(run._state.k + run._state.v, sampler.state_shardings.k + sampler.state_shardings.v):
        assert cache.sharding.is_equivalent_to(target, cache.ndim)
  groups.sort(key=lambda group: group.prompt_index)
  assert [_tokens(group) for group in groups] == [_tokens(group) for group in one_device_greedy["groups"]]
  for group, reference in zip(groups, one_device_greedy["groups"]):
    for ours, theirs in zip(group.responses, reference.responses):
      assert ours.finish_reason == theirs.finish_reason
      np.testing.assert_allclose(ours.logp_full, theirs.logp_full, rtol=1e-5, atol=1e-6)
