"""What each generation mode costs and gives on a set of prompts: exact-match accuracy against reference answers
(or, where a prompt has none, agreement with exact mode's own answer), denoising steps per block, tokens per
forward, decoder FLOPs per generated token (from the step accounting, counting only the canvas positions each
step forwards) and tokens/s on this machine. The modes run side by side, prompt by prompt, so the machine's
noise falls on all of them alike. `mlx_diffgemma eval` and benchmarks/eval_modes.py are built on it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .accounting import step_costs, total
from .generate import Block, Done, Step, render_prompt, settings, stream_generate
from .model import Model


@dataclass(frozen=True)
class Item:
    """One prompt (text or chat messages) and its reference answer (None: compare with exact mode)."""

    prompt: str | list[dict]
    answer: str | None = None


@dataclass
class ModeResult:
    """A mode's totals over the items."""

    name: str
    knobs: dict
    n: int = 0
    right: int = 0
    steps: int = 0
    blocks: int = 0
    generated: int = 0  # tokens through the EOS (transformers' count)
    forwarded: int = 0  # canvas positions forwarded, over all steps
    flops: float = 0.0
    seconds: float = 0.0
    answers: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.right / max(self.n, 1)

    @property
    def steps_per_block(self) -> float:
        return self.steps / max(self.blocks, 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated / max(self.steps, 1)

    @property
    def flops_per_token(self) -> float:
        return self.flops / max(self.generated, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.generated / max(self.seconds, 1e-9)

    def row(self) -> dict:
        return {
            "mode": self.name,
            "knobs": self.knobs,
            "n": self.n,
            "accuracy": self.accuracy,
            "steps_per_block": self.steps_per_block,
            "tokens_per_forward": self.tokens_per_forward,
            "decoder_flops_per_token": self.flops_per_token,
            "tokens_per_s": self.tokens_per_s,
        }


def read_items(path: str | Path) -> list[Item]:
    """JSON lines, each {"prompt": TEXT} or {"messages": [...]}, with an optional "answer"; a line that is not
    is a ValueError naming the file and line."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{e.strerror or e}: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f'{path}:{n}: each line is {{"prompt": ..., "answer": ...}} or {{"messages": [...]}}')
        prompt = row.get("prompt", row.get("messages"))
        ok_prompt = (isinstance(prompt, str) and prompt.strip()) or (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)
        )
        answer = row.get("answer")
        if not ok_prompt or not (answer is None or isinstance(answer, str)):
            raise ValueError(
                f'{path}:{n}: each line is {{"prompt": TEXT}} or {{"messages": [...]}}, with an optional "answer": TEXT'
            )
        items.append(Item(prompt, answer))
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def evaluate(
    model: Model,
    tokenizer,
    items: list[Item],
    modes: dict[str, dict],
    seed: int = 0,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, ModeResult]:
    """Run every mode (name -> settings overrides, e.g. {"mode": "turbo"}) on every item, item by item, each
    with the key seed + i. Items without an answer are scored against the "exact" mode's answer, which must then
    be among the modes (it runs first)."""
    if any(it.answer is None for it in items) and "exact" not in modes:
        raise ValueError('prompts without an answer are compared with exact mode: include "exact" in the modes')
    order = sorted(modes, key=lambda m: m != "exact")
    plans = {name: settings(model, **modes[name]) for name in order}  # checked before any work
    results = {name: ModeResult(name, modes[name]) for name in order}
    config, C = model.config, model.canvas_length
    costs: dict[tuple[int, int, int | None, int], float] = {}
    for i, item in enumerate(items):
        prefix = len(render_prompt(tokenizer, item.prompt))
        reference = item.answer
        for name in order:
            g, r = plans[name], results[name]
            tic = time.perf_counter()
            for e in stream_generate(
                model, tokenizer, item.prompt, max_tokens=max_tokens, seed=seed + i, **modes[name]
            ):
                if isinstance(e, Step):
                    q = C if e.queries is None else e.queries
                    at = (prefix + e.block * C, q, g.sc_top_k, C if e.attended is None else e.attended)
                    if at not in costs:
                        costs[at] = total(
                            step_costs(config, at[0], queries=q, sc_top_k=g.sc_top_k, attended=at[3])
                        ).flops
                    r.flops += costs[at]
                    r.forwarded += q
                elif isinstance(e, Block):
                    r.blocks += 1
                elif isinstance(e, Done):
                    done = e
            r.seconds += time.perf_counter() - tic
            r.steps += done.denoising_steps
            r.generated += round(done.tokens_per_forward * done.denoising_steps)
            text = done.text.strip()
            if reference is None and name == "exact":
                reference = text
            r.answers.append(text)
            r.n += 1
            r.right += text == reference.strip()
        if progress:
            progress(i + 1, len(items))
    return results


def table(results: dict[str, ModeResult], scored_against: str = "the reference answers") -> str:
    """A markdown table of the results, each mode's accuracy also as a share of exact mode's."""
    exact = results.get("exact")
    lines = [
        f"| mode | accuracy ({scored_against}) | of exact's | steps per block | tokens per forward | "
        "decoder GFLOP per token | vs exact | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        rel = f"{100 * r.accuracy / exact.accuracy:.1f}%" if exact and exact.accuracy else ""
        fewer = f"{exact.flops_per_token / r.flops_per_token:.2f}x fewer" if exact and r.flops_per_token else ""
        fewer = "" if r is exact else fewer
        lines.append(
            f"| {r.name} | {100 * r.accuracy:.1f}% ({r.right}/{r.n}) | {rel} | {r.steps_per_block:.2f} | "
            f"{r.tokens_per_forward:.2f} | {r.flops_per_token / 1e9:.4f} | {fewer} | {r.tokens_per_s:.1f} |"
        )
    return "\n".join(lines)
