"""Early DAPO on Qwen2.5-32B base (AIME 2024 avg@32 = 44): full DAPO but sequence-level loss
(seq-mean-token-mean), no dynamic sampling, generation batch = train batch (docs/algorithm.md section 9).

Mesh, micro-batch budget and decode slots are the full recipe's, and so is the memory plan (scripts/plan_memory.py
gives the same per-chip peaks: the loss mode changes no buffer size)."""
import os

from dapo_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "dapo_qwen2_5_32b.py"))
  c.actor.loss_agg_mode = "seq-mean-token-mean"
  c.algorithm.filter_groups.enable = False
  c.data.gen_batch_size = 512
  return c
