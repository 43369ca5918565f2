"""Quantization policy, in one place: which tensors a recipe quantizes and how.

Categories: experts (the MoE), attention (q/k/v/o), mlp (the dense MLP and the self-conditioning MLP), embedding
(the 262,144-row table, which is also the tied output head and what self-conditioning multiplies by). The
router, norms and scalars are never quantized; the vision tower is carried unquantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

MODES = {"affine": None, "mxfp4": (32, 4), "mxfp8": (32, 8)}  # mode -> fixed (group size, bits)
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


class RecipeError(ValueError):
    """Quantization settings that cannot be used, in one line."""


@dataclass(frozen=True)
class QSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_dict(self) -> dict[str, object]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def fits(self, in_dims: int) -> bool:
        return in_dims % self.group_size == 0 and (in_dims * self.bits) % 32 == 0

    def for_dims(self, in_dims: int) -> QSpec | None:
        """This spec, or the same bits with the largest smaller group size that divides in_dims (affine)."""
        if self.fits(in_dims):
            return self
        if self.mode == "affine":
            for g in sorted((g for g in GROUP_SIZES if g < self.group_size), reverse=True):
                if replace(self, group_size=g).fits(in_dims):
                    return replace(self, group_size=g)
        return None


def qspec(bits: int, group_size: int, mode: str) -> QSpec:
    """A validated spec (mxfp modes fix their own group size and bits)."""
    if mode not in MODES:
        raise RecipeError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if MODES[mode] is not None:
        g, b = MODES[mode]
        return QSpec(b, g, mode)
    if bits not in AFFINE_BITS:
        raise RecipeError(f"--q-bits must be one of {', '.join(map(str, AFFINE_BITS))} for affine, got {bits}")
    if group_size not in GROUP_SIZES:
        raise RecipeError(f"--q-group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    return QSpec(bits, group_size, mode)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    experts: QSpec | None = None
    attention: QSpec | None = None
    mlp: QSpec | None = None
    embedding: QSpec | None = None

    @property
    def default(self) -> QSpec | None:
        """The spec most weights get: written as the quantization block's defaults."""
        return self.experts or self.attention or self.mlp or self.embedding

    def spec_for(self, name: str) -> QSpec | None:
        """The spec for one of our tensor names (a module's `.weight`), None to leave it as it is."""
        cat = category(name)
        return getattr(self, cat) if cat in ("experts", "attention", "mlp", "embedding") else None


def category(name: str) -> str:
    if re.fullmatch(r"layers\.\d+\.experts\.(gate_up_proj|down_proj)\.weight", name):
        return "experts"
    if re.fullmatch(r"layers\.\d+\.self_attn\.[qkvo]_proj\.weight", name):
        return "attention"
    if re.fullmatch(r"(layers\.\d+\.mlp|self_conditioning)\.(gate|up|down)_proj\.weight", name):
        return "mlp"
    if name == "embed_tokens.weight":
        return "embedding"
    if re.fullmatch(r"layers\.\d+\.router\.proj\.weight", name):
        return "router"
    return "other"


def uniform(bits: int = 4, group_size: int = 64, mode: str = "affine") -> Recipe:
    """-q: experts, attention and MLPs at the given setting; the embedding at 8-bit (affine, group 64) unless the
    setting is already 8-bit, since it is also the output head."""
    main = qspec(bits, group_size, mode)
    emb = main if main.bits >= 8 else QSpec(8, 64, "affine")
    name = f"q{main.bits}" if mode == "affine" else mode
    return Recipe(
        name, f"{mode} {main.bits}-bit (group {main.group_size}), embedding {emb.bits}-bit", main, main, main, emb
    )


RECIPES: dict[str, Recipe] = {
    "q4": uniform(4, 64),
    "q8": uniform(8, 64),
    "mac16": Recipe(
        "mac16",
        "for 16 GB Macs: experts 3-bit (group 128, 64 where 128 does not divide), attention and MLPs 4-bit, "
        "embedding 4-bit",
        experts=QSpec(3, 128),
        attention=QSpec(4, 64),
        mlp=QSpec(4, 64),
        embedding=QSpec(4, 64),
    ),
    "mxfp4": uniform(4, 32, "mxfp4"),
    "bf16": Recipe("bf16", "no quantization"),
}


def resolve(recipe: str | None, quantize: bool, bits: int | None, group_size: int | None, mode: str | None) -> Recipe:
    """The recipe for convert's flags: --recipe NAME, or -q with --q-bits/--q-group-size/--q-mode, or none."""
    if recipe is not None:
        if quantize or bits is not None or group_size is not None or mode is not None:
            raise RecipeError("--recipe cannot be combined with -q/--q-bits/--q-group-size/--q-mode")
        if recipe not in RECIPES:
            raise RecipeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        return RECIPES[recipe]
    if not quantize:
        if bits is not None or group_size is not None or mode is not None:
            raise RecipeError("--q-bits/--q-group-size/--q-mode need -q")
        return RECIPES["bf16"]
    mode = mode or "affine"
    if mode not in MODES:
        raise RecipeError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    return uniform(bits or 4, group_size or (64 if mode == "affine" else 32), mode)
