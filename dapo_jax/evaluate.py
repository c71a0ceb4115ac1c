"""Accuracy of a checkpoint on math problems: avg@k, best@k, maj@k and pass@k per data source (docs/algorithm.md 8).

    python -m dapo_jax.evaluate --checkpoint DIR --data FILE.parquet[,FILE2.parquet...] [--k 32]
        [--temperature 1.0] [--top_p 0.7] [--top_k 0] [--max_prompt_length 2048] [--max_response_length 20480]
        [--seed 0] [--reward_function module:fn] [--strict_box] [--num_slots 64] [--reward_workers 8]
        [--dtype float32] [--mesh tensor=8] [--output DIR]

`--checkpoint` is a Hugging Face Qwen2 directory or one of our training checkpoints (a workdir, its
checkpoints/ directory, or one step directory checkpoints/<step>). `--data` files are in the DAPO-Math schema;
rows with the same data source, prompt and ground truth are evaluated once, with k samples (AIME-2024's 960
rows are 30 problems x 32). The defaults are DAPO's validation settings: k = 32, temperature 1.0, top-p 0.7,
prompts of at most 2048 tokens (longer ones keep their end), responses of at most 20480 tokens, math_dapo
scoring. Prompts get the checkpoint's chat template; responses stop at the checkpoint's eos ids (the
tokenizer's and generation_config.json's, as in training).

Prints a table per data source and writes, to `--output` (default: ./eval_<YYYYmmdd_HHMMSS>, created):
  * summary.json: the metrics under the trainer's (verl's) names: `val-core/<data_source>/acc/mean@k`,
    `best@k/{mean,std}` and `maj@k/{mean,std}` at k, every other statistic (smaller k, pass@k) under
    `val-aux/...`; the settings, the checkpoint, problem and row counts, response lengths, time;
  * problems.jsonl: one line per unique problem: where it came from, its ground truth, how many of its k
    responses are correct, their predictions, the majority prediction, finish reasons, lengths and the
    responses themselves. Lines are appended as problems finish, so an interrupted run keeps what it finished;
    at the end the file is rewritten in the order of the data files.
"""
from collections.abc import Callable, Sequence
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

from dapo_jax import runtime  # first: it quiets what TensorFlow prints while it loads
from absl import app
from absl import flags
import jax
import numpy as np

from dapo_jax import checkpoint as checkpoint_lib
from dapo_jax import config as config_lib
from dapo_jax import metrics as metrics_lib
from dapo_jax import scoring
from dapo_jax import sharding
from dapo_jax import validation
from dapo_jax.data import math_parquet
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.model import checkpoint_generation
from dapo_jax.model import hf_io
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.rl import reward_pool
from dapo_jax.rl import rewards
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import SamplingParams

SUMMARY_FILE = "summary.json"
PROBLEMS_FILE = "problems.jsonl"
METRIC_PREFIX = "val-core"


class EvaluationError(ValueError):
  """The checkpoint or the data cannot be evaluated; the message says which file and why."""


# The settings a training run validates with: the EvalSettings field each comes from, and the config key.
RUN_SETTINGS = {"k": "rollout.val_kwargs.n", "temperature": "rollout.val_kwargs.temperature",
                "top_p": "rollout.val_kwargs.top_p", "top_k": "rollout.top_k",
                "max_prompt_length": "data.max_prompt_length", "max_response_length": "data.max_response_length",
                "reward_function": "reward.function", "strict_box": "reward.strict_box",
                "reward_timeout_s": "reward.timeout_s", "num_slots": "rollout.max_num_seqs",
                "decode_steps_per_call": "rollout.decode_steps_per_call", "dtype": "model.dtype",
                "reward_workers": "reward.num_workers"}


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  """What a training workdir says about how it validated: its config (config.json) and where it lives."""
  workdir: str
  config: dict[str, Any]

  def value(self, key: str) -> Any:
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node

  def validation_settings(self) -> dict[str, Any]:
    """The EvalSettings values the run's periodic validation used (its seed derived as training derives it)."""
    settings = {name: self.value(key) for name, key in RUN_SETTINGS.items()}
    settings["seed"] = validation.validation_seed(self.value("trainer.seed"))
    return settings

  def validation_files(self) -> list[str]:
    return config_lib.resolve_files(self.value("data.val_files"), self.workdir, key="data.val_files")


def training_run_of(checkpoint: str) -> TrainingRun | None:
  """The training run whose checkpoint `checkpoint` names (a workdir, its checkpoints/ or one step), or None
  for a Hugging Face directory or a checkpoint directory without its run's config.json beside it."""
  path = os.path.abspath(os.path.expanduser(checkpoint))
  if not os.path.isdir(path) or checkpoint_lib.is_hf_directory(path):
    return None
  root, _ = checkpoint_lib.resolve_training_checkpoint(path)
  workdir = os.path.dirname(root)
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    return None
  with open(config_path) as f:
    return TrainingRun(workdir, json.load(f))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How a checkpoint is evaluated (the flags of the same names)."""
  k: int = 32
  temperature: float = 1.0
  top_p: float = 0.7
  top_k: int = 0
  max_prompt_length: int = 2048
  max_response_length: int = 20480
  seed: int = 0
  reward_function: str | None = None
  strict_box: bool = False
  num_slots: int = 64
  reward_workers: int = reward_pool.DEFAULT_NUM_WORKERS
  reward_timeout_s: float = reward_pool.DEFAULT_TIMEOUT_S
  dtype: str = "float32"
  decode_steps_per_call: int = 16
  mesh: str | None = None

  def check(self) -> None:
    """Raises ValueError naming the flag of the first bad value."""
    for name in ("k", "max_prompt_length", "max_response_length", "num_slots", "decode_steps_per_call"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
    if self.reward_workers < 0:
      raise ValueError(f"--reward_workers must be >= 0 (0 scores in this process), got {self.reward_workers}")
    if not 0 <= self.seed < 2**31:
      raise ValueError(f"--seed must be in [0, 2**31), got {self.seed}")
    if self.dtype not in config_lib.DTYPES:
      raise ValueError(f"--dtype must be one of {sorted(config_lib.DTYPES)}, got {self.dtype!r}")
    SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)  # checks the ranges
    if self.mesh is not None:
      parse_mesh(self.mesh)


def parse_mesh(text: str) -> dict[str, int]:
  """`--mesh data=2,tensor=4` -> {"data": 2, "tensor": 4}; raises ValueError naming the flag."""
  shape = {}
  for part in (p.strip() for p in text.split(",") if p.strip()):
    name, separator, size = part.partition("=")
    try:
      value = int(size)
    except ValueError:
      value = None
    if not separator or value is None or name.strip() not in sharding.MESH_AXES or name.strip() in shape:
      raise ValueError(f"--mesh={text!r}: expected axis=size pairs over {', '.join(sharding.MESH_AXES)}, each "
                       "axis at most once, e.g. tensor=8 or data=2,tensor=4")
    shape[name.strip()] = value
  if not shape:
    raise ValueError(f"--mesh={text!r} names no axis; e.g. tensor=8")
  return shape


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """An evaluation's outcome: `summary` is summary.json, `problems` the lines of problems.jsonl."""
  summary: dict[str, Any]
  problems: list[dict[str, Any]]
  result: validation.ValidationResult


def problem_record(problem: scoring.ScoredGroup) -> dict[str, Any]:
  """One line of problems.jsonl."""
  example = problem.example
  return {
      "index": problem.group_id,
      "data_source": example.data_source,
      "location": example.location,
      "num_duplicates": example.num_duplicates,
      "ground_truth": example.ground_truth,
      "prompt": example.prompt_text,
      "prompt_tokens": int(len(example.prompt_ids)),
      "prompt_truncated_tokens": example.num_truncated_tokens,
      "k": len(problem.responses),
      "num_correct": problem.num_correct,
      "accuracy": float(problem.accs.mean()),
      "correct": [bool(a) for a in problem.accs],
      "scores": [float(s) for s in problem.scores],
      "predictions": problem.predictions,
      "majority_prediction": problem.majority_prediction,
      "finish_reasons": [r.finish_reason for r in problem.responses],
      "response_lengths": problem.lengths.tolist(),
      "responses": problem.texts,
  }


def _length_summary(lengths: np.ndarray) -> dict[str, float]:
  return {"mean": float(lengths.mean()), "max": int(lengths.max()), "min": int(lengths.min())}


def summarize(result: validation.ValidationResult, *, checkpoint: str, description: str,
              data_files: Sequence[str], settings: EvalSettings, eos_ids: Sequence[int]) -> dict[str, Any]:
  """The contents of summary.json."""
  sources: dict[str, dict[str, int]] = {}
  for p in result.problems:
    entry = sources.setdefault(p.example.data_source, {"problems": 0, "rows": 0})
    entry["problems"] += 1
    entry["rows"] += p.example.num_duplicates
  lengths = np.concatenate([p.lengths for p in result.problems])
  truncated = np.concatenate([p.truncated for p in result.problems])
  return {
      "checkpoint": os.path.abspath(checkpoint),
      "checkpoint_description": description,
      "data_files": [os.path.abspath(f) if "://" not in f else f for f in data_files],
      "settings": {**dataclasses.asdict(settings), "eos_ids": list(eos_ids)},
      "data_sources": dict(sorted(sources.items())),
      "metrics": result.metrics,
      "response_length": _length_summary(lengths),
      "clip_ratio": float(truncated.mean()),
      "reward_timeouts": result.num_timeouts,
      "generated_tokens": int(lengths.sum()),
      "elapsed_s": result.elapsed_s,
      "tokens_per_s": float(lengths.sum() / max(result.elapsed_s, 1e-9)),
  }


def format_table(summary: dict[str, Any]) -> str:
  """The metrics of summary.json as a table per data source: avg@k, then pass@k, best@k and maj@k by k."""
  k = summary["settings"]["k"]
  lines = [f"{summary['checkpoint_description']}: k = {k} samples per problem, temperature "
           f"{summary['settings']['temperature']}, top_p {summary['settings']['top_p']}"]
  for source, counts in summary["data_sources"].items():
    metrics = summary["metrics"]
    lines.append("")
    lines.append(f"{source}: {counts['problems']} problems ({counts['rows']} rows), "
                 f"avg@{k} = {metrics[metrics_lib.metric_key(source, f'mean@{k}', k)]:.4f}")
    lines.append(f"{'k':>6}  {'pass@k':>8}  {'best@k':>8}  {'maj@k':>8}")
    for kk in metrics_lib.k_values(k):
      row = [metrics_lib.at_k(metrics, source, statistic, kk, k) for statistic in ("pass", "best", "maj")]
      lines.append(f"{kk:>6}  " + "  ".join(f"{value:>8.4f}" for value in row))
  length = summary["response_length"]
  lines.append("")
  lines.append(f"responses: mean {length['mean']:.1f} tokens (max {length['max']}), "
               f"{100 * summary['clip_ratio']:.1f}% cut at {summary['settings']['max_response_length']}; "
               f"{summary['generated_tokens']} tokens in {summary['elapsed_s']:.1f} s")
  return "\n".join(lines)


def evaluate(checkpoint: str, data_files: Sequence[str], settings: EvalSettings = EvalSettings(), *,
             on_problem_done: Callable[[scoring.ScoredGroup], object] | None = None) -> Evaluation:
  """Loads the checkpoint and the problems, samples k responses per problem and scores them; writes nothing
  (`on_problem_done` sees each problem as soon as it is scored)."""
  settings.check()
  # A typo in a file name or the reward function fails now, not after the weights have loaded.
  for path in data_files:
    if "://" not in path and not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such data file")
  if settings.reward_function is not None:
    rewards.load_reward_function(settings.reward_function)
  mesh = None
  if settings.mesh is not None:
    try:
      mesh = sharding.make_mesh(parse_mesh(settings.mesh))
    except ValueError as error:
      raise EvaluationError(f"--mesh={settings.mesh!r} on {jax.device_count()} devices: {error}") from None
  policy = checkpoint_lib.load_policy(checkpoint, dtype=config_lib.DTYPES[settings.dtype], mesh=mesh)
  tokenizer = checkpoint_generation.load_optional_tokenizer(policy.files_dir)
  if tokenizer is None:
    raise FileNotFoundError(
        f"{policy.files_dir}: no tokenizer files (tokenizer.json or tokenizer.model); the evaluator needs the "
        "tokenizer to render prompts and read responses. Copy the base model's tokenizer files there.")
  if tokenizer.vocab_size > policy.config.vocab_size:
    raise EvaluationError(f"{policy.files_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                          f"only {policy.config.vocab_size}: they do not belong together")
  options = prompts_lib.PromptOptions(max_prompt_length=settings.max_prompt_length, truncation="left")
  prompts = prompts_lib.validation_prompts(list(data_files), tokenizer, options)
  if not len(prompts):
    raise EvaluationError(f"{', '.join(data_files)}: no rows to evaluate")
  sources = sorted({e.data_source for e in prompts})
  score_fns = rewards.reward_functions(sources, function=settings.reward_function, strict_box=settings.strict_box)
  logging.info("Evaluating %s on %d problems (%s) x %d samples", policy.description, len(prompts),
               ", ".join(sources), settings.k)

  eos_ids = tokenizer.eos_ids
  longest_prompt = max(len(e.prompt_ids) for e in prompts)
  sampler = sampler_lib.GroupSampler(
      policy.config, num_slots=min(settings.num_slots, settings.k * len(prompts)),
      max_prompt_length=longest_prompt, max_response_length=settings.max_response_length, eos_ids=eos_ids,
      steps_per_call=min(settings.decode_steps_per_call, settings.max_response_length), mesh=mesh)
  sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
  pool = reward_pool.RewardPool(settings.reward_workers) if settings.reward_workers > 0 else None
  try:
    scorer = scoring.GroupScorer(tokenizer, score_fns, pool=pool, timeout_s=settings.reward_timeout_s)
    result = validation.validate(policy.params, sampler, prompts, n=settings.k, sampling=sampling,
                                 seed=settings.seed, scorer=scorer, prefix=METRIC_PREFIX,
                                 on_problem_done=on_problem_done)
  finally:
    if pool is not None:
      pool.close()
  summary = summarize(result, checkpoint=checkpoint, description=policy.description, data_files=data_files,
                      settings=settings, eos_ids=eos_ids)
  return Evaluation(summary=summary, problems=[problem_record(p) for p in result.problems], result=result)


class ProblemStream:
  """Appends each problem's record to problems.jsonl as soon as it is scored (in completion order), so that an
  interrupted evaluation keeps what it finished; `write_outputs` rewrites the file in problem order at the end.
  The directory is created, and an earlier problems.jsonl replaced, at the first problem."""

  def __init__(self, directory: str):
    self.path = os.path.join(directory, PROBLEMS_FILE)
    self._started = False

  def __call__(self, problem: scoring.ScoredGroup) -> None:
    if not self._started:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self.path, "a" if self._started else "w") as f:
      f.write(json.dumps(problem_record(problem), ensure_ascii=False) + "\n")
    self._started = True


def write_outputs(directory: str, evaluation: Evaluation) -> None:
  """Writes summary.json and problems.jsonl into `directory` (created; files of an earlier run are replaced)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, SUMMARY_FILE), "w") as f:
    json.dump(evaluation.summary, f, indent=2)
    f.write("\n")
  with open(os.path.join(directory, PROBLEMS_FILE), "w") as f:
    for record in evaluation.problems:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------------------
# Command line

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A Hugging Face Qwen2 directory, or a training workdir, its checkpoints/ directory or one "
    "step directory in it.", required=True)
_DATA = flags.DEFINE_list("data", None, "Parquet files in the DAPO-Math schema, comma separated; default for a "
                          "training checkpoint: the run's data.val_files.")
_K = flags.DEFINE_integer("k", 32, "Samples per unique problem (the k of avg@k).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 0.7, "Nucleus sampling mass in (0, 1].")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
_MAX_PROMPT_LENGTH = flags.DEFINE_integer("max_prompt_length", 2048,
                                          "Most prompt tokens; longer prompts keep their last tokens.")
_MAX_RESPONSE_LENGTH = flags.DEFINE_integer("max_response_length", 20480, "Most tokens per response.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed, in [0, 2**31).")
_REWARD_FUNCTION = flags.DEFINE_string(
    "reward_function", None, "A custom reward function 'package.module:function' (verl's signature); default "
    "math_dapo.")
_STRICT_BOX = flags.DEFINE_bool("strict_box", False, "math_dapo's strict-box mode: read the last \\boxed{}.")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 64, "Responses decoded together (memory: their KV caches).")
_REWARD_WORKERS = flags.DEFINE_integer(
    "reward_workers", reward_pool.DEFAULT_NUM_WORKERS, "Reward scoring processes, each response bounded by "
    "--reward_timeout_s; 0 scores in this process without a time bound.")
_REWARD_TIMEOUT_S = flags.DEFINE_float("reward_timeout_s", reward_pool.DEFAULT_TIMEOUT_S,
                                       "Seconds to score one response before it counts as wrong.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(config_lib.DTYPES),
                           "Weights and compute dtype (float32: XLA:CPU's bfloat16 matrix products are slow).")
_DECODE_STEPS_PER_CALL = flags.DEFINE_integer("decode_steps_per_call", 16,
                                              "Decode steps fused into one device call.")
_MESH = flags.DEFINE_string(
    "mesh", None, "Devices to spread the model and the decode slots over, as axis=size pairs over data, fsdp and "
    "tensor (one size may be -1: all remaining devices), e.g. tensor=8 or data=2,tensor=4. Default: one device.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for summary.json and problems.jsonl; default "
                              "./eval_<YYYYmmdd_HHMMSS>.")

# What a missing file, a bad checkpoint or bad data raises: reported in one line, without a traceback.
_USER_ERRORS = (FileNotFoundError, EvaluationError, math_parquet.DataSchemaError, hf_io.CheckpointError,
                tokenizer_lib.TokenizerLoadError)


def settings_from_flags(run: TrainingRun | None = None) -> EvalSettings:
  """The flags' settings; for a training run's checkpoint, the run's validation settings where no flag is given
  on the command line."""
  defaults = run.validation_settings() if run is not None else {}
  given = {field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(EvalSettings)
           if field.name not in defaults or flags.FLAGS[field.name].present}
  return EvalSettings(**{**defaults, **given})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  runtime.quiet_third_party_logs(verbose=flags.FLAGS.verbosity >= 1)
  runtime.enable_compilation_cache(runtime.AUTO)
  try:
    run = training_run_of(_CHECKPOINT.value)
  except _USER_ERRORS as error:
    sys.exit(f"dapo_jax.evaluate: error: {error}")
  settings = settings_from_flags(run)
  output = _OUTPUT.value or os.path.abspath(time.strftime("eval_%Y%m%d_%H%M%S"))
  data_files = [f for f in (_DATA.value or []) if f]
  if not data_files and run is not None:
    data_files = run.validation_files()
  if not data_files:
    raise app.UsageError("--data names no file (and the checkpoint is not a training run with data.val_files)")
  if run is not None:
    logging.info("Evaluating with the validation settings of the run in %s (flags given override them): %s; "
                 "data %s", run.workdir, ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()),
                 ", ".join(data_files))
  try:
    settings.check()
    if settings.reward_function is not None:
      rewards.load_reward_function(settings.reward_function)
  except (ValueError, ImportError, TypeError) as error:
    raise app.UsageError(str(error)) from None
  try:
    evaluation = evaluate(_CHECKPOINT.value, data_files, settings, on_problem_done=ProblemStream(output))
  except _USER_ERRORS as error:
    sys.exit(f"dapo_jax.evaluate: error: {error}")
  write_outputs(output, evaluation)
  print(format_table(evaluation.summary))
  print(f"\nWrote {os.path.join(output, SUMMARY_FILE)} and {os.path.join(output, PROBLEMS_FILE)} "
        f"({jax.devices()[0].platform})", flush=True)


if __name__ == "__main__":
  app.run(main)
