"""Tests of minimind_fast/data.py: loss masks, truncation, packing, bad-line reports, collate functions, RL prompts.

Expectations are built independently of the code under test: masks from the separately encoded pieces of a
conversation and from the tokenizer's character offsets into the rendered string, packed rows from a plain
concatenation of [bos] + encode(text) + [eos].
"""

import json
import pickle

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from torch.utils.data import DataLoader

from minimind_fast.data import (
    IGNORE_INDEX,
    DataError,
    DPODataset,
    PretrainDataset,
    RLPromptDataset,
    SFTDataset,
    check_sft,
    collate_dpo,
    collate_prompts,
    collate_sft,
    conversation_tools,
    iter_jsonl,
)
from minimind_fast.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n<answer>\n5\n</answer>"},
    {"role": "user", "content": "你好，再说一遍？"},
    {"role": "assistant", "content": "The answer is 5.\n好的。"},
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_lines(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# MiniMind2's template opens a conversation without a system message with this system turn.
DEFAULT_SYSTEM = {"role": "system", "content": "You are a helpful assistant"}


def with_system(messages):
    return messages if messages[0]["role"] == "system" else [DEFAULT_SYSTEM, *messages]


def expected_from_pieces(tokenizer, messages):
    """ids and mask built by encoding the three pieces of every turn on their own."""
    messages = with_system(messages)
    ids, mask = [], []
    for m in messages:
        head = tokenizer.encode(f"<|im_start|>{m['role']}\n")
        body = tokenizer.encode(m["content"]) + tokenizer.encode("<|im_end|>\n")
        ids += head + body
        mask += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    return ids, mask


def expected_from_offsets(tokenizer, messages):
    """ids and mask from character offsets: a token is in the loss when it starts inside an assistant turn's
    content or its closing `<|im_end|>\\n`, located with str.find in the rendered string."""
    text = tokenizer.apply_chat_template(messages)
    spans, pos = [], 0
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        start = text.index(head, pos) + len(head)
        end = text.index("<|im_end|>\n", start + len(m["content"])) + len("<|im_end|>\n")
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    return enc.ids, mask


def labels_from(ids, mask):
    return [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]


# ----------------------------------------------------------------------------------------------------- SFT loss mask


def test_sft_loss_mask_token_by_token(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONVERSATION}])
    item = SFTDataset(path, tokenizer, max_seq_len=4096)[0]
    ids, labels = item["input_ids"], item["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape

    piece_ids, piece_mask = expected_from_pieces(tokenizer, CONVERSATION)
    off_ids, off_mask = expected_from_offsets(tokenizer, CONVERSATION)
    assert ids.tolist() == piece_ids == off_ids
    assert piece_mask == off_mask
    assert labels.tolist() == labels_from(piece_ids, piece_mask)

    # Spot checks in words: each assistant span ends with <|im_end|> then "\n"; the headers are never trained.
    trained = [int(i) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    answers = [m["content"] + "<|im_end|>\n" for m in CONVERSATION if m["role"] == "assistant"]
    assert tokenizer.decode(trained) == "".join(answers)


@pytest.mark.parametrize("content", ["\n\nstarts with blank lines", " starts with a space", "   ", ""])
def test_sft_loss_mask_leading_whitespace_matches_char_offsets(tokenizer, tmp_path, content):
    # Leading whitespace may merge with the header's "\n" into one token; the mask must still follow the text.
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": messages}])
    item = SFTDataset(path, tokenizer, max_seq_len=4096)[0]
    off_ids, off_mask = expected_from_offsets(tokenizer, messages)
    assert item["input_ids"].tolist() == off_ids
    assert item["labels"].tolist() == labels_from(off_ids, off_mask)
    assert item["labels"][-2:].tolist() == tokenizer.encode("<|im_end|>\n")


def with_newline_pair_merge(tokenizer):
    """The shipped tokenizer plus a top-priority "\\n\\n" merge, as vocabularies trained on more text tend to have:
    content starting with "\\n\\n" then fuses with the header's "\\n" into one token."""
    spec = json.loads(tokenizer.hf.to_str())
    spec["model"]["vocab"]["ĊĊ"] = len(spec["model"]["vocab"])
    spec["model"]["merges"].insert(0, ["Ċ", "Ċ"] if isinstance(spec["model"]["merges"][0], list) else "Ċ Ċ")
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), "shipped + ĊĊ")


def test_sft_loss_mask_when_header_newline_fuses_with_content(tokenizer, tmp_path):
    tok = with_newline_pair_merge(tokenizer)
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "\n\nfirst"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "second"},
    ]
    assert tok.token_to_id("ĊĊ") in tok.encode(tok.apply_chat_template(messages))
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": messages}]), tok, max_seq_len=4096)
    item = ds[0]
    assert ds.encoder.offset_fallbacks == 1  # the id search found one header of two, so char offsets decided
    off_ids, off_mask = expected_from_offsets(tok, messages)
    assert item["input_ids"].tolist() == off_ids
    assert item["labels"].tolist() == labels_from(off_ids, off_mask)
    trained = [int(i) for i, lab in zip(item["input_ids"], item["labels"]) if lab != IGNORE_INDEX]
    # Header "\\n" + content "\\n\\n" encode as "\\n\\n" + "\\n": the fused token starts in the header, so it is not
    # trained; everything after it is.
    assert tok.decode(trained) == "\nfirst<|im_end|>\nsecond<|im_end|>\n"


def test_sft_truncation(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONVERSATION}])
    full_ids, full_mask = expected_from_pieces(tokenizer, CONVERSATION)
    # Cut inside the second assistant answer: the kept part of the span stays trained up to the cut.
    cut = len(full_ids) - 4
    assert full_mask[cut - 1] and full_mask[cut]
    item = SFTDataset(path, tokenizer, max_seq_len=cut)[0]
    assert item["input_ids"].tolist() == full_ids[:cut]
    assert item["labels"].tolist() == labels_from(full_ids, full_mask)[:cut]
    # Cut before any assistant token: no label at all.
    first = full_mask.index(True)
    item = SFTDataset(path, tokenizer, max_seq_len=first)[0]
    assert len(item["input_ids"]) == first and (item["labels"] == IGNORE_INDEX).all()


def test_sft_random_access_pickling_and_workers(tokenizer, tmp_path):
    records = [
        {"conversations": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(7)
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "")  # blank lines are skipped but still counted in line numbers
    ds = SFTDataset(write_lines(tmp_path / "sft.jsonl", lines), tokenizer, max_seq_len=64)
    assert len(ds) == 7
    for i in (6, 0, 4, 3):
        ids, _ = expected_from_pieces(tokenizer, records[i]["conversations"])
        assert ds[i]["input_ids"].tolist() == ids
    assert ds.index.where(4) == f"{tmp_path / 'sft.jsonl'}:6"
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers may receive a pickled copy
    assert torch.equal(clone[5]["labels"], ds[5]["labels"])
    ds[0]  # opens the parent's file handle before the workers fork: each must seek its own
    batches = list(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_sft))
    assert len(batches) == 3
    for got, first in zip(batches, (0, 3, 6)):
        want = collate_sft([ds[i] for i in range(first, min(first + 3, len(ds)))])
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "labels", "attention_mask"))


# ----------------------------------------------------------------------------------------------------- pretrain packing


TEXTS = [f"document {i}: " + "the quick brown fox 跳过了懒狗. " * (i % 7 + 1) for i in range(40)]


def token_stream(tokenizer, texts):
    stream = []
    for t in texts:
        stream += [tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id]
    return stream


def test_pretrain_packing(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in TEXTS])
    L = 37
    ds = PretrainDataset(path, tokenizer, max_seq_len=L)
    stream = token_stream(tokenizer, TEXTS)
    assert ds.num_tokens == len(stream) and ds.num_documents == len(TEXTS)
    assert len(ds) == len(stream) // L
    rows = [ds[i] for i in range(len(ds))]
    assert all(r.shape == (L,) and r.dtype == torch.long for r in rows)
    assert torch.cat(rows).tolist() == stream[: len(ds) * L]  # no padding, documents span rows, tail dropped
    assert tokenizer.pad_id not in torch.cat(rows).tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_pretrain_too_short_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": "hi"}])
    with pytest.raises(DataError, match="fewer than one row"):
        PretrainDataset(path, tokenizer, max_seq_len=512)


# ----------------------------------------------------------------------------------------------------- bad input


GOOD_SFT = json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})

BAD_SFT = [
    ('{"conversations": [', "malformed JSON"),
    ('{"messages": []}', 'missing field "conversations"'),
    ('{"conversations": {"role": "user"}}', "must be a list"),
    ('{"conversations": []}', "is empty"),
    ('{"conversations": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "role must be"),
    ('{"conversations": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}', "must be a string"),
    ('{"conversations": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("line,reason", BAD_SFT)
def test_sft_bad_line_names_path_and_lineno(tokenizer, tmp_path, line, reason):
    path = write_lines(tmp_path / "sft.jsonl", [GOOD_SFT, "", line, GOOD_SFT])
    with pytest.raises(DataError, match=reason) as info:
        SFTDataset(path, tokenizer, max_seq_len=64)
    assert str(info.value).startswith(f"{path}:3: ")
    lazy = SFTDataset(path, tokenizer, max_seq_len=64, validate=False)  # offsets only: the error comes on reading
    assert len(lazy) == 3 and lazy[2]["input_ids"].tolist() == lazy[0]["input_ids"].tolist()
    with pytest.raises(DataError, match=reason) as info:
        lazy[1]
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize(
    "line,reason",
    [('{"text": "ok"', "malformed JSON"), ('{"txt": "x"}', 'missing field "text"'), ('{"text": 5}', "must be a")],
)
def test_pretrain_bad_line_names_path_and_lineno(tokenizer, tmp_path, line, reason):
    path = write_lines(tmp_path / "pre.jsonl", ['{"text": "fine"}', line])
    with pytest.raises(DataError, match=reason) as info:
        PretrainDataset(path, tokenizer, max_seq_len=2)
    assert str(info.value).startswith(f"{path}:2: ")


def test_dpo_bad_line(tokenizer, tmp_path):
    good = {"chosen": json.loads(GOOD_SFT)["conversations"], "rejected": json.loads(GOOD_SFT)["conversations"]}
    path = write_lines(tmp_path / "dpo.jsonl", [json.dumps(good), json.dumps({"chosen": good["chosen"]})])
    with pytest.raises(DataError, match=f'^{path}:2: missing field "rejected"'):
        DPODataset(path, tokenizer, max_seq_len=64)


def test_skip_bad_lines_counts(tokenizer, tmp_path):
    bad = [line for line, _ in BAD_SFT]
    lines = [GOOD_SFT, bad[0], GOOD_SFT, *bad[1:], GOOD_SFT]
    path = write_lines(tmp_path / "sft.jsonl", lines)
    ds = SFTDataset(path, tokenizer, max_seq_len=64, skip_bad_lines=True)
    assert len(ds) == 3 and ds.bad_lines == len(bad)
    assert ds.bad_line_reasons[0].startswith(f"{path}:2: malformed JSON")
    assert ds.bad_line_reasons[1].startswith(f"{path}:4: ")
    assert [int(n) for n in ds.index.linenos] == [1, 3, len(lines)]

    pre = write_lines(tmp_path / "pre.jsonl", ['{"text": "a b c"}', "{oops", '{"text": 1}', '{"text": "d e f"}'])
    ds = PretrainDataset(pre, tokenizer, max_seq_len=2, skip_bad_lines=True)
    assert ds.bad_lines == 2 and ds.num_documents == 2
    assert ds.num_tokens == len(token_stream(tokenizer, ["a b c", "d e f"]))


@pytest.mark.parametrize("cls", [PretrainDataset, SFTDataset, DPODataset, RLPromptDataset])
def test_empty_data_set_is_an_error(tokenizer, tmp_path, cls):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no usable records"):
        cls(empty, tokenizer, 64)
    all_bad = write_lines(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="no usable records.*2 bad lines skipped"):
        cls(all_bad, tokenizer, 64, skip_bad_lines=True)


def test_iter_jsonl(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ['{"a": 1}', "", '{"a": 2}', "nope", '{"a": 3}'])
    seen = []
    assert [(n, o["a"]) for n, o in iter_jsonl(path, on_error=seen.append)] == [(1, 1), (3, 2), (5, 3)]
    assert len(seen) == 1 and str(seen[0]).startswith(f"{path}:4: malformed JSON")
    with pytest.raises(DataError, match=f"^{path}:4: "):
        list(iter_jsonl(path))


# ----------------------------------------------------------------------------------------------------- collate


def test_collate_sft_pads_right():
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])}
    b = {"input_ids": torch.tensor([8, 9, 10, 11, 12]), "labels": torch.tensor([-100, -100, 10, 11, 12])}
    out = collate_sft([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_dpo_collate_stacks_chosen_then_rejected(tokenizer, tmp_path):
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    pairs = [
        {"chosen": conv("q1", "good answer one"), "rejected": conv("q1", "bad")},
        {"chosen": conv("q2", "ok"), "rejected": conv("q2", "a much longer bad answer to pad against")},
        {"chosen": conv("q3", "fine"), "rejected": conv("q3", "no")},
    ]
    ds = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", pairs), tokenizer, max_seq_len=128)
    items = [ds[i] for i in range(3)]
    out = collate_dpo(items, pad_id=tokenizer.pad_id)
    rows = [(p["chosen"], "chosen") for p in pairs] + [(p["rejected"], "rejected") for p in pairs]
    width = max(len(expected_from_pieces(tokenizer, m)[0]) for m, _ in rows)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (6, width)
    for r, (messages, _) in enumerate(rows):
        ids, mask = expected_from_pieces(tokenizer, messages)
        n = len(ids)
        assert out["input_ids"][r].tolist() == ids + [tokenizer.pad_id] * (width - n)
        assert out["labels"][r].tolist() == labels_from(ids, mask) + [IGNORE_INDEX] * (width - n)
        assert out["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)


# ----------------------------------------------------------------------------------------------------- RL prompts


def test_rl_prompts_drop_last_assistant_and_left_pad(tokenizer, tmp_path):
    records = [
        {"conversations": CONVERSATION, "answer": "5"},
        {"conversations": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": ""}]},
        {"conversations": [{"role": "user", "content": "No answer given here."}]},
    ]
    ds = RLPromptDataset(write_jsonl(tmp_path / "rl.jsonl", records), tokenizer, max_prompt_len=512)
    items = [ds[i] for i in range(3)]
    prompts = [CONVERSATION[:4], records[1]["conversations"][:1], records[2]["conversations"]]
    for item, messages, record in zip(items, prompts, records):
        want = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in with_system(messages))
        want += "<|im_start|>assistant\n"
        assert item["prompt_text"] == want
        assert item["prompt_ids"].tolist() == tokenizer.encode(want)
        assert item["record"] == record
    assert items[0]["record"]["answer"] == "5"

    out = collate_prompts(items, pad_id=tokenizer.pad_id)
    width = max(len(i["prompt_ids"]) for i in items)
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, width)
    for b, item in enumerate(items):
        n = len(item["prompt_ids"])
        assert out["input_ids"][b].tolist() == [tokenizer.pad_id] * (width - n) + item["prompt_ids"].tolist()
        assert out["attention_mask"][b].tolist() == [0] * (width - n) + [1] * n
    assert out["record"][0]["answer"] == "5" and out["prompt_text"] == [i["prompt_text"] for i in items]


def test_rl_prompt_truncation_keeps_last_tokens(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"conversations": CONVERSATION}])
    full = RLPromptDataset(path, tokenizer, max_prompt_len=4096)[0]["prompt_ids"]
    item = RLPromptDataset(path, tokenizer, max_prompt_len=9)[0]
    assert item["prompt_ids"].tolist() == full[-9:].tolist()
    assert item["prompt_text"].endswith("<|im_start|>assistant\n")
    only_assistant = write_jsonl(tmp_path / "a.jsonl", [{"conversations": [CONVERSATION[2]]}])
    with pytest.raises(DataError, match=f"^{only_assistant}:1: .*only an assistant turn"):
        RLPromptDataset(only_assistant, tokenizer, max_prompt_len=9)


# ------------------------------------------------------------------------------------------- tool use (MiniMind's)

CALC_SPEC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
TOOL_CALLS = [
    {"name": "calculator", "arguments": {"expression": "37 + 48"}},
    {"name": "lookup", "arguments": {"name": "Sel Ovanna", "attribute": "age"}},
]
TOOL_RESULTS = ['{"result": 85}', '{"name": "Sel Ovanna", "age": "9"}']


def tool_record(tools, calls, content="Let me check.") -> dict:
    """MiniMind's tool-use SFT record: tools on the system message, the calls on an assistant message, results as
    tool messages, then the answer."""
    assistant = {"role": "assistant", "tool_calls": calls}
    if content is not ...:  # ... leaves the content out
        assistant["content"] = content
    return {
        "conversations": [
            {"role": "system", "content": "Be brief.", "tools": tools},
            {"role": "user", "content": "What is 37+48, and how old is Sel Ovanna?"},
            assistant,
            {"role": "tool", "content": TOOL_RESULTS[0]},
            {"role": "tool", "content": TOOL_RESULTS[1]},
            {"role": "assistant", "content": "85; Sel is 9."},
        ]
    }


# The rendering of tool_record, written out from the template's definition (MiniMind2's tools wording).
CALL_TEXT = (
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37 + 48"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "lookup", "arguments": {"name": "Sel Ovanna", "attribute": "age"}}\n</tool_call>'
)
SYSTEM_WITH_TOOLS = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(CALC_SPEC)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)
USER_TURN = "<|im_start|>user\nWhat is 37+48, and how old is Sel Ovanna?<|im_end|>\n"
RESULTS_TURN = (
    "<|im_start|>user\n<tool_response>\n"
    + TOOL_RESULTS[0]
    + "\n</tool_response>\n<tool_response>\n"
    + TOOL_RESULTS[1]
    + "\n</tool_response><|im_end|>\n"
)


def expected_tool_text(content="Let me check.") -> tuple[str, list[str]]:
    """(the whole rendered conversation, the text of each trained span in order)."""
    spans = [(content + "\n" if content else "") + CALL_TEXT + "<|im_end|>\n", "85; Sel is 9.<|im_end|>\n"]
    text = SYSTEM_WITH_TOOLS + USER_TURN + "<|im_start|>assistant\n" + spans[0] + RESULTS_TURN
    return text + "<|im_start|>assistant\n" + spans[1], spans


def trained_runs(tokenizer, ids, labels) -> list[str]:
    """The decoded text of every run of consecutive labelled tokens, after checking labels equal ids there."""
    runs, run = [], []
    for i, lab in zip(ids.tolist() + [None], labels.tolist() + [IGNORE_INDEX]):
        if lab == IGNORE_INDEX:
            if run:
                runs.append(tokenizer.decode(run))
            run = []
        else:
            assert lab == i
            run.append(i)
    return runs


OPENAI_CALLS = [  # the same calls as OpenAI writes them, one with its arguments as a JSON string
    {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "37 + 48"}'}},
    {"type": "function", "function": TOOL_CALLS[1]},
]


@pytest.mark.parametrize(
    "tools,calls",
    [
        (json.dumps([CALC_SPEC]), json.dumps(TOOL_CALLS)),  # MiniMind's records: both as JSON text
        ([CALC_SPEC], TOOL_CALLS),
        ([CALC_SPEC], json.dumps(OPENAI_CALLS)),
    ],
    ids=["json-text", "lists", "openai"],
)
def test_sft_tool_conversation_mask(tokenizer, tmp_path, tools, calls):
    record = tool_record(tools, calls)
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [record]), tokenizer, max_seq_len=4096)[0]
    text, spans = expected_tool_text()
    assert item["input_ids"].tolist() == tokenizer.encode(text)  # the tools block is in the system turn
    # Trained: each assistant turn's content, its tool calls and its turn end; never the tools block or the results.
    assert trained_runs(tokenizer, item["input_ids"], item["labels"]) == spans


@pytest.mark.parametrize("content", ["", None, ...], ids=["empty", "null", "missing"])
def test_sft_call_only_assistant_turn(tokenizer, tmp_path, content):
    record = tool_record(json.dumps([CALC_SPEC]), json.dumps(TOOL_CALLS), content)
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [record]), tokenizer, max_seq_len=4096)[0]
    text, spans = expected_tool_text(content="")
    assert spans[0].startswith("<tool_call>\n")
    assert item["input_ids"].tolist() == tokenizer.encode(text)
    assert trained_runs(tokenizer, item["input_ids"], item["labels"]) == spans


def test_check_sft_decodes_once_and_leaves_the_record_alone():
    record = tool_record(json.dumps([CALC_SPEC]), json.dumps(TOOL_CALLS), None)
    before = json.dumps(record)
    messages = check_sft(record, "x.jsonl:1")
    assert json.dumps(record) == before  # the record (RL rewards see it) is untouched
    assert messages[0]["tools"] == [CALC_SPEC] and conversation_tools(messages) == [CALC_SPEC]
    assert messages[2]["tool_calls"] == TOOL_CALLS and messages[2]["content"] == ""
    assert messages[1] is record["conversations"][1]  # messages without tool fields are not copied


def test_records_without_tools_are_unchanged(tokenizer, tmp_path):
    """A record in the plain format comes back as the same list, and encodes to the renderer's ids with the mask of
    its separately encoded pieces; null or empty tool fields (as exported by HF datasets) change nothing."""
    record = {"conversations": CONVERSATION}
    assert check_sft(record, "x.jsonl:1") is CONVERSATION and conversation_tools(CONVERSATION) is None
    nulls = [
        {**m, "tools": None if m["role"] != "system" else "", "tool_calls": [] if m["role"] == "assistant" else None}
        for m in CONVERSATION
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", [record, {"conversations": nulls}])
    ds = SFTDataset(path, tokenizer, max_seq_len=4096)
    ids, mask = expected_from_pieces(tokenizer, CONVERSATION)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    for item in (ds[0], ds[1]):
        assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels_from(ids, mask)


def test_tool_message_before_any_call_is_allowed(tokenizer, tmp_path):
    messages = [
        {"role": "user", "content": "q"},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "a"},
    ]
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": messages}]), tokenizer, 4096)[0]
    want = (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr\n</tool_response><|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    )
    assert item["input_ids"].tolist() == tokenizer.encode(want)
    assert trained_runs(tokenizer, item["input_ids"], item["labels"]) == ["a<|im_end|>\n"]


def _tool_line(**changes) -> str:
    record = tool_record(json.dumps([CALC_SPEC]), json.dumps(TOOL_CALLS))
    for j, fields in changes.items():
        record["conversations"][int(j[1:])].update(fields)
    return json.dumps(record)


BAD_TOOL_LINES = [
    (_tool_line(m2={"tool_calls": '[{"name": "calculator"'}), r"conversations\[2\]\.tool_calls is not valid JSON \("),
    (_tool_line(m2={"tool_calls": json.dumps({"name": "c", "arguments": {}})}), r"tool_calls must be a list of calls"),
    (_tool_line(m2={"tool_calls": '["calculator"]'}), r"tool_calls\[0\] must be an object"),
    (_tool_line(m2={"tool_calls": '[{"arguments": {}}]'}), r'conversations\[2\]\.tool_calls\[0\] has no "name"'),
    (_tool_line(m2={"tool_calls": '[{"name": "", "arguments": {}}]'}), r'tool_calls\[0\] has no "name"'),
    (_tool_line(m2={"tool_calls": '[{"name": "c"}]'}), r'tool_calls\[0\] has no "arguments"'),
    (_tool_line(m2={"tool_calls": '[{"name": "c", "arguments": 5}]'}), r"tool_calls\[0\]\.arguments must be a JSON"),
    (_tool_line(m2={"tool_calls": '[{"name": "c", "arguments": "x+1"}]'}), r"tool_calls\[0\]\.arguments is not valid"),
    (_tool_line(m2={"tool_calls": '[{"function": "c"}]'}), r"tool_calls\[0\]\.function must be an object"),
    (_tool_line(m0={"tools": "[{"}), r"conversations\[0\]\.tools is not valid JSON \("),
    (_tool_line(m0={"tools": '["calculator"]'}), r"conversations\[0\]\.tools must be a list of tool objects"),
    (_tool_line(m0={"tools": '{"name": "c"}'}), r"tools must be a list of tool objects \(JSON specs\), got dict"),
    (_tool_line(m1={"tools": [CALC_SPEC]}), r"conversations\[1\]\.tools is only allowed on a system message"),
    (_tool_line(m1={"tool_calls": TOOL_CALLS}), r"conversations\[1\]\.tool_calls is only allowed on an assistant"),
    (_tool_line(m3={"role": "function"}), r"conversations\[3\]\.role must be one of system, user, assistant, tool"),
    (_tool_line(m3={"content": None}), r"conversations\[3\]\.content must be a string, got NoneType"),
    (_tool_line(m5={"content": None}), r"conversations\[5\]\.content must be a string, got NoneType"),
]


@pytest.mark.parametrize("line,reason", BAD_TOOL_LINES)
def test_sft_bad_tool_line_names_path_and_lineno(tokenizer, tmp_path, line, reason):
    path = write_lines(tmp_path / "sft.jsonl", [GOOD_SFT, "", line])
    with pytest.raises(DataError, match=reason) as info:
        SFTDataset(path, tokenizer, max_seq_len=64)
    assert str(info.value).startswith(f"{path}:3: ") and "\n" not in str(info.value)


def test_tools_given_twice_is_an_error():
    record = tool_record([CALC_SPEC], TOOL_CALLS)
    record["conversations"].insert(2, {"role": "system", "content": "more", "tools": [CALC_SPEC]})
    with pytest.raises(DataError, match=r"^d\.jsonl:4: conversations\[2\]\.tools: tools already given in "):
        check_sft(record, "d.jsonl:4")


def test_label_probe_counts_the_tools_block(tokenizer, tmp_path):
    """The tools block lengthens what comes before the first reply: a record can lose every label to it."""
    with_tools = tool_record([CALC_SPEC], TOOL_CALLS)
    without = {"conversations": [m for m in with_tools["conversations"] if m["role"] != "system"]}
    before_reply = tokenizer.encode(SYSTEM_WITH_TOOLS + USER_TURN + "<|im_start|>assistant\n")
    path = write_jsonl(tmp_path / "sft.jsonl", [with_tools, without])
    ds = SFTDataset(path, tokenizer, max_seq_len=len(before_reply))
    assert ds.label_less == 1 and ds.label_probe.first == f"{path}:1"
    assert (ds[0]["labels"] == IGNORE_INDEX).all() and (ds[1]["labels"] != IGNORE_INDEX).any()


def test_rl_prompt_and_dpo_render_the_tools(tokenizer, tmp_path):
    record = tool_record(json.dumps([CALC_SPEC]), json.dumps(TOOL_CALLS))
    item = RLPromptDataset(write_jsonl(tmp_path / "rl.jsonl", [record]), tokenizer, max_prompt_len=4096)[0]
    text, spans = expected_tool_text()
    prompt = text[: -len(spans[1])]  # the final answer dropped; the generation prompt ends the text
    assert item["prompt_text"] == prompt and item["prompt_ids"].tolist() == tokenizer.encode(prompt)
    assert item["record"] == record

    rejected = tool_record(json.dumps([CALC_SPEC]), json.dumps(TOOL_CALLS))
    rejected["conversations"][-1]["content"] = "No idea."
    pair = {"chosen": record["conversations"], "rejected": rejected["conversations"]}
    out = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", [pair]), tokenizer, max_seq_len=4096)[0]
    assert trained_runs(tokenizer, out["chosen_input_ids"], out["chosen_labels"]) == spans
    assert trained_runs(tokenizer, out["rejected_input_ids"], out["rejected_labels"]) == [
        spans[0],
        "No idea.<|im_end|>\n",
    ]
