"""The jitted parts of a DAPO rollout step: log-probabilities of responses and the mini-batch update.

A batch of trajectories is a dict of arrays in one of two layouts:
  * packed (training, `rl/batching.pack`): trajectories one after another in rows of W tokens, input_ids,
    segment_ids, positions [N, W] and, aligned to the token predicted, response_mask, advantages, old_logp and
    sampler_logp [N, W];
  * unpacked (verl's padded layout, `rl/batching.collate`, SFT): the prompt left-padded to P tokens, the
    response right-padded to R tokens, so every response starts at column P: prompt_ids [B, P] int,
    prompt_mask [B, P], response_ids [B, R] int, response_mask [B, R] (1 on generated tokens, EOS included),
    and for updates advantages [B] (or [B, R]), old_logp [B, R] and, with truncated importance sampling,
    sampler_logp [B, R].

One optimizer update consumes one mini-batch, given as a list of micro-batches (each its own padded shape, so
micro-batches packed by a token budget need no common length). Their gradients are summed: the loss of each
micro-batch is normalised by the mini-batch's totals (`dapo_jax/rl/loss.py`), so the sum is exactly the
gradient of the whole mini-batch (docs/algorithm.md section 5, token-mean over the mini-batch).
"""
from collections.abc import Sequence
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import attention as attention_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.rl import loss as loss_lib

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The policy-loss settings of `actor.*` (DAPO: 0.2 / 0.28 / 10, token-mean, no entropy bonus)."""
  clip_low: float = 0.2
  clip_high: float = 0.28
  clip_c: float = 10.0
  agg_mode: str = "token-mean"
  entropy_coeff: float = 0.0
  temperature: float = 1.0        # the sampling temperature: logits are divided by it (docs/algorithm.md section 6)
  tis_cap: float | None = None    # truncated importance sampling against the sampler's log-probs; None = off
  logits_chunk_size: int = 0      # response tokens per LM-head chunk; 0 = all at once

  @classmethod
  def from_config(cls, config) -> "LossConfig":
    """The loss settings of a run's config (`actor.*`, the sampling temperature `rollout.temperature`)."""
    actor = config.actor
    return cls(clip_low=actor.clip_ratio_low, clip_high=actor.clip_ratio_high, clip_c=actor.clip_ratio_c,
               agg_mode=actor.loss_agg_mode, entropy_coeff=actor.entropy_coeff,
               temperature=config.rollout.temperature, tis_cap=actor.tis_cap,
               logits_chunk_size=actor.logits_chunk_size)

  def __post_init__(self):
    if self.agg_mode not in loss_lib.AGG_MODES:
      raise ValueError(f"actor.loss_agg_mode must be one of {loss_lib.AGG_MODES}, got {self.agg_mode!r}")
    if self.temperature <= 0:
      raise ValueError(f"rollout.temperature must be > 0 for log-probabilities, got {self.temperature}")


def learning_rate_at(rollout_step: int, base_lr: float, warmup_steps: int) -> float:
  """Linear warmup then constant, counted in rollout steps: base_lr * min(1, (k + 1) / W) (docs/algorithm.md 6).

  Unlike verl's k / W, the first rollout step already updates (at base_lr / W).
  """
  if warmup_steps <= 0:
    return float(base_lr)
  return float(base_lr) * min(1.0, (rollout_step + 1) / warmup_steps)


def make_optimizer(*, learning_rate: float, b1: float = 0.9, b2: float = 0.999, weight_decay: float = 0.1,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW; the learning rate is a hyperparameter the caller sets per update."""

  def chain(learning_rate):
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))

  return optax.inject_hyperparams(chain)(learning_rate=learning_rate)


def optimizer_from_config(optim) -> optax.GradientTransformation:
  """`make_optimizer` with a run's `actor.optim` settings."""
  return make_optimizer(learning_rate=optim.lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                        grad_clip=optim.grad_clip)


def _chunked(fn, h: jax.Array, targets: jax.Array, chunk_size: int):
  """Applies fn(h_chunk, target_chunk) -> tuple of [B, c] arrays over the response axis in chunks.

  Each chunk is rematerialised in the backward pass, so the [B, R, vocab] logits never exist at once; only a
  [B, chunk, vocab] slice does. This is what lets 20k-token responses with a 152k vocabulary fit.
  """
  batch, length = targets.shape
  if not chunk_size or chunk_size >= length:
    return fn(h, targets)
  num_chunks = -(-length // chunk_size)
  pad = num_chunks * chunk_size - length
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  h_chunks = h.reshape(batch, num_chunks, chunk_size, -1).swapaxes(0, 1)
  t_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)
  outs = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), (h_chunks, t_chunks))
  return tuple(o.swapaxes(0, 1).reshape(batch, -1)[:, :length] for o in outs)


def response_logprobs(params: qwen2.Params, model_config: Qwen2Config, batch: Batch, *, temperature: float,
                      chunk_size: int = 0, with_entropy: bool = False,
                      mesh_layout: attention_lib.MeshLayout | None = None):
  """log p(token | everything before it in its trajectory) (and the entropy of that distribution), per token.

  Unpacked batches (prompt_ids / response_ids): [B, R], one per response column. Packed batches
  (`rl/batching.pack`: input_ids, segment_ids, positions): [N, W], aligned to the token predicted, so
  meaningful where `response_mask` is 1. Logits are divided by `temperature` before the log-softmax
  (docs/algorithm.md section 6), in float32. `mesh_layout`: the mesh the batch is on, for the attention
  kernels (`qwen2.hidden_states`).
  """
  if "segment_ids" in batch:
    targets = batch["input_ids"]
    h = qwen2.hidden_states(params, model_config, targets, positions=batch["positions"],
                            segment_ids=batch["segment_ids"], mesh_layout=mesh_layout)
    # Token t is predicted at position t - 1; position 0 predicts nothing (its values are masked away).
    h = jnp.concatenate([h[:, :1], h[:, :-1]], axis=1)
  else:
    prompt_len = batch["prompt_ids"].shape[1]
    response_len = batch["response_ids"].shape[1]
    tokens = jnp.concatenate([batch["prompt_ids"], batch["response_ids"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
    h = qwen2.hidden_states(params, model_config, tokens, mask, mesh_layout=mesh_layout)
    # Position t predicts token t + 1: the response tokens are predicted from columns P-1 .. P+R-2.
    h = h[:, prompt_len - 1: prompt_len + response_len - 1]
    targets = batch["response_ids"]

  def logprob_and_entropy(h_chunk, targets):
    logits = qwen2.logits_from_hidden(params, model_config, h_chunk).astype(jnp.float32) / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if not with_entropy:
      return (token_logp,)
    return token_logp, loss_lib.entropy_from_logits(logits)

  out = _chunked(logprob_and_entropy, h, targets, chunk_size)
  return out if with_entropy else out[0]


def mesh_shardings(tree) -> Any | None:
  """The NamedShardings of a tree whose arrays all sit on one mesh (a tree of the same structure), else None
  (plain single-device arrays need no declaration)."""
  leaves, treedef = jax.tree.flatten(tree)
  shardings = [getattr(x, "sharding", None) for x in leaves]
  if (not leaves or not all(isinstance(s, NamedSharding) for s in shardings)
      or len({s.mesh for s in shardings}) != 1):
    return None
  return treedef.unflatten(shardings)


def _replicated_on(shardings) -> NamedSharding | None:
  if shardings is None:
    return None
  return NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())


def micro_batch_loss(params: qwen2.Params, batch: Batch, totals: dict[str, jax.Array], *,
                     model_config: Qwen2Config, loss_config: LossConfig,
                     mesh_layout: attention_lib.MeshLayout | None = None):
  """The micro-batch's share of the mini-batch loss (policy loss minus the entropy bonus), and its metrics."""
  logp, entropy = response_logprobs(params, model_config, batch, temperature=loss_config.temperature,
                                    chunk_size=loss_config.logits_chunk_size, with_entropy=True,
                                    mesh_layout=mesh_layout)
  mask = batch["response_mask"]
  segments = batch.get("segment_ids")
  tis = {}
  if loss_config.tis_cap is not None:
    tis = dict(sampler_logp=batch["sampler_logp"], tis_cap=loss_config.tis_cap)
  pg_loss, metrics = loss_lib.policy_loss(
      logp, batch["old_logp"], batch["advantages"], mask, clip_low=loss_config.clip_low,
      clip_high=loss_config.clip_high, clip_c=loss_config.clip_c, agg_mode=loss_config.agg_mode,
      num_tokens=totals["num_tokens"], num_seqs=totals["num_seqs"], segment_ids=segments, **tis)
  entropy = loss_lib.aggregate(entropy, mask, loss_config.agg_mode, num_tokens=totals["num_tokens"],
                               num_seqs=totals["num_seqs"], segment_ids=segments)
  metrics["actor/entropy"] = jax.lax.stop_gradient(entropy)
  total = pg_loss - loss_config.entropy_coeff * entropy if loss_config.entropy_coeff else pg_loss
  return total, metrics


def _counts(xp, response_mask, segment_ids=None):
  """(valid tokens, responses with a valid token) of a micro-batch, with numpy or jax.numpy as `xp`."""
  valid = response_mask > 0
  if segment_ids is None:
    seqs = valid.any(axis=1).sum()
  else:  # packed: a response is a (row, segment id) pair; response tokens start where the prompt ends
    starts = valid & xp.concatenate([xp.ones_like(valid[:, :1]), ~valid[:, :-1]], axis=1)
    seqs = starts.sum()
  return {"num_tokens": valid.sum().astype(xp.float32), "num_seqs": seqs.astype(xp.float32)}


_device_counts = jax.jit(functools.partial(_counts, jnp))


def mini_batch_totals(micro_batches: Sequence[Batch]) -> dict[str, Any]:
  """The mini-batch's response-token count and number of responses with a valid token (float32 scalars).

  Host arrays are counted on the host; arrays on a mesh (which on several hosts no process holds whole) on the
  devices, giving replicated scalars.
  """
  parts = [(mb["response_mask"], mb.get("segment_ids")) for mb in micro_batches]
  if all(isinstance(m, np.ndarray) for m, _ in parts):
    counts = [_counts(np, m, s) for m, s in parts]
    return {k: np.float32(sum(c[k] for c in counts)) for k in ("num_tokens", "num_seqs")}
  counts = [_device_counts(m, s) for m, s in parts]
  return jax.tree.map(lambda *values: functools.reduce(jnp.add, values), *counts)


def _check_placement(micro_batches: Sequence[Batch]) -> None:
  if jax.process_count() > 1 and any(not isinstance(v, jax.Array) for mb in micro_batches for v in mb.values()):
    raise ValueError("With several processes, micro-batches must be global arrays: place each process's rows "
                     "with batch_placement.put_micro_batches first")


def _apply_gradients(params, opt_state, grads, learning_rate, *, optimizer):
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm)

  def update(operands):
    params, opt_state = operands
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
    return optax.apply_updates(params, updates), opt_state

  # A non-finite gradient leaves params and optimizer state (moments, count) untouched: the update is skipped.
  params, opt_state = jax.lax.cond(finite, update, lambda operands: operands, (params, opt_state))
  return params, opt_state, grad_norm, jnp.logical_not(finite)


class Updater:
  """The jitted programs of a run's DAPO update, built once for its model, loss, optimizer and layout.

  With `params_shardings` (and `opt_state_shardings`, e.g. `mesh_shardings` of the arrays a run holds) every
  program declares them: params, gradients and optimizer state come back exactly where they came from, update
  after update, so a long run never drifts to a layout the compiler happened to choose, and the update's
  params and optimizer state are donated. Without them (plain single-device arrays) nothing is declared.
  Micro-batches are dicts of host arrays or, on a mesh (and always with several processes),
  `batch_placement.put_micro_batches` arrays; each micro-batch shape compiles once.
  """

  def __init__(self, *, optimizer: optax.GradientTransformation, model_config: Qwen2Config,
               loss_config: LossConfig, params_shardings=None, opt_state_shardings=None,
               rules=sharding_lib.DEFAULT_RULES):
    self.optimizer = optimizer
    self.model_config = model_config
    self.loss_config = loss_config
    replicated = _replicated_on(params_shardings)
    mesh_layout = None if replicated is None else attention_lib.MeshLayout(replicated.mesh, tuple(rules))

    def old_log_probs(params, batch):
      logp = response_logprobs(params, model_config, batch, temperature=loss_config.temperature,
                               chunk_size=loss_config.logits_chunk_size, mesh_layout=mesh_layout)
      return jnp.where(batch["response_mask"] > 0, logp, 0.0)

    def gradients(params, batch, totals):
      grads, metrics = jax.grad(micro_batch_loss, has_aux=True)(params, batch, totals, model_config=model_config,
                                                                loss_config=loss_config, mesh_layout=mesh_layout)
      return jax.tree.map(lambda g: g.astype(jnp.float32), grads), metrics

    apply = functools.partial(_apply_gradients, optimizer=optimizer)
    # The jitted programs (public for the memory planner, which compiles them for a TPU slice).
    if params_shardings is None:
      self.old_log_probs_fn = jax.jit(old_log_probs)
      self.gradients_fn = jax.jit(gradients)
      self.apply_fn = jax.jit(apply, donate_argnums=(0, 1))
    else:
      # Old log-probs stay on the devices, sharded like the rows of the batch (`batch_placement`).
      rows = sharding_lib.logical_sharding(("batch", None), rules, replicated.mesh)
      self.old_log_probs_fn = jax.jit(old_log_probs, out_shardings=rows)
      self.gradients_fn = jax.jit(gradients, out_shardings=(params_shardings, replicated))
      self.apply_fn = jax.jit(apply, donate_argnums=(0, 1),
                              in_shardings=(params_shardings, opt_state_shardings, params_shardings, replicated),
                              out_shardings=(params_shardings, opt_state_shardings, replicated, replicated))
    self._add = jax.jit(lambda accumulated, new: jax.tree.map(jnp.add, accumulated, new), donate_argnums=0)

  @classmethod
  def for_state(cls, params, opt_state, **kwargs) -> "Updater":
    """An updater declaring the shardings `params` and `opt_state` have (none for single-device arrays)."""
    return cls(params_shardings=mesh_shardings(params), opt_state_shardings=mesh_shardings(opt_state), **kwargs)

  def old_log_probs(self, params: qwen2.Params, batch: Batch) -> jax.Array:
    """The policy's log-probs of the sampled responses before this step's updates (`old_logp`), [B, R].

    For a batch placed on a mesh the result is sharded like its rows, ready to be added to the batch as
    `old_logp` without leaving the devices.
    """
    return self.old_log_probs_fn(params, batch)

  def gradients(self, params: qwen2.Params, micro_batches: Sequence[Batch]):
    """(gradients, metrics) of a mini-batch given as micro-batches: the sum of each micro-batch's share, which
    is the gradient of the whole mini-batch's loss (module docstring). Gradients are float32, in the params'
    shardings; metrics are the summed, additive loss metrics."""
    if not micro_batches:
      raise ValueError("a mini-batch needs at least one micro-batch")
    _check_placement(micro_batches)
    totals = {k: jnp.asarray(v) for k, v in mini_batch_totals(micro_batches).items()}
    grad_sum = metric_sum = None
    for micro in micro_batches:
      grads, metrics = self.gradients_fn(params, micro, totals)
      if grad_sum is None:
        grad_sum, metric_sum = grads, metrics
      else:
        grad_sum, metric_sum = self._add((grad_sum, metric_sum), (grads, metrics))
    return grad_sum, metric_sum

  def __call__(self, params: qwen2.Params, opt_state, micro_batches: Sequence[Batch], *, learning_rate: float):
    """One optimizer update over a mini-batch given as micro-batches; returns (params, opt_state, metrics).

    `params` and `opt_state` are donated. Metrics (docs/algorithm.md section 10): actor/pg_loss, pg_clipfrac,
    pg_clipfrac_lower, ppo_kl, entropy, grad_norm (before clipping), lr, skipped_updates (1 when the gradient
    norm was not finite and the update was skipped).
    """
    grads, metric_sum = self.gradients(params, micro_batches)
    params, opt_state, grad_norm, skipped = self.apply_fn(params, opt_state, grads,
                                                          jnp.asarray(learning_rate, jnp.float32))
    metrics = dict(metric_sum)
    metrics.update({"actor/grad_norm": grad_norm, "actor/lr": jnp.asarray(learning_rate, jnp.float32),
                    "actor/skipped_updates": skipped.astype(jnp.int32)})
    return params, opt_state, metrics


@jax.jit
def _slot_counts(segment_ids):
  return (segment_ids > 0).sum(), segment_ids.size


def padding_fraction(micro_batches: Sequence[Batch]) -> float:
  """`perf/padding_fraction`: the share of the packed micro-batches' token slots (rows x width, the rows
  `batch_placement.put_micro_batches` adds included) that hold no trajectory token. Counted on the devices, so
  every process gets the whole update's number."""
  counts = jax.device_get([_slot_counts(mb["segment_ids"]) for mb in micro_batches])
  slots = sum(int(total) for _, total in counts)
  return 1.0 - sum(int(real) for real, _ in counts) / slots if slots else 0.0


@jax.jit
def _mismatch_sums(batch):
  valid = batch["response_mask"] > 0
  diff = jnp.where(valid, batch["old_logp"] - batch["sampler_logp"], 0.0)
  ratio = jnp.exp(diff)
  return {"count": valid.sum(), "abs_diff": jnp.abs(diff).sum(), "ratio": jnp.where(valid, ratio, 0.0).sum(),
          "ratio_max": jnp.where(valid, ratio, -jnp.inf).max()}


def logprob_mismatch(micro_batches: Sequence[Batch]) -> dict[str, float]:
  """Training/inference mismatch over every valid response token (docs/algorithm.md section 6): the mean absolute
  difference of `old_logp` and `sampler_logp` and the mean and max of their ratio.

  Reduced on the devices, so it works on placed micro-batches with several processes (every process gets the
  same numbers). With no valid token: difference 0, ratios 1.
  """
  sums = jax.device_get([_mismatch_sums({k: mb[k] for k in ("response_mask", "old_logp", "sampler_logp")})
                         for mb in micro_batches])
  count = sum(float(s["count"]) for s in sums)
  if count == 0:
    return {"rollout/logprob_abs_diff": 0.0, "rollout/ratio_mean": 1.0, "rollout/ratio_max": 1.0}
  return {"rollout/logprob_abs_diff": sum(float(s["abs_diff"]) for s in sums) / count,
          "rollout/ratio_mean": sum(float(s["ratio"]) for s in sums) / count,
          "rollout/ratio_max": max(float(s["ratio_max"]) for s in sums)}
