"""Full DAPO on qwen2.5-0.5b base on a single host (one TPU VM or GPU box): the 32B recipe's algorithm with a
batch and response length sized for one host. Needs --config.model.hf_checkpoint=DIR (the base model)."""
import os

from dapo_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "dapo_qwen2_5_32b.py"), arg)
  c.data.train_batch_size = 64
  c.data.gen_batch_size = 3 * 64
  c.data.max_response_length = 8192
  c.reward.overlong_buffer.len = 8192 // 5
  c.actor.ppo_mini_batch_size = 16
  c.actor.micro_batch_tokens = 2 * (2048 + 8192)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c
