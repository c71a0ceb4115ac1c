"""Datasets in the DAPO-Math schema (docs/algorithm.md section 7).

The path a training run takes:

  rows = read_math_files(config.data.train_files)                 # schema check, compact columnar rows
  prompts = PromptSet(rows, tokenizer, PromptOptions(...))         # chat template, left truncation / error / filter
  batches = epoch_batches(prompts, batch_size=..., seed=...)       # grain: shuffle, shard, drop remainder
  iterator = batch_iterator(batches)                               # checkpointable: get_state() / set_state()
  for batch in iterator: ...                                       # batch: list[PromptExample]

- `math_parquet`: DAPO-Math-17k / AIME parquet files: the schema, its check, reading and writing rows.
- `math_rows`: `MathRows`, the checked rows, stored as ids into tables of distinct values.
- `prompts`: rows -> tokenized prompts; validation sets deduplicated per problem.
- `epochs`: prompts -> a grain pipeline of epoch batches with a checkpointable iterator.
- `synthetic`: the embedded default's arithmetic task written in the same schema, and its character tokenizer.
- `tfds_math`: a TensorFlow Datasets builder over the same files (imports TensorFlow; nothing here imports it).
"""
