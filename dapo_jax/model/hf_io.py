"""Hugging Face Qwen2 checkpoints <-> our model, one tensor at a time.

`load_hf_checkpoint` reads config.json (transformers 4 style `rope_theta`/`torch_dtype` or transformers 5
style `rope_parameters`/`dtype`) and `model.safetensors` or a sharded `model.safetensors.index.json`, placing
each tensor directly into its target sharding when a mesh is given, so a 32B checkpoint never sits whole in
one host's memory: only one (converted) tensor is on the host at a time, and each device receives its own
slice. `save_hf_checkpoint` writes a directory that transformers' `Qwen2ForCausalLM.from_pretrained` loads,
from params on one host or spread over the processes of a multi-host run.
"""
from collections.abc import Callable
import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dapo_jax import distributed
from dapo_jax import sharding as sharding_lib
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.model.safetensors_io import SafetensorsFile, write_safetensors

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
  """A Hugging Face checkpoint directory does not match what a Qwen2 model needs."""


# ----------------------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf_config: dict, *, source: str = CONFIG_FILE, dtype=jnp.float32, param_dtype=None,
                   remat: bool = False) -> Qwen2Config:
  """Our Qwen2Config from the dict of a Hugging Face config.json (transformers 4 or 5 style)."""
  architectures = hf_config.get("architectures") or []
  model_type = hf_config.get("model_type")
  if "Qwen2ForCausalLM" not in architectures and model_type != "qwen2":
    raise CheckpointError(f"{source}: architecture {architectures or model_type!r} is not supported; "
                          "dapo_jax loads Qwen2ForCausalLM (model_type 'qwen2', e.g. Qwen2.5) checkpoints")

  def require(key):
    if key not in hf_config:
      raise CheckpointError(f"{source}: missing key {key!r}, which a Qwen2 config.json must have")
    return hf_config[key]

  if hf_config.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act {hf_config['hidden_act']!r} is not supported (Qwen2 uses 'silu')")
  if hf_config.get("use_sliding_window"):
    raise CheckpointError(f"{source}: use_sliding_window=true is not supported; Qwen2.5 models use full attention")
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported; only the default RoPE is")
  rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))
  num_heads = require("num_attention_heads")
  return Qwen2Config(
      vocab_size=require("vocab_size"), hidden_size=require("hidden_size"),
      intermediate_size=require("intermediate_size"), num_layers=require("num_hidden_layers"),
      num_heads=num_heads, num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
      head_dim=hf_config.get("head_dim"), rope_theta=float(rope_theta),
      rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf_config.get("max_position_embeddings", 32768)),
      dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)


def config_to_hf(config: Qwen2Config, *, torch_dtype: str) -> dict:
  """A transformers config.json dict for our config (keys both transformers 4 and 5 read)."""
  return {
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_word_embeddings,
      "max_position_embeddings": config.max_position_embeddings, "attention_dropout": 0.0,
      "use_sliding_window": False, "sliding_window": None, "max_window_layers": config.num_layers,
      "use_cache": True, "initializer_range": 0.02, "torch_dtype": torch_dtype, "dtype": torch_dtype,
  }


def dtype_config_name(dtype) -> str:
  """config.json's name (`torch_dtype` / `dtype`) for weights stored in `dtype`."""
  names = {np.dtype(v): k for k, v in _DTYPE_NAMES.items()}
  if np.dtype(dtype) not in names:
    raise ValueError(f"dtype {np.dtype(dtype)} is not one of {sorted(_DTYPE_NAMES)}")
  return names[np.dtype(dtype)]


# ----------------------------------------------------------------------------------------------------------
# Tensor names and layouts


@dataclasses.dataclass(frozen=True)
class _TensorMapping:
  """How one of our weights (one layer of it, for stacked ones) corresponds to a Hugging Face tensor."""
  ours: str                  # key in the params dict ("layers/q_kernel", "embed", ...)
  hf_name: str               # with "{layer}" for decoder-layer tensors
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _tensor_mappings(config: Qwen2Config) -> list[_TensorMapping]:
  e, h, kv, d, m, v = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                       config.intermediate_size, config.vocab_size)
  same = lambda x: x

  def heads_kernel(num):  # HF [num*d, e] (out, in) <-> ours [e, num, d]
    return (lambda w: w.T.reshape(e, num, d)), (lambda k: k.reshape(e, num * d).T)

  def heads_bias(num):
    return (lambda b: b.reshape(num, d)), (lambda b: b.reshape(num * d))

  transpose = (lambda w: w.T), (lambda k: k.T)
  layer = "model.layers.{layer}."
  maps = [
      _TensorMapping("embed", "model.embed_tokens.weight", (v, e), same, same),
      _TensorMapping("final_norm", "model.norm.weight", (e,), same, same),
      _TensorMapping("layers/attn_norm", layer + "input_layernorm.weight", (e,), same, same),
      _TensorMapping("layers/mlp_norm", layer + "post_attention_layernorm.weight", (e,), same, same),
      _TensorMapping("layers/q_kernel", layer + "self_attn.q_proj.weight", (h * d, e), *heads_kernel(h)),
      _TensorMapping("layers/k_kernel", layer + "self_attn.k_proj.weight", (kv * d, e), *heads_kernel(kv)),
      _TensorMapping("layers/v_kernel", layer + "self_attn.v_proj.weight", (kv * d, e), *heads_kernel(kv)),
      _TensorMapping("layers/q_bias", layer + "self_attn.q_proj.bias", (h * d,), *heads_bias(h)),
      _TensorMapping("layers/k_bias", layer + "self_attn.k_proj.bias", (kv * d,), *heads_bias(kv)),
      _TensorMapping("layers/v_bias", layer + "self_attn.v_proj.bias", (kv * d,), *heads_bias(kv)),
      _TensorMapping("layers/o_kernel", layer + "self_attn.o_proj.weight", (e, h * d),
                     lambda w: w.T.reshape(h, d, e), lambda k: k.reshape(h * d, e).T),
      _TensorMapping("layers/gate_kernel", layer + "mlp.gate_proj.weight", (m, e), *transpose),
      _TensorMapping("layers/up_kernel", layer + "mlp.up_proj.weight", (m, e), *transpose),
      _TensorMapping("layers/down_kernel", layer + "mlp.down_proj.weight", (e, m), *transpose),
  ]
  if not config.tie_word_embeddings:
    maps.append(_TensorMapping("lm_head", "lm_head.weight", (v, e), *transpose))
  return maps


def _hf_names(mapping: _TensorMapping, config: Qwen2Config) -> list[str]:
  if mapping.ours.startswith("layers/"):
    return [mapping.hf_name.format(layer=i) for i in range(config.num_layers)]
  return [mapping.hf_name]


def _get(tree: dict, key: str):
  for part in key.split("/"):
    tree = tree[part]
  return tree


def _set(tree: dict, key: str, value) -> None:
  *parents, last = key.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[last] = value


# ----------------------------------------------------------------------------------------------------------
# Loading


class _CheckpointTensors:
  """Name -> (file, memory-mapped array) over a single or sharded safetensors checkpoint."""

  def __init__(self, directory: str):
    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    single_path = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
      self.source = index_path
    elif os.path.exists(single_path):
      self.source = single_path
      weight_map = None
    else:
      found = sorted(os.listdir(directory))
      hint = (" (PyTorch .bin weights: convert them to safetensors first, e.g. with transformers' "
              "save_pretrained(safe_serialization=True))") if any(n.endswith(".bin") for n in found) else ""
      raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} found{hint}; "
                            f"files present: {found}")
    self._files: dict[str, SafetensorsFile] = {}
    if weight_map is None:
      file = self._open(single_path)
      self._where = {name: single_path for name in file.keys()}
    else:
      self._where = {name: os.path.join(directory, file) for name, file in weight_map.items()}
      for path in sorted(set(self._where.values())):
        file = self._open(path)
        listed = {n for n, p in self._where.items() if p == path}
        absent = sorted(listed - set(file.keys()))
        if absent:
          raise CheckpointError(f"{path}: tensors {absent[:5]} are listed in {SAFETENSORS_INDEX} but absent "
                                "from the file")

  def _open(self, path: str) -> SafetensorsFile:
    if path not in self._files:
      if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint shard not found (named in {self.source})")
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def names(self) -> set[str]:
    return set(self._where)

  def read(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
    file = self._open(self._where[name])
    if file.shape(name) != tuple(expected_shape):
      raise CheckpointError(f"{file.path}: tensor {name!r} has shape {file.shape(name)}, expected "
                            f"{tuple(expected_shape)} from config.json")
    return file[name]


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer_value: jax.Array, layer: jax.Array) -> jax.Array:
  # The stacked weight is donated, so filling it layer by layer never holds two copies.
  return jax.lax.dynamic_update_index_in_dim(stacked, layer_value.astype(stacked.dtype), layer, 0)


def _place(host_array: np.ndarray, target: NamedSharding) -> jax.Array:
  """A global array from a host array, each device receiving only its own slice."""
  return jax.make_array_from_callback(host_array.shape, target, lambda index: np.asarray(host_array[index]))


def load_hf_checkpoint(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, mesh: Mesh | None = None,
                       rules=sharding_lib.DEFAULT_RULES, remat: bool = False) -> tuple[Qwen2Config, qwen2.Qwen2]:
  """Loads a Hugging Face Qwen2 checkpoint directory into our model.

  `dtype` is the compute dtype, `param_dtype` (default: `dtype`) the dtype weights are stored in. With a
  mesh, every weight lands in the sharding its logical axes and `rules` give; without one, on the default
  device. Errors name the file, tensor or key and what was expected.
  """
  directory = os.fspath(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: not a directory; expected a Hugging Face checkpoint directory with "
                          f"{CONFIG_FILE} and {SAFETENSORS_FILE}")
  config_path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{config_path}: not found; a Hugging Face checkpoint directory needs it") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
  config = config_from_hf(hf_config, source=config_path, dtype=dtype, param_dtype=param_dtype, remat=remat)
  tensors = _CheckpointTensors(directory)
  mappings = _tensor_mappings(config)

  expected = {name for m in mappings for name in _hf_names(m, config)}
  present = tensors.names()
  missing = sorted(expected - present)
  if missing:
    raise CheckpointError(f"{tensors.source}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                          f"({len(missing)} in all) that a Qwen2 model with this config.json needs")
  allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()  # some tied checkpoints keep it
  extra = sorted(n for n in present - expected - allowed_extra if not n.endswith(_IGNORED_TENSOR_SUFFIXES))
  if extra:
    raise CheckpointError(f"{tensors.source}: unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                          f"({len(extra)} in all) that a Qwen2 model with this config.json does not have "
                          "(a different architecture, or num_hidden_layers / tie_word_embeddings disagree?)")

  if mesh is None:
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  abstract = qwen2.abstract_model(config)
  shardings = sharding_lib.param_shardings(abstract, mesh, rules)
  shapes = nnx.to_pure_dict(jax.tree.map(lambda x: x.shape, nnx.state(abstract, nnx.Param)))
  np_param_dtype = np.dtype(config.param_dtype)
  params: dict = {}
  start = time.time()
  logging.info("Loading %s (%d tensors) ...", directory, len(expected))
  for count, mapping in enumerate(mappings, 1):
    target = _get(shardings, mapping.ours)
    shape = _get(shapes, mapping.ours)
    if mapping.ours.startswith("layers/"):
      layer_sharding = NamedSharding(mesh, PartitionSpec(*target.spec[1:]))
      stacked = jax.jit(lambda: jnp.zeros(shape, np_param_dtype), out_shardings=target)()
      for i, hf_name in enumerate(_hf_names(mapping, config)):
        host = mapping.to_ours(tensors.read(hf_name, mapping.hf_shape)).astype(np_param_dtype)
        stacked = _write_layer(stacked, _place(host, layer_sharding), np.int32(i))
      value = stacked
    else:
      host = mapping.to_ours(tensors.read(mapping.hf_name, mapping.hf_shape)).astype(np_param_dtype)
      value = _place(host, target)
    _set(params, mapping.ours, value)
    logging.info("  [%d/%d] %s %s (%.1f s)", count, len(mappings), mapping.ours, shape, time.time() - start)

  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, params)
  return config, nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------------------
# Saving


def _host_value(array) -> np.ndarray:
  """The whole of `array` on this host: a transfer, or for an array spread over several processes an all-gather
  (a collective every process must join)."""
  if getattr(array, "is_fully_addressable", True):
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def save_hf_checkpoint(params: qwen2.Params, config: Qwen2Config, path: str | os.PathLike, *, dtype=None,
                       max_shard_bytes: int = 5 * 2**30, generation_config: dict | None = None) -> None:
  """Writes `params` (a model's plain params dict, `Qwen2.params`) as a Hugging Face Qwen2 checkpoint directory
  (config.json + safetensors).

  Weights are written in `dtype` (default: the model's parameter dtype), one tensor at a time, in shards of
  at most `max_shard_bytes` with a `model.safetensors.index.json` when more than one shard is needed.

  With several processes every one must call it with the same (global) params: each tensor is gathered by all
  of them in turn and process 0 writes the files; it returns once the directory is complete.
  """
  directory = os.fspath(path)
  primary = distributed.is_primary()
  if primary:
    os.makedirs(directory, exist_ok=True)
  np_dtype = np.dtype(dtype or config.param_dtype)
  dtype_name = dtype_config_name(np_dtype)

  # Every HF tensor with a function that fetches it from the devices when its turn comes.
  tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = []
  for mapping in _tensor_mappings(config):
    value = _get(params, mapping.ours)
    if mapping.ours.startswith("layers/"):
      for i, hf_name in enumerate(_hf_names(mapping, config)):
        tensors.append((hf_name, mapping.hf_shape,
                        functools.partial(lambda m, v, i: m.to_hf(_host_value(v[i])), mapping, value, i)))
    else:
      tensors.append((mapping.hf_name, mapping.hf_shape,
                      functools.partial(lambda m, v: m.to_hf(_host_value(v)), mapping, value)))

  shards: list[list] = [[]]
  shard_bytes = 0
  for entry in tensors:
    size = int(np.prod(entry[1])) * np_dtype.itemsize
    if shards[-1] and shard_bytes + size > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(entry)
    shard_bytes += size

  weight_map = {}
  for number, shard in enumerate(shards, 1):
    file_name = (SAFETENSORS_FILE if len(shards) == 1
                 else f"model-{number:05d}-of-{len(shards):05d}.safetensors")
    if not primary:
      for _, _, get in shard:  # join the all-gathers of process 0's writer, in the order it asks for tensors
        get()
      continue
    getters = {name: get for name, _, get in shard}
    write_safetensors(os.path.join(directory, file_name), [(name, shape, np_dtype) for name, shape, _ in shard],
                      lambda name: getters[name]())
    weight_map.update({name: file_name for name, _, _ in shard})
    logging.info("Wrote %s (%d tensors)", file_name, len(shard))
  if primary:
    if len(shards) > 1:
      total = sum(int(np.prod(shape)) * np_dtype.itemsize for _, shape, _ in tensors)
      with open(os.path.join(directory, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    elif os.path.exists(os.path.join(directory, SAFETENSORS_INDEX)):
      os.remove(os.path.join(directory, SAFETENSORS_INDEX))  # a stale index would shadow the single file
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
      json.dump(config_to_hf(config, torch_dtype=dtype_name), f, indent=2)
    if generation_config is not None:
      with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(generation_config, f, indent=2)
  distributed.sync(f"save_hf_checkpoint {directory}")
