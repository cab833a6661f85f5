"""Tool calls and the thinking switch in tools/serve.py: a real server on a loopback port, the official `openai`
client, and a model trained here (tests/tools/conftest.py `tool_model`) to answer "What is 37 + 48?" with a
calculator call and, once the tool's result is back, with "37 + 48 = 85.". Expected values are written from the
formats' definitions (the call as MiniMind's template writes it, OpenAI's response shapes) or come from
minimind_fast.generate on the same model and the prompt the template renders.
"""

import json
import re

import httpx
import openai
import pytest
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionMessageToolCall

from minimind_fast.generate import generate
from minimind_fast.textstream import AnswerStream, split_tool_calls, tool_block_parser
from minimind_fast.tokenizer import CHAT_TEMPLATE_M3, Tokenizer
from minimind_fast.toolcall import CALCULATOR_SPEC, Toolbox, ToolCall, parse_tool_calls, tool_call_id
from tools import serve

pytestmark = pytest.mark.usefixtures("one_thread_module")

MODEL = "tool-caller"
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


@pytest.fixture(scope="module")
def server(tool_model, tokenizer, server_thread, tmp_path_factory):
    world = tmp_path_factory.mktemp("world") / "world.json"
    person = {"name": "Douvfla Gaedrendmi", "age": "27", "town": "Orvel", "profession": "potter", "colour": "teal",
              "pet": "heron"}  # fmt: skip
    world.write_text(json.dumps({"world": "Kethmar", "people": [person]}), encoding="utf-8")
    app = serve.create_app(serve.Engine(tool_model.model, tokenizer), MODEL, toolbox=Toolbox(world))
    with server_thread(app) as srv:
        yield srv.base


def client(base, key="unused"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def greedy_text(model, tokenizer, prompt_ids, max_tokens):
    out = generate(model, [prompt_ids], max_tokens, greedy=True)[0]
    return tokenizer.decode(out, skip_special_tokens=True), out


def ask(tool_model):
    return [{"role": "user", "content": tool_model.question}]


# ----------------------------------------------------------------------------------------------------------------
# The round trip


def test_tool_call_round_trip(server, tool_model, tokenizer):
    c = client(server)
    messages = ask(tool_model)
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=tool_model.specs, temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert isinstance(call, ChatCompletionMessageToolCall)
    assert call.type == "function" and call.function.name == "calculator"
    assert call.function.arguments == '{"expression": "37 + 48"}'  # json.dumps of the arguments object
    assert CALL_ID.match(call.id) and call.id == tool_call_id(0, r.id)
    prompt = tokenizer.apply_chat_template(messages, True, True, tools=tool_model.specs)
    reply = tokenizer.encode(tool_model.call_text + "<|im_end|>")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(reply))

    # The result goes back as a tool message after the assistant message as the client returned it.
    result = Toolbox().run(ToolCall(call.function.name, json.loads(call.function.arguments)))
    assert result == '{"result": 85}'
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": result}]
    r2 = c.chat.completions.create(model=MODEL, messages=messages, tools=tool_model.specs, temperature=0, max_tokens=40)
    assert r2.choices[0].message.content == "37 + 48 = 85."
    assert r2.choices[0].message.tool_calls is None and r2.choices[0].finish_reason == "stop"
    # The history was rendered as the template renders the conversation: the call as the model wrote it, the result
    # as a <tool_response> user turn.
    history = [
        {"role": "user", "content": tool_model.question},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "calculator",
                                                                             "arguments": {"expression": "37 + 48"}}}]},
        {"role": "tool", "content": '{"result": 85}'},
    ]  # fmt: skip
    rendered = tokenizer.apply_chat_template(history, True, tools=tool_model.specs)
    assert rendered.endswith(
        "<|im_start|>assistant\n" + tool_model.call_text + "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
        '{"result": 85}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )
    assert r2.usage.prompt_tokens == len(tokenizer.encode(rendered))


def test_streamed_tool_call_assembles_to_the_same_call(server, tool_model):
    c = client(server)
    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=ask(tool_model), tools=tool_model.specs, temperature=0, max_tokens=80, stream=True
        )
    )
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # the block never leaks out as content
    pieces = [tc for d in deltas for tc in d.tool_calls or []]
    # OpenAI's streamed shape: the first piece names the call (index, id, type, name, empty arguments), the next
    # carries the arguments.
    assert [p.index for p in pieces] == [0, 0]
    head, tail = pieces
    assert head.id == tool_call_id(0, chunks[0].id) and head.type == "function"
    assert (head.function.name, head.function.arguments) == ("calculator", "")
    assert tail.id is None and tail.function.name is None
    assert json.loads(tail.function.arguments) == {"expression": "37 + 48"}
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["tool_calls"]

    # The client library's own accumulator reads the stream into the message the non-streamed request returns.
    state = ChatCompletionStreamState()
    for ch in chunks:
        state.handle_chunk(ch)
    final = state.get_final_completion().choices[0]
    (call,) = final.message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == (
        tool_call_id(0, chunks[0].id),
        "calculator",
        '{"expression": "37 + 48"}',
    )
    assert final.finish_reason == "tool_calls"

    # The second turn streams its answer as content.
    messages = ask(tool_model) + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
                                                               "function": call.function.model_dump()}]},
        {"role": "tool", "tool_call_id": call.id, "content": tool_model.result},
    ]  # fmt: skip
    stream = c.chat.completions.create(
        model=MODEL, messages=messages, tools=tool_model.specs, temperature=0, max_tokens=40, stream=True
    )
    chunks = list(stream)
    text = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(text) == tool_model.answer and sum(1 for t in text if t) > 1
    assert not any(ch.choices[0].delta.tool_calls for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_choice_none_renders_no_tools(server, tool_model, tokenizer):
    messages = ask(tool_model)
    r = client(server).chat.completions.create(
        model=MODEL, messages=messages, tools=tool_model.specs, tool_choice="none", temperature=0, max_tokens=30
    )
    prompt = tokenizer.apply_chat_template(messages, True, True)  # the default system turn, no tools block
    assert r.usage.prompt_tokens == len(prompt)
    want, out = greedy_text(tool_model.model, tokenizer, prompt, 30)
    assert r.choices[0].message.content == want  # untouched text, whatever it holds
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == ("stop" if out[-1] == tokenizer.eos_id else "length")


def test_cut_off_block_is_plain_content(server, tool_model):
    """A block that never closes (here cut by a stop string, then by max_tokens) is returned as the text it is."""
    c = client(server)
    kw = dict(model=MODEL, messages=ask(tool_model), tools=tool_model.specs, temperature=0)
    r = c.chat.completions.create(**kw, max_tokens=80, stop=["37 + 48"])
    cut = tool_model.call_text[: tool_model.call_text.find("37 + 48")]
    assert cut.startswith('<tool_call>\n{"name": "calculator"')
    assert r.choices[0].message.content == cut.strip()
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(**kw, max_tokens=80, stop=["37 + 48"], stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == cut.strip()
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = c.chat.completions.create(**kw, max_tokens=6)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content and tool_model.call_text.startswith(r.choices[0].message.content)


# ----------------------------------------------------------------------------------------------------------------
# Validation: one-line OpenAI-shaped 400s naming the parameter

USER = [{"role": "user", "content": "hi"}]
FN = {"name": "f", "parameters": {"type": "object", "properties": {}}}
BAD = [
    ("tools not a list", {"tools": {"type": "function"}}, "tools"),
    ("tool without type", {"tools": [{"function": FN}]}, "tools[0].type"),
    ("tool of another type", {"tools": [{"type": "retrieval", "function": FN}]}, "tools[0].type"),
    ("function missing", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("name with a space", {"tools": [{"type": "function", "function": {**FN, "name": "a b"}}]},
     "tools[0].function.name"),
    ("name missing", {"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
    ("name twice", {"tools": [{"type": "function", "function": FN}] * 2}, "tools[1].function.name"),
    (
        "parameters an array schema",
        {"tools": [{"type": "function", "function": {**FN, "parameters": {"type": "array"}}}]},
        "tools[0].function.parameters",
    ),
    ("description a number", {"tools": [{"type": "function", "function": {**FN, "description": 3}}]},
     "tools[0].function.description"),
    ("tool_choice required", {"tool_choice": "required"}, "tool_choice"),
    ("tool_choice named", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("tool_choice unknown", {"tool_choice": "sometimes"}, "tool_choice"),
    ("legacy functions", {"functions": [FN]}, "functions"),
    ("parallel_tool_calls text", {"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("enable_thinking text", {"enable_thinking": "no"}, "enable_thinking"),
    ("chat_template_kwargs list", {"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ("unknown template kwarg", {"chat_template_kwargs": {"date": "x"}}, "chat_template_kwargs.date"),
    ("switches disagree", {"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}},
     "enable_thinking"),
    (
        "tool_call_id a number",
        {"messages": [*USER, {"role": "tool", "tool_call_id": 7, "content": "{}"}]},
        "messages[1].tool_call_id",
    ),
    (
        "call arguments not JSON",
        {"messages": [*USER, {"role": "assistant", "content": None,
                              "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "call without function",
        {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]},
        "messages[1].tool_calls[0]",
    ),
    ("null content without calls", {"messages": [*USER, {"role": "assistant", "content": None}]},
     "messages[1].content"),
]  # fmt: skip


@pytest.mark.parametrize("name,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_and_thinking_fields_are_400(server, name, extra, param):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"] and "\n" not in err["message"]
    if name.startswith("tool_choice r") or name.startswith("tool_choice n"):
        assert "not supported" in err["message"]


def test_a_valid_history_with_calls_and_tool_messages_is_accepted(server, tool_model, tokenizer):
    """arguments as OpenAI sends them (a JSON string) and as an object render the same; tool_call_id is left out."""
    base = [{"role": "user", "content": "hi"}]
    results = []
    for args in ('{"expression": "1 + 2"}', {"expression": "1 + 2"}):
        calls = [{"id": "call_x", "type": "function", "function": {"name": "calculator", "arguments": args}}]
        messages = [*base, {"role": "assistant", "content": None, "tool_calls": calls},
                    {"role": "tool", "tool_call_id": "call_x", "content": '{"result": 3}'}]  # fmt: skip
        r = httpx.post(server + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        results.append(r.json()["usage"]["prompt_tokens"])
    want = tokenizer.apply_chat_template(
        [*base, {"role": "assistant", "content": None,
                 "tool_calls": [{"function": {"name": "calculator", "arguments": {"expression": "1 + 2"}}}]},
         {"role": "tool", "content": '{"result": 3}'}],
        True,
    )  # fmt: skip
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 2"}}\n</tool_call>' in want
    assert results == [len(tokenizer.encode(want))] * 2


# ----------------------------------------------------------------------------------------------------------------
# The thinking switch


NO_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize(
    "switch",
    [{"enable_thinking": False}, {"chat_template_kwargs": {"enable_thinking": False}}, {"open_thinking": False},
     {"chat_template_kwargs": {"open_thinking": False}, "enable_thinking": False}],
)  # fmt: skip
def test_enable_thinking_false_closes_the_thought_in_the_prompt(server, tool_model, tokenizer, switch):
    messages = ask(tool_model)
    for tools in (tool_model.specs, None):
        body = {"messages": messages, **({"tools": tools} if tools else {}), **switch}
        params = serve.parse_chat_request(body, tokenizer, 1024, **serve_defaults())
        text = tokenizer.decode(params.prompt_ids)
        assert text.endswith("<|im_start|>user\nWhat is 37 + 48?<|im_end|>\n" + NO_THINK)
        assert params.prompt_ids == tokenizer.apply_chat_template(
            messages, True, True, tools=tools, enable_thinking=False
        )
        assert not params.think_opened
    default = serve.parse_chat_request({"messages": messages}, tokenizer, 1024, **serve_defaults())
    assert tokenizer.decode(default.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # End to end: the server answers from that prompt (no tools: the text comes back untouched).
    r = client(server).chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12, extra_body=switch
    )
    assert r.usage.prompt_tokens == len(params.prompt_ids)
    want, _ = greedy_text(tool_model.model, tokenizer, params.prompt_ids, 12)
    assert r.choices[0].message.content == want


def serve_defaults():
    return {"default_max_tokens": 16, "default_temperature": 0.0, "default_top_p": 1.0}


def test_open_thinking_with_minimind3_template_splits_reasoning(tokenizer):
    """MiniMind-3's template opens the thought in the generation prompt when open_thinking is true: the answer then
    has no <think> of its own, and its reasoning is split as if it had."""
    m3 = Tokenizer(tokenizer.hf, config={**tokenizer.config, "chat_template": CHAT_TEMPLATE_M3})
    body = {"messages": USER, "chat_template_kwargs": {"open_thinking": True}}
    params = serve.parse_chat_request(body, m3, 1024, **serve_defaults())
    assert m3.decode(params.prompt_ids).endswith("<|im_start|>assistant\n<think>\n")
    assert params.think_opened and params.sampling().split_reasoning is False
    closed = serve.parse_chat_request({"messages": USER, "enable_thinking": False}, m3, 1024, **serve_defaults())
    assert m3.decode(closed.prompt_ids).endswith(NO_THINK) and not closed.think_opened
    assert closed.sampling().split_reasoning is True
    stream = params.answer_stream()
    text = "Add the units.\n</think>\n\n<answer>\n85\n</answer>"
    got = [stream.push("", text[i : i + 3]) for i in range(0, len(text), 3)] + [stream.flush()]
    assert ("".join(g[0] for g in got), "".join(g[1] for g in got)) == ("Add the units.", "85")


# ----------------------------------------------------------------------------------------------------------------
# The splitter on its own

PARSE = tool_block_parser(frozenset({"calculator"}))
CALC = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 * 3"}}\n</tool_call>'
SPLITS = [
    # (answer text, content, calls as (name, arguments))
    (CALC, "", [("calculator", {"expression": "2 * 3"})]),
    ("Let me work it out.\n" + CALC + "\n", "Let me work it out.", [("calculator", {"expression": "2 * 3"})]),
    ("A " + CALC + " B\n" + CALC, "A  B", [("calculator", {"expression": "2 * 3"})] * 2),
    ("<tool_call>\n{not json}\n</tool_call> tail", "<tool_call>\n{not json}\n</tool_call> tail", []),
    ('x <tool_call>{"name": "other", "arguments": {}}</tool_call>', 'x <tool_call>{"name": "other", "arguments": {}}'
                                                                    "</tool_call>", []),
    ("  answer <tool_call>\n{\"name\": ", 'answer <tool_call>\n{"name":', []),
    ("  a <tool_ca", "a <tool_ca", []),
    ("no calls here < <tool> \n", "no calls here < <tool>", []),
]  # fmt: skip


SPLIT_IDS = ["only a call", "text then call", "two calls", "broken JSON", "function not offered", "unclosed",
             "partial tag", "no calls"]  # fmt: skip


@pytest.mark.parametrize("text,content,calls", SPLITS, ids=SPLIT_IDS)
def test_tool_call_splitter_any_chunking_equals_the_whole(text, content, calls):
    got_content, got_calls = split_tool_calls(text, PARSE)
    assert got_content == content and [(c.name, c.arguments) for c in got_calls] == calls
    if all(c.error is None and c.name == "calculator" for c in parse_tool_calls(text)[1]):
        assert parse_tool_calls(text)[0] == content  # every block a call: as toolcall reads the reply
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        sp, pieces, found, i = AnswerStream(parse=PARSE), [], [], 0
        while i < len(text):
            k = int(torch.randint(1, 6, (1,), generator=gen))
            _, c, new = sp.push("", text[i : i + k])
            pieces.append(c)
            found += new
            i += k
        _, c, new = sp.flush()
        assert "".join(pieces) + c == content
        assert [(x.name, x.arguments) for x in found + new] == calls


# ----------------------------------------------------------------------------------------------------------------
# /v1/tools: the server's own tools, for the web page


def test_tools_endpoints_list_and_run(server):
    specs = httpx.get(server + "/v1/tools").json()
    assert specs["object"] == "list" and [s["function"]["name"] for s in specs["data"]] == ["calculator", "lookup"]
    assert specs["data"][0] == CALCULATOR_SPEC

    def call(body):
        return httpx.post(server + "/v1/tools/call", json=body)

    r = call({"name": "calculator", "arguments": {"expression": "6 * 7"}})
    assert r.status_code == 200 and r.json() == {"name": "calculator", "content": '{"result": 42}'}
    r = call({"name": "calculator", "arguments": '{"expression": "1 / 8"}'})  # OpenAI's JSON-string form
    assert r.json()["content"] == '{"result": 0.125}'
    r = call({"name": "lookup", "arguments": {"name": "douvfla  gaedrendmi", "attribute": "pet"}})
    assert r.json()["content"] == '{"name": "Douvfla Gaedrendmi", "pet": "heron"}'
    r = call({"name": "weather", "arguments": {}})  # a tool's failure is a result the model reads, not an HTTP error
    assert r.status_code == 200 and "unknown tool" in json.loads(r.json()["content"])["error"]
    for body, param in (({"arguments": {}}, "name"), ({"name": "calculator", "arguments": "[1]"}, "arguments")):
        r = call(body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_tools_endpoints_404_without_tools_and_need_the_key(tool_model, tokenizer, server_thread):
    app = serve.create_app(serve.Engine(tool_model.model, tokenizer), MODEL, api_key="k")
    with server_thread(app) as srv:
        assert httpx.get(srv.base + "/v1/tools").status_code == 401
        auth = {"Authorization": "Bearer k"}
        r = httpx.get(srv.base + "/v1/tools", headers=auth)
        assert r.status_code == 404 and "--tools" in r.json()["error"]["message"]
        r = httpx.post(srv.base + "/v1/tools/call", json={"name": "calculator", "arguments": {}}, headers=auth)
        assert r.status_code == 404


def test_cli_tools_flags(tool_model, tmp_path, capsys):
    args = serve.parse_args(["--load", str(tool_model.folder), "--tools"])
    assert args.tools and args.world.endswith("data/sample/world.json")
    with pytest.raises(SystemExit) as exc:
        serve.main(["--load", str(tool_model.folder), "--tools", "--world", str(tmp_path / "none.json"), "--port", "0"])
    assert str(exc.value).startswith("error: --world ") and "cannot read the world file" in str(exc.value)
    assert "\n" not in str(exc.value)
