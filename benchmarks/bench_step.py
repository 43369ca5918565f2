"""One denoising step over a 256-token canvas, side by side: mlx-diffgemma, mlx-vlm (its compiled decoder) and
transformers, rounds interleaved so that machine noise falls on all alike (transformers in a child process of its
own, without LD_PRELOAD: a preloaded OpenBLAS takes over torch's matrix products and slows it about 4x).

The checkpoint is built with transformers (random weights, q/k norms at head_dim^-1/4 as a trained model's):
hidden 512, 8 layers (3 sliding : 1 full, twice; full layers 2 KV heads x 512, as the real model), 8 query heads,
16 experts top-4 x 256, dense MLP 1024, vocabulary 32,768, sliding window 512, canvas 256. A step is what each
engine's own generation loop does per denoising step, sampler included:
- mlx-diffgemma: `generate_step` (encode once, then steps with self-conditioning);
- mlx-vlm: its entropy-bound path of `stream_diffusion_generate` (compiled decoder, temperature, categorical
  sample, entropy, acceptance, renoise, self-conditioning, stability test), replayed step by step;
- transformers: `generate` itself, its steps timed by a streamer's `put_draft`.
Each round runs K steps per engine (after one step that is not counted: the first, without self-conditioning);
steps/s is K over the round's time, min and median over rounds. Peak memory: each engine in a fresh process
(encode + 3 steps), the process's peak resident memory above what it held after loading.

    pip install mlx-vlm==0.7.10   # for the comparison (optional: --engines ours transformers)
    # on Linux, as the Makefile runs MLX: LD_PRELOAD=<Debian's OpenBLAS> OPENBLAS_THREAD_TIMEOUT=4
    python benchmarks/bench_step.py [--prefix 256 2048 8192] [--rounds 3] [--steps 3] [--engines ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT = dict(
    vocab_size=32768,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    global_head_dim=512,
    num_global_key_value_heads=2,
    sliding_window=512,
    num_experts=16,
    top_k_experts=4,
    moe_intermediate_size=256,
    max_position_embeddings=16384,
    layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2,
)
CANVAS = 256
NEVER = dict(stability_threshold=1, confidence_threshold=1e-30)  # no early stop: every step is a full step


def build(path: Path) -> Path:
    from mlx_diffgemma import reference as ref

    if not (path / "config.json").exists():
        ref.build_checkpoint(path, ref.Fixture("bench", TEXT, canvas_length=CANVAS, tame=True), seed=0)
    return path


# ---- engines: load(path); run(prefix_ids, steps) -> seconds per counted step ---------------------------------------
# Each MLX engine runs with the MLX buffer-cache limit its users get: MLX's default on the CPU (32 MB) for mlx-vlm,
# the 1 GiB mlx-diffgemma's load sets (memory.keep_step_buffers) for ours; the limit is process-wide, so it is set
# before each engine's round. --same-cache runs both with ours.


def cache_limit() -> int:
    """MLX's buffer-cache limit now (bytes)."""
    import mlx.core as mx

    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


MLX_DEFAULT_CACHE: int | None = None  # read before any engine loads


class Ours:
    name = "mlx-diffgemma"

    def __init__(self, path: Path):
        from mlx_diffgemma import load

        self.model, _ = load(path)
        self.cache = cache_limit()

    def run(self, ids: np.ndarray, steps: int) -> list[float]:
        import mlx.core as mx

        from mlx_diffgemma.generate import generate_step, settings

        g = settings(self.model, max_denoising_steps=steps + 1, eos_token_id=[], **NEVER)
        events = generate_step(self.model, mx.array(ids), g, CANVAS, key=mx.random.key(0))
        times, tic = [], None
        for e in events:
            if not hasattr(e, "draft"):
                break
            mx.eval(e.draft)
            now = time.perf_counter()
            if tic is not None:
                times.append(now - tic)
            tic = now
        return times

    def first_logits(self, ids: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        from mlx_diffgemma.generate import prefill

        cache = self.model.make_cache()
        prefill(self.model, mx.array(ids), cache)
        return np.array(self.model.denoise(mx.array(canvas), cache))


class MlxVlm:
    name = "mlx-vlm"

    def __init__(self, path: Path):
        from mlx_vlm.utils import load_model

        self.model = load_model(path)
        self.version = __import__("mlx_vlm").__version__
        self.cache = MLX_DEFAULT_CACHE

    def _prefill(self, ids):
        import mlx.core as mx

        cache = self.model.make_cache()
        out = self.model.diffusion_prefill_cache(mx.array(ids), cache=cache)
        cache = out if isinstance(out, list) else cache
        mx.eval([c.state for c in cache])
        return cache

    def run(self, ids: np.ndarray, steps: int) -> list[float]:
        import mlx.core as mx
        from mlx_vlm.generate import diffusion as D

        m, V, N = self.model, TEXT["vocab_size"], steps + 1
        cache = self._prefill(ids)
        canvas = D._diffusion_initialize_canvas(1, CANVAS, V, mx.int32)
        masks = m.diffusion_decoder_masks(canvas, cache, None)
        without_sc, with_sc = D._make_diffusion_decoder_logits_fns(m, cache, masks, compile_graph=True)
        context = m.diffusion_prepare_self_conditioning()
        sc, history, times, tic = None, [], [], None
        for cur_step in reversed(range(1, N + 1)):
            logits = without_sc(canvas) if sc is None else with_sc(canvas, sc)
            logits = logits / D._diffusion_linear_temperature(cur_step, N, {"t_min": 0.4, "t_max": 0.8})
            argmax = mx.argmax(logits, axis=-1).astype(mx.int32)
            sample = D._diffusion_sample_canvas(logits, mx.int32, 1.0)
            entropy = D._diffusion_token_entropy(logits)
            sc = m.diffusion_self_conditioning(logits, context)
            accept = D._diffusion_entropy_transfer_mask(entropy, 0.1)
            accepted = mx.where(accept, sample, canvas)
            canvas = mx.where(accept, accepted, D._diffusion_initialize_canvas(1, CANVAS, V, mx.int32))
            D._diffusion_stable_and_confident(argmax, logits, history, {"stability_threshold": 1, **NEVER})
            mx.eval(canvas, sc, argmax)
            now = time.perf_counter()
            if tic is not None:
                times.append(now - tic)
            tic = now
        return times

    def first_logits(self, ids: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        cache = self._prefill(ids)
        c = mx.array(canvas)
        masks = self.model.diffusion_decoder_masks(c, cache, None)
        return np.array(self.model.diffusion_decoder_logits(c, cache=cache, decoder_attention_mask=masks))


class Transformers:
    name = "transformers"

    def __init__(self, path: Path):
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion

        torch.manual_seed(0)
        self.torch, self.path = torch, path
        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()

    def run(self, ids: np.ndarray, steps: int) -> list[float]:
        stamps: list[float] = []

        class Streamer:
            def put(self, value):
                pass

            def put_draft(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with self.torch.inference_mode():
            self.model.generate(
                self.torch.as_tensor(ids),
                max_new_tokens=CANVAS,
                max_denoising_steps=steps + 1,
                eos_token_id=None,
                streamer=Streamer(),
                **NEVER,
            )
        return list(np.diff(stamps))

    def first_logits(self, ids: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        from mlx_diffgemma.reference import ReferenceModel

        ref = ReferenceModel(self.path)
        ref.encode(ids)
        return ref.denoise(canvas)


ENGINES = {"ours": Ours, "mlx-vlm": MlxVlm, "transformers": Transformers}
# Engines that run in a process of their own, without this one's LD_PRELOAD: torch links its own BLAS (MKL), and
# the OpenBLAS that MLX on Linux is run with, preloaded, takes over torch's matrix products and slows a
# transformers step about 4x (1.07 -> 0.26 steps/s at prefix 256, benchmarks/RESULTS.md).
ISOLATED = {"transformers"}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


class Isolated:
    """An engine served by a child process started without LD_PRELOAD; its rounds still interleave with the
    others' (the child stays up between them). Requests and replies are JSON lines; logits travel as .npy files."""

    def __init__(self, key: str, path: Path, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--workdir", str(workdir), "--serve", key],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_clean_env(),
        )
        self.name = self._reply()["name"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {type(self).__name__} engine's process ended (exit {self.proc.wait()})")
        return json.loads(line)

    def _call(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def run(self, ids: np.ndarray, steps: int) -> list[float]:
        return self._call(op="run", ids=ids.tolist(), steps=steps)["times"]

    def first_logits(self, ids: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        out = self.workdir / "first_logits.npy"
        self._call(op="first_logits", ids=ids.tolist(), canvas=canvas.tolist(), out=str(out))
        return np.load(out)


def serve(key: str, path: Path) -> None:
    """The child side of `Isolated`: one engine, answering requests from stdin until it closes."""
    e = ENGINES[key](path)
    reply = sys.stdout
    sys.stdout = sys.stderr  # whatever the engine prints stays off the reply channel
    reply.write(json.dumps({"name": e.name}) + "\n")
    reply.flush()
    for line in sys.stdin:
        r = json.loads(line)
        ids = np.array(r["ids"])
        if r["op"] == "run":
            answer = {"times": e.run(ids, r["steps"])}
        else:
            np.save(r["out"], e.first_logits(ids, np.array(r["canvas"])))
            answer = {}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


def openblas_core() -> str | None:
    """The kernel family of a preloaded OpenBLAS (what it detected, or OPENBLAS_CORETYPE): its generic Prescott
    kernels run fp32 matmul about 4x slower than its SkylakeX ones on this machine's CPU, which the Debian build
    does not recognise (the Makefile names the family)."""
    import ctypes

    lib = next((p for p in os.environ.get("LD_PRELOAD", "").split(":") if "openblas" in p), None)
    try:
        name = ctypes.CDLL(lib).openblas_get_corename
    except (OSError, AttributeError, TypeError):
        return None
    name.restype = ctypes.c_char_p
    return name().decode()


def versions() -> str:
    import mlx.core as mx

    out = [f"python {platform.python_version()}", f"mlx {mx.__version__}"]
    for mod in ("mlx_vlm", "torch", "transformers"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    core = openblas_core()
    spin = os.environ.get("OPENBLAS_THREAD_TIMEOUT")  # its idle workers' spin before they sleep (see the Makefile)
    spin = f"thread timeout 2^{spin} cycles" if spin else "default thread timeout"
    out.append("MLX BLAS: " + (f"OpenBLAS (preloaded, {core} kernels, {spin})" if core else "bundled reference BLAS"))
    try:
        import torch

        out.append(f"torch threads {torch.get_num_threads()}")
    except ImportError:
        pass
    return ", ".join(out)


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(engine: str, path: Path, prefix: int) -> None:
    """Peak resident memory of one engine: encode + 3 steps, above what it held after loading (the high-water mark
    is reset after loading: Linux's clear_refs)."""
    e = ENGINES[engine](path)
    ids = np.random.default_rng(0).integers(0, TEXT["vocab_size"], (1, prefix))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    e.run(ids, 3)
    print(json.dumps({"peak_above_load": max(_status("VmHWM") - base, 0)}))


def _use_cache(engine) -> None:
    if getattr(engine, "cache", None) is not None:
        import mlx.core as mx

        mx.clear_cache()
        mx.set_cache_limit(engine.cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="counted steps per engine per round")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mlx-diffgemma-bench")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--same-cache", action="store_true", help="every MLX engine with mlx-diffgemma's cache limit")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "PREFIX"), help=argparse.SUPPRESS)
    ap.add_argument("--serve", metavar="ENGINE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = build(args.workdir / "checkpoint")
    if args.child:
        return child(args.child[0], path, int(args.child[1]))
    if args.serve:
        return serve(args.serve, path)

    if args.memory_only:
        return memory_table(args, [ENGINES[n] for n in args.engines])
    global MLX_DEFAULT_CACHE
    MLX_DEFAULT_CACHE = cache_limit()
    engines = [Isolated(n, path, args.workdir) if n in ISOLATED else ENGINES[n](path) for n in args.engines]
    if args.same_cache:
        for e in engines:
            if getattr(e, "cache", None) is not None:
                e.cache = max(x.cache for x in engines if getattr(x, "cache", None) is not None)
    caches = ", ".join(f"{e.name} {e.cache >> 20} MB" for e in engines if getattr(e, "cache", None) is not None)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores"
    print(f"# {time.strftime('%Y-%m-%d')} · {machine} · {versions()}")
    apart = [e.name for e in engines if isinstance(e, Isolated)]
    if apart:
        print(f"# {', '.join(apart)} in a process of its own, without LD_PRELOAD (torch's own BLAS)")
    print(f"# {' '.join(sys.argv)}")
    print(f"# MLX buffer-cache limit per engine: {caches}")
    header = " | ".join(f"{e.name} steps/s (min-median)" for e in engines)
    print(f"| prefix | {header} | " + " | ".join(f"ours / {e.name}" for e in engines[1:]) + " |")
    print("|---|" + "---|" * (2 * len(engines) - 1))
    rng = np.random.default_rng(0)
    # 1,100 cached positions: the full layers attend to 1,356 keys, through mlx-diffgemma's native attention on Linux
    ids, canvas = rng.integers(0, TEXT["vocab_size"], (1, 1100)), rng.integers(0, TEXT["vocab_size"], (1, CANVAS))
    logits = {e.name: e.first_logits(ids, canvas) for e in engines}
    first = engines[0].name
    agree = ", ".join(
        f"{n}: max |logit difference| {np.abs(v - logits[first]).max():.1e}" for n, v in logits.items() if n != first
    )
    print(f"# same function: {first} against {agree} (prefix 1,100, one denoising step)")
    for prefix in args.prefix:
        ids = rng.integers(0, TEXT["vocab_size"], (1, prefix))
        rates: dict[str, list[float]] = {e.name: [] for e in engines}
        for e in engines:  # warm-up (compilation, allocation)
            _use_cache(e)
            e.run(ids, 1)
        for _ in range(args.rounds):
            for e in engines:
                _use_cache(e)
                times = e.run(ids, args.steps)
                rates[e.name].append(len(times) / sum(times))
        med = {n: statistics.median(r) for n, r in rates.items()}
        cells = [f"{min(r):.3f}-{med[n]:.3f}" for n, r in rates.items()]
        ratios = [f"{med[engines[0].name] / med[e.name]:.2f}x" for e in engines[1:]]
        print(f"| {prefix:,} | " + " | ".join(cells + ratios) + " |", flush=True)
    if not args.no_memory:
        memory_table(args, [ENGINES[n] for n in args.engines])  # the classes (an Isolated engine is a proxy)


def memory_table(args, classes) -> None:
    from mlx_diffgemma.memory import fmt

    print("\n| prefix | " + " | ".join(f"{c.name} peak memory above load" for c in classes) + " |")
    print("|---|" + "---|" * len(classes))
    for prefix in args.prefix:
        cells = []
        for c in classes:
            key = next(k for k, v in ENGINES.items() if v is c)
            r = subprocess.run(
                [sys.executable, __file__, "--workdir", str(args.workdir), "--child", key, str(prefix)],
                capture_output=True,
                text=True,
                env=_clean_env() if key in ISOLATED else None,
            )
            cells.append(fmt(json.loads(r.stdout)["peak_above_load"]) if r.returncode == 0 else "failed")
        print(f"| {prefix:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
