"""The `mlx_diffgemma` command line (Typer). Later subcommands (generate, chat, convert) consume the engine's
events; nothing here knows how denoising works."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__

app = typer.Typer(
    name="mlx_diffgemma",
    help="DiffusionGemma (block-diffusion Gemma 4 MoE) on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        import mlx.core as mx

        typer.echo(f"mlx_diffgemma {__version__} (mlx {mx.__version__})")
        raise typer.Exit()


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """DiffusionGemma (block-diffusion Gemma 4 MoE) on MLX."""


@app.command()
def parity(
    workdir: Annotated[
        Optional[Path], typer.Option(help="Keep the tiny checkpoints in this folder (default: a temporary one).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the checkpoints and inputs.")] = 0,
) -> None:
    """Build tiny random checkpoints with transformers and print MLX-vs-transformers logit parity tables."""
    try:
        from .parity import parity_report
    except ImportError as e:
        _fail(f"{e}")
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    typer.echo(parity_report(workdir, seed=seed))


@app.command()
def convert(
    hf_path: Annotated[str, typer.Option("--hf-path", help="Hugging Face folder or cached repo id.")],
    mlx_path: Annotated[Optional[Path], typer.Option("--mlx-path", help="Output folder.")] = None,
    quantize: Annotated[bool, typer.Option("-q", "--quantize", help="Quantize (default 4-bit affine).")] = False,
    q_bits: Annotated[Optional[int], typer.Option("--q-bits", help="Bits per weight (affine).")] = None,
    q_group_size: Annotated[Optional[int], typer.Option("--q-group-size", help="Group size: 32, 64 or 128.")] = None,
    q_mode: Annotated[Optional[str], typer.Option("--q-mode", help="affine, mxfp4 or mxfp8.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bfloat16, float16 or float32.")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="A named recipe (see --report).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    report: Annotated[
        bool, typer.Option("--report", help="Print the size of every recipe for this model and exit.")
    ] = False,
) -> None:
    """Convert Hugging Face DiffusionGemma weights to an MLX folder, optionally quantized."""
    from mlx_diffgemma.convert import RECIPES, ConvertError, RecipeError, resolve
    from mlx_diffgemma.convert import convert as run_convert

    try:
        chosen = resolve(recipe, quantize, q_bits, q_group_size, q_mode)
    except RecipeError as e:
        _fail(str(e), 2)
    try:
        if report:
            typer.echo(_size_report(hf_path, dtype, [chosen] if recipe or quantize else list(RECIPES.values())))
            return
        if mlx_path is None:
            _fail("--mlx-path is required", 2)
        out = run_convert(
            hf_path,
            mlx_path,
            chosen,
            dtype=dtype,
            force=force,
            progress=sys.stderr.isatty(),
            log=lambda s: typer.echo(s, err=True),
        )
    except ConvertError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename or ''}".strip(": "))
    typer.echo(f"wrote {out}")


def _size_report(hf_path: str, dtype: str | None, recipes) -> str:
    """From the checkpoint's headers when it has weights, else from its config alone."""
    from mlx_diffgemma.config import ModelConfig
    from mlx_diffgemma.convert import ConvertError, inspect_source, plan_for_config, size_report
    from mlx_diffgemma.convert.plan import make_plan
    from mlx_diffgemma.loading import DTYPES, resolve_path

    folder = resolve_path(hf_path)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if any(folder.glob("*.safetensors")):
        src = inspect_source(folder)
        target = DTYPES[dtype] if dtype else src.float_dtype()
        plans = [make_plan(src.text, src.vision, r, target) for r in recipes]
    else:
        config = ModelConfig.from_file(folder / "config.json")
        plans = [plan_for_config(config, r, DTYPES[dtype or "bfloat16"]) for r in recipes]
    return size_report(plans)


@app.command()
def info(path: Annotated[str, typer.Argument(help="Model folder or cached Hugging Face repo id.")]) -> None:
    """Architecture and generation defaults of a checkpoint."""
    from .config import ConfigError, GenerationConfig, ModelConfig
    from .loading import LoadError, resolve_path

    try:
        folder = resolve_path(path)
        cfg = ModelConfig.from_file(folder / "config.json")
        gen = GenerationConfig.from_file(folder / "generation_config.json", cfg.text_config)
    except (LoadError, ConfigError) as e:
        _fail(str(e))
    t = cfg.text_config
    full = [i for i, s in enumerate(t.layers) if not s.is_sliding]
    sliding = next((s for s in t.layers if s.is_sliding), None)
    rows = [
        ("folder", str(folder)),
        ("layers", f"{t.num_hidden_layers} ({len(full)} full: {full}; sliding window {t.sliding_window})"),
        ("hidden", f"{t.hidden_size}, vocab {t.vocab_size}, canvas {cfg.canvas_length}"),
    ]
    heads = t.num_attention_heads
    if sliding:
        rows.append(("sliding attn", f"{heads} q heads, {sliding.num_key_value_heads} kv heads x {sliding.head_dim}"))
    if full:
        f = t.layers[full[0]]
        rows.append(("full attn", f"{heads} q heads, {f.num_key_value_heads} kv heads x {f.head_dim} (K = V)"))
    rows += [
        (
            "feed-forward",
            f"dense {t.intermediate_size} + {t.num_experts} experts x {t.moe_intermediate_size}, top-{t.top_k_experts}",
        ),
        ("quantization", _quantization_summary(cfg.quantization)),
        ("weights", f"{sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 1e9:.2f} GB on disk"),
        (
            "generation",
            f"steps {gen.max_denoising_steps}, entropy bound {gen.entropy_bound}, t {gen.t_min}..{gen.t_max}, "
            f"stability {gen.stability_threshold}, confidence {gen.confidence_threshold}, "
            f"eos {gen.eos_token_id}",
        ),
    ]
    for key, value in rows:
        typer.echo(f"{key:<14}{value}")


def _quantization_summary(q: dict | None) -> str:
    if not q:
        return "none"
    per_module = [v for v in q.values() if isinstance(v, dict)]
    kept = sum(1 for v in q.values() if v is False)
    return (
        f"{q.get('mode', 'affine')} {q.get('bits')}-bit, group {q.get('group_size')}; "
        f"{len(per_module)} modules with their own settings, {kept} left unquantized"
    )


def run() -> None:
    """Console-script entry point: clean one-line errors, never a traceback."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()
