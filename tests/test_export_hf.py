"""scripts/export_hf.py, run as users run it: a training checkpoint in, a directory transformers loads out."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dapo_jax import checkpoint
from dapo_jax.model import qwen2
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.model.config import get_preset
from tests import tokenizer_fixtures

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "export_hf.py"
TOL = 2e-4
PROMPT = np.array([[5, 17, 3, 22, 8, 1, 30, 13, 2]])


def _export(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                        timeout=300, check=False)


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
  """A workdir with two steps of a random tiny model (untied head) over the character vocabulary; the newest
  step's weights are twice the first's."""
  workdir = tmp_path_factory.mktemp("export") / "workdir"
  config = get_preset("tiny", vocab_size=32, tie_word_embeddings=False)
  params = qwen2.Qwen2(config, rngs=nnx.Rngs(4)).params
  root = str(workdir / "checkpoints")
  checkpoint.write_policy_files(root, config, tokenizer_fixtures.char_tokenizer())
  manager = checkpoint.Checkpointer(root)
  for step in (1, 2):
    manager.save(step, {"params": jax.tree.map(lambda x, s=step: x * s, params)}, {"rollout_step": step})
  manager.wait()
  manager.close()
  return dict(workdir=workdir, config=config, params=params)


def _our_logits(params, config) -> np.ndarray:
  return np.asarray(qwen2.forward(params, config, jnp.asarray(PROMPT)))


def _transformers_logits(directory) -> np.ndarray:
  model = transformers.Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(PROMPT)).logits.numpy()


def test_float32_export_gives_transformers_our_logits_and_tokenizer(training_checkpoint, tmp_path):
  out = tmp_path / "hf"
  result = _export("--checkpoint", training_checkpoint["workdir"], "--output", out, "--dtype", "float32",
                   "--max_shard_size", "100KB")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "from step 2 of" in result.stdout
  index = json.load(open(out / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1  # sharded at 100 kB
  assert json.load(open(out / "config.json"))["torch_dtype"] == "float32"
  params2 = jax.tree.map(lambda x: x * 2, training_checkpoint["params"])
  expected = _our_logits(params2, training_checkpoint["config"])
  np.testing.assert_allclose(_transformers_logits(out), expected, atol=TOL, rtol=0)
  # The tokenizer, its chat template and the stop ids travel along.
  ours = tokenizer_fixtures.char_tokenizer()
  exported = tokenizer_lib.load_tokenizer(out)
  assert exported.eos_ids == ours.eos_ids and exported.chat_template == ours.chat_template
  assert json.load(open(out / "generation_config.json"))["eos_token_id"] == list(ours.eos_ids)
  assert exported.encode("What is 12+3*4?") == ours.encode("What is 12+3*4?")
  policy_files = training_checkpoint["workdir"] / "checkpoints" / checkpoint.POLICY_DIR
  for name in (tokenizer_lib.TOKENIZER_JSON, tokenizer_lib.TOKENIZER_CONFIG):  # copied as they are
    assert (out / name).read_bytes() == (policy_files / name).read_bytes()
  # transformers reads the special token ids from config.json: the tokenizer's eos; it has no bos token.
  hf_config = transformers.AutoConfig.from_pretrained(out)
  assert ours.eos_id is not None and ours.bos_id is None
  assert (hf_config.eos_token_id, hf_config.bos_token_id) == (ours.eos_id, None)
  assert json.load(open(policy_files / "config.json"))["eos_token_id"] == ours.eos_id  # training writes it too


def test_export_keeps_the_source_configs_token_ids(training_checkpoint, tmp_path):
  # A Hugging Face directory whose config.json names ids of its own, as Qwen2.5's does (bos 151643, a token
  # its tokenizer does not call bos): they win over the tokenizer's.
  source = tmp_path / "source"
  assert _export("--checkpoint", training_checkpoint["workdir"], "--output", source).returncode == 0
  config = json.load(open(source / "config.json"))
  config.update(bos_token_id=3, eos_token_id=[4, 5])
  json.dump(config, open(source / "config.json", "w"))
  out = tmp_path / "out"
  result = _export("--checkpoint", source, "--output", out)
  assert result.returncode == 0, result.stderr[-3000:]
  hf_config = transformers.AutoConfig.from_pretrained(out)
  assert (hf_config.bos_token_id, hf_config.eos_token_id) == (3, [4, 5])


@pytest.mark.parametrize("hf_config, generation_config, expected", [
    ({"bos_token_id": 1, "eos_token_id": 2}, {"bos_token_id": 7, "eos_token_id": [8]}, {"bos_token_id": 1,
                                                                                        "eos_token_id": 2}),
    # No ids in config.json: the tokenizer's eos (it has no bos), then generation_config.json's bos.
    ({}, {"bos_token_id": 7, "eos_token_id": [8]}, {"bos_token_id": 7, "eos_token_id": "tokenizer"}),
    ({"bos_token_id": None}, None, {"eos_token_id": "tokenizer"}),  # None is no id: the key stays out
])
def test_special_token_ids_precedence(hf_config, generation_config, expected):
  tokenizer = tokenizer_fixtures.char_tokenizer()
  expected = {k: tokenizer.eos_id if v == "tokenizer" else v for k, v in expected.items()}
  assert checkpoint.special_token_ids(tokenizer, hf_config=hf_config, generation_config=generation_config) == \
      expected
  assert checkpoint.special_token_ids(None, generation_config={"eos_token_id": [8, 9]}) == {"eos_token_id": [8, 9]}


def test_training_policy_files_keep_the_base_models_token_ids(tmp_path):
  base = tmp_path / "base"
  base.mkdir()
  (base / "config.json").write_text(json.dumps({"bos_token_id": 3, "eos_token_id": 4, "hidden_size": 8}))
  source = checkpoint.read_hf_config(str(base))
  assert checkpoint.read_hf_config(str(tmp_path)) is None and checkpoint.read_hf_config(None) is None
  directory = checkpoint.write_policy_files(str(tmp_path / "checkpoints"), get_preset("tiny", vocab_size=32),
                                            tokenizer_fixtures.char_tokenizer(), source_hf_config=source)
  written = json.load(open(os.path.join(directory, "config.json")))
  assert (written["bos_token_id"], written["eos_token_id"]) == (3, 4)
  assert written["hidden_size"] == get_preset("tiny", vocab_size=32).hidden_size  # the shape is ours


def test_bfloat16_export_of_one_step_loads(training_checkpoint, tmp_path):
  out = tmp_path / "hf_bf16"
  result = _export("--checkpoint", training_checkpoint["workdir"] / "checkpoints" / "1", "--output", out)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(p for p in os.listdir(out) if p.endswith(".safetensors")) == ["model.safetensors"]
  assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
  # Step 1's weights, rounded to bfloat16: the reference is our forward on the same rounded weights.
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), training_checkpoint["params"])
  np.testing.assert_allclose(_transformers_logits(out), _our_logits(rounded, training_checkpoint["config"]),
                             atol=TOL, rtol=0)
  # And it is a checkpoint our own loader reads too.
  assert checkpoint.load_policy(str(out)).config.vocab_size == 32


def test_refuses_a_non_empty_output_and_a_bad_shard_size(training_checkpoint, tmp_path):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "model-00001-of-00002.safetensors").write_text("old")
  result = _export("--checkpoint", training_checkpoint["workdir"], "--output", tmp_path / "full")
  assert result.returncode == 1 and "is not an empty directory" in result.stderr
  result = _export("--checkpoint", training_checkpoint["workdir"], "--output", tmp_path / "out",
                   "--max_shard_size", "lots")
  assert result.returncode == 1 and "--max_shard_size='lots'" in result.stderr
