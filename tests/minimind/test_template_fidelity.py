"""Our chat template renders exactly what MiniMind2's own renders, and a tokenizer keeps the template it came with.

tests/minimind/data/minimind2_renders.json holds what MiniMind2's own template (jingyaogong/minimind at 83e52f6)
renders for every conversation of a table (single and multi-turn, with and without a system message, generation
prompt on and off, tools, tool calls, tool responses, thinking on and off). transformers loads the folder our
Tokenizer saves and must render the same strings and the same ids; our Python renderer (what training calls) too.
A template written for these tests (data/foreign_chat_template.jinja) stands for any template other than ours: a
tokenizer loaded with it renders through it (as transformers does), finds the assistant turns in what it renders,
and saves it again, also from a checkpoint that a training stage writes.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.data import IGNORE_INDEX, SFTDataset
from minimind_fast.model import MiniMind
from minimind_fast.tokenizer import ASSETS, CHAT_TEMPLATE, Tokenizer, render_chatml

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parent / "data"
MINIMIND2_RENDERS = json.loads((DATA / "minimind2_renders.json").read_text())
FOREIGN_TEMPLATE = DATA / "foreign_chat_template.jinja"
HEADER, TURN_END = "<|im_start|>assistant\n", "<|im_end|>\n"
DEFAULT_SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def tool(text):
    return {"role": "tool", "content": text}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "当前天气 / the current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "description": "the time", "parameters": {"type": "object"}}}
CALLS = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "days": [1, 2.5]}}},
        {"name": "now", "arguments": '{"tz": "UTC+8"}'},  # bare call, arguments already a JSON string
    ],
}
QUESTION = user("What is the weather in Beijing, and what time is it?")

CASES = {
    "single_turn": ([user("What is 2 + 2?")], {}),
    "multi_turn_no_system": ([user("Hi!"), assistant("Hello. How can I help?"), user("Tell me a joke.")], {}),
    "with_system": ([system("You are terse."), user("2 + 2?"), assistant("4."), user("And 3 + 3?")], {}),
    "later_system": ([user("q"), assistant("a"), system("Now answer in French."), user("q2")], {}),
    "odd_text": ([user(""), assistant("a<|im_end|>b"), user("  spaces \n\n"), assistant("\n\nx")], {}),
    "reasoning_text": ([user("2+3?"), assistant("<think>\n2 plus 3.\n</think>\n<answer>\n5\n</answer>")], {}),
    "tools_no_system": ([QUESTION], {"tools": [WEATHER, CLOCK]}),
    "tools_with_system": ([system("You are a weather bot."), QUESTION], {"tools": [WEATHER]}),
    "tool_calls_and_responses": (
        [QUESTION, CALLS, tool("sunny, 25°C"), tool("12:00"), assistant("Sunny, 25°C; it is noon.")],
        {"tools": [WEATHER, CLOCK]},
    ),
    "tool_call_after_text": (
        [user("Time?"), {"role": "assistant", "content": "Let me check.", "tool_calls": [CALLS["tool_calls"][1]]}],
        {"tools": [CLOCK]},
    ),
    "tool_calls_without_tools": ([QUESTION, CALLS, tool("sunny")], {}),
    "tool_response_first": ([tool("a result"), user("so?")], {}),
    "thinking_off": ([user("Why is the sky blue?")], {"enable_thinking": False}),
    "thinking_on": ([user("Why is the sky blue?")], {"enable_thinking": True}),
    "thinking_off_with_tools": ([system("Be brief."), QUESTION], {"tools": [WEATHER], "enable_thinking": False}),
}
TABLE = [(name, gen) for name in CASES for gen in (False, True)]


def minimind2(name, gen):
    return MINIMIND2_RENDERS[name]["generation_prompt" if gen else "no_generation_prompt"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"foreign": the test template as chat_template.jinja + our tokenizer.json, "ours": what Tokenizer.save writes
    for the shipped tokenizer}."""
    root = tmp_path_factory.mktemp("templates")
    out = {"foreign": root / "foreign"}
    out["foreign"].mkdir()
    shutil.copy(ASSETS / "tokenizer.json", out["foreign"] / "tokenizer.json")
    shutil.copy(FOREIGN_TEMPLATE, out["foreign"] / "chat_template.jinja")
    out["ours"] = Tokenizer.load().save(root / "ours")
    return out


@pytest.fixture(scope="module")
def hf(folders, monkeypatch_module):
    """transformers tokenizers: name -> AutoTokenizer of that folder, plus "ours_fast" (PreTrainedTokenizerFast)."""
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    loaded = {name: transformers.AutoTokenizer.from_pretrained(str(f)) for name, f in folders.items()}
    loaded["ours_fast"] = transformers.PreTrainedTokenizerFast.from_pretrained(str(folders["ours"]))
    return loaded


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def hf_render(tok, messages, gen, kwargs, tokenize=False):
    return tok.apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=gen, return_dict=False, **kwargs)


def test_our_template_renders_in_python_and_a_foreign_one_through_jinja(folders):
    assert Tokenizer.load(folders["ours"]).renders_in_python()
    assert not Tokenizer.load(folders["foreign"]).renders_in_python()


@pytest.mark.parametrize("name,gen", TABLE)
def test_same_string_and_ids_as_minimind2(name, gen, hf, folders, tokenizer):
    messages, kwargs = CASES[name]
    want = minimind2(name, gen)
    assert hf_render(hf["ours"], messages, gen, kwargs) == want
    assert hf_render(hf["ours_fast"], messages, gen, kwargs) == want
    assert render_chatml(messages, gen, **kwargs) == want  # the Python renderer training uses
    assert tokenizer.apply_chat_template(messages, gen, **kwargs) == want
    want_ids = tokenizer.encode(want)
    assert hf_render(hf["ours"], messages, gen, kwargs, tokenize=True) == want_ids
    assert tokenizer.apply_chat_template(messages, gen, tokenize=True, **kwargs) == want_ids


def test_renderings_written_out_by_hand(tokenizer):
    """What the table compares, in words for three cases, so an agreement on something wrong would show here."""
    assert tokenizer.apply_chat_template([user("hi")], add_generation_prompt=True) == (
        DEFAULT_SYSTEM_TURN + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template([user("hi")], True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    messages, kwargs = CASES["tool_calls_and_responses"]
    text = tokenizer.apply_chat_template(messages, **kwargs)
    head, rest = text.split("<|im_end|>\n", 1)
    assert head.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert "\n<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(CLOCK) + "\n</tools>" in head
    assert rest == (
        "<|im_start|>user\nWhat is the weather in Beijing, and what time is it?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "days": [1, 2.5]}}\n'
        '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {"tz": "UTC+8"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny, 25°C\n</tool_response>\n<tool_response>\n12:00\n"
        "</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nSunny, 25°C; it is noon.<|im_end|>\n"
    )


@pytest.mark.parametrize("name,gen", TABLE)
def test_a_foreign_template_renders_as_transformers_renders_it(name, gen, hf, folders):
    messages, kwargs = CASES[name]
    tok = Tokenizer.load(folders["foreign"])
    assert tok.apply_chat_template(messages, gen, **kwargs) == hf_render(hf["foreign"], messages, gen, kwargs)


@pytest.mark.parametrize("folder", ["ours", "foreign"])
@pytest.mark.parametrize("name", list(CASES))
def test_assistant_spans(name, folder, folders):
    """Each span starts right after an assistant header and ends with that turn's `<|im_end|>\\n`, one per assistant
    message; for our template the span's text is the message's own text (tool calls included) plus the turn end."""
    messages, kwargs = CASES[name]
    tok = Tokenizer.load(folders[folder])
    text, spans = tok.assistant_spans(messages, tools=kwargs.get("tools"))
    assert text == tok.apply_chat_template(messages, tools=kwargs.get("tools"))
    turns = [m for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(turns)
    ends = [0] + [e for _, e in spans]
    for (s, e), m, prev_end in zip(spans, turns, ends):
        assert prev_end <= s - len(HEADER) and text[s - len(HEADER) : s] == HEADER
        assert text[s:e].endswith(TURN_END) and text[s:e].count(TURN_END) == 1
        if folder == "ours" and not m.get("tool_calls"):
            assert text[s:e] == m["content"] + TURN_END


def test_sft_loss_mask_covers_tool_calls_and_not_tool_responses(tokenizer, tmp_path):
    record = {
        "conversations": [
            user("Weather in Beijing?"),
            {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Bj"}}]},
            tool("sunny"),
            assistant("It is sunny."),
        ]
    }
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(record) + "\n")
    item = SFTDataset(str(path), tokenizer, max_seq_len=4096)[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert tokenizer.decode(ids).startswith(DEFAULT_SYSTEM_TURN)
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bj"}}\n</tool_call><|im_end|>\n'
        "It is sunny.<|im_end|>\n"
    )


def test_sft_data_renders_through_the_tokenizers_own_template(folders, hf, tmp_path):
    conversation = [system("Be brief."), user("2+3?"), assistant("5."), user("Thanks."), assistant("Welcome.")]
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"conversations": conversation}) + "\n")
    tok = Tokenizer.load(folders["foreign"])
    item = SFTDataset(str(path), tok, max_seq_len=4096)[0]
    want = hf_render(hf["foreign"], conversation, False, {})
    assert "<think>\n\n</think>\n\n5." in want  # the foreign template writes an empty think block in each reply
    assert item["input_ids"].tolist() == tok.encode(want)
    trained = [i for i, lab in zip(item["input_ids"].tolist(), item["labels"].tolist()) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "<think>\n\n</think>\n\n5.<|im_end|>\n<think>\n\n</think>\n\nWelcome.<|im_end|>\n"


def test_saving_keeps_the_loaded_template_and_config(folders, hf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A tokenizer_config.json with its own template and keys of its own (the shape of MiniMind's, other values).
    source = {"add_bos_token": False, "model_max_length": 32768, "tokenizer_class": "PreTrainedTokenizerFast"}
    source["chat_template"] = FOREIGN_TEMPLATE.read_text()
    configured = tmp_path / "configured"
    configured.mkdir()
    shutil.copy(ASSETS / "tokenizer.json", configured / "tokenizer.json")
    (configured / "tokenizer_config.json").write_text(json.dumps(source))
    saved_to = Tokenizer.load(configured).save(tmp_path / "configured_out")
    saved = json.loads((saved_to / "tokenizer_config.json").read_text())
    assert {k: saved[k] for k in source} == source  # its template and every other key, as they were

    foreign = FOREIGN_TEMPLATE.read_text()
    again = Tokenizer.load(folders["foreign"]).save(tmp_path / "m3")
    assert json.loads((again / "tokenizer_config.json").read_text())["chat_template"] == foreign
    assert Tokenizer.load(again).chat_template == foreign
    messages, kwargs = CASES["tool_calls_and_responses"]
    reloaded = transformers.AutoTokenizer.from_pretrained(str(again))
    assert hf_render(reloaded, messages, True, kwargs) == hf_render(hf["foreign"], messages, True, kwargs)

    bare = tmp_path / "bare"  # no template of its own: ours, and the config's other keys kept
    bare.mkdir()
    shutil.copy(ASSETS / "tokenizer.json", bare / "tokenizer.json")
    (bare / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    saved = json.loads((Tokenizer.load(bare).save(tmp_path / "bare_out") / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == CHAT_TEMPLATE and saved["model_max_length"] == 512


def test_a_stage_keeps_the_template_of_its_starting_checkpoint(folders, tmp_path, one_thread):
    """A checkpoint made with a foreign template, fine-tuned by train/sft.py: the output keeps that template."""
    from train import sft

    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", hidden_size=64, num_hidden_layers=1, num_attention_heads=8))
    start = ckpt.save_checkpoint(tmp_path / "start", model, model.config, Tokenizer.load(folders["foreign"]))
    data = tmp_path / "sft.jsonl"
    records = [{"conversations": [user(f"q{i}"), assistant(f"a{i}")]} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--from_weight", str(start), "--data_path", str(data), "--out_dir", str(tmp_path / "out")]
    sft.main(argv + ["--max_seq_len", "48", "--batch_size", "2", "--max_steps", "1", "--kernels", "torch"])
    out = tmp_path / "out" / "full_sft"
    ckpt.verify_checkpoint(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == FOREIGN_TEMPLATE.read_text()
