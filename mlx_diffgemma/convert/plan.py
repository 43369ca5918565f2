"""What a conversion writes, computed from shapes alone: every output tensor with its dtype, shape and bytes,
assigned to shards. The size report and the writer both read this plan, so the report equals what is written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .recipes import QSpec, Recipe, category
from .safetensors_io import CODES, Entry

SHARD_BYTES = 5 * 10**9


@dataclass
class Item:
    """One source tensor and what it becomes."""

    name: str  # the name written (ours for the text model, the checkpoint's for the vision tower)
    source: str  # the checkpoint's name
    shape: tuple[int, ...]
    spec: QSpec | None  # quantization, or None (cast to the output dtype)
    dtype: str  # output float dtype code
    vision: bool = False
    outputs: list[Entry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.outputs)


def outputs_for(name: str, shape: tuple[int, ...], spec: QSpec | None, dtype: str) -> list[Entry]:
    if spec is None:
        return [Entry(name, dtype, shape)]
    module = name.removesuffix(".weight")
    *lead, in_dims = shape
    groups = tuple(lead) + (in_dims // spec.group_size,)
    out = [Entry(f"{module}.weight", "U32", tuple(lead) + (in_dims * spec.bits // 32,))]
    if spec.mode == "affine":
        out += [Entry(f"{module}.scales", dtype, groups), Entry(f"{module}.biases", dtype, groups)]
    else:
        out += [Entry(f"{module}.scales", "U8", groups)]
    return out


@dataclass
class Plan:
    items: list[Item]
    recipe: Recipe
    quantization: dict[str, object] | None  # the config.json block, mlx-lm style
    shards: list[list[Item]]

    def payload(self, vision: bool | None = None) -> int:
        return sum(i.nbytes for i in self.items if vision is None or i.vision == vision)

    def parameters(self, vision: bool = False) -> int:
        return sum(math.prod(i.shape) for i in self.items if i.vision == vision)

    def description(self) -> str:
        """What the plan does, from the settings it chose for each kind of tensor: a width that the recipe's group
        size does not divide gets a smaller group, and the description says so (`-q` on a model 96 wide is group
        32, not 64): "affine 4-bit group 64: experts, attention, mlp; affine 8-bit group 64: embedding"."""
        if self.recipe.default is None:
            return self.recipe.description
        cats = ("experts", "attention", "mlp", "embedding")
        counts: dict[str, dict[str, int]] = {}  # setting -> {category: tensors}
        totals = dict.fromkeys(cats, 0)
        for item in self.items:
            cat = category(item.name)
            if item.vision or cat not in cats:
                continue
            s = item.spec
            setting = "unquantized" if s is None else f"{s.mode} {s.bits}-bit group {s.group_size}"
            counts.setdefault(setting, dict.fromkeys(cats, 0))[cat] += 1
            totals[cat] += 1
        return "; ".join(
            setting
            + ": "
            + ", ".join(c if n == totals[c] else f"{c} ({n} of {totals[c]})" for c, n in per_cat.items() if n)
            for setting, per_cat in counts.items()
        )

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def make_plan(
    text: dict[str, tuple[str, tuple[int, ...]]],
    vision: dict[str, tuple[int, ...]],
    recipe: Recipe,
    dtype,
    shard_bytes: int = SHARD_BYTES,
) -> Plan:
    """text: {our name: (checkpoint name, shape)}; vision: {checkpoint name: shape}; dtype: the MLX float dtype."""
    code = CODES[dtype]
    items, overrides = [], {}
    default = recipe.default
    for name in sorted(text, key=_natural):
        source, shape = text[name]
        wanted = recipe.spec_for(name) if len(shape) >= 2 else None
        spec = wanted.for_dims(shape[-1]) if wanted else None
        items.append(Item(name, source, shape, spec, code, outputs=outputs_for(name, shape, spec, code)))
        module = name.removesuffix(".weight")
        if spec is not None and spec != default:
            overrides[module] = spec.as_dict()
        elif spec is None and default is not None and category(name) != "other":
            overrides[module] = False  # a quantizable module left as it is (router, or no group size fits)
    for name in sorted(vision, key=_natural):
        items.append(
            Item(name, name, vision[name], None, code, vision=True, outputs=outputs_for(name, vision[name], None, code))
        )
    quantization = None if default is None else {**default.as_dict(), **overrides}
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return Plan(items, recipe, quantization, shards)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
