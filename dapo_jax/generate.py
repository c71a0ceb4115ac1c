"""Prints completions of a prompt from a checkpoint, through the group sampler.

    python -m dapo_jax.generate --checkpoint DIR (--prompt TEXT | --prompt_ids 1,2,3) [--max_new_tokens N]
        [--temperature T --top_p P --top_k K --n N --seed S] [--no_eos] [--raw] [--json]

`--checkpoint` is a Hugging Face Qwen2 directory or one of our training checkpoints (a workdir, its checkpoints/
directory, whose newest complete step is taken, or one step directory checkpoints/<step>); the tokenizer and
generation_config.json come from the HF directory itself or from the training checkpoint's policy/ directory.
`--prompt` text is rendered with the checkpoint's chat template (a user turn and the generation prompt) unless
`--raw`; `--prompt_ids` are used as given. `--temperature 0` is greedy. Responses stop at the eos ids of the
checkpoint's generation_config.json when it names some (else the tokenizer's eos), or at `--max_new_tokens`;
`--no_eos` stops by length only. `--json` prints one line: a list with one object per completion,
`{"token_ids": [new tokens, the eos included when one ended it], "text": ..., "finish_reason": "eos" | "length"}`
("text" is the decoded completion without special tokens; null when the checkpoint has no tokenizer).

Weights are loaded in float32: on CPU, XLA's bfloat16 matrix-vector products are much slower.
"""
import json
import sys

from absl import app
from absl import flags
import jax.numpy as jnp

from dapo_jax import checkpoint as checkpoint_lib
from dapo_jax.model import checkpoint_generation
from dapo_jax.model import hf_io
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import SamplingParams

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A Hugging Face Qwen2 directory, or a training workdir, its checkpoints/ directory or one "
    "step directory in it.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (chat template applied unless --raw).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt token ids, comma separated (used as given).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens generated per completion.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
_N = flags.DEFINE_integer("n", 1, "Completions to sample.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed, in [0, 2**31).")
_NO_EOS = flags.DEFINE_bool("no_eos", False, "Never stop at an eos id; generate --max_new_tokens tokens.")
_RAW = flags.DEFINE_bool("raw", False, "Tokenize --prompt as it is, without the chat template.")
_JSON = flags.DEFINE_bool("json", False, "Print the completions as one JSON line.")

flags.mark_flags_as_mutual_exclusive(["prompt", "prompt_ids"], required=True)

# Decode slots used at most: the n completions of the one prompt run together up to this many at a time.
MAX_SLOTS = 64
# Decode steps per device call (fewer when the completions are shorter).
STEPS_PER_CALL = 16


def prompt_token_ids(tokenizer: tokenizer_lib.Tokenizer | None) -> list[int]:
  if _PROMPT_IDS.value is not None:
    try:
      return [int(token_id) for token_id in _PROMPT_IDS.value]
    except ValueError:
      raise app.UsageError(f"--prompt_ids must be integers, got {','.join(_PROMPT_IDS.value)}") from None
  if tokenizer is None:
    raise app.UsageError(f"--prompt needs a tokenizer, and {_CHECKPOINT.value} has none; pass --prompt_ids")
  if _RAW.value:
    return tokenizer.encode(_PROMPT.value)
  return tokenizer.apply_chat_template([{"role": "user", "content": _PROMPT.value}], add_generation_prompt=True,
                                       tokenize=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    policy = checkpoint_lib.load_policy(_CHECKPOINT.value, dtype=jnp.float32)
    tokenizer = checkpoint_generation.load_optional_tokenizer(policy.files_dir)
  except (FileNotFoundError, hf_io.CheckpointError, tokenizer_lib.TokenizerLoadError) as error:
    sys.exit(f"dapo_jax.generate: error: {error}")
  prompt = prompt_token_ids(tokenizer)
  if not prompt:
    raise app.UsageError("the prompt is empty")
  eos_ids = [] if _NO_EOS.value else checkpoint_generation.stop_ids(policy.files_dir, tokenizer)
  sampling = SamplingParams(temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value)
  sampler = sampler_lib.GroupSampler(
      policy.config, num_slots=min(_N.value, MAX_SLOTS), max_prompt_length=len(prompt),
      max_response_length=_MAX_NEW_TOKENS.value, eos_ids=eos_ids,
      steps_per_call=min(STEPS_PER_CALL, _MAX_NEW_TOKENS.value))
  group, = sampler.sample(policy.params, [prompt], n=_N.value, seed=_SEED.value, sampling=sampling)

  completions = []
  for response in group.responses:
    token_ids = response.token_ids.tolist()
    text = tokenizer.decode(token_ids, skip_special_tokens=True) if tokenizer is not None else None
    completions.append({"token_ids": token_ids, "text": text, "finish_reason": response.finish_reason})
  if _JSON.value:
    print(json.dumps(completions))
    return
  for index, completion in enumerate(completions):
    body = completion["text"] if completion["text"] is not None else " ".join(map(str, completion["token_ids"]))
    print(f"--- completion {index} ({len(completion['token_ids'])} tokens, {completion['finish_reason']}) ---")
    print(body)


if __name__ == "__main__":
  app.run(main)
