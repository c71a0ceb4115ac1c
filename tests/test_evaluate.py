"""Validation metrics by hand, and `python -m dapo_jax.evaluate` end to end on tiny checkpoints of both kinds."""
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from dapo_jax import checkpoint
from dapo_jax import scoring
from dapo_jax import validation
from dapo_jax.data import math_parquet
from dapo_jax.data import prompts as prompts_lib
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model.config import get_preset
from dapo_jax.rl import math_answers
from dapo_jax.rl import rewards
from dapo_jax.rollout.responses import FINISH_EOS, Group, Response
from dapo_jax.rollout.sampling import SamplingParams
from tests import tokenizer_fixtures

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluate():
  """dapo_jax.evaluate, imported on use: the evaluator subprocess imports this module for its reward function,
  and a second import of dapo_jax.evaluate there (beside its __main__) would define its flags twice."""
  from dapo_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  return evaluate_lib


def length_parity_reward(solution_str: str, ground_truth: str, data_source: str = "", extra_info=None) -> dict:
  """A custom reward function (verl's signature) whose verdict the test can recompute from the response alone:
  correct when the response has an even number of characters; its prediction is the length mod 3."""
  del ground_truth, data_source, extra_info
  correct = len(solution_str) % 2 == 0
  return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": str(len(solution_str) % 3)}


# ------------------------------------------------------------------------------------------------------------
# Hand-computed metrics on fixed responses


class _FixedSampler:
  """Stands in for a GroupSampler: returns fixed response texts per prompt, finishing groups in reverse order."""

  def __init__(self, texts_by_prompt: list[list[str]], tokenizer):
    self.texts_by_prompt = texts_by_prompt
    self.tokenizer = tokenizer

  def sample(self, params, prompts, *, n, seed, sampling, on_group_done=None):
    del params, seed, sampling
    prompts = list(prompts)
    assert len(prompts) == len(self.texts_by_prompt)
    groups = []
    for index in reversed(range(len(prompts))):
      texts = self.texts_by_prompt[index]
      assert len(texts) == n
      responses = []
      for j, text in enumerate(texts):
        ids = np.array(self.tokenizer.encode(text) + [self.tokenizer.eos_id], np.int32)
        responses.append(Response(index, j, ids, np.zeros(len(ids), np.float32), np.zeros(len(ids), np.float32),
                                  FINISH_EOS))
      if on_group_done is not None:
        on_group_done(index, responses)
      groups.append(Group(index, np.asarray(prompts[index]), responses))
    return sorted(groups, key=lambda g: g.prompt_index)


def _example(problem: str, ground_truth: str, data_source: str, tokenizer) -> prompts_lib.PromptExample:
  return prompts_lib.PromptExample(prompt_ids=np.array(tokenizer.encode(problem), np.int32), prompt_text=problem,
                                   ground_truth=ground_truth, data_source=data_source, row_index=0,
                                   location="test, row 0")


def _brute_force_maj(predictions: list[str], accs: list[float], k: int) -> float:
  """E[maj@k] over all n^k equally likely ordered draws with replacement, each voted as verl's `calc_maj_val`
  does: the most drawn answer, ties to the one drawn first (`max` over an insertion-ordered dict)."""
  total = 0.0
  for draw in itertools.product(range(len(predictions)), repeat=k):
    votes: dict[str, list[float]] = {}
    for i in draw:
      votes.setdefault(predictions[i], []).append(accs[i])
    winner = max(votes, key=lambda answer: len(votes[answer]))
    total += votes[winner][0]
  return total / len(predictions) ** k


def test_metrics_and_records_match_hand_computed_values(evaluate):
  tokenizer = tokenizer_fixtures.char_tokenizer()
  examples = [_example("What is 1+2*2?", "5", "math_dapo", tokenizer),
              _example("What is 1+2*3?", "7", "math_dapo", tokenizer),
              _example("What is 1+2*4?", "9", "math_dapo", tokenizer),
              _example("What is 1+1*2?", "3", "other", tokenizer)]
  texts = [["Answer: 5", "Answer: 5", "Answer: 3", "Answer: 4"],   # 2 of 4 correct
           ["Answer: 7"] * 4,                                        # 4 of 4
           ["Answer: 1", "what", "Answer: 2", "Answer: 1"],          # 0 of 4 ("what" has no answer line)
           ["Answer: 3", "Answer: 8", "Answer: 8", "Answer: 8"]]     # 1 of 4, the wrong answer is the majority
  score_fns = rewards.reward_functions(["math_dapo", "other"])
  result = validation.validate(None, _FixedSampler(texts, tokenizer), examples, n=4, sampling=SamplingParams(),
                               seed=0, scorer=scoring.GroupScorer(tokenizer, score_fns))
  m = result.metrics
  # verl's split: mean@n, best@n/* and maj@n/* (n = 4, the largest k) are val-core; the rest val-aux.
  core = {source: f"val-core/{source}/acc" for source in ("math_dapo", "other")}
  aux = {source: f"val-aux/{source}/acc" for source in ("math_dapo", "other")}
  # math_dapo: c = 2, 4, 0 of n = 4.
  dapo, dapo_aux = core["math_dapo"], aux["math_dapo"]
  assert m[f"{dapo}/mean@4"] == pytest.approx((0.5 + 1 + 0) / 3)
  assert m[f"{dapo_aux}/std@4"] == pytest.approx((0.5 + 0 + 0) / 3)      # population std of [1, 1, 0, 0]
  assert m[f"{dapo_aux}/pass@1"] == pytest.approx(0.5)
  assert m[f"{dapo_aux}/pass@2"] == pytest.approx((5 / 6 + 1 + 0) / 3)  # 1 - C(2,2)/C(4,2) = 5/6
  assert m[f"{dapo_aux}/pass@4"] == pytest.approx(2 / 3)
  # best@k / worst@k of 0/1 values with c/n = p: a Bernoulli(1 - (1 - p)^k) / Bernoulli(p^k) value.
  assert m[f"{dapo_aux}/best@2/mean"] == pytest.approx((0.75 + 1 + 0) / 3)   # 1 - (1 - 1/2)^2
  assert m[f"{dapo_aux}/best@2/std"] == pytest.approx(math.sqrt(0.75 * 0.25) / 3)
  assert m[f"{dapo}/best@4/mean"] == pytest.approx((15 / 16 + 1 + 0) / 3)
  assert m[f"{dapo}/best@4/std"] == pytest.approx(math.sqrt(15 / 16 * 1 / 16) / 3)
  assert m[f"{dapo_aux}/worst@2/mean"] == pytest.approx((0.25 + 1 + 0) / 3)  # (1/2)^2
  assert m[f"{dapo_aux}/worst@4/mean"] == pytest.approx((1 / 16 + 1 + 0) / 3)
  assert m[f"{dapo_aux}/worst@4/std"] == pytest.approx(math.sqrt(1 / 16 * 15 / 16) / 3)
  # maj@2 of [5, 5, 3, 4]: the first draw decides (a tie goes to the answer drawn first): 1/2. maj@1 is one
  # draw, whose expectation is mean@4, so it is not emitted.
  assert m[f"{dapo_aux}/maj@2/mean"] == pytest.approx((0.5 + 1 + 0) / 3, abs=1e-12)
  assert m[f"{dapo_aux}/maj@2/std"] == pytest.approx(0.5 / 3, abs=1e-12)
  # maj@4 of [5, 5, 3, 4]: "5" drawn 3 or 4 times (5/16), or twice with the other two draws different (3/8 * 1/2)
  # or equal and "5" drawn first of the tied pair (3/8 * 1/2 * 1/2): 5/16 + 3/16 + 3/32 = 19/32.
  assert m[f"{dapo}/maj@4/mean"] == pytest.approx((19 / 32 + 1 + 0) / 3, abs=1e-12)
  assert m[f"{dapo}/maj@4/std"] == pytest.approx(math.sqrt(19 / 32 * 13 / 32) / 3, abs=1e-12)
  # other: c = 1 of 4.
  other, other_aux = core["other"], aux["other"]
  assert m[f"{other}/mean@4"] == pytest.approx(0.25)
  assert m[f"{other_aux}/std@4"] == pytest.approx(math.sqrt(0.25 * 0.75))
  assert m[f"{other_aux}/pass@2"] == pytest.approx(0.5)                # 1 - C(3,2)/C(4,2)
  assert m[f"{other_aux}/pass@4"] == pytest.approx(1.0)
  assert m[f"{other_aux}/best@2/mean"] == pytest.approx(1 - 0.75**2)
  assert m[f"{other}/best@4/mean"] == pytest.approx(1 - 0.75**4)
  assert m[f"{other_aux}/worst@4/mean"] == pytest.approx(0.25**4)
  # maj@2 of [3, 8, 8, 8]: the first draw decides: 1/4.
  assert m[f"{other_aux}/maj@2/mean"] == pytest.approx(0.25, abs=1e-12)
  # maj@4 of [3, 8, 8, 8]: "3" drawn 3 or 4 times (13/256), or twice and first (27/256): 40/256.
  assert m[f"{other}/maj@4/mean"] == pytest.approx(40 / 256, abs=1e-12)
  assert m[f"{other}/maj@4/std"] == pytest.approx(math.sqrt(40 / 256 * 216 / 256), abs=1e-12)
  # The hand values agree with verl's `calc_maj_val` rule applied to every one of the 4^4 ordered draws.
  assert _brute_force_maj(["5", "5", "3", "4"], [1, 1, 0, 0], 4) == pytest.approx(19 / 32, abs=1e-12)
  assert _brute_force_maj(["3", "8", "8", "8"], [1, 0, 0, 0], 4) == pytest.approx(40 / 256, abs=1e-12)
  for source in ("math_dapo", "other"):
    expected = {f"{core[source]}/{name}" for name in ("mean@4", "best@4/mean", "best@4/std", "maj@4/mean",
                                                      "maj@4/std")}
    expected |= {f"{aux[source]}/{name}" for name in ("std@4", "pass@1", "pass@2", "pass@4", "best@2/mean",
                                                      "best@2/std", "maj@2/mean", "maj@2/std")}
    expected |= {f"{aux[source]}/worst@{k}/{s}" for k in (2, 4) for s in ("mean", "std")}
    assert {key for key in m if f"/{source}/" in key} == expected
  assert len(m) == 2 * 17  # nothing besides the two sources

  records = [evaluate.problem_record(p) for p in result.problems]
  assert [r["index"] for r in records] == [0, 1, 2, 3]  # prompt order, though groups finished in reverse
  assert [r["num_correct"] for r in records] == [2, 4, 0, 1]
  assert records[0]["correct"] == [True, True, False, False]
  assert records[0]["predictions"] == ["5", "5", "3", "4"] and records[0]["majority_prediction"] == "5"
  assert records[2]["predictions"] == ["1", math_answers.INVALID_PREDICTION, "2", "1"]
  assert records[3]["majority_prediction"] == "8" and records[3]["accuracy"] == 0.25
  assert records[0]["responses"] == texts[0] and records[0]["response_lengths"] == [10, 10, 10, 10]
  assert records[0]["finish_reasons"] == ["eos"] * 4 and records[0]["ground_truth"] == "5"

  summary = evaluate.summarize(result, checkpoint="ckpt", description="fixed responses", data_files=["f"],
                               settings=evaluate.EvalSettings(k=4), eos_ids=tokenizer.eos_ids)
  assert summary["data_sources"] == {"math_dapo": {"problems": 3, "rows": 3}, "other": {"problems": 1, "rows": 1}}
  table = evaluate.format_table(summary)
  assert "math_dapo: 3 problems (3 rows), avg@4 = 0.5000" in table
  assert "other: 1 problems (1 rows), avg@4 = 0.2500" in table


def test_problems_without_predictions_vote_over_answer_lines():
  # A reward function that returns bare scores gives no `pred`: maj@k votes over the last "Answer:" lines.
  texts = ["x\nAnswer: 4", "Answer: 5", "Answer: 4"]
  assert scoring.vote_keys(texts, [{"score": 1.0}] * 3) == ["4", "5", "4"]
  # Where the function predicts for some responses, its predictions are used (None for the rest).
  assert scoring.vote_keys(texts, [{"pred": "4"}, {"pred": None}, {"pred": "4"}]) == ["4", None, "4"]


# ------------------------------------------------------------------------------------------------------------
# End to end on tiny checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny model over the character vocabulary, saved as a training workdir and as a Hugging Face
  directory, and a parquet file with two data sources and duplicated rows."""
  root = tmp_path_factory.mktemp("evaluate")
  tokenizer = tokenizer_fixtures.char_tokenizer()
  config = get_preset("tiny", vocab_size=32)
  params = qwen2.Qwen2(config, rngs=nnx.Rngs(3)).params
  workdir = root / "workdir"
  checkpoints = str(workdir / "checkpoints")
  checkpoint.write_policy_files(checkpoints, config, tokenizer)
  manager = checkpoint.Checkpointer(checkpoints)
  manager.save(7, {"params": params, "opt_state": {"count": np.int32(7)}}, {"rollout_step": 7})
  manager.wait()
  manager.close()
  hf_dir = root / "hf"
  hf_io.save_hf_checkpoint(params, config, hf_dir, generation_config={"eos_token_id": list(tokenizer.eos_ids)})
  tokenizer.save(hf_dir)
  rows = [math_parquet.make_math_row(f"What is {a}+{b}*{c}?", a + b * c, index=i, data_source=source,
                                     prompt_template="{problem}")
          for i, (a, b, c, source) in enumerate([(12, 3, 4, "arith_a"), (20, 2, 5, "arith_a"),
                                                 (31, 4, 4, "arith_a"), (45, 6, 2, "arith_b"),
                                                 (50, 3, 3, "arith_b")])]
  rows += [rows[0]] * 3 + [rows[3]]  # duplicates: 5 problems, 9 rows
  data = root / "problems.parquet"
  math_parquet.write_math_parquet(rows, data)
  return dict(workdir=str(workdir), hf_dir=str(hf_dir), data=str(data), root=root)


# The evaluation settings of the end-to-end tests (evaluate.EvalSettings fields).
SETTINGS = dict(k=4, max_response_length=12, max_prompt_length=32, num_slots=8, reward_workers=0,
                reward_function=f"{__name__}:length_parity_reward", decode_steps_per_call=4, seed=5)


def _check_against_problem_file(evaluate, output_dir: str) -> tuple[dict, list[dict]]:
  """Re-derives the summary's metrics from problems.jsonl; returns (summary, records)."""
  summary = json.load(open(os.path.join(output_dir, evaluate.SUMMARY_FILE)))
  records = [json.loads(line) for line in open(os.path.join(output_dir, evaluate.PROBLEMS_FILE))]
  k = summary["settings"]["k"]
  by_source = {}
  for r in records:
    assert r["k"] == k == len(r["responses"]) == len(r["correct"]) == len(r["response_lengths"])
    # The verdicts are the custom reward function's, recomputed from the written responses.
    assert r["correct"] == [len(text) % 2 == 0 for text in r["responses"]]
    assert r["predictions"] == [str(len(text) % 3) for text in r["responses"]]
    assert r["num_correct"] == sum(r["correct"]) and r["accuracy"] == pytest.approx(r["num_correct"] / k)
    assert all(reason in ("eos", "length") for reason in r["finish_reasons"])
    assert all(n <= summary["settings"]["max_response_length"] for n in r["response_lengths"])
    by_source.setdefault(r["data_source"], []).append(r)
  assert {s: {"problems": len(rs), "rows": sum(r["num_duplicates"] for r in rs)} for s, rs in by_source.items()} \
      == summary["data_sources"]
  metrics = summary["metrics"]
  assert k == 4
  for source, problems in by_source.items():
    core, aux = f"val-core/{source}/acc", f"val-aux/{source}/acc"
    assert metrics[f"{core}/mean@4"] == pytest.approx(np.mean([r["accuracy"] for r in problems]))
    for kk in (1, 2, 4):
      pass_k = np.mean([1 - math.comb(k - r["num_correct"], kk) / math.comb(k, kk) for r in problems])
      assert metrics[f"{aux}/pass@{kk}"] == pytest.approx(pass_k)
    for kk, key in ((2, f"{aux}/best@2/mean"), (4, f"{core}/best@4/mean")):
      assert metrics[key] == pytest.approx(np.mean([1 - (1 - r["accuracy"]) ** kk for r in problems]))
  return summary, records


def test_training_checkpoint_evaluation_agrees_with_its_problem_file(evaluate, tiny, tmp_path):
  stream_dir = tmp_path / "stream"
  (stream_dir).mkdir()
  (stream_dir / evaluate.PROBLEMS_FILE).write_text("a line of an earlier run\n")
  evaluation = evaluate.evaluate(tiny["workdir"], [tiny["data"]], evaluate.EvalSettings(**SETTINGS),
                                 on_problem_done=evaluate.ProblemStream(str(stream_dir)))
  # Streamed as problems finished: the same records (the earlier run's file replaced), in completion order.
  streamed = [json.loads(line) for line in open(stream_dir / evaluate.PROBLEMS_FILE)]
  assert sorted(streamed, key=lambda r: r["index"]) == evaluation.problems
  evaluate.write_outputs(str(tmp_path), evaluation)
  summary, records = _check_against_problem_file(evaluate, str(tmp_path))
  assert summary["checkpoint_description"].startswith("step 7 of ")
  assert summary["data_sources"] == {"arith_a": {"problems": 3, "rows": 6}, "arith_b": {"problems": 2, "rows": 3}}
  assert [r["num_duplicates"] for r in records] == [4, 1, 1, 2, 1]
  assert records[0]["ground_truth"] == "24" and records[0]["prompt"] == "What is 12+3*4?"
  assert summary["generated_tokens"] == sum(sum(r["response_lengths"]) for r in records)
  # The random model's responses have lengths of both parities, so the metrics are not degenerate.
  assert 0 < sum(r["num_correct"] for r in records) < 5 * SETTINGS["k"]
  # Spread over 4 devices (slots over data, heads over tensor), the same responses.
  sharded = evaluate.evaluate(tiny["workdir"], [tiny["data"]], evaluate.EvalSettings(**SETTINGS,
                                                                                      mesh="data=2,tensor=2"))
  assert [p["responses"] for p in sharded.problems] == [r["responses"] for r in records]
  assert sharded.summary["settings"]["mesh"] == "data=2,tensor=2"


def test_command_line_on_a_hugging_face_directory_matches_the_training_checkpoint(evaluate, tiny, tmp_path):
  output = tmp_path / "out"
  flags = [f"--{name}={value}" for name, value in SETTINGS.items()]
  result = subprocess.run([sys.executable, "-m", "dapo_jax.evaluate", "--checkpoint", tiny["hf_dir"], "--data",
                           tiny["data"], "--output", str(output), *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "arith_a: 3 problems (6 rows), avg@4 = " in result.stdout
  summary, records = _check_against_problem_file(evaluate, str(output))
  # Same weights, same seed: the same responses as from the training checkpoint, token for token.
  in_process = evaluate.evaluate(tiny["workdir"], [tiny["data"]], evaluate.EvalSettings(**SETTINGS))
  assert [r["responses"] for r in records] == [r["responses"] for r in in_process.problems]
  assert summary["metrics"] == pytest.approx(in_process.summary["metrics"])
  assert summary["settings"]["top_p"] == 0.7 and summary["settings"]["temperature"] == 1.0  # DAPO's defaults


def test_missing_files_and_bad_checkpoints_are_named(evaluate, tiny, tmp_path):
  result = subprocess.run([sys.executable, "-m", "dapo_jax.evaluate", "--checkpoint", tiny["workdir"], "--data",
                           str(tmp_path / "absent.parquet"), "--output", str(tmp_path / "out")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert f"dapo_jax.evaluate: error: {tmp_path / 'absent.parquet'}: no such data file" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
  with pytest.raises(FileNotFoundError, match="not a checkpoint"):
    evaluate.evaluate(str(tmp_path), [tiny["data"]], evaluate.EvalSettings(**SETTINGS))
  with pytest.raises(ValueError, match="--k must be positive"):
    evaluate.evaluate(tiny["workdir"], [tiny["data"]], evaluate.EvalSettings(k=0))
  with pytest.raises(ValueError, match="--mesh='tensor=two'"):
    evaluate.evaluate(tiny["workdir"], [tiny["data"]], evaluate.EvalSettings(mesh="tensor=two"))
  with pytest.raises(evaluate.EvaluationError, match="--mesh='tensor=3' on 8 devices"):
    evaluate.evaluate(tiny["workdir"], [tiny["data"]], evaluate.EvalSettings(mesh="tensor=3"))
  with pytest.raises(ImportError, match="no_such_module"):
    evaluate.evaluate(tiny["workdir"], [tiny["data"]], evaluate.EvalSettings(reward_function="no_such_module:f"))


def test_aime_2024_deduplicates_to_30_problems(evaluate, tiny, shared_data_dir):
  aime = shared_data_dir / "aime-2024.parquet"
  if not aime.exists():
    pytest.skip(f"{aime} is absent")
  settings = evaluate.EvalSettings(k=2, max_prompt_length=64, max_response_length=4, num_slots=16,
                                   reward_workers=0, decode_steps_per_call=4)
  evaluation = evaluate.evaluate(tiny["workdir"], [str(aime)], settings)
  summary, records = evaluation.summary, evaluation.problems
  assert summary["data_sources"] == {"math_dapo": {"problems": 30, "rows": 960}}
  assert all(r["num_duplicates"] == 32 and r["k"] == 2 for r in records)
  assert all(r["ground_truth"].isdigit() for r in records)  # AIME answers are integers
  # Prompts keep their last 64 tokens: the end of DAPO's instruction.
  assert all(r["prompt_tokens"] == 64 and r["prompt_truncated_tokens"] > 0 for r in records)
  # Four characters cannot hold an "Answer:" line: every prediction is math_dapo's [INVALID].
  assert all(p == math_answers.INVALID_PREDICTION for r in records for p in r["predictions"])
  assert summary["metrics"]["val-core/math_dapo/acc/mean@2"] == 0.0
  assert set(summary["metrics"]) == {f"val-core/math_dapo/acc/{name}" for name in (
      "mean@2", "best@2/mean", "best@2/std", "maj@2/mean", "maj@2/std")} | {
          f"val-aux/math_dapo/acc/{name}" for name in ("std@2", "pass@1", "pass@2", "worst@2/mean", "worst@2/std")}
  assert sum(len(p.responses) for p in evaluation.result.problems) == 60


# ------------------------------------------------------------------------------------------------------------
# A training run's own validation, reproduced by the evaluator from its workdir alone


def test_evaluating_a_training_run_with_no_flags_reproduces_its_last_validation(evaluate, tmp_path):
  # A run of one rollout step on the embedded default (a few warm-up steps for a base model), validated at its
  # end on 6 held-out problems x 2 samples, as the trainer does every trainer.test_freq steps. The barely
  # warmed-up model solves no sum, so the run scores with `length_parity_reward`, under which the metrics of
  # its random responses are not all 0.
  from dapo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from dapo_jax import metrics  # pylint: disable=g-import-not-at-top
  from dapo_jax import train  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(str(REPO_ROOT / "configs" / "default.py"))
  c.synthetic.num_heldout = 6
  c.warmup.steps = 3
  c.warmup.batch_size = 8
  c.data.train_batch_size = c.data.gen_batch_size = 4
  c.rollout.n = 4
  c.rollout.max_num_seqs = 16
  c.rollout.val_kwargs.n = 2
  c.rollout.val_kwargs.top_p = 0.9  # not the evaluator's own default (0.7): it must come from the run
  c.actor.ppo_mini_batch_size = 4
  c.algorithm.filter_groups.enable = False  # keep every group: one generation batch per step
  c.trainer.total_training_steps = 1
  c.trainer.save_freq = 1
  c.trainer.test_freq = 1
  c.trainer.val_before_train = False
  c.trainer.seed = 3
  c.reward.function = f"{__name__}:length_parity_reward"
  workdir = str(tmp_path / "run")
  returned = train.train(c, workdir)  # the last step's metrics, its validation's among them
  last_validation = {tag: value for tag, value in returned.items() if tag.startswith("val-")}
  # The run's TensorBoard scalars: the validation is written at the step it follows, in float32 (as TensorBoard
  # stores scalars).
  in_training = {tag: curve for tag, curve in metrics.read_scalars(workdir).items() if tag.startswith("val-")}
  assert set(in_training) == set(last_validation)
  assert all([step for step, _ in curve] == [1] for curve in in_training.values())
  assert {tag: curve[-1][1] for tag, curve in in_training.items()} == {
      tag: float(np.float32(value)) for tag, value in last_validation.items()}

  # The evaluator on the workdir, every setting (data files included) from the run.
  run = evaluate.training_run_of(workdir)
  assert run is not None and run.workdir == workdir
  settings = run.validation_settings()
  assert settings["k"] == 2 and settings["top_p"] == 0.9 and settings["seed"] == validation.validation_seed(3)
  data_files = run.validation_files()
  assert data_files == [os.path.join(workdir, "data", "heldout.parquet")]
  evaluation = evaluate.evaluate(workdir, data_files, evaluate.EvalSettings(**{**settings, "reward_workers": 0}))
  assert evaluation.summary["checkpoint_description"].startswith("step 1 of ")
  core = {tag: value for tag, value in evaluation.summary["metrics"].items() if tag.startswith("val-core/")}
  assert set(core) == {f"val-core/synthetic_arith/acc/{name}" for name in (
      "mean@2", "best@2/mean", "best@2/std", "maj@2/mean", "maj@2/std")}
  assert 0 < core["val-core/synthetic_arith/acc/mean@2"] < 1  # not a degenerate run: both verdicts occur
  # Exactly: the same weights, prompts, sampler settings and seed give the same responses, token for token, so
  # the same numbers, in float64 as validation computed them and in float32 as the run's event files hold them.
  assert core == {tag: last_validation[tag] for tag in core}
  assert {tag: float(np.float32(value)) for tag, value in core.items()} == {
      tag: in_training[tag][-1][1] for tag in core}
  assert evaluation.summary["metrics"] == last_validation  # val-aux too
