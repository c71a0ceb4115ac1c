"""Exports a checkpoint as a Hugging Face Qwen2 directory that transformers and vLLM load.

  .venv/bin/python scripts/export_hf.py --checkpoint runs/dapo/checkpoints --output exports/dapo-step40
  .venv/bin/python scripts/export_hf.py --checkpoint runs/dapo/checkpoints/40 --output OUT --dtype float32
  .venv/bin/python scripts/export_hf.py --checkpoint HF_DIR --output OUT --max_shard_size 2GB

`--checkpoint` is anything `dapo_jax.checkpoint.load_policy` reads: one of our training checkpoints (a workdir,
its checkpoints/ directory, whose newest complete step is taken, or one step directory checkpoints/<step>) or
a Hugging Face directory (to change its dtype or sharding). The output directory gets the weights as safetensors
(`model.safetensors`, or numbered shards of at most `--max_shard_size` with `model.safetensors.index.json`),
config.json (with the bos / eos token ids of the source's config.json, else of its tokenizer:
`checkpoint.special_token_ids`), generation_config.json and the tokenizer files (with the chat template) of the
checkpoint.

The weights pass through host memory once, in the output dtype: a 32B model needs about 64 GB in bfloat16.
`--output` must be a new or empty directory, so that no shard of an earlier export is left beside the new ones.
"""
import json
import logging
import os
import pathlib
import re
import sys

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=wrong-import-position
from dapo_jax import runtime  # first: it quiets what importing TensorFlow prints, should anything import it
from dapo_jax import checkpoint as checkpoint_lib
from dapo_jax import config as config_lib
from dapo_jax.model import checkpoint_generation
from dapo_jax.model import hf_io
from dapo_jax.model import tokenizer as tokenizer_lib
# pylint: enable=wrong-import-position

# transformers' convention (`max_shard_size="5GB"`): GB is 10^9 bytes, GiB 2^30.
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A training workdir, its checkpoints/ directory or one step directory in it; or a Hugging "
    "Face Qwen2 directory.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The Hugging Face directory to write (new or empty).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", sorted(config_lib.DTYPES), "The dtype of the exported weights.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB",
                                      "Largest safetensors file, e.g. 5GB (10^9 bytes), 4GiB (2^30) or bytes.")


def parse_size(text: str) -> int:
  """Bytes in a size such as "5GB", "500MB", "4GiB" or "1000000"; raises ValueError naming --max_shard_size."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
  unit = match.group(2).upper() if match else None
  if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
    raise ValueError(f"--max_shard_size={text!r}: expected a positive size such as 5GB, 500MB, 4GiB or a number "
                     "of bytes")
  return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def export(checkpoint: str, output: str, *, dtype: str = "bfloat16", max_shard_bytes: int = 5 * 10**9) -> str:
  """Writes `checkpoint` as a Hugging Face directory at `output`; returns a one-line description."""
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise FileExistsError(f"--output {output} exists and is not an empty directory; choose a new one")
  # Loaded straight into the output dtype: a bfloat16 export never holds a float32 copy of the weights.
  policy = checkpoint_lib.load_policy(checkpoint, dtype=config_lib.DTYPES[dtype])
  tokenizer = checkpoint_generation.load_optional_tokenizer(policy.files_dir)
  os.makedirs(output, exist_ok=True)
  if tokenizer is not None:
    tokenizer.save(output)
  else:
    logging.warning("%s has no tokenizer files: the export holds only weights and configs", policy.files_dir)
  generation_config = _read_json(os.path.join(policy.files_dir, tokenizer_lib.GENERATION_CONFIG))
  hf_io.save_hf_checkpoint(policy.params, policy.config, output, dtype=config_lib.DTYPES[dtype],
                           max_shard_bytes=max_shard_bytes, generation_config=generation_config)
  # save_hf_checkpoint writes the model's shape only; the special token ids come from the source's files.
  token_ids = checkpoint_lib.special_token_ids(
      tokenizer, hf_config=checkpoint_lib.read_hf_config(policy.files_dir), generation_config=generation_config)
  config_path = os.path.join(output, hf_io.CONFIG_FILE)
  with open(config_path) as f:
    hf_config = json.load(f)
  with open(config_path, "w") as f:
    json.dump({**hf_config, **token_ids}, f, indent=2)
  shards = sorted(name for name in os.listdir(output) if name.endswith(".safetensors"))
  return f"Wrote {output}: {len(shards)} safetensors file(s) in {dtype} from {policy.description}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  runtime.quiet_third_party_logs(verbose=flags.FLAGS.verbosity >= 1)  # orbax's per-restore details
  try:
    max_shard_bytes = parse_size(_MAX_SHARD_SIZE.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  try:
    print(export(_CHECKPOINT.value, _OUTPUT.value, dtype=_DTYPE.value, max_shard_bytes=max_shard_bytes))
  except (FileNotFoundError, FileExistsError, hf_io.CheckpointError, tokenizer_lib.TokenizerLoadError) as error:
    sys.exit(f"export_hf: error: {error}")


if __name__ == "__main__":
  app.run(main)
