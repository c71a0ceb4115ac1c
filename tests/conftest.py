"""Test-wide settings: eight fake CPU devices (before JAX is imported) and float32 matmuls."""
import os

# Sharded code paths are tested on a CPU mesh of 8 fake devices; single-device tests use device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity tests compare against float32 PyTorch: keep XLA's matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import gc
import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture
def shared_data_dir():
  """../shared/data beside the project root; tests that need it skip where it is absent (a fresh clone)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (it exists only beside the development checkout)")
  return SHARED_DATA.resolve()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops each test module's compiled programs and arrays when the module ends.

  The whole suite runs in one process; without this, hundreds of modules' executables and device buffers pile
  up, and a full run once crashed inside XLA's compiler near its end (tests that pass alone).
  """
  yield
  import jax  # pylint: disable=g-import-not-at-top  (after the environment above is set)
  jax.clear_caches()
  gc.collect()
