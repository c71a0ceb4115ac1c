"""Rows in the DAPO-Math schema written to parquet, for the data tests."""

import pyarrow as pa
import pyarrow.parquet as pq

from dapo_jax.data import math_parquet


def write_rows(path, rows, **write_options):
  """Writes rows in the DAPO-Math schema; `write_options` go to pq.write_table (e.g. row_group_size)."""
  pq.write_table(pa.Table.from_pylist(rows, schema=math_parquet.MATH_PARQUET_SCHEMA), path, **write_options)
  return str(path)


def numbered_rows(count, data_source="math_dapo", template="{problem}"):
  """Rows whose prompt is "problem N" and ground truth is N, distinct problems."""
  return [math_parquet.make_math_row(f"problem {i}", i, index=i, data_source=data_source, prompt_template=template)
          for i in range(count)]
