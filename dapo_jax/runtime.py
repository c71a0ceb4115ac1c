"""Process set-up for the entry points (`dapo_jax.train`, `dapo_jax.evaluate`): quiet third-party start-up
output, JAX's persistent compilation cache, and input errors as one line instead of a traceback.

Import this module before anything that imports TensorFlow (clu's metric writers, tensorflow_datasets): it
installs an import hook that silences what TensorFlow's native libraries print while they load (oneDNN and
CPU-feature banners, "Could not find cuda drivers", "failed call to cuInit", "All log messages before
absl::InitializeLog() ..."). TensorFlow 2.21 writes those through C++ absl logging before any Python code can
configure it, and ignores TF_CPP_MIN_LOG_LEVEL, so the only way to hide them is to point file descriptor 2
elsewhere while the library loads. Nothing is hidden when absl's verbosity is raised on the command line
(`--verbosity=1` or `-v 1`), and an import that fails with a Python exception prints everything it captured;
a process that dies inside the import (a native crash) takes the captured text with it, so rerun with
`--verbosity=1` to see it. The hook costs nothing in a program that never imports TensorFlow.

Then, first thing in `main` (after flags are parsed):
    runtime.quiet_third_party_logs(verbose=flags.FLAGS.verbosity >= 1)
    runtime.enable_compilation_cache(config.trainer.compilation_cache_dir)
start JAX's backends with `runtime.start_backends(verbose)` once the processes have joined, and run the
program under `runtime.exit_on_user_error` so a bad config or a missing input file ends with one line naming
the key or file.
"""
from collections.abc import Callable, Sequence
import contextlib
import functools
import importlib.abc
import logging
import os
import sys
import tempfile
from typing import Any, TypeVar

# Modules whose import prints native start-up chatter to stderr (see the module docstring).
QUIET_IMPORTS = ("tensorflow",)
# `trainer.compilation_cache_dir` values: AUTO picks the default directory, OFF disables the cache.
AUTO, OFF = "auto", ""
# Exit status of a run stopped by a user error (bad config value, missing input): 2, as for a usage error.
USER_ERROR_EXIT_CODE = 2

_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------------------------
# Quiet start-up


def argv_verbosity(argv: Sequence[str]) -> int:
  """The value of absl's `--verbosity` / `-v` flag in `argv` (0, absl's default, when absent or unreadable).

  Read from the raw command line because the import hook must decide before absl parses the flags.
  """
  level = 0
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    for name in ("--verbosity", "-verbosity", "--v", "-v"):
      if arg == name and i + 1 < len(args):
        value = args[i + 1]
      elif arg.startswith(name + "="):
        value = arg[len(name) + 1:]
      else:
        continue
      try:
        level = int(value)
      except ValueError:
        pass  # absl reports the bad value itself when it parses the flags
  return level


@contextlib.contextmanager
def _native_stderr_silenced(keep: Callable[[str], bool] = lambda line: False):
  """Sends file descriptor 2 (where native libraries print) to a temporary file meanwhile; then writes back the
  lines `keep` accepts, or every line if the body fails.

  The whole process's stderr goes there meanwhile, every thread's and Python's too (hence `keep`): meant for
  start-up, before other threads.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      lines = capture.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if failed or keep(line)))
      sys.stderr.flush()


def _silenced(callback: Callable[[], Any]) -> Callable[[], Any]:
  @functools.wraps(callback)
  def run_silenced():
    with _native_stderr_silenced():
      return callback()
  return run_silenced


@contextlib.contextmanager
def _quiet_after_init_callbacks():
  """Silences the callbacks registered with absl's `app.call_after_init` meanwhile.

  TensorFlow registers one (tensorflow/python/distribute/combinations.py lists the GPUs once absl has parsed
  the flags), which initialises CUDA and prints "failed call to cuInit" on a machine without an NVIDIA driver.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  register = app.call_after_init
  app.call_after_init = lambda callback: register(_silenced(callback))
  try:
    yield
  finally:
    app.call_after_init = register


class _QuietLoader(importlib.abc.Loader):
  """Runs another loader's `exec_module` with native stderr silenced, and is otherwise that loader."""

  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    module.__loader__ = self._loader  # the module sees its real loader (resources, reloads)
    if module.__spec__ is not None:
      module.__spec__.loader = self._loader
    with _native_stderr_silenced(), _quiet_after_init_callbacks():
      self._loader.exec_module(module)

  def __getattr__(self, name):
    return getattr(self._loader, name)


class _QuietImportFinder(importlib.abc.MetaPathFinder):
  """Finds the modules in `names` with the other finders and loads them through `_QuietLoader`."""

  def __init__(self, names: Sequence[str]):
    self.names = set(names)

  def find_spec(self, fullname, path, target=None):
    if fullname not in self.names:
      return None
    for finder in sys.meta_path:
      if finder is self or not hasattr(finder, "find_spec"):
        continue
      spec = finder.find_spec(fullname, path, target)
      if spec is not None:
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
          spec.loader = _QuietLoader(spec.loader)
        return spec
    return None


def install_quiet_imports(names: Sequence[str] = QUIET_IMPORTS) -> None:
  """Silences what importing the modules `names` prints to stderr (a module already imported is not affected),
  and the absl after-init callbacks they register."""
  for finder in sys.meta_path:
    if isinstance(finder, _QuietImportFinder):
      finder.names.update(names)
      return
  sys.meta_path.insert(0, _QuietImportFinder(names))


def uninstall_quiet_imports() -> None:
  sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _QuietImportFinder)]


class _DropLibraryInfo(logging.Filter):
  """Drops records below WARNING logged from files under one of `directories` (e.g. `/orbax/`)."""

  def __init__(self, directories: Sequence[str]):
    super().__init__()
    self._parts = tuple(f"{os.sep}{d}{os.sep}" for d in directories)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(part in record.pathname for part in self._parts)


# Orbax logs every step of every save and restore at INFO through absl's logger (about half the lines of a
# training log); absl's logger carries everyone's absl.logging calls, so the filter picks orbax's by file.
_ORBAX_FILTER = _DropLibraryInfo(["orbax"])
# JAX logs its backend probing at INFO ("Unable to initialize backend 'tpu'", plugin discovery): normal on
# every machine without that accelerator, yet it reads like an error.
_QUIET_LOGGERS = ("jax",)


def quiet_third_party_logs(verbose: bool) -> None:
  """Hides third-party INFO chatter (JAX's backend probing, orbax's checkpoint details), or shows it again.

  Warnings and errors always pass. With `verbose` every message is shown, and so is what TensorFlow prints
  while it loads, if it has not been imported yet (see `install_quiet_imports`).
  """
  absl_logger = logging.getLogger("absl")
  if verbose:
    uninstall_quiet_imports()
    absl_logger.removeFilter(_ORBAX_FILTER)
    for name in _QUIET_LOGGERS:
      logging.getLogger(name).setLevel(logging.NOTSET)
    return
  install_quiet_imports()
  absl_logger.addFilter(_ORBAX_FILTER)  # a no-op when already added
  for name in _QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)


def _has_tpu_chips() -> bool:
  """Whether this machine has TPU chips, by JAX's own test (the PCI devices; it skips libtpu's metadata query
  without them). True when that test is unavailable, so that nothing is hidden on a guess."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError):
    return True


# What libtpu prints when it probes a machine without TPU chips (libtpu 0.0.42); anything else is kept.
_LIBTPU_PROBE_NOISE = ("could not determine TPU", "Logging before InitGoogle", "unexpected worker hostname",
                       "=== Source Location Trace", "libtpu_init_utils.cc")


def start_backends(verbose: bool) -> list:
  """`jax.devices()`, whose first call starts JAX's backends; on a machine without TPU chips, without libtpu's
  report of its failed probe (not with `verbose`; everything else printed meanwhile is kept).

  With libtpu installed (requirements-tpu.txt) JAX probes for a TPU everywhere, and on a machine without one
  libtpu prints its failed probe natively ("could not determine TPU accelerator type", "unexpected worker
  hostname", a source-location trace) before JAX falls back to the CPU. On a TPU VM nothing is hidden: there
  libtpu's output explains a TPU that fails to start. Call it after `distributed.initialize_from_config`, which
  must come before the backends start.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if verbose or _has_tpu_chips():
    return jax.devices()
  with _native_stderr_silenced(keep=lambda line: not any(noise in line for noise in _LIBTPU_PROBE_NOISE)):
    return jax.devices()


# Before anything imports TensorFlow: this module is imported first by the entry points.
if argv_verbosity(sys.argv) < 1:
  install_quiet_imports()


# ------------------------------------------------------------------------------------------------------------
# Persistent compilation cache


def default_compilation_cache_dir() -> str:
  """`$XDG_CACHE_HOME/dapo_jax/jax_compilation_cache`, `~/.cache/...` when XDG_CACHE_HOME is unset."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "dapo_jax", "jax_compilation_cache")


def compilation_cache_dir(setting: str | None) -> str | None:
  """The directory `trainer.compilation_cache_dir` names: None (off) for "" or None; for "auto", JAX's own
  setting when the user gave one (JAX_COMPILATION_CACHE_DIR), else `default_compilation_cache_dir()`."""
  if setting is None or setting.strip() == OFF:
    return None
  if setting == AUTO:
    import jax  # pylint: disable=g-import-not-at-top  (this module is imported before JAX on purpose)
    return jax.config.jax_compilation_cache_dir or default_compilation_cache_dir()
  return os.path.abspath(os.path.expanduser(setting))


def enable_compilation_cache(setting: str | None) -> str | None:
  """Turns on JAX's persistent compilation cache in the directory `setting` names (`compilation_cache_dir`);
  returns that directory, or None when the setting turns it off.

  Call it before anything is compiled: JAX opens the cache at the first compilation and ignores later changes.
  Every program is cached whatever its compile time and size (JAX's defaults skip programs that compile in
  under a second, which is most of a CPU run's). JAX runs what it finds in the cache, so the directory must be
  writable by you alone: one this function creates is made private (mode 0700).
  """
  directory = compilation_cache_dir(setting)
  if directory is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, mode=0o700, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor (0 lets JAX pick one)
  logging.info("JAX compilation cache: %s", directory)
  return directory


# ------------------------------------------------------------------------------------------------------------
# User errors


def user_error_types() -> tuple[type[BaseException], ...]:
  """The exceptions that mean a bad config value or input file, whose message names the key or file: the
  program's user can fix them, and a traceback would only bury the message."""
  # Imported here: this module is imported before the heavy modules these live in.
  # pylint: disable=g-import-not-at-top
  from dapo_jax import config as config_lib
  from dapo_jax.data import math_parquet
  from dapo_jax.model import hf_io
  from dapo_jax.model import tokenizer as tokenizer_lib
  # pylint: enable=g-import-not-at-top
  return (config_lib.ConfigError, math_parquet.DataSchemaError, FileNotFoundError, hf_io.CheckpointError,
          tokenizer_lib.TokenizerLoadError)


def user_error_line(program: str, error: BaseException) -> str:
  """`{program}: error: {message}` on one line (a message's own line breaks become spaces)."""
  message = " ".join(str(error).split()) or type(error).__name__
  return f"{program}: error: {message}"


def exit_on_user_error(fn: Callable[..., _T], *, program: str, verbose: bool = False) -> Callable[..., _T]:
  """`fn`, except that a user error (`user_error_types`) prints one line to stderr (`user_error_line`) and
  exits with status 2 instead of raising. With `verbose` the error propagates with its traceback."""

  @functools.wraps(fn)
  def wrapped(*args: Any, **kwargs: Any) -> _T:
    try:
      return fn(*args, **kwargs)
    except user_error_types() as error:
      if verbose:
        raise
      sys.stderr.flush()
      print(user_error_line(program, error), file=sys.stderr, flush=True)
      sys.exit(USER_ERROR_EXIT_CODE)

  return wrapped
