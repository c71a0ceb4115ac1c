"""Choosing the next token from logits, one row at a time: greedy, temperature, top-k and top-p (docs/algorithm.md 8).

`sample_tokens(logits, keys, params)` returns, for each row, the chosen token and two log-probabilities of it:

- `logp_sampled`: under the distribution the token was actually drawn from (temperature-scaled, then truncated
  to the top-k / nucleus and renormalised);
- `logp_full`: under the untruncated temperature-scaled distribution, `log_softmax(logits / T)`, which is what
  the trainer recomputes as `old_logp` (docs/algorithm.md 6); the two differ only where truncation is on, and their
  gap is part of the training/inference mismatch the trainer logs.

Greedy decoding (temperature 0) takes the argmax (the first one on ties, as `torch.argmax`); it is a point mass,
so `logp_sampled` is 0, and `logp_full` is the log-softmax of the unscaled logits.

Each row draws with its own key and one uniform number: the token is found by inverting the cumulative
distribution (the first token whose cumulative probability exceeds u times the total). That costs one random
number per row instead of a Gumbel draw per vocabulary entry, and since a row's token depends only on its own
logits and key, a response comes out the same whichever decode slot, batch or device it is computed in.

Truncation follows transformers' order: temperature, then top-k, then top-p on the renormalised top-k
distribution. The nucleus is the smallest set of most likely tokens whose probability reaches `top_p` (a token is
kept when the probability of the tokens ranked before it is still below `top_p`; the most likely token is always
kept). Top-k keeps exactly `k` tokens (ties at the boundary are broken by index, as `lax.top_k` does).
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How tokens are chosen. Hashable: jitted code specialises on it (top-p 1 and top-k 0 skip the sort).

  Attributes:
    temperature: logits are divided by it; 0 means greedy (argmax).
    top_p: nucleus mass in (0, 1]; 1 keeps every token.
    top_k: keep the k most likely tokens; 0 keeps every token.
  """
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingParams.temperature must be >= 0 (0 is greedy), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"SamplingParams.top_k must be >= 0 (0 disables it), got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = SamplingParams(temperature=0.0)


class SampledTokens(NamedTuple):
  """One chosen token per row, with its log-probabilities (float32)."""
  tokens: jax.Array        # [batch] int32
  logp_sampled: jax.Array  # [batch]: under the (truncated) distribution actually sampled from
  logp_full: jax.Array     # [batch]: under the untruncated temperature-scaled distribution


def response_key(seed: jax.Array | int, prompt_index: jax.Array | int, sample_index: jax.Array | int) -> jax.Array:
  """The key of one response: a function of (seed, prompt index, sample index) only, not of where it runs.

  The key of the token at response position t is `jax.random.fold_in(response_key(...), t)`. Returned as raw
  key data (uint32 [2]) so it can live in plain arrays of decode state.
  """
  key = jax.random.key(seed)
  key = jax.random.fold_in(jax.random.fold_in(key, prompt_index), sample_index)
  return jax.random.key_data(key)


def token_keys(response_keys: jax.Array, positions: jax.Array) -> jax.Array:
  """Per-row keys for the tokens at response `positions` [batch], from response keys [batch, 2] (raw data)."""
  fold = lambda key_data, position: jax.random.fold_in(jax.random.wrap_key_data(key_data), position)
  return jax.vmap(fold)(response_keys, positions)


def sample_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> SampledTokens:
  """Chooses one token per row of `logits` [batch, vocab]; `keys` [batch] are typed keys (unused when greedy)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if params.greedy:
    return _greedy(logits, vocab_axis=1)

  scaled = logits / params.temperature
  uniforms = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
  top_k = params.top_k if 0 < params.top_k < vocab else 0
  if top_k == 0 and params.top_p >= 1.0:
    # No truncation: invert the cumulative distribution in vocabulary order, on unnormalised probabilities
    # (one exp per logit; the log-softmax is only needed at the chosen token).
    best = jnp.max(scaled, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scaled - best)
    tokens = _invert_cdf(unnormalised, uniforms)
    log_total = jnp.log(jnp.sum(unnormalised, axis=-1))
    logp_full = _take(scaled, tokens) - best[:, 0] - log_total
    return SampledTokens(tokens, logp_full, logp_full)

  log_probs = jax.nn.log_softmax(scaled, axis=-1)

  # Candidates in descending probability: the top k, or the whole vocabulary (sorted) for top-p alone.
  candidate_log_probs, candidate_ids = jax.lax.top_k(log_probs, top_k or vocab)
  candidate_probs = jnp.exp(candidate_log_probs)
  if params.top_p < 1.0:
    # Top-p acts on the distribution renormalised over the candidates (transformers' order: top-k, then top-p).
    renormalised = candidate_probs / jnp.sum(candidate_probs, axis=-1, keepdims=True)
    mass_before = jnp.cumsum(renormalised, axis=-1) - renormalised
    candidate_probs = jnp.where(mass_before < params.top_p, candidate_probs, 0.0)
  choice = _invert_cdf(candidate_probs, uniforms)
  tokens = _take(candidate_ids, choice).astype(jnp.int32)
  logp_full = _take(candidate_log_probs, choice)
  kept_mass = jnp.sum(candidate_probs, axis=-1)
  return SampledTokens(tokens, logp_full - jnp.log(kept_mass), logp_full)


def greedy_vocab_major(logits: jax.Array) -> SampledTokens:
  """The greedy choice for logits laid out [vocab, batch] (one column per row to choose for), as greedy decode
  steps make them (`decoding.py`); `sample_tokens(logits.T, _, GREEDY)` without the transpose."""
  return _greedy(logits, vocab_axis=0)


def _greedy(logits: jax.Array, vocab_axis: int) -> SampledTokens:
  """The argmax (the first one on ties, as `torch.argmax`) over `vocab_axis` of 2-D logits: a point mass, so
  `logp_sampled` is 0, and `logp_full` is the log-softmax of the unscaled logits there."""
  logits = logits.astype(jnp.float32)
  tokens, best = _first_argmax(logits, vocab_axis)
  logp_full = -jnp.log(jnp.sum(jnp.exp(logits - jnp.expand_dims(best, vocab_axis)), axis=vocab_axis))
  return SampledTokens(tokens, jnp.zeros_like(logp_full), logp_full)


def _first_argmax(logits: jax.Array, vocab_axis: int) -> tuple[jax.Array, jax.Array]:
  """The first index of the maximum over `vocab_axis` (0 or 1) of 2-D logits, and the maximum.

  XLA:CPU's argmax (a variadic reduce of value and index) is several times slower than plain reductions, and
  marking every entry equal to the maximum costs a full pass over the logits too. So the vocabulary is cut into
  blocks: one pass takes each block's maximum, and only the first block holding the maximum is searched for its
  first index: about one pass over the logits in all (docs/benchmarks.md, "Measurements behind design choices").
  Without a block size between 16 and 256 that divides the vocabulary, the whole vocabulary is searched. (Both
  layouts are reduced where they lie rather than transposed into one: XLA folds such a transpose into the LM
  head's matrix product, which then runs several times slower.)
  """
  vocab = logits.shape[vocab_axis]
  block = _block_size(vocab)
  # [batch, blocks, block] or [blocks, block, batch]: the blocks at `vocab_axis`, their entries just after.
  blocks = logits.reshape(logits.shape[:vocab_axis] + (vocab // block, block) + logits.shape[vocab_axis + 1:])
  # [batch, blocks] or [blocks, batch]. The barrier keeps XLA from turning the maximum of the block maxima below
  # into a second pass over all the logits (max of max folds into one reduction).
  block_max = jax.lax.optimization_barrier(jnp.max(blocks, axis=vocab_axis + 1))
  best = jnp.max(block_max, axis=vocab_axis)
  first_block = _first_index(block_max == jnp.expand_dims(best, vocab_axis), axis=vocab_axis)
  picked = jnp.expand_dims(first_block, (vocab_axis, vocab_axis + 1))
  candidates = jnp.take_along_axis(blocks, picked, axis=vocab_axis).squeeze(vocab_axis)  # the first block
  inner = _first_index(candidates == jnp.expand_dims(best, vocab_axis), axis=vocab_axis)
  return first_block * block + inner, best


def _first_index(mask: jax.Array, axis: int) -> jax.Array:
  """The index of the first True along `axis` of a 2-D boolean mask (the last index where there is none, e.g.
  NaN logits)."""
  n = mask.shape[axis]
  positions = jnp.expand_dims(jnp.arange(n, dtype=jnp.int32), 1 - axis)
  return jnp.min(jnp.where(mask, positions, n - 1), axis=axis)


def _invert_cdf(probs: jax.Array, uniforms: jax.Array) -> jax.Array:
  """Index of the first entry whose cumulative (unnormalised) probability exceeds u * total, per row.

  A zero-probability entry never leaves the cumulative sum above the threshold for the first time, so it is
  never chosen; the threshold is kept strictly below the total so the last positive entry is always reachable.

  The cumulative sum runs over blocks (`_block_size`): each block's total, a cumulative sum of those, and a
  cumulative sum within the one block the threshold falls in. Over the whole vocabulary, XLA:CPU computes the
  cumulative sum as an associative scan (many passes over the logits), several times slower than by blocks
  (docs/benchmarks.md). The block's own cumulative sum may round differently from its total, so the index is
  kept at or before the block's last positive entry (the chosen block has one: its total is positive).
  """
  num_rows, n = probs.shape
  block = _block_size(n)
  blocks = probs.reshape(num_rows, n // block, block)
  cumulative_blocks = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [rows, n / block]
  total = cumulative_blocks[:, -1]
  threshold = jnp.minimum(uniforms * total, jnp.nextafter(total, 0.0))
  chosen = jnp.sum(cumulative_blocks <= threshold[:, None], axis=-1)  # < n / block, as threshold < total
  before = jnp.where(chosen > 0, _take(cumulative_blocks, jnp.maximum(chosen - 1, 0)), 0.0)
  entries = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [rows, block]
  inner = jnp.sum(before[:, None] + jnp.cumsum(entries, axis=-1) <= threshold[:, None], axis=-1)
  last_positive = jnp.max(jnp.where(entries > 0, jnp.arange(block), 0), axis=-1)
  return (chosen * block + jnp.minimum(inner, last_positive)).astype(jnp.int32)


def _block_size(n: int) -> int:
  """The largest size between 16 and 256 that divides `n` (n itself where none does): the blocks into which
  `_first_argmax` and `_invert_cdf` cut the vocabulary."""
  return next((size for size in range(256, 15, -1) if n % size == 0), n)


def _take(values: jax.Array, indices: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values, indices[:, None], axis=-1)[:, 0]
