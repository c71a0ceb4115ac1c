"""dapo_jax.runtime: quiet start-up, JAX's persistent compilation cache, and user errors as one line."""
import logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_jax import config as config_lib
from dapo_jax import runtime
from dapo_jax.data import math_parquet
from dapo_jax.model import hf_io
from dapo_jax.model import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax/_src/compiler.py records it on every cache hit


def _python(code: str, *args: str, env_updates: dict | None = None, drop_env=(),
            cwd=ROOT) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in drop_env}
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env.update(env_updates or {})
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=600, check=False)


# ------------------------------------------------------------------------------------------------------------
# Quiet start-up

# The entry points' start-up: runtime first, then the imports that bring TensorFlow (clu), orbax and JAX; in
# main, the root logger at INFO (as train.main sets it), then JAX's backend, a checkpoint, and our own line.
_STARTUP_PROGRAM = """
from dapo_jax import runtime
import logging
import tempfile
from absl import app
from absl import flags
from clu import metric_writers
import jax
import jax.numpy as jnp
from dapo_jax import checkpoint

def main(argv):
  logging.getLogger().setLevel(logging.INFO)
  runtime.quiet_third_party_logs(verbose=flags.FLAGS.verbosity >= 1)
  print(runtime.start_backends(verbose=flags.FLAGS.verbosity >= 1))
  with tempfile.TemporaryDirectory() as directory:
    checkpointer = checkpoint.Checkpointer(directory)
    checkpointer.save(1, {"params": {"w": jnp.ones(3)}}, {"step": 1})
    checkpointer.wait()
    checkpointer.close()
  logging.info("our own progress line")

app.run(main)
"""
# What TensorFlow, CUDA probing and JAX's backend probing print, seen on CPU machines and TPU VMs.
_NOISE = ("failed call to cuInit", "oneDNN", "Unable to initialize backend", "absl::InitializeLog",
          "cudart_stub", "Could not find cuda drivers", "cpu_feature_guard", "TensorFlow binary is optimized",
          # libtpu's failed probe on a machine without TPU chips (when libtpu is installed and not in use)
          "TPU accelerator type", "unexpected worker hostname", "Source Location Trace",
          "Logging before InitGoogle")
# An absl INFO line: "I1206 20:46:56.140196 140123488164736 file.py:13] message"; native ones say I0000.
_INFO_LINE = re.compile(r"^I\d{4} \S+\s+\d+ (\S+):\d+\]")


@pytest.fixture(scope="module")
def startup_logs():
  """stderr of the start-up program, quiet and with --verbosity=1. JAX_PLATFORMS is unset, as for a user, so
  JAX probes every backend it knows."""
  quiet = _python(_STARTUP_PROGRAM, drop_env=("JAX_PLATFORMS",))
  verbose = _python(_STARTUP_PROGRAM, "--verbosity=1", drop_env=("JAX_PLATFORMS",))
  assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr[-3000:] + verbose.stderr[-3000:]
  return quiet.stderr, verbose.stderr


def test_startup_prints_only_our_lines(startup_logs):
  quiet, _ = startup_logs
  assert not [line for line in quiet.splitlines() if any(noise in line for noise in _NOISE)], quiet
  info_sources = {m.group(1) for m in map(_INFO_LINE.match, quiet.splitlines()) if m}
  assert info_sources == {"<string>", "checkpoint.py"}, quiet  # the program's and dapo_jax.checkpoint's INFO
  assert "our own progress line" in quiet and "Checkpoint of step 1 started" in quiet


def test_verbosity_shows_the_third_party_lines_again(startup_logs):
  quiet, verbose = startup_logs
  info_sources = {m.group(1) for m in map(_INFO_LINE.match, verbose.splitlines()) if m}
  assert "checkpoint_manager.py" in info_sources, verbose  # orbax's INFO lines
  assert len(verbose.splitlines()) > len(quiet.splitlines()) + 10


def test_quiet_imports_hide_native_output_and_replay_it_when_an_import_fails(tmp_path):
  # Stand-ins for TensorFlow: output written straight to file descriptor 2, as native libraries do, at import
  # and from an absl after-init callback.
  (tmp_path / "noisy.py").write_text(textwrap.dedent("""
      import os
      from absl import app
      os.write(2, b"noise at import\\n")
      app.call_after_init(lambda: os.write(2, b"noise after flags\\n"))
  """))
  (tmp_path / "broken.py").write_text(textwrap.dedent("""
      import os
      os.write(2, b"the reason it failed\\n")
      raise ImportError("broken on purpose")
  """))
  program = """
      import os
      import sys
      from absl import app
      from dapo_jax import runtime
      if "--loud" not in sys.argv:
        runtime.install_quiet_imports(["noisy", "broken"])
      import noisy
      try:
        import broken
      except ImportError as error:
        print("caught:", error)
      def main(argv):
        os.write(2, b"main runs\\n")
      app.run(main, argv=sys.argv[:1])
  """
  env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
  quiet = _python(program, env_updates=env)
  assert quiet.returncode == 0, quiet.stderr
  assert "caught: broken on purpose" in quiet.stdout
  assert "noise" not in quiet.stderr
  assert "the reason it failed" in quiet.stderr and "main runs" in quiet.stderr
  loud = _python(program, "--loud", env_updates=env)
  assert "noise at import" in loud.stderr and "noise after flags" in loud.stderr


_LIBTPU_PROBE = (b"Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator "
                 b"type, please set env var `TPU_ACCELERATOR_TYPE` manually\n"
                 b"WARNING: Logging before InitGoogle() is written to STDERR\n"
                 b"=== Source Location Trace: ===\nlearning/45eac/tfrc/runtime/libtpu_init_utils.cc:327\n")
_OTHER_WARNING = b"WARNING: An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed\n"


@pytest.mark.parametrize("verbose, tpu_chips, shown", [
    (False, False, _OTHER_WARNING),                   # only libtpu's failed probe is dropped
    (True, False, _LIBTPU_PROBE + _OTHER_WARNING),    # verbose: everything
    (False, True, _LIBTPU_PROBE + _OTHER_WARNING),    # a TPU VM: libtpu's output explains a failing TPU
])
def test_start_backends_drops_libtpus_probe_report_on_machines_without_tpus(monkeypatch, capfd, verbose,
                                                                            tpu_chips, shown):
  def devices():  # what starting the backends prints natively on a CPU machine with libtpu installed
    os.write(2, _LIBTPU_PROBE + _OTHER_WARNING)
    return ["cpu:0"]
  monkeypatch.setattr(runtime, "_has_tpu_chips", lambda: tpu_chips)
  monkeypatch.setattr(jax, "devices", devices)
  capfd.readouterr()
  assert runtime.start_backends(verbose) == ["cpu:0"]
  assert capfd.readouterr().err == shown.decode()


def test_silenced_stderr_is_replayed_whole_when_the_body_fails(capfd):
  with pytest.raises(RuntimeError, match="failed"):
    with runtime._native_stderr_silenced():  # pylint: disable=protected-access
      os.write(2, b"native line\n")
      raise RuntimeError("failed")
  assert capfd.readouterr().err == "native line\n"


@pytest.mark.parametrize("argv, level", [
    (["prog"], 0),
    (["prog", "--verbosity=1"], 1),
    (["prog", "--verbosity", "2"], 2),
    (["prog", "-v", "1"], 1),
    (["prog", "-v=1", "--config.x=3"], 1),
    (["prog", "--v=-1"], -1),
    (["prog", "--verbosity=loud"], 0),   # absl reports the bad value when it parses
    (["prog", "--", "--verbosity=1"], 0),  # after --: not a flag
    (["prog", "--verbosity_x=1"], 0),
])
def test_argv_verbosity(argv, level):
  assert runtime.argv_verbosity(argv) == level


@pytest.fixture
def restore_logging():
  absl_logger, jax_logger = logging.getLogger("absl"), logging.getLogger("jax")
  filters, level = list(absl_logger.filters), jax_logger.level
  yield
  absl_logger.filters[:] = filters
  jax_logger.setLevel(level)


def _record(level: int, pathname: str) -> logging.LogRecord:
  return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_quiet_third_party_logs_drops_orbax_info_only(restore_logging):  # pylint: disable=unused-argument
  absl_logger = logging.getLogger("absl")
  orbax_file = os.path.join(os.sep, "venv", "site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  runtime.quiet_third_party_logs(verbose=False)
  assert not absl_logger.filter(_record(logging.INFO, orbax_file))
  assert absl_logger.filter(_record(logging.WARNING, orbax_file))
  assert absl_logger.filter(_record(logging.INFO, os.path.join(os.sep, "src", "dapo_jax", "train.py")))
  assert logging.getLogger("jax").getEffectiveLevel() == logging.WARNING
  runtime.quiet_third_party_logs(verbose=True)
  assert absl_logger.filter(_record(logging.INFO, orbax_file))
  assert logging.getLogger("jax").level == logging.NOTSET


# ------------------------------------------------------------------------------------------------------------
# Persistent compilation cache

_COMPILE_PROGRAM = f"""
import sys
from dapo_jax import runtime
import jax
import jax.numpy as jnp

hits = []
jax.monitoring.register_event_listener(
    lambda event, **kwargs: hits.append(event) if event == {CACHE_HIT_EVENT!r} else None)
directory = runtime.enable_compilation_cache(sys.argv[1])
print(directory, jax.jit(lambda x: x * 2.0 + 1.0)(jnp.arange(3.0)).tolist(), len(hits))
"""


def test_a_second_process_finds_the_first_ones_programs_in_the_cache(tmp_path):
  directory = tmp_path / "cache"
  first = _python(_COMPILE_PROGRAM, str(directory))
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout.split() == [str(directory), "[1.0,", "3.0,", "5.0]", "0"]  # compiled: nothing to hit
  assert os.listdir(directory)  # a millisecond's CPU compilation is written too
  second = _python(_COMPILE_PROGRAM, str(directory))
  assert second.returncode == 0, second.stderr[-3000:]
  assert int(second.stdout.split()[-1]) > 0


def test_auto_is_the_user_cache_and_empty_is_off(tmp_path):
  xdg = tmp_path / "xdg"
  auto = _python(_COMPILE_PROGRAM, "auto", env_updates={"XDG_CACHE_HOME": str(xdg)},
                 drop_env=("JAX_COMPILATION_CACHE_DIR",))
  assert auto.returncode == 0, auto.stderr[-3000:]
  expected = xdg / "dapo_jax" / "jax_compilation_cache"
  assert auto.stdout.split()[0] == str(expected) and os.listdir(expected)
  assert (expected.stat().st_mode & 0o777) == 0o700  # JAX runs what it finds there: private to the user
  off = _python(_COMPILE_PROGRAM, "", env_updates={"XDG_CACHE_HOME": str(tmp_path / "unused")})
  assert off.returncode == 0, off.stderr[-3000:]
  assert off.stdout.split()[0] == "None" and not (tmp_path / "unused").exists()


def test_default_compilation_cache_dir(monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
  assert runtime.default_compilation_cache_dir() == "/xdg/dapo_jax/jax_compilation_cache"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", "/home/someone")
  assert runtime.default_compilation_cache_dir() == "/home/someone/.cache/dapo_jax/jax_compilation_cache"
  assert runtime.compilation_cache_dir("~/c") == "/home/someone/c"
  assert runtime.compilation_cache_dir("") is None and runtime.compilation_cache_dir(None) is None


# ------------------------------------------------------------------------------------------------------------
# User errors: one line, exit status 2


def _run_as_program(fn, capsys) -> str:
  """What `exit_on_user_error(fn)` prints to stderr; asserts it exits with status 2."""
  with pytest.raises(SystemExit) as exit_info:
    runtime.exit_on_user_error(fn, program="dapo_jax.train")()
  assert exit_info.value.code == runtime.USER_ERROR_EXIT_CODE
  captured = capsys.readouterr()
  assert captured.out == ""
  return captured.err


def _valid_config(tmp_path):
  (tmp_path / "train.parquet").write_bytes(b"")
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text("{}")
  (model / "model.safetensors").write_bytes(b"")
  c = config_lib.load_config_file(str(ROOT / "configs" / "dapo_qwen2_5_0_5b.py"))
  c.data.train_files, c.data.val_files, c.model.hf_checkpoint = str(tmp_path / "train.parquet"), "", str(model)
  return c


@pytest.mark.parametrize("edit, expected", [
    (lambda c, d: setattr(c.data, "train_files", f"{d}/dapo-math-17k.parquet"),
     r"config\.data\.train_files: \S+/dapo-math-17k\.parquet: no such file; give the parquet file\(s\) as "
     r"--config\.data\.train_files=PATH\[,PATH\.\.\.\]"),
    (lambda c, d: setattr(c.model, "hf_checkpoint", f"{d}/Qwen2.5-0.5B"),
     r"config\.model\.hf_checkpoint: \S+/Qwen2\.5-0\.5B: no such directory"),
    (lambda c, d: setattr(c.reward.overlong_buffer, "len", c.data.max_response_length),
     r"config\.reward\.overlong_buffer\.len: \(8192\) must be shorter than data\.max_response_length \(8192\)"),
    (lambda c, d: setattr(c.data, "gen_batch_size", 32),
     r"config\.data\.gen_batch_size: \(32\) must be >= data\.train_batch_size \(64\)"),
    (lambda c, d: setattr(c.data, "train_files", None), r"config\.data\.train_files: required"),
])
def test_bad_configs_end_in_one_line_naming_the_key(tmp_path, capsys, edit, expected):
  c = _valid_config(tmp_path)
  config_lib.validate(c, workdir=str(tmp_path))
  edit(c, tmp_path)
  stderr = _run_as_program(lambda: config_lib.validate(c, workdir=str(tmp_path)), capsys)
  assert len(stderr.splitlines()) == 1, stderr
  assert re.fullmatch(r"dapo_jax\.train: error: " + expected + r".*\n", stderr), stderr


def test_a_data_file_in_the_wrong_schema_ends_in_one_line(tmp_path, capsys):
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"question": ["1+1?"]}), path)
  stderr = _run_as_program(lambda: math_parquet.read_math_files([str(path)]), capsys)
  assert len(stderr.splitlines()) == 1 and stderr.startswith(f"dapo_jax.train: error: {path}"), stderr


@pytest.mark.parametrize("error", [
    FileNotFoundError("/data/x.parquet: no such data file"),
    hf_io.CheckpointError("/m/config.json: not found; a Hugging Face checkpoint directory needs it"),
    tokenizer_lib.TokenizerLoadError("/m/tokenizer.json: not valid JSON"),
    config_lib.ConfigError("config.data.val_files: 'a,,b' has an empty path\n(second line)"),
])
def test_every_user_error_is_one_line(capsys, error):
  def fail():
    raise error
  stderr = _run_as_program(fail, capsys)
  assert stderr == f"dapo_jax.train: error: {' '.join(str(error).split())}\n"


def test_other_errors_and_verbose_runs_keep_the_traceback():
  def bug():
    raise KeyError("a bug, not a bad input")
  with pytest.raises(KeyError):
    runtime.exit_on_user_error(bug, program="p")()

  def bad_config():
    raise config_lib.ConfigError("config.x: bad")
  with pytest.raises(config_lib.ConfigError):
    runtime.exit_on_user_error(bad_config, program="p", verbose=True)()
  assert runtime.exit_on_user_error(lambda x: x + 1, program="p")(1) == 2
