"""Minimal safetensors reader and writer over numpy, tensor by tensor.

Our own few lines instead of `safetensors.numpy` because numpy has no bfloat16: tensors are memory-mapped and
viewed with ml_dtypes' bfloat16, so a tensor (or a slice of one) is read without loading the whole file, and a
checkpoint is written one tensor at a time without gathering it in memory first. Format: an 8-byte
little-endian header size, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the
raw little-endian tensor bytes.
"""
from collections.abc import Callable, Iterable
import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A safetensors file is missing, truncated or malformed."""


class SafetensorsFile:
  """Read-only view of one .safetensors file; `file[name]` is a memory-mapped numpy array."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      with open(self.path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
          raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than its 8-byte header size)")
        (header_size,) = struct.unpack("<Q", size_bytes)
        file_size = os.fstat(f.fileno()).st_size
        if header_size > file_size - 8:
          raise SafetensorsError(f"{self.path}: header size {header_size} exceeds the file ({file_size} bytes); "
                                 "the file is truncated or not safetensors")
        header = json.loads(f.read(header_size))
    except FileNotFoundError:
      raise FileNotFoundError(f"Checkpoint file not found: {self.path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SafetensorsError(f"{self.path}: unreadable safetensors header ({e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._data_start = 8 + header_size
    self._data_size = file_size - self._data_start
    self._entries = header
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def __getitem__(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
      raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end > self._data_size or end - start != int(np.prod(shape)) * dtype.itemsize:
      raise SafetensorsError(f"{self.path}: tensor {name!r} (shape {shape}, {entry['dtype']}) has inconsistent "
                             f"data offsets {start}..{end}; the file is truncated or corrupt")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start,
                             shape=(self._data_size,))
    return self._mmap[start:end].view(dtype).reshape(shape)


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      get_tensor: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes tensors named and shaped by `specs`, asking `get_tensor(name)` for each in turn."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  specs = list(specs)
  for name, shape, dtype in specs:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
      raise SafetensorsError(f"Cannot write tensor {name!r} of dtype {dtype} to safetensors")
    size = int(np.prod(shape)) * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
  tmp_path = f"{os.fspath(path)}.tmp"
  with open(tmp_path, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for name, shape, dtype in specs:
      tensor = np.ascontiguousarray(get_tensor(name), dtype=np.dtype(dtype))
      if tensor.shape != tuple(shape):
        raise SafetensorsError(f"Tensor {name!r} has shape {tensor.shape}, expected {tuple(shape)}")
      f.write(tensor.tobytes())
  os.replace(tmp_path, path)  # never leave a half-written file under the real name
