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


def demo_config(hidden: int = 96, layers: int = 6, experts: int = 8, canvas: int = 64) -> dict:
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


def generation_config(steps: int = 32) -> dict:
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


BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}
PREFIXES = {"sort": "Sort: ", "reverse": "Reverse: ", "add": "Add: ", "brackets": "Close: ", "code": "Write a "}


def _sort(r: random.Random) -> tuple[str, str]:
    xs = [r.randint(0, 9) for _ in range(r.randint(3, 12))]
    return "Sort: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


def _reverse(r: random.Random) -> tuple[str, str]:
    s = "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(4, 16)))
    return "Reverse: " + s, s[::-1]


def _add(r: random.Random) -> tuple[str, str]:
    """Two-digit operands and a three-digit sum, at fixed width (each answer position keeps its column). Three-digit
    operands were tried first: about 5,500 training steps over five runs never learned their tens and ones digits
    (benchmarks/RESULTS.md), and this model is too small to wait for them."""
    a, b = r.randint(0, 99), r.randint(0, 99)
    return f"Add: {a:02d} + {b:02d}", f"{a + b:03d}"


def _brackets(r: random.Random) -> tuple[str, str]:
    s = "".join(r.choice(list(BRACKETS)) for _ in range(r.randint(4, 12)))
    return "Close: " + s, "".join(BRACKETS[c] for c in reversed(s))


def _code(r: random.Random) -> tuple[str, str]:
    """A function of two arguments in one to four lines: up to three named intermediate results, then a return,
    each `x op y` over the arguments and the names already set. The longest answers (up to about 80 characters)
    run past one 64-token canvas."""
    name = r.choice(["area", "total", "scale", "offset", "mix", "span", "gain", "step", "blend", "shift"])
    a, b = r.choice("xyzabc"), r.choice("uvwpqr")
    known, names = [a, b], r.sample("tsmnk", 3)
    lines, said = [], []
    for target in names[: r.randint(0, 3)]:
        x, y = r.sample(known, 2)
        expr = f"{x} {r.choice('+-*')} {y}"
        lines.append(f"{target} = {expr}")
        said.append(f"sets {target} = {expr}")
        known.append(target)
    x, y = r.sample(known[-2:] if len(known) > 2 else known, 2)
    expr = f"{x} {r.choice('+-*')} {y}"
    said.append(f"returns {expr}")
    body = "".join(f"\n    {line}" for line in lines)
    return (
        f"Write a Python function {name}({a}, {b}) that " + ", then ".join(said) + ".",
        f"def {name}({a}, {b}):{body}\n    return {expr}",
    )


TASKS = {"sort": _sort, "reverse": _reverse, "add": _add, "brackets": _brackets, "code": _code}
# System prompts the examples may open with: none changes the answer, so the model learns to answer
# the same under any of them (and, through variety, under a user's own `--system`).
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a careful assistant. Answer exactly.",
    "Answer with the result only.",
    "You are a small model trained on a few tasks: sorting, reversing, adding, closing brackets and code.",
    "Be concise.",
    "You are a coding assistant.",
    "Reply in plain text.",
    "You are DiffusionGemma demo. Think carefully and answer.",
]
CHAT_SHARE = {"system": 0.3, "history": 0.3}  # of examples: a system prompt; one or two earlier turns


def question(prompt: str | list[dict]) -> str:
    """The question a prompt asks: the prompt itself, or its last user message."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def task_of(prompt: str | list[dict]) -> str:
    """The task a prompt (a question, or chat messages ending in one) was drawn from."""
    q = question(prompt)
    return next(name for name, prefix in PREFIXES.items() if q.startswith(prefix))


def examples(n: int, seed: int, weights: dict[str, float] | None = None) -> list[tuple[str | list[dict], str]]:
    """n (prompt, answer) pairs, the task chosen uniformly (or in proportion to `weights`); the same seed gives
    the same examples. A share of the prompts are chat messages: a system prompt first, or earlier turns (other
    questions with their right answers) before the question."""
    r = random.Random(seed)
    names = sorted(TASKS)
    w = None if weights is None else [weights.get(name, 0.0) for name in names]

    def draw() -> tuple[str, str]:
        return TASKS[r.choice(names) if w is None else r.choices(names, w)[0]](r)

    out: list[tuple[str | list[dict], str]] = []
    for _ in range(n):
        prompt, answer = draw()
        system = r.random() < CHAT_SHARE["system"]
        earlier = r.randint(1, 2) if r.random() < CHAT_SHARE["history"] else 0
        if system or earlier:
            messages = [{"role": "system", "content": r.choice(SYSTEMS)}] if system else []
            for q, a in (draw() for _ in range(earlier)):
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            prompt = messages + [{"role": "user", "content": prompt}]
        out.append((prompt, answer))
    return out
