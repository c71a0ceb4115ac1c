"""python -m dapo_jax.train [--config configs/<name>.py[:arg]] [--workdir DIR] [--config.key=value ...]

The DAPO training program, readable top to bottom: `train(config, workdir)` builds the policy, the data and the
optimizer, then runs rollout steps: draw prompts -> sample groups -> score + overlong shaping -> dynamic
sampling (order-preserving, stops sampling as soon as the batch is decided) -> old log-probs -> group
advantages -> mini-batch updates -> metrics -> checkpoint -> validation. With no flags it runs the embedded
default (configs/default.py) in ./runs/default.

Multi-host: one process per host, joined by `dapo_jax.distributed` (the config's `distributed` section, or JAX's
environment variables and cluster detection) before anything touches a device; the workdir must be one path
that every host sees. The trainer's params, optimizer state and batches are global arrays on the mesh of every
device, and the prompts are dealt out by draw (draw i to process i mod P). In DAPO's terms a rollout step is
data-parallel up to the update:
  * each process samples on its own devices (its copy of the weights is resharded onto a process-local mesh
    every step) and fills its share of the batch, data.train_batch_size / P groups, from its own draws in
    generation batches of data.gen_batch_size / P prompts: the keep rule and the order-preserving selection of
    DAPO_SPEC.md section 4 apply to each process's stream, and max_num_gen_batches bounds each process;
  * the update is global: mini-batch i is every process's i-th share of actor.ppo_mini_batch_size / P groups,
    and token-mean divides by the token count of the whole mini-batch (section 5); actor.micro_batch_tokens
    and rollout.max_concurrent_decodes are per process;
  * the processes stop together: when the data of one runs out, when one has spent its generation batches
    (the run fails everywhere), or after the step in which one was sent SIGTERM;
  * metrics are the whole step's (group counts summed, scores and lengths over every process's groups, raw
    accuracy over every finished group), written by process 0, as are config.json, the task files, the
    base-model cache and the checkpoints' policy files; validation splits the problems between the processes;
  * a checkpoint holds every process's data-iterator and dynamic-sampling state; a run resumes with the number
    of processes it was saved with.
With one process each rule is the single-host one.
"""
import collections
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any

from absl import app
from absl import flags
from clu import metric_writers
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from flax import nnx

from dapo_jax import checkpoint as checkpoint_lib
from dapo_jax import config as config_lib
from dapo_jax import distributed
from dapo_jax import metrics as metrics_lib
from dapo_jax import sft
from dapo_jax import sharding
from dapo_jax import validation
from dapo_jax.data import math as math_data
from dapo_jax.data import synthetic
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.model.config import get_preset
from dapo_jax.rl import advantages as advantages_lib
from dapo_jax.rl import batching
from dapo_jax.rl import filtering
from dapo_jax.rl import rewards
from dapo_jax.rl import step
from dapo_jax.rollout import sampler as sampler_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "./runs/default", "Where checkpoints, metrics and caches go.")

_EXTRA_SECTIONS = ("synthetic", "warmup")


# ------------------------------------------------------------------------------------------------------------
# Set-up: data, tokenizer and the initial policy


def _resolve_paths(paths, workdir: str) -> list[str]:
  return [os.path.expanduser(p.replace("{workdir}", workdir)) for p in paths]


def _prepare_synthetic_task(config, workdir: str) -> str | None:
  """Writes the embedded default's task files into the workdir once (process 0; the others wait for it);
  returns its tokenizer directory."""
  if "synthetic" not in config:
    return None
  directory = os.path.join(workdir, "data")
  files = synthetic.SyntheticTaskFiles(os.path.join(directory, "train.parquet"),
                                       os.path.join(directory, "heldout.parquet"),
                                       os.path.join(directory, "tokenizer"))
  if distributed.is_primary() and not all(os.path.exists(p) for p in dataclasses.astuple(files)):
    logging.info("Writing the synthetic arithmetic task to %s", directory)
    files = synthetic.write_synthetic_task(directory, config.synthetic.seed, num_heldout=config.synthetic.num_heldout,
                                           train_repeats=config.synthetic.train_repeats)
  distributed.sync("synthetic task written")
  return files.tokenizer_dir


def _initial_policy(config, workdir: str, tokenizer, mesh) -> tuple[Any, qwen2.Params]:
  """(model config, params): an HF checkpoint, or a preset (warmed up on the synthetic task when configured)."""
  dtype, param_dtype = config_lib.DTYPES[config.model.dtype], config_lib.DTYPES[config.model.param_dtype]
  if config.model.hf_checkpoint:
    if config.model.preset:
      logging.info("model.hf_checkpoint is set: its weights and shape are used, not the preset %r",
                   config.model.preset)
    model_config, model = hf_io.load_hf_checkpoint(config.model.hf_checkpoint, dtype=dtype, param_dtype=param_dtype,
                                                   mesh=mesh, remat=config.model.remat)
    return model_config, model.params
  base_dir = os.path.join(workdir, "base_model")
  if "warmup" in config and os.path.exists(os.path.join(base_dir, "config.json")):
    logging.info("Loading the warmed-up base model cached in %s", base_dir)
    model_config, model = hf_io.load_hf_checkpoint(base_dir, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                                   remat=config.model.remat)
    return model_config, model.params
  model_config = get_preset(config.model.preset, dtype=dtype, param_dtype=param_dtype, remat=config.model.remat)
  if model_config.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(f"config.model.preset: {config.model.preset!r} has vocab_size "
                                 f"{model_config.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
  model = qwen2.Qwen2(model_config, rngs=nnx.Rngs(config.trainer.seed))
  params = sharding.shard_params(model.params, sharding.param_shardings(model, mesh))
  if "warmup" not in config:
    return model_config, params
  w = config.warmup
  train_problems, _ = synthetic.split_problems(config.synthetic.seed, config.synthetic.num_heldout)
  pairs = synthetic.warmup_pairs(train_problems, w.steps * w.batch_size, config.synthetic.seed,
                                 wrong_order_fraction=w.wrong_order_fraction)
  examples = [(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True),
               tokenizer.encode(r) + [tokenizer.eos_id]) for p, r in pairs]
  logging.info("Supervised warm-up of the base model: %d steps of %d examples (%.0f%% wrong-order solutions)",
               w.steps, w.batch_size, 100 * w.wrong_order_fraction)
  params, _ = sft.supervised_warmup(params, model_config, examples, steps=w.steps, batch_size=w.batch_size,
                                    learning_rate=w.lr, pad_id=tokenizer.pad_id, seed=config.synthetic.seed)
  if distributed.is_primary():
    tokenizer.save(base_dir)
  hf_io.save_hf_checkpoint(params, model_config, base_dir)  # every process gathers, process 0 writes
  return model_config, params


# ------------------------------------------------------------------------------------------------------------
# Scoring groups


def _score_group(responses: list[sampler_lib.Response], example: math_data.PromptExample, *, config, tokenizer,
                 score_fns, pool) -> dict:
  """Scores (by the example's data source), shapes and records one finished group (DAPO_SPEC.md sections 1-2)."""
  texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in responses]
  scored = rewards.score_batch(texts, [example.ground_truth] * len(texts),
                               data_sources=[example.data_source] * len(texts), score_fns=score_fns,
                               default_score_fn=None,
                               num_workers=0 if pool is None else None, pool=pool, timeout_s=config.reward.timeout_s)
  lengths = np.array([len(r.token_ids) for r in responses])
  scores = scored.scores.astype(np.float32)
  shaped = scores.copy()
  ob = config.reward.overlong_buffer
  if ob.enable:
    shaped = shaped + rewards.overlong_penalties(lengths, config.data.max_response_length, ob.len,
                                                 ob.penalty_factor).astype(np.float32)
  return {"example": example, "responses": responses, "texts": texts, "scores": scores, "rewards": shaped,
          "accs": scored.accs.astype(np.float32), "lengths": lengths, "timeouts": scored.num_timeouts}


def _encode_group(scored: dict) -> dict:
  """A scored group (`_score_group`) as JSON values, for the checkpointed dynamic-sampling state of groups carried
  over to the next step (float32 arrays round-trip exactly through JSON numbers)."""
  def plain(value):
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value

  return {"example": {k: plain(v) for k, v in dataclasses.asdict(scored["example"]).items()},
          "responses": [{k: plain(v) for k, v in dataclasses.asdict(r).items()} for r in scored["responses"]],
          **{k: plain(v) for k, v in scored.items() if k not in ("example", "responses")}}


def _decode_group(encoded: dict) -> dict:
  """The scored group `_encode_group` encoded."""
  example = math_data.PromptExample(**{**encoded["example"],
                                       "prompt_ids": np.asarray(encoded["example"]["prompt_ids"], np.int32)})
  responses = [sampler_lib.Response(**{**r, "token_ids": np.asarray(r["token_ids"], np.int32),
                                       "logp_sampled": np.asarray(r["logp_sampled"], np.float32),
                                       "logp_full": np.asarray(r["logp_full"], np.float32)})
               for r in encoded["responses"]]
  arrays = {k: np.asarray(encoded[k], np.float32) for k in ("scores", "rewards", "accs")}
  return {**encoded, **arrays, "example": example, "responses": responses,
          "lengths": np.asarray(encoded["lengths"], np.int64)}


# ------------------------------------------------------------------------------------------------------------
# Turning a selected batch into training arrays


def _training_batches(groups: list[dict], config, tokenizer, groups_per_update: int
                      ) -> tuple[list[list[dict]], dict]:
  """Mini-batches of `groups_per_update` groups (each a list of micro-batches of numpy arrays) and the batch's
  statistics."""
  n = config.rollout.n
  rewards_all = np.concatenate([g["rewards"] for g in groups])
  group_ids = np.repeat(np.arange(len(groups)), n)
  advantages = advantages_lib.group_advantages(rewards_all, group_ids, norm_by_std=config.algorithm.norm_adv_by_std)
  prompts, responses, sampler_logps, truncated = [], [], [], []
  for g in groups:
    for r in g["responses"]:
      prompts.append(list(g["example"].prompt_ids))
      responses.append(list(r.token_ids))
      sampler_logps.append(np.asarray(r.logp_full, np.float32))
      truncated.append(r.finish_reason == "length")
  loss_masked = np.array(truncated) if config.reward.overlong_filter else np.zeros(len(responses), bool)
  per_update = groups_per_update * n
  # Length buckets stop at the longest lengths the config allows (a 20,480-token response pads to 20,480).
  max_widths = dict(max_prompt_width=config.data.max_prompt_length, max_response_width=config.data.max_response_length)
  mini_batches = []
  for start in range(0, len(responses), per_update):
    rows = list(range(start, min(start + per_update, len(responses))))
    micro_rows = batching.split_by_token_budget([len(prompts[i]) for i in rows], [len(responses[i]) for i in rows],
                                                config.actor.micro_batch_tokens, **max_widths)
    micro_batches = []
    for micro in micro_rows:
      picked = [rows[i] for i in micro]
      mb = batching.collate([prompts[i] for i in picked], [responses[i] for i in picked], pad_id=tokenizer.pad_id,
                            **max_widths)
      width = mb["response_ids"].shape[1]
      mb["response_mask"] = mb["response_mask"] * (~loss_masked[picked])[:, None].astype(np.int32)
      mb["advantages"] = advantages[picked]
      mb["sampler_logp"] = np.stack([np.pad(sampler_logps[i], (0, width - len(sampler_logps[i]))) for i in picked])
      micro_batches.append(mb)
    mini_batches.append(micro_batches)
  stats = {"advantages": advantages, "overlong_masked": int(loss_masked.sum()),
           "prompt_lengths": np.array([len(p) for p in prompts]),
           "response_lengths": np.array([len(r) for r in responses]), "truncated": np.array(truncated)}
  return mini_batches, stats


def _summary(name: str, values) -> dict[str, float]:
  values = np.asarray(values, np.float64)
  return {f"{name}/mean": float(values.mean()), f"{name}/max": float(values.max()), f"{name}/min": float(values.min())}


def _process_statistics(groups: list[dict], stats: dict, selection_metrics: dict, timeouts: int) -> dict:
  """This process's share of the step's statistics, as JSON values for `distributed.allgather_json`."""
  return {"scores": np.concatenate([g["scores"] for g in groups]).tolist(),
          "rewards": np.concatenate([g["rewards"] for g in groups]).tolist(),
          "advantages": stats["advantages"].tolist(), "response_lengths": stats["response_lengths"].tolist(),
          "prompt_lengths": stats["prompt_lengths"].tolist(), "truncated": stats["truncated"].tolist(),
          "overlong_masked": stats["overlong_masked"], "timeouts": timeouts, "selection": selection_metrics}


def _step_statistics(per_process: list[dict]) -> tuple[dict[str, float], np.ndarray, int]:
  """The step's batch metrics over every process's groups (in process order), every response length, and the
  number of prompt and response tokens.

  Of the dynamic-sampling metrics, group counts add up; `train/num_gen_batches` is the mean over processes
  (the prompts drawn / data.gen_batch_size); `train/raw_acc` is the mean over every finished group, each
  process's weighted by its share of them. With one process every value is its own.
  """
  def joined(key, dtype=np.float64):
    return np.concatenate([np.asarray(p[key], dtype) for p in per_process])

  response_lengths, prompt_lengths = joined("response_lengths", np.int64), joined("prompt_lengths", np.int64)
  out = {}
  out.update(_summary("critic/score", joined("scores")))
  out.update(_summary("critic/rewards", joined("rewards")))
  out.update(_summary("critic/advantages", joined("advantages")))
  out.update(_summary("response_length", response_lengths))
  out["response_length/clip_ratio"] = float(joined("truncated", bool).mean())
  out.update(_summary("prompt_length", prompt_lengths))
  selections = [p["selection"] for p in per_process]
  finished = [s["train/kept_groups"] + s["train/dropped_groups"] for s in selections]
  for name in selections[0]:
    if name == "train/raw_acc":
      out[name] = (float(sum(s[name] * (f / sum(finished)) for s, f in zip(selections, finished) if f))
                   if sum(finished) else float("nan"))
    elif name == "train/num_gen_batches":
      out[name] = float(sum(s[name] for s in selections) / len(selections))
    else:
      out[name] = float(sum(s[name] for s in selections))
  out["train/overlong_masked"] = float(sum(p["overlong_masked"] for p in per_process))
  out["reward/timeouts"] = float(sum(p["timeouts"] for p in per_process))
  return out, response_lengths, int(response_lengths.sum() + prompt_lengths.sum())


# ------------------------------------------------------------------------------------------------------------
# Validation


def _validate(params, sampler, val_prompts, config, tokenizer, score_fns, pool, seed) -> dict:
  """avg@k, best@k, maj@k and pass@k of k samples per unique validation problem (DAPO_SPEC.md section 8).

  With several processes each samples every P-th problem (seeded by its process index), and every response's
  result is gathered so that the metrics are those of all the problems, on every process.
  """
  vk = config.rollout.val_kwargs
  mine = list(range(jax.process_index(), len(val_prompts), jax.process_count()))
  results = []
  if mine:
    result = validation.validate(
        params, sampler, [val_prompts[i] for i in mine], tokenizer=tokenizer, n=vk.n,
        seed=seed + jax.process_index(), score_fns=score_fns, pool=pool,
        sampling=sampler_lib.SamplingParams(temperature=vk.temperature, top_p=vk.top_p, top_k=config.rollout.top_k),
        timeout_s=config.reward.timeout_s)
    results = [(mine[p.index], p.example.data_source, p.accs.tolist(), p.predictions) for p in result.problems]
  gathered = sorted((r for process in distributed.allgather_json(results) for r in process), key=lambda r: r[0])
  samples = [metrics_lib.SampleResult(source, str(index), float(acc), pred)
             for index, source, accs, predictions in gathered for acc, pred in zip(accs, predictions)]
  return metrics_lib.validation_metrics(samples, prefix="val-core")


# ------------------------------------------------------------------------------------------------------------
# The loop


class _Preemption:
  """Turns SIGTERM (TPU VM preemption) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: finishing this step, saving a checkpoint and exiting")
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was sent SIGTERM. A collective (every process asks at the same point of the loop),
    so that all of them stop after the same step: one alone would leave the others waiting for it."""
    return bool(distributed.global_max([self.requested])[0])


# What a process's sampling phase ended with; the processes go on with the largest (`distributed.global_max`).
_BATCH_DECIDED, _DATA_RAN_OUT, _GEN_BATCHES_SPENT = 0, 1, 2


def _sampler_params(params: qwen2.Params, shardings, dtype) -> qwen2.Params:
  """The sampler's copy of the trainer's params: in the compute dtype `dtype`, in the sampler's layout.

  Every use of a weight in the prefill and decode passes casts it to the compute dtype first, so a copy made in
  that dtype samples exactly the same tokens; with bfloat16 compute over float32 master weights it takes half
  the memory (the 32B recipe's copy on a 4-chip host: 15 instead of 30 GiB a chip) and spares the casts. The cast
  runs in the trainer's layout (small shards), then `sharding.reshard` moves the copy on the devices.
  """
  if any(leaf.dtype != dtype for leaf in jax.tree.leaves(params)):
    params = _cast(params, dtype)
  return sharding.reshard(params, shardings)


@functools.partial(jax.jit, static_argnums=1)
def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def _own_loop_state(meta: dict) -> dict:
  """This process's data-iterator and dynamic-sampling state from a checkpoint's metadata: a list indexed by
  process (checkpoints of single-process runs saved before multi-host support keep it at the top level)."""
  states = meta.get("processes") or [{"data_iterator": meta["data_iterator"],
                                      "dynamic_sampling": meta["dynamic_sampling"]}]
  if len(states) != jax.process_count():
    raise ValueError(
        f"The checkpoint was saved by {len(states)} processes and this run has {jax.process_count()}: each "
        "process's data stream and dynamic-sampling state resume only with the process count they were saved with")
  return states[jax.process_index()]


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs DAPO; returns the last step's metrics."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  num_processes, process_index = jax.process_count(), jax.process_index()
  config_lib.validate(config, extra_sections=_EXTRA_SECTIONS, num_processes=num_processes)
  preemption = _Preemption()
  writer = metric_writers.create_default_writer(workdir, just_logging=not distributed.is_primary())
  if distributed.is_primary():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.mesh_from_config(config.mesh)

  # Data and tokenizer.
  task_tokenizer_dir = _prepare_synthetic_task(config, workdir)
  tokenizer = tokenizer_lib.load_tokenizer(config.model.hf_checkpoint or task_tokenizer_dir)
  options = math_data.PromptOptions(max_prompt_length=config.data.max_prompt_length,
                                    truncation=config.data.truncation,
                                    filter_overlong_prompts=config.data.filter_overlong_prompts)
  train_prompts = math_data.training_prompts(_resolve_paths(config.data.train_files, workdir), tokenizer, options)
  val_prompts = (math_data.validation_prompts(_resolve_paths(config.data.val_files, workdir), tokenizer, options)
                 if config.data.val_files else [])
  # Each process draws data.gen_batch_size / P prompts of every generation batch (draw i goes to process i mod P).
  gen_batches = math_data.epoch_batches(train_prompts, batch_size=config.data.gen_batch_size,
                                        seed=config.data.seed if config.data.shuffle else None)
  data_iterator = math_data.batch_iterator(gen_batches)
  data_sources = sorted({e.data_source for e in train_prompts} | {e.data_source for e in val_prompts})
  score_fns = rewards.reward_functions(data_sources, function=config.reward.function,
                                       strict_box=config.reward.strict_box)
  logging.info("Reward: %s for data sources %s", config.reward.function or "math_dapo", data_sources)
  pool = rewards.RewardPool(config.reward.num_workers) if config.reward.num_workers > 0 else None

  # Policy, optimizer, sampler and the dynamic-sampling state machine.
  model_config, params = _initial_policy(config, workdir, tokenizer, mesh)
  optim = config.actor.optim
  optimizer = step.make_optimizer(learning_rate=optim.lr, b1=optim.b1, b2=optim.b2,
                                  weight_decay=optim.weight_decay, grad_clip=optim.grad_clip)
  opt_state = sharding.init_optimizer_state(optimizer, params, mesh)
  loss_config = step.LossConfig(clip_low=config.actor.clip_ratio_low, clip_high=config.actor.clip_ratio_high,
                                clip_c=config.actor.clip_ratio_c, agg_mode=config.actor.loss_agg_mode,
                                entropy_coeff=config.actor.entropy_coeff, temperature=config.rollout.temperature,
                                tis_cap=config.actor.tis_cap, logits_chunk_size=config.actor.logits_chunk_size)
  # The sampler's own layout: tensor parallel only (decode reads every weight for each token, so FSDP would
  # gather the weights again at every step: `sharding.DECODE_RULES`). With several hosts each process samples
  # its own prompts, on its own devices. Each rollout step and validation samples from a copy of the trainer's
  # params in the compute dtype, resharded on the devices (`_sampler_params`), dropped after sampling.
  sampler_mesh = mesh if num_processes == 1 else sharding.process_local_mesh()
  sampler_shardings = sharding.param_shardings(qwen2.abstract_model(model_config), sampler_mesh,
                                               sharding.DECODE_RULES)
  sampler = sampler_lib.GroupSampler(
      model_config, num_slots=config.rollout.max_concurrent_decodes,
      max_prompt_length=config.data.max_prompt_length, max_response_length=config.data.max_response_length,
      eos_ids=tokenizer.eos_ids, steps_per_call=config.rollout.decode_steps_per_call, mesh=sampler_mesh)
  train_sampling = sampler_lib.SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                                              top_k=config.rollout.top_k)
  fg = config.algorithm.filter_groups
  dynamic = filtering.DynamicSampler(train_batch_size=config.data.train_batch_size // num_processes,
                                     n=config.rollout.n, gen_batch_size=config.data.gen_batch_size // num_processes,
                                     max_num_gen_batches=fg.max_num_gen_batches, metric=fg.metric,
                                     enabled=fg.enable, carry_over=fg.carry_over)

  # Resume from the newest complete checkpoint of this workdir, else from trainer.resume_from when set: a
  # restarted job always continues from its own latest progress.
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             max_to_keep=config.trainer.keep_checkpoints)
  checkpoint_lib.write_policy_files(checkpointer.directory, model_config, tokenizer)

  def run_validation(at_step: int) -> dict:
    logging.info("Validation at rollout step %d (%d problems x %d samples) ...", at_step, len(val_prompts),
                 config.rollout.val_kwargs.n)
    val = _validate(_sampler_params(params, sampler_shardings, model_config.dtype), sampler, val_prompts, config,
                    tokenizer, score_fns, pool, seed=config.trainer.seed + 10**6)
    writer.write_scalars(at_step, val)
    logging.info("step %d validation: %s", at_step,
                 json.dumps({k: round(v, 4) for k, v in val.items() if "mean@" in k or "pass@1" in k}))
    return val

  start_step, validation_due = 0, config.trainer.val_before_train and bool(val_prompts)
  resume_dir, resume_step = checkpointer.directory, checkpointer.latest_step()
  if resume_step is None and config.trainer.resume_from:
    resume_dir, resume_step = checkpoint_lib.resolve_training_checkpoint(config.trainer.resume_from)
  if resume_step is not None:
    source = checkpointer if resume_dir == checkpointer.directory else checkpoint_lib.Checkpointer(resume_dir)
    state, meta = source.restore(resume_step, checkpoint_lib.abstract_like({"params": params,
                                                                            "opt_state": opt_state}))
    params, opt_state = state["params"], state["opt_state"]
    loop_state = _own_loop_state(meta)
    data_iterator.set_state(loop_state["data_iterator"])
    dynamic.load_state_dict(loop_state["dynamic_sampling"], decode_payload=_decode_group)
    start_step, validation_due = meta["rollout_step"], meta.get("validation_due", False)
    logging.info("Resumed from rollout step %d of %s", start_step, resume_dir)
  if validation_due:  # before training, or the validation a preemption postponed
    run_validation(start_step)

  last_metrics: dict = {}
  run_start = time.time()
  for rollout_step in range(start_step, config.trainer.total_training_steps):
    step_start = time.time()
    learning_rate = step.learning_rate_at(rollout_step, optim.lr, optim.warmup_steps)

    # 1-3. Sample groups, scoring each as it finishes, until dynamic sampling has decided the batch. Prompts
    # are admitted in draw order while dynamic sampling still wants them; generation batches are opened only
    # when the groups drawn so far can no longer fill the batch. The seed differs between steps and processes.
    gen_start = time.time()
    drawn: dict[int, math_data.PromptExample] = {}
    queue: collections.deque[int] = collections.deque()
    timeouts = 0
    data_exhausted = False
    spent: filtering.DynamicSamplingExhausted | None = None
    seed = (config.trainer.seed * 1_000_003 + rollout_step * num_processes + process_index) % 2**31
    sampler_params = _sampler_params(params, sampler_shardings, model_config.dtype)
    with sampler.start(sampler_params, n=config.rollout.n, seed=seed, sampling=train_sampling) as run:
      try:
        while not dynamic.is_decided():
          if not queue and dynamic.needs_more_prompts():
            try:
              examples = next(data_iterator)
            except StopIteration:
              data_exhausted = True
            else:
              ids = dynamic.open_gen_batch(len(examples))
              drawn.update(zip(ids, examples))
              queue.extend(ids)
          while queue and run.has_room() and dynamic.wants_group(queue[0]):
            group_id = queue.popleft()
            run.submit(group_id, drawn[group_id].prompt_ids)
          if run.idle:
            break  # nothing in flight and nothing left to admit: only when the data ran out
          for group in run.step():
            scored = _score_group(group.responses, drawn[group.prompt_index], config=config, tokenizer=tokenizer,
                                  score_fns=score_fns, pool=pool)
            timeouts += scored["timeouts"]
            dynamic.add_group(group.prompt_index,
                              {"acc": scored["accs"], "score": scored["scores"], "reward": scored["rewards"]},
                              scored)
      except filtering.DynamicSamplingExhausted as error:
        spent = error  # raised below, once the other processes know
      if dynamic.is_decided():
        run.cancel(run.in_flight)
    del sampler_params
    outcome = (_GEN_BATCHES_SPENT if spent else _BATCH_DECIDED if dynamic.is_decided() else _DATA_RAN_OUT)
    outcome = int(distributed.global_max([outcome])[0])  # every process goes on only if all decided their batch
    if outcome == _GEN_BATCHES_SPENT:
      raise spent or filtering.DynamicSamplingExhausted(
          f"Dynamic sampling spent its generation batches at rollout step {rollout_step} on another process "
          "(its log says how many groups it kept): raise algorithm.filter_groups.max_num_gen_batches or "
          "data.gen_batch_size, or turn off algorithm.filter_groups.enable")
    if outcome == _DATA_RAN_OUT:
      logging.info("The training data ran out at rollout step %d (exhausted: %s); stopping", rollout_step,
                   data_exhausted)
      break
    gen_time = time.time() - gen_start
    selection = dynamic.take_batch()
    groups = list(selection.payloads)

    # 4-5. Old log-probs (before any update of this step) and group advantages. Each process places its own
    # rows; every mini-batch is global (`sharding.put_micro_batches`), and the old log-probs stay on the devices.
    old_start = time.time()
    mini_batches, stats = _training_batches(groups, config, tokenizer,
                                            config.actor.ppo_mini_batch_size // num_processes)
    mini_batches = [sharding.put_micro_batches(micro_batches, mesh) for micro_batches in mini_batches]
    for micro_batches in mini_batches:
      for mb in micro_batches:
        mb["old_logp"] = step.old_log_probs(params, mb, model_config=model_config,
                                            temperature=loss_config.temperature,
                                            chunk_size=loss_config.logits_chunk_size)
    mismatch = step.logprob_mismatch([mb for micro_batches in mini_batches for mb in micro_batches])
    old_time = time.time() - old_start

    # 6. One optimizer update per mini-batch (ppo_epochs passes, no shuffle).
    update_start = time.time()
    update_metrics = []
    for _ in range(config.actor.ppo_epochs):
      for micro_batches in mini_batches:
        params, opt_state, m = step.update_step(params, opt_state, micro_batches, learning_rate=learning_rate,
                                                optimizer=optimizer, model_config=model_config,
                                                loss_config=loss_config)
        update_metrics.append(jax.device_get(m))
    del mini_batches
    update_time = time.time() - update_start

    # 7. Metrics (DAPO_SPEC.md section 10), of the whole step: every process's batch statistics are gathered.
    step_time = time.time() - step_start
    batch_metrics, response_lengths, num_tokens = _step_statistics(distributed.allgather_json(
        _process_statistics(groups, stats, selection.metrics, timeouts)))
    out = {name: float(np.mean([m[name] for m in update_metrics])) for name in update_metrics[0]}
    out["actor/skipped_updates"] = float(sum(m["actor/skipped_updates"] for m in update_metrics))
    out.update(batch_metrics)
    out.update(mismatch)
    out.update({"timing_s/gen": gen_time, "timing_s/old_log_prob": old_time, "timing_s/update_actor": update_time,
                "timing_s/step": step_time, "perf/time_per_step": step_time, "perf/throughput": num_tokens / step_time})
    writer.write_scalars(rollout_step + 1, out)
    writer.write_histograms(rollout_step + 1, {"response_length": response_lengths})
    if (rollout_step + 1) % config.trainer.log_freq == 0:
      done = rollout_step + 1 - start_step
      eta = (time.time() - run_start) / done * (config.trainer.total_training_steps - rollout_step - 1)
      logging.info("step %d/%d: score %.3f raw_acc %.3f kept %d/%d gen_batches %d entropy %.3f  %.2f s/step, ETA %.0f s",
                   rollout_step + 1, config.trainer.total_training_steps, out["critic/score/mean"],
                   out.get("train/raw_acc", float("nan")), int(out.get("train/kept_groups", 0)),
                   int(out.get("train/kept_groups", 0) + out.get("train/dropped_groups", 0)),
                   int(out.get("train/num_gen_batches", 0)), out["actor/entropy"], step_time, eta)
    if rollout_step == start_step:
      samples = "\n\n".join(f"{g['example'].prompt_text}\n---\n{g['texts'][0]}" for g in groups[:4])
      writer.write_texts(rollout_step + 1, {"samples": samples})
    last_metrics = out

    # 8. Validation, then the checkpoint. On preemption the validation is postponed (the checkpoint records it
    # as due, and the resumed run starts with it) so that the save happens within the VM's grace period.
    finished = rollout_step + 1 == config.trainer.total_training_steps
    validation_due = bool(val_prompts) and bool(config.trainer.test_freq) and (
        (rollout_step + 1) % config.trainer.test_freq == 0 or finished)
    preempted = preemption.agreed()
    if validation_due and not preempted:
      last_metrics = {**out, **run_validation(rollout_step + 1)}
      validation_due = False
      preempted = preemption.agreed()  # sent during the validation: this step's checkpoint is the last
    if (rollout_step + 1) % config.trainer.save_freq == 0 or finished or preempted:
      loop_states = distributed.allgather_json({"data_iterator": data_iterator.get_state(),
                                                "dynamic_sampling": dynamic.state_dict(_encode_group)})
      checkpointer.save(rollout_step + 1, {"params": params, "opt_state": opt_state},
                        {"rollout_step": rollout_step + 1, "processes": loop_states, "validation_due": validation_due})
    writer.flush()
    if preempted:
      logging.warning("Preempted: stopped after rollout step %d; the next start resumes from it", rollout_step + 1)
      break
  checkpointer.wait()
  checkpointer.close()
  if pool is not None:
    pool.close()
  writer.close()
  return last_metrics


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  distributed.initialize_from_config(_CONFIG.value)  # before anything touches a device
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
