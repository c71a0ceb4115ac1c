"""Full DAPO on Qwen2.5-1.5B base on one host (a TPU VM or a GPU box): the 32B recipe's algorithm, with the
batch and response length sized for one host. Needs --config.model.hf_checkpoint=DIR (the base model),
--config.data.train_files=FILE[,FILE...] and --config.data.val_files=FILE[,FILE...]."""
import os

from dapo_jax import config as config_lib


def get_config(arg: str | None = None):
  full = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "dapo_qwen2_5_32b.py"), arg)
  return config_lib.single_host_recipe(full, train_batch_size=128, max_response_length=8192,
                                       ppo_mini_batch_size=16)
