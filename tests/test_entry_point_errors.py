"""`python -m dapo_jax.train` with bad input: exit status 2 and one line naming the key or file, no traceback;
and the README's TPU command, as written there, gets through the config loader to the input checks."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from dapo_jax import config as config_lib
from tests import test_config as config_tests

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPE = "configs/dapo_qwen2_5_0_5b.py"
# Each case stops in the config and input checks, before JAX starts a backend or compiles anything.
TIMEOUT_S = 60


def _train(*args: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dapo_jax.train", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT_S, check=False)


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The one stderr line of a user error; fails on anything else (a traceback, log lines, status)."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("dapo_jax.train: error: config."), lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Data files that exist (the checks look for the files; nothing here reads them) and a model directory with
  the files a Hugging Face checkpoint has."""
  root = tmp_path_factory.mktemp("inputs")
  for name in ("train.parquet", "val.parquet"):
    (root / name).write_bytes(b"")
  model = root / "model"
  model.mkdir()
  (model / "config.json").write_text("{}")
  (model / "model.safetensors").write_bytes(b"")
  return dict(train=str(root / "train.parquet"), val=str(root / "val.parquet"), model=str(model), root=root)


def _recipe_args(inputs, **overrides) -> list[str]:
  keys = {"data.train_files": inputs["train"], "data.val_files": inputs["val"],
          "model.hf_checkpoint": inputs["model"], **overrides}
  return [f"--config={RECIPE}", f"--workdir={inputs['root'] / 'run'}",
          *(f"--config.{key}={value}" for key, value in keys.items() if value is not None)]


def test_a_missing_training_file_is_named(inputs):
  line = _error_line(_train(*_recipe_args(inputs, **{"data.train_files": f"{inputs['train']},/nonexistent.parquet"})))
  assert "config.data.train_files: /nonexistent.parquet: no such file" in line
  assert not (inputs["root"] / "run").exists()  # stopped before the workdir was made


def test_a_missing_validation_file_is_named(inputs):
  line = _error_line(_train(*_recipe_args(inputs, **{"data.val_files": "/nonexistent/aime.parquet"})))
  assert "config.data.val_files: /nonexistent/aime.parquet: no such file" in line


def test_a_missing_hf_checkpoint_directory_is_named(inputs):
  line = _error_line(_train(*_recipe_args(inputs, **{"model.hf_checkpoint": "/nonexistent/Qwen2.5-0.5B"})))
  assert "config.model.hf_checkpoint: /nonexistent/Qwen2.5-0.5B: no such directory" in line


def test_an_hf_checkpoint_without_weights_is_named(inputs, tmp_path):
  (tmp_path / "config.json").write_text("{}")
  line = _error_line(_train(*_recipe_args(inputs, **{"model.hf_checkpoint": str(tmp_path)})))
  assert f"config.model.hf_checkpoint: {tmp_path} has no *.safetensors weights" in line


def test_an_overlong_buffer_as_long_as_the_responses_is_refused(inputs):
  recipe = config_lib.load_config_file(str(REPO / RECIPE))
  length = recipe.data.max_response_length
  line = _error_line(_train(*_recipe_args(inputs, **{"reward.overlong_buffer.len": length})))
  assert re.search(rf"config\.reward\.overlong_buffer\.len: \({length}\) must be shorter than "
                   rf"data\.max_response_length \({length}\)", line), line


def test_a_recipe_without_training_files_says_they_are_required():
  # The recipes name no data: the user's command line must.
  line = _error_line(_train(f"--config={RECIPE}"))
  assert line.startswith("dapo_jax.train: error: config.data.train_files: required")
  assert "--config.data.train_files=" in line  # and says how to give them


# ------------------------------------------------------------------------------------------------------------
# The README's TPU command


def _readme_tpu_command() -> str:
  """The gcloud command of the README's "Running the real recipe on a TPU VM" section, as written there."""
  readme = (REPO / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
  commands = [block[block.index("gcloud compute tpus"):] for block in blocks if "gcloud compute tpus" in block]
  assert len(commands) == 1, f"expected one gcloud command in README.md, found {len(commands)}"
  return commands[0]


def test_the_readme_tpu_command_as_written_parses_to_a_valid_config(monkeypatch):
  # tests/test_config.py checks a copy of the command; this reads it from README.md, so the two cannot drift.
  monkeypatch.chdir(REPO)  # the command runs in the repository root
  args = config_tests._remote_arguments(_readme_tpu_command())  # pylint: disable=protected-access
  config, workdir = config_tests._parse_command_line(args)  # pylint: disable=protected-access
  assert workdir == "/mnt/shared/runs/dapo32b"
  assert config.distributed.initialize == "always"
  assert config_lib.file_list(config.data.train_files) == ["/mnt/shared/data/dapo-math-17k.parquet"]
  assert config_lib.file_list(config.data.val_files) == ["/mnt/shared/data/aime-2024.parquet"]
  assert config.model.hf_checkpoint == "/mnt/shared/Qwen2.5-32B"
  assert config.data.train_batch_size == 512 and config.rollout.n == 16  # the 32B recipe
  config_lib.validate(config, num_processes=16)  # a v5p-64 has 16 hosts


def test_the_readme_tpu_command_reaches_the_input_checks():
  # Run as written (on a machine without the shared disk): the command line parses and the config validates;
  # the first thing missing is the training data, before jax.distributed is joined.
  args = config_tests._remote_arguments(_readme_tpu_command())  # pylint: disable=protected-access
  line = _error_line(_train(*args))
  assert "config.data.train_files: /mnt/shared/data/dapo-math-17k.parquet: no such file" in line
