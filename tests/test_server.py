"""The OpenAI-compatible server, driven by the official `openai` client against `mlx_diffgemma serve` started on a
free port: the demo model's answers through the API (whole and streamed), completions, batching of concurrent
requests, the shared prompt heads, errors in OpenAI's shape, a client that leaves mid-stream; and, with the demo
fine-tuned here on three examples, the thought channel as `reasoning_content` and Gemma 4 tool calls as
`tool_calls`."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mlx_diffgemma import generate, load
from mlx_diffgemma.demo import HELD_OUT_SEED, examples
from mlx_diffgemma.server import AnswerStream, parse_tool_call


def request(method: str, base: str, path: str, body: bytes | None = None, ctype: str = "application/json"):
    """(status, parsed JSON) of one plain HTTP request (the standard library's client)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers={"content-type": ctype} if body is not None else {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlx_diffgemma", "serve", "--model", str(model), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        for _ in range(300):
            try:
                if request("GET", self.base, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.close()
            raise RuntimeError(f"the server did not start: {self.proc.stderr.read()[-2000:]}")
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=120)

    def health(self) -> dict:
        return request("GET", self.base, "/health")[1]

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def demo_server():
    s = Server("demo", "--max-batch", "4", "--max-queue", "16", "--max-tokens-limit", "256", "--max-body-bytes",
               "20000")  # fmt: skip
    yield s
    s.close()


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def chat(s, content, **kw):
    """A chat completion of one user message, or of a demo example's chat messages."""
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    return s.client.chat.completions.create(model="demo", messages=messages, **kw)


def test_models_and_health(demo_server):
    assert [m.id for m in demo_server.client.models.list().data] == ["demo"]
    h = demo_server.health()
    assert h["status"] == "ok" and h["running"] == 0


def test_held_out_answers_through_the_api(demo_server, demo):
    """Eight held-out tasks sent together from four clients: each answer is what `generate` gives locally with
    the same seed, and the model's exact score holds."""
    model, tok = demo
    pairs = examples(8, HELD_OUT_SEED)

    def ask(i):
        r = chat(demo_server, pairs[i][0], seed=i)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(8)))
    right = 0
    for i, (text, finish, usage) in enumerate(answers):
        assert text == generate(model, tok, pairs[i][0], seed=i)
        assert finish == "stop" and usage.completion_tokens > 0 and usage.prompt_tokens > 0
        right += text.strip() == pairs[i][1]
    assert right >= 6


def test_a_speed_mode_per_request(demo_server, demo):
    """`mode` (and the knobs behind it) per request, beside exact requests: each answer is what `generate` gives
    locally in that mode (or with those knobs); a mode that does not exist, or a knob without the one it needs,
    is a 400 naming the field."""
    model, tok = demo
    pairs = examples(4, HELD_OUT_SEED + 3)
    modes = ["turbo", None, "fast", None]

    def ask(i):
        extra = {"mode": modes[i]} if modes[i] else {}
        return chat(demo_server, pairs[i][0], seed=i, extra_body=extra).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert answers == [generate(model, tok, pairs[i][0], seed=i, mode=modes[i]) for i in range(4)]
    with pytest.raises(openai.BadRequestError, match="mode must be one of"):
        chat(demo_server, "Sort: 2 1", extra_body={"mode": "warp"})
    with pytest.raises(openai.BadRequestError, match="first_window needs trim_eos"):
        chat(demo_server, "Sort: 2 1", extra_body={"first_window": 0.5})
    knobs = {"trim_eos": 0.9, "first_window": 0.25}
    answer = chat(demo_server, pairs[0][0], seed=0, extra_body=knobs).choices[0].message.content
    assert answer == generate(model, tok, pairs[0][0], seed=0, **knobs)


def test_streaming_sends_a_chunk_per_block(demo_server):
    prompt = max(examples(40, HELD_OUT_SEED), key=lambda pa: len(pa[1]))[0]  # an answer of several blocks
    whole = chat(demo_server, prompt, seed=3).choices[0].message.content
    chunks = list(chat(demo_server, prompt, seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 2  # more than one block
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_completions_whole_and_streamed(demo_server):
    c = demo_server.client.completions.create(model="demo", prompt=["Sort: 3 1 2", "Add: 4 + 5"], max_tokens=16, seed=1)
    assert [x.index for x in c.choices] == [0, 1] and all(x.finish_reason in ("stop", "length") for x in c.choices)
    streamed = {}
    for ch in demo_server.client.completions.create(
        model="demo", prompt=["Sort: 3 1 2", "Add: 4 + 5"], max_tokens=16, seed=1, stream=True
    ):
        for x in ch.choices:
            streamed[x.index] = streamed.get(x.index, "") + x.text
    assert [streamed[0], streamed[1]] == [x.text for x in c.choices]


def test_stop_strings_end_the_answer(demo_server):
    full = chat(demo_server, "Sort: 9 8 7 6 5 4 3 2 1", seed=0).choices[0].message.content
    assert " " in full
    r = chat(demo_server, "Sort: 9 8 7 6 5 4 3 2 1", seed=0, stop=[" "])
    assert r.choices[0].message.content == full.split(" ")[0] and r.choices[0].finish_reason == "stop"


def test_a_shared_system_prompt_is_encoded_once(demo_server):
    system = {"role": "system", "content": "Answer with the result only. " * 8}
    before = demo_server.health()["prefix_cache"]["hits"]
    for q in ("Sort: 4 2 3", "Sort: 7 5 6"):
        demo_server.client.chat.completions.create(
            model="demo", messages=[system, {"role": "user", "content": q}], seed=0
        )
    assert demo_server.health()["prefix_cache"]["hits"] >= before + 1


def test_errors_in_openai_shape(demo_server):
    s = demo_server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        s.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        chat(s, "hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        chat(s, "Sort: " + "1 " * 3000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        chat(s, "hi", extra_body={"nonsense": 1})
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        chat(s, "hi", n=2)
    with pytest.raises(openai.BadRequestError, match="--steps|steps"):
        chat(s, "hi", extra_body={"steps": 0})
    status, body = request("POST", s.base, "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert request("POST", s.base, "/v1/chat/completions", b"x" * 30_000)[0] == 413
    status, body = request(
        "POST", s.base, "/v1/chat/completions", json.dumps({"model": "demo", "messages": []}).encode()
    )
    assert status == 400 and body["error"]["param"] == "messages"
    assert chat(s, "Sort: 2 1", seed=0).choices[0].message.content  # still serving


def test_a_client_that_leaves_frees_its_slot(demo_server):
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Sort: 5 4 3 2 1"}],
        "stream": True,
        "max_tokens": 256,
        "ignore_eos": True,
        "steps": 16,
        "stability": 16,
    }  # fmt: skip  (4 blocks of 16 forwards each, never stable sooner: 48 forwards left after the first text)
    host, port = demo_server.base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    while True:  # the first chunk with text (not the opening one, whose content is ""), then hang up
        line = r.readline()
        assert line, "the stream ended before any text"
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break
    assert demo_server.health()["running"] == 1
    conn.sock.close()
    conn.close()
    for _ in range(100):
        if demo_server.health()["running"] == 0:
            break
        time.sleep(0.2)
    assert demo_server.health()["running"] == 0
    assert chat(demo_server, "Sort: 2 1", seed=0).choices[0].finish_reason == "stop"


# ---- the thought channel and tool calls ----------------------------------------------------------------------

TOOL_EXAMPLES = [
    ("Weather in Paris?", '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'),
    ("Think: 2 + 2", "<|channel>thought\nadd two and two<channel|>4"),
    ("Say hi", "hi there"),
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}}}}}  # fmt: skip


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory):
    """The demo model fine-tuned (here, 100 steps) to answer three prompts: one with a tool call, one thinking."""
    root = tmp_path_factory.mktemp("tools")
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in TOOL_EXAMPLES
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    train = [sys.executable, "-m", "mlx_diffgemma", "train", "--model", "demo", "--data", root / "data.jsonl",
             "--out", root / "model", "--steps", "100", "--batch-size", "6", "--lr", "4e-3", "--checkpoint-every",
             "100"]  # fmt: skip
    r = subprocess.run(list(map(str, train)), capture_output=True, text=True, timeout=900, env=os.environ)
    assert r.returncode == 0, r.stderr
    s = Server(root / "model", "--name", "demo")
    yield s
    s.close()


def test_thought_comes_back_as_reasoning_content(tools_server):
    m = chat(tools_server, "Think: 2 + 2", seed=0).choices[0].message
    assert m.content == "4" and m.model_extra["reasoning_content"] == "add two and two"
    chunks = list(chat(tools_server, "Think: 2 + 2", seed=0, stream=True))
    thought = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    assert thought == "add two and two" and "".join(c.choices[0].delta.content or "" for c in chunks) == "4"


def test_tool_calls_come_back_parsed(tools_server):
    r = chat(tools_server, "Weather in Paris?", seed=0, tools=[WEATHER])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and not c.message.content
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    chunks = list(chat(tools_server, "Weather in Paris?", seed=0, tools=[WEATHER], stream=True))
    calls = [t for ch in chunks for t in (ch.choices[0].delta.tool_calls or [])]
    assert [t.function.name for t in calls] == ["get_weather"]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = chat(tools_server, "Weather in Paris?", seed=0)  # no tools in the request: the text is left alone
    assert "<|tool_call>" in plain.choices[0].message.content


def test_the_answer_filter_on_split_markers():
    s = AnswerStream(tools=True, stop=["END"])
    pieces = ["Sure. <|tool", '_call>call:f{a:<|"|>x, y<|"|>,b:[1,2],c:{d:true}}<tool', "_call|> more E", "ND tail"]
    out = [s.add(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert "".join(t for t, _ in out) == "Sure.  more "
    (call,) = [c for _, cs in out for c in cs]
    assert json.loads(call["function"]["arguments"]) == {"a": "x, y", "b": [1, 2], "c": {"d": True}}
    assert s.stopped
    with pytest.raises(ValueError):
        parse_tool_call("call:f{a:")


def test_a_full_queue_is_refused_with_429(demo):
    from mlx_diffgemma.server import APIError, Engine, Job

    engine = Engine(demo[0], max_batch=1, max_queue=2)  # not started: nothing takes jobs off the queue
    job = Job("t", [2, 3], None, 16, 0, 0, None)
    engine.submit(job)
    engine.submit(job)
    with pytest.raises(APIError) as e:
        engine.submit(job)
    assert e.value.status == 429 and e.value.body()["error"]["type"] == "rate_limit_error"


def test_serve_refuses_a_busy_port_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "mlx_diffgemma", "serve", "--model", "demo", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().startswith("error: cannot listen") and "Traceback" not in r.stderr
