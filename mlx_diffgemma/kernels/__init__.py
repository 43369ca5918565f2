"""Custom kernels, one op per file (its kernel body in the dialect of `dialect.py` and its pure-MLX reference with
the same signature), and the dispatcher that picks for each call: the Metal kernel on a Mac's GPU, the CUDA
kernel on MLX's CUDA build, or the reference (on the CPU, when MLX_DIFFGEMMA_KERNELS=0, or where the kernel's
self-check on this machine failed or has not passed). A kernel is trusted on a machine only after `selfcheck`
compared it with its reference there; the verdict is kept per machine and MLX version.

MLX_DIFFGEMMA_KERNELS=cpu runs each kernel's C++ expansion on the CPU instead (kernels/cpu.py: one OS thread per
GPU thread, real barriers; slow, and each call waits for its inputs): how the tests run the kernel path of a whole
generation on a machine without a GPU.

Ops: `vocab_pass` (`vocab.py`: the sampler's pass over the vocabulary in one read) and `soft_embed`
(`self_cond.py`: softmax times the embedding table without the probabilities), `route` (`routing.py`: the
router's top-k experts and their weights from its logits).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import routing as _rt
from . import self_cond as _sc
from . import vocab as _vp
from .dialect import cuda_body, metal_body

OPS = {"vocab_pass": _vp, "soft_embed": _sc, "route": _rt}
_KERNELS: dict[tuple[str, str], object] = {}
_VERDICTS: dict[str, bool] | None = None
_SAID: set[str] = set()


def enabled() -> bool:
    return os.environ.get("MLX_DIFFGEMMA_KERNELS", "1") != "0"


def target() -> str:
    """Where kernels would run now: "metal", "cuda", "cpu" (the C++ expansions, when MLX_DIFFGEMMA_KERNELS=cpu),
    or "reference"."""
    if os.environ.get("MLX_DIFFGEMMA_KERNELS") == "cpu":
        return "cpu"
    if not enabled() or mx.default_device() != mx.gpu:
        return "reference"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "reference"


def _verdict_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-diffgemma"
    return root / f"selfcheck-{target()}-mlx{mx.__version__}.json"


def verdicts() -> dict[str, bool]:
    """This machine's self-check verdicts for the current target (empty when none was run)."""
    global _VERDICTS
    if _VERDICTS is None:
        try:
            _VERDICTS = {k: bool(v["passed"]) for k, v in json.loads(_verdict_file().read_text()).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            _VERDICTS = {}
    return _VERDICTS


def _gpu_kernel(op: str):
    """The compiled MLX kernel object for `op` on the current target."""
    key = (op, target())
    if key not in _KERNELS:
        spec = OPS[op].SPEC
        names = ([n for n, _ in spec.inputs], [n for n, _ in spec.outputs])
        if target() == "metal":
            header, source = metal_body(spec)
            _KERNELS[key] = mx.fast.metal_kernel(spec.name, *names, source=source, header=header)
        else:
            header, source = cuda_body(spec)
            _KERNELS[key] = mx.fast.cuda_kernel(spec.name, *names, source=source, header=header)
    return _KERNELS[key]


def _on_cpu(op: str, inputs: dict[str, mx.array], outputs: dict[str, tuple[tuple[int, ...], mx.Dtype]],
            constants: dict[str, int], groups: int) -> list[mx.array]:  # fmt: skip
    """Run `op`'s C++ expansion on NumPy copies of the inputs (which are evaluated first)."""
    from . import cpu

    spec = OPS[op].SPEC
    arrays = {k: np.asarray(v.astype(mx.float32) if v.dtype in (mx.bfloat16, mx.float16) else v)
              for k, v in inputs.items()}  # fmt: skip
    sizes = {k: int(np.prod(shape)) for k, (shape, _) in outputs.items()}
    got = cpu.run(spec, arrays, sizes, constants, groups, constants["GROUP_THREADS"])
    return [mx.array(got[k].reshape(shape)) for k, (shape, _) in outputs.items()]


def _launch(op: str, inputs: dict[str, mx.array], outputs: dict[str, tuple[tuple[int, ...], mx.Dtype]],
            constants: dict[str, int], groups: int) -> list[mx.array]:  # fmt: skip
    """`op` over `groups` groups of its GROUP_THREADS threads on the current target."""
    if target() == "cpu":
        return _on_cpu(op, inputs, outputs, constants, groups)
    T = constants["GROUP_THREADS"]
    return _gpu_kernel(op)(
        inputs=list(inputs.values()),
        template=list(constants.items()),
        grid=(groups * T, 1, 1),
        threadgroup=(T, 1, 1),
        output_shapes=[shape for shape, _ in outputs.values()],
        output_dtypes=[dtype for _, dtype in outputs.values()],
    )


def vocab_pass_kernel(logits: mx.array, temps: mx.array, uniforms: mx.array, cap: float):
    """`vocab_pass.reference` computed by the kernel of the current target."""
    N, V = logits.shape
    inputs = {"logits": logits.astype(mx.float32), "temps": temps.astype(mx.float32),
              "uniforms": uniforms.astype(mx.float32), "params": mx.array([cap], dtype=mx.float32)}  # fmt: skip
    stats, ids = _launch(
        "vocab_pass", inputs, {"stats": ((N, 3), mx.float32), "ids": ((N, 2), mx.int32)},
        {"V": V, "GROUP_THREADS": _vp.GROUP_THREADS}, N,
    )  # fmt: skip
    return stats, ids


def soft_embed_kernel(logits: mx.array, temps: mx.array, lse: mx.array, table: mx.array, cap: float) -> mx.array:
    """`self_cond.reference` computed by the kernel of the current target (the table read in its own dtype)."""
    (N, V), H = logits.shape, table.shape[1]
    inputs = {"logits": logits.astype(mx.float32), "temps": temps.astype(mx.float32),
              "lses": lse.astype(mx.float32), "table": table, "params": mx.array([cap], dtype=mx.float32)}  # fmt: skip
    (out,) = _launch("soft_embed", inputs, {"out": ((N, H), mx.float32)},
                     {"V": V, "H": H, "GROUP_THREADS": _sc.GROUP_THREADS}, N)  # fmt: skip
    return out


def route_kernel(logits: mx.array, scales: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """`routing.reference` computed by the kernel of the current target."""
    N, E = logits.shape
    T = _rt.GROUP_THREADS
    inputs = {"logits": logits.astype(mx.float32), "scales": scales.astype(mx.float32)}
    ids, weights = _launch("route", inputs, {"ids": ((N, k), mx.int32), "weights": ((N, k), mx.float32)},
                           {"N": N, "E": E, "K": k, "GROUP_THREADS": T}, -(-N // T))  # fmt: skip
    return ids, weights


def use_kernel(op: str) -> bool:
    """Whether `op` runs as a kernel here: a GPU target, kernels on, and this machine's self-check passed (one
    line on stderr, once, when it does not); or the CPU expansions, when asked for and a compiler is there."""
    t = target()
    if t == "reference":
        return False
    if t == "cpu":
        from .cpu import compiler

        if compiler() is None and op not in _SAID:
            _SAID.add(op)
            print(f"note: no C++ compiler for the CPU expansion of {op}; using the reference", file=sys.stderr)
        return compiler() is not None
    ok = verdicts().get(op)
    if not ok and op not in _SAID:
        _SAID.add(op)
        why = "failed its self-check" if ok is False else "has not been self-checked"
        print(f"note: the {t} kernel for {op} {why} on this machine; using the reference "
              "(run `mlx_diffgemma selfcheck`)", file=sys.stderr)  # fmt: skip
    return bool(ok)


def vocab_pass(logits: mx.array, temps: mx.array, uniforms: mx.array, cap: float):
    """(stats (N, 3): max, log-sum-exp, entropy; ids (N, 2): argmax, Gumbel-max sample) of softcapped,
    temperature-scaled logits; the kernel where it is trusted, else the reference."""
    if use_kernel("vocab_pass"):
        return vocab_pass_kernel(logits, temps, uniforms, cap)
    return _vp.reference(logits, temps, uniforms, cap)


def soft_embed_runs(table: mx.array) -> bool:
    """Whether `soft_embed` runs as a kernel here for this table (trusted, and its hidden size fits)."""
    return table.shape[1] <= _sc.GROUP_THREADS * _sc.MAX_COLS and use_kernel("soft_embed")


def soft_embed(logits: mx.array, temps: mx.array, lse: mx.array, table: mx.array, cap: float) -> mx.array:
    """softmax(z) @ table (N, H), z = softcap(logits) / temperature, from raw logits (N, V), temperatures (N,) and
    the log-sum-exp of z (N,); the kernel where it is trusted and the hidden size fits it, else the reference."""
    if soft_embed_runs(table):
        return soft_embed_kernel(logits, temps, lse, table, cap)
    return _sc.reference(logits, temps, lse, table, cap)


def route(logits: mx.array, scales: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(expert ids (N, k), largest first; weights (N, k)) from router logits (N, E) and per-expert scales (E,);
    the kernel where it is trusted, else the reference."""
    if use_kernel("route"):
        return route_kernel(logits, scales, k)
    return _rt.reference(logits, scales, k)


def selfcheck(shapes: list[tuple[int, int]] | None = None, log=print) -> dict[str, dict]:
    """Run every kernel against its reference on representative shapes on this machine's target, time both,
    record the verdicts (used by the dispatcher from then on) and return them."""
    global _VERDICTS
    t = target()
    if t not in ("metal", "cuda"):
        raise RuntimeError(
            "no GPU kernel target here (a Mac's Metal or MLX's CUDA build is needed; kernels are "
            + ("turned off by MLX_DIFFGEMMA_KERNELS=0)" if not enabled() else "not used on the CPU)")
        )
    shapes = shapes or [(256, 262_144), (64, 32_768), (3, 1000), (1, 4099)]
    rng = np.random.default_rng(0)
    results, passed = [], True
    for N, V in shapes:
        logits = mx.array((rng.standard_normal((N, V)) * 8).astype(np.float32))
        temps = mx.array(rng.uniform(0.4, 0.8, N).astype(np.float32))
        u = mx.array(rng.uniform(1e-7, 1, (N, V)).astype(np.float32))
        timings = {}
        outs = {}
        for name, fn in (("kernel", vocab_pass_kernel), ("reference", _vp.reference)):
            mx.eval(fn(logits, temps, u, 30.0))  # compile, warm
            tic = time.perf_counter()
            for _ in range(3):
                outs[name] = fn(logits, temps, u, 30.0)
                mx.eval(outs[name])
            timings[name] = (time.perf_counter() - tic) / 3
        (ks, ki), (rs, ri) = outs["kernel"], outs["reference"]
        err = float(mx.abs(ks - rs).max())
        same_ids = bool(mx.array_equal(ki, ri))
        ok = err < 1e-3 and same_ids
        passed &= ok
        results.append({"N": N, "V": V, "max_abs": err, "ids_equal": same_ids, "speedup":
                        timings["reference"] / timings["kernel"]})  # fmt: skip
        speedup = timings["reference"] / timings["kernel"]
        log(f"vocab_pass {N}x{V}: {'pass' if ok else 'FAIL'} (stats within {err:.1e}, ids "
            f"{'equal' if same_ids else 'differ'}), {speedup:.2f}x the reference")  # fmt: skip
    verdict = {"vocab_pass": {"passed": passed, "device": t, "mlx": mx.__version__, "results": results}}
    results, passed = [], True
    for N, V, H, dtype in [(256, 262_144, 2816, mx.bfloat16), (64, 32_768, 512, mx.float32),
                           (64, 32_768, 512, mx.float16), (3, 1000, 96, mx.float32)]:  # fmt: skip
        logits = mx.array((rng.standard_normal((N, V)) * 8).astype(np.float32))
        temps = mx.array(rng.uniform(0.4, 0.8, N).astype(np.float32))
        lse = mx.logsumexp(_vp.scaled(logits, temps, 30.0), axis=-1)
        table = mx.array((rng.standard_normal((V, H)) * 0.02).astype(np.float32)).astype(dtype)
        timings, outs = {}, {}
        for name, fn in (("kernel", soft_embed_kernel), ("reference", _sc.reference)):
            mx.eval(fn(logits, temps, lse, table, 30.0))
            tic = time.perf_counter()
            for _ in range(3):
                outs[name] = fn(logits, temps, lse, table, 30.0)
                mx.eval(outs[name])
            timings[name] = (time.perf_counter() - tic) / 3
        err = float(mx.abs(outs["kernel"] - outs["reference"]).max())
        ok = err < 1e-4
        passed &= ok
        speedup = timings["reference"] / timings["kernel"]
        results.append({"N": N, "V": V, "H": H, "table": str(dtype), "max_abs": err, "speedup": speedup})
        log(f"soft_embed {N}x{V}x{H} ({dtype}): {'pass' if ok else 'FAIL'} (within {err:.1e}), "
            f"{speedup:.2f}x the reference")  # fmt: skip
    verdict["soft_embed"] = {"passed": passed, "device": t, "mlx": mx.__version__, "results": results}
    results, passed = [], True
    for N, E, K in [(4096, 128, 8), (256, 128, 8), (5, 16, 4)]:
        logits = mx.array(rng.standard_normal((N, E)).astype(np.float32))
        scales = mx.array(rng.uniform(0.5, 1.5, E).astype(np.float32))
        (ki, kw), (ri, rw) = route_kernel(logits, scales, K), _rt.reference(logits, scales, K)
        err = float(mx.abs(kw - rw).max())
        ok = bool(mx.array_equal(ki, ri)) and err < 1e-5
        passed &= ok
        results.append({"N": N, "E": E, "K": K, "max_abs": err, "ids_equal": bool(mx.array_equal(ki, ri))})
        log(f"route {N}x{E} top-{K}: {'pass' if ok else 'FAIL'} (weights within {err:.1e})")
    verdict["route"] = {"passed": passed, "device": t, "mlx": mx.__version__, "results": results}
    path = _verdict_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(verdict, indent=2))
    os.replace(tmp, path)
    _VERDICTS = None
    return verdict
