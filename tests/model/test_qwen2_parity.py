"""Our Qwen2 against transformers' Qwen2ForCausalLM, on random-weight checkpoints saved by transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dapo_jax.model import hf_io, qwen2
from tests.model import hf_fixtures

LOGITS_TOL = 2e-4
LOGPROB_TOL = 1e-4
CONFIG_NAMES = list(hf_fixtures.HF_CONFIGS)


@pytest.fixture(scope="module", params=CONFIG_NAMES)
def checkpoint(request, tmp_path_factory):
  """(name, transformers model in float32, our loaded config and model)."""
  name = request.param
  hf_model = hf_fixtures.make_hf_model(name)
  directory = str(tmp_path_factory.mktemp(name))
  bf16 = name == "bf16_stored"
  hf_fixtures.save_hf_model(hf_model, directory, bf16=bf16)
  if bf16:  # the reference is the bf16-stored weights, upcast, as a user would load them
    hf_model = type(hf_model).from_pretrained(directory, dtype=torch.float32).eval()
  config, model = hf_io.load_hf_checkpoint(directory)
  return name, hf_model, config, model


def _log_softmax(x):
  return np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32), axis=-1))


def _prompts(vocab_size, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab_size, size=n) for n in lengths]


def test_logits_and_logprobs_match_transformers_per_prompt(checkpoint):
  _, hf_model, config, model = checkpoint
  for ids in _prompts(config.vocab_size, [1, 5, 17, 40]):
    ours = np.asarray(model(jnp.asarray(ids[None])))
    ref = hf_fixtures.hf_logits(hf_model, ids[None])
    assert ref.std() > 0.5, "logits too close to uniform for a meaningful comparison"
    np.testing.assert_allclose(ours, ref, atol=LOGITS_TOL, rtol=0)
    np.testing.assert_allclose(_log_softmax(ours), _log_softmax(ref), atol=LOGPROB_TOL, rtol=0)


def test_left_padded_batch_matches_transformers(checkpoint):
  _, hf_model, config, model = checkpoint
  prompts = _prompts(config.vocab_size, [3, 11, 7, 16], seed=1)
  width = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros((len(prompts), width), np.int64)
  for row, p in enumerate(prompts):
    ids[row, width - len(p):] = p
    mask[row, width - len(p):] = 1
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  ref = hf_fixtures.hf_logits(hf_model, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=LOGITS_TOL, rtol=0)
  np.testing.assert_allclose(_log_softmax(ours)[valid], _log_softmax(ref)[valid], atol=LOGPROB_TOL, rtol=0)
  # Each padded row equals the same prompt run alone.
  for row, p in enumerate(prompts):
    alone = np.asarray(model(jnp.asarray(p[None])))[0]
    np.testing.assert_allclose(ours[row, width - len(p):], alone, atol=LOGITS_TOL, rtol=0)


def test_kv_cache_prefill_and_steps_match_full_forward(checkpoint):
  _, _, config, model = checkpoint
  params = model.params
  prompts = _prompts(config.vocab_size, [9, 4, 13], seed=2)
  full = [np.asarray(model(jnp.asarray(p[None])))[0] for p in prompts]
  split = [6, 2, 10]  # prefill the first `split` tokens (right-padded together), then one token at a time
  width = max(split)
  batch = np.zeros((len(prompts), width), np.int32)
  for row, (p, n) in enumerate(zip(prompts, split)):
    batch[row, :n] = p[:n]
  cache = qwen2.init_cache(config, len(prompts), max_length=32)
  extend = jax.jit(qwen2.extend, static_argnums=1)
  logits, cache = extend(params, config, cache, jnp.asarray(batch), jnp.asarray(split, jnp.int32))
  for row, n in enumerate(split):
    np.testing.assert_allclose(np.asarray(logits[row, :n]), full[row][:n], atol=LOGITS_TOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache.lengths), split)
  # Rows advance independently: each step feeds every row its next token (rows that ran out repeat a token
  # that is then not checked).
  for step in range(max(len(p) - n for p, n in zip(prompts, split))):
    tokens = np.array([[p[min(n + step, len(p) - 1)]] for p, n in zip(prompts, split)], np.int32)
    logits, cache = extend(params, config, cache, jnp.asarray(tokens))
    for row, (p, n) in enumerate(zip(prompts, split)):
      if n + step < len(p):
        np.testing.assert_allclose(np.asarray(logits[row, 0]), full[row][n + step], atol=LOGITS_TOL, rtol=0)


def _greedy_with_cache(model, config, prompt, max_new_tokens, eos_id=None):
  params = model.params
  extend = jax.jit(qwen2.extend, static_argnums=1)
  cache = qwen2.init_cache(config, 1, max_length=len(prompt) + max_new_tokens)
  logits, cache = extend(params, config, cache, jnp.asarray(prompt[None], jnp.int32))
  out = []
  token = int(jnp.argmax(logits[0, -1]))
  while True:
    out.append(token)
    if token == eos_id or len(out) == max_new_tokens:
      return out
    logits, cache = extend(params, config, cache, jnp.asarray([[token]], jnp.int32))
    token = int(jnp.argmax(logits[0, -1]))


def test_greedy_decoding_reproduces_transformers_generate(checkpoint):
  _, hf_model, config, model = checkpoint
  prompt = _prompts(config.vocab_size, [7], seed=3)[0]
  max_new = 12

  def hf_generate(eos_id):
    with torch.no_grad():
      out = hf_model.generate(torch.tensor(prompt[None]), do_sample=False, max_new_tokens=max_new,
                              eos_token_id=eos_id, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    return out[0, len(prompt):].tolist()

  no_eos = hf_generate(None)
  assert _greedy_with_cache(model, config, prompt, max_new) == no_eos
  eos_id = no_eos[4]  # a token greedy decoding reaches mid-way, so stopping is exercised
  with_eos = hf_generate(eos_id)
  assert with_eos[-1] == eos_id and len(with_eos) < max_new
  assert _greedy_with_cache(model, config, prompt, max_new, eos_id=eos_id) == with_eos
