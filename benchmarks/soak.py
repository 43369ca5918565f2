"""Soak test of `mlx_diffgemma serve` with the demo model: 300 mixed requests from 4 concurrent clients (chat and
completions, streamed and not, with and without a shared system prompt, held-out tasks of every kind), then the
throughput of 4 concurrent clients against one at a time, in the same run.

Checks and prints: every response well-formed (the shape the OpenAI client parses, a finish reason, usage counts),
the latency of the last 50 requests against the first 50 (same mix), and the server's resident memory sampled
through the run (flat after warm-up).

    python benchmarks/soak.py [--requests 300] [--clients 4]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from mlx_diffgemma.demo import HELD_OUT_SEED, examples, question


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_diffgemma", "serve", "--model", "demo", "--port", str(port), "--max-batch",
           str(max_batch)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    for _ in range(300):
        try:
            client.models.list()
            return proc
        except openai.APIConnectionError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def one(client: openai.OpenAI, i: int, prompt: str) -> tuple[float, str | None, int]:
    """Request i of the mix; returns (seconds, problem or None, completion tokens)."""
    kind = i % 6
    system = {"role": "system", "content": "You are a careful assistant. Answer with the result only."}
    tic = time.perf_counter()
    try:
        if kind in (0, 1, 2):  # chat: plain, with the shared system prompt, streamed
            messages = ([system] if kind == 1 else []) + [{"role": "user", "content": prompt}]
            if kind == 2:
                chunks = list(client.chat.completions.create(model="demo", messages=messages, seed=i, stream=True,
                                                             stream_options={"include_usage": True}))  # fmt: skip
                ok = chunks[-1].usage is not None and chunks[-2].choices[0].finish_reason in ("stop", "length")
                tokens = chunks[-1].usage.completion_tokens if ok else 0
            else:
                r = client.chat.completions.create(model="demo", messages=messages, seed=i)
                c = r.choices[0]
                ok = c.message.role == "assistant" and isinstance(c.message.content, str) and c.finish_reason
                ok = ok and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
                tokens = r.usage.completion_tokens
        elif kind in (3, 4):  # completions, whole and streamed
            if kind == 3:
                r = client.completions.create(model="demo", prompt=prompt, max_tokens=32, seed=i)
                ok, tokens = (
                    isinstance(r.choices[0].text, str) and r.choices[0].finish_reason,
                    r.usage.completion_tokens,
                )
            else:
                chunks = list(client.completions.create(model="demo", prompt=prompt, max_tokens=32, seed=i,
                                                        stream=True))  # fmt: skip
                ok, tokens = chunks[-1].choices[0].finish_reason in ("stop", "length"), 0
        else:  # a request the server must refuse, mixed in
            try:
                client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=10**6)  # fmt: skip
                ok, tokens = False, 0
            except openai.BadRequestError:
                ok, tokens = True, 0
    except Exception as e:  # anything else is a failure of the soak
        return time.perf_counter() - tic, f"{type(e).__name__}: {e}", 0
    return time.perf_counter() - tic, None if ok else f"malformed response to request {i} (kind {kind})", tokens


def run(port: int, n: int, clients: int, prompts: list[str]) -> list[tuple[float, str | None, int]]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda i: one(client, i, prompts[i % len(prompts)]), range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--throughput-requests", type=int, default=48)
    args = ap.parse_args()
    prompts = [question(p) for p, _ in examples(120, HELD_OUT_SEED)]  # the question of a chat example
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(port, max_batch=args.clients)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, rss_mb(proc.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        tic = time.perf_counter()
        results = run(port, args.requests, args.clients, prompts)
        soak_s = time.perf_counter() - tic
        problems = [p for _, p, _ in results if p]
        lat = [t for t, _, _ in results]
        first, last = statistics.median(lat[:50]), statistics.median(lat[-50:])
        print(f"soak: {args.requests} requests from {args.clients} clients in {soak_s:.0f} s; "
              f"{len(problems)} problems{': ' + problems[0] if problems else ''}")  # fmt: skip
        print(f"latency, median: first 50 {first:.3f} s, last 50 {last:.3f} s ({100 * (last / first - 1):+.1f}%)")
        warm = [m for t, m in samples if t > 0.2 * samples[-1][0]]
        quarters = " / ".join(f"{warm[min(len(warm) - 1, k * len(warm) // 4)]:.0f}" for k in range(1, 5))
        print(f"resident memory: start {samples[0][1]:.0f} MB, after warm-up {warm[0]:.0f} MB, then at each quarter "
              f"of the rest {quarters} MB, max {max(warm):.0f} MB ({len(samples)} samples)")  # fmt: skip
        n = args.throughput_requests
        rates = {}
        for clients in (1, args.clients, 1, args.clients):  # alternated, so drift falls on both
            tic = time.perf_counter()
            out = run(port, n, clients, prompts)
            rates.setdefault(clients, []).append(n / (time.perf_counter() - tic))
            assert not [p for _, p, _ in out if p]
        one_at_a_time, concurrent = max(rates[1]), max(rates[args.clients])
        print(f"throughput ({n} requests of the mix): one at a time {one_at_a_time:.2f} req/s, "
              f"{args.clients} concurrent {concurrent:.2f} req/s ({concurrent / one_at_a_time:.2f}x)")  # fmt: skip
    finally:
        stop.set()
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
