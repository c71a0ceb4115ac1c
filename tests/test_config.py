"""Shipped configs validate, the Table 1 ladder sets what it says, and bad values name their key."""
import glob
import os

import pytest

from dapo_jax import config as config_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
RECIPE_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "dapo_*.py")))


@pytest.mark.parametrize("path", RECIPE_FILES, ids=os.path.basename)
def test_shipped_recipes_validate_once_a_checkpoint_is_given(path):
  c = config_lib.load_config_file(path)
  with pytest.raises(config_lib.ConfigError, match="config.model.hf_checkpoint"):
    config_lib.validate(c)  # the base model is the user's to name
  c.model.hf_checkpoint = "/models/Qwen2.5"
  config_lib.validate(c)


def test_full_and_early_dapo_recipes_match_the_spec():
  full = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_qwen2_5_32b.py"))
  assert (full.data.train_batch_size, full.rollout.n, full.actor.ppo_mini_batch_size) == (512, 16, 32)
  assert (full.data.gen_batch_size, full.algorithm.filter_groups.max_num_gen_batches) == (1536, 10)
  assert (full.data.max_prompt_length, full.data.max_response_length) == (2048, 20480)
  assert (full.reward.overlong_buffer.len, full.reward.overlong_buffer.penalty_factor) == (4096, 1.0)
  assert (full.actor.clip_ratio_low, full.actor.clip_ratio_high, full.actor.clip_ratio_c) == (0.2, 0.28, 10.0)
  assert (full.actor.optim.lr, full.actor.optim.warmup_steps, full.actor.optim.weight_decay) == (1e-6, 10, 0.1)
  assert full.actor.loss_agg_mode == "token-mean" and full.algorithm.filter_groups.enable
  assert (full.rollout.val_kwargs.n, full.rollout.val_kwargs.top_p, full.trainer.save_freq) == (32, 0.7, 5)
  early = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_early_qwen2_5_32b.py"))
  assert early.actor.loss_agg_mode == "seq-mean-token-mean"
  assert not early.algorithm.filter_groups.enable and early.data.gen_batch_size == 512


@pytest.mark.parametrize("rung, clip_high, overlong_filter, soft_overlong, agg_mode, dynamic", [
    ("grpo", 0.2, False, False, "seq-mean-token-mean", False),
    ("overlong_filter", 0.2, True, False, "seq-mean-token-mean", False),
    ("clip_higher", 0.28, True, False, "seq-mean-token-mean", False),
    ("soft_overlong", 0.28, False, True, "seq-mean-token-mean", False),
    ("token_level", 0.28, False, True, "token-mean", False),
    ("dapo", 0.28, False, True, "token-mean", True),
])
def test_ablation_ladder(rung, clip_high, overlong_filter, soft_overlong, agg_mode, dynamic):
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_qwen2_5_32b.py"), rung)
  assert (c.actor.clip_ratio_low, c.actor.clip_ratio_high) == (0.2, clip_high)
  assert c.reward.overlong_filter == overlong_filter
  assert c.reward.overlong_buffer.enable == soft_overlong
  assert c.actor.loss_agg_mode == agg_mode
  assert c.algorithm.filter_groups.enable == dynamic


def _valid():
  c = config_lib.base_config()
  c.model.hf_checkpoint = "/models/x"
  return c


@pytest.mark.parametrize("edit, key", [
    (lambda c: setattr(c.actor, "ppo_mini_batch_size", 30), "config.actor.ppo_mini_batch_size"),
    (lambda c: setattr(c.data, "gen_batch_size", 100), "config.data.gen_batch_size"),
    (lambda c: setattr(c.actor, "loss_agg_mode", "token-sum"), "config.actor.loss_agg_mode"),
    (lambda c: setattr(c.actor, "clip_ratio_c", 1.0), "config.actor.clip_ratio_c"),
    (lambda c: setattr(c.reward.overlong_buffer, "len", 30000), "config.reward.overlong_buffer.len"),
    (lambda c: setattr(c.algorithm.filter_groups, "metric", "seq_reward"), "config.algorithm.filter_groups.metric"),
    (lambda c: setattr(c.data, "truncation", "right"), "config.data.truncation"),
    (lambda c: setattr(c.actor, "micro_batch_tokens", 1000), "config.actor.micro_batch_tokens"),
    (lambda c: setattr(c.model, "hf_checkpoint", None), "config.model.hf_checkpoint"),
])
def test_inconsistent_values_name_the_key(edit, key):
  c = _valid()
  config_lib.validate(c)
  edit(c)
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c)


@pytest.mark.parametrize("edit, key", [
    (lambda c: setattr(c.distributed, "initialize", "sometimes"), "config.distributed.initialize"),
    (lambda c: setattr(c.distributed, "coordinator_address", "10.0.0.1"), "config.distributed.coordinator_address"),
    (lambda c: setattr(c.distributed, "num_processes", 0), "config.distributed.num_processes"),
    (lambda c: (setattr(c.distributed, "num_processes", 2), setattr(c.distributed, "process_id", 2)),
     "config.distributed.process_id"),
])
def test_distributed_section_names_the_key(edit, key):
  c = _valid()
  c.distributed.coordinator_address = "10.0.0.1:1234"
  c.distributed.num_processes, c.distributed.process_id = 4, 3
  config_lib.validate(c)
  edit(c)
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c)


@pytest.mark.parametrize("processes, key", [(3, "config.data.train_batch_size"),
                                            (64, "config.actor.ppo_mini_batch_size")])
def test_batches_must_divide_between_the_processes(processes, key):
  c = _valid()  # 512 / 1536 / 32: any power of two up to 32 processes
  config_lib.validate(c, num_processes=32)
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.") + r".*divisible by the \d+ processes"):
    config_lib.validate(c, num_processes=processes)


def test_unknown_keys_are_refused_with_a_suggestion():
  c = _valid()
  c.unlock()
  c.actor.clip_ratio_hgh = 0.3
  with pytest.raises(config_lib.ConfigError, match=r"config\.actor\.clip_ratio_hgh: unknown key"):
    config_lib.validate(c)
  c = _valid()
  c.unlock()
  c.trainer.lr = 1e-6
  with pytest.raises(config_lib.ConfigError, match=r"did you mean actor\.optim\.lr"):
    config_lib.validate(c)


def test_unknown_ablation_rung():
  with pytest.raises(config_lib.ConfigError, match="unknown ablation rung 'dynamic'"):
    config_lib.apply_ablation(config_lib.base_config(), "dynamic")


def test_single_host_variant_sizes():
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_qwen2_5_7b.py"))
  assert (c.data.train_batch_size, c.data.gen_batch_size, c.actor.ppo_mini_batch_size) == (256, 768, 32)
  assert (c.data.max_response_length, c.reward.overlong_buffer.len) == (16384, 3276)
  assert c.actor.micro_batch_tokens == 2 * (2048 + 16384)
  assert c.actor.clip_ratio_high == 0.28 and c.algorithm.filter_groups.enable  # the algorithm is full DAPO


@pytest.mark.parametrize("name", ["dapo_qwen2_5_0_5b.py", "dapo_qwen2_5_1_5b.py", "dapo_qwen2_5_7b.py"])
def test_single_host_recipes_do_not_inherit_the_pod_slice_layout(name):
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, name))
  base = config_lib.base_config()
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (base.mesh.data, base.mesh.fsdp, base.mesh.tensor)
  assert c.rollout.max_concurrent_decodes == base.rollout.max_concurrent_decodes
