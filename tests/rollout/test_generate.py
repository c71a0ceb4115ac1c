"""Tests for `python -m dapo_jax.generate`, run in a subprocess on a saved random checkpoint with a tokenizer."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import transformers

from dapo_jax import checkpoint
from dapo_jax.model.tokenizer import load_tokenizer
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import SamplingParams

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NEW_TOKENS = 12


def _generate(*args: str) -> list[dict]:
  """Runs the command and returns its --json line."""
  result = subprocess.run([sys.executable, "-m", "dapo_jax.generate", *args, "--json"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def save_as_training_checkpoint(hf_directory, workdir, step: int = 1) -> str:
  """Saves a Hugging Face checkpoint's weights as step `step` of a training run in `workdir` (with policy/ beside
  it, as the trainer writes it); returns the step directory."""
  policy = checkpoint.load_policy(str(hf_directory))
  root = os.path.join(workdir, "checkpoints")
  checkpoint.write_policy_files(root, policy.config, load_tokenizer(hf_directory))
  manager = checkpoint.Checkpointer(root)
  manager.save(step, {"params": policy.params}, {"rollout_step": step})
  manager.wait()
  manager.close()
  return os.path.join(root, str(step))


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(qwen_like_checkpoint, tmp_path_factory):
  """A checkpoint with a Qwen2.5-style tokenizer and chat template, and an eos (in generation_config.json, next
  to Qwen's <|endoftext|>) that greedy decoding of the test prompt reaches mid-way."""
  checkpoint = qwen_like_checkpoint
  directory = tmp_path_factory.mktemp("generate") / "checkpoint"
  shutil.copytree(checkpoint.directory, directory)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  chat_ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Solve 3x + 7 = 22."}],
                                              add_generation_prompt=True, tokenize=True)["input_ids"]
  free_run = checkpoint.greedy(chat_ids, NEW_TOKENS)
  eos_ids = [free_run[4], hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")]
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
  return dict(checkpoint=checkpoint, directory=str(directory), hf_tokenizer=hf_tokenizer, chat_ids=chat_ids,
              free_run=free_run, eos_ids=eos_ids)


def test_chat_prompt_greedy_matches_transformers_and_stops_at_eos(checkpoint_with_tokenizer):
  fixture = checkpoint_with_tokenizer
  completions = _generate("--checkpoint", fixture["directory"], "--prompt", "Solve 3x + 7 = 22.",
                          "--temperature", "0", "--max_new_tokens", str(NEW_TOKENS))
  reference = fixture["checkpoint"].greedy(fixture["chat_ids"], NEW_TOKENS, fixture["eos_ids"])
  assert len(reference) < NEW_TOKENS and reference[-1] in fixture["eos_ids"]
  assert completions == [{"token_ids": reference, "finish_reason": "eos",
                          "text": fixture["hf_tokenizer"].decode(reference, skip_special_tokens=True)}]


def test_training_checkpoint_greedy_matches_transformers(checkpoint_with_tokenizer, tmp_path):
  fixture = checkpoint_with_tokenizer
  step_dir = save_as_training_checkpoint(fixture["directory"], tmp_path / "workdir")
  # The tokenizer, its chat template and the eos ids come from the training checkpoint's policy/ directory.
  completions = _generate("--checkpoint", step_dir, "--prompt", "Solve 3x + 7 = 22.", "--temperature", "0",
                          "--max_new_tokens", str(NEW_TOKENS))
  reference = fixture["checkpoint"].greedy(fixture["chat_ids"], NEW_TOKENS, fixture["eos_ids"])
  assert [(c["token_ids"], c["finish_reason"]) for c in completions] == [(reference, "eos")]


def test_prompt_ids_greedy_without_eos_matches_transformers(checkpoint_with_tokenizer):
  fixture = checkpoint_with_tokenizer
  prompt_ids = fixture["chat_ids"]
  completions = _generate("--checkpoint", fixture["directory"], "--prompt_ids", ",".join(map(str, prompt_ids)),
                          "--temperature", "0", "--max_new_tokens", str(NEW_TOKENS), "--no_eos")
  assert [(c["token_ids"], c["finish_reason"]) for c in completions] == [(fixture["free_run"], "length")]


def test_raw_prompt_samples_n_completions_like_the_group_sampler(checkpoint_with_tokenizer):
  fixture = checkpoint_with_tokenizer
  completions = _generate("--checkpoint", fixture["directory"], "--prompt", "The quick brown fox", "--raw", "--n", "3",
                          "--temperature", "1.0", "--top_p", "0.9", "--top_k", "30", "--seed", "4",
                          "--max_new_tokens", "6", "--no_eos")
  checkpoint = fixture["checkpoint"]
  raw_ids = fixture["hf_tokenizer"].encode("The quick brown fox")
  sampler = sampler_lib.GroupSampler(checkpoint.config, num_slots=3, max_prompt_length=len(raw_ids),
                                     max_response_length=6)
  group, = sampler.sample(checkpoint.params, [raw_ids], n=3, seed=4,
                          sampling=SamplingParams(temperature=1.0, top_p=0.9, top_k=30))
  assert [c["token_ids"] for c in completions] == [r.token_ids.tolist() for r in group.responses]
  assert all(c["finish_reason"] == "length" for c in completions)


def test_prompt_text_without_a_tokenizer_is_a_usage_error(checkpoints):
  result = subprocess.run([sys.executable, "-m", "dapo_jax.generate", "--checkpoint",
                           str(checkpoints["tied_gqa"].directory), "--prompt", "hello"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0 and "--prompt_ids" in result.stderr


def test_a_directory_that_is_no_checkpoint_is_named(tmp_path):
  result = subprocess.run([sys.executable, "-m", "dapo_jax.generate", "--checkpoint", str(tmp_path),
                           "--prompt_ids", "1,2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 1 and f"dapo_jax.generate: error: {tmp_path}: not a checkpoint" in result.stderr
