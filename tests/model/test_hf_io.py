"""Hugging Face checkpoint import/export: round trips, sharded indexes, tied heads, meshes and bad input."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dapo_jax import sharding
from dapo_jax.model import hf_io, qwen2
from dapo_jax.model.safetensors_io import SafetensorsFile, write_safetensors
from tests.model import hf_fixtures

TOL = 2e-4
PROMPT = np.array([[5, 17, 3, 42, 8, 1, 60, 33, 2]])


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tied"))
  model = hf_fixtures.make_hf_model("tied_gqa", seed=1)
  hf_fixtures.save_hf_model(model, directory)
  return directory, model


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("untied"))
  model = hf_fixtures.make_hf_model("untied_mqa", seed=2)
  hf_fixtures.save_hf_model(model, directory)
  return directory, model


def _copy(directory, tmp_path, name="copy"):
  target = str(tmp_path / name)
  shutil.copytree(directory, target)
  return target


def test_tied_checkpoint_omits_lm_head_and_loads(tied_dir):
  directory, hf_model = tied_dir
  names = SafetensorsFile(os.path.join(directory, "model.safetensors")).keys()
  assert "lm_head.weight" not in names  # transformers drops the tied head when saving
  config, model = hf_io.load_hf_checkpoint(directory)
  assert config.tie_word_embeddings and not hasattr(model, "lm_head")
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(PROMPT))), hf_fixtures.hf_logits(hf_model, PROMPT),
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("fixture_name", ["tied_dir", "untied_dir"])
def test_export_then_transformers_load_gives_same_logits(fixture_name, request, tmp_path):
  directory, _ = request.getfixturevalue(fixture_name)
  config, model = hf_io.load_hf_checkpoint(directory)
  out = str(tmp_path / "export")
  hf_io.save_hf_checkpoint(model.params, config, out, generation_config={"eos_token_id": [3, 4]})
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_fixtures.hf_logits(reloaded, PROMPT), np.asarray(model(jnp.asarray(PROMPT))),
                             atol=TOL, rtol=0)
  assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == [3, 4]
  # And our own import of our export is exact.
  _, again = hf_io.load_hf_checkpoint(out)
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_in_bf16_and_in_shards(untied_dir, tmp_path):
  directory, _ = untied_dir
  config, model = hf_io.load_hf_checkpoint(directory)
  out = str(tmp_path / "bf16_sharded")
  hf_io.save_hf_checkpoint(model.params, config, out, dtype=jnp.bfloat16, max_shard_bytes=20_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  _, ours_bf16 = hf_io.load_hf_checkpoint(out)
  np.testing.assert_allclose(hf_fixtures.hf_logits(reloaded, PROMPT), np.asarray(ours_bf16(jnp.asarray(PROMPT))),
                             atol=TOL, rtol=0)


def test_import_of_sharded_index_checkpoint(tmp_path):
  hf_model = hf_fixtures.make_hf_model("untied_mha", seed=3)
  directory = hf_fixtures.save_hf_model(hf_model, str(tmp_path / "sharded"), max_shard_size="20KB")
  assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  assert not os.path.exists(os.path.join(directory, "model.safetensors"))
  _, model = hf_io.load_hf_checkpoint(directory)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(PROMPT))), hf_fixtures.hf_logits(hf_model, PROMPT),
                             atol=TOL, rtol=0)


def test_transformers4_style_config(untied_dir, tmp_path):
  directory = _copy(untied_dir[0], tmp_path)
  hf_fixtures.rewrite_config_transformers4_style(directory)
  raw = json.load(open(os.path.join(directory, "config.json")))
  assert "rope_theta" in raw and "rope_parameters" not in raw and "torch_dtype" in raw
  config, model = hf_io.load_hf_checkpoint(directory)
  assert config.rope_theta == 1_000_000.0 and config.rms_norm_eps == 1e-5
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(PROMPT))), hf_fixtures.hf_logits(untied_dir[1], PROMPT),
                             atol=TOL, rtol=0)


def test_dtype_and_param_dtype(untied_dir):
  config, model = hf_io.load_hf_checkpoint(untied_dir[0], dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert config.dtype == jnp.bfloat16 and config.param_dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(model.params))
  logits = model(jnp.asarray(PROMPT))
  assert logits.dtype == jnp.bfloat16
  _, bf16_model = hf_io.load_hf_checkpoint(untied_dir[0], dtype=jnp.bfloat16)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(bf16_model.params))


def test_loading_onto_a_mesh_places_every_tensor_and_matches_single_device(untied_dir):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  config, sharded = hf_io.load_hf_checkpoint(untied_dir[0], mesh=mesh)
  expected = sharding.param_shardings(sharded, mesh)
  for leaf, want in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(expected)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.shape, leaf.sharding, want)
  # At least the MLP and vocabulary weights are really split over devices.
  assert not sharded.params["layers"]["gate_kernel"].sharding.is_fully_replicated
  assert not sharded.params["embed"].sharding.is_fully_replicated
  _, single = hf_io.load_hf_checkpoint(untied_dir[0])
  ids = jnp.asarray(np.tile(PROMPT, (4, 1)))
  rows = sharding.logical_sharding(("batch", None), sharding.DEFAULT_RULES, mesh)
  sharded_logits = jax.jit(qwen2.forward, static_argnums=1)(sharded.params, config, jax.device_put(ids, rows))
  np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(single(ids)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input: each error names the file, tensor or key.


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(hf_io.CheckpointError, match="not a directory"):
    hf_io.load_hf_checkpoint(str(tmp_path / "nope"))
  with pytest.raises(hf_io.CheckpointError, match="config.json: not found"):
    hf_io.load_hf_checkpoint(str(tmp_path))


def test_missing_weights_file(untied_dir, tmp_path):
  directory = _copy(untied_dir[0], tmp_path)
  os.remove(os.path.join(directory, "model.safetensors"))
  open(os.path.join(directory, "pytorch_model.bin"), "wb").close()
  with pytest.raises(hf_io.CheckpointError, match=r"no model.safetensors.*convert them to safetensors"):
    hf_io.load_hf_checkpoint(directory)


def test_other_architecture_is_refused(untied_dir, tmp_path):
  directory = _copy(untied_dir[0], tmp_path)
  path = os.path.join(directory, "config.json")
  config = json.load(open(path))
  config.update(architectures=["LlamaForCausalLM"], model_type="llama")
  json.dump(config, open(path, "w"))
  with pytest.raises(hf_io.CheckpointError, match=r"config.json: architecture \['LlamaForCausalLM'\]"):
    hf_io.load_hf_checkpoint(directory)


def _rewrite_tensors(directory, edit):
  """Rewrites model.safetensors with `edit(dict of numpy arrays)` applied."""
  path = os.path.join(directory, "model.safetensors")
  file = SafetensorsFile(path)
  tensors = {name: np.array(file[name]) for name in file.keys()}
  del file
  edit(tensors)
  write_safetensors(path, [(n, t.shape, t.dtype) for n, t in tensors.items()], tensors.__getitem__)


def test_missing_tensor(untied_dir, tmp_path):
  directory = _copy(untied_dir[0], tmp_path)
  _rewrite_tensors(directory, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(hf_io.CheckpointError, match=r"missing tensors \['model.layers.1.self_attn.k_proj.bias'\]"):
    hf_io.load_hf_checkpoint(directory)


def test_extra_tensor(untied_dir, tmp_path):
  directory = _copy(untied_dir[0], tmp_path)
  _rewrite_tensors(directory, lambda t: t.update({"model.layers.3.mlp.up_proj.weight": np.zeros((2, 2),
                                                                                                 np.float32)}))
  with pytest.raises(hf_io.CheckpointError, match=r"unexpected tensors \['model.layers.3.mlp.up_proj.weight'\]"):
    hf_io.load_hf_checkpoint(directory)


def test_shape_mismatch(untied_dir, tmp_path):
  directory = _copy(untied_dir[0], tmp_path)
  _rewrite_tensors(directory, lambda t: t.update({"model.norm.weight": np.ones((7,), np.float32)}))
  with pytest.raises(hf_io.CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape "
                                                  r"\(7,\), expected \(48,\)"):
    hf_io.load_hf_checkpoint(directory)


def test_truncated_safetensors_file(untied_dir, tmp_path):
  directory = _copy(untied_dir[0], tmp_path)
  path = os.path.join(directory, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
    hf_io.load_hf_checkpoint(directory)


def test_32b_preset_parameter_count():
  from flax import nnx
  from dapo_jax.model.config import get_preset
  config = get_preset("qwen2.5-32b")
  abstract = qwen2.abstract_model(config)  # jax.eval_shape underneath: no memory is allocated
  count = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == config.num_params()
  assert 32.7e9 < count < 32.8e9  # Qwen2.5-32B: 32.76B weights with its untied head
