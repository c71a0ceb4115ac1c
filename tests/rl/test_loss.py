"""Tests for dapo_jax.rl.loss (docs/algorithm.md sections 5-6); expected values worked out by hand below.

DAPO's settings throughout: clip_low 0.2, clip_high 0.28 (ratio range [0.8, 1.28]), dual-clip c 10.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_jax.rl.loss import AGG_MODES, aggregate, entropy_from_logits, policy_loss, truncated_is_weight

DAPO_CLIP = dict(clip_low=0.2, clip_high=0.28, clip_c=10.0)

# A [3, 4] batch with five valid tokens, the old log-probs all 0 so that logp = log(ratio):
#   row 0: a) A=+1, r=1.5: L1=-1.5, L2=-1.28, C1=-1.28, L2>L1: upper clip.            per-token -1.28
#          b) A=-1, r=0.5: L1=0.5, L2=0.8, C1=0.8, L2>L1: clip (lower side); L3=10.      per-token  0.8
#          c) A=-2, r=20:  L1=40, L2=2.56, C1=40; L3=20, C1>L3: dual clip, C2=min(20, 40). per-token 20
#   row 1: d) A=+0.5, r=1: L1=L2=-0.5, no clip.                                          per-token -0.5
#          e) A=+1, r=0.5: L1=-0.5, L2=-0.8, C1=-0.5, no clip.                           per-token -0.5
#   row 2: fully masked (padding everywhere).
# Padding holds NaN and huge values, which must not leak into the loss or its gradient.
NAN = float("nan")
LOGP = np.array([[math.log(1.5), math.log(0.5), math.log(20.0), NAN],
                 [0.0, math.log(0.5), 1e9, NAN],
                 [NAN, NAN, 3.0, -1e9]], np.float32)
OLD_LOGP = np.array([[0.0, 0.0, 0.0, NAN], [0.0, 0.0, 0.0, 0.0], [NAN, 0.0, 0.0, 0.0]], np.float32)
ADVANTAGES = np.array([[1.0, -1.0, -2.0, NAN], [0.5, 1.0, 7.0, 7.0], [NAN, 1.0, -1.0, 1.0]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.int32)


def test_token_mean_hand_case():
  loss, metrics = policy_loss(LOGP, OLD_LOGP, ADVANTAGES, MASK, agg_mode="token-mean", **DAPO_CLIP)
  # (-1.28 + 0.8 + 20 - 0.5 - 0.5) / 5 = 18.52 / 5 = 3.704
  np.testing.assert_allclose(loss, 3.704, rtol=1e-6)
  np.testing.assert_allclose(metrics["actor/pg_loss"], 3.704, rtol=1e-6)
  # a and b clipped: 2/5; c is the only dual-clip activation: 1/5.
  np.testing.assert_allclose(metrics["actor/pg_clipfrac"], 0.4, rtol=1e-6)
  np.testing.assert_allclose(metrics["actor/pg_clipfrac_lower"], 0.2, rtol=1e-6)
  # ppo_kl = -(ln 1.5 + ln 0.5 + ln 20 + 0 + ln 0.5) / 5 = -(0.4054651 - 0.6931472 + 2.9957323 - 0.6931472) / 5
  #        = -2.0149030 / 5 = -0.4029806
  np.testing.assert_allclose(metrics["actor/ppo_kl"], -0.4029806, rtol=1e-5)


def test_seq_modes_leave_out_the_fully_masked_response():
  # seq-mean-token-mean: row 0 mean (-1.28 + 0.8 + 20) / 3 = 6.5066667, row 1 mean -0.5, row 2 left out:
  # (6.5066667 - 0.5) / 2 = 3.0033333.
  loss, _ = policy_loss(LOGP, OLD_LOGP, ADVANTAGES, MASK, agg_mode="seq-mean-token-mean", **DAPO_CLIP)
  np.testing.assert_allclose(loss, 3.0033333, rtol=1e-6)
  # seq-mean-token-sum: row sums 19.52 and -1.0: (19.52 - 1.0) / 2 = 9.26.
  loss, _ = policy_loss(LOGP, OLD_LOGP, ADVANTAGES, MASK, agg_mode="seq-mean-token-sum", **DAPO_CLIP)
  np.testing.assert_allclose(loss, 9.26, rtol=1e-6)


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_all_masked_batch_gives_zero_not_nan(agg_mode):
  loss, metrics = policy_loss(LOGP[2:], OLD_LOGP[2:], ADVANTAGES[2:], MASK[2:], agg_mode=agg_mode, **DAPO_CLIP)
  assert float(loss) == 0.0
  assert all(float(value) == 0.0 for value in metrics.values())
  grad = jax.grad(lambda lp: policy_loss(lp, OLD_LOGP[2:], ADVANTAGES[2:], MASK[2:], agg_mode=agg_mode,
                                         **DAPO_CLIP)[0])(jnp.asarray(LOGP[2:]))
  np.testing.assert_array_equal(grad, np.zeros_like(LOGP[2:]))


def test_token_mean_gradient_hand_case():
  # Clipped tokens (a, b) and the dual-clipped token (c) have a constant loss: gradient 0. Unclipped tokens have
  # loss -A * r / 5, whose derivative in logp is -A * r / 5: d) -0.5 * 1 / 5 = -0.1, e) -1 * 0.5 / 5 = -0.1.
  grad = jax.grad(lambda lp: policy_loss(lp, OLD_LOGP, ADVANTAGES, MASK, agg_mode="token-mean", **DAPO_CLIP)[0])(
      jnp.asarray(LOGP))
  np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0, 0.0], [-0.1, -0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                             rtol=1e-6, atol=1e-7)


def test_dual_clip_fires_for_negative_advantage_and_large_ratio():
  # A = -1, r = e^5 = 148.41: L1 = 148.41, L2 = 1.28, C1 = 148.41 > L3 = -A * c = 10, so the loss is -A * c = 10.
  logp, old_logp, mask = np.array([[5.0]]), np.array([[0.0]]), np.array([[1]])
  loss, metrics = policy_loss(logp, old_logp, np.array([-1.0]), mask, agg_mode="token-mean", **DAPO_CLIP)
  np.testing.assert_allclose(loss, 10.0, rtol=1e-6)
  assert float(metrics["actor/pg_clipfrac_lower"]) == 1.0
  assert float(metrics["actor/pg_clipfrac"]) == 0.0  # L2 = 1.28 < L1: the ordinary clip does not count
  # With c = 3 and A = -2: -A * c = 6.
  loss, _ = policy_loss(logp, old_logp, np.array([-2.0]), mask, agg_mode="token-mean", clip_low=0.2,
                        clip_high=0.28, clip_c=3.0)
  np.testing.assert_allclose(loss, 6.0, rtol=1e-6)
  # A > 0 is never dual-clipped: A = 1, r = e^5: C1 = max(-148.41, -1.28) = -1.28.
  loss, metrics = policy_loss(logp, old_logp, np.array([1.0]), mask, agg_mode="token-mean", **DAPO_CLIP)
  np.testing.assert_allclose(loss, -1.28, rtol=1e-6)
  assert float(metrics["actor/pg_clipfrac_lower"]) == 0.0
  with pytest.raises(ValueError, match="clip_ratio_c"):
    policy_loss(logp, old_logp, np.array([1.0]), mask, agg_mode="token-mean", clip_low=0.2, clip_high=0.28,
                clip_c=1.0)


def test_clip_fractions_on_both_sides():
  # Four tokens, old logp 0:
  #   A=+1, r=1.3 > 1.28: upper clip (L2 = -1.28 > L1 = -1.3).      counted
  #   A=+1, r=1.2:        inside the range.                          not counted
  #   A=-1, r=0.7 < 0.8:  lower clip (L2 = 0.8 > L1 = 0.7).          counted
  #   A=-1, r=0.9:        inside the range.                          not counted
  logp = np.log(np.array([[1.3, 1.2, 0.7, 0.9]], np.float32))
  advantages = np.array([[1.0, 1.0, -1.0, -1.0]], np.float32)
  loss, metrics = policy_loss(logp, np.zeros_like(logp), advantages, np.ones_like(logp), agg_mode="token-mean",
                              **DAPO_CLIP)
  np.testing.assert_allclose(metrics["actor/pg_clipfrac"], 0.5, rtol=1e-6)
  assert float(metrics["actor/pg_clipfrac_lower"]) == 0.0
  # (-1.28 - 1.2 + 0.8 + 0.9) / 4 = -0.78 / 4 = -0.195
  np.testing.assert_allclose(loss, -0.195, rtol=1e-5)


def test_log_ratio_is_clamped_to_20():
  # logp - old_logp = 50 is clamped to 20: ppo_kl = -20; with A = 1 the loss is -1.28 (upper clip), finite.
  loss, metrics = policy_loss(np.array([[50.0]]), np.array([[0.0]]), np.array([1.0]), np.array([[1]]),
                              agg_mode="token-mean", **DAPO_CLIP)
  np.testing.assert_allclose(metrics["actor/ppo_kl"], -20.0, rtol=1e-6)
  np.testing.assert_allclose(loss, -1.28, rtol=1e-6)


def test_per_response_advantages_broadcast():
  # Advantages [1, -1] per response equal the per-token layout [[1, 1], [-1, -1]].
  logp = np.log(np.array([[1.5, 1.0], [0.5, 1.0]], np.float32))
  mask = np.array([[1, 1], [1, 0]])
  per_response, _ = policy_loss(logp, np.zeros_like(logp), np.array([1.0, -1.0]), mask, agg_mode="token-mean",
                                **DAPO_CLIP)
  per_token, _ = policy_loss(logp, np.zeros_like(logp), np.array([[1.0, 1.0], [-1.0, -1.0]]), mask,
                             agg_mode="token-mean", **DAPO_CLIP)
  # (-1.28 - 1.0 + 0.8) / 3 = -1.48 / 3 = -0.4933333
  np.testing.assert_allclose(per_response, -0.4933333, rtol=1e-6)
  np.testing.assert_allclose(per_token, per_response, rtol=1e-7)


def test_micro_batches_with_mini_batch_totals_add_up_hand_case():
  # Micro-batch 1 = row 0, micro-batch 2 = rows 1-2; mini-batch totals: 5 tokens, 2 non-empty responses.
  # token-mean: 19.52 / 5 + (-1.0) / 5 = 3.904 - 0.2 = 3.704.
  # seq-mean-token-sum: 19.52 / 2 + (-1.0) / 2 = 9.76 - 0.5 = 9.26.
  # seq-mean-token-mean: 6.5066667 / 2 + (-0.5) / 2 = 3.2533333 - 0.25 = 3.0033333.
  for agg_mode, expected in (("token-mean", 3.704), ("seq-mean-token-sum", 9.26),
                             ("seq-mean-token-mean", 3.0033333)):
    parts = [policy_loss(LOGP[rows], OLD_LOGP[rows], ADVANTAGES[rows], MASK[rows], agg_mode=agg_mode,
                         num_tokens=5, num_seqs=2, **DAPO_CLIP) for rows in (slice(0, 1), slice(1, 3))]
    np.testing.assert_allclose(sum(loss for loss, _ in parts), expected, rtol=1e-6)
    # Metrics are sums over tokens divided by the mini-batch token count: they add up too (2/5 clipped).
    np.testing.assert_allclose(sum(m["actor/pg_clipfrac"] for _, m in parts), 0.4, rtol=1e-6)


def test_truncated_importance_sampling():
  # Two tokens with A = 1 and r = 1 (per-token loss -1). old - sampler = ln 3 -> min(3, 2) = 2; ln 0.5 -> 0.5.
  # Weighted loss (-2 - 0.5) / 2 = -1.25; mean weight 1.25; one of two tokens capped.
  old_logp = np.array([[math.log(3.0), math.log(0.5)]], np.float32)
  sampler_logp = np.zeros_like(old_logp)
  loss, metrics = policy_loss(old_logp, old_logp, np.array([1.0]), np.ones_like(old_logp), agg_mode="token-mean",
                              sampler_logp=sampler_logp, tis_cap=2.0, **DAPO_CLIP)
  np.testing.assert_allclose(loss, -1.25, rtol=1e-6)
  np.testing.assert_allclose(metrics["actor/tis_weight_mean"], 1.25, rtol=1e-6)
  np.testing.assert_allclose(metrics["actor/tis_clipfrac"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(truncated_is_weight(old_logp, sampler_logp, 2.0), [[2.0, 0.5]], rtol=1e-6)
  # Off by default; turning it on needs both arguments.
  _, metrics = policy_loss(old_logp, old_logp, np.array([1.0]), np.ones_like(old_logp), agg_mode="token-mean",
                           **DAPO_CLIP)
  assert "actor/tis_weight_mean" not in metrics
  with pytest.raises(ValueError, match="sampler_logp"):
    policy_loss(old_logp, old_logp, np.array([1.0]), np.ones_like(old_logp), agg_mode="token-mean",
                tis_cap=2.0, **DAPO_CLIP)


def test_works_under_jit():
  jitted = jax.jit(functools.partial(policy_loss, agg_mode="token-mean", **DAPO_CLIP))
  loss, metrics = jitted(LOGP, OLD_LOGP, ADVANTAGES, MASK, num_tokens=jnp.asarray(5))
  np.testing.assert_allclose(loss, 3.704, rtol=1e-6)
  np.testing.assert_allclose(metrics["actor/pg_clipfrac_lower"], 0.2, rtol=1e-6)


def test_aggregate_modes_and_errors():
  values = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
  mask = np.array([[1, 1, 1], [1, 0, 0]])
  # token-mean (1 + 2 + 3 + 4) / 4 = 2.5; seq-mean-token-mean (2 + 4) / 2 = 3; seq-mean-token-sum (6 + 4) / 2 = 5.
  np.testing.assert_allclose(aggregate(values, mask, "token-mean"), 2.5)
  np.testing.assert_allclose(aggregate(values, mask, "seq-mean-token-mean"), 3.0)
  np.testing.assert_allclose(aggregate(values, mask, "seq-mean-token-sum"), 5.0)
  np.testing.assert_allclose(aggregate(values, mask, "token-mean", num_tokens=8), 1.25)
  with pytest.raises(ValueError, match="loss_agg_mode"):
    aggregate(values, mask, "seq-mean-token-sum-norm")


def test_entropy_from_logits():
  logits = np.array([
      [0.0, 0.0, -np.inf, -np.inf],  # two equal entries: ln 2 = 0.6931472
      [0.0, -np.inf, -np.inf, -np.inf],  # one-hot: 0
      [1000.0, 1000.0, 1000.0, 1000.0],  # uniform over 4, huge logits: ln 4 = 1.3862944
      [0.0, math.log(3.0), -np.inf, -np.inf],  # p = [1/4, 3/4]: 0.25 ln 4 + 0.75 ln(4/3) = 0.5623351
  ], np.float32)
  np.testing.assert_allclose(entropy_from_logits(logits), [0.6931472, 0.0, 1.3862944, 0.5623351], rtol=1e-5,
                             atol=1e-7)
  grad = jax.grad(lambda z: entropy_from_logits(z).sum())(jnp.asarray(logits))
  assert np.all(np.isfinite(grad))


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------


# Fixed shapes, so that the jitted loss compiles once per aggregation mode and micro-batch size and the
# properties run in seconds; the data (values, masks, fully masked rows, splits) is what varies.
BATCH, LENGTH = 6, 4


@functools.partial(jax.jit, static_argnames="agg_mode")
def _loss_and_grad(logp, old_logp, advantages, mask, num_tokens, num_seqs, agg_mode):
  """(loss, metrics), d loss / d logp."""
  return jax.value_and_grad(
      lambda lp: policy_loss(lp, old_logp, advantages, mask, agg_mode=agg_mode, num_tokens=num_tokens,
                             num_seqs=num_seqs, **DAPO_CLIP), has_aux=True)(logp)


def _random_batch(seed, log_ratio_spread=0.4):
  rng = np.random.default_rng(seed)
  logp = -rng.exponential(1.0, size=(BATCH, LENGTH)).astype(np.float32)
  old_logp = (logp + rng.normal(0.0, log_ratio_spread, size=(BATCH, LENGTH))).astype(np.float32)
  advantages = rng.normal(0.0, 1.0, size=(BATCH,)).astype(np.float32)
  mask = (rng.random((BATCH, LENGTH)) < rng.uniform(0.2, 1.0)).astype(np.int32)
  return logp, old_logp, advantages, mask


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(1, BATCH - 1), max_size=3),
       agg_mode=st.sampled_from(AGG_MODES))
def test_micro_batch_gradients_sum_to_the_full_batch_gradient(seed, cuts, agg_mode):
  logp, old_logp, advantages, mask = _random_batch(seed)
  (full_loss, full_metrics), full_grad = _loss_and_grad(logp, old_logp, advantages, mask, None, None, agg_mode)
  # Mini-batch totals handed to every micro-batch.
  num_tokens = jnp.asarray(mask.sum())
  num_seqs = jnp.asarray((mask.sum(axis=1) > 0).sum())
  bounds = [0] + sorted(set(cuts)) + [BATCH]
  micro_grads, micro_loss, micro_clipfrac, micro_kl = [], 0.0, 0.0, 0.0
  for start, stop in zip(bounds[:-1], bounds[1:]):
    rows = slice(start, stop)
    (loss, metrics), grad = _loss_and_grad(logp[rows], old_logp[rows], advantages[rows], mask[rows], num_tokens,
                                           num_seqs, agg_mode)
    micro_grads.append(grad)
    micro_loss += float(loss)
    micro_clipfrac += float(metrics["actor/pg_clipfrac"])
    micro_kl += float(metrics["actor/ppo_kl"])
  np.testing.assert_allclose(np.concatenate(micro_grads), full_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(micro_loss, full_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(micro_clipfrac, full_metrics["actor/pg_clipfrac"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(micro_kl, full_metrics["actor/ppo_kl"], rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), agg_mode=st.sampled_from(AGG_MODES))
def test_zero_advantages_give_zero_loss_and_gradient(seed, agg_mode):
  logp, old_logp, _, mask = _random_batch(seed)
  (loss, _), grad = _loss_and_grad(logp, old_logp, np.zeros((BATCH,), np.float32), mask, None, None, agg_mode)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, np.zeros_like(logp))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 5.0))
def test_clip_fractions_lie_in_unit_interval(seed, spread):
  logp, old_logp, advantages, mask = _random_batch(seed, log_ratio_spread=spread)
  (_, metrics), _ = _loss_and_grad(logp, old_logp, advantages, mask, None, None, "token-mean")
  for name in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
    assert 0.0 <= float(metrics[name]) <= 1.0 + 1e-6
  # Dual-clip activations need A < 0: they are at most the share of valid tokens with a negative advantage.
  negative_share = (mask * (advantages[:, None] < 0)).sum() / max(mask.sum(), 1)
  assert float(metrics["actor/pg_clipfrac_lower"]) <= negative_share + 1e-6
