"""A rollout step's batch metrics, reduced over the processes' shares, by hand."""
import numpy as np

from dapo_jax import step_metrics


def _process_share(scores, response_lengths, prompt_lengths, advantages, selection, overlong_masked=0, timeouts=0):
  return step_metrics.ProcessStatistics(
      scores=np.array(scores), rewards=np.array(scores) - 0.25, advantages=np.array(advantages),
      response_lengths=np.array(response_lengths), prompt_lengths=np.array(prompt_lengths),
      overlong_masked=overlong_masked, timeouts=timeouts, selection=selection)


def _selection(gen_batches, kept, dropped, unfinished, raw_acc):
  return {"train/num_gen_batches": gen_batches, "train/kept_groups": kept, "train/dropped_groups": dropped,
          "train/surplus_groups": 0.0, "train/carried_groups": 0.0, "train/unfinished_groups": unfinished,
          "train/raw_acc": raw_acc}


def test_step_metrics_of_two_processes_by_hand():
  first = _process_share([1.0, -1.0], [3, 9], [4, 4], [1.0, -1.0], _selection(1.0, 2.0, 0.0, 1.0, 0.25),
                         overlong_masked=1)
  second = _process_share([1.0, 1.0], [9, 9], [6, 6], [0.5, 0.5], _selection(2.0, 3.0, 3.0, 0.0, 0.5),
                          timeouts=2)
  lengths = dict(max_prompt_length=6, max_response_length=9)
  out, response_lengths, trajectory_lengths = step_metrics.step_metrics([first, second], **lengths)
  np.testing.assert_array_equal(response_lengths, [3, 9, 9, 9])
  np.testing.assert_array_equal(trajectory_lengths, [3 + 4, 9 + 4, 9 + 6, 9 + 6])
  assert (out["response_length/mean"], out["response_length/max"], out["response_length/min"]) == (7.5, 9.0, 3.0)
  assert out["response_length/clip_ratio"] == 0.75 and out["prompt_length/mean"] == 5.0
  assert out["prompt_length/clip_ratio"] == 0.5  # the two prompts of 6 tokens, the maximum
  # critic/score is the shaped score (verl's meaning); the reward function's own is train/unshaped_score.
  assert out["critic/score/mean"] == 0.25 and out["critic/score/min"] == -1.25
  assert out["critic/score/mean"] == out["critic/rewards/mean"]
  assert out["train/unshaped_score/mean"] == 0.5 and out["train/unshaped_score/min"] == -1.0
  # Advantages over valid tokens: (1 * 3 - 1 * 9 + 0.5 * 9 + 0.5 * 9) / 30 tokens.
  assert out["critic/advantages/mean"] == 0.1
  assert (out["critic/advantages/max"], out["critic/advantages/min"]) == (1.0, -1.0)
  assert (out["train/kept_groups"], out["train/dropped_groups"], out["train/unfinished_groups"]) == (5.0, 3.0, 1.0)
  assert out["train/num_gen_batches"] == 1.5  # prompts drawn / data.gen_batch_size
  assert out["train/raw_acc"] == (0.25 * 2 + 0.5 * 6) / 8  # over the 8 finished groups
  assert (out["train/overlong_masked"], out["reward/timeouts"]) == (1.0, 2.0)
  # Tokens per process (verl's global_seqlen per rank): 3 + 9 + 4 + 4 = 20 and 9 + 9 + 6 + 6 = 30.
  assert (out["global_seqlen/min"], out["global_seqlen/max"], out["global_seqlen/minmax_diff"],
          out["global_seqlen/mean"]) == (20.0, 30.0, 10.0, 25.0)
  # One process: its own values, exactly.
  alone, _, _ = step_metrics.step_metrics([second], **lengths)
  assert alone["train/raw_acc"] == 0.5 and alone["train/num_gen_batches"] == 2.0
  assert alone["global_seqlen/min"] == alone["global_seqlen/max"] == 30.0 and alone["global_seqlen/minmax_diff"] == 0


def test_throughput_is_per_device():
  # 1000 prompt and response tokens in 2 s on 4 devices: 125 tokens/s a device (verl's perf/throughput).
  assert step_metrics.perf_metrics(1000, 2.0, 4) == {"perf/time_per_step": 2.0, "perf/throughput": 125.0}


def test_mfu_over_the_published_peak_and_none_on_cpu():
  from dapo_jax.model.config import get_preset
  assert step_metrics.peak_flops("TPU v5 lite") == 197e12 and step_metrics.peak_flops("TPU v5p") == 459e12
  assert step_metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and step_metrics.peak_flops("cpu") is None
  mc = get_preset("tiny-demo")
  # Per layer: q and o 128 x 128, k and v 128 x 64 (2 KV heads of 32), MLP 3 x 128 x 384; 4 layers; head 128 x 32.
  matmul = 4 * (128 * (2 * 128 + 2 * 64) + 3 * 128 * 384) + 128 * 32
  expected = 6 * matmul * (3 + 5) + 12 * (9 + 25) * 32 * 4 * 4
  assert step_metrics.actor_flops(mc, [3, 5]) == expected
  assert step_metrics.mfu_metrics(2e12, 1.0, "TPU v4", 4) == {"perf/mfu/actor": 2e12 / (4 * 275e12)}
  assert step_metrics.mfu_metrics(2e12, 1.0, "cpu", 4) == {}
