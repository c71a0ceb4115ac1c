"""Tests for scripts/prepare_data.py, run as users run it: in a subprocess."""

import json
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq

from dapo_jax.data import math_parquet
from dapo_jax.data import synthetic

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "prepare_data.py"


def run_script(*args):
  return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                        timeout=120, check=False)


def write_repeated(path, repeats, data_source="math_dapo"):
  """Three problems, each repeated `repeats` times (as AIME's file repeats its problems), with integer answers
  except the last."""
  problems = [("Find x.", "12"), ("Find y.", "-3"), ("Find z.", "\\frac{1}{2}")]
  rows = [math_parquet.make_math_row(problem, answer, index=index, data_source=data_source)
          for _ in range(repeats) for index, (problem, answer) in enumerate(problems)]
  math_parquet.write_math_parquet(rows, path)
  return path


def test_json_report_and_deduplicated_copy(tmp_path):
  first = write_repeated(tmp_path / "aime.parquet", repeats=4)
  second = write_repeated(tmp_path / "amc.parquet", repeats=2, data_source="amc")
  output = tmp_path / "out" / "unique.parquet"
  result = run_script(first, second, "--json", "--output", output, "--deduplicate")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["files"][0] == {"file": str(first), "rows": 12, "problems": 3, "integer_answer_problems": 2,
                                "data_sources": {"math_dapo": {"rows": 12, "problems": 3}}}
  assert report["files"][1]["data_sources"] == {"amc": {"rows": 6, "problems": 3}}
  assert report["total"]["rows"] == 18 and report["total"]["problems"] == 6
  assert report["output"] == {"file": str(output), "deduplicated": True, "rows": 6}
  # The copy keeps every column, one row per problem, in file order, and passes the check itself.
  copied = pq.read_table(output)
  assert copied.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
  assert [row["reward_model"]["ground_truth"] for row in copied.to_pylist()] == ["12", "-3", "\\frac{1}{2}"] * 2
  assert [row["data_source"] for row in copied.to_pylist()] == ["math_dapo"] * 3 + ["amc"] * 3
  assert math_parquet.read_math_parquet(output).num_problems == 6


def test_text_report_with_prompt_lengths(tmp_path):
  path = write_repeated(tmp_path / "data.parquet", repeats=2)
  tokenizer_dir = tmp_path / "tokenizer"
  synthetic.write_char_tokenizer(tokenizer_dir)
  result = run_script(path, "--tokenizer", tokenizer_dir, "--max-prompt-length", 247)
  assert result.returncode == 0, result.stderr
  assert f"{path}: 6 rows, 3 unique problems, 2 with an integer answer" in result.stdout
  assert "data_source 'math_dapo': 6 rows, 3 problems" in result.stdout
  # Each prompt is DAPO's instruction around a 7-character problem plus the newline of the character
  # tokenizer's template: 248 tokens, all over the limit of 247.
  length = len(math_parquet.DAPO_PROMPT_TEMPLATE.format(problem="Find x.")) + 1
  assert f"mean {length:.1f}, min {length}, max {length}; 6 rows over max_prompt_length=247" in result.stdout


def test_bad_file_exits_with_the_location(tmp_path):
  rows = [math_parquet.make_math_row("Find x.", "1", index=0), math_parquet.make_math_row("Find y.", "2", index=1)]
  rows[1]["prompt"] = []
  bad = tmp_path / "bad.parquet"
  math_parquet.write_math_parquet(rows, bad)
  result = run_script(bad)
  assert result.returncode == 1
  assert f"error: {bad}, row 1, column 'prompt': has no messages" in result.stderr
  not_parquet = tmp_path / "notes.parquet"
  not_parquet.write_text("not a parquet file")
  result = run_script(not_parquet)
  assert result.returncode == 1 and f"{not_parquet} is not a parquet file" in result.stderr
