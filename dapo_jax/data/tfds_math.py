"""A TensorFlow Datasets builder over DAPO-Math parquet files, for users who keep their data in tfds.

This module imports `tensorflow_datasets` (and through it TensorFlow) at import time; nothing else in
`dapo_jax.data` imports it, so the parquet pipeline never pays for TensorFlow.

Build a dataset from files named in a config:

  config = DapoMathConfig(name="dapo17k", split_files={"train": ("dapo-math-17k.parquet",),
                                                       "validation": ("aime-2024.parquet",)})
  builder = DapoMath(config=config, data_dir="~/tensorflow_datasets")
  builder.download_and_prepare()

or, with the default "manual" config, from the parquet files in the manual directory
(`~/tensorflow_datasets/downloads/manual/` unless `download_config` says otherwise), each file's split being its
name up to the first "-" or "." (train.parquet, train-00000-of-00004.parquet -> "train";
validation.parquet -> "validation"). Every file goes through the parquet schema check first
(`dapo_jax.data.math_parquet.read_math_parquet`), so bad data fails the build with the file, row and column named.

Read a split back into the pipeline with `read_math_rows_from_tfds(builder, "validation")`, which returns the
`MathRows` that `training_prompts` / `validation_prompts` accept.

Stored features: data_source, prompt (a sequence of {role, content}), ability, reward_model {ground_truth, style}
and extra_info {index}. `extra_info.index` is kept as text, because DAPO-Math-17k's indices are UUID strings and
AIME's are integers; missing `ability` / `style` / `index` values are stored as "".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
import re
from typing import Any

from etils import epath
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from dapo_jax.data import math_parquet
from dapo_jax.data.math_rows import MathRows

# Rows read from a parquet file at a time while generating examples, so that big files stream.
_READ_BATCH_ROWS = 8192


@dataclasses.dataclass(eq=False)
class DapoMathConfig(tfds.core.BuilderConfig):
  """Which parquet files make which split.

  Attributes:
    split_files: split name -> parquet files (local or any path pyarrow reads). Empty: the files in the manual
      directory, split by file name.
  """

  split_files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)


class DapoMath(tfds.core.GeneratorBasedBuilder):
  """DAPO-Math-17k / AIME style parquet files (the DAPO-Math schema) as a TensorFlow dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: the DAPO-Math parquet schema."}
  BUILDER_CONFIGS = [
      DapoMathConfig(name="manual", description="Splits from the parquet files in the manual directory."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the parquet files in the manual directory, named after their split: train.parquet (or "
      "train-00000-of-00002.parquet, ...) and validation.parquet; e.g. DAPO-Math-17k's "
      "data/dapo-math-17k.parquet as train.parquet and AIME-2024 as validation.parquet. Or pass "
      "config=DapoMathConfig(name=..., split_files={...}) naming the files.")

  def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any):
    """As tfds' builders take it; the file format defaults to ArrayRecord, which reads back by random access
    (`as_data_source`, no TensorFlow graph) and so suits grain."""
    super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  # tfds finds a builder's source file (to look for a checksums file beside it) through a check that imports the
  # `importlib_resources` backport, which tensorflow-datasets only requires on Python < 3.9; naming the file here
  # skips that check.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        description="Math problems with reference answers in the DAPO-Math schema (verl's parquet layout).",
        features=tfds.features.FeaturesDict({
            "data_source": text,
            "prompt": tfds.features.Sequence({"role": text, "content": text}),
            "ability": text,
            "reward_model": {"ground_truth": text, "style": text},
            "extra_info": {"index": text},
        }),
        homepage="https://huggingface.co/datasets/BytedTsinghua-SIA/DAPO-Math-17k",
        # Keep the files' row order: validation deduplication keeps the first row of each problem, and error
        # messages name rows by position.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    split_files = dict(self.builder_config.split_files)
    if not split_files:
      split_files = _split_files_in(dl_manager.manual_dir)
    return {split: self._generate_examples(tuple(os.fspath(path) for path in files))
            for split, files in split_files.items()}

  def _generate_examples(self, files: Sequence[str]):
    for file_index, path in enumerate(files):
      # The schema check reads only the columns the pipeline needs; it fails here, naming the row, rather than
      # storing a dataset that the pipeline would reject later.
      math_parquet.read_math_parquet(path)
      parquet_file = pq.ParquetFile(path)
      row = 0
      for batch in parquet_file.iter_batches(batch_size=_READ_BATCH_ROWS):
        for record in batch.to_pylist():
          yield f"{file_index}:{row}", _example_from_record(record)
          row += 1


def _split_files_in(directory: epath.Path) -> dict[str, list[str]]:
  """Split name -> the parquet files of `directory` whose name starts with it (up to "-" or ".")."""
  files = sorted(directory.glob("*.parquet")) if directory.exists() else []
  if not files:
    raise FileNotFoundError(
        f"No parquet files in the manual directory {directory}. {DapoMath.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  split_files: dict[str, list[str]] = {}
  for path in files:
    split = re.split(r"[-.]", path.name, maxsplit=1)[0]
    split_files.setdefault(split, []).append(os.fspath(path))
  return split_files


def _text(value: Any) -> str:
  return "" if value is None else str(value)


def _example_from_record(record: Mapping[str, Any]) -> dict[str, Any]:
  reward_model = record["reward_model"]
  extra_info = record.get("extra_info") or {}
  return {
      "data_source": record["data_source"],
      "prompt": [{"role": message["role"], "content": message["content"]} for message in record["prompt"]],
      "ability": _text(record.get("ability")),
      "reward_model": {"ground_truth": reward_model["ground_truth"], "style": _text(reward_model.get("style"))},
      "extra_info": {"index": _text(extra_info.get("index"))},
  }


def read_math_rows_from_tfds(builder: tfds.core.DatasetBuilder, split: str) -> MathRows:
  """The rows of one prepared split, checked as parquet rows are, for `training_prompts` / `validation_prompts`.

  Examples are read in the stored order (no shuffling); each row's location reads "tfds NAME/CONFIG:SPLIT, row N".
  """
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    examples = builder.as_data_source(split=split)
  else:
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
  records = []
  for example in examples:
    prompt = example["prompt"]
    records.append({
        "data_source": _decode(example["data_source"]),
        "prompt": [{"role": _decode(role), "content": _decode(content)}
                   for role, content in zip(prompt["role"], prompt["content"])],
        "reward_model": {"ground_truth": _decode(example["reward_model"]["ground_truth"])},
    })
  table = pa.Table.from_pylist(records, schema=pa.schema([
      ("data_source", pa.string()),
      ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
      ("reward_model", pa.struct([("ground_truth", pa.string())])),
  ]))
  return math_parquet.math_rows_from_table(table, f"tfds {builder.name}/{builder.builder_config.name}:{split}")


def _decode(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value
