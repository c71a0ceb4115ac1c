"""Full DAPO on Qwen2.5-32B base (AIME 2024 avg@32 = 50): every hyperparameter of DAPO_SPEC.md section 9.

    python -m dapo_jax.train --config configs/dapo_qwen2_5_32b.py --workdir /mnt/shared/runs/dapo32b \
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
  # Sized for a v5p-256 slice (v5p:4x4x8, 128 chips) with scripts/plan_memory.py (README, "Memory plan"): one
  # full-length row (2048 + 20480 tokens, padded to the 2048 + 32768 length buckets) per data-parallel shard,
  # data x fsdp = 16 here. Two rows per shard do not fit (the gradients need 142.3 GiB a chip); scale the budget
  # with data x fsdp on another slice.
  c.actor.micro_batch_tokens = 16 * (2048 + 32768)
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
  # Planned on v5p:4x4x8 (95.74 GiB usable a chip; README, "Memory plan"): peak 87.4 GiB a chip, in the rollout's
  # prefill (the sampler's float32 copy of the params, tensor parallel over a host's 4 chips, 30.5 GiB; its
  # bfloat16 decode weights 15.6 GiB; the KV caches of 16 slots 22.0 GiB; the trainer's share of params and
  # optimizer state 2.9 GiB). The update peaks at 63.2 GiB (micro-batch gradients). A tensor axis of 8 (40 heads,
  # 8 KV heads) is what fits the gradients: with tensor = 1 they need 764.6 GiB, with 4 (v5p:4x4x4, whose 4x4x4
  # torus cannot hold a tensor axis of 8) 96.6 GiB. Not yet runnable on several hosts: sharding.put_micro_batches
  # needs each host to hold its own blocks of batch rows, and jax lays this tensor axis across two 2x2-chip hosts
  # (the planner flags it). A host-local tensor axis of 4 fits once collate caps its widths at the longest
  # prompt and response (2048 + 20480): v5p:4x4x4 then peaks at 90.2 GiB (README, "Memory plan").
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 8
  # Per host (each host samples on its own chips); 16 is one group of rollout.n, the least validate() accepts.
  c.rollout.max_concurrent_decodes = 16
  # One decode step per device call: a call that scans several steps holds another ~1.4x of the KV caches in
  # temporaries (16 slots: 31.6 GiB, which makes the rollout need 102.5 GiB a chip).
  c.rollout.decode_steps_per_call = 1
  if arg:
    config_lib.apply_ablation(c, arg)
  return c
