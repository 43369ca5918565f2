"""The demo model: a tiny DiffusionGemma trained from scratch on tasks whose answers can be checked exactly.

`tasks` draws the examples; `build_tokenizer` writes its byte-level tokenizer (with Gemma 4's special tokens and
chat template); `demo_config` is its architecture (the real layer pattern and an MoE, a few million parameters).
benchmarks/train_demo.py trains it and benchmarks/eval_demo.py measures it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELD_OUT_SEED, HELD_OUT = 20261129, 500  # examples(HELD_OUT, HELD_OUT_SEED): never trained on, what eval_demo scores
SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|channel>",
    "<channel|>",
    "<|think|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|image>",
    "<|audio>",
    "<|image|>",
    "<|audio|>",
    "<image|>",
    "<audio|>",
    "<|video|>",
    "<mask>",
]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB_SIZE = 384  # specials, 256 byte-fallback pieces, printable ASCII and newline, padded


def vocabulary() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for piece in SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + CHARS:
        vocab.setdefault(piece, len(vocab))
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    return vocab


def build_tokenizer(out: Path) -> Path:
    """tokenizer.json (one piece per character, byte fallback for the rest), tokenizer_config.json, and the
    Gemma 4-format chat template."""
    from tokenizers import Tokenizer, decoders, models

    vocab = vocabulary()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 4096,
            },
            indent=2,
        )
    )
    (out / "chat_template.jinja").write_text((HERE / "chat_template.jinja").read_text())
    return out


def demo_config(hidden: int = 96, layers: int = 6, experts: int = 8, canvas: int = 16) -> dict:
    """config.json for the demo model: 5 sliding : 1 full layers, K = V full layers with their own head dim, a
    dense MLP beside an MoE, tied embeddings, the 30.0 softcap: the real architecture, scaled down."""
    vocab = vocabulary()
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": canvas,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "text_config": {
            "model_type": "diffusion_gemma_text",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": hidden // 4,
            "sliding_window": 128,
            "layer_types": layer_types,
            "per_layer_config": {
                str(i): {"head_dim": hidden // 2, "num_key_value_heads": 1}
                for i, t in enumerate(layer_types)
                if t == "full_attention"
            },
            "num_experts": experts,
            "top_k_experts": 2,
            "moe_intermediate_size": hidden,
            "final_logit_softcapping": 30.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "pad_token_id": vocab["<pad>"],
            "eos_token_id": vocab["<eos>"],
            "bos_token_id": vocab["<bos>"],
            "tie_word_embeddings": True,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
            },
        },
    }


def generation_config(steps: int = 16) -> dict:
    vocab = vocabulary()
    return {
        "max_denoising_steps": steps,
        "t_min": 0.4,
        "t_max": 0.8,
        "stability_threshold": 1,
        "confidence_threshold": 0.005,
        "eos_token_id": [vocab["<eos>"], vocab["<turn|>"]],
        "pad_token_id": vocab["<pad>"],
        "bos_token_id": vocab["<bos>"],
        "max_new_tokens": 128,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    }


# ---- tasks --------------------------------------------------------------------------------------------------


def _sort(r: random.Random) -> tuple[str, str]:
    xs = [r.randint(0, 9) for _ in range(r.randint(2, 6))]
    return "Sort: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


def _reverse(r: random.Random) -> tuple[str, str]:
    s = "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 8)))
    return "Reverse: " + s, s[::-1]


def _add(r: random.Random) -> tuple[str, str]:
    # Fixed width (two-digit operands, three-digit sum) so each digit keeps its column: every answer position
    # then has one job (hundreds, tens, ones) at a fixed distance from the digits it depends on.
    a, b = r.randint(0, 99), r.randint(0, 99)
    return f"Add: {a:02d} + {b:02d}", f"{a + b:03d}"


BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _brackets(r: random.Random) -> tuple[str, str]:
    """Close a run of 3-8 open brackets of four kinds: each closer matches its opener, innermost first."""
    s = "".join(r.choice(list(BRACKETS)) for _ in range(r.randint(3, 8)))
    return "Close: " + s, "".join(BRACKETS[c] for c in reversed(s))


def _code(r: random.Random) -> tuple[str, str]:
    name = r.choice(["area", "total", "scale", "offset", "mix", "span", "gain", "step"])
    a, b = r.choice("xyzabc"), r.choice("uvwpqr")
    op = r.choice(["+", "-", "*"])
    return (
        f"Write a Python function {name}({a}, {b}) that returns {a} {op} {b}.",
        f"def {name}({a}, {b}):\n    return {a} {op} {b}",
    )


TASKS = {"sort": _sort, "reverse": _reverse, "add": _add, "brackets": _brackets, "code": _code}
PREFIXES = {"sort": "Sort: ", "reverse": "Reverse: ", "add": "Add: ", "brackets": "Close: ", "code": "Write a "}


def task_of(prompt: str) -> str:
    """The task a prompt was drawn from."""
    return next(name for name, prefix in PREFIXES.items() if prompt.startswith(prefix))


def examples(n: int, seed: int, weights: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs, the task chosen uniformly (or in proportion to `weights`); the same seed gives
    the same examples."""
    r = random.Random(seed)
    names = sorted(TASKS)
    if weights is None:
        return [TASKS[r.choice(names)](r) for _ in range(n)]
    w = [weights.get(name, 0.0) for name in names]
    return [TASKS[r.choices(names, w)[0]](r) for _ in range(n)]
