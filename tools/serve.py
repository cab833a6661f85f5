"""An OpenAI-compatible chat server (FastAPI + uvicorn) over a MiniMind checkpoint, with a web chat page at `/`.

    python tools/serve.py --load out/full_sft                         # http://127.0.0.1:8998
    python tools/serve.py --load out/full_sft --port 0                # any free port (the log line says which)
    python tools/serve.py --load out/full_sft --host 0.0.0.0 --api_key SECRET    # reachable from other machines
    options: --model_name NAME (default: the folder's name) --device auto|cpu|cuda[:i] --kernels auto|torch|triton
             --yarn --lora ADAPTER_FOLDER (merged into the weights at load) --max_batch 32 --max_batch_tokens 131072
             --max_queue 256 --default_max_tokens 512 --temperature 0.85 --top_p 0.85
             --threads N --compile

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="SECRET or anything")
    client.chat.completions.create(model="full_sft", messages=[{"role": "user", "content": "hi"}], stream=True)

Endpoints
  POST /v1/chat/completions  messages (system/user/assistant; "developer" is read as system; content a string or a
                             list of {"type": "text"} parts), temperature (0 = greedy), top_p, max_tokens (or
                             max_completion_tokens), stop (a string or up to 4), stream, stream_options.include_usage,
                             seed; extensions: top_k, repetition_penalty, ignore_eos. Streaming answers are SSE
                             `chat.completion.chunk` objects ending with `data: [DONE]`; the chunk carrying
                             finish_reason also carries `usage`. finish_reason: "stop" (eos or a stop string) or
                             "length" (max_tokens). completion_tokens counts every token generated, eos included.
  GET  /v1/models, /v1/models/{id}, /health (no key needed), /metrics (JSON counters and the last finished requests),
  GET  /                     the chat page (tools/web/chat.html).

Reasoning: when an answer starts with `<think>`, the text up to `</think>` is returned apart, as `reasoning_content`
(stripped of surrounding whitespace), and `<answer>`/`</answer>` tags are removed from the rest (MiniMind's R1-style
format; minimind_fast.textstream). Streaming holds back only what could still turn out to be a tag, so the streamed
pieces concatenate to exactly the non-streamed fields. Answers that do not start with `<think>` pass through untouched.

Scheduling: minimind_fast.engine.Engine, stepped by one worker thread (never the event loop), batches continuously:
a request that arrives while others are generating joins the running batch at the next decode step (prefilled
alone, then decoded with the others, each row at its own position), and leaves it as soon as it ends (eos, a stop
string, its max_tokens). Each request's tokens are those it would get alone (greedy, or with the same seed). A
client that disconnects, or a stream that is closed, cancels its row: it leaves before the next step.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (malformed JSON, no
messages, an unknown role, max_tokens beyond the context, a non-numeric temperature ...), 401 for a missing or wrong
API key, 404 for an unknown model or route, 503 when the queue is full. The server binds 127.0.0.1 unless told
otherwise; with --api_key (or the MINIMIND_API_KEY environment variable) every /v1 and /metrics request needs
`Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import math
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tools/serve.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import minimind_kernels as kernels  # noqa: E402
from minimind_fast.engine import Engine, QueueFull, Request, RequestError, SamplingParams  # noqa: E402
from minimind_fast.inference import LoadError, load_for_inference  # noqa: E402
from minimind_fast.textstream import ReasoningSplitter, StopMatcher, split_reasoning  # noqa: E402,F401
from minimind_fast.tokenizer import Tokenizer, TokenizerError  # noqa: E402

try:  # the web stack is an optional dependency: the module still imports (and says what to install) without it
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover
    FastAPI = Request = None

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
MAX_STOP_STRINGS = 4


# ----------------------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An error answered to the client with an OpenAI-shaped body."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ServeError(RuntimeError):
    """A start-up problem the user can fix (bad path, device, adapter, missing package): reported as one line."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# ----------------------------------------------------------------------------------------------------------------
# Request parsing: everything a request can get wrong is found here, before the model sees it.


@dataclass
class ChatParams:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop: list[str]
    stream: bool
    include_usage: bool
    seed: int | None
    ignore_eos: bool

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=tuple(self.stop),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(v)[:60]}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad_request(f"'{name}' must be in {interval}, got {v}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(v)[:60]}", name)
    if v < lo or (hi is not None and v > hi):
        raise bad_request(
            f"'{name}' must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}", name
        )
    return v


def _message_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(
        f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}",
        f"messages[{i}].content",
    )


def parse_messages(raw: Any) -> list[dict[str, str]]:
    if raw is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(
                f"messages[{i}].role must be one of system, user, assistant (developer), got {json.dumps(role)[:40]}",
                f"messages[{i}].role",
            )
        out.append({"role": role, "content": _message_text(i, m.get("content"))})
    return out


def parse_chat_request(
    body: Any,
    tokenizer: Tokenizer,
    context: int,
    *,
    default_max_tokens: int,
    default_temperature: float,
    default_top_p: float,
) -> ChatParams:
    """Validate a /v1/chat/completions body and build the prompt; raises ApiError(400) with the offending param."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = parse_messages(body.get("messages"))
    if body.get("n") not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported", "logprobs")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools / function calling are not supported", "tools")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad_request(f"'{name}' is not supported (use repetition_penalty)", name)
    temperature = _number(body, "temperature", default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", default_top_p, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0) or 0
    repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    for name in ("stream", "ignore_eos"):
        if body.get(name) is not None and not isinstance(body.get(name), bool):
            raise bad_request(f"'{name}' must be true or false", name)
    stream = bool(body.get("stream"))
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = bool((opts or {}).get("include_usage"))

    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", "stop")

    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    room = context - len(prompt_ids)
    if room < 1:
        raise bad_request(
            f"the prompt has {len(prompt_ids)} tokens and leaves no room in the model's context of {context}",
            "messages",
            "context_length_exceeded",
        )
    max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    elif max_tokens > room:
        raise bad_request(
            f"max_tokens {max_tokens} + the prompt's {len(prompt_ids)} tokens exceed the model's context of {context}",
            "max_tokens",
            "context_length_exceeded",
        )
    return ChatParams(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        seed=seed,
        ignore_eos=bool(body.get("ignore_eos")),
    )


# ----------------------------------------------------------------------------------------------------------------
# The HTTP layer.


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, model_name: str, api_key: str | None = None, defaults: dict[str, float] | None = None):
    """The FastAPI application. The engine's worker thread is started and stopped with the app's lifespan."""
    if FastAPI is None:
        raise ServeError("tools/serve.py needs fastapi and uvicorn: pip install fastapi uvicorn")
    defaults = {"default_max_tokens": 512, "default_temperature": 0.85, "default_top_p": 0.85, **(defaults or {})}
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="MiniMind", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, str(exc.detail), "invalid_request_error", None, code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(bad_request(str(exc)[:400]).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None, "internal_error")
        return JSONResponse(err.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "minimind"}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        if not WEB_PAGE.is_file():
            raise ApiError(404, f"the chat page {WEB_PAGE} is missing", code="not_found")
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "unhealthy", "model": model_name}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        check_auth(request)
        return engine.metrics()

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        check_auth(request)
        if model_id != model_name:
            raise ApiError(
                404,
                f"model {model_id!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON ({exc})") from None
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            raise ApiError(
                404,
                f"model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        try:
            params = parse_chat_request(body, engine.tokenizer, engine.context, **defaults)
        except (TokenizerError, ValueError) as exc:
            if isinstance(exc, ApiError):
                raise
            raise bad_request(str(exc), "messages") from None

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: dict[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            job = engine.submit(params.prompt_ids, params.sampling(), sink, f"chatcmpl-{uuid.uuid4().hex[:24]}")
        except QueueFull as exc:
            raise ApiError(503, str(exc), "server_error", None, "queue_full") from None
        except RequestError as exc:
            raise bad_request(str(exc), exc.param, exc.code) from None
        created = int(job.created)

        if params.stream:
            return StreamingResponse(
                _stream(job, params, queue, created),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        reasoning, content = [], []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(job)
                        return Response(status_code=499)
                    continue
                if event["type"] == "delta":
                    reasoning.append(event["reasoning"])
                    content.append(event["content"])
                elif event["type"] == "error":
                    raise ApiError(500, event["message"], "server_error", None, "generation_failed")
                else:
                    break
        finally:
            engine.cancel(job)
        message = {"role": "assistant", "content": "".join(content)}
        if reasoning and any(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        return {
            "id": job.id,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": event["finish_reason"]}],
            "usage": event["usage"],
        }

    async def _stream(job: Request, params: ChatParams, queue: asyncio.Queue, created: int):
        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            base = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": model_name}
            return _sse({**base, "choices": [choice], **extra})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await queue.get()
                if event["type"] == "delta":
                    delta = {}
                    if event["reasoning"]:
                        delta["reasoning_content"] = event["reasoning"]
                    if event["content"]:
                        delta["content"] = event["content"]
                    yield chunk(delta)
                elif event["type"] == "error":
                    err = ApiError(500, event["message"], "server_error", None, "generation_failed")
                    yield _sse(err.body())
                    break
                else:
                    yield chunk({}, event["finish_reason"], usage=event["usage"])
                    if params.include_usage:
                        base = {"id": job.id, "object": "chat.completion.chunk", "created": created}
                        yield _sse({**base, "model": model_name, "choices": [], "usage": event["usage"]})
                    break
            yield "data: [DONE]\n\n"
        finally:
            # Reached on a normal end, and also when the client goes away (the response task is cancelled).
            engine.cancel(job)

    return app


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (model.safetensors, config.json, manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8998, help="port (0 = any free port)")
    p.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"), help="require Authorization: Bearer KEY")
    p.add_argument("--model_name", default=None, help="the model id clients use (default: the folder's name)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--kernels", default="auto", help="ops spec: auto, torch, triton, liger, triton,rope=torch ...")
    p.add_argument("--yarn", action="store_true", help="YaRN rope scaling (longer contexts than trained on)")
    p.add_argument("--lora", default=None, help="a LoRA adapter folder, merged into the weights at load")
    p.add_argument("--max_batch", type=int, default=32, help="most requests decoded together")
    p.add_argument("--max_batch_tokens", type=int, default=131072, help="most KV-cache positions (rows x width)")
    p.add_argument("--max_queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--default_max_tokens", type=int, default=512, help="max_tokens when a request gives none")
    p.add_argument("--temperature", type=float, default=0.85, help="default temperature")
    p.add_argument("--top_p", type=float, default=0.85, help="default top_p")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_args(argv)
    for name in ("max_batch", "max_batch_tokens", "max_queue", "default_max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        p.error("--temperature must be in [0, 2] and --top_p in (0, 1]")
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    return args


def load_for_serving(args: argparse.Namespace) -> tuple[torch.nn.Module, Tokenizer]:
    """The model in eval mode on its device (YaRN and a merged LoRA adapter as asked) and its tokenizer."""
    try:
        model, tokenizer = load_for_inference(
            args.load, lora=args.lora, device=args.device, kernels_spec=args.kernels, yarn=args.yarn
        )
    except LoadError as exc:
        raise ServeError(str(exc)) from None
    print(kernels.describe(model.ops), file=sys.stderr)
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        uvicorn = None
    if uvicorn is None or FastAPI is None:
        raise SystemExit("error: tools/serve.py needs fastapi and uvicorn: pip install fastapi uvicorn")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_for_serving(args)
    except ServeError as exc:
        raise SystemExit(f"error: {exc}") from None
    name = args.model_name or Path(args.load).resolve().name
    engine = Engine(
        model,
        tokenizer,
        max_batch=args.max_batch,
        max_batch_tokens=args.max_batch_tokens,
        max_queue=args.max_queue,
        compile_decode=args.compile,
    )
    defaults = dict(
        default_max_tokens=args.default_max_tokens, default_temperature=args.temperature, default_top_p=args.top_p
    )
    app = create_app(engine, name, api_key=args.api_key, defaults=defaults)
    try:
        sock = socket.create_server(
            (args.host, args.port), family=socket.AF_INET6 if ":" in args.host else socket.AF_INET
        )
    except OSError as exc:
        raise SystemExit(f"error: cannot bind {args.host}:{args.port} ({exc})") from None
    port = sock.getsockname()[1]
    print(
        f"serving {name} ({model.num_params() / 1e6:.1f}M parameters) on http://{args.host}:{port} "
        f"(api key {'required' if args.api_key else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
