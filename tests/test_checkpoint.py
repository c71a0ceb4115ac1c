"""Checkpoint save/restore of params, optimizer state and loop metadata."""
import os

import jax
import numpy as np
from flax import nnx

from dapo_jax import checkpoint
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rl import step


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
  ckpt.save(1, params, {"rollout_step": 1})
  ckpt.wait()
  ckpt.close()
  # What a kill during the second save leaves behind: orbax's temporary directory, never renamed.
  os.makedirs(tmp_path / "c" / "2.orbax-checkpoint-tmp-1234" / "state")
  again = checkpoint.Checkpointer(str(tmp_path / "c"))
  assert again.latest_step() == 1
  again.close()
