"""A rollout step's batch metrics over every process's groups (docs/algorithm.md section 10).

Each process summarises its own share of the batch (`ProcessStatistics`); `gather` brings every process's share
to every process (with one process, the share itself); `step_metrics` reduces them.
"""
import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from dapo_jax import distributed


@dataclasses.dataclass(frozen=True)
class ProcessStatistics:
  """One process's share of a rollout step's batch: per-response values and counts.

  Attributes:
    scores, rewards, advantages: float [responses]: unshaped scores, shaped rewards, advantages.
    response_lengths, prompt_lengths: int [responses].
    overlong_masked: responses overlong filtering masked out of the loss.
    timeouts: responses whose scoring timed out this step.
    selection: dynamic sampling's metrics (`rl.filtering.SelectedBatch.metrics`).
    preemptions: responses the sampler preempted this step (its KV pool ran dry).
    kv_pool_utilization: the mean share of the sampler's KV pool held during its decode calls.
  """
  scores: np.ndarray
  rewards: np.ndarray
  advantages: np.ndarray
  response_lengths: np.ndarray
  prompt_lengths: np.ndarray
  overlong_masked: int
  timeouts: int
  selection: dict[str, float]
  preemptions: int = 0
  kv_pool_utilization: float = 0.0

  def to_json(self) -> dict[str, Any]:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> "ProcessStatistics":
    arrays = {"scores": np.float64, "rewards": np.float64, "advantages": np.float64, "response_lengths": np.int64,
              "prompt_lengths": np.int64}
    return cls(**{**value, **{k: np.asarray(value[k], dtype) for k, dtype in arrays.items()}})


def gather(statistics: ProcessStatistics) -> list[ProcessStatistics]:
  """Every process's statistics, in process order (a collective with several processes)."""
  if jax.process_count() == 1:
    return [statistics]
  return [ProcessStatistics.from_json(v) for v in distributed.allgather_json(statistics.to_json())]


def _summary(name: str, values) -> dict[str, float]:
  values = np.asarray(values, np.float64)
  return {f"{name}/mean": float(values.mean()), f"{name}/max": float(values.max()), f"{name}/min": float(values.min())}


def step_metrics(per_process: list[ProcessStatistics], *, max_prompt_length: int, max_response_length: int
                 ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """The step's batch metrics over every process's groups (in process order), every response length, and every
  trajectory's length (prompt + response tokens).

  verl's names with verl's meanings: `critic/score` and `critic/rewards` are the shaped sequence scores (score
  plus overlong penalty); `critic/advantages` are over valid response tokens (a response's advantage counts once
  per token); `response_length/clip_ratio` and `prompt_length/clip_ratio` are the shares at the configured
  maximum. Ours: `train/unshaped_score` (the reward function's score alone). Of the dynamic-sampling metrics,
  group counts add up; `train/num_gen_batches` is the mean over processes (the prompts drawn /
  data.gen_batch_size); `train/raw_acc` is the mean over every finished group, each process's weighted by its
  share of them. `global_seqlen/*` are over the processes' token totals (verl's per data-parallel rank). With one
  process every value is its own.
  """
  def joined(key, dtype=np.float64):
    return np.concatenate([np.asarray(getattr(p, key), dtype) for p in per_process])

  response_lengths, prompt_lengths = joined("response_lengths", np.int64), joined("prompt_lengths", np.int64)
  out = {}
  out.update(_summary("critic/score", joined("rewards")))
  out.update(_summary("critic/rewards", joined("rewards")))
  out.update(_summary("train/unshaped_score", joined("scores")))
  advantages, valid = joined("advantages"), response_lengths > 0
  out["critic/advantages/mean"] = float((advantages * response_lengths).sum() / response_lengths.sum())
  out["critic/advantages/max"] = float(advantages[valid].max())
  out["critic/advantages/min"] = float(advantages[valid].min())
  out.update(_summary("response_length", response_lengths))
  out["response_length/clip_ratio"] = float((response_lengths == max_response_length).mean())
  out.update(_summary("prompt_length", prompt_lengths))
  out["prompt_length/clip_ratio"] = float((prompt_lengths == max_prompt_length).mean())
  selections = [p.selection for p in per_process]
  finished = [s["train/kept_groups"] + s["train/dropped_groups"] for s in selections]
  for name in selections[0]:
    if name == "train/raw_acc":
      out[name] = (float(sum(s[name] * (f / sum(finished)) for s, f in zip(selections, finished) if f))
                   if sum(finished) else float("nan"))
    elif name == "train/num_gen_batches":
      out[name] = float(sum(s[name] for s in selections) / len(selections))
    else:
      out[name] = float(sum(s[name] for s in selections))
  out["train/overlong_masked"] = float(sum(p.overlong_masked for p in per_process))
  out["reward/timeouts"] = float(sum(p.timeouts for p in per_process))
  out["rollout/preemptions"] = float(sum(p.preemptions for p in per_process))
  out["rollout/kv_pool_utilization"] = float(np.mean([p.kv_pool_utilization for p in per_process]))
  # verl's global_seqlen/*: the tokens (prompt + response) each data-parallel rank trains on; here a rank is a
  # process (its rows split evenly over its devices), and no rebalancing follows (docs/algorithm.md section 6).
  tokens = [int(p.prompt_lengths.sum() + p.response_lengths.sum()) for p in per_process]
  out.update({"global_seqlen/min": float(min(tokens)), "global_seqlen/max": float(max(tokens)),
              "global_seqlen/minmax_diff": float(max(tokens) - min(tokens)),
              "global_seqlen/mean": float(np.mean(tokens))})
  return out, response_lengths, prompt_lengths + response_lengths


def perf_metrics(num_tokens: int, step_seconds: float, num_devices: int) -> dict[str, float]:
  """verl's `perf/throughput`: the step's prompt and response tokens per second per device."""
  return {"perf/time_per_step": step_seconds, "perf/throughput": num_tokens / step_seconds / num_devices}


def log_progress(step: int, total_steps: int | None, out: dict[str, float], *, steps_timed: int,
                 seconds_timed: float) -> None:
  """One progress line for a finished rollout step; the ETA (with a step cap) comes from the steps after the
  first (`steps_timed` of them in `seconds_timed`), whose time includes compiling."""
  eta = (f", ETA {seconds_timed / steps_timed * (total_steps - step):.0f} s"
         if total_steps is not None and steps_timed > 0 else "")
  kept, dropped = int(out.get("train/kept_groups", 0)), int(out.get("train/dropped_groups", 0))
  logging.info("step %d%s: score %.3f raw_acc %.3f kept %d/%d gen_batches %d entropy %.3f  %.2f s/step%s", step,
               f"/{total_steps}" if total_steps is not None else "", out["critic/score/mean"],
               out.get("train/raw_acc", float("nan")), kept, kept + dropped,
               int(out.get("train/num_gen_batches", 0)), out["actor/entropy"], out["timing_s/step"], eta)


# Published dense bf16 peak FLOP/s of one device (TPU chip or GPU), matched against `device_kind` in order.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The published peak of one device of this kind (TPU v4/v5e/v5p/v6e, H100/H200/A100); None otherwise (CPU)."""
  return next((peak for name, peak in PEAK_FLOPS if name.lower() in device_kind.lower()), None)


def actor_flops(model_config, lengths) -> float:
  """Model FLOPs of one update pass (forward + backward) over trajectories of `lengths` real tokens (prompt +
  response), verl's estimate: 6 x the matmul weights (LM head included) per token, plus attention per
  trajectory, 12 x L_i^2 x head_dim x heads x layers."""
  mc = model_config
  q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
  matmul = mc.num_layers * (mc.hidden_size * (2 * q + 2 * kv) + 3 * mc.hidden_size * mc.intermediate_size)
  matmul += mc.hidden_size * mc.vocab_size
  lengths = np.asarray(lengths, np.float64)
  return float(6 * matmul * lengths.sum()
               + 12 * (lengths ** 2).sum() * mc.head_dim * mc.num_heads * mc.num_layers)


def mfu_metrics(flops: float, seconds: float, device_kind: str, num_devices: int) -> dict[str, float]:
  """`perf/mfu/actor`: `flops` (every process's, `actor_flops` x ppo_epochs) in `seconds` over the devices'
  published peak; none where the peak is unknown (CPU)."""
  peak = peak_flops(device_kind)
  if peak is None or seconds <= 0:
    return {}
  return {"perf/mfu/actor": flops / seconds / (peak * num_devices)}
