"""An OpenAI-compatible HTTP server over the batched engine: `mlx_diffgemma serve`.

Built on FastAPI (Starlette's ASGI routing, request parsing and streaming responses) served by uvicorn: both are
the standard, well-kept Python stack for this (vLLM's and SGLang's OpenAI servers use them), and nothing of HTTP
is written by hand here.

One engine thread owns the model and a `batch.Batch`. Requests arrive on the event loop, are validated and
rendered there, and are queued for the engine, which admits them at the next block boundary (continuous batching),
runs one block for every row, and posts each row's committed block back to its request; a request whose client
went away is cancelled before its next block. Prompt heads (a system prompt, the earlier turns of a conversation)
are encoded once and shared through a `batch.PrefixCache`.

Endpoints: /v1/chat/completions, /v1/completions (streaming as server-sent events, a chunk per committed block,
or not), /v1/models, /health. The thought channel comes back apart as `reasoning_content`; Gemma 4 tool calls
(`<|tool_call>call:NAME{...}<tool_call|>`) as `tool_calls`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from fastapi import Request as HTTPRequest

from .batch import Batch, PrefixCache, Request
from .config import ConfigError, GenerationConfig
from .generate import Commit, PromptError, _opens_thought, _TextStream, settings

# ---- errors -------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error"}.get(
            self.status, "server_error" if self.status >= 500 else "rate_limit_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- Gemma 4 tool calls -------------------------------------------------------------------------------------------

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'


class _Args:
    """Gemma 4's argument syntax: {key:value,...} with bare keys, strings between <|"|> marks (or JSON quotes),
    numbers, true/false/null, [lists] and nested {objects}."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def value(self) -> Any:
        self.ws()
        s = self.s
        if s.startswith(QUOTE, self.i):
            end = s.index(QUOTE, self.i + len(QUOTE))
            out, self.i = s[self.i + len(QUOTE) : end], end + len(QUOTE)
            return out
        c = s[self.i]
        if c == "{":
            return self.obj()
        if c == "[":
            self.i += 1
            items = []
            self.ws()
            while s[self.i] != "]":
                items.append(self.value())
                self.ws()
                if s[self.i] == ",":
                    self.i += 1
                    self.ws()
            self.i += 1
            return items
        if c == '"':
            v, end = json.JSONDecoder().raw_decode(s, self.i)
            self.i = end
            return v
        j = self.i
        while j < len(s) and s[j] not in ",}]":
            j += 1
        word, self.i = s[self.i : j].strip(), j
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word]
        try:
            return json.loads(word)
        except ValueError:
            return word  # a bare word: keep it as text

    def obj(self) -> dict:
        s = self.s
        assert s[self.i] == "{"
        self.i += 1
        out = {}
        self.ws()
        while s[self.i] != "}":
            j = s.index(":", self.i)
            key = s[self.i : j].strip().replace(QUOTE, "").strip('"')
            self.i = j + 1
            out[key] = self.value()
            self.ws()
            if s[self.i] == ",":
                self.i += 1
                self.ws()
        self.i += 1
        return out


def parse_tool_call(body: str) -> dict:
    """`call:NAME{args}` -> an OpenAI tool call (arguments as a JSON string); ValueError when malformed."""
    body = body.strip()
    if not body.startswith("call:") or "{" not in body:
        raise ValueError(f"not a tool call: {body[:80]!r}")
    name, rest = body[5:].split("{", 1)
    try:
        args = _Args("{" + rest).obj()
    except (ValueError, IndexError, AssertionError) as e:
        raise ValueError(f"malformed arguments in tool call {name.strip()!r}") from e
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name.strip(), "arguments": json.dumps(args, ensure_ascii=False)},
    }


class AnswerStream:
    """Turns each committed block's answer text into what a client may see now: plain text (held back where it
    could be the start of a tool call or of a stop string) and finished tool calls. `stop` strings end the
    answer."""

    def __init__(self, tools: bool, stop: list[str]):
        self.tools, self.stop = tools, stop
        self.pending = ""  # text not yet released
        self.calls: list[dict] = []
        self.stopped = False

    def _hold(self, text: str) -> int:
        """How many characters at the end of `text` could start a marker or a stop string."""
        marks = self.stop + ([CALL_OPEN] if self.tools else [])
        n = 0
        for m in marks:
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    n = max(n, k)
                    break
        return n

    def add(self, text: str, final: bool) -> tuple[str, list[dict]]:
        if self.stopped:
            return "", []
        self.pending += text
        out, calls = [], []
        while True:
            cut = [(self.pending.find(s), s) for s in self.stop if s and s in self.pending]
            call_at = self.pending.find(CALL_OPEN) if self.tools else -1
            stop_at = min(cut)[0] if cut else -1
            if stop_at >= 0 and (call_at < 0 or stop_at < call_at):
                out.append(self.pending[:stop_at])
                self.pending, self.stopped = "", True
                return "".join(out), calls
            if call_at < 0:
                break
            out.append(self.pending[:call_at])
            end = self.pending.find(CALL_CLOSE, call_at)
            if end < 0:
                self.pending = self.pending[call_at:]
                if final:  # an unclosed call at the end: give it back as text
                    out.append(self.pending)
                    self.pending = ""
                return "".join(out), calls
            try:
                calls.append(parse_tool_call(self.pending[call_at + len(CALL_OPEN) : end]))
            except ValueError:
                out.append(self.pending[call_at : end + len(CALL_CLOSE)])  # not parseable: leave it as text
            self.pending = self.pending[end + len(CALL_CLOSE) :]
        keep = 0 if final else self._hold(self.pending)
        out.append(self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep :]
        self.calls += calls
        return "".join(out), calls


# ---- the engine thread ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One request inside the engine: what to generate and where its events go."""

    tag: str
    ids: list[int]
    g: GenerationConfig
    max_tokens: int
    seed: int
    head: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class Engine:
    """The model, a batch, and the thread that runs it: `submit` a job, read its queue (("commit", Commit) items,
    then ("done", None), or ("error", APIError)); `cancel` one whose client left."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prefix_entries: int = 16):
        # MLX binds an unevaluated array to the thread that made it: evaluate the weights (loaded lazily) and the
        # RoPE tables here, so that the engine thread finds nothing left to compute from this one
        mx.eval(model.parameters(), [layer.self_attn._freqs for layer in model.layers])
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.prefix = PrefixCache(entries=prefix_entries) if prefix_entries else None
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.cancels: queue.Queue[str] = queue.Queue()
        self.jobs: dict[str, Job] = {}
        self.cancelled: dict[str, None] = {}  # cancelled before the engine took them from the inbox
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="mlx-diffgemma-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(None)  # wake the thread
        self.thread.join(timeout=30)

    def queued(self) -> int:
        return self.inbox.qsize()

    def submit(self, job: Job) -> None:
        if self.inbox.qsize() >= self.max_queue:
            raise APIError(429, f"the server's queue is full ({self.max_queue} requests waiting); retry later")
        self.inbox.put(job)

    def cancel(self, tag: str) -> None:
        self.cancels.put(tag)

    def _post(self, job: Job, kind: str, item: Any) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, item))

    def _run(self) -> None:
        batch = Batch(self.model, self.prefix)
        while not self.stopping:
            try:
                waiting = [] if len(batch) else [self.inbox.get()]  # idle: sleep until a request comes
            except Exception:  # pragma: no cover - interpreter shutdown
                return
            while len(batch) + len(waiting) < self.max_batch:
                try:
                    waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            while not self.cancels.empty():
                tag = self.cancels.get_nowait()
                batch.cancel(tag)
                if self.jobs.pop(tag, None) is None:
                    self.cancelled[tag] = None
                    while len(self.cancelled) > 10_000:  # tags of jobs that had already ended
                        self.cancelled.pop(next(iter(self.cancelled)))
            for job in waiting:
                if job is None:
                    continue
                if job.tag in self.cancelled:  # its client left while it waited
                    del self.cancelled[job.tag]
                    continue
                try:
                    batch.add(Request(job.ids, job.g, job.max_tokens, mx.random.key(job.seed), job.tag, job.head))
                    self.jobs[job.tag] = job
                except (PromptError, ValueError) as e:
                    self._post(job, "error", APIError(400, str(e), code=_code(e)))
            if not len(batch):
                continue
            try:
                for tag, event in batch.run_block():
                    job = self.jobs.get(tag)
                    if job is None or not isinstance(event, Commit):
                        continue
                    self._post(job, "commit", event)
                    if event.finished:
                        self._post(job, "done", None)
                        self.jobs.pop(tag, None)
            except Exception as e:  # a failure in the model: every running request gets it, the server goes on
                message = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                for job in self.jobs.values():
                    self._post(job, "error", APIError(500, f"generation failed: {message}"))
                self.jobs.clear()
                batch = Batch(self.model, self.prefix)


def _code(e: Exception) -> str | None:
    return "context_length_exceeded" if "context" in str(e) or "memory" in str(e) else None


# ---- requests -----------------------------------------------------------------------------------------------------

# Our sampler's settings, as request fields (the OpenAI client passes them in `extra_body`).
KNOBS = {
    "steps": "max_denoising_steps",
    "entropy_bound": "entropy_bound",
    "t_min": "t_min",
    "t_max": "t_max",
    "stability": "stability_threshold",
    "confidence": "confidence_threshold",
    "sc_top_k": "sc_top_k",
    "mode": "mode",
    "freeze_after": "freeze_after",
    "freeze_confidence": "freeze_confidence",
    "refresh_every": "refresh_every",
    "accept": "accept",
    "accept_confidence": "accept_confidence",
    "eos_exit": "eos_exit",
    "refresh_frozen": "refresh_frozen",
    "trim_eos": "trim_eos",
    "first_window": "first_window",
}
EXTENSIONS = {"ignore_eos"}  # vLLM's: generate to max_tokens whatever the model says
# OpenAI fields this server accepts and has no use for (as OpenAI-compatible servers do); anything else unknown is
# refused, as OpenAI refuses it.
IGNORED = {
    "temperature", "top_p", "frequency_penalty", "presence_penalty", "logit_bias", "user", "top_logprobs",
    "parallel_tool_calls", "metadata", "store", "service_tier", "prediction", "modalities", "safety_identifier",
    "prompt_cache_key", "verbosity", "best_of", "suffix",
}  # fmt: skip
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "seed", "stop",
               "n", "tools", "tool_choice", "chat_template_kwargs", "reasoning_effort", "response_format", "logprobs",
               *KNOBS, *EXTENSIONS, *IGNORED}  # fmt: skip
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "stream", "stream_options", "seed", "stop", "n", "echo",
                     "logprobs", *KNOBS, *EXTENSIONS, *IGNORED}  # fmt: skip


@dataclass
class Limits:
    max_tokens: int = 4096  # per request
    max_body_bytes: int = 4 * 2**20
    max_queue: int = 64
    max_batch: int = 8


def _check(cond: bool, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
    if not cond:
        raise APIError(status, message, param, code)


def _int(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    _check(type(v) is int and v >= lo and (hi is None or v <= hi),
           f"{name} must be an integer from {lo}" + (f" to {hi}" if hi is not None else ""), name)  # fmt: skip
    return v


class Service:
    """The HTTP-independent part of the server: validate and render requests, run them on the engine, and shape
    the answers (whole or as chunks)."""

    def __init__(self, model, tokenizer, name: str, limits: Limits, prefix_entries: int = 16):
        self.model, self.tok, self.name, self.limits = model, tokenizer, name, limits
        self.engine = Engine(model, limits.max_batch, limits.max_queue, prefix_entries)
        self.created = int(time.time())

    # -- parsing --

    def _common(self, body: dict, fields: set[str]) -> dict:
        _check(isinstance(body, dict), "the request body must be a JSON object")
        unknown = sorted(set(body) - fields)
        _check(
            not unknown,
            f"Unrecognized request argument supplied: {', '.join(unknown)}",
            unknown[0] if unknown else None,
        )
        model = body.get("model")
        _check(model is None or model == self.name, f"The model `{model}` does not exist (this server has "
               f"`{self.name}`)", "model", 404, "model_not_found")  # fmt: skip
        _check(body.get("n") in (None, 1), "n must be 1 (one choice per request)", "n")
        _check(not body.get("logprobs"), "logprobs are not available from this server", "logprobs")
        _check(isinstance(body.get("stream", False), bool), "stream must be true or false", "stream")
        seed = _int(body, "seed", 0, 2**31 - 1)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        _check(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop),
               "stop must be a string or up to 4 non-empty strings", "stop")  # fmt: skip
        overrides = {}
        for field_, ours in KNOBS.items():
            if body.get(field_) is not None:
                overrides[ours] = body[field_]
        _check(isinstance(body.get("ignore_eos", False), bool), "ignore_eos must be true or false", "ignore_eos")
        if body.get("ignore_eos"):
            overrides["eos_token_id"] = []
        try:
            g = settings(self.model, names={v: k for k, v in KNOBS.items()}, **overrides)
        except (ConfigError, TypeError) as e:
            raise APIError(400, str(e)) from None
        max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
        max_tokens = max_tokens or min(g.max_new_tokens, self.limits.max_tokens)
        limit = self.limits.max_tokens
        _check(max_tokens <= limit, f"max_tokens is {max_tokens}; this server allows at most {limit}", "max_tokens")
        options = body.get("stream_options") or {}
        _check(isinstance(options, dict), "stream_options must be an object", "stream_options")
        return {
            "g": g,
            "max_tokens": max_tokens,
            "seed": seed if seed is not None else int(time.time_ns() % 2**31),
            "stop": stop,
            "stream": bool(body.get("stream")),
            "usage_chunk": bool(options.get("include_usage")),
        }

    def _messages(self, messages: Any) -> list[dict]:
        _check(isinstance(messages, list) and messages, "messages must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            _check(isinstance(m, dict) and m.get("role") in ("system", "developer", "user", "assistant", "tool"),
                   f"messages[{i}] needs a role: system, user, assistant or tool", "messages")  # fmt: skip
            content = m.get("content")
            if isinstance(content, list):  # content parts
                texts = []
                for part in content:
                    _check(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str),
                           f"messages[{i}]: only text content parts are supported", "messages")  # fmt: skip
                    texts.append(part["text"])
                content = "".join(texts)
            _check(content is None or isinstance(content, str), f"messages[{i}].content must be text", "messages")
            msg = {"role": "system" if m["role"] == "developer" else m["role"], "content": content or ""}
            if m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    fn = dict(c.get("function") or {})
                    if isinstance(fn.get("arguments"), str):
                        try:
                            fn["arguments"] = json.loads(fn["arguments"] or "{}")
                        except ValueError:
                            raise APIError(
                                400, f"messages[{i}]: tool call arguments are not JSON", "messages"
                            ) from None
                    calls.append({**c, "function": fn})
                msg["tool_calls"] = calls
            for k in ("name", "tool_call_id"):
                if k in m:
                    msg[k] = m[k]
            out.append(msg)
        return out

    def _render(self, messages: list[dict], tools, thinking: bool, generation_prompt: bool = True) -> list[int]:
        try:
            ids = self.tok.apply_chat_template(
                messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True,
                enable_thinking=thinking,
            )  # fmt: skip
        except Exception as e:  # a template that refuses these messages
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        return ids["input_ids"] if isinstance(ids, dict) else list(ids)

    def chat_request(self, body: dict) -> tuple[dict, list[int], int, bool]:
        """Parsed settings, prompt ids, shareable head length, and whether tool calls are parsed."""
        common = self._common(body, CHAT_FIELDS)
        messages = self._messages(body.get("messages"))
        tools = body.get("tools")
        _check(tools is None or (isinstance(tools, list) and all(
            isinstance(t, dict) and isinstance((t.get("function") or {}).get("name"), str) for t in tools)),
            "tools must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}", "tools")  # fmt: skip
        choice = body.get("tool_choice", "auto")
        _check(choice in ("auto", "none") or tools is None,
               "tool_choice must be \"auto\" or \"none\" (forcing a call is not supported)", "tool_choice")  # fmt: skip
        fmt = (body.get("response_format") or {}).get("type", "text")
        _check(fmt == "text", "response_format other than text is not supported", "response_format")
        kwargs = body.get("chat_template_kwargs") or {}
        _check(isinstance(kwargs, dict), "chat_template_kwargs must be an object", "chat_template_kwargs")
        effort = body.get("reasoning_effort")
        thinking = bool(kwargs.get("enable_thinking", effort not in (None, "none", "minimal")))
        ids = self._render(messages, tools, thinking)
        head = 0
        if len(messages) > 1:
            before = self._render(messages[:-1], tools, thinking, generation_prompt=False)
            head = len(before) if ids[: len(before)] == before else 0
        return common, ids, head, bool(tools) and choice != "none"

    def completion_request(self, body: dict) -> tuple[dict, list[list[int]]]:
        common = self._common(body, COMPLETION_FIELDS)
        _check(not body.get("echo"), "echo is not supported", "echo")
        p = body.get("prompt")
        if isinstance(p, str) or (isinstance(p, list) and p and all(type(t) is int for t in p)):
            p = [p]
        _check(isinstance(p, list) and p and all(
            (isinstance(x, str) and x) or (isinstance(x, list) and x and all(type(t) is int for t in x)) for x in p),
            "prompt must be a string, a list of strings, or token ids", "prompt")  # fmt: skip
        _check(len(p) <= self.limits.max_queue, f"at most {self.limits.max_queue} prompts per request", "prompt")
        return common, [self.tok.encode(x) if isinstance(x, str) else list(x) for x in p]

    def check_context(self, ids: list[int], max_tokens: int) -> None:
        C, limit = self.model.canvas_length, self.model.args.max_position_embeddings
        need = len(ids) + -(-max_tokens // C) * C
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested {need} tokens "
            f"({len(ids)} in the messages, {max_tokens} in the completion, in blocks of {C}). Please reduce the "
            "length of the messages or completion."
        )
        _check(need <= limit, message, "messages", code="context_length_exceeded")

    # -- running --

    def start(self, ids: list[int], common: dict, head: int = 0, seed_offset: int = 0) -> Job:
        self.check_context(ids, common["max_tokens"])
        job = Job(f"req-{uuid.uuid4().hex}", ids, common["g"], common["max_tokens"], common["seed"] + seed_offset,
                  head, asyncio.get_running_loop())  # fmt: skip
        self.engine.submit(job)
        return job


@dataclass
class Choice:
    """One choice being generated: its text streams, its answer filter and its counts."""

    index: int
    job: Job
    text: _TextStream
    answer: AnswerStream
    tokens: int = 0
    finish: str | None = None
    content: list[str] = field(default_factory=list)
    thought: list[str] = field(default_factory=list)

    def add(self, c: Commit) -> tuple[str, str, list[dict]]:
        """The new answer text, thought and tool calls of a committed block."""
        self.tokens += len(c.tokens) + (c.eos is not None)
        text, thought = self.text.add(c.tokens, final=c.finished)
        text, calls = self.answer.add(text, final=c.finished)
        if self.answer.stopped:
            self.finish = "stop"
        elif c.finished:
            self.finish = "tool_calls" if self.answer.calls else ("stop" if c.finish_reason == "eos" else "length")
        self.content.append(text)
        self.thought.append(thought)
        return text, thought, calls


# ---- HTTP -------------------------------------------------------------------------------------------------------


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(service: Service):
    """The FastAPI application over a `Service` (the engine starts with the app and stops with it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="mlx-diffgemma", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(APIError(400, "the request could not be parsed").body(), status_code=400)

    async def read_json(request: HTTPRequest) -> Any:
        size = request.headers.get("content-length")
        limit = service.limits.max_body_bytes
        if size is not None and size.isdigit() and int(size) > limit:
            raise APIError(413, f"the request body is {size} bytes; this server takes at most {limit}")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"the request body is {len(raw)} bytes; this server takes at most {limit}")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    @app.get("/health")
    async def health():
        e = service.engine
        out = {"status": "ok", "model": service.name, "queued": e.queued(), "running": len(e.jobs)}
        if e.prefix is not None:
            out["prefix_cache"] = {"entries": len(e.prefix.store), "hits": e.prefix.hits, "misses": e.prefix.misses}
        return out

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": service.name, "object": "model", "created": service.created, "owned_by": "mlx-diffgemma"}],
        }

    async def events_of(request: HTTPRequest, choice: Choice, done: set):
        """A choice's engine events; cancels the job when the client goes away or the answer hit a stop string."""
        while True:
            try:
                kind, item = await asyncio.wait_for(choice.job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    service.engine.cancel(choice.job.tag)
                    raise asyncio.CancelledError from None
                continue
            if kind == "error":
                raise item
            if kind == "done":
                done.add(choice.index)
                return
            yield item
            if choice.answer.stopped:  # a stop string ended the answer: the rest is not needed
                service.engine.cancel(choice.job.tag)
                done.add(choice.index)
                return

    def usage(choices: list[Choice]) -> dict:
        prompt = sum(len(c.job.ids) for c in choices)
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def run(request, choices: list[Choice], stream: bool, make_chunk, make_final, usage_chunk: bool):
        done: set[int] = set()
        if not stream:
            try:
                for c in choices:
                    async for commit in events_of(request, c, done):
                        c.add(commit)
            except asyncio.CancelledError:
                return JSONResponse({}, status_code=499)
            finally:
                for c in choices:
                    if c.index not in done:
                        service.engine.cancel(c.job.tag)
            return JSONResponse(make_final(choices, usage(choices)))

        async def chunks():
            try:
                yield _sse(make_chunk(choices[0], None, None, [], first=True))
                queue_: asyncio.Queue = asyncio.Queue()

                async def pump(c: Choice):
                    try:
                        async for commit in events_of(request, c, done):
                            await queue_.put((c, c.add(commit)))
                    except APIError as e:
                        await queue_.put((c, e))
                    await queue_.put((c, None))

                tasks = [asyncio.create_task(pump(c)) for c in choices]
                open_ = len(choices)
                while open_:
                    c, item = await queue_.get()
                    if isinstance(item, APIError):
                        yield _sse(item.body())
                        continue
                    if item is None:
                        open_ -= 1
                        yield _sse(make_chunk(c, None, None, [], finish=c.finish or "stop"))
                        continue
                    text, thought, calls = item
                    if text or thought or calls:
                        yield _sse(make_chunk(c, text, thought, calls))
                if usage_chunk:
                    yield _sse(make_chunk(None, None, None, [], usage=usage(choices)))
                yield _sse("[DONE]")
                for t in tasks:
                    await t
            finally:
                for c in choices:
                    if c.index not in done:
                        service.engine.cancel(c.job.tag)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_json(request)
        common, ids, head, tools = service.chat_request(body)
        job = service.start(ids, common, head)
        choice = Choice(
            0, job, _TextStream(service.tok, _opens_thought(service.tok, ids)), AnswerStream(tools, common["stop"])
        )
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(c, text, thought, calls, first=False, finish=None, usage=None):
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
                delta["content"] = ""
            if text:
                delta["content"] = text
            if thought:
                delta["reasoning_content"] = thought
            if calls:
                delta["tool_calls"] = [{"index": len(choice.answer.calls) - len(calls) + i, **call}
                                       for i, call in enumerate(calls)]  # fmt: skip
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": service.name}
            out["choices"] = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            if usage:
                out["usage"] = usage
            return out

        def final(choices, usage):
            c = choices[0]
            message: dict[str, Any] = {"role": "assistant", "content": "".join(c.content) or None}
            if "".join(c.thought):
                message["reasoning_content"] = "".join(c.thought)
            if c.answer.calls:
                message["tool_calls"] = c.answer.calls
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": service.name,
                "choices": [{"index": 0, "message": message, "finish_reason": c.finish, "logprobs": None}],
                "usage": usage,
            }

        return await run(request, [choice], common["stream"], chunk, final, common["usage_chunk"])

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_json(request)
        common, prompts = service.completion_request(body)
        choices = []
        for i, ids in enumerate(prompts):
            job = service.start(ids, common, seed_offset=i)
            choices.append(Choice(i, job, _TextStream(service.tok, False), AnswerStream(False, common["stop"])))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(c, text, thought, calls, first=False, finish=None, usage=None):
            out = {"id": cid, "object": "text_completion", "created": created, "model": service.name}
            if first:
                out["choices"] = [{"index": c.index, "text": "", "finish_reason": None, "logprobs": None}]
            elif usage:
                out["choices"], out["usage"] = [], usage
            else:
                out["choices"] = [{"index": c.index, "text": (thought or "") + (text or ""), "finish_reason": finish,
                                   "logprobs": None}]  # fmt: skip
            return out

        def final(choices, usage):
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": service.name,
                "choices": [
                    {
                        "index": c.index,
                        "text": "".join(c.thought) + "".join(c.content),
                        "finish_reason": c.finish,
                        "logprobs": None,
                    }
                    for c in choices
                ],  # fmt: skip
                "usage": usage,
            }

        return await run(request, choices, common["stream"], chunk, final, common["usage_chunk"])

    return app


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8080, name: str | None = None,
          limits: Limits | None = None, dtype: str | None = None, log_level: str = "warning",
          ready=None) -> None:  # fmt: skip
    """Load the model and serve it until interrupted; `ready()` is called once the model is loaded."""
    import uvicorn

    from .loading import LoadError, load

    model, tok = load(model_path, dtype=dtype)
    if tok is None:
        raise LoadError(f"{model_path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    from pathlib import Path

    service = Service(model, tok, name or Path(str(model_path).rstrip("/")).name, limits or Limits())
    if ready is not None:
        ready()
    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)
