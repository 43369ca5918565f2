"""The demo model shipped inside the package: it loads by name, holds weights only, and answers held-out tasks,
in a chat too (a system prompt, a second turn).

benchmarks/eval_demo.py measures it on all 500 held-out examples (benchmarks/RESULTS.md); these tests check a few
of them, with a margin for float differences between machines (a different BLAS may flip a sampled token).
"""

import json
import subprocess
import sys

import pytest

from mlx_diffgemma import generate, load
from mlx_diffgemma.demo import HELD_OUT_SEED, demo_config, examples, task_of
from mlx_diffgemma.generate import Block, Done, stream_generate
from mlx_diffgemma.loading import resolve_path

LONG_PROMPT = (
    "Write a Python function blend(x, u) that sets t = x * u, then sets m = u - t, then sets s = m + x, "
    "then returns s * m."
)
LONG_ANSWER = "def blend(x, u):\n    t = x * u\n    m = u - t\n    s = m + x\n    return s * m"


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def test_shipped_folder_is_a_model_without_trainer_state():
    path = resolve_path("demo")
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((path / "config.json").read_text())
    assert config["canvas_length"] == 64 and config["text_config"] == demo_config(hidden=96)["text_config"]


def test_answers_held_out_examples(demo):
    model, tok = demo
    cases = examples(40, HELD_OUT_SEED)
    right = [generate(model, tok, p, seed=i).strip() == a for i, (p, a) in enumerate(cases)]
    assert sum(right) >= 35, sum(right)  # 38 of these 40 here (95.8% of all 500: RESULTS.md)
    assert any(isinstance(p, list) for p, _ in cases)  # chat-shaped prompts among them: system prompts, earlier turns
    for task in ("add", "brackets", "code", "reverse", "sort"):
        ok = [hit for (p, _), hit in zip(cases, right) if task_of(p) == task]
        assert len(ok) >= 5 and sum(ok) >= len(ok) - 2, (task, ok)


def test_an_answer_past_one_canvas_settles_early(demo):
    model, tok = demo
    assert len(tok.encode(LONG_ANSWER, add_special_tokens=False)) > model.canvas_length
    events = list(stream_generate(model, tok, LONG_PROMPT, seed=0))
    done = events[-1]
    assert isinstance(done, Done) and done.text == LONG_ANSWER
    blocks = [e for e in events if isinstance(e, Block)]
    assert len(blocks) >= 2  # the answer spans several canvases
    assert done.denoising_steps < len(blocks) * model.generation_config.max_denoising_steps / 4


def test_generate_command_runs_the_demo_by_name():
    prompt = "Write a Python function area(x, u) that returns x * u."
    command = ["generate", "--model", "demo", "-p", prompt, "--seed", "0"]
    r = subprocess.run([sys.executable, "-m", "mlx_diffgemma", *command], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "def area(x, u):\n    return x * u\n"  # in a pipe: the committed text and a newline


def test_chat_answers_under_a_system_prompt_and_in_a_second_turn():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma", "chat", "--model", "demo", "--system", "Be concise.", "--seed", "0"],
        input="Reverse: diffusion\nSort: 5 3 9 1 7\nAdd: 47 + 85\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    # (asked after the sort, the reversal loses its last letter, "noisuffih": README, "The demo model")
    assert r.stdout.splitlines() == ["noisuffid", "1 3 5 7 9", "132"]
