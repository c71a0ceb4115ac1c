"""The DAPO policy loss: decoupled clip + dual clip, loss aggregation modes, entropy, docs/algorithm.md sections 5-6.

All functions take `[batch, length]` arrays (numpy or jax; `advantages` may also be `[batch]`) and work under
`jax.jit` with the string arguments (`agg_mode`) static.

Micro-batch accumulation. Every scalar these functions return is *additive over micro-batches*: split a
mini-batch into micro-batches along the batch axis, pass each the mini-batch totals `num_tokens` (valid tokens
of the whole mini-batch) and `num_seqs` (responses with at least one valid token in the whole mini-batch), and
the sum over micro-batches of the loss, of its gradient and of every metric equals the value computed on the
whole mini-batch at once, exactly up to float rounding (docs/algorithm.md section 5: token-mean is global over the
mini-batch, whatever the micro-batching; verl#5625 is the bug this avoids). Left at None, the totals default to
the counts of the arrays passed, so a single call on a whole mini-batch gives plain means.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
"""Loss aggregation modes (`actor.loss_agg_mode`): DAPO uses token-mean, early DAPO / GRPO seq-mean-token-mean."""

LOG_RATIO_BOUND = 20.0
"""`logp - old_logp` is clamped to [-20, 20] before `exp`, as verl does, so the ratio stays finite."""


def _float_array(x: Any) -> jax.Array:
  """`x` as a jax array of at least float32 precision (bf16 inputs are upcast: losses are summed)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """`numerator / denominator`, and 0 where the denominator is 0 (then the numerator is a sum over nothing).

  The denominator is replaced before dividing rather than the quotient after, so no inf or NaN appears in the
  forward pass or in the gradient.
  """
  denominator = jnp.asarray(denominator, numerator.dtype)
  return numerator / jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))


def aggregate(values: Any, mask: Any, agg_mode: str, *, num_tokens: Any = None, num_seqs: Any = None,
              segment_ids: Any = None) -> jax.Array:
  """Reduces per-token `values` `[B, L]` to a scalar over the valid tokens (`mask > 0`), docs/algorithm.md section 5.

  Modes:
    * `token-mean`: `sum(values * m) / num_tokens`; `num_tokens` defaults to `sum(m)`.
    * `seq-mean-token-mean`: each response's mean over its valid tokens, summed over responses and divided by
      `num_seqs`.
    * `seq-mean-token-sum`: each response's sum over its valid tokens, summed over responses and divided by
      `num_seqs`.
  `num_seqs` defaults to the number of responses with at least one valid token: a response with none is left
  out of the seq means (it contributes 0 to the sum and is not counted), so no NaN. Pass the mini-batch
  totals for micro-batches (see the module docstring). Values at padding positions are ignored (selected away,
  not multiplied by 0, so garbage there cannot turn into NaN), but they should be finite for gradients.
  A response is a row, or with `segment_ids` `[B, L]` (packed rows, `rl/batching.pack`) a run of one segment id
  within a row: the per-response sums are segment sums within each row.
  """
  values = _float_array(values)
  valid = jnp.asarray(mask) > 0
  if values.ndim != 2 or valid.shape != values.shape:
    raise ValueError(f"expected values and mask of shape [B, L]; got {values.shape} and {valid.shape}")
  masked = jnp.where(valid, values, jnp.zeros_like(values))
  if agg_mode == "token-mean":
    if num_tokens is None:
      num_tokens = valid.sum()
    return _safe_divide(masked.sum(), num_tokens)
  if agg_mode not in AGG_MODES:
    raise ValueError(f"unknown loss aggregation mode {agg_mode!r} (actor.loss_agg_mode); expected one of {AGG_MODES}")
  if segment_ids is None:
    tokens_per_seq = valid.sum(axis=-1)
    per_seq = masked.sum(axis=-1)
  else:
    # Segment ids of a row are at most its length; 0 (padding, never valid) is a segment of its own.
    row_sums = jax.vmap(lambda x, ids: jax.ops.segment_sum(x, ids, num_segments=values.shape[1] + 1))
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    tokens_per_seq = row_sums(valid.astype(jnp.int32), segment_ids)
    per_seq = row_sums(masked, segment_ids)
  if agg_mode == "seq-mean-token-mean":
    per_seq = _safe_divide(per_seq, tokens_per_seq)
  if num_seqs is None:
    num_seqs = (tokens_per_seq > 0).sum()
  # A response without valid tokens has per_seq == 0 here, so summing over all responses leaves it out.
  return _safe_divide(per_seq.sum(), num_seqs)


def truncated_is_weight(old_logp: Any, sampler_logp: Any, cap: float) -> jax.Array:
  """Truncated importance-sampling weight `min(exp(old_logp - sampler_logp), cap)`, docs/algorithm.md section 6.

  Corrects for the sampler's token distribution differing from the trainer's (numerics, kernels). It depends
  on no trainable value, so it is a constant of the gradient.
  """
  old_logp = _float_array(old_logp)
  sampler_logp = _float_array(sampler_logp)
  # exp overflows to inf for large differences, and min(inf, cap) == cap: no clamp needed before exp.
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(old_logp - sampler_logp), cap))


def policy_loss(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    *,
    clip_low: float,
    clip_high: float,
    clip_c: float,
    agg_mode: str,
    num_tokens: Any = None,
    num_seqs: Any = None,
    sampler_logp: Any = None,
    tis_cap: float | None = None,
    segment_ids: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped policy-gradient loss with decoupled clip ranges and dual clip, docs/algorithm.md section 5.

  ```
  logr = clamp(logp - old_logp, -20, 20);  r = exp(logr)
  L1 = -A * r;  L2 = -A * clip(r, 1 - clip_low, 1 + clip_high);  C1 = max(L1, L2)
  L3 = -A * clip_c;  C2 = min(L3, C1);  per_token = where(A < 0, C2, C1)
  ```
  then `aggregate(per_token, mask, agg_mode, ...)`. With `tis_cap` set, `per_token` is multiplied by the
  truncated importance-sampling weight `min(exp(old_logp - sampler_logp), tis_cap)` first (docs/algorithm.md
  section 6; off by default).

  Args:
    logp: `[B, L]` log-probabilities of the sampled tokens under the policy being trained.
    old_logp: `[B, L]` the same under the policy before this rollout step's updates (recomputed by the trainer).
    advantages: `[B]` one per response, or `[B, L]` per token.
    mask: `[B, L]` 1 on valid response tokens, 0 on padding (bool, int or float).
    clip_low, clip_high: the ratio is clipped to `[1 - clip_low, 1 + clip_high]` (DAPO: 0.2, 0.28).
    clip_c: dual-clip bound for negative advantages, > 1 (DAPO: 10).
    agg_mode: one of `AGG_MODES`.
    num_tokens, num_seqs: mini-batch totals for micro-batch accumulation (module docstring); None = this batch.
    sampler_logp: `[B, L]` the sampler's own log-probabilities; used only with `tis_cap`.
    tis_cap: truncation `C` of the importance-sampling weight; None disables it.
    segment_ids: `[B, L]` for packed rows: which response each token belongs to (`aggregate`).

  Returns:
    `(loss, metrics)`. `metrics` has `actor/pg_loss` (the loss), `actor/pg_clipfrac` (share of valid tokens with
    `L2 > L1`, strict), `actor/pg_clipfrac_lower` (share with `C1 > L3` and `A < 0`: dual-clip activations),
    `actor/ppo_kl` (mean of `-logr`), and with TIS `actor/tis_weight_mean` and `actor/tis_clipfrac` (share of
    tokens whose weight hit the cap). The token shares are sums over valid tokens divided by `num_tokens`
    whatever `agg_mode`, so, like the loss, they add up exactly over micro-batches given the mini-batch total.
  """
  if isinstance(clip_c, (int, float)) and not clip_c > 1.0:
    raise ValueError(f"the dual-clip bound clip_c (actor.clip_ratio_c) must be > 1; got {clip_c}")
  if (tis_cap is None) != (sampler_logp is None):
    raise ValueError("truncated importance sampling needs both sampler_logp and tis_cap (or neither)")
  valid = jnp.asarray(mask) > 0
  logp = _float_array(logp)
  if logp.ndim != 2 or valid.shape != logp.shape:
    raise ValueError(f"expected logp and mask of shape [B, L]; got {logp.shape} and {valid.shape}")
  zeros = jnp.zeros_like(logp)
  # Padding positions may hold anything; zero them before any arithmetic so that neither the loss nor its
  # gradient can pick up inf or NaN from them (a 0 cotangent times a NaN local derivative is still NaN).
  logp = jnp.where(valid, logp, zeros)
  old_logp = jnp.where(valid, _float_array(old_logp), zeros)
  advantages = _float_array(advantages)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jnp.where(valid, jnp.broadcast_to(advantages, logp.shape), zeros)

  log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio  # L1
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)  # L2
  clip_loss = jnp.maximum(unclipped, clipped)  # C1
  dual_bound = -advantages * clip_c  # L3
  negative = advantages < 0
  # Dual clip: for A < 0 the loss -A * r grows without bound in r; cap it at -A * c.
  per_token = jnp.where(negative, jnp.minimum(dual_bound, clip_loss), clip_loss)

  if num_tokens is None:
    num_tokens = valid.sum()
  metrics = {
      "actor/pg_clipfrac": aggregate(clipped > unclipped, valid, "token-mean", num_tokens=num_tokens),
      "actor/pg_clipfrac_lower": aggregate((clip_loss > dual_bound) & negative, valid, "token-mean",
                                           num_tokens=num_tokens),
      "actor/ppo_kl": aggregate(-log_ratio, valid, "token-mean", num_tokens=num_tokens),
  }
  if tis_cap is not None:
    sampler_logp = jnp.where(valid, _float_array(sampler_logp), zeros)
    weight = truncated_is_weight(old_logp, sampler_logp, tis_cap)
    per_token = per_token * weight
    metrics["actor/tis_weight_mean"] = aggregate(weight, valid, "token-mean", num_tokens=num_tokens)
    metrics["actor/tis_clipfrac"] = aggregate(weight >= tis_cap, valid, "token-mean", num_tokens=num_tokens)

  loss = aggregate(per_token, valid, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, segment_ids=segment_ids)
  metrics["actor/pg_loss"] = loss
  return loss, {name: jax.lax.stop_gradient(value) for name, value in metrics.items()}


def entropy_from_logits(logits: Any) -> jax.Array:
  """Per-position entropy of `softmax(logits)` over the last axis: `[..., V] -> [...]`, in float32 or wider.

  `H = -sum(p * log p)` with `log p = log_softmax(logits)` (max-shifted logsumexp, so large logits do not
  overflow). Logits of -inf (masked vocabulary entries) contribute 0, with finite gradients. Divide the logits
  by the sampling temperature first to get the entropy of the sampling distribution (docs/algorithm.md section 6).
  """
  logits = _float_array(logits)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(log_probs)
  # p * log p is 0 * -inf = NaN at p == 0; replace log p there before the product (and so in the gradient).
  safe_log_probs = jnp.where(probs > 0, log_probs, jnp.zeros_like(log_probs))
  return -jnp.sum(probs * safe_log_probs, axis=-1)
