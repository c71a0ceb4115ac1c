"""The embedded default: DAPO on a tiny Qwen2-shaped model and a synthetic arithmetic task, on a 2-core CPU.

Task: "What is a + b * c?" (a in 10..99, b and c in 2..9), responses `b*c=p`, `a+p=s`, `Answer: s`, scored by
math_dapo. The base model is made by a short supervised warm-up in which 70% of the reference solutions use
the wrong order of operations while the reward checks the true a + b * c, so the base does its arithmetic well
but only sometimes reasons in the right order, and RL has a real behaviour to reinforce (docs/algorithm.md
section 12 has the measurements these settings come from). `python -m dapo_jax.train` with no flags runs it in
./runs/default.

The argument selects a rung of the Table 1 ladder (`--config configs/default.py:grpo`).
"""
import ml_collections

from dapo_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  # Data: written into the workdir by dapo_jax.data.synthetic when the files are absent.
  c.data.train_files = "{workdir}/data/train.parquet"
  c.data.val_files = "{workdir}/data/heldout.parquet"
  c.data.train_batch_size = 32
  c.data.gen_batch_size = 32
  c.data.max_prompt_length = 32
  # Well-formed answers take at most 31 tokens (EOS included): with an 8-token overlong buffer the soft penalty
  # starts at 32, so it acts only on responses that run on towards truncation, as in DAPO (20,480 / 4,096).
  c.data.max_response_length = 40
  c.rollout.n = 8
  c.rollout.max_num_seqs = 256
  c.rollout.decode_steps_per_call = 8
  c.rollout.val_kwargs.n = 4
  c.rollout.val_kwargs.temperature = 1.0
  c.rollout.val_kwargs.top_p = 1.0
  c.actor.ppo_mini_batch_size = 16  # 128 trajectories per update, 2 updates per rollout step
  c.actor.micro_batch_tokens = 128 * (32 + 40)  # a whole mini-batch at the longest widths
  c.actor.logits_chunk_size = 0
  c.actor.optim.lr = 1e-4
  c.actor.optim.warmup_steps = 0
  c.actor.optim.b2 = 0.99
  c.actor.optim.weight_decay = 0.01
  c.algorithm.filter_groups.max_num_gen_batches = 0
  c.reward.overlong_buffer.len = 8
  c.reward.num_workers = 0  # math_dapo on a ~30-character response is microseconds: score in-process
  c.trainer.total_training_steps = 200
  c.trainer.save_freq = 20
  c.trainer.test_freq = 10
  c.model.preset = "tiny-demo"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.remat = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1

  # The synthetic task and the supervised warm-up that makes the base model (cached in the workdir).
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.seed = 0
  c.synthetic.num_heldout = 200
  c.synthetic.train_repeats = 4
  c.warmup = ml_collections.ConfigDict()
  c.warmup.steps = 900
  c.warmup.batch_size = 64
  c.warmup.lr = 1e-3
  c.warmup.wrong_order_fraction = 0.7
  if arg:
    config_lib.apply_ablation(c, arg)
  return c
