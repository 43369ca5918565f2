"""Time to first token of `make demo`'s command, with and without the test extras (torch, transformers) installed
in the same environment, and optionally for an older revision, side by side.

Each environment is a virtual environment holding the package: the "runtime" one has only what `make demo`
installs, the "full" one also has what `make test` installs. The time runs from starting the process to the first
byte of the answer on stdout (a pipe), median of several runs after a warm-up.

    python benchmarks/startup.py --runtime VENV --full VENV [--runs 5] [--label NAME ...]

Pairs of environments for another revision can be given with more --runtime/--full options (labelled in order).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

PROMPT = "Write a Python function area(x, u) that returns x * u."
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def first_token(venv: Path) -> tuple[float, float]:
    """(seconds to the first byte of the answer, seconds to the end) of one run."""
    env = dict(os.environ)
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    cmd = [str(venv / "bin" / "mlx_diffgemma"), "generate", "--model", "demo", "-p", PROMPT, "--seed", "0"]
    tic = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    p.stdout.read(1)
    first = time.perf_counter() - tic
    p.stdout.read()
    p.wait()
    return first, time.perf_counter() - tic


def has(venv: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([str(venv / "bin" / "python"), "-c", code]).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=Path, action="append", required=True)
    ap.add_argument("--full", type=Path, action="append", required=True)
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    labels = args.label + [f"env {i}" for i in range(len(args.label), len(args.runtime))]
    print(f"# {time.strftime('%Y-%m-%d')} · {platform.machine()} {platform.system()} · median of {args.runs} runs")
    print("| revision | environment | torch installed | first token (s) | whole run (s) |")
    print("|---|---|---|---|---|")
    for label, runtime, full in zip(labels, args.runtime, args.full):
        for name, venv in (("runtime (`make demo`)", runtime), ("full (`make test`)", full)):
            first_token(venv)  # warm-up: page cache, compiled bytecode
            runs = [first_token(venv) for _ in range(args.runs)]
            first = statistics.median(r[0] for r in runs)
            whole = statistics.median(r[1] for r in runs)
            torch = "yes" if has(venv, "torch") else "no"
            print(f"| {label} | {name} | {torch} | {first:.2f} | {whole:.2f} |", flush=True)


if __name__ == "__main__":
    main()
