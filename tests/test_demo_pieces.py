"""The demo model's tokenizer and tasks (the model itself is trained by benchmarks/train_demo.py)."""

from pathlib import Path

import pytest

import mlx_diffgemma
from mlx_diffgemma.demo import TASKS, build_tokenizer, demo_config, examples, task_of, vocabulary
from mlx_diffgemma.loading import LoadError, resolve_path


def test_tokenizer_and_config(tmp_path):
    from mlx_lm.tokenizer_utils import load

    from mlx_diffgemma.config import ModelConfig
    from mlx_diffgemma.train import encode_example, end_of_turn

    tok = load(build_tokenizer(tmp_path))
    v = vocabulary()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Sort: 3 1"}], add_generation_prompt=True, tokenize=True, enable_thinking=False
    )
    assert tok.decode(ids) == "<bos><|turn>user\nSort: 3 1<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert ids[:2] == [v["<bos>"], v["<|turn>"]] and ids[-1] == v["<channel|>"]
    text = "def f(x):\n    return x é"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte fallback beyond ASCII
    cfg = ModelConfig.from_dict(demo_config()).text_config
    assert [s.is_sliding for s in cfg.layers] == [True] * 5 + [False] and cfg.num_experts == 8
    end = end_of_turn(tok, tok.eos_token_id)
    pairs = [encode_example(tok, p, a, end) for p, a in examples(200, 1)]  # as training renders them
    assert max(max(p + a) for p, a in pairs) < cfg.vocab_size


def test_demo_name_resolves_to_the_package_folder():
    assert resolve_path("demo") == Path(mlx_diffgemma.__file__).resolve().parent / "demo" / "model"
    with pytest.raises(LoadError):
        resolve_path("/definitely/not/here")


def test_tasks_are_reproducible_correct_and_chat_shaped():
    from mlx_diffgemma.demo import SYSTEMS, question

    ex = examples(3000, 5)
    assert ex == examples(3000, 5) and ex[:50] != examples(50, 6)
    seen, chat, sizes = set(), {"system": 0, "history": 0}, {}
    for prompt, answer in ex:
        q = question(prompt)
        task = task_of(prompt)
        seen.add(task)
        assert answer == right_answer(q)
        rest = q.partition(": ")[2]
        size = {"sort": len(rest.split()), "reverse": len(rest), "brackets": len(rest), "add": len(answer)}
        sizes.setdefault(task, set()).add(size.get(task, len(answer)))
        if isinstance(prompt, list):
            assert prompt[-1] == {"role": "user", "content": q}
            if prompt[0]["role"] == "system":
                chat["system"] += 1
                assert prompt[0]["content"] in SYSTEMS
            turns = [m for m in prompt if m["role"] != "system"][:-1]
            chat["history"] += bool(turns)
            for user, model in zip(turns[::2], turns[1::2]):  # earlier turns carry their right answers
                assert (user["role"], model["role"]) == ("user", "assistant")
                assert model["content"] == right_answer(user["content"])
    assert seen == set(TASKS)
    assert (min(sizes["sort"]), max(sizes["sort"])) == (3, 12) and (min(sizes["reverse"]), max(sizes["reverse"])) == (
        4,
        16,
    )
    assert sizes["add"] == {3} and (min(sizes["brackets"]), max(sizes["brackets"])) == (4, 12)
    assert max(sizes["code"]) > 64  # some answers run past one canvas
    assert 700 < chat["system"] < 1100 and 700 < chat["history"] < 1100
    mix = [task_of(p) for p, _ in examples(2000, 0, {"code": 0.1, "sort": 0.9})]
    assert set(mix) == {"code", "sort"} and 100 < mix.count("code") < 300


def right_answer(q: str) -> str:
    """The answer to a question, worked out from the question alone."""
    kind, _, rest = q.partition(": ")
    if kind == "Sort":
        return " ".join(sorted(rest.split(), key=int))
    if kind == "Reverse":
        return rest[::-1]
    if kind == "Add":
        a, b = rest.split(" + ")
        assert len(a) == len(b) == 2
        return f"{int(a) + int(b):03d}"
    if kind == "Close":
        return "".join(dict(zip("([{<", ")]}>"))[c] for c in reversed(rest))
    head, _, said = q.partition(" that ")  # the function the prompt describes, line by line
    steps = said.rstrip(".").split(", then ")
    lines = [s.removeprefix("sets ") for s in steps[:-1]] + ["return " + steps[-1].removeprefix("returns ")]
    return f"def {head.removeprefix('Write a Python function ')}:" + "".join(f"\n    {x}" for x in lines)
