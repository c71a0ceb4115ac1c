"""Training checkpoints: orbax CheckpointManager over the train state, a JSON record of the loop's state, and the
files that make a checkpoint usable on its own.

A checkpoint directory (`<workdir>/checkpoints`) holds one directory per saved rollout step k, with
  * one orbax item per train-state part (`params`, `opt_state`), saved asynchronously and sharded as they are on
    the devices; a reader that wants only the weights restores only `params`;
  * `meta`: JSON (the rollout-step counter, the data iterator's state, the dynamic-sampling state, and anything
    else the loop needs to continue exactly as if it had never stopped);
and, beside the steps, `policy/`: the model's config.json (Hugging Face format), generation_config.json and the
tokenizer files, so `dapo_jax.generate`, `dapo_jax.evaluate` and `scripts/export_hf.py` need nothing else.
Orbax writes each step to a temporary directory and renames it when complete, so after a crash or a kill the
newest *complete* step is what `latest_step()` returns.
"""
import dataclasses
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.model.config import Qwen2Config

POLICY_DIR = "policy"
_META = "meta"


class Checkpointer:
  """Saves and restores (train-state items, metadata) pairs under `directory`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.expanduser(directory)) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, items: Mapping[str, Any], metadata: dict, *, force: bool = False) -> None:
    """Starts saving `items` (name -> pytree of arrays) and `metadata` (JSON) asynchronously; the previous save is
    finished first."""
    if _META in items:
      raise ValueError(f"Checkpointer.save: the item name {_META!r} is reserved for the metadata")
    start = time.time()
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    self._manager.save(step, args=ocp.args.Composite(**args, **{_META: ocp.args.JsonSave(metadata)}), force=force)
    logging.info("Checkpoint of step %d started in %s (%.1f s to hand off)", step, self.directory,
                 time.time() - start)

  def restore(self, step: int, abstract_items: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """The named items at `step` (only those asked for), each placed like its abstract tree (a pytree of
    jax.ShapeDtypeStruct with shardings), and the metadata."""
    start = time.time()
    args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
    restored = self._manager.restore(step, args=ocp.args.Composite(**args, **{_META: ocp.args.JsonRestore()}))
    logging.info("Restored %s of step %d from %s in %.1f s", sorted(abstract_items), step, self.directory,
                 time.time() - start)
    return {name: restored[name] for name in abstract_items}, restored[_META]

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """Shape, dtype and sharding of each array of `tree`: the target to restore into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id")


def special_token_ids(tokenizer: tokenizer_lib.Tokenizer | None, *, hf_config: Mapping[str, Any] | None = None,
                      generation_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json's `bos_token_id` and `eos_token_id`, which transformers reads as None when they are absent.

  Each comes from the source model's config.json (`hf_config`) when it names one (Qwen2.5 names 151643 for both,
  a token its tokenizer does not call bos), else from the tokenizer (its bos token; its eos token), else from
  generation_config.json; a key with none of these is left out.
  """
  sources = [hf_config or {}]
  if tokenizer is not None:
    sources.append({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
  sources.append(generation_config or {})
  ids = {}
  for key in TOKEN_ID_KEYS:
    value = next((source[key] for source in sources if source.get(key) is not None), None)
    if value is not None:
      ids[key] = value
  return ids


def read_hf_config(directory: str | None) -> dict | None:
  """The config.json of a Hugging Face directory (e.g. `model.hf_checkpoint`, for `write_policy_files`'
  `source_hf_config`); None without a directory or a config.json in it."""
  if not directory:
    return None
  path = os.path.join(os.path.expanduser(directory), hf_io.CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_policy_files(checkpoint_dir: str, model_config: Qwen2Config, tokenizer: tokenizer_lib.Tokenizer, *,
                       source_hf_config: Mapping[str, Any] | None = None) -> str:
  """Writes `policy/` (config.json, generation_config.json, tokenizer files) beside the steps; returns its path.

  `source_hf_config` is the base model's config.json, whose bos / eos token ids config.json keeps
  (`special_token_ids`). Only process 0 writes (every host sees the same files on a shared file system).
  """
  directory = os.path.join(checkpoint_dir, POLICY_DIR)
  if jax.process_index() != 0:
    return directory
  os.makedirs(directory, exist_ok=True)
  dtype_name = hf_io.dtype_config_name(model_config.param_dtype)
  hf_config = {**hf_io.config_to_hf(model_config, torch_dtype=dtype_name),
               **special_token_ids(tokenizer, hf_config=source_hf_config)}
  with open(os.path.join(directory, hf_io.CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)
  with open(os.path.join(directory, tokenizer_lib.GENERATION_CONFIG), "w") as f:
    json.dump({"eos_token_id": list(tokenizer.eos_ids)}, f, indent=2)
  tokenizer.save(directory)
  return directory


@dataclasses.dataclass(frozen=True)
class Policy:
  """Weights loaded from a checkpoint of either kind.

  Attributes:
    config: the model config.
    params: the plain params dict, placed in the mesh's shardings.
    files_dir: the directory with the tokenizer files and generation_config.json (the HF directory itself, or
      a training checkpoint's `policy/`).
    description: where the weights came from, for logs and reports.
  """
  config: Qwen2Config
  params: qwen2.Params
  files_dir: str
  description: str


def is_hf_directory(path: str) -> bool:
  return os.path.exists(os.path.join(path, hf_io.CONFIG_FILE)) and any(
      name.endswith(".safetensors") or name == hf_io.SAFETENSORS_INDEX for name in os.listdir(path))


def resolve_training_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoint directory, step) that `path` names: a step directory (`.../checkpoints/40`), a checkpoint
  directory (its newest complete step) or a workdir (its `checkpoints/`)."""
  path = os.path.abspath(os.path.expanduser(path))
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(os.path.dirname(path), POLICY_DIR)):
    return os.path.dirname(path), int(name)
  root = path if os.path.isdir(os.path.join(path, POLICY_DIR)) else os.path.join(path, "checkpoints")
  if not os.path.isdir(os.path.join(root, POLICY_DIR)):
    raise FileNotFoundError(
        f"{path}: not a checkpoint. Expected a Hugging Face directory (config.json + *.safetensors), a training "
        f"workdir, its checkpoints/ directory, or one step directory inside it (checkpoints/<step>, with "
        f"checkpoints/{POLICY_DIR}/ beside it)")
  manager = Checkpointer(root)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise FileNotFoundError(f"{root}: holds no complete checkpoint step yet")
  return root, step


def load_policy(path: str, *, dtype=jnp.float32, param_dtype=None, mesh=None,
                rules=sharding_lib.DEFAULT_RULES, remat: bool = False) -> Policy:
  """The weights of a Hugging Face directory or of one of our training checkpoints (see
  `resolve_training_checkpoint`), in `dtype` compute / `param_dtype` storage, placed on `mesh` (default: one
  device)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such directory")
  if is_hf_directory(path):
    config, model = hf_io.load_hf_checkpoint(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                                             remat=remat)
    return Policy(config, model.params, path, f"Hugging Face checkpoint {path}")
  root, step = resolve_training_checkpoint(path)
  files_dir = os.path.join(root, POLICY_DIR)
  with open(os.path.join(files_dir, hf_io.CONFIG_FILE)) as f:
    config = hf_io.config_from_hf(json.load(f), source=os.path.join(files_dir, hf_io.CONFIG_FILE), dtype=dtype,
                                  param_dtype=param_dtype, remat=remat)
  if mesh is None:
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  abstract_model = qwen2.abstract_model(config)
  shardings = sharding_lib.param_shardings(abstract_model, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, config.param_dtype, sharding=s),
                          abstract_model.params, shardings)
  manager = Checkpointer(root)
  restored, _ = manager.restore(step, {"params": abstract})
  manager.close()
  return Policy(config, restored["params"], files_dir, f"step {step} of {root}")
