"""Tests for dapo_jax.rollout.engine: JetStream's Engine API over the Qwen2 model, called directly."""
import jax
import numpy as np
import pytest

from dapo_jax.model.tokenizer import load_tokenizer
from dapo_jax.rollout import engine as engine_lib
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import GREEDY, SamplingParams
from jetstream.engine import engine_api
from jetstream.engine import token_utils
from tests.rollout.rollout_fixtures import PARITY_CONFIGS, random_prompts

NEW_TOKENS = 8


def _engine(checkpoint, **kwargs) -> engine_lib.QwenEngine:
  kwargs = dict(dict(num_slots=3, max_prefill_length=32, max_response_length=16), **kwargs)
  return engine_lib.QwenEngine(checkpoint.config, params=checkpoint.params, **kwargs)


def _padded(prompt, length: int = 32) -> np.ndarray:
  """A prompt padded the way JetStream's orchestrator pads it (to one of its prefill buckets)."""
  tokens, true_length = token_utils.pad_tokens(np.asarray(prompt), bos_id=0, pad_id=0, is_bos=False,
                                               max_prefill_length=length, jax_padding=False)
  assert true_length == len(prompt)
  return tokens


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_prefill_insert_generate_greedy_matches_transformers(checkpoints, name):
  checkpoint = checkpoints[name]
  engine = _engine(checkpoint)
  params = engine.load_params()
  prompts = random_prompts(checkpoint.vocab_size, (5, 13, 20), seed=20)
  references = [checkpoint.greedy(prompt, NEW_TOKENS) for prompt in prompts]
  state = engine.init_decode_state()
  streams: dict[int, list[int]] = {}
  slot_of = {0: 2, 1: 0, 2: 1}

  def start(index):
    nonlocal state
    prefix = engine.prefill(params=params, padded_tokens=_padded(prompts[index]), true_length=len(prompts[index]))
    state = engine.insert(prefix, state, slot=slot_of[index])
    streams[index] = []

  def step():
    nonlocal state
    state, result = engine.generate(params, state)
    result = result.convert_to_numpy()
    for index in streams:
      slot_data = result.get_result_at_slot(slot_of[index])
      assert slot_data.valid.all()
      streams[index] += slot_data.tokens[0].tolist()
      assert slot_data.lengths[0] == len(streams[index])  # the response length, first token counted

  # Prompts join at different times, as under JetStream's orchestrator.
  start(0)
  for _ in range(3):
    step()
  start(1)
  start(2)
  while any(len(stream) < NEW_TOKENS for stream in streams.values()):
    step()
  for index, reference in enumerate(references):
    assert streams[index][:NEW_TOKENS] == reference


def test_fused_generate_steps_return_the_same_tokens(checkpoints):
  checkpoint = checkpoints["untied_mqa"]
  prompt = random_prompts(checkpoint.vocab_size, (9,), seed=21)[0]
  engine = _engine(checkpoint, steps_per_generate=4)
  params = engine.load_params()
  prefix = engine.prefill(params=params, padded_tokens=_padded(prompt), true_length=len(prompt))
  state = engine.insert(prefix, engine.init_decode_state(), slot=1)
  tokens = []
  for call in range(2):
    state, result = engine.generate(params, state)
    slot_data = result.convert_to_numpy().get_result_at_slot(1)
    assert slot_data.tokens.shape == (1, 4) and slot_data.lengths[0] == 4 * call + 1
    tokens += slot_data.tokens[0].tolist()
  assert tokens == checkpoint.greedy(prompt, 8)


def test_bulk_insert_samples_a_group_like_the_group_sampler(checkpoints):
  checkpoint = checkpoints["untied_mha"]
  prompts = random_prompts(checkpoint.vocab_size, (7, 10), seed=22)
  sampling = SamplingParams(temperature=1.0, top_k=20)
  engine = _engine(checkpoint, num_slots=4, sampling=sampling, seed=5)
  params = engine.load_params()
  state = engine.init_decode_state()
  groups = []
  # Prompt number 0 and 1 in prefill order, as the group sampler numbers prompts 0 and 1.
  for prompt, slots in zip(prompts, ([3, 0], [1, 2])):
    prefix = engine.prefill_multisampling(params=params, padded_tokens=_padded(prompt), true_length=len(prompt),
                                          num_samples=2)
    state = engine.bulk_insert(prefix, state, slots)
    groups.append(slots)
  tokens = np.zeros((4, 0), np.int32)
  for _ in range(3):
    state, result = engine.generate(params, state)
    tokens = np.concatenate([tokens, result.convert_to_numpy().data[:, :1]], axis=1)
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=4, max_prompt_length=16, max_response_length=3)
  expected = sampler.sample(checkpoint.params, prompts, n=2, seed=5, sampling=sampling)
  for group, slots in zip(expected, groups):
    assert [tokens[slot].tolist() for slot in slots] == [r.token_ids.tolist() for r in group.responses]
  assert tokens[3].tolist() != tokens[0].tolist()  # the two samples of a group draw with their own keys


def test_engine_properties_and_errors(checkpoints):
  checkpoint = checkpoints["tied_gqa"]
  engine = _engine(checkpoint)
  assert isinstance(engine, engine_api.Engine)
  assert engine.max_concurrent_decodes == 3 and engine.samples_per_slot == 1 and engine.max_prefill_length == 32
  assert engine.mesh.devices.size == 1 and engine.colocated_cpus is None
  assert isinstance(engine.get_prefix_destination_sharding(), jax.sharding.NamedSharding)
  params = engine.load_params()
  with pytest.raises(ValueError, match="1 to 32"):
    engine.prefill(params=params, padded_tokens=np.zeros(64, np.int32), true_length=40)
  with pytest.raises(NotImplementedError):
    engine.prefill(params=params, existing_prefix=object(), padded_tokens=_padded([1, 2]), true_length=2)
  prefix = engine.prefill(params=params, padded_tokens=_padded([1, 2]), true_length=2)
  with pytest.raises(ValueError, match="distinct"):
    engine.bulk_insert(prefix, engine.init_decode_state(), [0, 0])
  with pytest.raises(ValueError, match="power of two"):
    _engine(checkpoint, max_prefill_length=48)


def test_jetstream_tokenizer_has_no_bos_and_stops_on_every_eos(qwen_like_checkpoint):
  checkpoint = qwen_like_checkpoint
  tokenizer = load_tokenizer(checkpoint.directory)
  assert tokenizer.bos_id is None
  endoftext, im_end = (tokenizer.encode(token)[0] for token in ("<|endoftext|>", "<|im_end|>"))
  engine = _engine(checkpoint, tokenizer=tokenizer, eos_ids=[im_end, endoftext])
  adapter = engine.build_tokenizer(engine.get_tokenizer())
  assert adapter.bos_id == engine_lib.NO_BOS_ID
  assert adapter.stop_tokens == {im_end, endoftext}
  text = "The quick brown fox"
  padded, true_length = adapter.encode(text, is_bos=True, max_prefill_length=32, jax_padding=False)
  ids = tokenizer.encode(text)
  assert true_length == len(ids) and padded.tolist()[:true_length] == ids and padded.size == 16
  assert adapter.decode(ids) == text
  # Token requests: JetStream prepends the reported bos id; prefill drops the placeholder again.
  params = engine.load_params()
  with_placeholder, length = token_utils.pad_tokens(np.asarray(ids), adapter.bos_id, adapter.pad_id, is_bos=True,
                                                    max_prefill_length=32, jax_padding=False)
  assert with_placeholder[0] == engine_lib.NO_BOS_ID
  prefix = engine.prefill(params=params, padded_tokens=with_placeholder, true_length=length)
  plain = engine.prefill(params=params, padded_tokens=padded, true_length=true_length)
  np.testing.assert_array_equal(prefix.prefix.logits, plain.prefix.logits)
  assert int(prefix.prefix.lengths[0]) == len(ids)
