"""Where a run's first weights come from (a Hugging Face checkpoint directory, another run's checkpoint, or the
warmed-up base model cached in the workdir), the sampler's copy of them, and what a short run logs."""
import logging
import os

from absl import logging as absl_logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dapo_jax import checkpoint
from dapo_jax import config as config_lib
from dapo_jax import metrics
from dapo_jax import policy
from dapo_jax import sharding
from dapo_jax import train
from dapo_jax import validation
from dapo_jax.data import math_parquet
from dapo_jax.data import synthetic
from dapo_jax.model import qwen2
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.model.config import get_preset
from dapo_jax.rollout import sampler as sampler_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def _short_config(**overrides):
  """The default recipe cut to one or two rollout steps of a few groups, no validation."""
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, "default.py"))
  c.synthetic.num_heldout = 8
  c.data.val_files = ""
  c.data.train_batch_size = c.data.gen_batch_size = 4
  c.rollout.n = 4
  c.actor.ppo_mini_batch_size = 4
  c.rollout.max_num_seqs = 16
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


def test_the_sampler_lays_out_one_compute_dtype_copy_of_the_trainers_params():
  # bfloat16 compute over float32 master weights sharded FSDP x tensor: the sampler's decode weights are made
  # from them in one program, in bfloat16 (half the memory) and tensor parallel only; since every use of a weight
  # casts it to the compute dtype anyway, the tokens and log-probs are those of a bfloat16 copy made beforehand.
  model_config = get_preset("tiny", dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params = qwen2.Qwen2(model_config, rngs=nnx.Rngs(3)).params
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
  model = qwen2.abstract_model(model_config)
  trainer_params = sharding.shard_params(params, sharding.param_shardings(model, mesh))
  sampler = sampler_lib.GroupSampler(model_config, num_slots=4, max_prompt_length=8, max_response_length=12,
                                     mesh=mesh)
  weights = sampler.decode_weights(trainer_params)
  assert {leaf.dtype for leaf in jax.tree.leaves(weights.layers)} <= {jnp.dtype(jnp.bfloat16),
                                                                      jnp.dtype(jnp.float32)}  # norms
  assert weights.layers[0]["qkv_kernel"].dtype == jnp.bfloat16 and weights.head["embed"].dtype == jnp.bfloat16
  assert "fsdp" not in str(weights.layers[0]["qkv_kernel"].sharding.spec)
  assert "tensor" in str(weights.layers[0]["qkv_kernel"].sharding.spec)
  bf16_copy = sharding.reshard(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
                               sharding.param_shardings(model, mesh, sharding.DECODE_RULES))
  prompts = [[5, 6, 7], [1, 2, 3, 4, 9]]
  sampling = sampler_lib.SamplingParams(temperature=1.0, top_p=0.9)
  reference = sampler.sample(bf16_copy, prompts, n=2, seed=1, sampling=sampling)
  ours = sampler.sample(trainer_params, prompts, n=2, seed=1, sampling=sampling)
  for expected, got in zip(reference, ours):
    for a, b in zip(expected.responses, got.responses):
      np.testing.assert_array_equal(a.token_ids, b.token_ids)
      np.testing.assert_array_equal(a.logp_full, b.logp_full)
      np.testing.assert_array_equal(a.logp_sampled, b.logp_sampled)


def _two_epoch_config(hf_checkpoint, train_file, **overrides):
  """Two epochs of a 10-prompt file in rollout steps of 4 prompts: 2 steps an epoch (2 prompts dropped each)."""
  c = _short_config(model__hf_checkpoint=hf_checkpoint, **overrides)
  c.data.train_files = train_file
  c.trainer.total_epochs = 2
  c.trainer.save_freq = 3
  c.trainer.total_training_steps = overrides.get("trainer__total_training_steps")
  return c


def test_total_epochs_end_the_run_and_resume_in_the_second_epoch_is_exact(hf_checkpoint, tmp_path):
  train_file = str(tmp_path / "ten.parquet")
  math_parquet.write_math_parquet(
      [math_parquet.make_math_row(f"What is {i}+1*2?", i + 2, index=i, data_source="synthetic_arith",
                                  prompt_template="{problem}") for i in range(10)], train_file)
  whole = str(tmp_path / "whole")
  train.train(_two_epoch_config(hf_checkpoint, train_file), whole)
  own = checkpoint.Checkpointer(os.path.join(whole, "checkpoints"))
  # 2 epochs x 2 steps: saved at step 3 (save_freq) and at step 4, where the data ended.
  assert own.all_steps() == [3, 4]
  own.close()
  assert [step for step, _ in metrics.read_scalars(whole)["critic/rewards/mean"]] == [1, 2, 3, 4]

  # Stopped after step 3 (the first step of the second epoch), then resumed with no step cap.
  interrupted = str(tmp_path / "interrupted")
  train.train(_two_epoch_config(hf_checkpoint, train_file, trainer__total_training_steps=3), interrupted)
  train.train(_two_epoch_config(hf_checkpoint, train_file), interrupted)
  for a, b in zip(jax.tree.leaves(checkpoint.load_policy(whole).params),
                  jax.tree.leaves(checkpoint.load_policy(interrupted).params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert metrics.read_scalars(interrupted)["critic/rewards/mean"] == metrics.read_scalars(whole)["critic/rewards/mean"]


def test_each_validation_computes_its_metrics_once(hf_checkpoint, tmp_path, monkeypatch):
  calls = []
  reduce = validation.metrics_lib.validation_metrics
  monkeypatch.setattr(validation.metrics_lib, "validation_metrics",
                      lambda *args, **kwargs: calls.append(1) or reduce(*args, **kwargs))
  c = _short_config(model__hf_checkpoint=hf_checkpoint)
  c.data.val_files = "{workdir}/data/heldout.parquet"
  c.rollout.val_kwargs.n = 2
  c.trainer.total_training_steps = 2
  c.trainer.test_freq = 1
  c.trainer.val_before_train = True
  train.train(c, str(tmp_path))
  assert len(calls) == 3  # before training and after each of the 2 steps


def test_a_cached_base_model_from_other_warmup_settings_is_refused(tmp_path):
  c = _short_config(warmup__steps=2, warmup__batch_size=4)
  workdir = str(tmp_path)
  tokenizer = tokenizer_lib.load_tokenizer(policy.prepare_synthetic_task(c, workdir))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  _, made = policy.initial_policy(c, workdir, tokenizer, mesh)
  _, reloaded = policy.initial_policy(c, workdir, tokenizer, mesh)  # same settings: the cache is reused
  for a, b in zip(jax.tree.leaves(made), jax.tree.leaves(reloaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  c.warmup.wrong_order_fraction = 0.25
  with pytest.raises(config_lib.ConfigError,
                     match=r"base_model was warmed up with warmup.wrong_order_fraction=0.7 \(config: 0.25\)"):
    policy.initial_policy(c, workdir, tokenizer, mesh)
  os.remove(os.path.join(workdir, "base_model", policy.WARMUP_SETTINGS_FILE))  # as an older version left it
  with pytest.raises(config_lib.ConfigError, match="cannot be checked against config.warmup"):
    policy.initial_policy(c, workdir, tokenizer, mesh)


@pytest.mark.parametrize("verbosity", [0, 1])
def test_the_console_gets_every_metric_only_when_verbose(hf_checkpoint, tmp_path, caplog, verbosity):
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(verbosity)
  try:
    with caplog.at_level(logging.INFO):
      train.train(_short_config(model__hf_checkpoint=hf_checkpoint), str(tmp_path))
  finally:
    absl_logging.set_verbosity(previous)
  assert "step 1/1: score" in caplog.text  # step_metrics' own line, always
  assert ("Histogram for 'response_length'" in caplog.text) == (verbosity == 1)  # clu's LoggingWriter
  assert "critic/score/mean" in metrics.read_scalars(str(tmp_path))  # TensorBoard files either way
