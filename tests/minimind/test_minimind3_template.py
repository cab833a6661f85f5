"""Our Jinja for MiniMind-3's prompt format (CHAT_TEMPLATE_M3) renders exactly what MiniMind-3's own template renders.

tests/minimind/data/minimind3_renders.json holds what MiniMind-3's own template (jingyaogong/minimind's
model/tokenizer_config.json at its 2026 HEAD) rendered through transformers for a table of invented conversations
(single and multi-turn, with and without a system message, generation prompt on and off, tools, tool calls with and
without the `function` wrapper and with string and object arguments, consecutive tool responses, reasoning_content,
<think> tags inside content, the thinking switch unset/true/false), with MiniMind-3's token ids.

Always checked, on a folder holding the shipped tokenizer.json and CHAT_TEMPLATE_M3: our Tokenizer and transformers
both render every stored string; the assistant spans are exactly the assistant turns; the thinking switch opens or
closes the generation prompt's think block; SFTDataset trains on the assistant turns (think block, answer, tool calls,
turn end) and never on tool responses. The shipped vocabulary has ordinary tokens where MiniMind-3 has its specials
(ids 3-35), so ids are compared only with MiniMind-3's own tokenizer folder: set MINIMIND3_TOKENIZER to it (e.g. a
copy of model/ of jingyaogong/minimind) to also check that it loads with vocab 6400 and MiniMind-3's special ids,
renders every stored string and encodes it to the stored ids, with its own template and with ours.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from minimind_fast.data import IGNORE_INDEX, SFTDataset
from minimind_fast.tokenizer import ASSETS, CHAT_TEMPLATE_M3, Tokenizer, template_sha256

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parent / "data"
RENDERS = json.loads((DATA / "minimind3_renders.json").read_text(encoding="utf-8"))
CONVERSATIONS, ROWS = RENDERS["conversations"], RENDERS["rows"]
HEADER, TURN_END = "<|im_start|>assistant\n", "<|im_end|>\n"
OPEN_PROMPT, CLOSED_PROMPT = HEADER + "<think>\n", HEADER + "<think>\n\n</think>\n\n"

REAL = os.environ.get("MINIMIND3_TOKENIZER")
needs_real = pytest.mark.skipif(not REAL, reason="MINIMIND3_TOKENIZER (MiniMind-3's own tokenizer folder) is not set")

# MiniMind-3's special tokens and their ids.
M3_SPECIALS = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    **{
        t: 3 + k
        for k, t in enumerate(
            [
                "<|object_ref_start|>",
                "<|object_ref_end|>",
                "<|box_start|>",
                "<|box_end|>",
                "<|quad_start|>",
                "<|quad_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|vision_pad|>",
                "<|image_pad|>",
                "<|video_pad|>",
                "<|audio_start|>",
                "<|audio_end|>",
                "<|audio_pad|>",
                "<tts_pad>",
                "<tts_text_bos>",
                "<tts_text_eod>",
                "<tts_text_bos_single>",
            ]
        )
    },
    "<tool_call>": 21,
    "</tool_call>": 22,
    "<tool_response>": 23,
    "</tool_response>": 24,
    "<think>": 25,
    "</think>": 26,
    **{f"<|buffer{k}|>": 26 + k for k in range(1, 10)},
}


def row_id(row):
    switch = {None: "unset", True: "open", False: "closed"}[row["open_thinking"]]
    return f"{row['conversation']}-{'gen' if row['add_generation_prompt'] else 'nogen'}-{switch}"


def conversation(row):
    c = CONVERSATIONS[row["conversation"]]
    return c["messages"], c["tools"]


def ours(tok, row, tokenize=False):
    """Our Tokenizer's rendering of a row: the switch as enable_thinking (None leaves it undefined)."""
    messages, tools = conversation(row)
    return tok.apply_chat_template(
        messages, row["add_generation_prompt"], tokenize=tokenize, tools=tools, enable_thinking=row["open_thinking"]
    )


def hf_render(tok, row, tokenize=False):
    """transformers' rendering of a row, called as the stored rows were made (open_thinking passed only when set)."""
    messages, tools = conversation(row)
    kw = {} if row["open_thinking"] is None else {"open_thinking": row["open_thinking"]}
    return tok.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=row["add_generation_prompt"],
        tokenize=tokenize,
        return_dict=False,
        **kw,
    )


def plain_rows():
    """One row per conversation: no generation prompt, switch unset."""
    return [r for r in ROWS if not r["add_generation_prompt"] and r["open_thinking"] is None]


@pytest.fixture(scope="module")
def offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


def _folder(dst: Path, tokenizer_json: Path, config: dict) -> Path:
    dst.mkdir()
    shutil.copy(tokenizer_json, dst / "tokenizer.json")
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ "shipped_m3": the shipped tokenizer.json with CHAT_TEMPLATE_M3 as its config's chat_template; with
    MINIMIND3_TOKENIZER also "real" (that folder as it is) and "real_ours" (its files, CHAT_TEMPLATE_M3 instead of
    its own template)."""
    root = tmp_path_factory.mktemp("m3")
    shipped_cfg = json.loads((ASSETS / "tokenizer_config.json").read_text(encoding="utf-8"))
    out = {
        "shipped_m3": _folder(
            root / "shipped_m3", ASSETS / "tokenizer.json", {**shipped_cfg, "chat_template": CHAT_TEMPLATE_M3}
        )
    }
    if REAL:
        real = Path(REAL)
        out["real"] = real
        real_cfg = json.loads((real / "tokenizer_config.json").read_text(encoding="utf-8"))
        out["real_ours"] = _folder(
            root / "real_ours", real / "tokenizer.json", {**real_cfg, "chat_template": CHAT_TEMPLATE_M3}
        )
    return out


@pytest.fixture(scope="module")
def toks(folders):
    return {name: Tokenizer.load(f) for name, f in folders.items()}


@pytest.fixture(scope="module")
def hf(folders, offline):
    return {name: transformers.AutoTokenizer.from_pretrained(str(f)) for name, f in folders.items()}


# ---------------------------------------------------------------------------------------------- always (shipped vocab)
def test_the_table_covers_the_format():
    """The stored table exercises every part of the format the brief names (so a thin table cannot pass quietly)."""
    assert "jingyaogong/minimind" in RENDERS["source"] and "transformers" in RENDERS["source"]
    assert {(r["add_generation_prompt"], r["open_thinking"]) for r in ROWS} >= {
        (g, t) for g in (False, True) for t in (None, True, False)
    }
    messages = [m for c in CONVERSATIONS.values() for m in c["messages"]]
    calls = [call for m in messages for call in m.get("tool_calls") or []]
    assert any(c["tools"] for c in CONVERSATIONS.values()) and any(not c["tools"] for c in CONVERSATIONS.values())
    assert any(c["messages"][0]["role"] == "system" for c in CONVERSATIONS.values())
    assert any(sum(m["role"] == "assistant" for m in c["messages"]) > 1 for c in CONVERSATIONS.values())
    assert any("function" in c for c in calls) and any("function" not in c for c in calls)
    args = [(c.get("function") or c)["arguments"] for c in calls]
    assert any(isinstance(a, str) for a in args) and any(isinstance(a, dict) for a in args)
    assert any(
        a["role"] == b["role"] == "tool"
        for c in CONVERSATIONS.values()
        for a, b in zip(c["messages"], c["messages"][1:])
    )
    assert any(isinstance(m.get("reasoning_content"), str) for m in messages)
    assert any(m["role"] == "assistant" and "</think>" in (m["content"] or "") for m in messages)
    for row in ROWS:  # every stored id list is MiniMind-3's encoding, special ids included where the text has them
        assert isinstance(row["text"], str) and all(isinstance(i, int) and 0 <= i < 6400 for i in row["ids"])


def test_our_m3_template_is_ours_and_renders_through_jinja(toks):
    assert template_sha256(CHAT_TEMPLATE_M3) != RENDERS["template_sha256"]  # not MiniMind-3's text
    assert toks["shipped_m3"].chat_template == CHAT_TEMPLATE_M3
    assert not toks["shipped_m3"].renders_in_python()


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_our_m3_template_renders_minimind3s_strings(row, toks, hf):
    tok = toks["shipped_m3"]
    assert ours(tok, row) == row["text"]  # our Tokenizer's Jinja path
    assert hf_render(hf["shipped_m3"], row) == row["text"]  # transformers, from the same folder
    assert hf_render(hf["shipped_m3"], row, tokenize=True) == ours(tok, row, tokenize=True) == tok.encode(row["text"])


def test_renderings_written_out_by_hand(toks):
    """What the table compares, in words for a few cases, so an agreement on something wrong would show here."""
    tok = toks["shipped_m3"]
    hi = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(hi) == "<|im_start|>user\nhi<|im_end|>\n"  # no default system turn
    assert tok.apply_chat_template(hi, add_generation_prompt=True).endswith("<|im_end|>\n" + CLOSED_PROMPT)
    messages = CONVERSATIONS["tool_calls_with_reasoning"]["messages"]
    text = tok.apply_chat_template(messages, tools=CONVERSATIONS["tool_calls_with_reasoning"]["tools"])
    head, rest = text.split("<|im_end|>\n", 1)
    assert head.startswith("<|im_start|>system\nUse the tools.\n\n# Tools\n\nYou may call one or more functions")
    assert head.endswith("</tool_call>")
    assert rest == (
        "<|im_start|>user\nHigh tide at Orrin?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nI need the tide table.\n</think>\n\n"
        '<tool_call>\n{"name": "tide_table", "arguments": {"harbour": "Orrin"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n09:40\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThe tool says 09:40.\n</think>\n\nHigh tide at Orrin is at 09:40.<|im_end|>\n"
        "<|im_start|>user\nThanks. And tomorrow?<|im_end|>\n"
    )
    odd = tok.apply_chat_template(CONVERSATIONS["tool_call_after_newline_only_text"]["messages"])
    assert "<think>\n\n</think>\n\n\n<tool_call>\n" in odd  # a content of "\n" shows as nothing, but sets the "\n"


@pytest.mark.parametrize("switch,prompt", [(None, CLOSED_PROMPT), (False, CLOSED_PROMPT), (True, OPEN_PROMPT)])
def test_the_thinking_switch_opens_or_closes_the_generation_prompt(switch, prompt, toks):
    tok = toks["shipped_m3"]
    for name in ("single_turn", "tools_with_system", "tool_calls_and_responses"):
        messages, tools = CONVERSATIONS[name]["messages"], CONVERSATIONS[name]["tools"]
        text = tok.apply_chat_template(messages, True, tools=tools, enable_thinking=switch)
        plain = tok.apply_chat_template(messages, False, tools=tools, enable_thinking=switch)
        assert text == plain + prompt
        stored = {(r["conversation"], r["add_generation_prompt"], r["open_thinking"]): r["text"] for r in ROWS}
        assert text == stored[(name, True, switch)]
        assert plain == stored[(name, False, None)]  # without a generation prompt the switch changes nothing


def check_spans(tok, row):
    """assistant_spans: one span per assistant message, each from right after its `<|im_start|>assistant\\n` through
    the next `<|im_end|>\\n`; every tool response outside all spans."""
    messages, tools = conversation(row)
    text, spans = tok.assistant_spans(messages, tools=tools)
    assert text == row["text"]
    heads = [i for i in range(len(text)) if text.startswith(HEADER, i)]
    want = [(h + len(HEADER), text.index(TURN_END, h) + len(TURN_END)) for h in heads]
    assert spans == want and len(spans) == sum(m["role"] == "assistant" for m in messages)
    turns = [m for m in messages if m["role"] == "assistant"]
    for (s, e), m in zip(spans, turns):
        assert text[s:e].startswith("<think>\n") and text[s:e].count("<tool_call>") == len(m.get("tool_calls") or [])
    responses = [i for i in range(len(text)) if text.startswith("<tool_response>", i)]
    assert len(responses) >= sum(m["role"] == "tool" for m in messages)
    assert not any(s <= i < e for i in responses for s, e in spans)


@pytest.mark.parametrize("row", plain_rows(), ids=row_id)
def test_assistant_spans_are_the_assistant_turns(row, toks):
    check_spans(toks["shipped_m3"], row)


SFT_RECORD = {
    "conversations": [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "High tide and the fare at Vell?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Two lookups.",
            "tool_calls": [
                {"type": "function", "function": {"name": "tide_table", "arguments": {"harbour": "Vell"}}},
                {"name": "ferry_fare", "arguments": '{"to": "Osk"}'},
            ],
        },
        {"role": "tool", "content": "14:05"},
        {"role": "tool", "content": "3 brass marks"},
        {"role": "assistant", "content": "<think>\nBoth known.\n</think>\n\nHigh tide 14:05; the fare is 3 marks."},
    ]
}
SFT_TRAINED = (
    "<think>\nTwo lookups.\n</think>\n\n"
    '<tool_call>\n{"name": "tide_table", "arguments": {"harbour": "Vell"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "ferry_fare", "arguments": {"to": "Osk"}}\n</tool_call><|im_end|>\n'
    "<think>\nBoth known.\n</think>\n\nHigh tide 14:05; the fare is 3 marks.<|im_end|>\n"
)


def check_sft_mask(tok, hf_tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(SFT_RECORD) + "\n")
    item = SFTDataset(str(path), tok, max_seq_len=4096)[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    want = hf_tok.apply_chat_template(SFT_RECORD["conversations"], tokenize=False, return_dict=False)
    assert ids == tok.encode(want)  # trained on what MiniMind-3's format renders
    assert "<tool_response>\n14:05\n</tool_response>\n<tool_response>\n3 brass marks\n</tool_response>" in want
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == SFT_TRAINED  # think blocks, answers, tool calls, turn ends; no tool response
    return ids, labels


def test_sft_loss_mask_covers_think_answer_and_tool_calls_not_tool_responses(toks, hf, tmp_path):
    check_sft_mask(toks["shipped_m3"], hf["shipped_m3"], tmp_path)


def test_saving_keeps_the_m3_template(toks, tmp_path):
    saved = toks["shipped_m3"].save(tmp_path / "saved")
    assert json.loads((saved / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE_M3
    assert Tokenizer.load(saved).chat_template == CHAT_TEMPLATE_M3


# ------------------------------------------------------------------------ MiniMind-3's own folder (MINIMIND3_TOKENIZER)
@needs_real
def test_minimind3s_folder_loads_with_its_vocab_specials_and_template(toks):
    tok = toks["real"]
    assert tok.vocab_size == len(tok) == 6400
    assert {t: tok.token_to_id(t) for t in M3_SPECIALS} == M3_SPECIALS
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    # The folder's template is the one the stored rows were rendered with; it renders through Jinja.
    assert template_sha256(tok.chat_template) == RENDERS["template_sha256"]
    assert not tok.renders_in_python()
    assert toks["real_ours"].chat_template == CHAT_TEMPLATE_M3


@needs_real
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_minimind3s_folder_renders_and_encodes_every_row(row, toks, hf):
    for name in ("real", "real_ours"):  # its own template, and ours with its vocabulary
        tok = toks[name]
        assert ours(tok, row) == row["text"], name
        assert tok.encode(row["text"]) == row["ids"], name
        assert ours(tok, row, tokenize=True) == row["ids"], name
        assert hf_render(hf[name], row, tokenize=True) == row["ids"], name


@needs_real
@pytest.mark.parametrize("folder", ["real", "real_ours"])
@pytest.mark.parametrize("row", plain_rows(), ids=row_id)
def test_assistant_spans_with_minimind3s_folder(row, folder, toks):
    check_spans(toks[folder], row)


@needs_real
@pytest.mark.parametrize("folder", ["real", "real_ours"])
def test_sft_loss_mask_with_minimind3s_folder(folder, toks, hf, tmp_path):
    ids, labels = check_sft_mask(toks[folder], hf[folder], tmp_path)
    trained = {i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX}
    untrained = {i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX}
    ids_of = M3_SPECIALS
    # The think and tool-call tags are single special tokens, trained; the tool-response tags never are.
    assert {ids_of["<think>"], ids_of["</think>"], ids_of["<tool_call>"], ids_of["</tool_call>"]} <= trained
    assert {ids_of["<tool_response>"], ids_of["</tool_response>"]} <= untrained - trained
