"""scripts/bench_rollout.py: the machine's limit by hand, one tiny side-by-side run printing its JSON, the
long-tailed lengths, and one tiny run of the long-tailed scenario.

The script defines absl flags (`--output` among them, as evaluate.py and export_hf.py do), so it is imported only
in child processes: in the test process its flags would collide with theirs.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_rollout.py")


def _in_child(expression: str, cases: list[dict]) -> list:
  """[expression for case in cases] (JSON-able), evaluated with bench_rollout imported, in one child process."""
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_rollout; "
          f"print(json.dumps([{expression} for case in json.loads(sys.argv[2])]))")
  result = subprocess.run([sys.executable, "-c", code, os.path.dirname(SCRIPT), json.dumps(cases)], check=True,
                          capture_output=True, text=True, timeout=300)
  return json.loads(result.stdout.splitlines()[-1])


def _seconds_at_the_limit(cases: list[dict]) -> list[float]:
  """bench_rollout.seconds_at_the_limit(**case) for each case, in one child process."""
  return _in_child("bench_rollout.seconds_at_the_limit(**case)", cases)


def test_seconds_at_the_limit_by_hand():
  # hidden 8, intermediate 16, vocab 32, 1 layer, 2 heads of 4, 1 KV head. Layer weights: q and o 8*8 each, k and
  # v 8*4 each, gate, up and down 8*16 each: 576; LM head 256. At 1 GB/s and 1 GFLOP/s, batch 2, 4-token prompts
  # and 2 new tokens:
  #   prefill: 2 prompts * (4 tokens * (2 * 576 + attention 4 * 2 heads * 4 * 2 mean context) + 2 * 256 head)
  #            = 2 * (4 * (1152 + 64) + 512) = 10752 flops;
  #   a step: flops 2 * (2 * 832 + 4 * 2 * 4 * 5 context) = 3648, more than streaming 4 * 832 = 3328 bytes.
  # At 0.5 GB/s a step is bound by streaming the weights instead: 6656 ns.
  config = dict(hidden_size=8, intermediate_size=16, vocab_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)
  case = dict(hf_config=config, batch=2, prompt_length=4, new_tokens=2, peak_gflops=1.0)
  seconds, slow_memory = _seconds_at_the_limit([dict(case, bandwidth_gbs=1.0), dict(case, bandwidth_gbs=0.5)])
  assert seconds == pytest.approx((10752 + 2 * 3648) * 1e-9)
  assert slow_memory == pytest.approx((10752 + 2 * 6656) * 1e-9)


def test_a_tiny_run_prints_both_figures_their_ratio_and_the_ceiling(tmp_path):
  output = tmp_path / "bench.json"
  subprocess.run([sys.executable, SCRIPT, "--configs", "tiny", "--batches", "2", "--modes", "greedy,sample",
                  "--prompt_length", "8", "--new_tokens", "4", "--repeats", "1", "--bandwidth_gbs", "10",
                  "--peak_gflops", "50", "--output", str(output)],
                 check=True, capture_output=True, text=True, timeout=600)
  report = json.loads(output.read_text())
  assert report["bandwidth_gbs"] == 10 and report["peak_gflops"] == 50
  assert [(r["config"], r["batch"], r["mode"]) for r in report["results"]] == [("tiny", 2, "greedy"),
                                                                               ("tiny", 2, "sample")]
  for result in report["results"]:
    assert result["ours_tokens_per_s"] > 0 and result["transformers_tokens_per_s"] > 0
    _assert_ratio_of_rounded(result["ratio"], result["ours_tokens_per_s"], result["transformers_tokens_per_s"])
    _assert_ratio_of_rounded(result["ratio_ceiling"], result["machine_limit_tokens_per_s"],
                             result["transformers_tokens_per_s"])
    assert result["matmuls_only_tokens_per_s"] > 0
    _assert_ratio_of_rounded(result["matmuls_only_ratio"], result["matmuls_only_tokens_per_s"],
                             result["transformers_tokens_per_s"])


def test_long_tail_lengths_are_fixed_clipped_and_long_tailed():
  few, many, wide = _in_child("bench_rollout.long_tail_lengths(**case).tolist()",
                              [dict(count=8, new_tokens=128), dict(count=64, new_tokens=128),
                               dict(count=4096, new_tokens=128)])
  assert many[:8] == few  # one stream of draws: a smaller batch's lengths are the first of a larger one's
  assert wide[:64] == many
  assert all(1 <= length <= 128 for length in wide)
  wide.sort()
  assert 28 <= wide[len(wide) // 2] <= 36  # the median about new_tokens / 4
  assert wide[-1] == 128 and wide[len(wide) // 2] < sum(wide) / len(wide)  # clipped at the top; a long right tail


def test_a_tiny_long_tail_run_prints_both_figures_the_lengths_and_the_kv_figures(tmp_path):
  output = tmp_path / "bench.json"
  subprocess.run([sys.executable, SCRIPT, "--configs", "tiny", "--scenario", "long_tail", "--batches", "3",
                  "--num_slots", "2", "--modes", "greedy", "--prompt_length", "8", "--new_tokens", "8",
                  "--repeats", "1", "--output", str(output)],
                 check=True, capture_output=True, text=True, timeout=600)
  report = json.loads(output.read_text())
  assert report["scenario"] == "long_tail" and report["new_tokens"] == 8 and report["page_size"] == 16
  assert report["length_distribution"]["kind"] == "lognormal" and "add_request" in report["transformers_note"]
  [lengths] = _in_child("bench_rollout.long_tail_lengths(**case).tolist()", [dict(count=3, new_tokens=8)])
  [result] = report["results"]
  assert (result["config"], result["batch"], result["num_slots"], result["mode"]) == ("tiny", 3, 2, "greedy")
  assert result["lengths"] == {"min": min(lengths), "median": float(sorted(lengths)[1]),
                               "mean": round(sum(lengths) / 3, 2), "max": max(lengths), "total": sum(lengths)}
  assert result["ours_tokens_per_s"] > 0
  assert result["ours_kv_reserved_per_live_token"] >= 1.0
  if "transformers_error" in result:  # transformers' continuous batching did not run here: said why, no figures
    assert result["transformers_tokens_per_s"] is None and result["ratio"] is None
  else:
    assert result["transformers_tokens_per_s"] > 0 and result["transformers_kv_reserved_per_live_token"] >= 1.0
    _assert_ratio_of_rounded(result["ratio"], result["ours_tokens_per_s"], result["transformers_tokens_per_s"])


def _assert_ratio_of_rounded(ratio: float, numerator: float, denominator: float):
  """The report rounds tokens/s to 0.1 and ratios to 0.01, each computed from the unrounded figures: the ratio of
  the printed figures may differ from the printed ratio by the rounding of both figures (0.05 each, relative to
  their size; a slow tiny-model run makes that large) plus the ratio's own rounding."""
  quotient = numerator / denominator
  tolerance = quotient * (0.05 / numerator + 0.05 / denominator) * 1.01 + 0.005 + 1e-9
  assert ratio == pytest.approx(quotient, abs=tolerance)
