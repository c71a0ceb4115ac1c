"""Full DAPO on Qwen2.5-32B base (AIME 2024 avg@32 = 50): every hyperparameter of docs/algorithm.md section 9.

    python -m dapo_jax.train --config configs/dapo_qwen2_5_32b.py --workdir /mnt/shared/runs/dapo32b \
        --config.model.hf_checkpoint=/path/to/Qwen2.5-32B \
        --config.data.train_files=/path/to/dapo-math-17k.parquet --config.data.val_files=/path/to/aime-2024.parquet
The model and the data files are required (no default: they live wherever your machine keeps them); several
files are comma-separated. Pass an ablation rung as the config argument (`configs/dapo_qwen2_5_32b.py:grpo`)
for the Table 1 ladder.
"""
from dapo_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()  # data.train_files, data.val_files and model.hf_checkpoint stay required
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
  # Per host (train.py packs each host's share of a mini-batch into micro-batches of this many tokens): four
  # full-length trajectories of 2048 + 20480 tokens, the largest budget whose update fits v5p-64 in the memory
  # plan (scripts/plan_memory.py; README, "Memory plan of the 32B recipe"), with splash attention and remat.
  c.actor.micro_batch_tokens = 4 * (2048 + 20480)
  # The old-log-prob pass (forward only, no activations kept for a backward pass): 32 full-length trajectories per
  # host per call, half a host's share of a mini-batch; the same memory plan fits it.
  c.rollout.log_prob_micro_batch_tokens = 32 * (2048 + 20480)
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
  # Tensor parallel over a v5p host's 4 chips, FSDP over the hosts: make_mesh keeps each tensor group in one
  # host, so each host feeds its own rows (a tensor axis of 8 would span two hosts and is refused). This mesh,
  # the budget above and the rollout settings below fit a v5p chip's HBM on v5p-64, -128 and -256:
  # `scripts/plan_memory.py` reports the figures (README, "Memory plan of the 32B recipe").
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 4
  # Per host (each host samples on its own chips): eight groups of rollout.n. Decode reads every weight once per
  # step whatever the number of slots, so more slots is more tokens per weight read, up to what the KV pool
  # below holds at once at the mean response length the plan assumes (`scripts/plan_memory.py
  # --mean_response_length`, its concurrent_sequences_per_host); beyond that, slots would wait for pages.
  c.rollout.max_num_seqs = 128
  # Pages of the KV pool: JAX's TPU paged-attention kernel fetches a page at a time and holds every page table
  # of a call in scalar memory, so large pages make fewer, larger fetches and a small table; a response wastes
  # at most its last page.
  c.rollout.page_size = 128
  # The pool's share of each chip's free memory at start (beside the trainer's params and optimizer state, after
  # the rollout's decode weights; it is freed before the update): every slot at the planned mean response
  # length with room to spare for the long tail of longer responses, while the rollout's peak stays below the
  # update's on v5p-64.
  c.rollout.gpu_memory_utilization = 0.7
  # Two decode steps per device call, the host looking at the tokens between calls. `decoding.decode_steps`
  # unrolls so few steps: a scanned call holds temporaries as large as the KV pool, which the chip has no room
  # for.
  c.rollout.decode_steps_per_call = 2
  if arg:
    config_lib.apply_ablation(c, arg)
  return c
