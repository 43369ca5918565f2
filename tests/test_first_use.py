"""The first things an mlx-lm user types: a repo id (downloaded from a Hub look-alike on 127.0.0.1), `-h`,
`python -m mlx_diffgemma.generate`, mlx-lm's flag names, and output that reads right in a pipe."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub import FakeHub

from mlx_diffgemma.loading import DEMO

REPO = Path(__file__).resolve().parents[1]


def run(*args, env=None, module="mlx_diffgemma", input=None):
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        input=input,
    )


def error_line(r) -> str:
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture
def hub(tmp_path):
    h = FakeHub({"tiny-org/demo": DEMO})
    yield h
    h.close()


def test_a_repo_id_downloads_once_then_works_offline(hub, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
    r = run("generate", "--model", "tiny-org/demo", "-p", "Sort: 3 1 2", "--seed", 0, env=env)
    assert r.returncode == 0 and r.stdout == "1 2 3\n", r.stderr
    assert sorted(hub.downloads()) == sorted(f.name for f in DEMO.iterdir())  # each file once, nothing else
    hub.close()  # the Hub is gone: offline, and unreachable
    for extra in ({"HF_HUB_OFFLINE": "1"}, {}):
        r = run("generate", "--model", "tiny-org/demo", "-p", "Sort: 3 1 2", "--seed", 0, env={**env, **extra})
        assert r.returncode == 0 and r.stdout == "1 2 3\n", r.stderr
    r = run("generate", "--model", "tiny-org/other", "-p", "hi", env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert error_line(r) == "error: tiny-org/other is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"


def test_a_missing_repo_is_one_line(hub, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
    r = run("generate", "--model", "tiny-org/missing", "-p", "hi", env=env)
    assert r.returncode == 1
    assert error_line(r).startswith("error: tiny-org/missing is neither a local folder nor a repo on the Hugging Face")


def test_convert_and_info_take_a_repo_id(hub, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
    r = run("info", "--model", "tiny-org/demo", env=env)
    assert r.returncode == 0 and "vocab 384" in r.stdout
    assert "model.safetensors" not in hub.downloads()  # info reads the configs only
    r = run("convert", "--hf-path", "tiny-org/demo", "--mlx-path", tmp_path / "q8", "--q-bits", 8, "-q", env=env)
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", tmp_path / "q8", "-p", "Sort: 3 1 2", "--seed", 0)
    assert r.returncode == 0 and r.stdout == "1 2 3\n"


def test_help_and_python_m_entry_points():
    for args in (["-h"], ["generate", "-h"], ["chat", "-h"], ["convert", "-h"], ["info", "-h"], ["train", "-h"]):
        r = run(*args)
        assert r.returncode == 0 and "Usage" in r.stdout, (args, r.stderr)
    r = run("--model", "demo", "-p", "Sort: 3 1 2", "--seed", 0, module="mlx_diffgemma.generate")
    assert r.returncode == 0 and r.stdout == "1 2 3\n" and r.stderr == ""
    r = run("-h", module="mlx_diffgemma.convert")
    assert r.returncode == 0 and "--hf-path" in r.stdout
    r = run(module="mlx_diffgemma.generate")  # no arguments: the usage error, not silence
    assert r.returncode == 2 and "--model" in r.stderr


def test_mlx_lm_flags_point_at_what_this_tool_has():
    r = run("generate", "--model", "demo", "-p", "hi", "--temp", "0.7")
    assert r.returncode == 2 and "--t-max" in error_line(r) and "--t-min" in error_line(r)
    r = run("generate", "--model", "demo", "-p", "hi", "--top-p", "0.9")
    assert r.returncode == 2 and "--entropy-bound" in error_line(r)
    system = run("generate", "--model", "demo", "-p", "Sort: 3 1 2", "--system", "Be brief.", "--seed", 0)
    alias = run("generate", "--model", "demo", "-p", "Sort: 3 1 2", "--system-prompt", "Be brief.", "--seed", 0)
    assert system.returncode == alias.returncode == 0 and system.stdout == alias.stdout
    raw = run("generate", "--model", "demo", "-p", "Sort: 3 1 2", "--raw", "--seed", 0)
    alias = run("generate", "--model", "demo", "-p", "Sort: 3 1 2", "--ignore-chat-template", "--seed", 0)
    assert raw.returncode == alias.returncode == 0 and raw.stdout == alias.stdout
    for command in (
        ["info", "--model", "missing-folder"],
        ["convert", "--hf-path", "missing-folder", "--mlx-path", "x"],
    ):
        r = run(*command, "--debug")  # the flag their errors suggest exists
        assert r.returncode == 1 and "No such option" not in r.stderr


def test_info_model_flag_and_sizes_in_readable_units():
    flag, positional = run("info", "--model", "demo"), run("info", "demo")
    assert flag.returncode == positional.returncode == 0 and flag.stdout == positional.stdout
    assert "7.8 MB on disk" in flag.stdout
    r = run("generate", "--model", "demo", "-p", "Sort: 3 1 2", "--verbose")
    assert "peak memory 0.00 GB" not in r.stderr and " MB" in r.stderr.splitlines()[-1]


def test_q_says_which_group_size_it_used(tmp_path):
    r = run("convert", "--hf-path", "demo", "--mlx-path", tmp_path / "q4", "-q")
    assert r.returncode == 0
    assert "affine 4-bit group 32: experts" in r.stderr  # the demo is 96 wide: 64 does not divide it
    card = (tmp_path / "q4" / "README.md").read_text()
    assert "group 32" in card and "0.00" not in card


def test_json_counts_like_the_live_view():
    r = run("generate", "--model", "demo", "-p", "Write a Python function area(x, u) that returns x * u.", "--json")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    blocks = [e for e in events if e["event"] == "block"]
    assert [b["block"] for b in blocks] == list(range(1, len(blocks) + 1))
    for b in blocks:
        mine = [s["step"] for s in steps if s["block"] == b["block"]]
        assert mine == list(range(1, len(mine) + 1)) and len(mine) == b["steps"]


def test_chat_help_and_start_up_hint():
    r = run("chat", "--model", "demo", input="/help\n/quit\n")
    assert r.returncode == 0 and "/save FILE" in r.stderr and "/load FILE" in r.stderr
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "mlx_diffgemma", "chat", "--model", "demo"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    seen, deadline = b"", time.time() + 60
    while b"/help" not in seen and time.time() < deadline:
        if select.select([master], [], [], 1)[0]:
            seen += os.read(master, 4096)
    os.write(master, b"/quit\n")
    p.wait(timeout=60)
    os.close(master)
    assert b"/help lists the commands" in seen


def test_bench_takes_a_step_apart(checkpoint):
    r = run("bench", "--model", checkpoint("basic"), "--prefix", 40, "--steps", 2)
    assert r.returncode == 0, r.stderr
    assert "this machine's matmul" in r.stdout and "steps/s" in r.stdout
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    for name in ("attention", "dense MLP", "experts", "router", "output head", "self-conditioning", "sampler"):
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert float(cells[0]) > 0 and float(cells[3]) > 0, rows[name]  # GFLOP and a measured time
    real = run("bench", "--model", REPO / "benchmarks/configs/diffusiongemma-26b-a4b", "--prefix", 1024)
    assert real.returncode == 0, real.stderr
    assert "2532.5 GFLOP" in real.stdout  # the real model's step, from its config alone
    bad = run("bench", "--model", "demo", "--prefix", 0)
    assert bad.returncode == 2 and error_line(bad).startswith("error: --prefix")


def test_bench_says_when_openblas_workers_spin(monkeypatch):
    """On a preloaded OpenBLAS without OPENBLAS_THREAD_TIMEOUT (read at load: bench can only say so), a hint."""
    from mlx_diffgemma import bench

    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    assert "OPENBLAS_THREAD_TIMEOUT=4" in bench.blas_note()
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")
    assert bench.blas_note() is None
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT")
    monkeypatch.setenv("LD_PRELOAD", "")
    assert bench.blas_note() is None
