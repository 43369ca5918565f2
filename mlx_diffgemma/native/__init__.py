"""Native CPU kernels: the elementwise work of a denoising step as MLX primitives written in C++ (`cpu_ops.cpp`),
vectorised for the building machine and spread over its cores.

MLX's CPU backend evaluates a stream's elementwise operations on one thread, and its x86 build has no vector
math (an exp costs about 26 ns): with the matrix products in BLAS, the softmaxes, the final softcap and the
sampler's pass over the vocabulary became most of a denoising step on the CPU. The module is compiled on the
machine that runs it (`python -m mlx_diffgemma.native build`, which `make setup` runs on Linux: CMake, a C++20
compiler and nanobind of MLX's ABI) into a cache folder named by a digest of its sources and the MLX installation,
so a changed source, another MLX or another environment never loads a stale build. Where it is not built, fails
its self-check, runs on a GPU stream, or MLX_DIFFGEMMA_NATIVE=0, every op below is its pure-MLX reference
(fastmath.py's, the same polynomials), which is also what tests/test_native.py compares the kernels with.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
SOURCES = ("cpu_ops.cpp", "CMakeLists.txt")
_MODULE = None
_STATE: str | None = None  # "ok", or why the kernels are not in use
_SAID = False


def _cpu() -> str:
    """The instruction sets the build may use (it is compiled for the building CPU): the CPU's flags on Linux, the
    machine type elsewhere. A cache folder shared between machines (a network home) then holds a build per CPU,
    and one never loads on a CPU that lacks its instructions (which would kill the process)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def digest() -> str:
    """What a build is for: the sources, the MLX installation (version and folder) it compiles and links against
    (another virtual environment gets a build of its own) and the CPU's instruction sets."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    h.update(str(Path(mx.__file__).resolve().parent).encode())
    h.update(_cpu().encode())
    return f"{h.hexdigest()[:16]}-mlx{mx.__version__}"


def cache_dir() -> Path:
    root = Path(os.environ.get("MLX_DIFFGEMMA_NATIVE_CACHE") or "")
    if not str(root) or str(root) == ".":
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-diffgemma" / "native"
    return root / digest()


def _library() -> Path:
    return cache_dir() / f"_native{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"


def _load():
    """Import the built module, or say why not (a string)."""
    path = _library()
    if not path.exists():
        return "not built (python -m mlx_diffgemma.native build)"
    try:
        loader = importlib.machinery.ExtensionFileLoader("_native", str(path))
        spec = importlib.util.spec_from_file_location("_native", path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any failure to load means the pure-MLX path
        return f"does not load ({type(e).__name__}: {e})"
    if module.DIGEST != digest():
        return f"built for {module.DIGEST}, not {digest()}"
    try:  # the array type must cross between the two modules (the same nanobind ABI as MLX's)
        x = mx.array([[0.0, 1.0]], dtype=mx.float32)
        got = module.softmax_rows(x, stream=mx.cpu)
        mx.eval(got)
    except Exception as e:  # noqa: BLE001
        return f"fails its self-check ({type(e).__name__}: {str(e).splitlines()[0]})"
    if abs(got[0, 1].item() - 0.7310586) > 1e-6:
        return "fails its self-check (softmax of [0, 1])"
    return module


def state() -> str:
    """ "ok" when the native kernels are loaded, else why not (not built, stale, failed its self-check)."""
    global _MODULE, _STATE
    if _STATE is None:
        loaded = _load()
        if isinstance(loaded, str):
            _STATE = loaded
        else:
            _MODULE, _STATE = loaded, "ok"
    return _STATE


def available() -> bool:
    """Whether the native kernels run the CPU ops here: built and loaded, the default device the CPU, and
    MLX_DIFFGEMMA_NATIVE not 0."""
    if os.environ.get("MLX_DIFFGEMMA_NATIVE", "1") == "0" or mx.default_device() != mx.cpu:
        return False
    return state() == "ok"


def module():
    if not available():
        raise RuntimeError(f"native CPU kernels unavailable: {state()}")
    return _MODULE


def describe() -> str:
    """One line for `bench` and `--version`-like reports."""
    if os.environ.get("MLX_DIFFGEMMA_NATIVE", "1") == "0":
        return "off (MLX_DIFFGEMMA_NATIVE=0)"
    s = state()
    return f"on ({_MODULE.threads()} threads)" if s == "ok" else s


# ---------------------------------------------------------------------------------------------------------------
# The ops: callers check available() first (fastmath and sampling keep their MLX forms for the other case)


def softmax_rows(x: mx.array) -> mx.array:
    """softmax over the last axis, float32."""
    return module().softmax_rows(x.astype(mx.float32))


def softcap(x: mx.array, cap: float) -> mx.array:
    """cap * tanh(x / cap), float32."""
    return module().softcap(x.astype(mx.float32), float(cap))


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation, float32."""
    return module().gelu_tanh(x.astype(mx.float32))


def experts(x: mx.array, idx: mx.array, w: mx.array, gate_up: mx.array, down: mx.array) -> mx.array:
    """A mixture-of-experts layer with GELU (tanh) gating, float32: x (N, H), expert ids idx and weights w (N, k),
    gate_up (E, 2I, H) (gate rows, then up rows), down (E, H, I) -> (N, H)."""
    return module().experts(x, idx, w.astype(mx.float32), gate_up, down)


def attention(q: mx.array, k1: mx.array, v1: mx.array, k2: mx.array, v2: mx.array) -> mx.array:
    """softmax(q [k1; k2]^T) [v1; v2], scale 1, no mask, float32: q (B, Hq, L, D) over cached keys and values
    k1, v1 (B, Hk, S1, D | Dv) and the queries' own k2, v2 (B, Hk, S2, D | Dv) -> (B, Hq, L, Dv); the keys are
    not joined (a cache's view of its first S1 positions is read in place)."""
    return module().attention(q, k1, v1, k2, v2)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """mx.fast.rms_norm(x, weight, eps) for float32 x and weight, the same numbers bit for bit."""
    return module().rms_norm(x, weight, float(eps))


def rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotary embedding of x (B, L, H, D), returned as (B, H, L, D): halves form, cos/sin (L or B x L, D/2)."""
    return module().rope(x, cos, sin)


def uniform(key: mx.array, shape: tuple[int, ...], low: float, high: float) -> mx.array:
    """mx.random.uniform(low, high, shape, key=key) in float32, the same numbers bit for bit."""
    return module().uniform(key, list(shape), float(low), float(high))


def vocab_pass(
    logits: mx.array, temps: mx.array, noise: mx.array, cap: float, uniform: bool
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The sampler's pass over the vocabulary, rows (R, V) at temperatures (R,): y = softcap(logits, cap) / temps
    (cap 0: none), and softmax(y), its entropy, argmax(y) and argmax(y + G), G = noise or, when `uniform`,
    -log(-log(noise)).
    Returns (probs (R, V) float32, entropy (R,) float32, argmax (R,) uint32, sample (R,) uint32)."""
    return tuple(
        module().vocab_pass(
            logits.astype(mx.float32), temps.astype(mx.float32), noise.astype(mx.float32), float(cap), uniform
        )
    )


# ---------------------------------------------------------------------------------------------------------------
# Building


class BuildError(RuntimeError):
    pass


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BuildError(f"no {name} on PATH (install it, e.g. `pip install {name}` or your system's package)")
    return found


def build(force: bool = False, quiet: bool = True) -> Path:
    """Compile the module into its cache folder (atomically: an interrupted build leaves nothing that loads)
    and return its path. Raises BuildError with the reason."""
    global _STATE, _MODULE
    target = _library()
    if target.exists() and not force:
        return target
    cmake = _tool("cmake")
    try:
        import nanobind
    except ImportError as e:
        raise BuildError("nanobind is not installed (pip install 'nanobind>=3.0,<3.2')") from e
    mlx_root = Path(mx.__file__).resolve().parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlx-diffgemma-native-") as tmp:
        args = [
            cmake,
            "-S",
            str(HERE),
            "-B",
            tmp,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dnanobind_ROOT={nanobind.cmake_dir()}",
            f"-DMLX_DIR={mlx_root / 'share' / 'cmake' / 'MLX'}",
            f"-DMLX_ROOT={mlx_root}",
            f"-DNATIVE_DIGEST={digest()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        for cmd in (args, [cmake, "--build", tmp, "-j", str(os.cpu_count() or 2)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                said = (r.stderr + r.stdout).splitlines()
                lines = [x for x in said if "rror" in x] or said
                raise BuildError(f"{Path(cmd[0]).name} failed: {' | '.join(lines[-3:]).strip()}")
        built = [p for p in Path(tmp).glob("_native*") if p.suffix in (".so", ".pyd", ".dylib")]
        if not built:
            raise BuildError("the build produced no module")
        part = target.with_name(target.name + f".{os.getpid()}.part")
        shutil.copyfile(built[0], part)
        os.replace(part, target)
    _STATE = _MODULE = None
    return target
