"""Tests for dapo_jax.data.tfds_math: build the TensorFlow Datasets builder from parquet files into a temporary
data_dir and read it back into the pipeline's rows."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from dapo_jax.data import math_parquet  # pylint: disable=wrong-import-position
from dapo_jax.data import tfds_math  # pylint: disable=wrong-import-position


def write_rows(path, count, data_source="math_dapo", start=0):
  rows = [math_parquet.make_math_row(f"problem {i}", i * 7, index=i, data_source=data_source)
          for i in range(start, start + count)]
  math_parquet.write_math_parquet(rows, path)
  return str(path)


def same_rows(left, right):
  return ([left.messages(i) for i in range(len(left))] == [right.messages(i) for i in range(len(right))]
          and [left.ground_truth(i) for i in range(len(left))] == [right.ground_truth(i) for i in range(len(right))]
          and [left.data_source(i) for i in range(len(left))] == [right.data_source(i) for i in range(len(right))])


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_build_and_read_back(tmp_path, file_format):
  train = write_rows(tmp_path / "train.parquet", 12)
  aime = write_rows(tmp_path / "aime.parquet", 3, data_source="aime")
  other = write_rows(tmp_path / "other.parquet", 2, data_source="other", start=1)
  config = tfds_math.DapoMathConfig(name="test", split_files={"train": (train,), "validation": (aime, other, aime)})
  builder = tfds_math.DapoMath(config=config, data_dir=str(tmp_path / "tfds"), file_format=file_format)
  builder.download_and_prepare()
  assert builder.info.splits["train"].num_examples == 12
  assert builder.info.splits["validation"].num_examples == 8

  # A builder made afresh reads the prepared data from the data_dir.
  reopened = tfds_math.DapoMath(config=config, data_dir=str(tmp_path / "tfds"), file_format=file_format)
  train_rows = tfds_math.read_math_rows_from_tfds(reopened, "train")
  assert same_rows(train_rows, math_parquet.read_math_parquet(train))  # the files' order is kept
  validation_rows = tfds_math.read_math_rows_from_tfds(reopened, "validation")
  assert same_rows(validation_rows, math_parquet.read_math_files([aime, other, aime]))
  assert validation_rows.location(4) == "tfds dapo_math/test:validation, row 4"
  deduplicated = validation_rows.deduplicated()
  assert len(deduplicated) == 5
  np.testing.assert_array_equal(deduplicated.num_duplicates, [2, 2, 2, 1, 1])
  assert validation_rows.summary()["data_sources"] == {"aime": {"rows": 6, "problems": 3},
                                                       "other": {"rows": 2, "problems": 2}}


def test_stored_features_keep_every_column(tmp_path):
  table = pa.table({
      "data_source": ["math_dapo"],
      "prompt": [[{"content": "What is 1+1?", "role": "user"}]],
      "ability": ["MATH"],
      "reward_model": [{"ground_truth": "2", "style": "rule-lighteval/MATH_v2"}],
      # DAPO-Math-17k's indices are UUID strings.
      "extra_info": [{"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"}],
  })
  path = str(tmp_path / "uuid.parquet")
  pq.write_table(table, path)
  config = tfds_math.DapoMathConfig(name="uuid", split_files={"train": (path,)})
  builder = tfds_math.DapoMath(config=config, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  example = builder.as_data_source(split="train")[0]
  assert example["extra_info"]["index"] == b"9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"
  assert example["ability"] == b"MATH"
  assert example["reward_model"]["style"] == b"rule-lighteval/MATH_v2"
  assert [role for role in example["prompt"]["role"]] == [b"user"]


def test_manual_directory_splits_by_file_name(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_rows(manual / "train-00000-of-00002.parquet", 4)
  write_rows(manual / "train-00001-of-00002.parquet", 3, start=4)
  write_rows(manual / "validation.parquet", 2)
  builder = tfds_math.DapoMath(data_dir=str(tmp_path / "tfds"))
  assert builder.builder_config.name == "manual"
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == {"train": 7, "validation": 2}
  train_rows = tfds_math.read_math_rows_from_tfds(builder, "train")
  assert [train_rows.ground_truth(i) for i in range(7)] == [str(7 * i) for i in range(7)]


def test_bad_file_fails_the_build_naming_the_row(tmp_path):
  rows = [math_parquet.make_math_row(f"problem {i}", i, index=i) for i in range(4)]
  rows[2]["reward_model"]["ground_truth"] = ""
  path = str(tmp_path / "bad.parquet")
  math_parquet.write_math_parquet(rows, path)
  config = tfds_math.DapoMathConfig(name="bad", split_files={"train": (path,)})
  builder = tfds_math.DapoMath(config=config, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(math_parquet.DataSchemaError, match=f"{path}, row 2, column 'reward_model.ground_truth'"):
    builder.download_and_prepare()
