"""The embedded default's task: "What is a+b*c?" in the DAPO-Math schema, with a character tokenizer for it.

The task (docs/algorithm.md section 12): a in 10..99, b and c in 2..9, so 90 * 8 * 8 = 5760 problems. 200 of them
are held out for validation; training and the supervised warm-up only ever see the others. The prompt is short
("What is 12+3*4?", at most 15 characters) because a tiny character-level model pays for every prompt character.
The reference response works in the right order of operations and ends with the `Answer:` line math_dapo reads:

  3*4=12
  12+12=24
  Answer: 24

The warm-up also teaches the wrong order for half of its examples ("12+3=15", "15*4=60", "Answer: 60"), so the base
model it makes reasons correctly only some of the time and RL has a real behaviour to reinforce: the reward always
checks the true a + b * c, and (a + b) * c never equals it here (it would need c = 1).

The tokenizer is a Hugging Face `tokenizers` word-level model over single characters, saved as a real
tokenizer.json (+ tokenizer_config.json with its special tokens and chat template), so
`dapo_jax.model.tokenizer.load_tokenizer` loads it like any checkpoint's tokenizer. Its 31 ids fit the tiny model
preset's vocabulary of 32.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import random

from etils import epath
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

from dapo_jax.data import math_parquet
from dapo_jax.model import tokenizer as tokenizer_lib

DATA_SOURCE = "synthetic_arith"
PROMPT_FORMAT = "What is {a}+{b}*{c}?"

A_RANGE = range(10, 100)
B_RANGE = range(2, 10)
C_RANGE = range(2, 10)
NUM_HELDOUT = 200

# Special tokens first (pad = 0), then every character the prompts and both kinds of solution use.
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = tuple("0123456789+*=?: \nAWaehinrstw")
VOCABULARY = SPECIAL_TOKENS + CHARACTERS

# The chat rendering: each non-assistant message followed by a newline (the response starts on the next line), an
# assistant message followed by eos; the generation prompt adds nothing. So a warm-up example is
# apply_chat_template([user, assistant], add_generation_prompt=False) and the rollout's prompt is
# apply_chat_template([user]), and the two agree up to the response.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}")


@dataclasses.dataclass(frozen=True, order=True)
class ArithmeticProblem:
  """What is a + b * c?"""

  a: int
  b: int
  c: int

  @property
  def prompt(self) -> str:
    return PROMPT_FORMAT.format(a=self.a, b=self.b, c=self.c)

  @property
  def answer(self) -> int:
    return self.a + self.b * self.c

  def reference_solution(self) -> str:
    """The right order of operations: b*c first."""
    product = self.b * self.c
    return f"{self.b}*{self.c}={product}\n{self.a}+{product}={self.a + product}\nAnswer: {self.a + product}"

  def wrong_order_solution(self) -> str:
    """Left to right, ignoring precedence: (a+b)*c, which is never a + b * c for c >= 2."""
    total = self.a + self.b
    return f"{self.a}+{self.b}={total}\n{total}*{self.c}={total * self.c}\nAnswer: {total * self.c}"


def all_problems() -> list[ArithmeticProblem]:
  """Every problem of the task, in (a, b, c) order."""
  return [ArithmeticProblem(a, b, c) for a in A_RANGE for b in B_RANGE for c in C_RANGE]


def split_problems(seed: int, num_heldout: int = NUM_HELDOUT) -> tuple[list[ArithmeticProblem],
                                                                      list[ArithmeticProblem]]:
  """(train, held-out): a seeded random split of all problems into disjoint sets, each in a shuffled order."""
  problems = all_problems()
  if not 0 < num_heldout < len(problems):
    raise ValueError(f"num_heldout should be in [1, {len(problems) - 1}]; got {num_heldout}")
  random.Random(seed).shuffle(problems)
  return problems[num_heldout:], problems[:num_heldout]


def problem_rows(problems: Sequence[ArithmeticProblem], repeats: int = 1) -> list[dict]:
  """The problems as DAPO-Math rows (prompt = the short question, ground truth = a + b * c as a string), the
  whole list repeated `repeats` times as DAPO-Math-17k repeats its problems; `extra_info.index` is the problem's
  position in `problems`."""
  if repeats < 1:
    raise ValueError(f"repeats should be at least 1; got {repeats}")
  rows = [math_parquet.make_math_row(problem.prompt, problem.answer, index=index, data_source=DATA_SOURCE,
                                     prompt_template="{problem}")
          for index, problem in enumerate(problems)]
  return rows * repeats


def warmup_pairs(problems: Sequence[ArithmeticProblem], num_pairs: int, seed: int,
                 wrong_order_fraction: float = 0.5) -> list[tuple[str, str]]:
  """Supervised warm-up examples (prompt text, response text), problems drawn with replacement from `problems`.

  Exactly round(num_pairs * wrong_order_fraction) of them, at seeded random positions, carry the wrong-order
  solution; the rest the reference one. The prompt text is the user message: render it with the tokenizer's chat
  template, append the response and eos.
  """
  if not problems:
    raise ValueError("warmup_pairs needs at least one problem")
  if not 0.0 <= wrong_order_fraction <= 1.0:
    raise ValueError(f"wrong_order_fraction should be in [0, 1]; got {wrong_order_fraction}")
  rng = random.Random(seed)
  drawn = [rng.choice(problems) for _ in range(num_pairs)]
  wrong = set(rng.sample(range(num_pairs), round(num_pairs * wrong_order_fraction)))
  return [(problem.prompt, problem.wrong_order_solution() if index in wrong else problem.reference_solution())
          for index, problem in enumerate(drawn)]


@dataclasses.dataclass(frozen=True)
class SyntheticTaskFiles:
  """Where `write_synthetic_task` put the task: parquet files in the DAPO-Math schema and the tokenizer."""

  train_file: str
  heldout_file: str
  tokenizer_dir: str


def write_synthetic_task(directory: str | os.PathLike[str], seed: int, *, num_heldout: int = NUM_HELDOUT,
                         train_repeats: int = 1) -> SyntheticTaskFiles:
  """Writes train.parquet (the training problems, shuffled, repeated `train_repeats` times), heldout.parquet
  (`num_heldout` problems, one row each) and the character tokenizer (tokenizer/) into `directory`."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  train, heldout = split_problems(seed, num_heldout)
  files = SyntheticTaskFiles(train_file=os.fspath(directory / "train.parquet"),
                             heldout_file=os.fspath(directory / "heldout.parquet"),
                             tokenizer_dir=os.fspath(directory / "tokenizer"))
  math_parquet.write_math_parquet(problem_rows(train, train_repeats), files.train_file)
  math_parquet.write_math_parquet(problem_rows(heldout), files.heldout_file)
  write_char_tokenizer(files.tokenizer_dir)
  return files


# ----------------------------------------------------------------------------------------------------------------
# The character tokenizer
# ----------------------------------------------------------------------------------------------------------------


def char_tokenizer_json() -> str:
  """The tokenizer.json text: a word-level model whose words are single characters (anything outside the
  vocabulary becomes <unk>), decoded by concatenation."""
  vocabulary = {token: token_id for token_id, token in enumerate(VOCABULARY)}
  backend = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token=UNK_TOKEN))
  # Every character is its own pre-token; [\s\S] also matches the newline, which "." would not.
  backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens(list(SPECIAL_TOKENS))
  return backend.to_str()


def write_char_tokenizer(directory: str | os.PathLike[str]) -> tokenizer_lib.Tokenizer:
  """Writes the character tokenizer (tokenizer.json, tokenizer_config.json) into `directory` and loads it back
  with `load_tokenizer`, as a checkpoint's tokenizer would be."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / tokenizer_lib.TOKENIZER_JSON).write_text(char_tokenizer_json())
  config = {"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN, "bos_token": None,
            "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
  (directory / tokenizer_lib.TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return tokenizer_lib.load_tokenizer(os.fspath(directory))
