"""Safetensors headers, tensors read one at a time, and a writer that streams tensors into a planned file.

Reading goes through a memory map of one tensor at a time and writing through seeks into a file whose header is
written first, so neither side ever holds more than the tensor (or chunk) at hand.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read, with the reason in one line."""


# safetensors dtype code -> (numpy storage dtype, MLX dtype, bytes per element)
DTYPES = {
    "BF16": (np.uint16, mx.bfloat16, 2),
    "F16": (np.float16, mx.float16, 2),
    "F32": (np.float32, mx.float32, 4),
    "U32": (np.uint32, mx.uint32, 4),
    "U8": (np.uint8, mx.uint8, 1),
    "I32": (np.int32, mx.int32, 4),
    "I64": (np.int64, mx.int64, 8),
}
CODES = {mlx: code for code, (_, mlx, _) in DTYPES.items()}


def itemsize(code: str) -> int:
    return DTYPES[code][2]


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, checked against the file's size (catches truncation)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{file.name} is truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 1 << 30):
                raise SafetensorsError(f"{file.name} is truncated or not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise SafetensorsError(f"cannot read {file}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SafetensorsError(f"{file.name} has a damaged header") from None
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, h in header.items():
        code, shape, (start, end) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        if code not in DTYPES:
            raise SafetensorsError(f"{file.name}: tensor {name} has unsupported dtype {code}")
        if end - start != math.prod(shape) * itemsize(code):
            raise SafetensorsError(f"{file.name}: tensor {name} has {end - start} bytes for shape {shape}")
        if base + end > size:
            raise SafetensorsError(f"{file.name} is truncated ({size} bytes, tensor {name} ends at {base + end})")
        out[name] = TensorInfo(file, name, code, shape, base + start, base + end)
    return out


def read_tensor(info: TensorInfo) -> mx.array:
    """One tensor as an MLX array."""
    rows = info.shape[0] if info.shape else 1
    return read_rows(info, 0, rows).reshape(info.shape)


def read_rows(info: TensorInfo, start: int, stop: int) -> mx.array:
    """Rows [start, stop) of the tensor seen as (shape[0], rest), copied out of a memory map of just those bytes
    that is released at once (so resident memory holds only this piece)."""
    np_dtype, mlx_dtype, size = DTYPES[info.dtype]
    row = math.prod(info.shape[1:]) if info.shape else 1
    mm = np.memmap(
        info.file, dtype=np_dtype, mode="r", offset=info.start + start * row * size, shape=((stop - start), row)
    )
    try:
        a = mx.array(np.asarray(mm))
    finally:
        del mm
    return a.view(mlx_dtype) if info.dtype == "BF16" else a


def to_bytes(a: mx.array) -> memoryview:
    """The array's bytes in C order (bfloat16 through its 16-bit pattern)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.array(a))).cast("B")


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


class PlannedFile:
    """A safetensors file whose tensors are known up front: the header is written at once, then each tensor's
    bytes are written (in pieces, in any order) at its place."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        offsets, pos = {}, 0
        header: dict[str, object] = {"__metadata__": metadata or {"format": "mlx"}}
        for e in entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
            offsets[e.name] = pos
            pos += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.offsets, self.payload = offsets, pos
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self.base + pos)

    def write(self, name: str, offset: int, data: memoryview) -> None:
        """Write `data` at byte `offset` within tensor `name`."""
        self.f.seek(self.base + self.offsets[name] + offset)
        self.f.write(data)

    def close(self) -> None:
        self.f.flush()
        self.f.close()
