"""The policy a run starts from.

The initial policy is a Hugging Face checkpoint (`model.hf_checkpoint`), or a preset with random weights; for
the embedded default, the preset after a supervised warm-up on the synthetic task (docs/algorithm.md section
12), cached in the workdir so that a restarted run loads it instead of training it again.
"""
import dataclasses
import json
import logging
import os

import jax
import ml_collections
from flax import nnx

from dapo_jax import config as config_lib
from dapo_jax import distributed
from dapo_jax import sft
from dapo_jax import sharding
from dapo_jax.data import synthetic
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.model.config import Qwen2Config, get_preset


def prepare_synthetic_task(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Writes the embedded default's task files into the workdir once (process 0; the others wait for it);
  returns its tokenizer directory (None without a `synthetic` section)."""
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


def initial_policy(config: ml_collections.ConfigDict, workdir: str, tokenizer: tokenizer_lib.Tokenizer,
                   mesh: jax.sharding.Mesh) -> tuple[Qwen2Config, qwen2.Params]:
  """(model config, params on `mesh`): an HF checkpoint, or a preset (warmed up on the synthetic task when the
  config has a `warmup` section)."""
  dtype, param_dtype = config_lib.DTYPES[config.model.dtype], config_lib.DTYPES[config.model.param_dtype]
  if config.model.hf_checkpoint:
    if config.model.preset:
      logging.info("model.hf_checkpoint is set: its weights and shape are used, not the preset %r",
                   config.model.preset)
    return _load(config.model.hf_checkpoint, config, mesh)
  base_dir = os.path.join(workdir, "base_model")
  if "warmup" in config and os.path.exists(os.path.join(base_dir, "config.json")):
    _check_cached_warmup(base_dir, config)
    logging.info("Loading the warmed-up base model cached in %s", base_dir)
    return _load(base_dir, config, mesh)
  model_config = get_preset(config.model.preset, dtype=dtype, param_dtype=param_dtype, remat=config.model.remat)
  if model_config.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(f"config.model.preset: {config.model.preset!r} has vocab_size "
                                 f"{model_config.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
  model = qwen2.Qwen2(model_config, rngs=nnx.Rngs(config.trainer.seed))
  params = sharding.shard_params(model.params, sharding.param_shardings(model, mesh))
  if "warmup" not in config:
    return model_config, params
  params = _warm_up(params, model_config, config, tokenizer)
  if distributed.is_primary():
    tokenizer.save(base_dir)
    with open(os.path.join(base_dir, WARMUP_SETTINGS_FILE), "w") as f:
      json.dump(_warmup_settings(config), f, indent=2)
  hf_io.save_hf_checkpoint(params, model_config, base_dir)  # every process gathers, process 0 writes
  return model_config, params


# Written beside the cached base model: the config values its warm-up was made from.
WARMUP_SETTINGS_FILE = "warmup_settings.json"


def _warmup_settings(config: ml_collections.ConfigDict) -> dict:
  """The config values that decide the warmed-up base model, by dotted key."""
  settings = {"model.preset": config.model.preset, "trainer.seed": config.trainer.seed,
              "synthetic.seed": config.synthetic.seed, "synthetic.num_heldout": config.synthetic.num_heldout}
  settings.update({f"warmup.{key}": value for key, value in config.warmup.items()})
  return settings


def _check_cached_warmup(base_dir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a cached base model made from other warm-up settings than the config's (e.g. by an older default),
  which would otherwise be reused without a word."""
  path = os.path.join(base_dir, WARMUP_SETTINGS_FILE)
  if not os.path.exists(path):
    raise config_lib.ConfigError(
        f"{base_dir} holds a base model without {WARMUP_SETTINGS_FILE}, so it cannot be checked against "
        "config.warmup (it was made by an older version): remove the workdir, or give a new --workdir")
  with open(path) as f:
    cached = json.load(f)
  wanted = _warmup_settings(config)
  differing = sorted(k for k in wanted.keys() | cached.keys() if cached.get(k) != wanted.get(k))
  if differing:
    described = ", ".join(f"{k}={cached.get(k)!r} (config: {wanted.get(k)!r})" for k in differing)
    raise config_lib.ConfigError(
        f"{base_dir} was warmed up with {described}: remove the workdir (its checkpoints continue that base "
        "model), or give a new --workdir")


def _load(directory: str, config: ml_collections.ConfigDict, mesh) -> tuple[Qwen2Config, qwen2.Params]:
  model_config, model = hf_io.load_hf_checkpoint(
      directory, dtype=config_lib.DTYPES[config.model.dtype], param_dtype=config_lib.DTYPES[config.model.param_dtype],
      mesh=mesh, remat=config.model.remat)
  return model_config, model.params


def _warm_up(params: qwen2.Params, model_config: Qwen2Config, config: ml_collections.ConfigDict,
             tokenizer: tokenizer_lib.Tokenizer) -> qwen2.Params:
  """The supervised warm-up on the synthetic task's training problems, a share of them solved in the wrong
  order of operations, so that the base model sometimes reasons the right way and RL has a behaviour to
  reinforce."""
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
  return params
