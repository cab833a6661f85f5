"""tools/chat.py against a tiny checkpoint saved here: the printed answer must be what generate() produces for the
same prompt and seed, the chat history must reach the next prompt, and bad checkpoints must fail in one line."""

import ast
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimind_fast.checkpoint import load_model, save_checkpoint
from minimind_fast.config import from_preset
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind
from tools import chat

ROOT = Path(__file__).resolve().parents[2]
SPEED = re.compile(r"^\[(\d+) tokens in [\d.]+ s, [\d.]+ tokens/s\]$", re.M)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = from_preset("tiny", num_hidden_layers=2)
    model = MiniMind(cfg)
    model.reset_parameters(std=0.1)  # a context-dependent random model, so answers differ between prompts
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "full_sft", model, cfg, tokenizer=tokenizer)


def run_cli(args, stdin=None):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "chat.py"), "--device", "cpu", "--kernels", "torch", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, encoding="utf-8", cwd=ROOT, env=env)


def expected_answer(folder, tokenizer, prompt_ids, **kw):
    model, _, _ = load_model(folder)
    ids = generate(model.eval(), [prompt_ids], **kw)[0]
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def test_one_shot_prints_the_generated_text_and_a_speed_line(checkpoint, tokenizer):
    prompt = "你好, what is the sea?"
    r = run_cli(["--load", str(checkpoint), "--prompt", prompt, "--max_new_tokens", "12", "--seed", "3"])
    assert r.returncode == 0, r.stderr
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], True, tokenize=True)
    want_ids, want_text = expected_answer(
        checkpoint, tokenizer, ids, max_new_tokens=12, temperature=0.85, top_p=0.85, seed=3
    )
    assert want_text.strip()
    m = SPEED.search(r.stdout)
    assert m and int(m.group(1)) == len(want_ids)
    assert r.stdout == want_text + "\n" + m.group(0) + "\n"
    assert "loaded" in r.stderr and "attention" in r.stderr  # start-up line and kernels table


def test_interactive_two_turns_keep_history_then_exit(checkpoint, tokenizer):
    stdin = "first question\nsecond question\nexit\nnever read\n"
    r = run_cli(
        ["--load", str(checkpoint), "--history", "2", "--show_prompt", "--max_new_tokens", "6", "--seed", "0"], stdin
    )
    assert r.returncode == 0, r.stderr
    prompts = [
        ast.literal_eval(line[len("[prompt] ") :]) for line in r.stdout.splitlines() if line.startswith("[prompt] ")
    ]
    assert len(prompts) == 2 and len(SPEED.findall(r.stdout)) == 2
    first_turn = [{"role": "user", "content": "first question"}]
    assert prompts[0] == tokenizer.apply_chat_template(first_turn, True)
    # The first answer is what was printed between the first prompt line and its speed line.
    printed = r.stdout.split("\n", 1)[1]
    answer = printed[: SPEED.search(printed).start()].strip()
    assert answer
    history = first_turn + [{"role": "assistant", "content": answer}, {"role": "user", "content": "second question"}]
    assert prompts[1] == tokenizer.apply_chat_template(history, True)


def test_clear_forgets_history_and_pretrain_mode_continues_raw_text(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("alpha\n/clear\nbeta\n"))
    assert chat.main(["--load", str(checkpoint), "--history", "3", "--show_prompt", "--max_new_tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "(history cleared)" in out
    system = "<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n"  # the template's default system turn
    assert f"[prompt] '{system}<|im_start|>user\\nbeta<|im_end|>\\n<|im_start|>assistant\\n'" in out

    monkeypatch.setattr(sys, "stdin", io.StringIO("The sea\nThe sky\n"))
    args = ["--load", str(checkpoint), "--mode", "pretrain", "--history", "3", "--show_prompt", "--max_new_tokens", "3"]
    assert chat.main(args) == 0
    out = capsys.readouterr().out
    assert "[prompt] '<|im_start|>The sea'" in out and "[prompt] '<|im_start|>The sky'" in out
    assert len(SPEED.findall(out)) == 2


def corrupt(folder: Path, how: str) -> None:
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "flipped":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "no manifest":
        (folder / "manifest.json").unlink()


@pytest.mark.parametrize(
    "how, msg",
    [
        ("missing", "does not exist"),
        ("truncated", "truncated"),
        ("flipped", "sha256"),
        ("no manifest", "incomplete"),
        ("bad kernels", "unknown kernels base"),
        ("a file", "expects a checkpoint folder"),
    ],
)
def test_bad_checkpoint_or_option_is_one_error_line(checkpoint, tmp_path, capsys, how, msg):
    folder = tmp_path / "ckpt"
    extra = []
    if how == "bad kernels":
        extra = ["--kernels", "bogus"]
    if how == "a file":
        folder = checkpoint / "model.safetensors"
    elif how != "missing":
        shutil.copytree(checkpoint, folder)
        corrupt(folder, how)
    assert chat.main(["--load", str(folder), "--prompt", "hi", "--device", "cpu", *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and msg in err, err


def test_stop_string_ends_the_answer_and_each_seeded_turn_is_its_own_draw(checkpoint, tokenizer, capsys):
    prompt = "Where do the rivers go?"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], True, tokenize=True)
    _, full = expected_answer(checkpoint, tokenizer, ids, max_new_tokens=24, greedy=True, eos_id=None)
    stop = full.strip()[6:9]
    assert stop and full.find(stop) > 0
    base = ["--load", str(checkpoint), "--device", "cpu", "--kernels", "torch", "--temperature", "0"]
    assert chat.main([*base, "--prompt", prompt, "--max_new_tokens", "24", "--stop", stop]) == 0
    printed = capsys.readouterr().out.split("\n[")[0]
    assert printed == full[: full.find(stop)]
    # --seed S: turn i draws from a generator seeded S + i, so turn 2 is the one-shot answer with seed S + 1.
    args = chat.parse_args([*base, "--temperature", "0.9", "--seed", "5"])
    session = chat.Session(*chat.load_chat_model(args), args)
    turns = [session.answer(prompt, out=io.StringIO()) for _ in range(2)]
    want = [expected_answer(checkpoint, tokenizer, ids, max_new_tokens=256, temperature=0.9, top_p=0.85, seed=s)[1]
            for s in (5, 6)]  # fmt: skip
    assert turns == [w.strip() for w in want] and turns[0] != turns[1]


# ----------------------------------------------------------------------------------------------------------------
# Tools: the model of tests/tools/conftest.py `tool_model` answers "What is 37 + 48?" with a calculator call, and
# "37 + 48 = 85." once the result is back.


def tool_history(tool_model, upto):
    """The conversation of tool_model's exchange as messages, in the template's terms, up to `upto` messages."""
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37 + 48"}}}
    return [
        {"role": "user", "content": "What is 37 + 48?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"result": 85}'},
        {"role": "assistant", "content": "37 + 48 = 85."},
    ][:upto]


def test_tools_one_shot_runs_the_call_and_answers_with_its_result(tool_model, tokenizer):
    args = ["--load", str(tool_model.folder), "--tools", "--world", "", "--temperature", "0", "--max_new_tokens", "80"]
    r = run_cli([*args, "--prompt", "What is 37 + 48?"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5, r.stdout
    assert lines[0] == '[tool call] calculator {"expression": "37 + 48"}'
    call_tokens = tokenizer.encode(tool_model.call_text + "<|im_end|>")
    assert SPEED.match(lines[1]) and int(SPEED.match(lines[1]).group(1)) == len(call_tokens)
    assert lines[2] == '[tool result] {"result": 85}'  # the calculator's own answer, computed by toolcall.Toolbox
    assert lines[3] == "37 + 48 = 85."
    answer_tokens = tokenizer.encode("37 + 48 = 85.<|im_end|>")
    assert SPEED.match(lines[4]) and int(SPEED.match(lines[4]).group(1)) == len(answer_tokens)


def test_tools_interactive_prompts_carry_the_calls_and_results(tool_model, tokenizer):
    args = ["--load", str(tool_model.folder), "--tools", "--world", "", "--temperature", "0", "--history", "1"]
    r = run_cli([*args, "--show_prompt", "--max_new_tokens", "60"], "What is 37 + 48?\nthanks\nexit\n")
    assert r.returncode == 0, r.stderr
    prompts = [ast.literal_eval(x[len("[prompt] ") :]) for x in r.stdout.splitlines() if x.startswith("[prompt] ")]
    specs = tool_model.specs  # calculator only: no --world
    assert prompts[0] == tokenizer.apply_chat_template(tool_history(tool_model, 1), True, tools=specs)
    assert prompts[1] == tokenizer.apply_chat_template(tool_history(tool_model, 3), True, tools=specs)
    follow = tool_history(tool_model, 4) + [{"role": "user", "content": "thanks"}]
    assert prompts[2] == tokenizer.apply_chat_template(follow, True, tools=specs)
    # Between the first two prompts: the call (its block is not printed), the speed line, the result.
    lines = r.stdout.splitlines()
    first, second = [i for i, x in enumerate(lines) if x.startswith("[prompt] ")][:2]
    shown = lines[first + 1 : second]
    assert shown[0] == '[tool call] calculator {"expression": "37 + 48"}' and SPEED.match(shown[1])
    assert shown[2:] == ['[tool result] {"result": 85}']


def test_thinking_switch_and_a_bad_world_file(tool_model, tmp_path, capsys):
    base = ["--load", str(tool_model.folder), "--device", "cpu", "--kernels", "torch", "--max_new_tokens", "2"]
    assert chat.main([*base, "--prompt", "hi", "--show_prompt", "--enable_thinking", "false"]) == 0
    closed = "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'"
    assert capsys.readouterr().out.splitlines()[0].endswith(closed)
    world = tmp_path / "world.json"
    world.write_text('{"world": "Kethmar", "people": [{"name": "A"}]}', encoding="utf-8")
    for path, msg in ((tmp_path / "missing.json", "cannot read the world file"), (world, "people[0].age")):
        assert chat.main([*base, "--tools", "--world", str(path), "--prompt", "hi"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --world {path}") and msg in err and err.count("\n") == 1, err
