"""The jitted old-logprob pass and mini-batch update on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rl import batching
from dapo_jax.rl import step

CONFIG = get_preset("tiny").replace(vocab_size=64)


def _params(seed=0):
  return qwen2.Qwen2(CONFIG, rngs=nnx.Rngs(seed)).params


def _batch(seed=0, batch_size=4, prompt_len=5, response_len=6):
  """Left-padded prompts and right-padded responses of varied lengths (one response has a single token)."""
  rng = np.random.default_rng(seed)
  prompt_lengths = rng.integers(1, prompt_len + 1, batch_size)
  response_lengths = np.array([response_len, 1, 4, 3, 6, 2, 5, 6][:batch_size])
  prompt_ids = rng.integers(0, CONFIG.vocab_size, (batch_size, prompt_len))
  prompt_mask = (np.arange(prompt_len)[None] >= prompt_len - prompt_lengths[:, None]).astype(np.int32)
  response_ids = rng.integers(0, CONFIG.vocab_size, (batch_size, response_len))
  response_mask = (np.arange(response_len)[None] < response_lengths[:, None]).astype(np.int32)
  return {"prompt_ids": prompt_ids * prompt_mask, "prompt_mask": prompt_mask,
          "response_ids": response_ids * response_mask, "response_mask": response_mask}


def test_response_logprobs_match_an_independent_computation():
  params, batch, temperature = _params(), _batch(), 0.7
  tokens = np.concatenate([batch["prompt_ids"], batch["response_ids"]], 1)
  mask = np.concatenate([batch["prompt_mask"], batch["response_mask"]], 1)
  logits = np.asarray(qwen2.forward(params, CONFIG, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
  log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
  prompt_len = batch["prompt_ids"].shape[1]
  expected = np.zeros(batch["response_ids"].shape)
  expected_entropy = np.zeros(batch["response_ids"].shape)
  for b in range(tokens.shape[0]):
    for t in range(batch["response_ids"].shape[1]):
      row = np.asarray(log_probs[b, prompt_len + t - 1])
      expected[b, t] = row[batch["response_ids"][b, t]]
      expected_entropy[b, t] = -(np.exp(row) * row).sum()
  valid = batch["response_mask"] > 0
  old = _updater(temperature=temperature).old_log_probs(params, batch)
  np.testing.assert_allclose(np.asarray(old)[valid], expected[valid], atol=1e-5)
  assert np.all(np.asarray(old)[~valid] == 0)
  for chunk_size in (0, 4, 1):  # 4 does not divide the 6 response tokens
    logp, entropy = step.response_logprobs(params, CONFIG, batch, temperature=temperature,
                                           chunk_size=chunk_size, with_entropy=True)
    np.testing.assert_allclose(np.asarray(logp)[valid], expected[valid], atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy)[valid], expected_entropy[valid], atol=1e-5)


def test_learning_rate_schedule_counts_rollout_steps():
  # lr 1e-6, W = 10: (k + 1) / W * lr, then flat; the first step is not a no-op (verl's k / W would be).
  assert step.learning_rate_at(0, 1e-6, 10) == pytest.approx(1e-7)
  assert step.learning_rate_at(4, 1e-6, 10) == pytest.approx(5e-7)
  assert step.learning_rate_at(9, 1e-6, 10) == pytest.approx(1e-6)
  assert step.learning_rate_at(50, 1e-6, 10) == pytest.approx(1e-6)
  assert step.learning_rate_at(0, 3e-4, 0) == pytest.approx(3e-4)


def _updater(**loss_settings):
  return step.Updater(optimizer=step.make_optimizer(learning_rate=1e-3), model_config=CONFIG,
                      loss_config=step.LossConfig(**loss_settings))


def _with_rl_fields(batch, params, advantages):
  batch = dict(batch)
  batch["advantages"] = np.asarray(advantages, np.float32)
  batch["old_logp"] = np.asarray(_updater().old_log_probs(params, batch))
  return batch


def _split(batch, sizes):
  """Micro-batches of the given row counts, each trimmed to its own longest response (different shapes)."""
  out, start = [], 0
  for size in sizes:
    micro = {k: v[start:start + size] for k, v in batch.items()}
    width = max(int(micro["response_mask"].sum(1).max()), 1)
    for key in ("response_ids", "response_mask", "old_logp"):
      micro[key] = micro[key][:, :width]
    out.append(micro)
    start += size
  return out


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_update_raises_logprobs_of_positively_advantaged_tokens():
  params = _params(1)
  batch = _with_rl_fields(_batch(1), params, [1.0, 1.0, 1.0, 1.0])
  optimizer = step.make_optimizer(learning_rate=1e-3, weight_decay=0.0)
  opt_state = optimizer.init(params)
  updater = step.Updater(optimizer=optimizer, model_config=CONFIG, loss_config=step.LossConfig())
  valid = batch["response_mask"] > 0
  before = np.asarray(batch["old_logp"])[valid].mean()
  losses = []
  for _ in range(3):
    params, opt_state, metrics = updater(params, opt_state, [batch], learning_rate=1e-3)
    losses.append(float(metrics["actor/pg_loss"]))
  after = np.asarray(updater.old_log_probs(params, batch))[valid].mean()
  assert after > before + 0.01
  # With A = 1 everywhere the loss is -mean(ratio) (clipped at 1.28): -1 at the first update, then lower.
  assert losses[0] == pytest.approx(-1.0, abs=1e-6)
  assert losses[2] < losses[1] < losses[0]
  assert int(metrics["actor/skipped_updates"]) == 0 and float(metrics["actor/lr"]) == pytest.approx(1e-3)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_accumulation_gives_the_same_update(agg_mode):
  base = _params(2)
  batch = _with_rl_fields(_batch(2, batch_size=8), base, [1.0, -0.5, 2.0, -1.5, 0.3, -0.7, 1.1, -2.0])
  # Move the policy away from old_logp first so that ratios differ from 1 and clipping takes part.
  batch["old_logp"] = batch["old_logp"] + np.random.default_rng(0).normal(0, 0.3, batch["old_logp"].shape)
  batch["old_logp"] = batch["old_logp"].astype(np.float32) * batch["response_mask"]
  # Plain SGD, so the update is lr * gradient: Adam's first step, m / sqrt(v) = sign(g), would turn float
  # rounding in near-zero gradients into full-size differences.
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  loss_config = step.LossConfig(agg_mode=agg_mode, entropy_coeff=0.01)
  updater = step.Updater(optimizer=optimizer, model_config=CONFIG, loss_config=loss_config)
  results = []
  for sizes in ([8], [4, 4], [2, 2, 2, 2], [1, 3, 4]):
    params = _copy(base)
    params, _, metrics = updater(params, optimizer.init(params), _split(batch, sizes), learning_rate=1.0)
    results.append((params, metrics))
  reference_params, reference_metrics = results[0]
  assert float(reference_metrics["actor/pg_clipfrac"]) > 0  # the clipped branch is exercised
  for params, metrics in results[1:]:
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    for name in reference_metrics:
      np.testing.assert_allclose(np.asarray(metrics[name]), np.asarray(reference_metrics[name]), rtol=1e-5,
                                 atol=1e-6, err_msg=name)


def test_non_finite_gradient_skips_the_update():
  params = _params(3)
  batch = _with_rl_fields(_batch(3), params, [1.0, np.nan, 1.0, 1.0])
  optimizer = step.make_optimizer(learning_rate=1e-2)
  opt_state = optimizer.init(params)
  kept = _copy(params)
  updater = step.Updater(optimizer=optimizer, model_config=CONFIG, loss_config=step.LossConfig())
  new_params, new_state, metrics = updater(params, opt_state, [batch], learning_rate=1e-2)
  assert int(metrics["actor/skipped_updates"]) == 1 and not np.isfinite(float(metrics["actor/grad_norm"]))
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(new_state.inner_state[1][0].count) == 0  # Adam's step count did not advance


def test_learning_rate_is_the_one_passed_in():
  base = _params(4)
  batch = _with_rl_fields(_batch(4), base, [1.0, -1.0, 0.5, -0.5])
  optimizer = step.make_optimizer(learning_rate=123.0, weight_decay=0.0, grad_clip=1e9)
  updater = step.Updater(optimizer=optimizer, model_config=CONFIG, loss_config=step.LossConfig())
  deltas = {}
  for lr in (0.0, 1e-3, 2e-3):
    params = _copy(base)
    params, _, _ = updater(params, optimizer.init(params), [batch], learning_rate=lr)
    deltas[lr] = np.asarray(params["layers"]["up_kernel"]) - np.asarray(base["layers"]["up_kernel"])
  assert np.all(deltas[0.0] == 0)
  # Adam's first step moves each weight by lr * m / (sqrt(v) + eps) = ~lr * sign(g): twice the lr, twice the step.
  np.testing.assert_allclose(deltas[2e-3], 2 * deltas[1e-3], rtol=1e-4, atol=1e-9)
  assert np.abs(deltas[1e-3]).max() == pytest.approx(1e-3, rel=1e-3)


def test_logprob_mismatch_over_every_valid_token():
  first, second = _batch(5, batch_size=3), _batch(6, batch_size=2, response_len=4)
  rng = np.random.default_rng(0)
  for mb in (first, second):
    mb["old_logp"] = -rng.random(mb["response_mask"].shape).astype(np.float32)
    mb["sampler_logp"] = -rng.random(mb["response_mask"].shape).astype(np.float32)
  diff = np.concatenate([(mb["old_logp"] - mb["sampler_logp"])[mb["response_mask"] > 0] for mb in (first, second)])
  metrics = step.logprob_mismatch([first, second])
  assert metrics["rollout/logprob_abs_diff"] == pytest.approx(np.abs(diff).mean(), rel=1e-5)
  assert metrics["rollout/ratio_mean"] == pytest.approx(np.exp(diff).mean(), rel=1e-5)
  assert metrics["rollout/ratio_max"] == pytest.approx(np.exp(diff).max(), rel=1e-5)
  empty = dict(first, response_mask=np.zeros_like(first["response_mask"]))
  assert step.logprob_mismatch([empty]) == {"rollout/logprob_abs_diff": 0.0, "rollout/ratio_mean": 1.0,
                                            "rollout/ratio_max": 1.0}


def _packed(batch, row_width, masked=()):
  """`batch` (unpacked, with RL fields) as packed rows of `row_width` tokens (`batching.pack`), first-fit; the
  per-token fields moved to the packed token positions; `masked` trajectories get no valid token. Returns the
  packed batch and, per trajectory, (packed row, first response column)."""
  prompts = [p[m > 0].tolist() for p, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
  responses = [r[m > 0].tolist() for r, m in zip(batch["response_ids"], batch["response_mask"])]
  sampler = [s[m > 0] for s, m in zip(batch["sampler_logp"], batch["response_mask"])]
  rows = batching.pack_rows([len(p) + len(r) for p, r in zip(prompts, responses)], row_width)
  packed = batching.pack(prompts, responses, rows, row_width=row_width, pad_id=0, advantages=batch["advantages"],
                         sampler_logps=sampler)
  places, packed["old_logp"] = {}, np.zeros(packed["input_ids"].shape, np.float32)
  for r, row in enumerate(rows):
    start = 0
    for i in row:
      places[i] = (r, start + len(prompts[i]))
      n = len(responses[i])
      packed["old_logp"][r, places[i][1]:places[i][1] + n] = batch["old_logp"][i, :n]
      if i in masked:
        packed["response_mask"][r, places[i][1]:places[i][1] + n] = 0
      start += len(prompts[i]) + n
  return packed, places


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_packed_micro_batches_equal_unpacked(agg_mode):
  base = _params(7)
  batch = _with_rl_fields(_batch(7, batch_size=8), base, [1.0, -0.5, 2.0, -1.5, 0.3, -0.7, 1.1, -2.0])
  rng = np.random.default_rng(1)
  batch["old_logp"] = ((batch["old_logp"] + rng.normal(0, 0.3, batch["old_logp"].shape)) * batch["response_mask"]
                       ).astype(np.float32)
  batch["sampler_logp"] = ((batch["old_logp"] + rng.normal(0, 0.3, batch["old_logp"].shape))
                           * batch["response_mask"]).astype(np.float32)
  packed, places = _packed(batch, 16, masked=(3,))
  assert packed["input_ids"].shape[0] < 8  # several trajectories share a row
  # Per-token log-probs and entropy, at each response token's packed position.
  logp, entropy = step.response_logprobs(base, CONFIG, batch, temperature=0.7, with_entropy=True)
  packed_logp, packed_entropy = step.response_logprobs(base, CONFIG, packed, temperature=0.7, chunk_size=5,
                                                       with_entropy=True)
  lengths = _batch(7, batch_size=8)["response_mask"].sum(1)
  for i, (r, column) in places.items():
    span = slice(column, column + lengths[i])
    np.testing.assert_allclose(np.asarray(packed_logp)[r, span], np.asarray(logp)[i, :lengths[i]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(packed_entropy)[r, span], np.asarray(entropy)[i, :lengths[i]], rtol=1e-5)

  batch["response_mask"] = batch["response_mask"].copy()
  batch["response_mask"][3] = 0  # overlong-filtered: counts in neither mode's totals
  for name, expected in step.mini_batch_totals([batch]).items():
    assert step.mini_batch_totals([packed])[name] == expected, name

  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  updater = step.Updater(optimizer=optimizer, model_config=CONFIG,
                         loss_config=step.LossConfig(agg_mode=agg_mode, entropy_coeff=0.01, tis_cap=2.0))
  grads, metrics = updater.gradients(base, [batch])
  packed_grads, packed_metrics = updater.gradients(base, [packed])
  assert float(metrics["actor/pg_clipfrac"]) > 0
  for name in metrics:
    np.testing.assert_allclose(np.asarray(packed_metrics[name]), np.asarray(metrics[name]), rtol=1e-5, atol=1e-7,
                               err_msg=name)
  # Summation order differs between the layouts: entries near 0 are compared at 1e-5 of their leaf's largest.
  for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b)).max())
  params, _, _ = updater(_copy(base), optimizer.init(base), [batch], learning_rate=1.0)
  packed_params, _, _ = updater(_copy(base), optimizer.init(base), [packed], learning_rate=1.0)
  for a, b, g in zip(jax.tree.leaves(packed_params), jax.tree.leaves(params), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(g)).max())


def test_padding_fraction_counts_every_slot_without_a_trajectory_token():
  packed = batching.pack([[1, 2], [3]], [[4], [5, 6]], [[0], [1]], row_width=4, pad_id=0)
  # 3 + 3 real tokens in 2 x 4 slots; a second micro-batch of 1 x 2 slots, full.
  full = batching.pack([[1]], [[2]], [[0]], row_width=2, pad_id=0)
  assert step.padding_fraction([packed, full]) == pytest.approx(1 - 8 / 10)
