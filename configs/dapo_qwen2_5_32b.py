"""Full DAPO on Qwen2.5-32B base (AIME 2024 avg@32 = 50): every hyperparameter of DAPO_SPEC.md section 9.

    python -m dapo_jax.train --config configs/dapo_qwen2_5_32b.py --workdir gs://bucket/runs/dapo32b \
        --config.model.hf_checkpoint=/path/to/Qwen2.5-32B
Pass an ablation rung as the config argument (`configs/dapo_qwen2_5_32b.py:grpo`) for the Table 1 ladder.
"""
from dapo_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.train_files = ["~/data/dapo-math-17k.parquet"]
  c.data.val_files = ["~/data/aime-2024.parquet"]
  c.data.train_batch_size = 512
  c.data.gen_batch_size = 1536
  c.data.max_prompt_length = 2048
  c.data.max_response_length = 20480
  c.rollout.n = 16
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.val_kwargs.n = 32
  c.rollout.val_kwargs.top_p = 0.7
  c.actor.ppo_mini_batch_size = 32
  c.actor.micro_batch_tokens = 2 * (2048 + 20480)
  c.actor.loss_agg_mode = "token-mean"
  c.actor.clip_ratio_low, c.actor.clip_ratio_high, c.actor.clip_ratio_c = 0.2, 0.28, 10.0
  c.actor.optim.lr = 1e-6
  c.actor.optim.warmup_steps = 10
  c.actor.optim.weight_decay = 0.1
  c.actor.optim.grad_clip = 1.0
  c.algorithm.filter_groups.enable = True
  c.algorithm.filter_groups.metric = "acc"
  c.algorithm.filter_groups.max_num_gen_batches = 10
  c.reward.overlong_buffer.enable = True
  c.reward.overlong_buffer.len = 4096
  c.reward.overlong_buffer.penalty_factor = 1.0
  c.trainer.save_freq = 5
  c.trainer.test_freq = 5
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  if arg:
    config_lib.apply_ablation(c, arg)
  return c
