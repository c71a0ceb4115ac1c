"""scripts/bench_update.py: one tiny run of the three update variants, and its JSON.

The script defines absl flags (`--output` among them), so it runs only in a child process: in the test process its
flags would collide with other entry points'.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_update.py")
VARIANTS = ("ours_packed", "ours_padded", "transformers")


def test_a_tiny_run_reports_every_variant_and_packing_pads_less(tmp_path):
  output = tmp_path / "bench.json"
  subprocess.run([sys.executable, SCRIPT, "--configs", "tiny", "--num_trajectories", "6", "--min_length", "8",
                  "--max_length", "64", "--micro_batch_tokens", "128", "--repeats", "1", "--compilation_cache_dir=",
                  "--output", str(output)],
                 check=True, capture_output=True, text=True, timeout=300)
  report = json.loads(output.read_text())
  assert report["num_trajectories"] == 6 and report["micro_batch_tokens"] == 128 and report["repeats"] == 1
  assert report["length_distribution"]["kind"] == "lognormal"
  assert report["length_distribution"]["clipped_to"] == [8, 64]
  assert report["machine"]["cpu_count"] >= 1
  assert len(report["load_average_before"]) == 3 and len(report["load_average_after"]) == 3
  [result] = report["results"]
  assert result["config"] == "tiny" and result["micro_batch_tokens"] == 128
  lengths = result["lengths"]
  assert 8 <= lengths["min"] <= lengths["median"] <= lengths["max"] <= 64
  assert lengths["total"] == result["real_tokens"]
  variants = result["variants"]
  assert set(variants) == set(VARIANTS)
  for variant in variants.values():
    assert variant["seconds"] > 0 and variant["tokens_per_s"] > 0
    assert variant["seconds"] == pytest.approx(
        variant["batching_s"] + variant["old_log_prob_s"] + variant["update_s"], abs=0.002)
    assert len(variant["all_seconds"]) == 1
    assert variant["micro_batches"] == len(variant["micro_batch_shapes"]) >= 1
    assert variant["token_slots"] == sum(rows * width for rows, width in variant["micro_batch_shapes"])
    assert all(rows * width <= 128 for rows, width in variant["micro_batch_shapes"])
    assert variant["padding_fraction"] == pytest.approx(1 - result["real_tokens"] / variant["token_slots"],
                                                        abs=1e-4)
  packed, padded, theirs = (variants[v] for v in VARIANTS)
  assert packed["padding_fraction"] <= padded["padding_fraction"]
  # transformers runs on the very micro-batches of ours_padded.
  assert theirs["micro_batch_shapes"] == padded["micro_batch_shapes"]
  assert theirs["padding_fraction"] == padded["padding_fraction"]
  # The three compute the same update: at the same weights, the same loss and gradient norm.
  for variant in (padded, theirs):
    assert variant["warm_up_pg_loss"] == pytest.approx(packed["warm_up_pg_loss"], abs=1e-4)
    assert variant["warm_up_grad_norm"] == pytest.approx(packed["warm_up_grad_norm"], rel=1e-3)
  assert set(result["ratios"]) == {"ours_packed/transformers", "ours_packed/ours_padded", "ours_padded/transformers"}
  for name, (numerator, denominator) in {"ours_packed/ours_padded": (padded, packed),
                                         "ours_packed/transformers": (theirs, packed)}.items():
    # Ratios of rates are ratios of seconds, computed unrounded: allow the seconds' rounding (0.0005 each).
    quotient = numerator["seconds"] / denominator["seconds"]
    tolerance = quotient * (0.0005 / numerator["seconds"] + 0.0005 / denominator["seconds"]) * 1.01 + 0.0005
    assert result["ratios"][name] == pytest.approx(quotient, abs=tolerance)
  assert result["targets"]["packed_padding_fraction_at_most_0.10"] == (packed["padding_fraction"] <= 0.10)
  if result["ratios"]["ours_packed/transformers"] != 1.0:  # rounded to 1.0, the target may go either way
    assert result["targets"]["ours_packed_at_least_transformers"] == (result["ratios"]["ours_packed/transformers"]
                                                                      > 1)


def test_a_subset_of_variants_with_remat_reports_only_their_ratios(tmp_path):
  output = tmp_path / "bench.json"
  subprocess.run([sys.executable, SCRIPT, "--configs", "tiny", "--num_trajectories", "4", "--min_length", "8",
                  "--max_length", "32", "--micro_batch_tokens", "64", "--repeats", "1", "--compilation_cache_dir=",
                  "--variants", "ours_packed,transformers", "--remat", "--output", str(output)],
                 check=True, capture_output=True, text=True, timeout=300)
  report = json.loads(output.read_text())
  assert report["remat"] is True
  [result] = report["results"]
  assert set(result["variants"]) == {"ours_packed", "transformers"}
  assert set(result["ratios"]) == {"ours_packed/transformers"}
  assert set(result["targets"]) == {"packed_padding_fraction_at_most_0.10", "ours_packed_at_least_transformers"}
  # Rematerialised on both sides (transformers with gradient checkpointing), still the same update.
  packed, theirs = result["variants"]["ours_packed"], result["variants"]["transformers"]
  assert theirs["warm_up_pg_loss"] == pytest.approx(packed["warm_up_pg_loss"], abs=1e-4)
  assert theirs["warm_up_grad_norm"] == pytest.approx(packed["warm_up_grad_norm"], rel=1e-3)


def test_unknown_variants_are_refused():
  run = subprocess.run([sys.executable, SCRIPT, "--variants", "ours_packed,vllm"], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode != 0 and "--variants" in run.stderr
