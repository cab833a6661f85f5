"""tools/serve.py end to end: a real server on a free loopback port, real clients (the official `openai` package and
raw HTTP), answers checked against minimind_fast.generate run here on the same checkpoint.

Two servers: the CLI in a subprocess (no API key) over a random tiny model, and create_app in a thread (API key
required) over a tiny model trained here for a second to answer one question in the <think>/<answer> format, which
is what the reasoning_content split needs to see.
"""

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from minimind_fast.checkpoint import load_model, save_checkpoint
from minimind_fast.config import MiniMindConfig, from_preset
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind
from tests.serve_cli import cli_server
from tests.teach import teach
from tools import serve

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 1024
MODEL_NAME = "tiny-random"


pytestmark = pytest.mark.usefixtures("one_thread_module")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: checkpoints, servers, the reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = from_preset("tiny", num_hidden_layers=2, max_position_embeddings=CONTEXT)
    model = MiniMind(cfg)
    model.reset_parameters(std=0.1)  # a context-dependent random model: answers differ between prompts
    return save_checkpoint(tmp_path_factory.mktemp("serve") / MODEL_NAME, model, cfg, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, _, _ = load_model(checkpoint)
    return model.eval()


@pytest.fixture(scope="module")
def server(checkpoint):
    """`python tools/serve.py` on port 0; the port comes from its start-up line."""
    with cli_server(checkpoint) as base:
        yield base


REASON_QUESTION = "Is the sky blue?"
REASON_THOUGHT = "Light scatters; blue scatters most."
REASON_ANSWER = "Yes, it is blue."


def train_reasoner(tokenizer) -> MiniMind:
    """A one-layer model trained until its greedy answer to REASON_QUESTION is the R1-style text, eos included."""
    torch.manual_seed(0)
    cfg = MiniMindConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256
    )
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": REASON_QUESTION}], True, tokenize=True)
    text = f"<think>\n{REASON_THOUGHT}\n</think>\n<answer>\n{REASON_ANSWER}\n</answer><|im_end|>"
    return teach(MiniMind(cfg), prompt, tokenizer.encode(text))


API_KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed_server(tokenizer, server_thread):
    model = train_reasoner(tokenizer)
    engine = serve.Engine(model, tokenizer)
    app = serve.create_app(engine, "reasoner", api_key=API_KEY)
    with server_thread(app) as srv:
        yield srv.base


def prompt_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def expected(reference, tokenizer, messages, max_tokens, **kw):
    """(text, finish_reason, completion_tokens, prompt_tokens) from generate() on the same checkpoint."""
    ids = prompt_ids(tokenizer, messages)
    out = generate(reference, [ids], max_tokens, **kw)[0]
    finish = "stop" if out and out[-1] == tokenizer.eos_id else "length"
    return tokenizer.decode(out, skip_special_tokens=True), finish, len(out), len(ids)


def client(base, key="unused"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------------------------------------------
# The OpenAI client


def test_health_and_models(server):
    assert httpx.get(server + "/health").json() == {"status": "ok", "model": MODEL_NAME}
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert httpx.get(server + f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
    page = httpx.get(server + "/")
    assert (
        page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/chat/completions" in page.text
    )


def test_non_streaming_greedy_answer_is_generate(server, reference, tokenizer):
    messages = [{"role": "system", "content": "You are helpful."}, *user("What is a tide?")]
    r = client(server).chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=20)
    text, finish, n_out, n_prompt = expected(reference, tokenizer, messages, 20, greedy=True)
    assert text.strip()
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    assert r.object == "chat.completion" and r.model == MODEL_NAME and r.id.startswith("chatcmpl-")
    assert abs(r.created - time.time()) < 120
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_out)
    assert r.usage.total_tokens == n_prompt + n_out


def test_streaming_pieces_concatenate_to_the_answer(server, reference, tokenizer):
    messages = user("Tell me about the moon.")
    stream = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text, finish, n_out, n_prompt = expected(reference, tokenizer, messages, 24, greedy=True)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) > 3  # really streamed, not one block
    assert "".join(pieces) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_out
    assert chunks[-1].usage.prompt_tokens == n_prompt


def test_sampling_with_seed_is_generate_with_that_seed(server, reference, tokenizer):
    messages = user("Sample something")
    kw = dict(model=MODEL_NAME, messages=messages, temperature=0.9, top_p=0.8, max_tokens=16, seed=1234)
    a = client(server).chat.completions.create(**kw)
    b = client(server).chat.completions.create(**kw)
    text, *_ = expected(reference, tokenizer, messages, 16, temperature=0.9, top_p=0.8, seed=1234)
    greedy, *_ = expected(reference, tokenizer, messages, 16, greedy=True)
    assert a.choices[0].message.content == b.choices[0].message.content == text
    assert text != greedy  # the sampling settings reached the model


def test_stop_string_cuts_the_answer(server, reference, tokenizer):
    messages = user("Count with me")
    full, *_ = expected(reference, tokenizer, messages, 30, greedy=True)
    stop = full[6:9]
    want = full[: full.find(stop)]
    c = client(server)
    r = c.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=30, stop=[stop, "@@"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(
        c.chat.completions.create(
            model=MODEL_NAME, messages=messages, temperature=0, max_tokens=30, stop=stop, stream=True
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(server, reference, tokenizer):
    messages = user("Go on and on")
    r = client(server).chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=7, extra_body={"ignore_eos": True}
    )
    want = tokenizer.decode(
        generate(reference, [prompt_ids(tokenizer, messages)], 7, greedy=True, eos_id=None)[0], skip_special_tokens=True
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    assert r.choices[0].message.content == want


# ----------------------------------------------------------------------------------------------------------------
# Bad requests: raw HTTP, every one a 4xx with an OpenAI error body


def _long_prompt():
    return "word " * (CONTEXT + 50)


BAD = [
    ("malformed json", b'{"messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("missing messages", {"model": MODEL_NAME}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("message not an object", {"messages": ["hi"]}, 400, "messages[0]"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    (
        "max_tokens beyond context",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT},
        400,
        "max_tokens",
    ),
    ("prompt beyond context", {"messages": [{"role": "user", "content": _long_prompt()}]}, 400, "messages"),
    ("max_tokens zero", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens text", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400, "max_tokens"),
    ("temperature text", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("temperature bool", {"messages": [{"role": "user", "content": "hi"}], "temperature": True}, 400, "temperature"),
    ("temperature too high", {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
    ("top_p zero", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("five stops", {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400, "stop"),
    ("empty stop", {"messages": [{"role": "user", "content": "hi"}], "stop": ""}, 400, "stop"),
    ("n=2", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("stream not bool", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_an_openai_error(server, name, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if name.endswith("beyond context"):
        assert err["code"] == "context_length_exceeded"


def test_unknown_routes_and_methods_and_server_survives(server):
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert httpx.get(server + "/health").status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Concurrency and cancellation


def test_concurrent_streams_each_equal_their_own_answer(server, reference, tokenizer):
    prompts = [f"Question number {i}: what is {i * 7} plus {i}?" for i in range(18)]
    sizes = [8 + (i % 5) * 4 for i in range(18)]
    before = httpx.get(server + "/metrics").json()

    async def one(c, prompt, n):
        stream = await c.chat.completions.create(
            model=MODEL_NAME, messages=user(prompt), temperature=0, max_tokens=n, stream=True
        )
        pieces, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    async def all_streams():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p, n) for p, n in zip(prompts, sizes)))

    streamed = asyncio.run(all_streams())
    after = httpx.get(server + "/metrics").json()
    assert after["largest_batch"] > 1  # requests were batched together
    assert after["requests_finished"] - before["requests_finished"] == len(prompts)
    c = client(server)
    for (text, finish), prompt, n in zip(streamed, prompts, sizes):
        alone = c.chat.completions.create(model=MODEL_NAME, messages=user(prompt), temperature=0, max_tokens=n)
        want, want_finish, _, _ = expected(reference, tokenizer, user(prompt), n, greedy=True)
        assert text == alone.choices[0].message.content == want
        assert finish == alone.choices[0].finish_reason == want_finish


def test_disconnect_mid_stream_stops_the_generation(server):
    max_tokens = CONTEXT - 64
    body = {
        "messages": user("A very long story"),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server + "/v1/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk_id = json.loads(line[6:])["id"]
                    seen += 1
                if seen == 4:
                    break  # leaving the block closes the connection
    deadline = time.time() + 10
    while time.time() < deadline:
        m = httpx.get(server + "/metrics").json()
        rec = [x for x in m["recent"] if x["id"] == chunk_id]
        if rec and m["requests_active"] == 0:
            break
        time.sleep(0.05)
    assert rec, "the request never ended"
    assert rec[0]["status"] == "cancelled"
    assert 3 <= rec[0]["completion_tokens"] < max_tokens // 2
    assert m["requests_cancelled"] >= 1
    assert httpx.get(server + "/health").status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# API key and reasoning_content (the in-process server)


def test_api_key_is_required(keyed_server):
    body = {"messages": user(REASON_QUESTION), "max_tokens": 4}
    r = httpx.post(keyed_server + "/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(keyed_server + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(keyed_server + "/v1/models").status_code == 401
    assert httpx.get(keyed_server + "/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, "wrong").chat.completions.create(model="reasoner", messages=user("x"), max_tokens=2)
    assert httpx.get(keyed_server + "/health").status_code == 200  # health checks need no key
    r = httpx.post(keyed_server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_reasoning_content_is_split_out(keyed_server):
    c = client(keyed_server, API_KEY)
    r = c.chat.completions.create(model="reasoner", messages=user(REASON_QUESTION), temperature=0, max_tokens=60)
    msg = r.choices[0].message
    assert msg.content == REASON_ANSWER
    assert msg.model_extra["reasoning_content"] == REASON_THOUGHT
    assert r.choices[0].finish_reason == "stop"
    chunks = list(
        c.chat.completions.create(
            model="reasoner", messages=user(REASON_QUESTION), temperature=0, max_tokens=60, stream=True
        )
    )
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    thought = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    answer = "".join(d.content or "" for d in deltas)
    assert (thought, answer) == (REASON_THOUGHT, REASON_ANSWER)
    # The thinking arrives before the answer, in more than one piece.
    kinds = [
        ("r" if (d.model_extra or {}).get("reasoning_content") else "c")
        for d in deltas
        if d.content or (d.model_extra or {}).get("reasoning_content")
    ]
    assert kinds.count("r") > 1 and "r" not in kinds[kinds.index("c") :]


# ----------------------------------------------------------------------------------------------------------------
# The text machinery on its own


@pytest.mark.parametrize(
    "text,reasoning,content",
    [
        ("<think>\na < b\n</think>\n<answer>\nyes <b>\n</answer>", "a < b", "yes <b>"),
        ("  <think>x</think>y", "x", "y"),
        ("<think>never closed\n", "never closed", ""),
        ("plain <think> later", None, "plain <think> later"),
        ("<thi", None, "<thi"),
        ("<answer>kept when no think</answer>", None, "<answer>kept when no think</answer>"),
    ],
)
def test_reasoning_splitter_any_chunking_equals_the_whole(text, reasoning, content):
    assert serve.split_reasoning(text) == (reasoning, content)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        sp, r, c, i = serve.ReasoningSplitter(), "", "", 0
        while i < len(text):
            k = int(torch.randint(1, 5, (1,), generator=gen))
            dr, dc = sp.push(text[i : i + k])
            r, c, i = r + dr, c + dc, i + k
        dr, dc = sp.flush()
        assert (r + dr if reasoning is not None else None, c + dc) == (reasoning, content)


def test_stop_matcher_holds_back_partial_stops():
    m = serve.StopMatcher(["END", "xy"])
    assert m.push("abc E") == ("abc ", False)  # "E" may start "END"
    assert m.push("N") == ("", False)
    assert m.push("D tail") == ("", True)
    m = serve.StopMatcher(["END"])
    assert m.push("aEN") == ("a", False)
    assert m.push("x") == ("ENx", False)
    assert m.flush() == ""


def test_lora_adapter_is_merged_at_load(checkpoint, reference, tmp_path):
    from minimind_fast import lora

    model, _, _ = load_model(checkpoint)
    lora.apply_lora(model, rank=4)
    with torch.no_grad():  # B starts at zero; a non-zero B makes the adapter change the model
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    lora.save_adapter(tmp_path / "adapter", model)
    args = serve.parse_args(
        ["--load", str(checkpoint), "--lora", str(tmp_path / "adapter"), "--device", "cpu", "--kernels", "torch"]
    )
    served, _ = serve.load_for_serving(args)
    assert not lora.lora_layers(served) and not served.training
    ids = torch.randint(0, 6400, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, base = served(ids).logits, model.eval()(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert (got - base).abs().max() > 1e-2
    with pytest.raises(serve.ServeError):
        serve.load_for_serving(
            serve.parse_args(
                ["--load", str(checkpoint), "--lora", str(tmp_path / "none"), "--device", "cpu", "--kernels", "torch"]
            )
        )
