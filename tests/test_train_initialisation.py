"""Where a run's first weights come from: a Hugging Face checkpoint directory, or another run's checkpoint."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from dapo_jax import checkpoint
from dapo_jax import config as config_lib
from dapo_jax import train
from dapo_jax.data import synthetic
from dapo_jax.model import tokenizer as tokenizer_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def _short_config(**overrides):
  """The default recipe cut to one or two rollout steps of a few groups, no validation."""
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, "default.py"))
  c.synthetic.num_heldout = 8
  c.data.val_files = []
  c.data.train_batch_size = c.data.gen_batch_size = 4
  c.rollout.n = 4
  c.actor.ppo_mini_batch_size = 4
  c.rollout.max_concurrent_decodes = 16
  c.algorithm.filter_groups.enable = False  # a random model solves nothing: keep every group
  c.trainer.total_training_steps = 1
  c.trainer.save_freq = 1
  c.trainer.val_before_train = False
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  """A random-weight transformers Qwen2 saved with save_pretrained, with the task's tokenizer beside it."""
  directory = tmp_path_factory.mktemp("hf_qwen2")
  tokenizer = synthetic.write_char_tokenizer(directory)
  torch.manual_seed(0)
  config = transformers.Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, tie_word_embeddings=True)
  transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
  return str(directory)


def test_weights_come_from_the_hf_checkpoint(hf_checkpoint, tmp_path):
  # lr 0: the step's update changes nothing, so the saved params are exactly the weights the run started from.
  c = _short_config(model__hf_checkpoint=hf_checkpoint)
  c.actor.optim.lr = 0.0
  train.train(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "base_model")  # no warm-up when weights are given
  trained = checkpoint.load_policy(str(tmp_path))
  original = checkpoint.load_policy(hf_checkpoint)
  assert trained.config.hidden_size == 32 and trained.config.num_layers == 2
  for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(original.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The checkpoint keeps the HF directory's tokenizer beside it.
  assert tokenizer_lib.load_tokenizer(trained.files_dir).vocab_size == tokenizer_lib.load_tokenizer(
      hf_checkpoint).vocab_size


def test_resume_from_seeds_a_fresh_workdir(hf_checkpoint, tmp_path):
  first = str(tmp_path / "first")
  train.train(_short_config(model__hf_checkpoint=hf_checkpoint), first)
  second = str(tmp_path / "second")
  c = _short_config(model__hf_checkpoint=hf_checkpoint, trainer__resume_from=os.path.join(first, "checkpoints"))
  c.trainer.total_training_steps = 2
  train.train(c, second)
  own = checkpoint.Checkpointer(os.path.join(second, "checkpoints"))
  assert own.all_steps() == [2]  # it started from the first run's step 1 and saved only its own step
  own.close()
  from_first = checkpoint.load_policy(first).params
  from_second = checkpoint.load_policy(second).params
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(from_first), jax.tree.leaves(from_second)))
