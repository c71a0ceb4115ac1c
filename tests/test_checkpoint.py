"""Checkpoint save/restore of params, optimizer state and loop metadata."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dapo_jax import checkpoint
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.model.config import get_preset
from dapo_jax.rl import step
from tests import tokenizer_fixtures


def test_round_trip_of_params_optimizer_state_and_metadata(tmp_path):
  params = qwen2.Qwen2(get_preset("tiny"), rngs=nnx.Rngs(0)).params
  optimizer = step.make_optimizer(learning_rate=1e-3)
  opt_state = optimizer.init(params)
  grads = jax.tree.map(np.ones_like, params)
  _, opt_state = optimizer.update(grads, opt_state, params)  # non-trivial moments and count
  state = {"params": params, "opt_state": opt_state}
  meta = {"rollout_step": 3, "rng": [0, 7], "data_iterator": {"pos": 96}, "dynamic_sampling": {"next_id": 12}}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2)
  for s in (1, 2, 3):
    ckpt.save(s, state, dict(meta, rollout_step=s))
  ckpt.wait()
  assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]  # only the newest two are kept
  restored, restored_meta = ckpt.restore(3, checkpoint.abstract_like(state))
  ckpt.close()
  assert restored_meta == meta
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A fresh manager over the same directory finds the newest complete step.
  again = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  assert again.latest_step() == 3
  again.close()


def test_incomplete_step_directory_is_not_the_latest(tmp_path):
  params = {"w": np.ones((2, 2), np.float32)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  ckpt.save(1, {"params": params}, {"rollout_step": 1})
  ckpt.wait()
  ckpt.close()
  # What a kill during the second save leaves behind: orbax's temporary directory, never renamed.
  os.makedirs(tmp_path / "c" / "2.orbax-checkpoint-tmp-1234" / "state")
  again = checkpoint.Checkpointer(str(tmp_path / "c"))
  assert again.latest_step() == 1
  again.close()


def test_restoring_only_the_params_item(tmp_path):
  params = {"w": np.arange(4, dtype=np.float32).reshape(2, 2)}
  opt_state = {"mu": np.ones(3, np.float32)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  ckpt.save(5, {"params": params, "opt_state": opt_state}, {"rollout_step": 5})
  ckpt.wait()
  restored, meta = ckpt.restore(5, {"params": checkpoint.abstract_like(params)})
  ckpt.close()
  assert set(restored) == {"params"} and meta == {"rollout_step": 5}
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), params["w"])


def _save_training_checkpoint(workdir, config, params, steps):
  root = str(workdir / "checkpoints")
  checkpoint.write_policy_files(root, config, tokenizer_fixtures.char_tokenizer())
  ckpt = checkpoint.Checkpointer(root)
  for s in steps:
    ckpt.save(s, {"params": jax.tree.map(lambda x: x * s, params), "opt_state": {"count": np.int32(s)}},
              {"rollout_step": s})
  ckpt.wait()
  ckpt.close()
  return root


def test_load_policy_from_a_workdir_its_checkpoints_or_one_step(tmp_path):
  config = get_preset("tiny", vocab_size=64)
  params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params
  root = _save_training_checkpoint(tmp_path, config, params, steps=(1, 2))
  for path, step_scale in ((tmp_path, 2), (root, 2), (os.path.join(root, "1"), 1)):
    policy = checkpoint.load_policy(str(path))
    assert policy.config.hidden_size == config.hidden_size and policy.config.vocab_size == 64
    assert policy.files_dir == os.path.join(root, checkpoint.POLICY_DIR)
    for a, b in zip(jax.tree.leaves(policy.params), jax.tree.leaves(params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b) * step_scale, rtol=1e-6)
  tokenizer = tokenizer_lib.load_tokenizer(policy.files_dir)
  assert tokenizer.eos_ids == tokenizer_fixtures.char_tokenizer().eos_ids
  # Stored in float32, loaded into bfloat16 storage on request.
  policy = checkpoint.load_policy(root, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(policy.params))


def test_load_policy_from_a_hugging_face_directory(tmp_path):
  config = get_preset("tiny", vocab_size=64)
  params = qwen2.Qwen2(config, rngs=nnx.Rngs(1)).params
  hf_io.save_hf_checkpoint(params, config, tmp_path / "hf")
  policy = checkpoint.load_policy(str(tmp_path / "hf"))
  assert policy.files_dir == str(tmp_path / "hf")
  for a, b in zip(jax.tree.leaves(policy.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_policy_names_what_it_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    checkpoint.load_policy(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="not a checkpoint.*Hugging Face directory"):
    checkpoint.load_policy(str(tmp_path))
  os.makedirs(tmp_path / "checkpoints" / checkpoint.POLICY_DIR)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint step"):
    checkpoint.load_policy(str(tmp_path))
