"""An OpenAI-compatible chat server (FastAPI + uvicorn) over a MiniMind checkpoint, with a web chat page at `/`.

    python tools/serve.py --load out/full_sft                         # http://127.0.0.1:8998
    python tools/serve.py --load out/full_sft --port 0                # any free port (the log line says which)
    python tools/serve.py --load out/agent --tools                    # + the project's tools at /v1/tools
    python tools/serve.py --load out/full_sft --allow_weight_reload   # RL rollouts: POST /v1/load_weights
    MINIMIND_API_KEY=SECRET python tools/serve.py --load out/full_sft --host 0.0.0.0   # reachable from elsewhere
    options: --model_name NAME (default: the folder's name) --device auto|cpu|cuda[:i] --kernels auto|torch|triton
             --yarn --lora ADAPTER_FOLDER (merged into the weights at load) --max_batch 32 --max_batch_tokens 131072
             --max_queue 256 --default_max_tokens 512 --temperature 0.85 --top_p 0.85 --threads N --compile
             --api_key_file PATH (or --api_key KEY, visible in the process list) --cors_origins URL,URL
             --max_body_bytes 1048576 --read_timeout 30 --max_connections 256
             --tools --world data/sample/world.json (what the lookup tool reads; "" = the calculator only)
             --allow_weight_reload (off by default; on a non-loopback --host it needs an API key)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="SECRET or anything")
    client.chat.completions.create(model="full_sft", messages=[{"role": "user", "content": "hi"}], stream=True)
    client.chat.completions.create(model="agent", messages=..., tools=[{"type": "function", "function": {...}}])

Endpoints
  POST /v1/chat/completions  messages (system/user/assistant/tool; "developer" is read as system; content a string or
                             a list of {"type": "text"} parts; an assistant message may carry OpenAI `tool_calls`,
                             its content then may be null; a tool message's tool_call_id is accepted and not
                             rendered: MiniMind's template pairs results with calls by order), temperature (0 =
                             greedy), top_p, max_tokens (or max_completion_tokens), stop (a string or up to 4),
                             stream, stream_options.include_usage, seed; tools (OpenAI function specs, at most 128),
                             tool_choice ("auto", the default, or "none": no tools rendered, the answer not searched
                             for calls; "required" and a named function are refused with a 400, since nothing here
                             can force a call), parallel_tool_calls (false: at most the first call is returned);
                             the thinking switch: enable_thinking (top level, or in chat_template_kwargs as vLLM
                             takes it) or MiniMind's open_thinking, passed to the chat template; extensions: top_k,
                             repetition_penalty, ignore_eos. Streaming answers are SSE `chat.completion.chunk`
                             objects ending with `data: [DONE]`; the chunk carrying finish_reason also carries
                             `usage`. finish_reason: "stop" (eos or a stop string), "length" (max_tokens) or
                             "tool_calls" (an answer that ended by itself holding calls). completion_tokens counts
                             every token generated, eos included.
  POST /v1/completions       prompt: a string (or a list holding one), continued as plain text after bos, no
                             template; or token ids (a list of integers, or a list holding one such list, as OpenAI's
                             API allows), run exactly as given (no bos added): an id outside the model's vocabulary,
                             a non-integer or an empty list is a 400 (param "prompt"); one prompt per request (a list
                             of several is a 400: send them as concurrent requests, which are batched together). The
                             same sampling fields; `text_completion` objects, streamed or not.
                             Both completion routes take `return_token_ids` (vLLM's extension): the choice then
                             carries "token_ids", the ids exactly as sampled (ending with eos when the model ended the
                             answer; through the token that completed a stop string when one cut it), and
                             "prompt_token_ids"; streamed, the chunk with finish_reason carries all of "token_ids".
  POST /v1/load_weights      with --allow_weight_reload (404 without it; the API key when one is set): {"path": a
                             checkpoint folder of the served architecture, as the server's file system sees it} ->
                             {"loaded": path, "version": N (1, 2, ... per load; 0 = the --load weights), "sha256": of
                             its model.safetensors}. See "Weight reload" below.
  GET  /v1/tools             with --tools: {"object": "list", "data": [the tools' specs]} (404 without --tools).
  POST /v1/tools/call        with --tools: {"name", "arguments": an object or a JSON string} runs one call
                             (minimind_fast.toolcall.Toolbox) -> {"name", "content": the result text for the tool
                             message}; a tool's own failure is an {"error": ...} result, not an HTTP error.
  GET  /v1/models, /v1/models/{id} (each card carries max_model_len, the context, as vLLM's do), /health (no key
                             needed), /metrics (JSON counters and the last finished requests),
  GET  /                     the chat page (tools/web/chat.html; its "use tools" switch drives the two routes above).

Reasoning: when an answer starts with `<think>`, the text up to `</think>` is returned apart, as `reasoning_content`
(stripped of surrounding whitespace), and `<answer>`/`</answer>` tags are removed from the rest (MiniMind's R1-style
format; minimind_fast.textstream). When the template's generation prompt itself opens the thought (MiniMind-3's with
open_thinking), the answer is read as if it began with `<think>`. Streaming holds back only what could still turn
out to be a tag, so the streamed pieces concatenate to exactly the non-streamed fields. Answers that do not start
with `<think>` pass through untouched.

Tool calls (when tools are offered): each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block of the
answer (MiniMind's format) that names an offered function with an arguments object becomes an entry of the message's
`tool_calls` ({"id": "call_...", "type": "function", "function": {"name", "arguments": a JSON string}}); the content
is the rest of the text, stripped of surrounding whitespace (null when empty and there are calls). A block that is
not such a call (broken JSON, no name, a function not offered, no `</tool_call>` before the answer ends) is left in
the content as the text it is. Streaming sends the text before a block as content at once and holds the block until
it closes; each call then arrives as OpenAI streams one: a tool_calls delta with its index, id, type, name and empty
arguments, then one with the arguments. The streamed pieces assemble to the non-streamed message.

Scheduling: minimind_fast.engine.Engine, stepped by one worker thread (never the event loop), batches continuously:
a request that arrives while others are generating joins the running batch at the next decode step (prefilled
alone, then decoded with the others, each row at its own position), and leaves it as soon as it ends (eos, a stop
string, its max_tokens). Each request's tokens are those it would get alone (greedy, or with the same seed). A
client that disconnects, streaming or not, or a stream that is closed, cancels its row: it leaves before the next
step. Reading, parsing and tokenizing a request run off the event loop (a huge prompt does not stall /health).

Weight reload (for RL rollouts through minimind_fast.backend.HTTPBackend, whose sync_weights writes the policy with
the project's checkpoint writer and posts its folder here): the folder is verified against its manifest (hashes,
finite weights), its config must match the served one (training-only fields and the --yarn switch aside), and its
tensor names and shapes the served model's; any of these failing is a 400 with the loader's one-line message, and
the old weights stay. Then the swap: new requests wait at a gate, what is queued or running finishes on the old
weights (the engine drains), the tensors are copied in place while the engine is idle, and the gate opens. So every
request runs wholly on one set of weights: those that arrived before the load on the old ones, the rest on the new;
none fails because of it. Loads are serialised. The weights live only in memory: a restart serves --load again.

Limits: a body over --max_body_bytes, nested deeper than 32 levels, not UTF-8 or holding lone surrogates is a 400;
a body that does not arrive within --read_timeout seconds is a 408, and a connection whose request headers do not
arrive within it is closed; beyond --max_connections open connections new requests get 503. CORS is off (no
browser page from another origin may call the API) unless --cors_origins names the origins allowed.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (malformed JSON, no
messages, an unknown role, max_tokens beyond the context, a non-numeric temperature ...), 401 for a missing or wrong
API key, 404 for an unknown model or route, 503 when the queue is full. The server binds 127.0.0.1 unless told
otherwise; with a key (--api_key_file, the MINIMIND_API_KEY environment variable, or --api_key) every /v1 and
/metrics request needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import math
import os
import re
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
from minimind_fast.checkpoint import (  # noqa: E402
    MODEL_FILE,
    CheckpointError,
    load_config,
    load_model_state,
    verify_checkpoint,
)
from minimind_fast.config import ConfigError  # noqa: E402
from minimind_fast.engine import Engine, QueueFull, RequestError, SamplingParams  # noqa: E402
from minimind_fast.engine import Request as Job  # noqa: E402
from minimind_fast.inference import LoadError, load_for_inference, one_line  # noqa: E402
from minimind_fast.textstream import (  # noqa: E402,F401
    AnswerStream,
    ReasoningSplitter,
    StopMatcher,
    opens_thought,
    split_reasoning,
    tool_block_parser,
)
from minimind_fast.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from minimind_fast.toolcall import Toolbox, ToolCall, WorldError, tool_call_id  # noqa: E402

try:  # the web stack is an optional dependency: the module still imports (and says what to install) without it
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover
    FastAPI = Request = None

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
MAX_STOP_STRINGS = 4
MAX_TOOLS = 128  # OpenAI's limit on the tools of one request
DEFAULT_WORLD = Path(__file__).resolve().parents[1] / "data" / "sample" / "world.json"


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
    tool_names: frozenset[str] = frozenset()  # the functions offered (and rendered); empty: no tool-call parsing
    parallel_tool_calls: bool = True  # False: at most one call per answer (the first)
    think_opened: bool = False  # the generation prompt ends inside an opened thought (split here, not in the engine)
    return_token_ids: bool = False  # the choice carries the sampled ids ("token_ids") and the prompt's

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
            split_reasoning=not self.think_opened,
        )

    def answer_stream(self) -> AnswerStream:
        """The splitter that turns the engine's deltas into what this request answers."""
        return AnswerStream(self.think_opened, tool_block_parser(self.tool_names) if self.tool_names else None)


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


def _history_call(i: int, k: int, call: Any) -> dict[str, Any]:
    """An assistant message's tool_calls[k] (OpenAI's shape) as the chat template takes it: arguments decoded to the
    object, which the template writes back as JSON the way the model writes it (json.dumps, ensure_ascii=False)."""
    where = f"messages[{i}].tool_calls[{k}]"
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise bad_request(f'{where} must be an object {{"type": "function", "function": {{name, arguments}}}}', where)
    if call.get("type", "function") != "function":
        raise bad_request(f'{where}.type must be "function", got {json.dumps(call.get("type"))[:40]}', f"{where}.type")
    if call.get("id") is not None and not isinstance(call.get("id"), str):
        raise bad_request(f"{where}.id must be a string", f"{where}.id")
    fn = call["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
    args = arguments_object(fn.get("arguments"))
    if args is None:
        raise bad_request(
            f"{where}.function.arguments must be a JSON object or a string holding one", f"{where}.function.arguments"
        )
    return {"type": "function", "function": {"name": name, "arguments": args}}


def arguments_object(args: Any) -> dict | None:
    """A tool call's arguments as an object: given as one, or as a JSON string holding one; None otherwise."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return args if isinstance(args, dict) else None


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: system/user/assistant/tool ("developer" read as system), text
    content, an assistant's tool_calls (its content may then be null), a tool message's tool_call_id accepted and
    left out (MiniMind's template matches results to calls by their order)."""
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
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(
                f"messages[{i}].role must be one of system, user, assistant, tool (developer), got "
                f"{json.dumps(role)[:40]}",
                f"messages[{i}].role",
            )
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise bad_request(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
        if role == "tool" and m.get("tool_call_id") is not None and not isinstance(m.get("tool_call_id"), str):
            raise bad_request(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
        content = m.get("content")
        text = "" if calls and content is None else _message_text(i, content)
        message: dict[str, Any] = {"role": role, "content": text}
        if calls:
            message["tool_calls"] = [_history_call(i, k, c) for k, c in enumerate(calls)]
        out.append(message)
    return out


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_tools(body: dict) -> tuple[list[dict] | None, bool]:
    """(the tools to render, or None when none are offered; parallel_tool_calls). tool_choice "auto" (the default)
    offers them; "none" renders none (the model is not told of them, and its answer is not searched for calls).
    "required" and a named function would need decoding that forces a call: refused rather than pretended."""
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise bad_request(f"'{name}' (the deprecated form) is not supported; send 'tools' and 'tool_choice'", name)
    tools = body.get("tools")
    tools = [] if tools is None else tools
    if not isinstance(tools, list):
        raise bad_request('\'tools\' must be a list of {"type": "function", "function": {...}} objects', "tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' holds {len(tools)} tools; at most {MAX_TOOLS} are accepted", "tools")
    seen: set[str] = set()
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f'{where} must be an object with "type": "function"', f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            what = "an object {name, description, parameters}"
            raise bad_request(f"{where}.function must be {what}", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise bad_request(
                f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {json.dumps(name)[:60]}",
                f"{where}.function.name",
            )
        if name in seen:
            raise bad_request(f"{where}.function.name {name!r} is offered twice", f"{where}.function.name")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn.get("description"), str):
            raise bad_request(f"{where}.function.description must be a string", f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise bad_request(
                f'{where}.function.parameters must be a JSON schema of "type": "object"', f"{where}.function.parameters"
            )
        if fn.get("strict") is not None and not isinstance(fn.get("strict"), bool):
            raise bad_request(f"{where}.function.strict must be true or false", f"{where}.function.strict")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    choice = body.get("tool_choice")
    if choice in (None, "auto"):
        return (tools or None), parallel is not False
    if choice == "none":
        return None, parallel is not False
    if choice == "required" or isinstance(choice, dict):
        shown = json.dumps(choice)[:80]
        raise bad_request(
            f'\'tool_choice\' {shown} is not supported: this server cannot force a call; use "auto" or "none"',
            "tool_choice",
        )
    raise bad_request(f'\'tool_choice\' must be "auto" or "none", got {json.dumps(choice)[:60]}', "tool_choice")


THINKING_KWARGS = ("enable_thinking", "open_thinking")


def parse_thinking(body: dict) -> bool | None:
    """The thinking switch: `enable_thinking` (top level, or in `chat_template_kwargs` as vLLM takes it) or MiniMind's
    `open_thinking` (either place). None when not given (the template's default); the places must agree."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    for key in kwargs:
        if key not in THINKING_KWARGS:
            raise bad_request(
                f"'chat_template_kwargs.{key}' is not supported (only {' and '.join(THINKING_KWARGS)})",
                f"chat_template_kwargs.{key}",
            )
    found: dict[str, bool] = {}
    for prefix, source in (("", body), ("chat_template_kwargs.", kwargs)):
        for name in THINKING_KWARGS:
            value = source.get(name)
            if value is None:
                continue
            if not isinstance(value, bool):
                raise bad_request(f"'{prefix}{name}' must be true or false", prefix + name)
            found[prefix + name] = value
    if len(set(found.values())) > 1:
        given = ", ".join(f"{k}={str(v).lower()}" for k, v in found.items())
        raise bad_request(f"the thinking switches disagree ({given})", next(iter(found)))
    return next(iter(found.values()), None)


def openai_tool_call(call: ToolCall, index: int, seed: str) -> dict[str, Any]:
    """A parsed call in OpenAI's message shape; arguments as a JSON string."""
    args = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": tool_call_id(index, seed), "type": "function", "function": {"name": call.name, "arguments": args}}


MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')


def read_json(raw: bytes) -> Any:
    """The body as JSON, or a 400: not UTF-8, not JSON, nested deeper than MAX_JSON_DEPTH, or holding text that is
    not valid Unicode (a lone surrogate escape such as "\\ud800")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 ({exc})") from None
    depth = deepest = 0
    for m in re.finditer(r"[\[\]{}]", _JSON_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise bad_request(f"the request body nests {deepest} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})") from None
    _check_text(body, "")
    return body


def _check_text(v: Any, where: str) -> None:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"{where or 'a string'} is not valid Unicode text (a lone surrogate)", where) from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_text(k, where)
            _check_text(x, f"{where}.{k}" if where else str(k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_text(x, f"{where}[{i}]")


def parse_sampling(
    body: dict,
    prompt_ids: list[int],
    context: int,
    *,
    default_max_tokens: int,
    default_temperature: float,
    default_top_p: float,
    prompt_param: str = "messages",
) -> ChatParams:
    """The sampling, length and streaming fields shared by /v1/chat/completions and /v1/completions."""
    if body.get("n") not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad_request(f"'{name}' is not supported (use repetition_penalty)", name)
    temperature = _number(body, "temperature", default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", default_top_p, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0) or 0
    repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    for name in ("stream", "ignore_eos", "return_token_ids"):
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

    room = context - len(prompt_ids)
    if room < 1:
        raise bad_request(
            f"the prompt has {len(prompt_ids)} tokens and leaves no room in the model's context of {context}",
            prompt_param,
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
        return_token_ids=bool(body.get("return_token_ids")),
    )


def parse_chat_request(body: Any, tokenizer: Tokenizer, context: int, **defaults: float) -> ChatParams:
    """Validate a /v1/chat/completions body and build the prompt; raises ApiError(400) with the offending param."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = parse_messages(body.get("messages"))
    tools, parallel = parse_tools(body)
    thinking = parse_thinking(body)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools, enable_thinking=thinking)
    params = parse_sampling(body, encode_prompt(tokenizer, text, context, "messages"), context, **defaults)
    names = frozenset(t["function"]["name"] for t in tools or [])
    return dataclasses.replace(params, tool_names=names, parallel_tool_calls=parallel, think_opened=opens_thought(text))


def parse_completion_request(
    body: Any, tokenizer: Tokenizer, context: int, vocab_size: int | None = None, **defaults: float
) -> ChatParams:
    """Validate a /v1/completions body. `prompt` is either text (a string, or a list holding one), continued as plain
    text after bos, the way a pretrained model reads text; or token ids (a list of integers, or a list holding one
    such list), run exactly as given: no bos added, nothing re-tokenized. No chat template, no reasoning split.
    vocab_size bounds the ids (default: the tokenizer's; the server passes the model's)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        raise bad_request(
            f"'prompt' holds {len(prompt)} token-id lists; this server takes one prompt per request (send several "
            "requests at once: they are batched together)",
            "prompt",
        )
    for name in ("echo", "suffix", "best_of"):
        if body.get(name) not in (None, False, 1):
            raise bad_request(f"'{name}' is not supported", name)
    if isinstance(prompt, list):
        prompt_ids = token_id_prompt(prompt, tokenizer.vocab_size if vocab_size is None else vocab_size)
    elif isinstance(prompt, str):
        prompt_ids = [tokenizer.bos_id] + encode_prompt(tokenizer, prompt, context, "prompt")
    else:
        raise bad_request("'prompt' must be a string or a list of token ids (or a list holding one of them)", "prompt")
    return parse_sampling(body, prompt_ids, context, prompt_param="prompt", **defaults)


def token_id_prompt(ids: list, vocab_size: int) -> list[int]:
    """A prompt given as token ids: a non-empty list of integers in [0, vocab_size), or a 400 naming the first bad
    entry (JSON true/false and 3.0 are not token ids)."""
    if not ids:
        raise bad_request("'prompt' is an empty list of token ids (it needs at least one)", "prompt")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise bad_request(f"'prompt'[{i}] must be an integer token id, got {json.dumps(t)[:40]}", "prompt")
        if not 0 <= t < vocab_size:
            raise bad_request(
                f"'prompt'[{i}] = {t} is not a token id of this model (they are in [0, {vocab_size}))",
                "prompt",
                "invalid_token_id",
            )
    return list(ids)


def encode_prompt(tokenizer: Tokenizer, text: str, context: int, param: str) -> list[int]:
    """Token ids of a prompt. A text longer than context x (the longest token's characters) cannot fit, and is
    refused before spending time on it; the rest is encoded through encode_batch, which lets other threads run (the
    event loop keeps answering while a long prompt is tokenized)."""
    if len(text) > context * tokenizer.longest_token_chars:
        raise bad_request(
            f"the prompt has {len(text)} characters: more than the model's context of {context} tokens can hold",
            param,
            "context_length_exceeded",
        )
    return tokenizer.encode_batch([text])[0]


# Config fields that do not change what a weight means: training-only settings, and the YaRN switch, which belongs to
# the server (--yarn), not to the checkpoint loaded into it.
_RELOAD_FREE_FIELDS = frozenset({"dropout", "aux_loss_alpha", "seq_aux", "inference_rope_scaling"})


def load_weights_into(model: torch.nn.Module, folder: str) -> str:
    """Copy a checkpoint folder's weights into the served model, in place (the engine and a compiled decode step
    keep their parameter tensors) -> the sha256 of its model.safetensors. Everything is checked before a single
    weight is copied: the folder against its manifest (hashes, finite values), its config against the served one,
    its tensor names and shapes; a failure there is a 400 with the loader's one-line message and the old weights
    stay."""
    where = Path(folder)
    try:
        manifest = verify_checkpoint(where)
        config, _ = load_config(where)
        served, given = model.config.to_dict(), config.to_dict()
        diff = [k for k in served if k not in _RELOAD_FREE_FIELDS and served[k] != given.get(k)]
        if diff:
            shown = ", ".join(f"{k} {given.get(k)!r} (served: {served[k]!r})" for k in diff[:3])
            raise bad_request(f"checkpoint {where} is not the served architecture: {shown}", "path")
        state = load_model_state(where)
    except (CheckpointError, ConfigError, OSError, ValueError, KeyError) as exc:
        raise bad_request(f"checkpoint {where} cannot be loaded: {one_line(exc)}", "path") from None
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise bad_request(f"checkpoint {where} does not hold the served model's tensors: {what}", "path")
    for name, t in state.items():
        if t.shape != own[name].shape:
            shapes = f"{tuple(t.shape)} (served: {tuple(own[name].shape)})"
            raise bad_request(f"checkpoint {where}: {name} has shape {shapes}", "path")
    try:
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:  # after the checks above this is a device failure (out of memory ...)
        message = f"copying the weights of {where} failed part way: {one_line(exc)}; the served weights may be mixed"
        raise ApiError(500, message, "server_error", "path", "load_failed") from None
    return manifest[MODEL_FILE]["sha256"]


def finish_reason(engine_reason: str, calls: list) -> str:
    """The finish_reason to report: "tool_calls" when an answer that ended by itself (eos or a stop string) holds
    calls; an answer cut by max_tokens stays "length" (its calls are still returned)."""
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    defaults: dict[str, float] | None = None,
    *,
    cors_origins: list[str] | tuple[str, ...] = (),
    max_body_bytes: int = 1 << 20,
    read_timeout_s: float = 30.0,
    toolbox: Toolbox | None = None,
    allow_weight_reload: bool = False,
):
    """The FastAPI application. The engine's worker thread is started and stopped with the app's lifespan.
    cors_origins: origins whose browsers may call the API (none by default); max_body_bytes and read_timeout_s bound
    what one request may send and how slowly; toolbox: the tools /v1/tools offers and runs (None: those routes 404);
    allow_weight_reload: offer POST /v1/load_weights (off: it 404s)."""
    if FastAPI is None:
        raise ServeError("tools/serve.py needs fastapi and uvicorn: pip install fastapi uvicorn")
    defaults = {"default_max_tokens": 512, "default_temperature": 0.85, "default_top_p": 0.85, **(defaults or {})}
    started = int(time.time())
    # Weight reloads: the gate is closed while one runs, so no request reaches the engine between the drain and the
    # copy; version counts the loads (0: the weights the server started with).
    weights_open = asyncio.Event()
    weights_open.set()
    reload_lock = asyncio.Lock()
    weights = {"version": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="MiniMind", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )

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
        # max_model_len: vLLM's name for the context, which the rollout backend reads (minimind_fast.backend).
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "minimind"}
        return {**card, "max_model_len": engine.context}

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

    def need_toolbox() -> Toolbox:
        if toolbox is None:
            raise ApiError(404, "this server runs no tools: start it with --tools", code="not_found")
        return toolbox

    @app.get("/v1/tools")
    async def tools_list(request: Request):
        check_auth(request)
        return {"object": "list", "data": need_toolbox().specs}

    @app.post("/v1/tools/call")
    async def tools_call(request: Request):
        """Run one call: {"name", "arguments": an object or a JSON string holding one} -> {"name", "content"}, the
        content being the result text to send back as a tool message (a tool's own failure is an {"error": ...}
        result, not an HTTP error)."""
        check_auth(request)
        box = need_toolbox()
        body = await asyncio.to_thread(read_json, await read_body(request))
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object {name, arguments}")
        name, args = body.get("name"), arguments_object(body.get("arguments", {}))
        if not isinstance(name, str) or not name:
            raise bad_request("'name' must be a non-empty string (the tool to run)", "name")
        if args is None:
            raise bad_request("'arguments' must be a JSON object or a string holding one", "arguments")
        call = ToolCall(name, args, None, json.dumps(args, ensure_ascii=False))
        return {"name": name, "content": await asyncio.to_thread(box.run, call)}

    @app.post("/v1/load_weights")
    async def load_weights(request: Request):
        """{"path": a checkpoint folder of the served architecture} -> {"loaded", "version", "sha256"}: the served
        model's weights replaced between engine steps (see the module docstring)."""
        check_auth(request)
        if not allow_weight_reload:
            raise ApiError(404, "weight reload is off: start the server with --allow_weight_reload", code="not_found")
        body = await asyncio.to_thread(read_json, await read_body(request))
        path = body.get("path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise bad_request('the body must be {"path": "a checkpoint folder"}', "path")
        async with reload_lock:
            weights_open.clear()
            try:
                # Drain: what is queued or running finishes on the old weights; new requests wait at the gate.
                while engine.metrics()["requests_active"] > 0:
                    await asyncio.sleep(0.005)
                sha = await asyncio.to_thread(load_weights_into, engine.model, path)
            finally:
                weights_open.set()
            weights["version"] += 1
            return {"loaded": path, "version": weights["version"], "sha256": sha}

    async def read_body(request: Request) -> bytes:
        """The whole body, refused (400) beyond max_body_bytes and (408) when it does not arrive in read_timeout_s."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise bad_request(f"the request body has {declared} bytes; at most {max_body_bytes} are accepted",
                              code="request_too_large")  # fmt: skip
        chunks: list[bytes] = []
        size = 0

        async def collect() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise bad_request(f"the request body exceeds {max_body_bytes} bytes", code="request_too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(collect(), read_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                408, f"the request body did not arrive within {read_timeout_s:g} s", code="timeout"
            ) from None
        return b"".join(chunks)

    async def start_job(request: Request, kind: str) -> tuple[Job, ChatParams, asyncio.Queue]:
        """Authorise, read and validate the request (tokenizing off the event loop), then queue it."""
        check_auth(request)
        body = await asyncio.to_thread(read_json, await read_body(request))  # parsing a big body takes a while
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            raise ApiError(
                404,
                f"model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        parse = parse_chat_request if kind == "chat" else parse_completion_request
        extra = {} if kind == "chat" else {"vocab_size": engine.vocab_size}
        try:
            params = await asyncio.to_thread(parse, body, engine.tokenizer, engine.context, **extra, **defaults)
        except (TokenizerError, ValueError) as exc:
            if isinstance(exc, ApiError):
                raise
            raise bad_request(str(exc), "messages" if kind == "chat" else "prompt") from None
        sampling = params.sampling()
        if kind == "text":
            sampling = dataclasses.replace(sampling, split_reasoning=False)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: dict[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(queue.put_nowait, event)

        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        await weights_open.wait()  # closed while weights load; nothing awaits between here and the submit
        try:
            job = engine.submit(params.prompt_ids, sampling, sink, f"{prefix}-{uuid.uuid4().hex[:24]}")
        except QueueFull as exc:
            raise ApiError(503, str(exc), "server_error", None, "queue_full") from None
        except RequestError as exc:
            raise bad_request(str(exc), exc.param, exc.code) from None
        return job, params, queue

    async def until_disconnect(request: Request) -> None:
        """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect_answer(
        request: Request, job: Job, params: ChatParams, queue: asyncio.Queue
    ) -> dict[str, Any] | None:
        """The non-streamed answer: {"reasoning", "content", "calls", "finish_reason", "usage"}, or None when the
        client went away first (the job is then cancelled: its row leaves before the next decode step). The text goes
        through the same splitter as a stream's, so both answer the same."""
        gone = asyncio.ensure_future(until_disconnect(request))
        split = params.answer_stream()
        reasoning, content, calls = [], [], []
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    engine.cancel(job)
                    return None
                event = get.result()
                if event["type"] == "delta":
                    pieces = split.push(event["reasoning"], event["content"])
                elif event["type"] == "error":
                    raise ApiError(500, event["message"], "server_error", None, "generation_failed")
                else:
                    pieces = split.flush()
                reasoning.append(pieces[0])
                content.append(pieces[1])
                calls += pieces[2]
                if event["type"] == "done":
                    return {"reasoning": "".join(reasoning), "content": "".join(content), "calls": calls, **event}
        finally:
            gone.cancel()
            engine.cancel(job)

    async def respond(request: Request, kind: str):
        """One request of either endpoint: "chat" (chat.completion objects) or "text" (text_completion objects)."""
        job, params, queue = await start_job(request, kind)
        created = int(job.created)
        if params.stream:
            return sse_response(_stream(job, params, queue, created, kind))
        answer = await collect_answer(request, job, params, queue)
        if answer is None:
            return Response(status_code=499)
        calls = answer["calls"] if params.parallel_tool_calls else answer["calls"][:1]
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason(answer["finish_reason"], calls)}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": answer["content"]}
            if calls:
                choice["message"]["content"] = answer["content"] or None
                choice["message"]["tool_calls"] = [openai_tool_call(c, i, job.id) for i, c in enumerate(calls)]
            if answer["reasoning"]:
                choice["message"]["reasoning_content"] = answer["reasoning"]
        else:
            choice["text"] = answer["content"]
        if params.return_token_ids:  # vLLM's names; the ids exactly as sampled (eos included when it ended the answer)
            choice["prompt_token_ids"], choice["token_ids"] = list(job.prompt_ids), list(job.output_ids)
        obj = "chat.completion" if kind == "chat" else "text_completion"
        base = {"id": job.id, "object": obj, "created": created, "model": model_name}
        return {**base, "choices": [choice], "usage": answer["usage"]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, "text")

    def sse_response(events) -> StreamingResponse:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _stream(job: Job, params: ChatParams, queue: asyncio.Queue, created: int, kind: str):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": job.id, "object": obj, "created": created, "model": model_name}

        def chunk(
            delta: dict[str, Any], finish_reason: str | None = None, choice_extra: dict | None = None, **extra: Any
        ) -> str:
            if kind == "chat":
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {
                    "index": 0,
                    "text": delta.get("content", ""),
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            return _sse({**base, "choices": [{**choice, **(choice_extra or {})}], **extra})

        split = params.answer_stream()
        n_calls = 0

        def pieces(reasoning: str, content: str, calls: list[ToolCall]):
            """The chunks of one step's text: reasoning and content, then each completed call (OpenAI's streamed
            shape: the call's index, id, type and name first, then its arguments)."""
            nonlocal n_calls
            delta = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            if delta:
                yield chunk(delta)
            for call in calls:
                if n_calls > 0 and not params.parallel_tool_calls:
                    break
                full = openai_tool_call(call, n_calls, job.id)
                head = {**full, "function": {"name": call.name, "arguments": ""}}
                yield chunk({"tool_calls": [{"index": n_calls, **head}]})
                args = {"arguments": full["function"]["arguments"]}
                yield chunk({"tool_calls": [{"index": n_calls, "function": args}]})
                n_calls += 1

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await queue.get()
                if event["type"] == "delta":
                    for piece in pieces(*split.push(event["reasoning"], event["content"])):
                        yield piece
                elif event["type"] == "error":
                    err = ApiError(500, event["message"], "server_error", None, "generation_failed")
                    yield _sse(err.body())
                    break
                else:
                    for piece in pieces(*split.flush()):
                        yield piece
                    reason = finish_reason(event["finish_reason"], [None] * n_calls)
                    ids = {"token_ids": list(job.output_ids)} if params.return_token_ids else {}
                    yield chunk({}, reason, usage=event["usage"], choice_extra=ids)
                    if params.include_usage:
                        yield _sse({**base, "choices": [], "usage": event["usage"]})
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
    p.add_argument(
        "--api_key",
        default=None,
        help="require Authorization: Bearer KEY (visible in the process list:"
        " prefer MINIMIND_API_KEY or --api_key_file)",
    )
    p.add_argument("--api_key_file", default=None, help="read the API key from this file (its first line)")
    p.add_argument(
        "--cors_origins",
        default="",
        help="comma-separated origins whose web pages may call the API, e.g."
        " http://localhost:3000 ('*' for any); default none",
    )
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--read_timeout", type=float, default=30.0, help="seconds a client may take to send a request")
    p.add_argument("--max_connections", type=int, default=256, help="open connections before new requests get 503")
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
    p.add_argument("--tools", action="store_true", help="offer the project's tools at /v1/tools (for the web page)")
    p.add_argument("--world", default=str(DEFAULT_WORLD), help="the world file the lookup tool reads (with --tools)")
    p.add_argument(
        "--allow_weight_reload",
        action="store_true",
        help="offer POST /v1/load_weights {path}: replace the weights with a checkpoint folder's (RL rollouts)",
    )
    p.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_args(argv)
    for name in (
        "max_batch",
        "max_batch_tokens",
        "max_queue",
        "default_max_tokens",
        "max_body_bytes",
        "max_connections",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        p.error("--temperature must be in [0, 2] and --top_p in (0, 1]")
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    if not args.read_timeout > 0:
        p.error("--read_timeout must be > 0")
    if args.api_key is not None and args.api_key_file is not None:
        p.error("give --api_key or --api_key_file, not both")
    args.cors_origins = [o.strip() for o in args.cors_origins.split(",") if o.strip()]
    return args


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """--api_key_file, else --api_key, else the MINIMIND_API_KEY environment variable, else None (no key)."""
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            raise ServeError(f"--api_key_file {args.api_key_file}: cannot read a key ({exc or 'empty file'})") from None
        if not key:
            raise ServeError(f"--api_key_file {args.api_key_file}: the first line is empty")
        return key
    if args.api_key is not None:
        print("warning: --api_key is visible to every user of this machine (ps); prefer MINIMIND_API_KEY or "
              "--api_key_file", file=sys.stderr)  # fmt: skip
        return args.api_key
    return os.environ.get("MINIMIND_API_KEY") or None


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


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


def header_timeout_protocol(read_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for a request's headers: a connection that has not sent complete
    headers within read_timeout_s of opening (or of its last response) is closed. Without it a client that sends
    half a request holds its connection forever (uvicorn only times out idle keep-alive connections)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(read_timeout_s, self._headers_overdue)

        def _headers_overdue(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request whose headers arrived
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11


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
        api_key = resolve_api_key(args)
        if args.allow_weight_reload and api_key is None and not is_loopback(args.host):
            raise ServeError(
                f"--allow_weight_reload with --host {args.host} needs an API key (MINIMIND_API_KEY or "
                "--api_key_file): anyone who reaches the port could replace the weights"
            )
        toolbox = Toolbox(args.world or None) if args.tools else None
        model, tokenizer = load_for_serving(args)
    except (ServeError, WorldError) as exc:
        raise SystemExit(f"error: {'--world ' if isinstance(exc, WorldError) else ''}{exc}") from None
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
    app = create_app(
        engine,
        name,
        api_key=api_key,
        defaults=defaults,
        cors_origins=args.cors_origins,
        max_body_bytes=args.max_body_bytes,
        read_timeout_s=args.read_timeout,
        toolbox=toolbox,
        allow_weight_reload=args.allow_weight_reload,
    )
    try:
        sock = socket.create_server(
            (args.host, args.port), family=socket.AF_INET6 if ":" in args.host else socket.AF_INET
        )
    except OSError as exc:
        raise SystemExit(f"error: cannot bind {args.host}:{args.port} ({exc})") from None
    port = sock.getsockname()[1]
    print(
        f"serving {name} ({model.num_params() / 1e6:.1f}M parameters) on http://{args.host}:{port} "
        f"(api key {'required' if api_key else 'off'}; CORS {', '.join(args.cors_origins) or 'off'}; "
        f"tools {', '.join(s['function']['name'] for s in toolbox.specs) if toolbox else 'off'}; "
        f"weight reload {'on' if args.allow_weight_reload else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        http=header_timeout_protocol(args.read_timeout),
        limit_concurrency=args.max_connections,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
