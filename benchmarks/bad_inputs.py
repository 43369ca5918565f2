"""A battery of bad inputs, by class, against the command line and the Python API, and what each one did.

Every case runs in a fresh folder beside a few files of "the user's" (a thesis, an SSH key, a model folder), with
a time limit. Its outcome is one of:
    error      a one-line `error: ...` on stderr, exit 1 or 2, nothing of the user's changed (what is wanted)
    session    chat reported the error on one line and went on answering (what is wanted in a chat)
    ok         it worked, as it should (an input the audit found refused that is fine)
    kept       the command ran and left out what it must not copy or run (what is wanted for those cases)
    traceback  a Python traceback reached the user
    crash      the process died of a signal (a segmentation fault, say)
    hang       it ran past the time limit
    data loss  a file of the user's was changed or removed
    accepted   it went on as if the input were fine (exit 0)
    other      anything else (several lines, a wrong exit code)

    python benchmarks/bad_inputs.py [--python PATH] [--only CLASS] [--verbose]

`--python` runs the cases with another environment's interpreter (an older revision, to compare).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mlx_diffgemma" / "demo" / "model"
GOOD = '{"messages": [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]}\n'


@dataclass
class Case:
    cls: str
    name: str
    args: list[str] | None = None  # mlx_diffgemma arguments ({w} is the case's folder)
    code: str | None = None  # or Python code run with the interpreter
    stdin: bytes | None = None
    setup: Callable[[Path], None] | None = None
    want: str = "error"  # error | session | kept | ok
    check: Callable[[Path], bool] | None = None  # for "kept": True when nothing leaked
    env: dict[str, str] = field(default_factory=dict)


# ---- set-ups ----------------------------------------------------------------------------------------------------


def user_files(w: Path) -> None:
    try:  # a device node of the user's own (/dev/null's twin), so that no case can touch the real /dev
        os.mknod(w / "device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        os.mkfifo(w / "device")
    (w / "thesis").mkdir()
    (w / "thesis" / "thesis.txt").write_text("four years of work")
    (w / "id_rsa").write_text("PRIVATE KEY")
    (w / "notes.txt").write_text("mine")
    shutil.copytree(DEMO, w / "model")
    (w / "chat.jsonl").write_text(GOOD * 4)


def edit_config(change: dict, where: str = "text_config", file: str = "config.json"):
    def setup(w: Path) -> None:
        cfg = json.loads((w / "model" / file).read_text())
        (cfg[where] if where else cfg).update(change)
        (w / "model" / file).write_text(json.dumps(cfg))

    return setup


def edit_index(name: str):
    def setup(w: Path) -> None:
        p = w / "model" / "model.safetensors.index.json"
        index = json.loads(p.read_text())
        index["weight_map"][next(iter(index["weight_map"]))] = name
        p.write_text(json.dumps(index))
        shutil.copy(DEMO / "model.safetensors", w / "outside.safetensors")

    return setup


def write(name: str, content: bytes):
    def setup(w: Path) -> None:
        (w / name).write_bytes(content)

    return setup


SAVE_CHAT = (
    "import sys\nfrom mlx_diffgemma import load\nfrom mlx_diffgemma.chat import ChatSession\n"
    "m, t = load('demo')\nc = ChatSession(m, t)\nc.ask('Sort: 2 1', seed=0)\nc.save(sys.argv[1])\n"
)


def saved_chat(edit: Callable[[bytes], bytes] | None = None, meta: Callable[[dict], dict] | None = None):
    """A chat file saved by this environment, then damaged."""

    def setup(w: Path) -> None:
        path = w / "saved.safetensors"
        subprocess.run([PYTHON, "-c", SAVE_CHAT, str(path)], check=True, capture_output=True, cwd=w)
        if meta is not None:
            import mlx.core as mx

            arrays, m = mx.load(str(path), format="safetensors", return_metadata=True)
            mx.save_safetensors(str(path), arrays, metadata=meta(m))
        if edit is not None:
            path.write_bytes(edit(path.read_bytes()))
        path.rename(w / "saved")

    return setup


def flip(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[-3] ^= 0xFF
    return bytes(b)


def with_meta(key: str, value):
    def change(m: dict) -> dict:
        inner = json.loads(m["meta"])
        inner[key] = value
        return {**m, "meta": json.dumps(inner)}

    return change


def chat_case(name: str, line: str, setup=None) -> Case:
    stdin = b"Sort: 3 1 2\n" + (line.encode() if isinstance(line, str) else line) + b"\nReverse: abc\n"
    return Case(
        "chat files", name, ["chat", "--model", "demo", "--seed", "0"], stdin=stdin, setup=setup, want="session"
    )


def api(body: str) -> str:
    """Python API code: a ValueError is the clear error wanted; anything else escapes as itself."""
    return (
        "import sys\nfrom mlx_diffgemma import load, generate\nm, tok = load('demo')\ntry:\n"
        + "".join("    " + line + "\n" for line in body.splitlines())
        + "except ValueError as e:\n    print(f'error: {e}', file=sys.stderr)\n    sys.exit(1)\n"
    )


def no_secret(w: Path) -> bool:
    outputs = [p for p in w.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "id_rsa"]
    return not any(b"PRIVATE KEY" in p.read_bytes() for p in outputs)


def link_secret(w: Path) -> None:
    (w / "model" / "notes.txt").symlink_to(w / "id_rsa")


def evil_tokenizer(w: Path) -> None:
    (w / "model" / "tokenizer.json").unlink()
    (w / "model" / "tokenizer_config.json").write_text(
        '{"auto_map": {"AutoTokenizer": ["evil.Evil", null]}, "tokenizer_class": "Evil"}'
    )
    (w / "model" / "evil.py").write_text(f"open({str(w / 'ran')!r}, 'w').write('x')\nclass Evil: pass\n")
    (w / "model" / "tokenizer.model").write_bytes(b"not a model")


# ---- the cases --------------------------------------------------------------------------------------------------


def cases() -> list[Case]:
    gen = ["generate", "--model", "demo", "-p", "Sort: 3 1 2"]
    train = ["train", "--model", "{w}/model", "--data", "{w}/chat.jsonl", "--steps", "1", "--batch-size", "2"]
    conv = ["convert", "--hf-path", "{w}/model"]
    out: list[Case] = []
    # data loss: outputs that would replace what the tool did not write
    for name, dst, force in [
        ("train --out on a folder of the user's", "{w}/thesis", []),
        ("train --out on a plain file", "{w}/notes.txt", []),
        ("train --out on the model folder", "{w}/model", []),
        ("train --out on the model folder, --force", "{w}/model", ["--force"]),
        ("train --out on the folder holding the model, --force", "{w}", ["--force"]),
        ("train --out on a device", "{w}/device", ["--force"]),
    ]:
        out.append(Case("data loss", name, [*train, "--out", dst, *force]))
    for name, dst, force in [
        ("convert onto an existing folder", "{w}/thesis", []),
        ("convert onto the source, --force", "{w}/model", ["--force"]),
        ("convert onto the source's parent, --force", "{w}", ["--force"]),
        ("convert onto a device, --force", "{w}/device", ["--force"]),
        ("convert onto a plain file", "{w}/notes.txt", []),
    ]:
        out.append(Case("data loss", name, [*conv, "--mlx-path", dst, "-q", *force]))
    for name, target in [("/save over a file of the user's", "{w}/notes.txt"), ("/save to a device", "{w}/device")]:
        c = chat_case(name, f"/save {target}")
        c.cls = "data loss"
        out.append(c)
    c = chat_case("/save onto a folder", "/save {w}/thesis")
    c.cls = "data loss"
    out.append(c)

    # crashes: ids outside the vocabulary, prompts that do not fit
    for name, body in [
        ("ids past the vocabulary", "generate(m, tok, [2, 10**6], max_tokens=16)"),
        ("a negative id", "generate(m, tok, [2, -1], max_tokens=16)"),
        ("a float id", "generate(m, tok, [2, 3.5], max_tokens=16)"),
        ("no ids", "generate(m, tok, [], max_tokens=16)"),
        ("a message without content", "generate(m, tok, [{'role': 'user'}], max_tokens=16)"),
        ("a prompt of the wrong type", "generate(m, tok, {'text': 'hi'}, max_tokens=16)"),
        ("max_tokens of zero", "generate(m, tok, 'hi', max_tokens=0)"),
        ("max_tokens past the context", "generate(m, tok, 'hi', max_tokens=10**9)"),
        ("a prompt past the context", "generate(m, tok, 'a' * 5000, max_tokens=16)"),
        ("NaN temperature", "generate(m, tok, 'hi', t_min=float('nan'))"),
    ]:
        out.append(Case("crashes", name, code=api(body)))
    out.append(
        Case(
            "crashes",
            "a tokenizer larger than the model",
            [*gen[:2], "{w}/model", "-p", "Sort: 3 1 2"],
            setup=edit_config({"vocab_size": 100}),
        )
    )
    out.append(Case("crashes", "a prompt that cannot fit in memory", gen, env={"MLX_DIFFGEMMA_MEMORY_GB": "0.001"}))
    out.append(Case("crashes", "a prompt over the context", [*gen[:4], "x " * 3000]))
    out.append(
        chat_case(
            "a chat file with an id past the vocabulary",
            "/load {w}/saved",
            saved_chat(meta=with_meta("pending", [10**6])),
        )
    )
    out[-1].cls = "crashes"

    # chat files
    ok = chat_case("/save then /load without an extension", "/save {w}/chat1\n/load {w}/chat1")
    ok.want = "ok"
    out += [
        ok,
        chat_case("/load a missing file", "/load {w}/missing"),
        chat_case("/load a folder", "/load {w}/thesis"),
        chat_case("/load an empty file", "/load {w}/empty", write("empty", b"")),
        chat_case("/load random bytes", "/load {w}/junk", write("junk", os.urandom(4096))),
        chat_case("/load a file that is not a chat", "/load {w}/notes.txt"),
        chat_case("/load a chat with a flipped byte", "/load {w}/saved", saved_chat(edit=flip)),
        chat_case("/load a truncated chat", "/load {w}/saved", saved_chat(edit=lambda b: b[: len(b) // 2])),
        chat_case(
            "/load a chat with damaged metadata", "/load {w}/saved", saved_chat(meta=lambda m: {**m, "meta": "{"})
        ),
        chat_case(
            "/load a chat whose messages are not a list", "/load {w}/saved", saved_chat(meta=with_meta("messages", 3))
        ),
        chat_case("/load a chat with a bad token list", "/load {w}/saved", saved_chat(meta=with_meta("tokens", ["a"]))),
        chat_case("a line that is not UTF-8", b"\xff\xfe\xfd"),
        chat_case("/load with no file", "/load"),
        chat_case("/save with no file", "/save"),
        chat_case("an unknown command", "/bogus"),
    ]

    # security
    for name in ("../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."):
        out.append(
            Case("security", f"index names {name!r}", [*gen[:2], "{w}/model", "-p", "hi"], setup=edit_index(name))
        )
        out.append(
            Case("security", f"convert: index names {name!r}", [*conv, "--mlx-path", "{w}/q"], setup=edit_index(name))
        )
    out.append(
        Case(
            "security",
            "convert copies a link to a secret",
            [*conv, "--mlx-path", "{w}/q", "-q"],
            setup=link_secret,
            want="kept",
            check=no_secret,
        )
    )
    out.append(
        Case(
            "security",
            "train copies a link to a secret",
            [*train, "--out", "{w}/t"],
            setup=link_secret,
            want="kept",
            check=no_secret,
        )
    )
    out.append(
        Case(
            "security",
            "a tokenizer's auto_map",
            [*gen[:2], "{w}/model", "-p", "hi"],
            setup=evil_tokenizer,
            check=lambda w: not (w / "ran").exists(),
        )
    )

    # validation
    for flags in [
        ["--t-min", "nan"],
        ["--t-min", "inf"],
        ["--t-min", "-1"],
        ["--t-max", "nan"],
        ["--t-min", "0.9", "--t-max", "0.5"],
        ["--entropy-bound", "nan"],
        ["--entropy-bound", "-1"],
        ["--confidence", "0"],
        ["--confidence", "nan"],
        ["--steps", "0"],
        ["--steps", "-3"],
        ["--steps", "abc"],
        ["--stability", "-1"],
        ["-m", "0"],
        ["-m", "-5"],
        ["-m", "abc"],
        ["--dtype", "float8"],
        ["--seed", "abc"],
        ["--seed", "-1"],
        ["--temp", "0.7"],
        ["--top-p", "0.9"],
    ]:
        out.append(Case("validation", "generate " + " ".join(flags), [*gen, *flags]))
    for flags in [
        ["--lr", "nan"],
        ["--lr", "0"],
        ["--lr", "-1"],
        ["--lr", "inf"],
        ["--steps", "0"],
        ["--batch-size", "0"],
        ["--lora-rank", "0"],
        ["--encoder-weight", "nan"],
        ["--encoder-weight", "-1"],
        ["--checkpoint-every", "0"],
    ]:
        out.append(Case("validation", "train " + " ".join(flags), [*train, "--out", "{w}/t", *flags]))
    for change in [
        {"sliding_window": 0},
        {"hidden_size": "96"},
        {"num_attention_heads": 0},
        {"num_experts": -8},
        {"intermediate_size": 1.5},
        {"rms_norm_eps": float("nan")},
        {"top_k_experts": 99},
        {"head_dim": True},
        {"vocab_size": 0},
        {"max_position_embeddings": -1},
        {"layer_types": ["nope"] * 6},
        {"per_layer_config": {"9": {"head_dim": 8}}},
        {"head_dim": 23},
    ]:
        out.append(
            Case(
                "validation",
                f"config {json.dumps(change)}",
                [*gen[:2], "{w}/model", "-p", "hi"],
                setup=edit_config(change),
            )
        )
    for change in [{"canvas_length": 0}, {"canvas_length": "16"}]:
        out.append(
            Case(
                "validation",
                f"config {json.dumps(change)}",
                [*gen[:2], "{w}/model", "-p", "hi"],
                setup=edit_config(change, where=""),
            )
        )
    for change in [{"t_min": "x"}, {"eos_token_id": "a"}, {"max_denoising_steps": 0}, {"t_max": float("inf")}]:
        setup = edit_config(change, where="", file="generation_config.json")
        out.append(
            Case(
                "validation",
                f"generation_config {json.dumps(change)}",
                [*gen[:2], "{w}/model", "-p", "hi"],
                setup=setup,
            )
        )
    for name, line in [
        ("prompt without completion", '{"prompt": "hi"}'),
        ("messages not a list", '{"messages": "hi"}'),
        ("not an object", "[1, 2]"),
        ("not JSON", "{not json"),
        ("no assistant answer", '{"messages": [{"role": "user", "content": "hi"}]}'),
        ("content not text", '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}'),
    ]:
        setup = write("bad.jsonl", (GOOD + line + "\n").encode())
        out.append(
            Case("validation", f"JSONL: {name}", [*train[:4], "--data", "{w}/bad.jsonl", "--out", "{w}/t"], setup=setup)
        )
    out.append(
        Case(
            "validation",
            "JSONL: not UTF-8",
            [*train[:4], "--data", "{w}/bad.jsonl", "--out", "{w}/t"],
            setup=write("bad.jsonl", b"\xff\xfe\n"),
        )
    )
    out.append(
        Case(
            "validation",
            "JSONL: empty",
            [*train[:4], "--data", "{w}/bad.jsonl", "--out", "{w}/t"],
            setup=write("bad.jsonl", b""),
        )
    )
    for flags in [
        ["--q-bits", "7"],
        ["--q-group-size", "48"],
        ["--q-mode", "foo"],
        ["--recipe", "nope"],
        ["--dtype", "int8"],
    ]:
        out.append(
            Case(
                "validation",
                "convert " + " ".join(flags),
                [*conv, "--mlx-path", "{w}/q", "-q", *flags]
                if "--recipe" not in flags
                else [*conv, "--mlx-path", "{w}/q", *flags],
            )
        )
    return out


# ---- running ----------------------------------------------------------------------------------------------------

PYTHON = sys.executable


def node(p: Path) -> str:
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        return "gone"
    return "device" if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) else "replaced"


def digest(w: Path) -> dict[str, str]:
    """The user's files: (path -> sha256) for the sentinel files and the model folder, and the device node."""
    out = {str(w / "device"): node(w / "device")}
    for p in [
        w / "thesis" / "thesis.txt",
        w / "id_rsa",
        w / "notes.txt",
        w / "chat.jsonl",
        *sorted((w / "model").glob("*")),
    ]:
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"
    return out


def run(case: Case, timeout: float) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        user_files(w)
        if case.setup:
            case.setup(w)
        before = digest(w)
        if case.args is not None:
            cmd = [PYTHON, "-m", "mlx_diffgemma", *[a.format(w=w) for a in case.args]]
        else:
            cmd = [PYTHON, "-c", case.code]
        stdin = case.stdin.replace(b"{w}", str(w).encode()) if case.stdin else None
        env = {**os.environ, **case.env}
        try:
            r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, cwd=w, env=env)
        except subprocess.TimeoutExpired:
            return "hang", ""
        err = r.stderr.decode("utf-8", "replace")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        after = digest(w)
        lost = [k for k, v in before.items() if after.get(k) != v]
        if r.returncode < 0:
            return "crash", f"signal {-r.returncode}"
        if "Traceback" in err:
            return "traceback", err.strip().splitlines()[-1]
        if lost:
            return "data loss", lost[0]
        if case.want == "kept":
            return ("kept" if r.returncode == 0 and case.check(w) else "other"), err.strip()[-200:]
        if case.check is not None and not case.check(w):
            return "other", "the check failed"
        if case.want == "ok":
            return ("ok" if r.returncode == 0 and not errors else "other"), err.strip()[-200:]
        if case.want == "session":
            answered = len(r.stdout.decode("utf-8", "replace").splitlines()) >= 2
            return ("session" if r.returncode == 0 and errors and answered else "other"), (errors or [err[-200:]])[0]
        if r.returncode == 0:
            return "accepted", r.stdout.decode("utf-8", "replace")[:80]
        if r.returncode in (1, 2) and len(err.strip().splitlines()) == 1 and errors:
            return "error", errors[0]
        return "other", err.strip()[-200:]


def main() -> None:
    global PYTHON
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--only")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    PYTHON = args.python
    todo = [c for c in cases() if args.only in (None, c.cls)]
    results: dict[str, dict[str, int]] = {}
    tic = time.perf_counter()
    for c in todo:
        outcome, detail = run(c, args.timeout)
        results.setdefault(c.cls, {}).setdefault(outcome, 0)
        results[c.cls][outcome] += 1
        if args.verbose or outcome not in ("error", "session", "kept", "ok"):
            print(f"{c.cls:<11} {outcome:<10} {c.name}: {detail}", file=sys.stderr, flush=True)
    where = subprocess.run(
        [PYTHON, "-c", "import mlx_diffgemma, os; print(os.path.dirname(mlx_diffgemma.__file__))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    rev = subprocess.run(
        ["git", "-C", where or str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    print(
        f"# {time.strftime('%Y-%m-%d')} · {args.python} · HEAD {rev.stdout.strip()} · {time.perf_counter() - tic:.0f} s"
    )
    print("| class | cases | outcomes |")
    print("|---|---|---|")
    for cls, outcomes in results.items():
        n = sum(outcomes.values())
        print(
            f"| {cls} | {n} | " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda x: -x[1])) + " |"
        )
    print(
        f"| all | {len(todo)} | "
        + ", ".join(
            f"{k} {sum(o.get(k, 0) for o in results.values())}"
            for k in sorted({k for o in results.values() for k in o})
        )
        + " |"
    )


if __name__ == "__main__":
    main()
