"""python -m dapo_jax.train [--config configs/<name>.py[:arg]] [--workdir DIR] [--config.key=value ...]

The DAPO training program, readable top to bottom: `train(config, workdir)` builds the policy, the data and the
optimizer, then runs rollout steps: draw prompts -> sample groups -> score + overlong shaping -> dynamic
sampling (order-preserving, stops sampling as soon as the batch is decided) -> old log-probs -> group
advantages -> mini-batch updates -> metrics -> validation -> checkpoint, until trainer.total_epochs passes over
the data are used up (or trainer.total_training_steps, when set). With no flags it runs the embedded default
(configs/default.py) in ./runs/default.

Multi-host: one process per host, joined by `dapo_jax.distributed` (the config's `distributed` section, or JAX's
environment variables and cluster detection) before anything touches a device; the workdir must be one path
that every host sees. The trainer's params, optimizer state and batches are global arrays on the mesh of every
device, and the prompts are dealt out by draw (draw i to process i mod P). In DAPO's terms a rollout step is
data-parallel up to the update:
  * each process samples on its own devices (its copy of the weights is resharded onto a process-local mesh
    every step) and fills its share of the batch, data.train_batch_size / P groups, from its own draws in
    generation batches of data.gen_batch_size / P prompts: the keep rule and the order-preserving selection of
    docs/algorithm.md section 4 apply to each process's stream, and max_num_gen_batches bounds each process;
  * the update is global: mini-batch i is every process's i-th share of actor.ppo_mini_batch_size / P groups,
    and token-mean divides by the token count of the whole mini-batch (docs/algorithm.md section 5);
    actor.micro_batch_tokens, rollout.log_prob_micro_batch_tokens and rollout.max_num_seqs are per process;
  * the processes stop together: when the data of one runs out, when one has spent its generation batches
    (the run fails everywhere), or after the step in which one was sent SIGTERM;
  * metrics are the whole step's (group counts summed, scores and lengths over every process's groups, raw
    accuracy over every finished group), written by process 0, as are config.json, the task files, the
    base-model cache and the checkpoints' policy files; validation splits the problems between the processes;
  * a checkpoint holds every process's data-iterator and dynamic-sampling state; a run resumes with the number
    of processes it was saved with.
With one process each rule is the single-host one.
"""
import functools
import json
import logging
import os
import time

from dapo_jax import runtime  # first: it quiets what TensorFlow prints while clu imports it
from absl import app
from absl import flags
from absl import logging as absl_logging
from clu import metric_writers
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from dapo_jax import batch_placement
from dapo_jax import checkpoint as checkpoint_lib
from dapo_jax import config as config_lib
from dapo_jax import distributed
from dapo_jax import old_log_probs
from dapo_jax import policy
from dapo_jax import rollout_collection
from dapo_jax import scoring
from dapo_jax import sharding
from dapo_jax import step_metrics
from dapo_jax import validation
from dapo_jax.data import epochs
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.model import qwen2
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.rl import advantages as advantages_lib
from dapo_jax.rl import batching
from dapo_jax.rl import filtering
from dapo_jax.rl import reward_pool
from dapo_jax.rl import rewards
from dapo_jax.rl import step
from dapo_jax.rollout import sampler as sampler_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "./runs/default", "Where checkpoints, metrics and caches go.")

_EXTRA_SECTIONS = ("synthetic", "warmup")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs DAPO; returns the last step's metrics."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  num_processes, process_index = jax.process_count(), jax.process_index()
  config_lib.validate(config, extra_sections=_EXTRA_SECTIONS, num_processes=num_processes, workdir=workdir)
  preemption = distributed.PreemptionSignal()
  writer = _metric_writer(workdir)
  if distributed.is_primary():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.mesh_from_config(config.mesh)

  # Data, tokenizer and rewards. Each process draws data.gen_batch_size / P prompts of every generation batch.
  task_tokenizer_dir = policy.prepare_synthetic_task(config, workdir)  # the embedded default's files, once
  tokenizer = tokenizer_lib.load_tokenizer(config.model.hf_checkpoint or task_tokenizer_dir)
  options = prompts_lib.PromptOptions(max_prompt_length=config.data.max_prompt_length,
                                      truncation=config.data.truncation,
                                      filter_overlong_prompts=config.data.filter_overlong_prompts)
  train_prompts = prompts_lib.training_prompts(
      config_lib.resolve_files(config.data.train_files, workdir, key="data.train_files"), tokenizer, options)
  val_files = config_lib.resolve_files(config.data.val_files, workdir, key="data.val_files")
  val_prompts = prompts_lib.validation_prompts(val_files, tokenizer, options) if val_files else []
  data_iterator = epochs.batch_iterator(epochs.epoch_batches(
      train_prompts, batch_size=config.data.gen_batch_size, seed=config.data.seed if config.data.shuffle else None,
      num_epochs=config.trainer.total_epochs))
  data_sources = sorted({e.data_source for e in train_prompts} | {e.data_source for e in val_prompts})
  score_fns = rewards.reward_functions(data_sources, function=config.reward.function,
                                       strict_box=config.reward.strict_box)
  logging.info("Reward: %s for data sources %s", config.reward.function or "math_dapo", data_sources)
  pool = reward_pool.RewardPool(config.reward.num_workers) if config.reward.num_workers > 0 else None
  ob = config.reward.overlong_buffer
  shaping = (scoring.OverlongShaping(config.data.max_response_length, ob.len, ob.penalty_factor)
             if ob.enable else None)
  scorer = scoring.GroupScorer(tokenizer, score_fns, pool=pool, timeout_s=config.reward.timeout_s, shaping=shaping)

  # Policy and optimizer; the update's programs are built once, for the params' and optimizer state's layout.
  model_config, params = policy.initial_policy(config, workdir, tokenizer, mesh)
  optimizer = step.optimizer_from_config(config.actor.optim)
  opt_state = sharding.init_optimizer_state(optimizer, params, mesh)
  updater = step.Updater.for_state(params, opt_state, optimizer=optimizer, model_config=model_config,
                                   loss_config=step.LossConfig.from_config(config))

  # The sampler lays out its own copy of the params for each rollout step and validation: tensor parallel only
  # (decode reads every weight for each token, so FSDP would gather the weights again at every step). With
  # several hosts each process samples its own prompts, on its own devices.
  sampler_mesh = mesh if num_processes == 1 else sharding.process_local_mesh()
  sampler = rollout_collection.make_sampler(config, model_config, sampler_mesh, tokenizer.eos_ids)
  train_sampling = sampler_lib.SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                                              top_k=config.rollout.top_k)
  fg = config.algorithm.filter_groups
  collector = rollout_collection.RolloutCollector(sampler, filtering.DynamicSampler(
      train_batch_size=config.data.train_batch_size // num_processes, n=config.rollout.n,
      gen_batch_size=config.data.gen_batch_size // num_processes, max_num_gen_batches=fg.max_num_gen_batches,
      metric=fg.metric, enabled=fg.enable, carry_over=fg.carry_over), data_iterator, scorer)

  def run_validation(at_step: int) -> dict:
    vk = config.rollout.val_kwargs
    logging.info("Validation at rollout step %d (%d problems x %d samples) ...", at_step, len(val_prompts), vk.n)
    val = validation.validate(
        params, sampler, val_prompts, n=vk.n,
        sampling=sampler_lib.SamplingParams(temperature=vk.temperature, top_p=vk.top_p, top_k=config.rollout.top_k),
        seed=validation.validation_seed(config.trainer.seed), scorer=scorer).metrics
    writer.write_scalars(at_step, val)
    logging.info("step %d validation: %s", at_step,
                 json.dumps({k: round(v, 4) for k, v in val.items() if "mean@" in k or "pass@1" in k}))
    return val

  # Resume from the newest complete checkpoint of this workdir, else from trainer.resume_from when set: a
  # restarted job always continues from its own latest progress.
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             max_to_keep=config.trainer.keep_checkpoints)
  checkpoint_lib.write_policy_files(checkpointer.directory, model_config, tokenizer,
                                    source_hf_config=checkpoint_lib.read_hf_config(config.model.hf_checkpoint))
  start_step, validation_due = 0, config.trainer.val_before_train and bool(val_prompts)
  resume_dir, resume_step = checkpointer.directory, checkpointer.latest_step()
  if resume_step is None and config.trainer.resume_from:
    resume_dir, resume_step = checkpoint_lib.resolve_training_checkpoint(config.trainer.resume_from)
  if resume_step is not None:
    source = checkpointer if resume_dir == checkpointer.directory else checkpoint_lib.Checkpointer(resume_dir)
    state, meta = source.restore(resume_step, checkpoint_lib.abstract_like({"params": params,
                                                                            "opt_state": opt_state}))
    params, opt_state = state["params"], state["opt_state"]
    collector.load_state_dict(rollout_collection.own_loop_state(meta))
    start_step, validation_due = meta["rollout_step"], meta.get("validation_due", False)
    logging.info("Resumed from rollout step %d of %s", start_step, resume_dir)
  if validation_due:  # before training, or the validation a preemption postponed
    run_validation(start_step)

  def save(step: int, validation_due: bool) -> None:
    checkpointer.save(step, {"params": params, "opt_state": opt_state},
                      {"rollout_step": step, "processes": distributed.allgather_json(collector.state_dict()),
                       "validation_due": validation_due})

  total_steps = config.trainer.total_training_steps  # None: until trainer.total_epochs of data are used up
  last_metrics: dict = {}
  rollout_step, saved_step, validated_step, preempted = start_step, start_step, start_step, False
  first_step_done = None  # the ETA's rate counts from the end of the first step: compiling is behind it
  while total_steps is None or rollout_step < total_steps:
    step_start, reward_seconds_before = time.time(), scorer.seconds

    # 1-3. Sample groups, scoring each as it finishes, until dynamic sampling has decided the batch. The seed
    # differs between steps and processes.
    seed = (config.trainer.seed * 1_000_003 + rollout_step * num_processes + process_index) % 2**31
    batch = collector.collect(params, seed=seed, sampling=train_sampling, rollout_step=rollout_step)
    if batch is None:
      logging.info("The training data (trainer.total_epochs=%d) ran out after rollout step %d",
                   config.trainer.total_epochs, rollout_step)
      break
    gen_time = time.time() - step_start

    # 4-5. Group advantages, then old log-probs (before any update of this step) in micro-batches of their own
    # budget. Each process places its own rows; every mini-batch is global.
    old_start = time.time()
    advantages = advantages_lib.group_advantages(batch.rewards, batch.group_index,
                                                 norm_by_std=config.algorithm.norm_adv_by_std)
    loss_masked = batch.truncated if config.reward.overlong_filter else np.zeros(len(advantages), bool)
    mini_batches = batching.training_batches(
        batch.prompts, batch.responses, batch.sampler_logps, advantages, loss_masked,
        rows_per_update=config.actor.ppo_mini_batch_size // num_processes * config.rollout.n,
        micro_batch_tokens=config.actor.micro_batch_tokens, pad_id=tokenizer.pad_id,
        max_prompt_width=config.data.max_prompt_length, max_response_width=config.data.max_response_length)
    old_log_probs.add_old_log_probs(mini_batches, functools.partial(updater.old_log_probs, params), mesh=mesh,
                                    micro_batch_tokens=config_lib.log_prob_micro_batch_tokens(config))
    mini_batches = [batch_placement.put_micro_batches(micro_batches, mesh) for micro_batches in mini_batches]
    placed = [mb for micro_batches in mini_batches for mb in micro_batches]
    mismatch, padding = step.logprob_mismatch(placed), step.padding_fraction(placed)
    old_time = time.time() - old_start

    # 6. One optimizer update per mini-batch (ppo_epochs passes, no shuffle).
    update_start = time.time()
    learning_rate = step.learning_rate_at(rollout_step, config.actor.optim.lr, config.actor.optim.warmup_steps)
    update_metrics = []
    for _ in range(config.actor.ppo_epochs):
      for micro_batches in mini_batches:
        params, opt_state, m = updater(params, opt_state, micro_batches, learning_rate=learning_rate)
        update_metrics.append(jax.device_get(m))
    del mini_batches, placed  # the device arrays of the step
    update_time = time.time() - update_start
    rollout_step += 1

    # 7. Metrics (docs/algorithm.md section 10) of the whole step: every process's batch statistics.
    step_time = time.time() - step_start
    batch_metrics, response_lengths, lengths = step_metrics.step_metrics(step_metrics.gather(
        step_metrics.ProcessStatistics(
            scores=np.concatenate([g.scores for g in batch.groups]), rewards=batch.rewards, advantages=advantages,
            response_lengths=np.concatenate([g.lengths for g in batch.groups]),
            prompt_lengths=np.array([len(p) for p in batch.prompts]), overlong_masked=int(loss_masked.sum()),
            timeouts=batch.num_timeouts, selection=batch.selection_metrics,
            preemptions=batch.sampler_stats.preemptions,
            kv_pool_utilization=batch.sampler_stats.kv_pool_utilization)),
        max_prompt_length=config.data.max_prompt_length, max_response_length=config.data.max_response_length)
    out = {name: float(np.mean([m[name] for m in update_metrics])) for name in update_metrics[0]}
    out["actor/skipped_updates"] = float(sum(m["actor/skipped_updates"] for m in update_metrics))
    out.update(batch_metrics)
    out.update(mismatch)
    out.update({"timing_s/gen": gen_time, "timing_s/reward": scorer.seconds - reward_seconds_before,
                "timing_s/old_log_prob": old_time, "timing_s/update_actor": update_time, "timing_s/step": step_time})
    out.update(step_metrics.perf_metrics(int(lengths.sum()), step_time, jax.device_count()))
    out["perf/padding_fraction"] = padding
    out.update(step_metrics.mfu_metrics(step_metrics.actor_flops(model_config, lengths) * config.actor.ppo_epochs,
                                        update_time, jax.devices()[0].device_kind, jax.device_count()))
    writer.write_scalars(rollout_step, out)
    writer.write_histograms(rollout_step, {"response_length": response_lengths})
    first_step_done = first_step_done or time.time()
    if rollout_step % config.trainer.log_freq == 0:
      step_metrics.log_progress(rollout_step, total_steps, out, steps_timed=rollout_step - start_step - 1,
                                seconds_timed=time.time() - first_step_done)
    if rollout_step == start_step + 1:
      samples = "\n\n".join(f"{g.example.prompt_text}\n---\n{g.texts[0]}" for g in batch.groups[:4])
      writer.write_texts(rollout_step, {"samples": samples})
    last_metrics = out

    # 8. Validation, then the checkpoint. On preemption the validation is postponed (the checkpoint records it
    # as due, and the resumed run starts with it) so that the save happens within the VM's grace period.
    finished = rollout_step == total_steps
    validation_due = bool(val_prompts) and bool(config.trainer.test_freq) and (
        rollout_step % config.trainer.test_freq == 0 or finished)
    preempted = preemption.agreed()
    if validation_due and not preempted:
      last_metrics = {**out, **run_validation(rollout_step)}
      validation_due, validated_step = False, rollout_step
      preempted = preemption.agreed()  # sent during the validation: this step's checkpoint is the last
    if rollout_step % config.trainer.save_freq == 0 or finished or preempted:
      save(rollout_step, validation_due)
      saved_step = rollout_step
    writer.flush()
    if preempted:
      logging.warning("Preempted: stopped after rollout step %d; the next start resumes from it", rollout_step)
      break
  if not preempted and rollout_step != saved_step:  # the data ended: the last step is validated and saved
    if val_prompts and config.trainer.test_freq and validated_step != rollout_step:
      last_metrics = {**last_metrics, **run_validation(rollout_step)}
    save(rollout_step, False)
  checkpointer.wait()
  checkpointer.close()
  if pool is not None:
    pool.close()
  writer.close()
  return last_metrics


def _metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files, written by process 0. The console keeps to step_metrics' one line per step unless
  absl's verbosity is raised (`--verbosity=1`), which logs every metric too (clu's LoggingWriter)."""
  writers = [metric_writers.SummaryWriter(workdir)] if distributed.is_primary() else []
  if absl_logging.get_verbosity() >= absl_logging.DEBUG:
    writers.append(metric_writers.LoggingWriter())
  return metric_writers.MultiWriter(writers)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  verbose = flags.FLAGS.verbosity >= 1
  runtime.quiet_third_party_logs(verbose=verbose)
  config, workdir = _CONFIG.value, os.path.abspath(os.path.expanduser(_WORKDIR.value))

  def run():
    config_lib.validate(config, extra_sections=_EXTRA_SECTIONS, workdir=workdir)
    runtime.enable_compilation_cache(config.trainer.compilation_cache_dir)  # before anything compiles
    distributed.initialize_from_config(config)  # before anything touches a device
    runtime.start_backends(verbose)
    return train(config, workdir)

  runtime.exit_on_user_error(run, program="dapo_jax.train", verbose=verbose)()


if __name__ == "__main__":
  app.run(main)
