"""One DAPO update (old log-probs, forward, backward, AdamW) three ways, side by side on the same machine: our
packed micro-batches, our micro-batches without packing, and transformers with torch's AdamW.

    .venv/bin/python scripts/bench_update.py [--configs 60m] [--num_trajectories 64] [--min_length 64]
        [--max_length 2048] [--micro_batch_tokens 4096] [--repeats 3] [--remat] [--variants ...]
        [--output results.json]

All three run the same random-weight Qwen2 configuration (scripts/bench_models.py, shared with bench_rollout.py: the
weights are made by transformers, saved, and loaded into our model), in float32 on the CPU, over one fixed batch
of trajectories with long-tailed lengths: `num_trajectories` total lengths (prompt + response) drawn lognormal with
a fixed seed (LENGTH_SEED), median at 40% of the way from `min_length` to `max_length` on a log scale and sigma
the log range / 3.5, rounded and clipped to [min_length, max_length]; each prompt is a quarter of its trajectory
(at least one token), the response the rest, the tokens random, one random advantage per trajectory (fixed seed).
The whole batch is one mini-batch (one optimizer update), split into micro-batches by a token budget,
`--micro_batch_tokens` (tokens, real and padding, of one micro-batch: rows x row width), with gradient
accumulation over them:

  * ours_packed: what the training program does (dapo_jax/train.py steps 4-6): `rl.batching.training_batches`
    packs the trajectories first-fit into rows of the length bucket of the longest one and groups the rows into
    micro-batches of budget // width rows; `old_log_probs.add_old_log_probs` adds `old_logp` to each (with
    the same budget, the training program's default), `batch_placement.put_micro_batches` places them on a
    one-device mesh and `step.Updater(...)` runs the update.
  * ours_padded: the same programs without packing: one trajectory per row, rows right-padded to the longest
    trajectory of their micro-batch. The package builds no such micro-batches for training, so the script
    builds them with `rl.batching.pack` given one trajectory per row (the packed layout, so the Updater runs the
    same code; no package change). Micro-batches are formed in the batch's order, a trajectory joining the
    current one while (rows + 1) x (its longest trajectory) stays within the budget.
  * transformers: `Qwen2ForCausalLM` (its default attention) and `torch.optim.AdamW`, on the very micro-batches
    of ours_padded (the same rows and widths, `attention_mask` 0 on padding: what a user without packing does):
    a no-grad forward per micro-batch for the old log-probs, then per micro-batch the logits of every position,
    log-softmax, the DAPO loss computed as ours (`rl/loss.py`: clipped ratio with 0.2 / 0.28, dual clip 10,
    token-mean over the mini-batch's response tokens, the entropy as a no-grad metric as ours computes it) and
    `loss.backward()`, then global-norm clipping and one optimizer step.

The optimizer is the default config's (`dapo_jax.config.base_config().actor.optim`: AdamW, b1, b2, weight decay,
eps 1e-8, gradient clipping at the global norm) in both frameworks, at the first rollout step's learning rate
(`step.learning_rate_at(0, ...)`); the loss settings are the default config's (`step.LossConfig.from_config`).
Ours rematerialises the decoder layers in the backward pass as the training program does by default
(model.remat), and transformers then does too (`activation_checkpointing_enable`, what verl's DAPO recipe
turns on), so both do the same arithmetic; `--noremat` turns it off in both. Old log-probs are those of the current
weights, so every ratio is 1. `--variants` runs a subset (ratios and targets of the variants run).

Timing: each variant runs once untimed (which compiles ours: one program per micro-batch shape, or loads it from
JAX's persistent compilation cache, on as in the training program), then
`repeats` times, the three alternating, and the best run is kept. A run of ours is the micro-batches' building
on the host (`batching_s`), their placement and the old log-prob pass (`old_log_prob_s`) and the update
(`update_s`), each waited for; a run of transformers is its tensors' building, the no-grad forward for the old
log-probs and the forward + backward + step, timed the same way. `seconds` is their sum; `tokens_per_s` counts only
real tokens (the sum of the trajectories' lengths) over it; `padding_fraction` is the share of token slots (rows x width
over the micro-batches) holding no trajectory token (`step.padding_fraction` for ours). The first (untimed)
run of each variant starts from the same weights (ours padded after one update of ours packed, at a tiny
learning rate), so its loss and gradient norm are printed as a check that the three compute the same update.

Acceptance targets (reported, not enforced): ours_packed's padding fraction <= 0.10, and ours_packed at least
as fast as transformers in real tokens/s. The machine may be shared: the load average before and after is
recorded; compare figures from one run only.
"""
from collections.abc import Sequence
import functools
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from dapo_jax import batch_placement
from dapo_jax import config as config_lib
from dapo_jax import old_log_probs
from dapo_jax import runtime
from dapo_jax import sharding
from dapo_jax.model import hf_io
from dapo_jax.rl import batching
from dapo_jax.rl import loss as loss_lib
from dapo_jax.rl import step
# pylint: enable=wrong-import-position
from bench_models import CONFIGS, random_hf_model  # pylint: disable=wrong-import-position

VARIANTS = ("ours_packed", "ours_padded", "transformers")
RATIOS = (("ours_packed", "transformers"), ("ours_packed", "ours_padded"), ("ours_padded", "transformers"))

LENGTH_SEED = 16       # the trajectories' lengths
TOKEN_SEED = 17        # their tokens and advantages
PROMPT_SHARE = 4       # a prompt is 1 / PROMPT_SHARE of its trajectory
PAD_ID = 0
TORCH_ADAMW_EPS = 1e-8  # optax.adamw's default eps, which step.make_optimizer keeps
ATTENTION_IMPLEMENTATION = {}  # the attention transformers chose (recorded in the report)

_CONFIGS = flags.DEFINE_list("configs", ["60m"], f"Model shapes to run, of {sorted(CONFIGS)}.")
_NUM_TRAJECTORIES = flags.DEFINE_integer("num_trajectories", 64, "Trajectories in the mini-batch.")
_MIN_LENGTH = flags.DEFINE_integer("min_length", 64, "Shortest trajectory (prompt + response), >= 2.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "Longest trajectory (prompt + response).")
_MICRO_BATCH_TOKENS = flags.DEFINE_integer("micro_batch_tokens", 4096,
                                           "Token budget of one micro-batch (rows x width, padding included).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per variant, after one untimed; the best is kept.")
_REMAT = flags.DEFINE_bool("remat", None, "Rematerialise our decoder layers in the backward pass; default: the "
                           "training config's model.remat.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", "auto", "JAX's persistent compilation cache, as the training program's "
    "trainer.compilation_cache_dir (\"auto\": the default directory; \"\": off): a rerun skips compiling ours.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Which of {VARIANTS} to run (ours_padded compiles one "
                              "program per micro-batch shape: minutes on a CPU).")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON here.")


# ---------------------------------------------------------------------------------------------------------------
# The batch


def trajectory_lengths(count: int, min_length: int, max_length: int) -> np.ndarray:
  """Total lengths (prompt + response): lognormal draws (LENGTH_SEED), median min * (max / min) ** 0.4, sigma
  log(max / min) / 3.5, rounded and clipped to [min_length, max_length]. A smaller count's lengths are the first
  of a larger one's."""
  log_range = np.log(max_length / min_length)
  draws = np.random.default_rng(LENGTH_SEED).lognormal(np.log(min_length) + 0.4 * log_range,
                                                       max(log_range / 3.5, 1e-6), count)
  return np.clip(np.rint(draws), min_length, max_length).astype(np.int64)


def make_trajectories(lengths: np.ndarray, vocab_size: int) -> dict:
  """Random tokens split into prompt (a quarter, at least one token) and response, and one advantage each."""
  rng = np.random.default_rng(TOKEN_SEED)
  prompts, responses = [], []
  for length in lengths.tolist():
    prompt_length = max(1, length // PROMPT_SHARE)
    tokens = rng.integers(0, vocab_size, length).astype(np.int32)
    prompts.append(tokens[:prompt_length].tolist())
    responses.append(tokens[prompt_length:].tolist())
  return {"prompts": prompts, "responses": responses,
          "advantages": rng.standard_normal(len(lengths)).astype(np.float32),
          "max_prompt_width": max(len(p) for p in prompts), "max_response_width": max(len(r) for r in responses)}


def length_summary(lengths: np.ndarray) -> dict:
  return {"min": int(lengths.min()), "median": float(np.median(lengths)), "mean": round(float(lengths.mean()), 2),
          "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max()), "total": int(lengths.sum())}


def padded_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
  """Micro-batches of one trajectory per row, in order: a trajectory joins the current micro-batch while
  (rows + 1) x (the longest trajectory in it) <= budget (a trajectory longer than the budget gets one alone)."""
  groups: list[list[int]] = []
  current: list[int] = []
  width = 0
  for index, length in enumerate(lengths):
    if current and (len(current) + 1) * max(width, length) > budget:
      groups.append(current)
      current, width = [], 0
    current.append(index)
    width = max(width, int(length))
  if current:
    groups.append(current)
  return groups


def _host_batch_args(trajectories: dict) -> dict:
  count = len(trajectories["responses"])
  return dict(advantages=trajectories["advantages"],
              sampler_logps=[np.zeros(len(r), np.float32) for r in trajectories["responses"]],
              loss_masked=np.zeros(count, bool))


def ours_packed_batches(trajectories: dict, budget: int) -> list[dict]:
  """The training program's micro-batches (train.py step 4): one mini-batch of every trajectory."""
  args = _host_batch_args(trajectories)
  [micro_batches] = batching.training_batches(
      trajectories["prompts"], trajectories["responses"], args["sampler_logps"], args["advantages"],
      args["loss_masked"], rows_per_update=len(trajectories["responses"]), micro_batch_tokens=budget, pad_id=PAD_ID,
      max_prompt_width=trajectories["max_prompt_width"], max_response_width=trajectories["max_response_width"])
  return micro_batches


def ours_padded_batches(trajectories: dict, groups: list[list[int]]) -> list[dict]:
  """One trajectory per row (`batching.pack` given single-trajectory rows), each micro-batch as wide as its
  longest trajectory."""
  prompts, responses = trajectories["prompts"], trajectories["responses"]
  return [batching.pack(prompts, responses, [[i] for i in group], pad_id=PAD_ID,
                        row_width=max(len(prompts[i]) + len(responses[i]) for i in group),
                        **_host_batch_args(trajectories))
          for group in groups]


# ---------------------------------------------------------------------------------------------------------------
# Ours


class Ours:
  """Our update as the training program builds it, on a one-device mesh; params and optimizer state are threaded
  through every run of both of our variants (the update donates them)."""

  def __init__(self, directory: str, train_config, remat: bool):
    self.mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    self.model_config, model = hf_io.load_hf_checkpoint(directory, dtype=jnp.float32, mesh=self.mesh, remat=remat)
    self.params = model.params
    optim = train_config.actor.optim
    optimizer = step.optimizer_from_config(optim)
    self.opt_state = sharding.init_optimizer_state(optimizer, self.params, self.mesh)
    self.updater = step.Updater.for_state(self.params, self.opt_state, optimizer=optimizer,
                                          model_config=self.model_config,
                                          loss_config=step.LossConfig.from_config(train_config))
    self.learning_rate = step.learning_rate_at(0, optim.lr, optim.warmup_steps)

  def run(self, build, log_prob_tokens: int | None) -> dict:
    """One run: build the micro-batches, old log-probs, the update; seconds of each and the result.

    `log_prob_tokens`: the old-log-prob pass's token budget, the pass run as the training program runs it
    (`old_log_probs.add_old_log_probs`, the micro-batches placed after it); None (the padded micro-batches, whose
    widths differ): the micro-batches are placed first and each gets its old log-probs in one call.
    """
    start = time.perf_counter()
    micro_batches = build()
    built = time.perf_counter()
    if log_prob_tokens:
      old_log_probs.add_old_log_probs([micro_batches], functools.partial(self.updater.old_log_probs, self.params),
                                      micro_batch_tokens=log_prob_tokens, mesh=self.mesh)
      placed = batch_placement.put_micro_batches(micro_batches, self.mesh)
    else:
      placed = batch_placement.put_micro_batches(micro_batches, self.mesh)
      for mb in placed:
        mb["old_logp"] = self.updater.old_log_probs(self.params, mb)
    jax.block_until_ready(placed)
    old = time.perf_counter()
    self.params, self.opt_state, metrics = self.updater(self.params, self.opt_state, placed,
                                                        learning_rate=self.learning_rate)
    jax.block_until_ready((self.params, self.opt_state))
    metrics = jax.device_get(metrics)
    end = time.perf_counter()
    slots = sum(int(np.prod(mb["segment_ids"].shape)) for mb in placed)
    return {"batching_s": built - start, "old_log_prob_s": old - built, "update_s": end - old,
            "seconds": end - start, "padding_fraction": step.padding_fraction(placed), "token_slots": slots,
            "micro_batches": len(placed), "shapes": [list(mb["segment_ids"].shape) for mb in placed],
            "pg_loss": float(metrics["actor/pg_loss"]), "grad_norm": float(metrics["actor/grad_norm"]),
            "ppo_kl": float(metrics["actor/ppo_kl"])}


# ---------------------------------------------------------------------------------------------------------------
# transformers


class Transformers:
  """transformers' Qwen2ForCausalLM and torch's AdamW with the same settings as ours."""

  def __init__(self, hf_model, train_config, loss_config: step.LossConfig, gradient_checkpointing: bool):
    self.model = hf_model.train()
    if gradient_checkpointing:  # as verl's DAPO recipe (enable_gradient_checkpointing) and as ours with remat
      self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optim = train_config.actor.optim
    self.learning_rate = step.learning_rate_at(0, optim.lr, optim.warmup_steps)
    self.grad_clip = optim.grad_clip
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, betas=(optim.b1, optim.b2),
                                       eps=TORCH_ADAMW_EPS, weight_decay=optim.weight_decay)
    self.loss_config = loss_config

  @staticmethod
  def micro_batches(trajectories: dict, groups: list[list[int]]) -> list[dict]:
    """Right-padded rows with attention_mask; `response_mask` marks the response tokens (the tokens predicted)."""
    prompts, responses = trajectories["prompts"], trajectories["responses"]
    out = []
    for group in groups:
      width = max(len(prompts[i]) + len(responses[i]) for i in group)
      ids = torch.full((len(group), width), PAD_ID, dtype=torch.long)
      attention = torch.zeros((len(group), width), dtype=torch.long)
      response = torch.zeros((len(group), width), dtype=torch.bool)
      for row, i in enumerate(group):
        length = len(prompts[i]) + len(responses[i])
        ids[row, :length] = torch.tensor(prompts[i] + responses[i])
        attention[row, :length] = 1
        response[row, len(prompts[i]):length] = True
      out.append({"input_ids": ids, "attention_mask": attention, "response_mask": response[:, 1:],
                  "advantages": torch.from_numpy(trajectories["advantages"][group]).float()[:, None]})
    return out

  def _logits(self, mb):
    return self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, :-1]

  @staticmethod
  def _token_logp(log_probs, mb):
    return torch.gather(log_probs, -1, mb["input_ids"][:, 1:, None])[..., 0]

  def _loss(self, logp, old_logp, mb, num_tokens):
    """rl/loss.policy_loss in token-mean, over the micro-batch's response tokens, divided by the mini-batch's."""
    c = self.loss_config
    mask = mb["response_mask"]
    advantages = torch.where(mask, mb["advantages"].expand_as(logp), torch.zeros_like(logp))
    log_ratio = torch.clamp(torch.where(mask, logp - old_logp, torch.zeros_like(logp)), -loss_lib.LOG_RATIO_BOUND,
                            loss_lib.LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    clip_loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - c.clip_low, 1 + c.clip_high))
    per_token = torch.where(advantages < 0, torch.minimum(-advantages * c.clip_c, clip_loss), clip_loss)
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / num_tokens

  def run(self, trajectories: dict, groups: list[list[int]]) -> dict:
    start = time.perf_counter()
    micro_batches = self.micro_batches(trajectories, groups)
    built = time.perf_counter()
    with torch.no_grad():
      for mb in micro_batches:
        log_probs = torch.log_softmax(self._logits(mb) / self.loss_config.temperature, dim=-1)
        mb["old_logp"] = torch.where(mb["response_mask"], self._token_logp(log_probs, mb), 0.0)
        del log_probs
    old = time.perf_counter()
    num_tokens = float(sum(int(mb["response_mask"].sum()) for mb in micro_batches))
    pg_loss = entropy = 0.0
    for mb in micro_batches:
      log_probs = torch.log_softmax(self._logits(mb) / self.loss_config.temperature, dim=-1)
      loss = self._loss(self._token_logp(log_probs, mb), mb["old_logp"], mb, num_tokens)
      loss.backward()
      with torch.no_grad():  # the entropy metric, as ours computes it (rl/step.micro_batch_loss)
        per_token = -(log_probs.exp() * log_probs).sum(-1)
        entropy += float(torch.where(mb["response_mask"], per_token, 0.0).sum()) / num_tokens
      pg_loss += float(loss.detach())
      del log_probs, loss
    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    slots = sum(mb["attention_mask"].numel() for mb in micro_batches)
    real = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return {"batching_s": built - start, "old_log_prob_s": old - built, "update_s": end - old,
            "seconds": end - start, "padding_fraction": 1.0 - real / slots, "token_slots": slots,
            "micro_batches": len(micro_batches), "shapes": [list(mb["input_ids"].shape) for mb in micro_batches],
            "pg_loss": pg_loss, "grad_norm": grad_norm, "entropy": entropy}


# ---------------------------------------------------------------------------------------------------------------


def make_hf_model(name: str, directory: str):
  """`bench_models.random_hf_model(name)`, saved to `directory`."""
  hf_model = random_hf_model(name)
  hf_model.save_pretrained(directory)
  ATTENTION_IMPLEMENTATION["name"] = hf_model.config._attn_implementation  # pylint: disable=protected-access
  return hf_model


def config_results(name: str, train_config, remat: bool) -> dict:
  budget = _MICRO_BATCH_TOKENS.value
  lengths = trajectory_lengths(_NUM_TRAJECTORIES.value, _MIN_LENGTH.value, _MAX_LENGTH.value)
  with tempfile.TemporaryDirectory() as directory:
    hf_model = make_hf_model(name, directory)
    ours = Ours(directory, train_config, remat)
  theirs = Transformers(hf_model, train_config, ours.updater.loss_config, gradient_checkpointing=remat)
  trajectories = make_trajectories(lengths, CONFIGS[name]["vocab_size"])
  groups = padded_groups(lengths.tolist(), budget)
  runs = {
      "ours_packed": lambda: ours.run(lambda: ours_packed_batches(trajectories, budget), budget),
      "ours_padded": lambda: ours.run(lambda: ours_padded_batches(trajectories, groups), None),
      "transformers": lambda: theirs.run(trajectories, groups),
  }
  runs = {variant: run for variant, run in runs.items() if variant in _VARIANTS.value}
  warm_up = {variant: run() for variant, run in runs.items()}  # compiles ours
  print(json.dumps({"config": name, "warm_up": {v: {k: r[k] for k in ("seconds", "pg_loss", "grad_norm")}
                                                for v, r in warm_up.items()}}), flush=True)
  timed = {variant: [] for variant in runs}
  for repeat in range(_REPEATS.value):
    for variant, run in runs.items():
      timed[variant].append(run())
      print(json.dumps({"config": name, "repeat": repeat, "variant": variant,
                        **{k: round(timed[variant][-1][k], 3) for k in ("seconds", "old_log_prob_s", "update_s")}}),
            flush=True)
  real_tokens = int(lengths.sum())
  variants = {}
  for variant in runs:
    best = min(timed[variant], key=lambda r: r["seconds"])
    variants[variant] = {
        "seconds": round(best["seconds"], 3), "tokens_per_s": round(real_tokens / best["seconds"], 1),
        "batching_s": round(best["batching_s"], 3), "old_log_prob_s": round(best["old_log_prob_s"], 3),
        "update_s": round(best["update_s"], 3), "all_seconds": [round(r["seconds"], 3) for r in timed[variant]],
        "padding_fraction": round(best["padding_fraction"], 4), "token_slots": best["token_slots"],
        "micro_batches": best["micro_batches"], "micro_batch_shapes": best["shapes"],
        "warm_up_seconds": round(warm_up[variant]["seconds"], 3),
        "warm_up_pg_loss": round(warm_up[variant]["pg_loss"], 6),
        "warm_up_grad_norm": round(warm_up[variant]["grad_norm"], 6),
    }
  rate = {variant: real_tokens / min(r["seconds"] for r in timed[variant]) for variant in runs}
  ratios = {f"{a}/{b}": round(rate[a] / rate[b], 3) for a, b in RATIOS if a in rate and b in rate}
  targets = {}
  if "ours_packed" in rate:
    targets["packed_padding_fraction_at_most_0.10"] = variants["ours_packed"]["padding_fraction"] <= 0.10
    if "transformers" in rate:
      targets["ours_packed_at_least_transformers"] = rate["ours_packed"] >= rate["transformers"]
  result = {
      "config": name, "num_trajectories": len(lengths), "micro_batch_tokens": budget, "real_tokens": real_tokens,
      "lengths": length_summary(lengths), "response_tokens": sum(len(r) for r in trajectories["responses"]),
      "variants": variants, "ratios": ratios, "targets": targets,
  }
  print(json.dumps({k: result[k] for k in ("config", "ratios", "targets")}), flush=True)
  return result


def main(argv):
  del argv
  unknown = set(_CONFIGS.value) - set(CONFIGS)
  if unknown:
    raise app.UsageError(f"unknown configs: {sorted(unknown)}")
  if not 2 <= _MIN_LENGTH.value <= _MAX_LENGTH.value:
    raise app.UsageError("need 2 <= --min_length <= --max_length (a prompt and a response token at least)")
  if not _VARIANTS.value or set(_VARIANTS.value) - set(VARIANTS):
    raise app.UsageError(f"--variants: one or more of {VARIANTS}")
  if _NUM_TRAJECTORIES.value < 1 or _REPEATS.value < 1 or _MICRO_BATCH_TOKENS.value < 1:
    raise app.UsageError("--num_trajectories, --repeats and --micro_batch_tokens must be >= 1")
  cache_dir = runtime.enable_compilation_cache(_COMPILATION_CACHE_DIR.value)  # before anything compiles
  train_config = config_lib.base_config()
  remat = train_config.model.remat if _REMAT.value is None else _REMAT.value
  load_before = os.getloadavg()
  started = time.perf_counter()
  results = [config_results(name, train_config, remat) for name in _CONFIGS.value]
  optim = train_config.actor.optim
  report = {
      "what": "one DAPO update (old log-probs + forward, backward, AdamW) of one mini-batch; see the script's "
              "docstring",
      "length_distribution": {"kind": "lognormal", "seed": LENGTH_SEED, "clipped_to": [_MIN_LENGTH.value,
                                                                                      _MAX_LENGTH.value],
                              "median": round(_MIN_LENGTH.value * (_MAX_LENGTH.value / _MIN_LENGTH.value) ** 0.4, 1),
                              "sigma": round(float(np.log(_MAX_LENGTH.value / _MIN_LENGTH.value) / 3.5), 3),
                              "prompt_share": 1 / PROMPT_SHARE},
      "num_trajectories": _NUM_TRAJECTORIES.value, "micro_batch_tokens": _MICRO_BATCH_TOKENS.value,
      "repeats": _REPEATS.value, "dtype": "float32", "remat": bool(remat), "compilation_cache_dir": cache_dir,
      "optimizer": {"lr": step.learning_rate_at(0, optim.lr, optim.warmup_steps), "b1": optim.b1, "b2": optim.b2,
                    "eps": TORCH_ADAMW_EPS, "weight_decay": optim.weight_decay, "grad_clip": optim.grad_clip},
      "loss": {"clip_low": train_config.actor.clip_ratio_low, "clip_high": train_config.actor.clip_ratio_high,
               "clip_c": train_config.actor.clip_ratio_c, "agg_mode": train_config.actor.loss_agg_mode,
               "logits_chunk_size": train_config.actor.logits_chunk_size},
      "timed": "best of repeats, each: batching + old log-prob pass + update (ours: Updater.old_log_probs per "
               "micro-batch, then Updater(...)); transformers: tensors + no-grad forward per micro-batch + "
               "forward/backward per micro-batch + clip + AdamW step",
      "machine": {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                  "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                  "transformers_attention": ATTENTION_IMPLEMENTATION.get("name"),
                  "jax_devices": [str(d) for d in jax.devices()[:1]], "jax_version": jax.__version__,
                  "torch_version": torch.__version__, "transformers_version": transformers.__version__},
      "load_average_before": [round(x, 2) for x in load_before],
      "load_average_after": [round(x, 2) for x in os.getloadavg()],
      "wall_seconds": round(time.perf_counter() - started, 1),
      "results": results,
  }
  text = json.dumps(report, indent=1)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
