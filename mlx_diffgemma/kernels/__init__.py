"""Custom kernels, one op per file (its kernel body in the dialect of `dialect.py` and its pure-MLX reference with
the same signature), and the dispatcher that picks for each call: the Metal kernel on a Mac's GPU, the CUDA
kernel on MLX's CUDA build, or the reference (on the CPU, when MLX_DIFFGEMMA_KERNELS=0, or where the kernel's
self-check on this machine failed or has not passed). A kernel is trusted on a machine only after `selfcheck`
compared it with its reference there; the verdict is kept per machine and MLX version.

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
    """Where kernels would run now: "metal", "cuda", or "reference"."""
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


def vocab_pass_kernel(logits: mx.array, temps: mx.array, uniforms: mx.array, cap: float):
    """`vocab_pass.reference` computed by the GPU kernel of the current target."""
    N, V = logits.shape
    T = _vp.GROUP_THREADS
    params = mx.array([cap], dtype=mx.float32)
    stats, ids = _gpu_kernel("vocab_pass")(
        inputs=[logits.astype(mx.float32), temps.astype(mx.float32), uniforms.astype(mx.float32), params],
        template=[("V", V), ("GROUP_THREADS", T)],
        grid=(N * T, 1, 1),
        threadgroup=(T, 1, 1),
        output_shapes=[(N, 3), (N, 2)],
        output_dtypes=[mx.float32, mx.int32],
    )
    return stats, ids


def soft_embed_kernel(z: mx.array, lse: mx.array, table: mx.array) -> mx.array:
    """`self_cond.reference` computed by the GPU kernel of the current target."""
    (N, V), H = z.shape, table.shape[1]
    T = _sc.GROUP_THREADS
    (out,) = _gpu_kernel("soft_embed")(
        inputs=[z.astype(mx.float32), lse.astype(mx.float32), table.astype(mx.float32)],
        template=[("V", V), ("H", H), ("GROUP_THREADS", T)],
        grid=(N * T, 1, 1),
        threadgroup=(T, 1, 1),
        output_shapes=[(N, H)],
        output_dtypes=[mx.float32],
    )
    return out


def route_kernel(logits: mx.array, scales: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """`routing.reference` computed by the GPU kernel of the current target."""
    N, E = logits.shape
    T = _rt.GROUP_THREADS
    ids, weights = _gpu_kernel("route")(
        inputs=[logits.astype(mx.float32), scales.astype(mx.float32)],
        template=[("N", N), ("E", E), ("K", k), ("GROUP_THREADS", T)],
        grid=(-(-N // T) * T, 1, 1),
        threadgroup=(T, 1, 1),
        output_shapes=[(N, k), (N, k)],
        output_dtypes=[mx.int32, mx.float32],
    )
    return ids, weights


def use_kernel(op: str) -> bool:
    """Whether `op` runs as a kernel here: a GPU target, kernels on, and this machine's self-check passed (one
    line on stderr, once, when it does not)."""
    t = target()
    if t == "reference":
        return False
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


def soft_embed(z: mx.array, lse: mx.array, table: mx.array) -> mx.array:
    """softmax(z) @ table (N, H) from scaled logits z (N, V) and their log-sum-exp (N,); the kernel where it is
    trusted and the hidden size fits it, else the reference."""
    if table.shape[1] <= _sc.GROUP_THREADS * _sc.MAX_COLS and use_kernel("soft_embed"):
        return soft_embed_kernel(z, lse, table)
    return _sc.reference(z, lse, table)


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
    if t == "reference":
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
    for N, V, H in [(256, 262_144, 2816), (64, 32_768, 512), (3, 1000, 96)]:
        z = mx.array((rng.standard_normal((N, V)) * 3).astype(np.float32))
        lse = mx.logsumexp(z, axis=-1)
        table = mx.array((rng.standard_normal((V, H)) * 0.02).astype(np.float32))
        timings, outs = {}, {}
        for name, fn in (("kernel", soft_embed_kernel), ("reference", _sc.reference)):
            mx.eval(fn(z, lse, table))
            tic = time.perf_counter()
            for _ in range(3):
                outs[name] = fn(z, lse, table)
                mx.eval(outs[name])
            timings[name] = (time.perf_counter() - tic) / 3
        err = float(mx.abs(outs["kernel"] - outs["reference"]).max())
        ok = err < 1e-4
        passed &= ok
        speedup = timings["reference"] / timings["kernel"]
        results.append({"N": N, "V": V, "H": H, "max_abs": err, "speedup": speedup})
        log(f"soft_embed {N}x{V}x{H}: {'pass' if ok else 'FAIL'} (within {err:.1e}), {speedup:.2f}x the reference")
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
