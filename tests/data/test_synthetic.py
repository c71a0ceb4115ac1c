"""Tests for dapo_jax.data.synthetic: the arithmetic task of the embedded default and its character tokenizer."""

import collections
import json

import numpy as np
import pytest

from dapo_jax.data import math_parquet
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.data import synthetic
from dapo_jax.model import tokenizer as tokenizer_lib
from dapo_jax.rl.math_answers import math_dapo_score
from tests import tokenizer_fixtures


def test_problem_texts():
  problem = synthetic.ArithmeticProblem(12, 3, 4)
  assert problem.prompt == "What is 12+3*4?"
  assert problem.answer == 24
  assert problem.reference_solution() == "3*4=12\n12+12=24\nAnswer: 24"
  assert problem.wrong_order_solution() == "12+3=15\n15*4=60\nAnswer: 60"


def test_all_problems_and_lengths():
  problems = synthetic.all_problems()
  assert len(problems) == 90 * 8 * 8 == len(set(problems))
  assert {problem.a for problem in problems} == set(range(10, 100))
  assert {problem.b for problem in problems} == {problem.c for problem in problems} == set(range(2, 10))
  # Short enough for the tiny model: prompts of at most 15 characters, responses of at most 30.
  assert max(len(problem.prompt) for problem in problems) == 15
  assert max(len(problem.reference_solution()) for problem in problems) <= 30
  assert max(len(problem.wrong_order_solution()) for problem in problems) <= 30


def test_math_dapo_scores_reference_right_and_wrong_order_wrong():
  for problem in synthetic.all_problems():
    truth = str(problem.answer)
    assert math_dapo_score(problem.reference_solution(), truth)["score"] == 1.0
    # (a + b) * c == a + b * c only when c == 1, which the task never uses, so every wrong-order answer is wrong.
    wrong = math_dapo_score(problem.wrong_order_solution(), truth)
    assert wrong["score"] == -1.0 and not wrong["acc"]
    assert wrong["pred"] == str((problem.a + problem.b) * problem.c)


def test_split_is_seeded_and_disjoint():
  train, heldout = synthetic.split_problems(seed=0)
  assert len(heldout) == 200 and len(train) == 5760 - 200
  assert not set(train) & set(heldout)
  assert set(train) | set(heldout) == set(synthetic.all_problems())
  assert synthetic.split_problems(seed=0) == (train, heldout)
  assert synthetic.split_problems(seed=1)[1] != heldout
  assert len(synthetic.split_problems(seed=0, num_heldout=10)[1]) == 10
  with pytest.raises(ValueError, match="num_heldout"):
    synthetic.split_problems(seed=0, num_heldout=0)


def test_warmup_pairs_mix_the_two_orders():
  train, heldout = synthetic.split_problems(seed=0)
  pairs = synthetic.warmup_pairs(train, num_pairs=1000, seed=7)
  assert pairs == synthetic.warmup_pairs(train, num_pairs=1000, seed=7)
  assert pairs != synthetic.warmup_pairs(train, num_pairs=1000, seed=8)
  by_prompt = {problem.prompt: problem for problem in train}
  assert not {prompt for prompt, _ in pairs} & {problem.prompt for problem in heldout}
  kinds = collections.Counter()
  for prompt, response in pairs:
    problem = by_prompt[prompt]
    if response == problem.reference_solution():
      kinds["reference"] += 1
    else:
      assert response == problem.wrong_order_solution()
      kinds["wrong_order"] += 1
  assert kinds == {"reference": 500, "wrong_order": 500}
  clean = synthetic.warmup_pairs(train, num_pairs=50, seed=7, wrong_order_fraction=0.0)
  assert all(response == by_prompt[prompt].reference_solution() for prompt, response in clean)
  with pytest.raises(ValueError, match="wrong_order_fraction"):
    synthetic.warmup_pairs(train, num_pairs=5, seed=0, wrong_order_fraction=1.5)


def test_problem_rows_in_the_dapo_math_schema():
  rows = synthetic.problem_rows([synthetic.ArithmeticProblem(12, 3, 4), synthetic.ArithmeticProblem(50, 9, 9)],
                                repeats=2)
  assert len(rows) == 4
  assert rows[0] == {
      "data_source": "synthetic_arith",
      "prompt": [{"content": "What is 12+3*4?", "role": "user"}],
      "ability": "MATH",
      "reward_model": {"ground_truth": "24", "style": "rule-lighteval/MATH_v2"},
      "extra_info": {"index": 0},
  }
  assert rows[3]["reward_model"]["ground_truth"] == "131" and rows[3]["extra_info"]["index"] == 1


def test_char_tokenizer_interface():
  tokenizer = tokenizer_fixtures.char_tokenizer()
  assert tokenizer.vocab_size == len(synthetic.VOCABULARY) == 31
  assert tokenizer.vocab_size <= 32  # the tiny model preset's vocabulary
  assert tokenizer.pad_id == 0
  assert tokenizer.eos_id == 1 and tokenizer.eos_ids == (1,)
  assert tokenizer.bos_id is None
  problem = synthetic.ArithmeticProblem(99, 9, 9)
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}])
  assert prompt == "What is 99+9*9?\n"
  conversation = tokenizer.apply_chat_template(
      [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": problem.reference_solution()}],
      add_generation_prompt=False)
  assert conversation == prompt + problem.reference_solution() + "<eos>"
  ids = tokenizer.encode(conversation)
  assert len(ids) == len(prompt) + len(problem.reference_solution()) + 1
  assert ids[-1] == tokenizer.eos_id
  assert tokenizer.decode(ids) == conversation
  assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + problem.reference_solution()
  # Characters outside the task's alphabet become <unk> rather than failing.
  assert tokenizer.encode("x") == [synthetic.VOCABULARY.index("<unk>")]


def test_every_task_character_is_in_the_vocabulary():
  tokenizer = tokenizer_fixtures.char_tokenizer()
  unk = tokenizer.token_to_id(synthetic.UNK_TOKEN)
  for problem in synthetic.all_problems():
    for text in (problem.prompt + "\n", problem.reference_solution(), problem.wrong_order_solution()):
      ids = tokenizer.encode(text)
      assert unk not in ids and len(ids) == len(text)
      assert tokenizer.decode(ids) == text


def test_tokenizer_round_trips_through_load_tokenizer(tmp_path):
  tokenizer = synthetic.write_char_tokenizer(tmp_path / "written")
  assert (tmp_path / "written" / "tokenizer.json").is_file()
  tokenizer.save(tmp_path / "saved")
  reloaded = tokenizer_lib.load_tokenizer(str(tmp_path / "saved"))
  texts = [problem.prompt + "\n" + problem.wrong_order_solution() + "<eos>"
           for problem in synthetic.all_problems()[::97]]
  for text in texts:
    assert reloaded.encode(text) == tokenizer.encode(text)
  assert (reloaded.vocab_size, reloaded.eos_ids, reloaded.pad_id, reloaded.bos_id, reloaded.chat_template) == (
      tokenizer.vocab_size, tokenizer.eos_ids, tokenizer.pad_id, tokenizer.bos_id, tokenizer.chat_template)
  config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
  assert config["eos_token"] == "<eos>" and config["pad_token"] == "<pad>"


def test_transformers_loads_the_tokenizer_alike(tmp_path):
  transformers = pytest.importorskip("transformers")
  ours = synthetic.write_char_tokenizer(tmp_path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  problem = synthetic.ArithmeticProblem(37, 6, 8)
  messages = [{"role": "user", "content": problem.prompt}]
  assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
      ours.apply_chat_template(messages))
  text = problem.prompt + "\n" + problem.reference_solution() + "<eos>"
  assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
  assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.pad_id


def test_written_task_reads_back_through_the_pipeline(tmp_path):
  files = synthetic.write_synthetic_task(tmp_path / "task", seed=3, train_repeats=2)
  train = math_parquet.read_math_parquet(files.train_file)
  heldout = math_parquet.read_math_parquet(files.heldout_file)
  assert len(train) == 2 * (5760 - 200) and train.num_problems == 5760 - 200
  assert len(heldout) == heldout.num_problems == 200
  assert set(train.data_sources) == set(heldout.data_sources) == {"synthetic_arith"}
  assert not {content for prompt in train.prompts for _, content in prompt} & {
      content for prompt in heldout.prompts for _, content in prompt}
  # Ground truths are the true a + b * c of each prompt.
  for row in range(len(heldout)):
    a, rest = heldout.prompt_text(row).removeprefix("What is ").removesuffix("?").split("+")
    b, c = rest.split("*")
    assert heldout.ground_truth(row) == str(int(a) + int(b) * int(c))
  # The same seed writes the same files.
  again = synthetic.write_synthetic_task(tmp_path / "again", seed=3, train_repeats=2)
  assert [heldout.prompt_text(row) for row in range(200)] == [
      math_parquet.read_math_parquet(again.heldout_file).prompt_text(row) for row in range(200)]

  tokenizer = tokenizer_lib.load_tokenizer(files.tokenizer_dir)
  prompts = prompts_lib.validation_prompts(files.heldout_file, tokenizer,
                                           prompts_lib.PromptOptions(max_prompt_length=16))
  assert len(prompts) == 200 and prompts.num_truncated_rows == 0
  example = prompts[0]
  assert tokenizer.decode(example.prompt_ids) == example.prompt_text + "\n"
  assert np.max([len(example.prompt_ids) for example in prompts]) <= 16
