"""What one denoising step costs, component by component, from the config alone: floating-point operations (a
multiply-add counts 2) and the bytes of weights and activations that must move, for any DiffusionGemma (the real
26B-A4B included), and what a step's components take on this machine.

A step over a canvas of C positions with P positions in the cache: every layer runs attention (projections, then
scores and values over P + C keys; sliding layers see at most window - 1 cached ones), the dense MLP, the router and
the top-k experts; then the tied output head over the vocabulary, the sampler's pass over the (C, V) logits, and
self-conditioning for the next step (probabilities @ embedding matrix, then its MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

COMPONENTS = ("attention", "dense MLP", "experts", "router", "output head", "self-conditioning", "sampler")


@dataclass(frozen=True)
class Cost:
    flops: float
    weight_bytes: float  # weights read once per step
    activation_bytes: float  # activations written and read (an estimate: each tensor once in, once out)

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops,
            self.weight_bytes + other.weight_bytes,
            self.activation_bytes + other.activation_bytes,
        )


def step_costs(
    config: ModelConfig,
    prefix: int,
    weight_bits: float = 32,
    act_bytes: int = 4,
    queries: int | None = None,
    sc_top_k: int | None = None,
    attended: int | None = None,
) -> dict[str, Cost]:
    """Cost of one denoising step per component (batch 1). `weight_bits`: bits per weight as stored (32 for
    float32, 16 for bfloat16, about 4.5 for 4-bit affine with scales). `queries`: the canvas positions the step
    forwards (a speed mode's partial step; all C by default), each attending to the prefix and `attended` canvas
    positions (all C by default; fewer when a speed mode trims the canvas after its end). `sc_top_k`:
    self-conditioning from each position's k likeliest embedding rows instead of the whole table."""
    t = config.text_config
    V, H = t.vocab_size, t.hidden_size
    C = config.canvas_length if queries is None else queries  # the positions that run through the layers
    attended = config.canvas_length if attended is None else attended
    wb = weight_bits / 8
    heads = t.num_attention_heads
    costs = dict.fromkeys(COMPONENTS, Cost(0, 0, 0))

    def add(name: str, flops: float, weights: float, acts: float) -> None:
        costs[name] = costs[name] + Cost(flops, weights * wb, acts * act_bytes)

    for s in t.layers:
        d, kv = s.head_dim, s.num_key_value_heads
        proj = H * heads * d + H * kv * d * (2 if s.has_v_proj else 1) + heads * d * H  # q, k(, v), o
        keys = (min(prefix, t.sliding_window - 1) if s.is_sliding else prefix) + attended
        add("attention", 2 * C * proj + 4 * C * heads * d * keys, proj, C * (2 * H + 2 * heads * d) + heads * C * keys)
        dense = 3 * H * t.intermediate_size
        add("dense MLP", 2 * C * dense, dense, C * (2 * H + 3 * t.intermediate_size))
        add("router", 2 * C * H * t.num_experts, H * t.num_experts, C * t.num_experts)
        expert = 3 * H * t.moe_intermediate_size
        k = t.top_k_experts
        chosen = min(t.num_experts, C * k)  # at most every expert's weights are read once
        add("experts", 2 * C * k * expert, chosen * expert, C * k * (2 * H + 3 * t.moe_intermediate_size))
    add("output head", 2 * C * H * V, V * H, C * (H + V))
    sc_mlp = 3 * H * t.intermediate_size
    rows = V if sc_top_k is None else min(sc_top_k, V)
    table = V * H if sc_top_k is None else min(C * rows, V) * H  # the rows read
    add(
        "self-conditioning",
        2 * C * rows * H + 2 * C * sc_mlp,
        table + sc_mlp,
        C * (V + 3 * H + 3 * t.intermediate_size),
    )
    # softcap, temperature, max, exp, sum, entropy, argmax, cumulative sum, draw: about 12 operations per logit
    add("sampler", 12 * C * V, 0, 4 * C * V)
    return costs


def total(costs: dict[str, Cost]) -> Cost:
    out = Cost(0, 0, 0)
    for c in costs.values():
        out = out + c
    return out
