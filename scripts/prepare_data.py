"""Checks DAPO-Math-17k / AIME parquet files (the DAPO-Math schema) and optionally writes a (deduplicated) copy.

  .venv/bin/python scripts/prepare_data.py dapo-math-17k.parquet
  .venv/bin/python scripts/prepare_data.py aime-2024.parquet --deduplicate --output aime-2024-unique.parquet
  .venv/bin/python scripts/prepare_data.py train.parquet --tokenizer CHECKPOINT_DIR --max-prompt-length 2048 --json

Every input goes through the schema check of `dapo_jax.data.math_parquet.read_math_parquet`: a file that is not
parquet, a missing column, a column of the wrong type, an empty prompt or a missing ground truth stops the script
with a message naming the file, the row and the column (exit status 1).

Then it prints, per file and for all files together: rows, unique problems (distinct data_source + prompt +
ground truth), rows and problems per data_source, and how many problems have an integer answer; with
`--tokenizer`, the prompt lengths in tokens after the chat template and how many prompts exceed
`--max-prompt-length` (they would be left-truncated, or dropped with data.filter_overlong_prompts).

`--output FILE` writes the rows of all inputs to one parquet file, every column kept as it is (the inputs must
share a schema); with `--deduplicate` only the first row of each problem is kept (AIME-2024's 960 rows become 30),
which `dapo_jax.evaluate` does by itself anyway.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=wrong-import-position
from dapo_jax.data import math_parquet
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.data.math_rows import MathRows, concatenate_rows
# pylint: enable=wrong-import-position


def integer_answer_problems(rows: MathRows) -> int:
  """How many distinct problems have a ground truth that is an integer (AIME's answers all are)."""
  deduplicated = rows.deduplicated()
  return sum(_is_integer(deduplicated.ground_truth(row)) for row in range(len(deduplicated)))


def _is_integer(text: str) -> bool:
  text = text.strip()
  return text.lstrip("+-").isdigit()


def prompt_length_report(rows: MathRows, tokenizer_dir: str, max_prompt_length: int) -> dict:
  """Token counts of the rows' prompts (chat template + generation prompt), per row."""
  from dapo_jax.model import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
  options = prompts_lib.PromptOptions(max_prompt_length=max_prompt_length)
  lengths = np.array([len(prompts_lib.prompt_token_ids(
      [{"role": role, "content": content} for role, content in prompt], tokenizer, options))
                      for prompt in rows.prompts], np.int64)
  per_row = lengths[rows.prompt_id]
  return {
      "tokenizer": tokenizer_dir,
      "max_prompt_length": max_prompt_length,
      "prompt_tokens": {"mean": float(per_row.mean()), "max": int(per_row.max()), "min": int(per_row.min())},
      "rows_over_max_prompt_length": int((per_row > max_prompt_length).sum()),
  }


def file_report(rows: MathRows) -> dict:
  report = rows.summary()
  report["integer_answer_problems"] = integer_answer_problems(rows)
  return report


def write_copy(paths: list[str], per_file_rows: list[MathRows], output: str, deduplicate: bool) -> int:
  """Writes the inputs' rows (all columns, first row of each problem with `deduplicate`); returns the row count."""
  tables = []
  if deduplicate:
    kept = concatenate_rows(per_file_rows).deduplicated()
  for file_index, path in enumerate(paths):
    table = pq.read_table(path)
    if deduplicate:
      table = table.take(pa.array(np.sort(kept.source_row[kept.source_id == file_index])))
    tables.append(table)
  try:
    table = pa.concat_tables(tables, promote_options="permissive")
  except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
    raise SystemExit(f"Cannot write the inputs to one file: their schemas differ ({error}). Write one output per "
                     "input instead.") from error
  pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(table, output)
  return table.num_rows


def print_text(report: dict) -> None:
  for entry in report["files"] + ([report["total"]] if "total" in report else []):
    name = entry.get("file", "all files")
    print(f"{name}: {entry['rows']} rows, {entry['problems']} unique problems, "
          f"{entry['integer_answer_problems']} with an integer answer")
    for source, counts in entry["data_sources"].items():
      print(f"  data_source {source!r}: {counts['rows']} rows, {counts['problems']} problems")
  if "prompt_lengths" in report:
    lengths = report["prompt_lengths"]
    tokens = lengths["prompt_tokens"]
    print(f"prompt tokens ({lengths['tokenizer']}): mean {tokens['mean']:.1f}, min {tokens['min']}, "
          f"max {tokens['max']}; {lengths['rows_over_max_prompt_length']} rows over "
          f"max_prompt_length={lengths['max_prompt_length']}")
  if "output" in report:
    print(f"wrote {report['output']['rows']} rows to {report['output']['file']}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("inputs", nargs="+", help="parquet files in the DAPO-Math schema")
  parser.add_argument("--output", help="write the rows of all inputs to this parquet file")
  parser.add_argument("--deduplicate", action="store_true",
                      help="with --output, keep one row per (data_source, prompt, ground truth)")
  parser.add_argument("--tokenizer", help="a tokenizer directory: also report prompt lengths in tokens")
  parser.add_argument("--max-prompt-length", type=int, default=2048, help="with --tokenizer (default 2048)")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = parser.parse_args(argv)
  if args.deduplicate and not args.output:
    parser.error("--deduplicate needs --output")

  try:
    per_file_rows = [math_parquet.read_math_parquet(path) for path in args.inputs]
  except (math_parquet.DataSchemaError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1

  report: dict = {"files": [{"file": path, **file_report(rows)} for path, rows in zip(args.inputs, per_file_rows)]}
  for entry in report["files"]:
    del entry["files"]
  all_rows = concatenate_rows(per_file_rows)
  if len(per_file_rows) > 1:
    report["total"] = file_report(all_rows)
    del report["total"]["files"]
  if args.tokenizer:
    report["prompt_lengths"] = prompt_length_report(all_rows, args.tokenizer, args.max_prompt_length)
  if args.output:
    report["output"] = {"file": args.output, "deduplicated": args.deduplicate,
                        "rows": write_copy(args.inputs, per_file_rows, args.output, args.deduplicate)}

  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print_text(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
