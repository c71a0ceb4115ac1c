"""Datasets in the DAPO-Math schema (DAPO_SPEC.md section 7).

- `math`: DAPO-Math-17k / AIME parquet files -> schema check -> tokenized prompts -> a grain pipeline with a
  checkpointable iterator; validation sets deduplicated per problem.
- `synthetic`: the embedded default's arithmetic task written in the same schema, and its character tokenizer.
- `tfds_math`: a TensorFlow Datasets builder over the same files (imports TensorFlow; nothing here imports it).
"""
