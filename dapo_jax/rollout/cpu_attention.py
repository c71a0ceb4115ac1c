"""The decode-step attention kernel for XLA:CPU (`cpu_attention.cc`), built on first use and called through XLA's FFI.

On CPU, XLA runs a decode step's attention (one query per slot against its pages of the KV cache) as a gather
and two batched matrix products of a few rows each; its YNNPACK backend executes them on one core while the
other waits, and reads every gathered entry, visible or not. The kernel reads only the entries each slot can
see, straight from its pages, once for all query heads of a KV head, and shares the slots between the calling
thread and XLA's intra-op thread pool. It also applies RoPE to the fed token's queries and key and writes its
key and value into the pool in place, which as XLA ops were five small operations per layer. Its vectors match the machine's registers (`cpu_attention.cc`). A decode
step with it is faster than with XLA's RoPE, cache writes and attention on every CPU it was measured on
(docs/benchmarks.md, "Measurements behind design choices").

Decoding uses it where it applies (`decoding.attention_kernel_on`: one CPU device, float32, a supported group,
head size and page size) and it builds; anywhere else XLA's attention computes the same values. The shared
library is compiled with the C++ compiler (`$CXX`, else `c++`) for this machine's CPU (`-march=native`) into
`$DAPO_JAX_CACHE` (default `~/.cache/dapo_jax`), once per source, jaxlib version and CPU. Set
`DAPO_JAX_CPU_ATTENTION=0` never to use it.
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib

SUPPORTED_GROUPS = range(1, 9)               # query heads per KV head
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

_SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
_TARGET = "dapo_decode_attention"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


PAGE_SIZE_MULTIPLE = 16  # pages are whole vectors of positions, for the widest vectors (AVX-512's 16 floats)


def supports(group: int, head_dim: int, page_size: int) -> bool:
  """Whether the kernel handles this shape of grouped-query attention and this page size."""
  return group in SUPPORTED_GROUPS and head_dim in SUPPORTED_HEAD_DIMS and page_size % PAGE_SIZE_MULTIPLE == 0


def available() -> bool:
  """Whether the kernel is built and registered with XLA (building it on the first call)."""
  return _load() is not None


def decode_attention_step(qkv: jax.Array, cos: jax.Array, sin: jax.Array, keys: jax.Array, values: jax.Array,
                          lengths: jax.Array, page_table: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decode step's attention for one layer, in one call: RoPE on the fed token's queries and key, its key and
  value written into each slot's pages at cache index `lengths[slot]` (dropped where the slot's page table has no
  page there), and attention of its queries to cache entries 0 .. lengths[slot].

  qkv [slots, kv_heads, group + 2, head_dim]: per KV head its query heads, key and value, before RoPE; cos and
  sin [slots, head_dim] (`qwen2.rotary_cos_sin` of each slot's position); keys [kv_heads, num_pages, head_dim,
  page_size]; values [kv_heads, num_pages, page_size, head_dim]; all float32; lengths [slots] int32; page_table
  [slots, table_width] int32 (entries outside [0, num_pages) mean "no page"). Returns the attention output
  [slots, kv_heads, group, head_dim] and the updated keys and values (the input pool's buffers, written in place
  where XLA can donate them).
  """
  if _load() is None:
    raise RuntimeError("the CPU decode attention kernel is not available (the log says why)")
  results = (jax.ShapeDtypeStruct(qkv.shape[:2] + (qkv.shape[2] - 2, qkv.shape[3]), jnp.float32),
             jax.ShapeDtypeStruct(keys.shape, jnp.float32), jax.ShapeDtypeStruct(values.shape, jnp.float32))
  call = jax.ffi.ffi_call(_TARGET, results, input_output_aliases={3: 1, 4: 2})
  return call(qkv, cos, sin, keys, values, lengths.astype(jnp.int32), page_table.astype(jnp.int32))


@functools.lru_cache(maxsize=None)
def _load() -> ctypes.CDLL | None:
  """Builds (if needed), loads and registers the kernel; None, with the reason logged, where that fails."""
  if os.environ.get("DAPO_JAX_CPU_ATTENTION", "1") == "0":
    logging.info("CPU decode attention kernel off (DAPO_JAX_CPU_ATTENTION=0): decode steps use XLA's attention")
    return None
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.DapoDecodeAttention), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as error:
    logging.warning("CPU decode attention kernel unavailable, decode steps use XLA's attention: %s", error)
    return None
  return library


def _build() -> pathlib.Path:
  """The kernel's shared library for this source, jaxlib and CPU, compiled unless already in the cache."""
  compiler_name = os.environ.get("CXX", "c++")
  compiler = shutil.which(compiler_name)
  if compiler is None:
    raise RuntimeError(f"no C++ compiler {compiler_name!r} on PATH (set CXX)")
  key = hashlib.sha256(_SOURCE.read_bytes())
  key.update(" ".join((jaxlib.__version__, platform.machine(), _cpu_features(), *_FLAGS)).encode())
  cache = pathlib.Path(os.environ.get("DAPO_JAX_CACHE", pathlib.Path.home() / ".cache" / "dapo_jax"))
  library = cache / f"cpu_attention-{key.hexdigest()[:16]}.so"
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  logging.info("Compiling the CPU decode attention kernel into %s (a few seconds, once) ...", library)
  with tempfile.TemporaryDirectory(dir=cache) as scratch:
    built = pathlib.Path(scratch) / library.name
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
    os.replace(built, library)  # atomic, so processes building at once each install a whole file
  return library


def _cpu_features() -> str:
  """The CPU's feature flags, part of the cache key (the library is compiled for this CPU)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor()
