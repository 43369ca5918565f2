"""The `mlx_diffgemma` command line (Typer). Later subcommands (generate, chat, convert) consume the engine's
events; nothing here knows how denoising works."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from . import __version__

app = typer.Typer(
    name="mlx_diffgemma",
    help="DiffusionGemma (block-diffusion Gemma 4 MoE) on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The sampler's settings as the command line names them (error messages use these names).
FLAGS = {
    "max_denoising_steps": "--steps",
    "entropy_bound": "--entropy-bound",
    "t_min": "--t-min",
    "t_max": "--t-max",
    "stability_threshold": "--stability",
    "confidence_threshold": "--confidence",
    "max_new_tokens": "--max-tokens",
    "sc_top_k": "--sc-top-k",
    "mode": "--mode",
    "freeze_after": "--freeze-after",
    "refresh_every": "--refresh-every",
    "freeze_confidence": "--freeze-confidence",
    "accept": "--accept",
    "accept_confidence": "--accept-confidence",
    "eos_exit": "--eos-exit",
    "refresh_frozen": "--refresh-frozen",
    "trim_eos": "--trim-eos",
    "first_window": "--first-window",
}
TRAIN_FLAGS = {
    "steps": "--steps",
    "batch_size": "--batch-size",
    "learning_rate": "--lr",
    "lora_rank": "--lora-rank",
    "encoder_weight": "--encoder-weight",
    "checkpoint_every": "--checkpoint-every",
    "seed": "--seed",
}
# What to use instead of the flags people bring from mlx-lm and other samplers.
HINTS = {
    "--temp": "this sampler anneals its temperature from --t-max (first step) to --t-min (last step); set those",
    "--top-p": "each step samples every position and keeps the lowest-entropy ones: --entropy-bound sets how many",
    "--top-k": "each step samples every position and keeps the lowest-entropy ones: --entropy-bound sets how many",
    "--min-p": "each step samples every position and keeps the lowest-entropy ones: --entropy-bound sets how many",
    "--repetition-penalty": "not used by the diffusion sampler",
    "--max-kv-size": "the KV cache keeps the whole context (sliding layers keep their window); see -m/--max-tokens",
    "--prompt-cache-file": "chat keeps its KV cache across turns; /save FILE and /load FILE store it",
    "--adapter-path": "train folds LoRA into the checkpoint it writes: pass that folder as --model",
    "--draft-model": "not used: a diffusion model drafts a whole block at once",
    "--hf-path": "use --model (a folder or a Hugging Face repo id)",
    "--upload-repo": "upload the converted folder with `hf upload REPO FOLDER`",
    "--dequantize": "convert from the original Hugging Face weights instead",
    "--chat-template-config": "--system sets the system prompt, --think the thought channel, --raw skips the template",
}
HINTS["--temperature"] = HINTS["--temp"]


def _version(value: bool) -> None:
    if value:
        import mlx.core as mx

        typer.echo(f"mlx_diffgemma {__version__} (mlx {mx.__version__})")
        raise typer.Exit()


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """DiffusionGemma (block-diffusion Gemma 4 MoE) on MLX."""


# ---- generate / chat -------------------------------------------------------------------------------------------

Steps = Annotated[Optional[int], typer.Option("--steps", help="Max denoising steps per block.")]
EntropyBound = Annotated[Optional[float], typer.Option("--entropy-bound", help="Acceptance entropy bound.")]
TMin = Annotated[Optional[float], typer.Option("--t-min", help="Temperature at the last step.")]
TMax = Annotated[Optional[float], typer.Option("--t-max", help="Temperature at the first step.")]
Stability = Annotated[Optional[int], typer.Option("--stability", help="Steps the argmax must hold to stop early.")]
Confidence = Annotated[Optional[float], typer.Option("--confidence", help="Mean entropy under which to stop.")]
Model_ = Annotated[str, typer.Option("--model", help="Model folder, Hugging Face repo id, or 'demo'.")]
MaxTokens = Annotated[Optional[int], typer.Option("-m", "--max-tokens", help="Most tokens to generate.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed (the same seed repeats a run).")]
System = Annotated[Optional[str], typer.Option("--system", "--system-prompt", help="System prompt.")]
Think = Annotated[bool, typer.Option("--think/--no-think", help="Let the model think first (thought channel).")]
Live = Annotated[Optional[bool], typer.Option("--live/--no-live", help="Live canvas (default: on a terminal).")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: stored).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected failure.")]
Mode = Annotated[
    Optional[str],
    typer.Option(
        "--mode",
        help="exact (default: the reference algorithm), fast or turbo: speed modes that trade accuracy for fewer "
        "FLOPs. On the demo model fast keeps 98.7% of exact's accuracy (3.03x fewer FLOPs), turbo 97.3% (3.34x "
        "fewer). README: Speed modes; `eval` measures them on your prompts.",
    ),
]
FreezeAfter = Annotated[
    Optional[int],
    typer.Option(
        "--freeze-after",
        help="Speed knob: freeze a position accepted with the same argmax N+1 steps. Alone at 0 it loses more than "
        "3 points on the demo model (4.4; fast and turbo add a confidence floor).",
    ),
]
FreezeConfidence = Annotated[
    Optional[float], typer.Option("--freeze-confidence", help="Speed knob: freeze only positions at least P sure.")
]
RefreshEvery = Annotated[
    Optional[int], typer.Option("--refresh-every", help="Speed knob: with freezing, a full forward every N steps.")
]
Accept = Annotated[
    Optional[str], typer.Option("--accept", help="Speed knob: acceptance by 'entropy' (exact) or 'confidence'.")
]
AcceptConfidence = Annotated[
    Optional[float], typer.Option("--accept-confidence", help="Speed knob: top probability to accept (confidence).")
]
RefreshFrozen = Annotated[
    Optional[bool],
    typer.Option(
        "--refresh-frozen/--no-refresh-frozen",
        help="Speed knob: forward a position once more when it froze on a token other than the one its K/V were "
        "computed from (default); --no-refresh-frozen reuses those stale K/V (Fast-dLLM's cache): with turbo it "
        "loses more than 3 points on the demo model (4.0), with fast 2.6.",
    ),
]
EosExit = Annotated[
    Optional[bool], typer.Option("--eos-exit/--no-eos-exit", help="Speed knob: end a block once it is all EOS.")
]
TrimEos = Annotated[
    Optional[float],
    typer.Option(
        "--trim-eos",
        help="Speed knob: once a block's first end-of-sequence token is P sure, forward and attend to the canvas "
        "only through it (the whole canvas again if it goes).",
    ),
]
FirstWindow = Annotated[
    Optional[float],
    typer.Option(
        "--first-window",
        help="Speed knob, with --trim-eos: a block's first step forwards only this share of the canvas (the rest "
        "joins when no end shows in it).",
    ),
]


def _settings(steps, entropy_bound, t_min, t_max, stability, confidence, sc_top_k=None, **knobs) -> dict:
    """The sampler flags given, by setting name (`knobs`: the speed mode and its finer knobs)."""
    return {
        k: v
        for k, v in dict(
            max_denoising_steps=steps,
            entropy_bound=entropy_bound,
            t_min=t_min,
            t_max=t_max,
            stability_threshold=stability,
            confidence_threshold=confidence,
            sc_top_k=sc_top_k,
            **knobs,
        ).items()
        if v is not None
    }


def _check_flags(overrides: dict, max_tokens: int | None, seed: int | None = None) -> None:
    """Flag values that are wrong whatever the checkpoint says: a usage error before loading anything."""
    import dataclasses

    from .config import MODES, ConfigError, GenerationConfig

    if seed is not None and seed < 0:
        _fail(f"--seed must be an integer >= 0, got {seed}", 2)
    g = GenerationConfig()
    overrides = dict(overrides)
    mode = overrides.pop("mode", None)
    if mode is not None and mode not in MODES:
        _fail(f"--mode must be one of {', '.join(MODES)}, got {mode!r}", 2)
    try:
        g = dataclasses.replace(g, **overrides)
        if "t_min" not in overrides or "t_max" not in overrides:  # the other one comes from the checkpoint
            g.t_min, g.t_max = (g.t_min, g.t_min + 1) if "t_min" in overrides else (0.0, g.t_max)
        if max_tokens is not None:
            g.max_new_tokens = max_tokens
        g.validate(FLAGS)
    except ConfigError as e:
        _fail(str(e), 2)


def _prompt_text(prompt: str) -> str:
    """The prompt as given, '-' read from stdin; a usage error when empty or not text."""
    try:
        text = sys.stdin.buffer.read().decode("utf-8") if prompt == "-" else prompt
        text.encode("utf-8")  # a command-line argument that was not UTF-8 holds surrogates
    except UnicodeError:
        _fail("the prompt is not UTF-8 text", 2)
    if not text.strip():
        _fail("the prompt is empty", 2)
    return text


def _load(model: str, dtype: str | None):
    from .loading import DTYPES, LoadError, load

    if dtype is not None and dtype not in DTYPES:
        _fail(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}", 2)
    try:
        m, tok = load(model, dtype=dtype)
    except LoadError as e:
        _fail(str(e))
    if tok is None:
        _fail(f"{model} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return m, tok


def _use_live(live: bool | None, as_json: bool) -> bool:
    return not as_json and (sys.stdout.isatty() if live is None else live)


def _render(events, tok, model, live: bool, as_json: bool, verbose: bool, steps: int):
    from .render import LiveView, render_json, render_plain

    if as_json:
        return render_json(events)
    if live:
        return LiveView(tok, steps, model.canvas_length).run(events, verbose=verbose)
    return render_plain(events, verbose=verbose)


def _checked_settings(m, overrides: dict):
    """The checkpoint's sampler settings with the flags' overrides, errors naming the flags."""
    from .config import ConfigError
    from .generate import settings

    try:
        return settings(m, names=FLAGS, **overrides)
    except ConfigError as e:
        _fail(str(e), 2)


@app.command()
def generate(
    model: Model_,
    prompt: Annotated[
        Optional[list[str]], typer.Option("-p", "--prompt", help="The prompt ('-' reads stdin); repeat for a batch.")
    ] = None,
    prompts_file: Annotated[
        Optional[Path],
        typer.Option("--prompts", help='A batch: JSON lines {"prompt": ...} or {"messages": [...]}; answers as JSONL.'),
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Prompts in flight at once (default: all).")
    ] = None,
    max_tokens: MaxTokens = None,
    steps: Steps = None,
    entropy_bound: EntropyBound = None,
    t_min: TMin = None,
    t_max: TMax = None,
    stability: Stability = None,
    confidence: Confidence = None,
    sc_top_k: Annotated[
        Optional[int],
        typer.Option("--sc-top-k", help="Approximate self-conditioning with the K likeliest tokens (off: exact)."),
    ] = None,
    mode: Mode = None,
    freeze_after: FreezeAfter = None,
    freeze_confidence: FreezeConfidence = None,
    refresh_every: RefreshEvery = None,
    accept: Accept = None,
    accept_confidence: AcceptConfidence = None,
    eos_exit: EosExit = None,
    refresh_frozen: RefreshFrozen = None,
    trim_eos: TrimEos = None,
    first_window: FirstWindow = None,
    seed: Seed = None,
    system: System = None,
    think: Think = False,
    raw: Annotated[
        bool, typer.Option("--raw", "--ignore-chat-template", help="No chat template: the prompt is the text as it is.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Print the run's statistics at the end.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per event, for pipelines.")] = False,
    live: Live = None,
    dtype: Dtype = None,
    debug: Debug = False,
) -> None:
    """Generate text by block diffusion; on a terminal, watch each block's canvas settle. Several -p, or --prompts
    FILE, generate a batch and print one JSON line per answer as it finishes."""
    from .generate import stream_generate

    overrides = _settings(
        steps, entropy_bound, t_min, t_max, stability, confidence, sc_top_k, mode=mode, freeze_after=freeze_after,
        freeze_confidence=freeze_confidence, refresh_every=refresh_every, accept=accept,
        accept_confidence=accept_confidence, eos_exit=eos_exit, refresh_frozen=refresh_frozen, trim_eos=trim_eos,
        first_window=first_window,
    )  # fmt: skip
    _check_flags(overrides, max_tokens, seed)
    if batch_size is not None and batch_size < 1:
        _fail("--batch-size must be at least 1", 2)
    if not prompt and prompts_file is None:
        _fail("give a prompt: -p TEXT (or -p - to read stdin), or --prompts FILE", 2)
    if prompts_file is not None or len(prompt) > 1:
        items = [_prompt_text(p) for p in prompt or []]
        if prompts_file is not None:
            items += _batch_prompts(prompts_file)
        m, tok = _load(model, dtype)
        _checked_settings(m, overrides)
        try:
            _run_batch(m, tok, items, max_tokens, system, think, raw, seed, batch_size, overrides)
        except ValueError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            sys.stdout.flush()
            raise typer.Exit(130) from None
        return
    text = _prompt_text(prompt[0])
    m, tok = _load(model, dtype)
    g = _checked_settings(m, overrides)
    try:
        events = stream_generate(
            m, tok, text, max_tokens=max_tokens, system=system, enable_thinking=think, raw=raw, seed=seed, **overrides
        )
        _render(events, tok, m, _use_live(live, as_json), as_json, verbose, g.max_denoising_steps)
    except ValueError as e:  # PromptError (ids, context, memory), a tokenizer without a chat template, ...
        _fail(str(e))
    except KeyboardInterrupt:
        sys.stdout.flush()
        raise typer.Exit(130) from None


def _batch_prompts(path: Path) -> list:
    """--prompts: the JSON lines `eval` reads (each {"prompt": TEXT} or {"messages": [...]}), their prompts."""
    from .evaluate import read_items

    try:
        return [item.prompt for item in read_items(path)]
    except ValueError as e:
        _fail(str(e))


def _run_batch(m, tok, items, max_tokens, system, think, raw, seed, batch_size, overrides) -> None:
    import json

    from .generate import Done, stream_generate

    events = stream_generate(
        m, tok, items, max_tokens=max_tokens, system=system, enable_thinking=think, raw=raw, seed=seed,
        batch_size=batch_size, **overrides,
    )  # fmt: skip
    for e in events:
        if isinstance(e, Done):
            out = {"index": e.row, "text": e.text, "finish_reason": e.finish_reason}
            if e.thought:
                out["thought"] = e.thought
            out.update(tokens=e.generation_tokens, steps=e.denoising_steps)
            typer.echo(json.dumps(out, ensure_ascii=False))


@app.command()
def chat(
    model: Model_,
    max_tokens: MaxTokens = None,
    steps: Steps = None,
    entropy_bound: EntropyBound = None,
    t_min: TMin = None,
    t_max: TMax = None,
    stability: Stability = None,
    confidence: Confidence = None,
    mode: Mode = None,
    seed: Seed = None,
    system: System = None,
    think: Think = False,
    live: Live = None,
    dtype: Dtype = None,
    debug: Debug = False,
) -> None:
    """Multi-turn chat that keeps the KV cache across turns. Commands: /help, /reset, /system TEXT, /save FILE,
    /load FILE, /quit."""
    from . import chat as chatting

    overrides = _settings(steps, entropy_bound, t_min, t_max, stability, confidence, mode=mode)
    _check_flags(overrides, max_tokens, seed)
    m, tok = _load(model, dtype)
    _checked_settings(m, overrides)
    session = chatting.ChatSession(m, tok, system=system, enable_thinking=think, **overrides)
    tty = sys.stdin.isatty()
    use_live = _use_live(live, False)
    turn = 0
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is reported and skipped, the session goes on
        sys.stdin.reconfigure(errors="surrogateescape")

    def say(msg: str) -> None:
        typer.echo(msg, err=True)

    if tty:
        say(f"chatting with {model} · /help lists the commands · Ctrl-D or /quit leaves")
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            return
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        line = line.strip()
        if not line:
            continue
        try:
            line.encode("utf-8")
        except UnicodeError:
            say("error: that line is not UTF-8 text; it was skipped")
            continue
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/"):
            session, message = chatting.command(session, line, **overrides)
            say(message)
            continue
        events = session.send(line, max_tokens=max_tokens, seed=None if seed is None else seed + turn)
        turn += 1
        try:
            done = _render(events, tok, m, use_live, False, False, session.settings.max_denoising_steps)
            if done is not None and not done.text and not use_live:
                typer.echo("")  # one line per turn, even an empty answer
        except ValueError as e:  # PromptError and the like: this turn is dropped, the conversation goes on
            say(f"error: {e}")
        except KeyboardInterrupt:
            events.close()
            say("\n(interrupted; this turn was dropped)")


@app.command("train")
def train_cmd(
    model: Model_,
    data: Annotated[Path, typer.Option("--data", help='Chat-formatted JSONL: {"messages": [...]} per line.')],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint folder (resumed from when it holds one).")],
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warm-up, then cosine).")] = 1e-4,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (default: full).")] = None,
    train_router: Annotated[bool, typer.Option("--train-router", help="Also train the router.")] = False,
    encoder_weight: Annotated[float, typer.Option("--encoder-weight", help="Encoder next-token loss weight.")] = 1.0,
    reweight: Annotated[bool, typer.Option("--reweight", help="Weight the canvas loss by 1/t.")] = False,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed for batches and noise.")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace what --out holds (even a checkpoint: start over).")
    ] = False,
    dtype: Dtype = None,
    debug: Debug = False,
) -> None:
    """Fine-tune with the block-diffusion objective (full or LoRA); checkpoints load like any model folder."""
    from . import train as training
    from .files import OutputError, recover
    from .loading import LoadError, resolve_path

    cfg = training.TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        lora_rank=lora_rank,
        train_router=train_router,
        encoder_weight=encoder_weight,
        reweight=reweight,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    try:
        cfg.validate(TRAIN_FLAGS)
    except ValueError as e:
        _fail(str(e), 2)
    try:  # before loading anything: an --out that must not be written, or a checkpoint this run cannot resume
        folder = resolve_path(model)
        recover(out.expanduser().parent)
        training.check_out(out, [folder, data], force)
        if not force:
            training.resume_state(out.expanduser(), cfg)
    except (LoadError, OutputError, ValueError) as e:
        _fail(str(e))
    m, tok = _load(model, dtype)
    eos = (m.generation_config.eos_token_id or [1])[0]
    try:
        examples = training.load_jsonl(data, tok, eos)
        training.check_examples(examples, m.args.vocab_size)
    except OSError as e:
        _fail(f"cannot read {data}: {e.strerror}")
    except ValueError as e:
        _fail(str(e))
    n = len(examples)
    what = f"LoRA rank {lora_rank}" if lora_rank else "all weights"
    typer.echo(f"{n} example{'s' if n != 1 else ''}; training {what}", err=True)
    try:
        training.train(
            m,
            examples,
            out,
            folder,
            cfg,
            eos_id=eos,
            pad_id=m.generation_config.pad_token_id or 0,
            progress=sys.stderr.isatty(),
            log=lambda s: typer.echo(s, err=True),
            force=force,
        )
    except (ValueError, OSError) as e:  # a checkpoint that cannot be resumed, a loss gone NaN, a disk full
        _fail(str(e) if isinstance(e, ValueError) else f"cannot write {out}: {e.strerror or e}")
    except KeyboardInterrupt:
        typer.echo(f"interrupted; the last checkpoint in {out} resumes the run", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"wrote {out}")


@app.command()
def parity(
    fixtures: Annotated[
        bool, typer.Option("--fixtures", help="Build tiny random checkpoints here and compare with transformers.")
    ] = False,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Our model (MLX folder, any conversion, or HF folder).")
    ] = None,
    against: Annotated[
        Optional[Path], typer.Option("--against", help="A reference file from `mlx_diffgemma reference`.")
    ] = None,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    workdir: Annotated[
        Optional[Path], typer.Option(help="--fixtures: keep the tiny checkpoints here (default: a temporary folder).")
    ] = None,
    seed: Annotated[int, typer.Option(help="--fixtures: seed for the checkpoints and inputs.")] = 0,
    debug: Debug = False,
) -> None:
    """Compare our model with transformers: against a reference file recorded anywhere (--model M --against F:
    per-stage logit differences, top-1, KL, and a replayed generation), or on tiny checkpoints built here
    (--fixtures)."""
    if fixtures == (against is not None):
        _fail("give --model M --against REF_FILE, or --fixtures", 2)
    if fixtures:
        try:
            from .parity import parity_report
        except ImportError as e:
            _fail(f"{e}")
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        typer.echo(parity_report(workdir, seed=seed))
        return
    if model is None:
        _fail("--against needs --model: the model to compare with the reference file", 2)
    import json

    from .config import ConfigError
    from .loading import LoadError
    from .parity import ReferenceFileError, compare, format_comparison

    try:
        report = compare(model, against, dtype=dtype, log=lambda s: typer.echo(s, err=True))
    except (ReferenceFileError, LoadError, ConfigError) as e:
        _fail(str(e))
    typer.echo(json.dumps(report, indent=2) if as_json else format_comparison(report))


@app.command()
def reference(
    model: Annotated[str, typer.Option("--model", help="The original checkpoint: a Hugging Face folder or repo id.")],
    out: Annotated[Path, typer.Option("--out", help="The reference file to write (safetensors).")],
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16, float16 or float32.")] = "bfloat16",
    prompts: Annotated[
        Optional[Path],
        typer.Option("--prompts", help='Prompts, one per line: text, or JSON {"prompt"|"messages"|"ids": ...}.'),
    ] = None,
    max_tokens: MaxTokens = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shared noise.")] = 0,
    top_k: Annotated[int, typer.Option("--top-k", help="Logits kept per position when not stored whole.")] = 64,
    full_logits: Annotated[
        Optional[bool],
        typer.Option("--full-logits/--top-k-logits", help="Store logits whole (default: when under 64 MB a stage)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file that is not a reference.")] = False,
    debug: Debug = False,
) -> None:
    """Run the original model with transformers (CPU or CUDA) and record what a Mac needs to check a conversion
    against it: logits along a fixed trajectory, and generations with shared noise (`parity --against`)."""
    if max_tokens is not None and max_tokens < 1:
        _fail("--max-tokens must be at least 1", 2)
    if top_k < 1:
        _fail("--top-k must be at least 1", 2)
    try:
        from . import reference as ref
    except ImportError as e:
        _fail(f"{e}")
    from .config import ConfigError
    from .files import OutputError
    from .loading import LoadError

    try:
        items = _read_prompts(prompts) if prompts is not None else None
        ref.quiet()
        header = ref.record(
            model,
            out,
            device=device,
            dtype=dtype,
            prompts=items,
            max_tokens=max_tokens,
            seed=seed,
            top_k=top_k,
            full_logits=full_logits,
            force=force,
            log=lambda s: typer.echo(s, err=True),
        )
    except (ref.ReferenceRunError, OutputError, LoadError, ConfigError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename or ''}".strip(": "))
    n = len(header["prompts"])
    typer.echo(f"wrote {out} ({n} prompt{'s' * (n != 1)}, {header['dtype']} on {header['device']})")


def _read_prompts(path: Path) -> list[dict]:
    """--prompts: one prompt per line, plain text or a JSON object with "prompt", "messages" or "ids"."""
    import json

    from .reference import ReferenceRunError

    try:
        lines = path.expanduser().read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ReferenceRunError(f"{path} is not UTF-8 text") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ReferenceRunError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(item, dict) or not ({"prompt", "messages", "ids"} & set(item)):
                raise ReferenceRunError(f'{path}:{n}: a JSON line needs "prompt", "messages" or "ids"')
            if "ids" in item and not (
                isinstance(item["ids"], list) and all(type(t) is int for t in item["ids"]) and item["ids"]
            ):
                raise ReferenceRunError(f'{path}:{n}: "ids" must be a non-empty list of integers')
            items.append(item)
        else:
            items.append({"prompt": line})
    if not items:
        raise ReferenceRunError(f"{path} holds no prompts")
    return items


@app.command()
def export(
    model: Model_,
    hf_path: Annotated[Path, typer.Option("--hf-path", help="Output folder (Hugging Face layout).")],
    dtype: Annotated[
        Optional[str], typer.Option("--dtype", help="bfloat16, float16 or float32 (default: the model's).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing folder export did not write.")] = False,
    debug: Debug = False,
) -> None:
    """Write a model (an MLX conversion, a fine-tune, or the demo) as a Hugging Face folder that transformers and
    vLLM load; quantized weights are dequantized."""
    from .config import ConfigError
    from .convert.export import ExportError
    from .convert.export import export as run_export
    from .loading import LoadError

    try:
        out = run_export(model, hf_path, dtype=dtype, force=force, log=lambda s: typer.echo(s, err=True))
    except (ExportError, LoadError, ConfigError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename or ''}".strip(": "))
    typer.echo(f"wrote {out}")


@app.command()
def serve(
    model: Model_,
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0 exposes it to the network).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="Port.")] = 8080,
    name: Annotated[
        Optional[str], typer.Option("--name", help="The model's name in the API (default: the folder's).")
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests generated together.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting before 429.")] = 64,
    max_tokens_limit: Annotated[
        int, typer.Option("--max-tokens-limit", help="Most tokens one request may ask for.")
    ] = 4096,
    max_body: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body.")] = 4 * 2**20,
    dtype: Dtype = None,
    debug: Debug = False,
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), with
    requests batched together."""
    from .loading import LoadError
    from .server import Limits
    from .server import serve as run_server

    for flag, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--max-tokens-limit",
                        max_tokens_limit), ("--max-body-bytes", max_body), ("--port", port)):  # fmt: skip
        if value < 1:
            _fail(f"{flag} must be at least 1", 2)
    limits = Limits(max_tokens=max_tokens_limit, max_body_bytes=max_body, max_queue=max_queue, max_batch=max_batch)
    import socket

    try:  # say so now rather than after loading the model
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    try:
        run_server(
            model, host=host, port=port, name=name, limits=limits, dtype=dtype,
            ready=lambda: typer.echo(f"serving {model} at http://{host}:{port}/v1 (Ctrl-C stops)", err=True),
        )  # fmt: skip
    except LoadError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}")


@app.command()
def selfcheck(debug: Debug = False) -> None:
    """Check each custom kernel against its pure-MLX reference on this machine's GPU (Metal on a Mac, MLX's CUDA
    build on NVIDIA): pass or fail and speed-up per shape. The verdict is remembered; kernels run only where it
    passed."""
    from . import kernels

    try:
        verdict = kernels.selfcheck(log=typer.echo)
    except RuntimeError as e:
        _fail(str(e))
    failed = [k for k, r in verdict.items() if not r["passed"]]
    typer.echo(f"verdict saved to {kernels._verdict_file()}: " + (f"FAILED {', '.join(failed)} (the reference "
               "is used for those)" if failed else "every kernel passed and will be used"))  # fmt: skip
    if failed:
        raise typer.Exit(1)


@app.command()
def convert(
    hf_path: Annotated[str, typer.Option("--hf-path", help="Hugging Face folder or repo id (downloaded if needed).")],
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
    debug: Debug = False,
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


BENCH_PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


@app.command("eval")
def eval_cmd(
    model: Model_,
    data: Annotated[
        Path,
        typer.Option(
            "--data", help='JSON lines: {"prompt": TEXT} or {"messages": [...]}, each with an optional "answer".'
        ),
    ],
    mode: Annotated[
        Optional[list[str]],
        typer.Option("--mode", help="A mode to measure: exact, fast, turbo (repeat or comma-separate; default all)."),
    ] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts.")] = None,
    max_tokens: MaxTokens = None,
    seed: Annotated[int, typer.Option("--seed", help="Prompt i is generated with seed + i.")] = 0,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="The results as one JSON object.")] = False,
    debug: Debug = False,
) -> None:
    """What each speed mode costs on your own model and prompts: exact-match accuracy against the answers given
    (or agreement with exact mode's answer where a prompt has none), steps per block, tokens per forward, decoder
    FLOPs per generated token and tokens/s, the modes run side by side prompt by prompt."""
    import json

    from .config import MODES
    from .evaluate import evaluate, read_items, table

    names = [m.strip() for given in mode or list(MODES) for m in given.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        _fail(f"--mode must be among {', '.join(MODES)}, got {', '.join(unknown) or 'nothing'}", 2)
    if limit is not None and limit < 1:
        _fail("--limit must be at least 1", 2)
    if seed < 0:
        _fail(f"--seed must be an integer >= 0, got {seed}", 2)
    _check_flags({}, max_tokens)
    try:
        items = read_items(data)[:limit]
    except ValueError as e:
        _fail(str(e))
    modes = {name: {"mode": name} for name in dict.fromkeys(names)}
    if any(it.answer is None for it in items):
        modes = {"exact": {"mode": "exact"}, **modes}
    m, tok = _load(model, dtype)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty or done == total or done % 10 == 0:
            typer.echo(f"{done}/{total} prompts", err=True, nl=not tty or done == total)
            if tty and done < total:
                typer.echo("\r", err=True, nl=False)

    try:
        results = evaluate(m, tok, items, modes, seed=seed, max_tokens=max_tokens, progress=progress)
    except ValueError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    against = "the answers given" if all(it.answer is not None for it in items) else "the answers, else exact mode"
    if as_json:
        typer.echo(json.dumps({"scored_against": against, "results": [r.row() for r in results.values()]}))
        return
    typer.echo(table(results, against))


@app.command()
def bench(
    model: Model_,
    prefix: Annotated[int, typer.Option("--prefix", help="Cached positions before the canvas.")] = 256,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps to time.")] = 3,
    prompt: Annotated[str, typer.Option("-p", "--prompt", help="Prompt of the end-to-end run.")] = BENCH_PROMPT,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object.")] = False,
    debug: Debug = False,
) -> None:
    """A denoising step on this machine, taken apart: FLOPs and bytes per component, the time of each, the rate
    achieved against this machine's own matmul rate, and end-to-end tokens/s. A folder holding only a
    config.json (the real model's, say) gets the accounting alone."""
    import json

    from . import bench as benchmark
    from .config import ConfigError, ModelConfig
    from .loading import LoadError, resolve_path

    if prefix < 1 or steps < 1:
        _fail("--prefix and --steps must be at least 1", 2)
    try:
        folder = resolve_path(model, weights=True)
        config = ModelConfig.from_file(folder / "config.json")
    except (LoadError, ConfigError) as e:
        _fail(str(e))
    if prefix + config.canvas_length > config.text_config.max_position_embeddings:
        _fail(f"--prefix {prefix} with a canvas of {config.canvas_length} is past the context of the model", 2)
    m = tok = None
    if any(f.is_file() for f in folder.glob("*.safetensors")):
        m, tok = (
            _load(str(folder), dtype) if (folder / "tokenizer.json").exists() else (_load_model(folder, dtype), None)
        )
    report = benchmark.run(m, config, prefix, steps, tok, prompt, log=lambda s: typer.echo(s, err=True))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "prefix": report.prefix,
                    "costs": {k: vars(v) for k, v in report.costs.items()},
                    "matmul_flops": report.matmul_flops,
                    "matmul_range": report.matmul_range,
                    "times": report.times,
                    "steps_per_s": report.steps_per_s,
                    "end_to_end": report.end_to_end,
                }
            )
        )
        return
    for line in report.summary():
        typer.echo(line)
    typer.echo("")
    typer.echo(report.table())


def _load_model(folder, dtype):
    from .loading import LoadError, load_model

    try:
        return load_model(folder, dtype=dtype)
    except LoadError as e:
        _fail(str(e))


@app.command()
def info(
    path: Annotated[
        Optional[str], typer.Argument(help="Model folder or repo id (or use --model).", show_default=False)
    ] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model folder, repo id, or 'demo'.")] = None,
    debug: Debug = False,
) -> None:
    """Architecture and generation defaults of a checkpoint."""
    from .config import ConfigError, GenerationConfig, ModelConfig
    from .loading import LoadError, resolve_path
    from .memory import fmt

    if (path is None) == (model is None):
        _fail("give the model as --model PATH (or as the one argument)", 2)
    try:
        folder = resolve_path(model or path, weights=False)
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
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors") if f.is_file())
    rows += [
        (
            "feed-forward",
            f"dense {t.intermediate_size} + {t.num_experts} experts x {t.moe_intermediate_size}, top-{t.top_k_experts}",
        ),
        ("quantization", _quantization_summary(cfg.quantization)),
        ("weights", f"{fmt(on_disk)} on disk" if on_disk else "none on disk (config only)"),
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


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors (exit 2 for usage, 1 for the rest), never a traceback unless
    --debug is given. `argv` defaults to the command line."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = app(args=args, prog_name="mlx_diffgemma", standalone_mode=False)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        if type(e).__name__ == "Abort":  # Typer's click raises its own Abort on Ctrl-C at a prompt
            code = 130
        elif hasattr(e, "format_message") and getattr(e, "exit_code", None) == 2:  # a usage error (bad flag)
            name = getattr(e, "option_name", None) or ""
            message = f"no such option {name}: {HINTS[name]}" if name in HINTS else e.format_message()
            typer.echo(f"error: {message}", err=True)
            code = 2
        elif debug:
            raise
        else:  # a bug or an unforeseen failure: say what it was in one line
            what = " ".join(str(e).split())[:300]
            typer.echo(f"error: {type(e).__name__}: {what} (run with --debug for the traceback)", err=True)
            code = 1
    sys.exit(code or 0)


if __name__ == "__main__":
    run()
