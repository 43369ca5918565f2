"""Runs a kernel's C++ expansion on the CPU: compiled once per source with the system's C++ compiler into a
shared library (cached by the source's digest), then called through ctypes with NumPy arrays. Each group runs on
GROUP_THREADS OS threads that meet at real barriers, so a missing barrier or a race shows up here as it would on
a GPU. For tests and checks: it is not a fast path."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .dialect import KernelSpec, cpu_translation_unit

_LIBS: dict[str, ctypes.CDLL] = {}
_CTYPES = {"float32": (np.float32, ctypes.c_float), "int32": (np.int32, ctypes.c_int32)}


class CompilerMissing(RuntimeError):
    """No C++20 compiler to build the CPU expansion with."""


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def build(spec: KernelSpec, source: str | None = None) -> ctypes.CDLL:
    """The compiled library for the spec's C++ expansion (or for `source`, e.g. a planted error in a test);
    a CalledProcessError carries the compiler's message."""
    source = source if source is not None else cpu_translation_unit(spec)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    if digest in _LIBS:
        return _LIBS[digest]
    cxx = compiler()
    if cxx is None:
        raise CompilerMissing("no C++ compiler (g++ or clang++) on PATH; set CXX")
    cache = Path(os.environ.get("MLX_DIFFGEMMA_KERNEL_CACHE", Path(tempfile.gettempdir()) / "mlx-diffgemma-kernels"))
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"{spec.name}-{digest}.so"
    if not lib.exists():
        src = cache / f"{spec.name}-{digest}.cpp"
        src.write_text(source)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-o", str(tmp), str(src)],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, lib)  # another process building the same library meanwhile is harmless
    _LIBS[digest] = ctypes.CDLL(str(lib))
    return _LIBS[digest]


def run(spec: KernelSpec, inputs: dict[str, np.ndarray], output_sizes: dict[str, int], constants: dict[str, int],
        groups: int, threads: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Run `groups` groups of `threads` threads over the inputs; returns the outputs (flat arrays)."""
    fn = getattr(build(spec), f"run_{spec.name}")
    args, keep = [], []
    for name, dtype in spec.inputs:
        a = np.ascontiguousarray(inputs[name], dtype=_CTYPES[dtype][0]).ravel()
        keep.append(a)
        args.append(a.ctypes.data_as(ctypes.POINTER(_CTYPES[dtype][1])))
    outs = {}
    for name, dtype in spec.outputs:
        outs[name] = np.zeros(output_sizes[name], dtype=_CTYPES[dtype][0])
        args.append(outs[name].ctypes.data_as(ctypes.POINTER(_CTYPES[dtype][1])))
    args += [ctypes.c_int(constants[k]) for k in spec.constants] + [ctypes.c_int(groups), ctypes.c_int(threads)]
    fn(*args)
    return outs
