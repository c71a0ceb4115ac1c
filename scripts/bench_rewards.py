"""Times math_dapo_score on adversarial inputs and score_batch on a batch of typical responses.

  .venv/bin/python scripts/bench_rewards.py [--repeats 200] [--batch-size 8192] [--num-workers 2]

Prints one JSON object: per input, the median and max milliseconds of one `math_dapo_score` call over the
repeats (and whether the result is the expected one); then the throughput (responses/s) of a batch through
`score_batch`, in-process and in a warm worker pool, and the pool's start-up time.
"""

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dapo_jax.rl.math_answers import math_dapo_score  # pylint: disable=wrong-import-position
from dapo_jax.rl.reward_pool import RewardPool, score_batch  # pylint: disable=wrong-import-position

_WORDS = ("the", "sum", "of", "roots", "is", "therefore", "we", "get", "$x^2$", "\\frac{1}{2}", "and", "so",
          "=", "3", "let", "consider", "modulo", "triangle", "area", "\\sqrt{5}")


def typical_response(rng: random.Random, answer: int, num_chars: int) -> str:
  """Reasoning-like filler of about `num_chars` characters ending with an `Answer:` line."""
  words = []
  length = 0
  while length < num_chars:
    word = rng.choice(_WORDS)
    words.append(word)
    length += len(word) + 1
  return " ".join(words) + f"\n\nSo the final result follows.\nAnswer: {answer}"


def adversarial_inputs() -> dict[str, tuple[str, str, bool, bool]]:
  """name -> (solution, ground truth, strict_box, expected acc)."""
  rng = random.Random(0)
  return {
      "normal_response": (typical_response(rng, 204, 3000), "204", False, True),
      "1MB_response": ("x" * 1_000_000 + "\nAnswer: 42", "42", False, True),
      "10k_nested_braces": ("Answer: " + "\\boxed{" * 10_000 + "7" + "}" * 10_000, "7", False, False),
      "10k_nested_braces_strict_box": ("\\boxed{" * 10_000 + "7" + "}" * 10_000, "7", True, False),
      "10k_answer_lines": ("".join(f"Answer: {i}\n" for i in range(10_000)), "9999", False, True),
      "answer_100k_spaces_x": ("Answer:" + " " * 100_000 + "x", "x", False, False),
      # The same ideas squeezed into the 300 characters that are actually read.
      "tail_answer_292_spaces_x": ("Answer:" + " " * 292 + "x", "x", False, True),
      "tail_one_dollar": ("Answer: $" + "a" * 290, "1", False, False),
      "tail_291_dollars": ("Answer: " + "$" * 291, "1", False, False),
      "tail_48_unclosed_text": ("Answer: " + "\\text{" * 48, "1", False, False),
      "tail_41_unclosed_boxed": ("Answer: " + "\\boxed{" * 41, "1", False, False),
      "tail_70_frac": ("Answer: " + "frac" * 73, "1", False, False),
      "tail_answer_colons": ("Answer:" * 42, "1", False, False),
  }


def time_call(solution: str, ground_truth: str, strict_box: bool, repeats: int) -> tuple[list[float], dict]:
  times_ms = []
  result = {}
  for _ in range(repeats):
    start = time.perf_counter()
    result = math_dapo_score(solution, ground_truth, strict_box=strict_box)
    times_ms.append((time.perf_counter() - start) * 1e3)
  return times_ms, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=8192, help="responses (DAPO: 512 prompts x 16)")
  parser.add_argument("--response-chars", type=int, default=4000, help="characters per typical response")
  parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
  args = parser.parse_args()

  per_input = {}
  for name, (solution, ground_truth, strict_box, expected_acc) in adversarial_inputs().items():
    times_ms, result = time_call(solution, ground_truth, strict_box, args.repeats)
    per_input[name] = {
        "chars": len(solution),
        "median_ms": round(statistics.median(times_ms), 4),
        "max_ms": round(max(times_ms), 4),
        "result_as_expected": result["acc"] is expected_acc,
    }

  rng = random.Random(1)
  answers = [rng.randrange(1000) for _ in range(args.batch_size)]
  solutions = [typical_response(rng, answer, args.response_chars) for answer in answers]
  # About half right, as in a training batch.
  ground_truths = [str(answer if rng.random() < 0.5 else answer + 1) for answer in answers]

  start = time.perf_counter()
  in_process = score_batch(solutions, ground_truths, num_workers=0)
  in_process_s = time.perf_counter() - start

  start = time.perf_counter()
  with RewardPool(args.num_workers) as pool:
    first = pool.score(solutions, ground_truths)
    first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = pool.score(solutions, ground_truths)
    warm_s = time.perf_counter() - start
  assert warm.results == in_process.results == first.results

  print(json.dumps({
      "repeats": args.repeats,
      "math_dapo_score": per_input,
      "batch": {
          "size": args.batch_size,
          "response_chars": args.response_chars,
          "num_workers": args.num_workers,
          "cpu_count": os.cpu_count(),
          "in_process_per_s": round(args.batch_size / in_process_s),
          "pool_first_call_s_incl_startup": round(first_call_s, 3),
          "pool_warm_s": round(warm_s, 3),
          "pool_warm_per_s": round(args.batch_size / warm_s),
          "timeouts": warm.num_timeouts,
          "mean_acc": round(float(warm.accs.mean()), 4),
      },
  }, indent=1))


if __name__ == "__main__":
  main()
