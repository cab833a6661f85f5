"""tools/serve.py against clients that misbehave or come from elsewhere: disconnecting non-streamed requests, bodies
too large, too deep or not text, slow senders, too many connections, huge prompts beside /health, API keys outside
argv, CORS, and the plain-text /v1/completions endpoint through the official openai client. Loopback only."""

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from minimind_fast.checkpoint import save_checkpoint
from minimind_fast.config import from_preset
from minimind_fast.engine import Engine
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind
from tests.serve_cli import cli_server
from tools import serve

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 512

pytestmark = pytest.mark.usefixtures("one_thread_module")


def random_model(preset="tiny", context=CONTEXT, **kw):
    torch.manual_seed(0)
    m = MiniMind(from_preset(preset, max_position_embeddings=context, **kw))
    m.reset_parameters(std=0.1)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return random_model(num_hidden_layers=2)


@pytest.fixture(scope="module")
def app_client(model, tokenizer):
    app = serve.create_app(Engine(model, tokenizer), "m", max_body_bytes=4096)
    with TestClient(app) as c:
        yield c


def chat_body(text, **kw):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0, **kw}


# ----------------------------------------------------------------------------------------------------------------
# Bodies that are too large, too deep, or not text: 400, never 500


def test_body_size_limit(app_client):
    r = app_client.post("/v1/chat/completions", json=chat_body("x" * 5000))
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: the limit is counted as the body arrives
        for _ in range(10):
            yield b" " * 1000

    r = app_client.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
    assert app_client.post("/v1/chat/completions", json=chat_body("fits")).status_code == 200


@pytest.mark.parametrize("depth", [33, 2000])
def test_deep_json_is_a_400(app_client, depth):
    deep = '{"messages": ' + "[" * depth + "]" * depth + "}"
    r = app_client.post("/v1/chat/completions", content=deep.encode())
    assert r.status_code == 400, r.text
    assert "nests" in r.json()["error"]["message"] or "not valid JSON" in r.json()["error"]["message"]


def test_lone_surrogates_and_bad_utf8_are_400(app_client):
    raw = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    r = app_client.post("/v1/chat/completions", content=raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    raw = b'{"messages": [{"role": "user", "content": "a' + b"\xff\xfe" + b'"}]}'
    r = app_client.post("/v1/chat/completions", content=raw)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = app_client.post("/v1/completions", content=b'{"prompt": "x", "stop": ["\\udfff"]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop[0]"
    assert app_client.get("/health").status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# CORS


def test_cors_is_off_by_default(app_client):
    pre = app_client.options(
        "/v1/chat/completions",
        headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers
    r = app_client.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_allows_only_the_chosen_origins(model, tokenizer):
    app = serve.create_app(Engine(model, tokenizer), "m", api_key="k", cors_origins=["http://ui.example"])
    with TestClient(app) as c:
        ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        ok = c.options("/v1/chat/completions", headers={"Origin": "http://ui.example", **ask})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ui.example"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        bad = c.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **ask})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
        r = c.post("/v1/chat/completions", json=chat_body("hi"),
                   headers={"Origin": "http://ui.example", "Authorization": "Bearer k"})  # fmt: skip
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"


# ----------------------------------------------------------------------------------------------------------------
# The API key outside argv


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    base = ["--load", "x"]
    monkeypatch.delenv("MINIMIND_API_KEY", raising=False)
    assert serve.resolve_api_key(serve.parse_args(base)) is None
    monkeypatch.setenv("MINIMIND_API_KEY", "from-env")
    assert serve.resolve_api_key(serve.parse_args(base)) == "from-env"
    (tmp_path / "key").write_text("from-file\nignored\n")
    assert serve.resolve_api_key(serve.parse_args([*base, "--api_key_file", str(tmp_path / "key")])) == "from-file"
    (tmp_path / "empty").write_text("\n")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(serve.ServeError, match="--api_key_file"):
            serve.resolve_api_key(serve.parse_args([*base, "--api_key_file", str(path)]))
    assert serve.resolve_api_key(serve.parse_args([*base, "--api_key", "on-argv"])) == "on-argv"
    assert "visible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.parse_args([*base, "--api_key", "a", "--api_key_file", str(tmp_path / "key")])


# ----------------------------------------------------------------------------------------------------------------
# /v1/completions


def test_completions_endpoint_through_the_openai_client(model, tokenizer, server_thread):
    prompt = "The river runs"
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    want = tokenizer.decode(generate(model, [ids], 12, greedy=True, eos_id=None)[0], skip_special_tokens=True)
    with server_thread(serve.create_app(Engine(model, tokenizer), "m")) as srv:
        c = openai.OpenAI(base_url=srv.base + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.completions.create(
            model="m", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.object == "text_completion" and r.choices[0].text == want
        assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == 12
        pieces, finish, usage = [], None, None
        kw = dict(stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for ch in c.completions.create(model="m", prompt=[prompt], max_tokens=12, temperature=0, **kw):
            if ch.choices:
                pieces.append(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
            usage = ch.usage or usage
        assert "".join(pieces) == want and finish == "length" and usage.completion_tokens == 12
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="m", prompt=["a", "b"], max_tokens=2)


# ----------------------------------------------------------------------------------------------------------------
# Real connections: disconnects, slow senders, big prompts beside /health


def test_non_streaming_disconnect_cancels_within_a_step(tokenizer, server_thread):
    slow = random_model("small", num_hidden_layers=4)  # ~10 ms a step here: a step is long next to the event loop
    engine = Engine(slow, tokenizer)
    with server_thread(serve.create_app(engine, "m")) as srv:
        body = json.dumps(chat_body("a long story", max_tokens=400, ignore_eos=True)).encode()
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        deadline = time.time() + 30
        while engine.metrics()["completion_tokens_total"] < 10 and time.time() < deadline:
            time.sleep(0.005)
        at_close = engine.metrics()["completion_tokens_total"]
        s.close()
        while engine.metrics()["requests_active"] and time.time() < deadline:
            time.sleep(0.005)
        rec = engine.metrics()["recent"][-1]
    assert rec["status"] == "cancelled"
    assert at_close >= 10 and rec["completion_tokens"] <= at_close + 3, (at_close, rec)


@pytest.mark.parametrize("messages", [100_000, 12_000], ids=["beyond-any-context", "tokenized"])
def test_slow_body_gets_408_and_health_stays_fast_beside_a_huge_prompt(tokenizer, messages, server_thread):
    # A 32k context: 12,000 short messages (~400,000 characters) are tokenized in full before they are refused,
    # 100,000 (~3.4 M characters) are longer than any 32k-token prompt and refused from their length.
    model = random_model(context=32768, num_hidden_layers=1)
    app = serve.create_app(Engine(model, tokenizer), "m", read_timeout_s=1.0, max_body_bytes=64 << 20)
    with server_thread(app) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"messages"')
        s.settimeout(10)
        t = time.time()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and 0.8 < time.time() - t < 5
        s.close()
        # Reading, parsing and tokenizing run off the event loop, so /health answers meanwhile.
        huge = json.dumps({"messages": [{"role": "user", "content": f"m{i}"} for i in range(messages)]}).encode()
        result = {}

        def post():
            result["r"] = httpx.post(srv.base + "/v1/chat/completions", content=huge, timeout=120)

        th = threading.Thread(target=post)
        th.start()
        worst = 0.0
        while th.is_alive():
            t = time.time()
            assert httpx.get(srv.base + "/health", timeout=30).status_code == 200
            worst = max(worst, time.time() - t)
            time.sleep(0.02)
        th.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert worst < 0.5, worst


def test_half_sent_headers_are_closed_and_connections_are_limited(model, tokenizer, tmp_path):
    ckpt = save_checkpoint(tmp_path / "m", model, model.config, tokenizer=tokenizer)
    with cli_server(ckpt, "--read_timeout", "1", "--max_connections", "4") as base:
        port = int(base.rsplit(":", 1)[1])
        half = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
            half.append(s)
        time.sleep(0.2)
        assert httpx.get(base + "/health").status_code == 503  # 4 connections open: the limit
        t = time.time()
        for s in half:
            s.settimeout(10)
            assert s.recv(100) == b""  # closed by the server
            s.close()
        assert time.time() - t < 5
        assert httpx.get(base + "/health").status_code == 200
