"""Consumers of the engine's events for the terminal: plain text, JSON lines, and the live canvas.

Nothing here knows how denoising works: it draws what `Step`, `Block` and `Done` carry.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from .generate import Block, Done, Step
from .memory import fmt


def render_plain(
    events: Iterable, out: TextIO = sys.stdout, err: TextIO = sys.stderr, verbose: bool = False
) -> Done | None:
    """Committed answer text only, block by block, flushed, ending with a newline; the thought channel goes to
    `err`."""
    done = None
    for e in events:
        if isinstance(e, Block):
            if e.thought:
                err.write(e.thought)
                err.flush()
            out.write(e.text)
            out.flush()
        elif isinstance(e, Done):
            done = e
    if done is not None and done.text and not done.text.endswith("\n"):
        out.write("\n")
        out.flush()
    if verbose and done is not None:
        err.write(stats_line(done) + "\n")
    return done


def render_json(events: Iterable, out: TextIO = sys.stdout) -> Done | None:
    """One JSON object per event. Blocks and steps count from 1, as the live view shows them."""
    done = None
    for e in events:
        if isinstance(e, Step):
            obj = {
                "event": "step",
                "block": e.block + 1,
                "step": e.step,
                "accepted": e.accepted,
                "draft": e.draft.tolist(),
                "settled": e.settled.tolist(),
            }
        elif isinstance(e, Block):
            fields = {k: v for k, v in dataclasses.asdict(e).items() if k != "index"}
            obj = {"event": "block", "block": e.index + 1, **fields}
        else:
            done = e
            obj = {"event": "done", **dataclasses.asdict(e)}
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()
    return done


def stats_line(d: Done) -> str:
    return (
        f"{d.finish_reason} · prompt {d.prompt_tokens} tokens, {d.prompt_tps:.1f} tok/s · generated "
        f"{d.generation_tokens} tokens, {d.generation_tps:.1f} tok/s · {d.denoising_steps} denoising steps, "
        f"{d.tokens_per_forward:.2f} tokens per forward · peak memory {fmt(d.peak_memory_gb * 1e9)}"
    )


class LiveView:
    """The block being denoised, redrawn each step (settled positions bright, renoised ones dimmed) under the
    committed text, with a status line; a committed block's text is printed for good above the live region."""

    def __init__(self, tokenizer, max_steps: int, canvas_length: int, console=None):
        self.tok, self.max_steps, self.C = tokenizer, max_steps, canvas_length
        self.console = console or Console(highlight=False)
        self.tail = Text()  # committed text after the last newline: shown in the live region until its line ends
        self.thinking = False  # whether the last committed text was thought
        self.tokens, self.start, self.live = 0, time.perf_counter(), None
        self.block, self.step_i, self.accepted = 0, 0, 0

    def run(self, events: Iterable, verbose: bool = False) -> Done | None:
        done = None
        self.live = Live(
            console=self.console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
            vertical_overflow="crop",
        )
        try:
            with self.live:
                try:
                    for e in events:
                        if isinstance(e, Step):
                            self._step(e)
                        elif isinstance(e, Block):
                            self._commit(e)
                        else:
                            done = e
                finally:
                    self.live.update("", refresh=True)
        finally:  # also on Ctrl-C: what was committed stays on screen
            if self.tail.plain:
                self.console.print(self.tail)
        if done is not None:
            self.console.print(self._status(final=done), style="cyan", markup=False)
            if verbose:
                self.console.print(stats_line(done), style="dim", markup=False)
        return done

    def _pieces(self, ids: list[int]) -> list[str]:
        return [p.replace("\u2581", " ").replace("\n", "\u21b5 ") for p in self.tok.convert_ids_to_tokens(ids)]

    def _status(self, final: Done | None = None) -> str:
        tps = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if final is not None:
            return (
                f"done ({final.finish_reason}) · {self.block} blocks · {final.denoising_steps} steps · "
                f"{final.generation_tps:.1f} tok/s"
            )
        return (
            f"block {self.block + 1} · step {self.step_i}/{self.max_steps} · {self.accepted}/{self.C} accepted · "
            f"{tps:.1f} tok/s"
        )

    def _step(self, e: Step) -> None:

        self.block, self.step_i = e.block, e.step
        settled = e.settled.tolist()
        self.accepted = sum(settled)
        canvas = Text()
        for piece, ok in zip(self._pieces(e.draft.tolist()), settled):
            canvas.append(piece, style="bold" if ok else "dim")
        # The live region never lets the terminal wrap: lines are wrapped here with a margin and cropped, so the
        # region's height is what rich believes it is even where a terminal measures some scripts differently
        # (otherwise redrawing could erase committed lines above it).
        width = max(self.console.width - 8, 20)
        lines = [self.tail.copy(), *canvas.wrap(self.console, width), Text(self._status(), style="cyan")]
        for line in lines:
            line.no_wrap, line.overflow = True, "crop"
            line.truncate(width, overflow="crop")
        self.live.update(Group(*lines), refresh=True)

    def _commit(self, e: Block) -> None:
        """Thought (dim italic) and answer text join the committed stream; its finished lines print for good."""
        if e.thought:
            self.tail.append(e.thought, style="dim italic")
            self.thinking = True
        if e.text:
            if self.thinking and not self.tail.plain.endswith("\n") and self.tail.plain:
                self.tail.append("\n")
            self.thinking = False
            self.tail.append(e.text)
        # Print for good every finished line, and every full-width row of the unfinished one; the last partial
        # row stays in the live region until more text joins it.
        *finished, last = self.tail.split("\n", allow_blank=True)
        rows = list(last.wrap(self.console, max(self.console.width - 8, 20))) or [Text()]
        for line in [*finished, *rows[:-1]]:
            self.console.print(line)
        self.tail = rows[-1]
        self.tokens += len(e.tokens)
        self.block = e.index + 1
