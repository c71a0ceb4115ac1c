"""Tests for dapo_jax.rollout.sampling: the per-row token choice and its two log-probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dapo_jax.rollout import sampling
from dapo_jax.rollout.sampling import SamplingParams
from tests.rollout.rollout_fixtures import chi_square_p_value


def _keys(count: int, seed: int = 0) -> jax.Array:
  return jax.random.split(jax.random.key(seed), count)


def _sample_many(logits_row: np.ndarray, params: SamplingParams, count: int, seed: int = 0):
  """`count` independent draws from one row of logits (the row repeated, one key per draw)."""
  logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (count, logits_row.size))
  return jax.tree.map(np.asarray, jax.jit(sampling.sample_tokens, static_argnums=2)(logits, _keys(count, seed),
                                                                                    params))


def _hf_kept(logits_row: np.ndarray, params: SamplingParams) -> np.ndarray:
  """The tokens transformers' warpers (temperature, top-k, top-p, in generate's order) leave possible."""
  scores = torch.tensor(logits_row[None], dtype=torch.float32)
  warpers = [transformers.TemperatureLogitsWarper(params.temperature)]
  if params.top_k:
    warpers.append(transformers.TopKLogitsWarper(params.top_k))
  if params.top_p < 1.0:
    warpers.append(transformers.TopPLogitsWarper(params.top_p))
  for warper in warpers:
    scores = warper(None, scores)
  return np.isfinite(scores[0].numpy())


@pytest.fixture(scope="module")
def logits_row() -> np.ndarray:
  """A skewed distribution over 40 tokens: a few likely ones and a long tail."""
  rng = np.random.default_rng(0)
  return (rng.normal(size=40) * 2.0).astype(np.float32)


def test_greedy_is_argmax_first_on_ties():
  logits = jnp.array([[0.0, 3.0, 1.0, 3.0], [5.0, -1.0, 5.0, 2.0], [-2.0, -1.0, -3.0, -1.5]])
  out = sampling.sample_tokens(logits, _keys(3), sampling.GREEDY)
  np.testing.assert_array_equal(out.tokens, [1, 0, 1])
  np.testing.assert_array_equal(out.logp_sampled, [0.0, 0.0, 0.0])
  expected = jax.nn.log_softmax(logits)[jnp.arange(3), out.tokens]
  np.testing.assert_allclose(out.logp_full, expected, rtol=1e-6)



@pytest.mark.parametrize("vocab", [64, 1000, 32000, 151936, 997])  # 997 is prime: no block size divides it
def test_greedy_is_the_first_argmax_across_vocabulary_blocks(vocab):
  # The search goes block by block (the first block holding the maximum, then the first index in it); ties
  # within a block, across blocks and at block edges must still give the first index, as torch.argmax does.
  rng = np.random.default_rng(vocab)
  logits = rng.normal(size=(6, vocab)).astype(np.float32)
  positions = [(0, [vocab - 1]), (1, [0, vocab - 1]), (2, [vocab // 2, vocab // 2 + 1]),
               (3, [vocab - 2, 5, vocab // 3]), (4, [i for i in (127, 128, 255, 256) if i < vocab]), (5, [])]
  for row, tied in positions:
    logits[row, tied] = 10.0
  out = sampling.sample_tokens(jnp.asarray(logits), _keys(6), sampling.GREEDY)
  np.testing.assert_array_equal(out.tokens, torch.argmax(torch.from_numpy(logits), dim=-1).numpy())
  expected = jax.nn.log_softmax(jnp.asarray(logits))[jnp.arange(6), out.tokens]
  np.testing.assert_allclose(out.logp_full, expected, rtol=1e-5, atol=1e-6)
  # The same choice from the [vocab, batch] layout greedy decode steps use.
  columns = sampling.greedy_vocab_major(jnp.asarray(logits.T))
  np.testing.assert_array_equal(columns.tokens, out.tokens)
  np.testing.assert_allclose(columns.logp_full, out.logp_full, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(columns.logp_sampled, 0.0)

def test_untruncated_sampling_matches_the_softmax(logits_row):
  temperature = 0.8
  out = _sample_many(logits_row, SamplingParams(temperature=temperature), 20000)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits_row) / temperature))
  assert chi_square_p_value(out.tokens, probs) > 1e-3
  expected_logp = np.log(probs)[out.tokens]
  np.testing.assert_allclose(out.logp_full, expected_logp, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out.logp_sampled, out.logp_full)


@pytest.mark.parametrize("params", [SamplingParams(1.0, top_p=0.7), SamplingParams(1.3, top_k=5),
                                    SamplingParams(0.9, top_p=0.6, top_k=8)], ids=str)
def test_truncated_sampling_stays_in_transformers_kept_set_and_matches_it(logits_row, params):
  kept = _hf_kept(logits_row, params)
  assert 1 < kept.sum() < kept.size  # the case truncates, and leaves a choice
  out = _sample_many(logits_row, params, 20000, seed=1)
  assert kept[out.tokens].all(), "sampled a token outside the nucleus / top-k"
  full = np.asarray(jax.nn.softmax(jnp.asarray(logits_row) / params.temperature))
  truncated = np.where(kept, full, 0.0) / full[kept].sum()
  assert chi_square_p_value(out.tokens, truncated) > 1e-3
  np.testing.assert_allclose(out.logp_full, np.log(full)[out.tokens], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.logp_sampled, np.log(truncated[out.tokens]), rtol=1e-4, atol=1e-5)


def test_inverse_cdf_across_vocabulary_blocks_by_hand():
  # 512 entries are two blocks of 256. Mass 1 at 3, 1 at 255 (the first block's last entry), 2 at 256 (the
  # second block's first) and 2 at 300; total 6. A threshold u * 6 picks the first entry whose cumulative sum
  # exceeds it (at 3, 255, 256, 300: 1, 2, 4, 6); the zeros are never picked, not even at u -> 1, where every
  # cumulative sum from 300 on equals the total.
  probs = np.zeros(512, np.float32)
  probs[[3, 255, 256, 300]] = [1.0, 1.0, 2.0, 2.0]
  uniforms = jnp.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.9999999])
  rows = jnp.broadcast_to(jnp.asarray(probs), (uniforms.size, 512))
  np.testing.assert_array_equal(sampling._invert_cdf(rows, uniforms), [3, 3, 255, 255, 256, 256, 300, 300])


@pytest.mark.parametrize("vocab", [4096, 151936])  # blocks of 256 and 128 (Qwen2.5's vocabulary)
def test_untruncated_sampling_over_many_blocks_matches_the_softmax(vocab):
  # 40 possible tokens spread over the vocabulary's blocks (block edges included), the rest impossible.
  rng = np.random.default_rng(vocab)
  possible = np.unique(np.concatenate([rng.choice(vocab, 34, replace=False), [0, 255, 256, 511, vocab - 1]]))
  logits_row = np.full(vocab, -np.inf, np.float32)
  logits_row[possible] = rng.normal(size=possible.size) * 1.5
  out = _sample_many(logits_row, SamplingParams(temperature=1.0), 6000, seed=2)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits_row)))
  assert np.isin(out.tokens, possible).all(), "sampled an impossible token"
  assert chi_square_p_value(out.tokens, probs) > 1e-3
  np.testing.assert_allclose(out.logp_full, np.log(probs[out.tokens]), rtol=1e-4, atol=1e-5)


def test_top_p_nucleus_is_the_smallest_prefix_reaching_p():
  # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 needs the first two, 0.81 the first three.
  logits = np.log(np.array([0.15, 0.5, 0.05, 0.3], np.float32))
  for top_p, nucleus in ((0.5, {1}), (0.79, {1, 3}), (0.81, {0, 1, 3}), (0.99, {0, 1, 2, 3})):
    out = _sample_many(logits, SamplingParams(1.0, top_p=top_p), 4000, seed=2)
    assert set(np.unique(out.tokens)) == nucleus, top_p


def test_draws_depend_only_on_their_own_key_and_row(logits_row):
  other = np.random.default_rng(5).normal(size=(7, 40)).astype(np.float32)
  keys = _keys(8, seed=3)
  params = SamplingParams(1.0, top_p=0.9)
  together = sampling.sample_tokens(jnp.asarray(np.vstack([other, logits_row[None]])), keys, params)
  alone = sampling.sample_tokens(jnp.asarray(logits_row[None]), keys[7:], params)
  assert int(together.tokens[7]) == int(alone.tokens[0])


def test_response_keys_separate_prompts_samples_and_positions():
  keys = {(p, s): np.asarray(sampling.response_key(0, p, s)) for p in range(3) for s in range(3)}
  assert len({k.tobytes() for k in keys.values()}) == 9
  np.testing.assert_array_equal(keys[(1, 2)], sampling.response_key(0, 1, 2))
  assert not np.array_equal(sampling.response_key(1, 1, 2), keys[(1, 2)])
  positions = sampling.token_keys(jnp.stack([keys[(0, 0)]] * 3), jnp.arange(3))
  assert len({np.asarray(jax.random.key_data(k)).tobytes() for k in positions}) == 3


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_invalid_parameters_are_rejected(kwargs):
  with pytest.raises(ValueError, match="SamplingParams"):
    SamplingParams(**kwargs)
