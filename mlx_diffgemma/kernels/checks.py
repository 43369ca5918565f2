"""Compile checks that need no GPU: the CUDA expansion through NVRTC (the `nvidia-cuda-nvrtc` wheel) to PTX, and
the Metal expansion through a C++ compiler's syntax check against `metal_shim/`. Both report (ok, log)."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
from pathlib import Path

SHIM = Path(__file__).parent / "metal_shim"


def _nvrtc() -> ctypes.CDLL | None:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (or the system's), None when there is none."""
    try:
        import nvidia

        roots = [Path(p) for p in nvidia.__path__]
    except ImportError:
        roots = []
    candidates = [f for r in roots for f in sorted(glob.glob(str(r / "**" / "libnvrtc.so*"), recursive=True))]
    candidates += ["libnvrtc.so"]
    for c in candidates:
        if "builtins" in c:
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


def nvrtc_available() -> bool:
    return _nvrtc() is not None


def nvrtc_compile(source: str, name: str = "kernel.cu", arch: str = "compute_90") -> tuple[bool, str]:
    """Compile CUDA source to PTX with NVRTC; (True, PTX) or (False, the compiler's log)."""
    lib = _nvrtc()
    if lib is None:
        raise RuntimeError("NVRTC is not installed: pip install nvidia-cuda-nvrtc")
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if rc:
        return False, f"nvrtcCreateProgram failed ({rc})"
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    out = log.value.decode(errors="replace")
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        out = ptx.value.decode(errors="replace")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, out


def clang() -> str | None:
    return os.environ.get("MLX_DIFFGEMMA_CLANG") or shutil.which("clang++")


def metal_syntax_check(source: str) -> tuple[bool, str]:
    """`clang++ -fsyntax-only` of Metal source against the shim; (ok, diagnostics)."""
    cxx = clang()
    if cxx is None:
        raise RuntimeError("clang++ is not installed (apt-get install clang, or set MLX_DIFFGEMMA_CLANG)")
    r = subprocess.run(
        [cxx, "-fsyntax-only", "-std=c++17", "-Wno-unknown-attributes", "-I", str(SHIM), "-x", "c++", "-"],
        input=source,
        capture_output=True,
        text=True,
    )
    return r.returncode == 0, r.stderr
