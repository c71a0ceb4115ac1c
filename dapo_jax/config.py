"""The training program's configuration: every key with its default, and validation with clear errors.

Config files in `configs/` start from `base_config()` and change what their recipe needs (big_vision style);
`validate(config)` runs when the program starts and names the key of any unknown or inconsistent value. Key
names follow verl's where verl has one (docs/algorithm.md section 11), so a verl user finds them.
"""
import ast
from collections.abc import Iterator
import importlib.util
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from dapo_jax import distributed
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.rl import filtering
from dapo_jax.rl import loss as loss_lib

# The accepted values come from the modules that implement them, so the check and the code cannot drift apart.
AGG_MODES = loss_lib.AGG_MODES
FILTER_METRICS = filtering.FILTER_METRICS
TRUNCATION_MODES = prompts_lib.TRUNCATION_MODES
# The names `model.dtype` / `model.param_dtype` (and the entry points' --dtype) accept, and their dtypes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def base_config() -> ml_collections.ConfigDict:
  """All keys with the DAPO recipe's values (docs/algorithm.md section 9) where it has one."""
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  # File lists are strings, so that the command line can set them (`file_list` reads them):
  # --config.data.train_files=a.parquet,b.parquet (or '["a.parquet", "b.parquet"]'); "{workdir}" in a path
  # names the run's workdir. Required: the data is the user's to name. val_files="" runs no validation.
  c.data.train_files = config_dict.placeholder(str)
  c.data.val_files = config_dict.placeholder(str)
  c.data.train_batch_size = 512     # prompts per rollout step
  c.data.gen_batch_size = 1536      # prompts per generation batch (dynamic sampling tops up by these)
  c.data.max_prompt_length = 2048
  c.data.max_response_length = 20480
  c.data.truncation = "left"
  c.data.filter_overlong_prompts = False
  c.data.shuffle = True
  c.data.seed = 0

  c.rollout = ml_collections.ConfigDict()
  c.rollout.n = 16
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0               # 0: no top-k
  c.rollout.max_num_seqs = 256   # decode slots of the continuous-batching sampler (vLLM's max_num_seqs)
  c.rollout.page_size = 16       # KV cache entries per page of the rollout's paged cache (a power of two)
  c.rollout.gpu_memory_utilization = 0.5  # share of the devices' free memory the KV pool may take
  c.rollout.num_pages = 0        # pages in the KV pool; 0: sized by gpu_memory_utilization
  c.rollout.decode_steps_per_call = 8      # decode steps fused per device call (EOS checked between calls)
  # Tokens (real + padding) of a micro-batch of the old-log-prob pass per process, rows x width (verl's
  # log_prob_max_token_len_per_gpu): forward only, so it may exceed actor.micro_batch_tokens. 0: the same.
  c.rollout.log_prob_micro_batch_tokens = 0
  c.rollout.val_kwargs = ml_collections.ConfigDict()
  c.rollout.val_kwargs.n = 32
  c.rollout.val_kwargs.temperature = 1.0
  c.rollout.val_kwargs.top_p = 0.7

  c.actor = ml_collections.ConfigDict()
  c.actor.ppo_mini_batch_size = 32  # prompts per optimizer update
  c.actor.ppo_epochs = 1
  c.actor.micro_batch_tokens = 32768  # tokens (real + padding) of a packed micro-batch per process: rows x width
  c.actor.clip_ratio_low = 0.2
  c.actor.clip_ratio_high = 0.28
  c.actor.clip_ratio_c = 10.0
  c.actor.loss_agg_mode = "token-mean"
  c.actor.entropy_coeff = 0.0
  c.actor.logits_chunk_size = 2048  # response tokens per LM-head chunk in the loss (0: all at once)
  c.actor.tis_cap = config_dict.placeholder(float)  # truncated importance sampling; None = off
  c.actor.optim = ml_collections.ConfigDict()
  c.actor.optim.lr = 1e-6
  c.actor.optim.warmup_steps = 10
  c.actor.optim.weight_decay = 0.1
  c.actor.optim.b1 = 0.9
  c.actor.optim.b2 = 0.999
  c.actor.optim.grad_clip = 1.0

  c.algorithm = ml_collections.ConfigDict()
  c.algorithm.norm_adv_by_std = True
  c.algorithm.filter_groups = ml_collections.ConfigDict()
  c.algorithm.filter_groups.enable = True
  c.algorithm.filter_groups.metric = "acc"
  c.algorithm.filter_groups.max_num_gen_batches = 10
  c.algorithm.filter_groups.carry_over = False

  c.reward = ml_collections.ConfigDict()
  c.reward.function = config_dict.placeholder(str)  # "module:function"; None = math_dapo for every source
  c.reward.strict_box = False
  c.reward.overlong_buffer = ml_collections.ConfigDict()
  c.reward.overlong_buffer.enable = True
  c.reward.overlong_buffer.len = 4096
  c.reward.overlong_buffer.penalty_factor = 1.0
  c.reward.overlong_filter = False
  c.reward.num_workers = 8
  c.reward.timeout_s = 10.0

  c.trainer = ml_collections.ConfigDict()
  # Passes over the training data (each reshuffled), as verl's trainer.total_epochs; the run ends when they are
  # used up, or after total_training_steps rollout steps when that is set (None: no cap, as verl's scripts).
  c.trainer.total_epochs = 1
  c.trainer.total_training_steps = config_dict.placeholder(int)
  c.trainer.save_freq = 5
  c.trainer.test_freq = 5
  c.trainer.val_before_train = True
  c.trainer.resume_from = config_dict.placeholder(str)
  c.trainer.keep_checkpoints = 3
  c.trainer.seed = 0
  c.trainer.log_freq = 1
  # JAX's persistent compilation cache (`runtime.enable_compilation_cache`): "auto" is
  # $XDG_CACHE_HOME/dapo_jax/jax_compilation_cache (~/.cache/... by default, or JAX_COMPILATION_CACHE_DIR when
  # set), "" turns it off, anything else is the directory. A restart skips the minutes a large model's programs
  # take to compile.
  c.trainer.compilation_cache_dir = "auto"

  c.model = ml_collections.ConfigDict()
  c.model.hf_checkpoint = config_dict.placeholder(str)
  c.model.preset = config_dict.placeholder(str)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # Multi-host runs (one process per host, `dapo_jax.distributed.initialize`). Unset values come from JAX's
  # environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or its cluster detection.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.initialize = "auto"  # auto | always | never (`distributed.initialize`)
  return c


def log_prob_micro_batch_tokens(config: ml_collections.ConfigDict) -> int:
  """The old-log-prob pass's token budget: rollout.log_prob_micro_batch_tokens, or actor.micro_batch_tokens when 0."""
  return config.rollout.log_prob_micro_batch_tokens or config.actor.micro_batch_tokens


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, path + ".")
    else:
      yield path, value


class ConfigError(ValueError):
  """A config key is unknown or its value is inconsistent; the message names the key."""


def _check(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config.{key}: {message}")


FILE_LIST_HELP = ("comma-separated paths (--config.{key}=a.parquet,b.parquet) or a list of quoted paths "
                  "(--config.{key}='[\"a.parquet\", \"b.parquet\"]')")


def file_list(value: str | None, *, key: str = "data.train_files") -> list[str]:
  """The paths a file-list key (`data.train_files`, `data.val_files`) holds; [] for "" or None.

  A file list is a string so that the command line can set it (ml_collections' config flags cannot override a
  list): comma-separated paths, `a.parquet,b.parquet`, or a Python/JSON list of quoted paths,
  `["a.parquet", "b.parquet"]`, for paths with commas. Raises ConfigError naming `key` for anything else.
  """
  if value is None:
    return []
  if not isinstance(value, str):
    raise ConfigError(f"config.{key}: must be a string of {FILE_LIST_HELP.format(key=key)}; got the "
                      f"{type(value).__name__} {value!r}")
  text = value.strip()
  if text.startswith(("[", "(")):
    try:
      parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      parsed = None
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(p, str) for p in parsed):
      raise ConfigError(f"config.{key}: {value!r} is not a list of quoted paths; give "
                        f"{FILE_LIST_HELP.format(key=key)}")
    paths = [p.strip() for p in parsed]
  else:
    paths = [p.strip() for p in text.split(",")] if text else []
  if not all(paths):
    raise ConfigError(f"config.{key}: {value!r} has an empty path; give {FILE_LIST_HELP.format(key=key)}")
  return paths


def resolve_files(value: str | None, workdir: str, *, key: str = "data.train_files") -> list[str]:
  """`file_list(value)` with "{workdir}" replaced by `workdir` and "~" expanded: the files to read."""
  return [os.path.expanduser(p.replace("{workdir}", workdir)) for p in file_list(value, key=key)]


def validate(config: ml_collections.ConfigDict, *, extra_sections: tuple[str, ...] = (),
             num_processes: int = 1, workdir: str | None = None) -> None:
  """Fails on unknown keys and inconsistent values, naming the key and what to do.

  `extra_sections` are top-level sections a recipe adds for its own use (e.g. the embedded default's
  `warmup`), whose keys are not checked against the base. `num_processes` is the number of processes of the
  run (`jax.process_count()`): each samples and trains on its share of every batch, so the batch sizes must
  divide between them. With the run's `workdir`, the inputs are checked too (`check_inputs`).
  """
  known = dict(_leaves(base_config()))
  for key, _ in _leaves(config):
    if key.split(".")[0] in extra_sections:
      continue
    if key not in known:
      close = [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
      hint = f" (did you mean {' or '.join(close)}?)" if close else ""
      raise ConfigError(f"config.{key}: unknown key{hint}")

  d, r, a, al, rw, t, m = (config.data, config.rollout, config.actor, config.algorithm, config.reward,
                           config.trainer, config.model)
  _check(d.train_files is not None, "data.train_files",
         "required: the training parquet file(s), e.g. --config.data.train_files=/data/dapo-math-17k.parquet "
         "(several: comma-separated)")
  _check(bool(file_list(d.train_files, key="data.train_files")), "data.train_files",
         "at least one training parquet file is needed")
  _check(d.val_files is not None, "data.val_files",
         "required: the validation parquet file(s), e.g. --config.data.val_files=/data/aime-2024.parquet "
         "(several: comma-separated), or --config.data.val_files= (empty) to run no validation")
  file_list(d.val_files, key="data.val_files")
  _check(d.train_batch_size > 0, "data.train_batch_size", f"must be positive, got {d.train_batch_size}")
  _check(d.gen_batch_size >= d.train_batch_size, "data.gen_batch_size",
         f"({d.gen_batch_size}) must be >= data.train_batch_size ({d.train_batch_size})")
  _check(d.max_prompt_length > 0 and d.max_response_length > 0, "data.max_response_length",
         "max_prompt_length and max_response_length must be positive")
  _check(d.truncation in TRUNCATION_MODES, "data.truncation", f"must be one of {TRUNCATION_MODES}")
  _check(r.n >= 1, "rollout.n", f"must be >= 1, got {r.n}")
  _check(r.temperature > 0, "rollout.temperature",
         "must be > 0 for training (log-probs divide the logits by it); use greedy only for evaluation")
  _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
  _check(r.top_k >= 0, "rollout.top_k", f"must be >= 0 (0 disables top-k), got {r.top_k}")
  _check(r.val_kwargs.n >= 1, "rollout.val_kwargs.n", f"must be >= 1, got {r.val_kwargs.n}")
  _check(r.max_num_seqs >= r.n, "rollout.max_num_seqs",
         f"({r.max_num_seqs}) must hold at least one group of rollout.n ({r.n}) responses")
  _check(r.decode_steps_per_call >= 1, "rollout.decode_steps_per_call", "must be >= 1")
  _check(r.page_size >= 1 and not r.page_size & (r.page_size - 1), "rollout.page_size",
         f"must be a power of two, got {r.page_size}")
  _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
         f"must be in (0, 1], got {r.gpu_memory_utilization}")
  _check(r.num_pages >= 0, "rollout.num_pages", f"must be >= 0 (0: sized by gpu_memory_utilization), got {r.num_pages}")
  _check(0 < a.ppo_mini_batch_size <= d.train_batch_size, "actor.ppo_mini_batch_size",
         f"({a.ppo_mini_batch_size}) must be in 1..data.train_batch_size ({d.train_batch_size})")
  _check(d.train_batch_size % a.ppo_mini_batch_size == 0, "actor.ppo_mini_batch_size",
         f"data.train_batch_size ({d.train_batch_size}) must be divisible by it ({a.ppo_mini_batch_size})")
  _check(a.ppo_epochs >= 1, "actor.ppo_epochs", "must be >= 1")
  _check(a.micro_batch_tokens >= d.max_prompt_length + d.max_response_length, "actor.micro_batch_tokens",
         f"({a.micro_batch_tokens}) must fit one full-length trajectory "
         f"(data.max_prompt_length + data.max_response_length = {d.max_prompt_length + d.max_response_length})")
  _check(r.log_prob_micro_batch_tokens == 0
         or r.log_prob_micro_batch_tokens >= d.max_prompt_length + d.max_response_length,
         "rollout.log_prob_micro_batch_tokens",
         f"({r.log_prob_micro_batch_tokens}) must be 0 (actor.micro_batch_tokens) or fit one full-length "
         f"trajectory ({d.max_prompt_length + d.max_response_length} tokens)")
  _check(0 <= a.clip_ratio_low < 1 and a.clip_ratio_high >= 0, "actor.clip_ratio_low",
         "clip_ratio_low must be in [0, 1) and clip_ratio_high >= 0")
  _check(a.clip_ratio_c > 1, "actor.clip_ratio_c", f"the dual-clip bound must be > 1, got {a.clip_ratio_c}")
  _check(a.loss_agg_mode in AGG_MODES, "actor.loss_agg_mode", f"must be one of {AGG_MODES}")
  _check(a.tis_cap is None or a.tis_cap > 0, "actor.tis_cap", "must be positive (or None to disable)")
  _check(a.optim.lr >= 0 and a.optim.warmup_steps >= 0, "actor.optim.lr", "lr and warmup_steps must be >= 0")
  _check(a.optim.grad_clip > 0, "actor.optim.grad_clip", "must be positive")
  _check(al.filter_groups.metric in FILTER_METRICS, "algorithm.filter_groups.metric",
         f"must be one of {FILTER_METRICS}")
  ob = rw.overlong_buffer
  # The buffer is the last `len` tokens of the response budget: as long as the budget, it would penalise
  # every response from its first token.
  _check(not ob.enable or 0 < ob.len < d.max_response_length, "reward.overlong_buffer.len",
         f"({ob.len}) must be shorter than data.max_response_length ({d.max_response_length}) and positive; "
         "the DAPO recipe uses a fifth of it")
  _check(ob.penalty_factor >= 0, "reward.overlong_buffer.penalty_factor", "must be >= 0")
  _check(rw.function is None or ":" in rw.function, "reward.function",
         f"must be 'module:function', got {rw.function!r}")
  _check(rw.timeout_s > 0, "reward.timeout_s", "must be positive")
  _check(t.total_epochs >= 1, "trainer.total_epochs", "must be >= 1")
  _check(t.total_training_steps is None or t.total_training_steps >= 1, "trainer.total_training_steps",
         "must be >= 1, or None for no cap (the run ends with the data: trainer.total_epochs)")
  _check(t.save_freq >= 1 and t.test_freq >= 0, "trainer.save_freq", "save_freq must be >= 1, test_freq >= 0")
  _check(m.hf_checkpoint is not None or m.preset is not None, "model.hf_checkpoint",
         "set model.hf_checkpoint (a Hugging Face directory) or model.preset (random initial weights)")
  _check(m.dtype in DTYPES and m.param_dtype in DTYPES, "model.dtype", f"dtype and param_dtype: one of {tuple(DTYPES)}")
  for key, value in (("data.train_batch_size", d.train_batch_size), ("data.gen_batch_size", d.gen_batch_size),
                     ("actor.ppo_mini_batch_size", a.ppo_mini_batch_size)):
    _check(value % num_processes == 0, key,
           f"({value}) must be divisible by the {num_processes} processes, each of which samples and trains on "
           "an equal share of it")
  _check(isinstance(t.compilation_cache_dir, str), "trainer.compilation_cache_dir",
         "must be a directory, 'auto' or '' (off)")
  _check(not os.path.isfile(os.path.expanduser(t.compilation_cache_dir)), "trainer.compilation_cache_dir",
         f"{t.compilation_cache_dir} is a file; give a directory, 'auto' or '' (off)")
  if "distributed" in config:
    _validate_distributed(config.distributed)
  if workdir is not None:
    check_inputs(config, workdir)


def check_inputs(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Fails (ConfigError naming the key and the path) on inputs that are not there: data files,
  model.hf_checkpoint (a Hugging Face directory: config.json and safetensors), trainer.resume_from.

  Data paths with "{workdir}" are skipped in a config with a `synthetic` section: the program writes those
  files itself (the embedded default's task). So are remote paths (gs://...), which only reading can check.
  """
  generated = "synthetic" in config
  for key, value in (("data.train_files", config.data.train_files), ("data.val_files", config.data.val_files)):
    for template, path in zip(file_list(value, key=key), resolve_files(value, workdir, key=key)):
      if (generated and "{workdir}" in template) or "://" in path:  # remote (gs://) files are read as they come
        continue
      _check(os.path.isfile(path), key, f"{path}: no such file; give the parquet file(s) as "
             f"--config.{key}=PATH[,PATH...] (scripts/prepare_data.py checks a file's schema)")
  hf_checkpoint = config.model.hf_checkpoint
  if hf_checkpoint:
    directory = os.path.expanduser(hf_checkpoint)
    _check(os.path.isdir(directory), "model.hf_checkpoint",
           f"{directory}: no such directory; give a Hugging Face model directory (config.json, *.safetensors, "
           "tokenizer files)")
    names = os.listdir(directory)
    _check("config.json" in names, "model.hf_checkpoint",
           f"{directory} has no config.json; give a Hugging Face model directory, not a file or its parent")
    _check(any(name.endswith(".safetensors") for name in names), "model.hf_checkpoint",
           f"{directory} has no *.safetensors weights (only safetensors checkpoints are read)")
  resume_from = config.trainer.resume_from
  if resume_from and "://" not in resume_from:
    _check(os.path.exists(os.path.expanduser(resume_from)), "trainer.resume_from",
           f"{os.path.expanduser(resume_from)}: no such checkpoint, checkpoint directory or workdir")


def _unset(value) -> bool:
  return value is None or value in ("", -1)  # what `distributed.initialize_from_config` reads as unset


def _validate_distributed(section: ml_collections.ConfigDict) -> None:
  _check(section.initialize in distributed.MODES, "distributed.initialize",
         f"must be one of {distributed.MODES}, got {section.initialize!r}")
  address, count, process = section.coordinator_address, section.num_processes, section.process_id
  _check(_unset(address) or (isinstance(address, str) and address.rpartition(":")[2].isdigit()),
         "distributed.coordinator_address", f"must be 'host:port', got {address!r}")
  _check(_unset(count) or count >= 1, "distributed.num_processes", f"must be >= 1, got {count}")
  _check(_unset(process) or process >= 0, "distributed.process_id", f"must be >= 0, got {process}")
  _check(_unset(process) or _unset(count) or process < count, "distributed.process_id",
         f"({process}) must be below distributed.num_processes ({count})")


# The paper's Table 1 ladder (docs/algorithm.md section 9): each rung adds one technique to the rung before.
ABLATION_LADDER = ("grpo", "overlong_filter", "clip_higher", "soft_overlong", "token_level", "dapo")


def apply_ablation(config: ml_collections.ConfigDict, rung: str) -> ml_collections.ConfigDict:
  """Sets the algorithm keys of a rung of the Table 1 ladder (in place; returns the config). KL is off in all."""
  if rung not in ABLATION_LADDER:
    raise ConfigError(f"unknown ablation rung {rung!r}; choose one of {ABLATION_LADDER}")
  level = ABLATION_LADDER.index(rung)
  config.actor.clip_ratio_high = 0.28 if level >= ABLATION_LADDER.index("clip_higher") else 0.2
  config.actor.clip_ratio_low = 0.2
  # Overlong filtering (truncated responses masked out of the loss) is rung 2 only: rung 4's soft
  # punishment replaces it, as in the DAPO recipe.
  config.reward.overlong_filter = level in (ABLATION_LADDER.index("overlong_filter"),
                                            ABLATION_LADDER.index("clip_higher"))
  config.reward.overlong_buffer.enable = level >= ABLATION_LADDER.index("soft_overlong")
  config.actor.loss_agg_mode = ("token-mean" if level >= ABLATION_LADDER.index("token_level")
                                else "seq-mean-token-mean")
  config.algorithm.filter_groups.enable = level >= ABLATION_LADDER.index("dapo")
  if not config.algorithm.filter_groups.enable:
    # Without dynamic sampling a step trains on every group it draws, so it draws one batch (as verl does).
    config.data.gen_batch_size = config.data.train_batch_size
  return config


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, so a recipe can start from another file's recipe."""
  name = os.path.splitext(os.path.basename(path))[0]
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"dapo_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def single_host_recipe(full_recipe: ml_collections.ConfigDict, *, train_batch_size: int,
                       max_response_length: int, ppo_mini_batch_size: int) -> ml_collections.ConfigDict:
  """The full DAPO recipe sized for one host: the same algorithm with a smaller batch and response length.

  Generation batches stay 3x the train batch, the overlong buffer a fifth of the response length (4096 of
  20480 in the paper), and a micro-batch holds two full-length trajectories.
  """
  c = full_recipe
  c.data.train_batch_size = train_batch_size
  c.data.gen_batch_size = 3 * train_batch_size
  c.data.max_response_length = max_response_length
  c.reward.overlong_buffer.len = max_response_length // 5
  c.actor.ppo_mini_batch_size = ppo_mini_batch_size
  c.actor.micro_batch_tokens = 2 * (c.data.max_prompt_length + max_response_length)
  # The 32B recipe's mesh and decode settings are planned for a pod slice (scripts/plan_memory.py); one host
  # takes the base config's: FSDP over all its chips, the default decode slots, steps per call and KV pool.
  base = base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = base.mesh.data, base.mesh.fsdp, base.mesh.tensor
  for key in ("max_num_seqs", "decode_steps_per_call", "page_size", "gpu_memory_utilization", "num_pages",
              "log_prob_micro_batch_tokens"):
    c.rollout[key] = base.rollout[key]
  return c
