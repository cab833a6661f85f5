"""An OpenAI-compatible chat server (FastAPI + uvicorn) over a MiniMind checkpoint, with a web chat page at `/`.

    python tools/serve.py --load out/full_sft                         # http://127.0.0.1:8998
    python tools/serve.py --load out/full_sft --port 0                # any free port (the log line says which)
    python tools/serve.py --load out/full_sft --host 0.0.0.0 --api_key SECRET    # reachable from other machines
    options: --model_name NAME (default: the folder's name) --device auto|cpu|cuda[:i] --kernels auto|torch|triton
             --yarn --lora ADAPTER_FOLDER (merged into the weights at load) --max_batch 32 --max_batch_tokens 131072
             --max_active_batches 4 --max_queue 256 --default_max_tokens 512 --temperature 0.85 --top_p 0.85
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
format). Streaming holds back only what could still turn out to be a tag, so the streamed pieces concatenate to
exactly the non-streamed fields. Answers that do not start with `<think>` are passed through untouched.

Scheduling: the model runs in one worker thread, never on the event loop. Waiting requests with the same sampling
settings are gathered into one batched generate() (left-padded prompts, one KV cache); up to --max_active_batches
batches are in flight at once and are advanced one decode step each in turn, so a request that arrives while a long
generation runs starts answering at once instead of waiting for it. A batch's rows finish independently (eos, stop
string, their own max_tokens). A client that disconnects, or a stream that is closed, cancels its row: it stops
emitting at the next step, and its batch stops as soon as none of its rows is still wanted. Seeded requests run in
a batch of their own (so the seed alone decides the sample). Not done: joining a running batch mid-generation
(continuous batching); a late request forms a new batch instead.

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
import re
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tools/serve.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import minimind_kernels as kernels  # noqa: E402
from minimind_fast.checkpoint import CheckpointError, load_model  # noqa: E402
from minimind_fast.config import ConfigError  # noqa: E402
from minimind_fast.generate import IncrementalDecoder, generate_iter  # noqa: E402
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

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one generate() call (its sampling settings are per batch)."""
        if self.seed is not None:
            return ("seeded", uuid.uuid4().hex)
        if self.temperature == 0:
            return ("greedy", self.repetition_penalty, self.ignore_eos)
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.ignore_eos)


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
# Text: stop strings, then the reasoning split.

_THINK = re.compile(r"\s*<think>(.*?)(?:</think>(.*))?\Z", re.S)
_ANSWER_TAG = re.compile(r"</?answer>")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer: see the module docstring."""
    m = _THINK.match(text)
    if m is None:
        return None, text
    rest = m.group(2)
    return m.group(1).strip(), "" if rest is None else _ANSWER_TAG.sub("", rest).strip()


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.released = stops, "", 0
        self.longest = max((len(s) for s in stops), default=0)

    def push(self, piece: str) -> tuple[str, bool]:
        """(text now safe to release, whether a stop string was hit)."""
        searched = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, searched) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.released = self.text[self.released : cut], cut
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        safe = max(self.released, len(self.text) - hold)
        out, self.released = self.text[self.released : safe], safe
        return out, False

    def flush(self) -> str:
        out, self.released = self.text[self.released :], len(self.text)
        return out


class ReasoningSplitter:
    """Incremental split_reasoning: push raw text, get (reasoning delta, content delta). The deltas concatenate to
    exactly split_reasoning(all text), because each push re-splits a prefix of the text whose split can only grow:
    a tail that could still become a tag is held back, and so is any text while the answer might still open with
    `<think>`."""

    def __init__(self):
        self.text, self.reasoning, self.content = "", "", ""
        self.thinking: bool | None = None  # unknown until the start of the answer is seen

    def _delta(self, reasoning: str | None, content: str) -> tuple[str, str]:
        dr = dc = ""
        if reasoning is not None and reasoning.startswith(self.reasoning):
            dr, self.reasoning = reasoning[len(self.reasoning) :], reasoning
        if content.startswith(self.content):
            dc, self.content = content[len(self.content) :], content
        return dr, dc

    def push(self, piece: str) -> tuple[str, str]:
        self.text += piece
        if self.thinking is None:
            head = self.text.lstrip()
            if len(head) < len("<think>") and "<think>".startswith(head):
                return "", ""
            self.thinking = head.startswith("<think>")
        if not self.thinking:
            return self._delta(None, self.text)
        stable = self.text
        lt = stable.rfind("<")
        if lt >= 0 and any(t.startswith(stable[lt:]) and t != stable[lt:] for t in _TAGS):
            stable = stable[:lt]
        return self._delta(*split_reasoning(stable))

    def flush(self) -> tuple[str, str]:
        if self.thinking is None:
            self.thinking = self.text.lstrip().startswith("<think>")
        return self._delta(*split_reasoning(self.text))


# ----------------------------------------------------------------------------------------------------------------
# The engine: a worker thread that owns the model and runs batches.

Sink = Callable[[dict[str, Any]], None]


@dataclass
class Job:
    id: str
    params: ChatParams
    sink: Sink  # called from the worker thread with {"type": "delta"|"done"|"error", ...}
    key: tuple = ()
    cancelled: bool = False
    finished: bool = False
    status: str = "queued"
    completion_tokens: int = 0
    created: float = field(default_factory=time.time)


class _Row:
    """One job inside a running batch: decoding, stop strings, reasoning split, its own end."""

    def __init__(self, job: Job, tokenizer: Tokenizer):
        self.job = job
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.stop = StopMatcher(job.params.stop)
        self.split = ReasoningSplitter()
        self.done = False

    def _send(self, reasoning: str, content: str) -> None:
        if reasoning or content:
            self.job.sink({"type": "delta", "reasoning": reasoning, "content": content})

    def feed(self, token_piece: str) -> bool:
        """Returns True when a stop string ended the answer."""
        text, hit = self.stop.push(token_piece)
        self._send(*self.split.push(text))
        return hit

    def finish(self, reason: str, hit_stop: bool = False) -> None:
        """End the row: "stop" (eos, or a stop string when hit_stop), "length", "cancelled" or "error"."""
        if self.done:
            return
        self.done = True
        job = self.job
        if reason in ("stop", "length"):
            if not hit_stop:  # the answer ends here: release what was held back (text after a stop string is not)
                tail, hit = self.stop.push(self.decoder.flush())
                self._send(*self.split.push(tail))
                if not hit:
                    self._send(*self.split.push(self.stop.flush()))
            self._send(*self.split.flush())
        prompt = len(job.params.prompt_ids)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens,
        }
        job.status = reason
        job.finished = True
        if reason in ("stop", "length"):
            job.sink({"type": "done", "finish_reason": reason, "usage": usage})


class _BatchRun:
    """One generate_iter over a batch of jobs with the same sampling settings, advanced one step at a time."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine = engine
        self.rows = [_Row(j, engine.tokenizer) for j in jobs]
        p = jobs[0].params
        self.eos_id = None if p.ignore_eos else engine.tokenizer.eos_id
        self.it = generate_iter(
            engine.model,
            [j.params.prompt_ids for j in jobs],
            max(j.params.max_tokens for j in jobs),
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            greedy=p.temperature == 0,
            eos_id=self.eos_id,
            pad_id=engine.tokenizer.pad_id,
            seed=p.seed,
            compile_decode=engine.compile_decode,
        )
        for j in jobs:
            j.status = "running"

    def close(self) -> None:
        self.it.close()

    def step(self) -> bool:
        """Advance by one token; returns True when the batch is over."""
        for row in self.rows:
            if not row.done and row.job.cancelled:
                row.finish("cancelled")
        if all(r.done for r in self.rows):
            self.close()
            return True
        try:
            toks = next(self.it)
        except StopIteration:
            toks = None
        except Exception as exc:  # a failure inside generation must not take the worker thread down
            self.fail(f"generation failed: {type(exc).__name__}: {exc}")
            return True
        if toks is None:
            for row in self.rows:
                row.finish("length")
            return True
        produced = 0
        for row, tok in zip(self.rows, toks):
            if row.done or tok is None:
                continue
            job = row.job
            job.completion_tokens += 1
            produced += 1
            if tok == self.eos_id:
                row.finish("stop")
            elif row.feed(row.decoder.push(tok)):
                row.finish("stop", hit_stop=True)
            elif job.completion_tokens >= job.params.max_tokens:
                row.finish("length")
        self.engine.count_tokens(produced)
        if all(r.done for r in self.rows):
            self.close()
            return True
        return False

    def fail(self, message: str) -> None:
        self.close()
        for row in self.rows:
            if not row.done:
                row.job.sink({"type": "error", "message": message})
                row.finish("error")


class Engine:
    """Owns the model; requests are submitted from any thread and answered through their sink."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 32,
        max_batch_tokens: int = 131072,
        max_active_batches: int = 4,
        max_queue: int = 256,
        gather_s: float = 0.005,
        compile_decode: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.max_position_embeddings
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.max_active_batches, self.max_queue = max_active_batches, max_queue
        self.gather_s, self.compile_decode = gather_s, compile_decode
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = dict(
            requests_total=0,
            requests_finished=0,
            requests_cancelled=0,
            requests_failed=0,
            completion_tokens_total=0,
            batches_total=0,
            largest_batch=0,
        )
        self._running: set[str] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=256)

    # -- life cycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="minimind-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            while self._queue:
                job = self._queue.popleft()
                job.sink({"type": "error", "message": "the server is shutting down"})
                job.status, job.finished = "error", True
                self._record(job)
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- called from the event loop
    def submit(self, job: Job) -> None:
        job.key = job.params.batch_key()
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise ApiError(
                    503, "the server is busy (request queue full); retry later", "server_error", None, "queue_full"
                )
            self.stats["requests_total"] += 1
            self._queue.append(job)
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop a job: dropped from the queue, or its row stops at the next step. Safe to call twice."""
        with self._cv:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                job.status, job.finished = "cancelled", True
                self._record(job)

    def metrics(self) -> dict[str, Any]:
        with self._cv:
            return {
                **self.stats,
                "requests_queued": len(self._queue),
                "requests_running": len(self._running),
                "requests_active": len(self._queue) + len(self._running),
                "recent": list(self.recent),
            }

    # -- worker thread
    def count_tokens(self, n: int) -> None:
        with self._cv:
            self.stats["completion_tokens_total"] += n

    def _record(self, job: Job) -> None:
        """Book-keeping for a finished job (call with the lock held)."""
        self._running.discard(job.id)
        name = {"cancelled": "requests_cancelled", "error": "requests_failed"}.get(job.status, "requests_finished")
        self.stats[name] += 1
        self.recent.append(
            {
                "id": job.id,
                "status": job.status,
                "completion_tokens": job.completion_tokens,
                "max_tokens": job.params.max_tokens,
                "prompt_tokens": len(job.params.prompt_ids),
            }
        )

    def _take_batch(self) -> list[Job]:
        """The oldest waiting job and every later one with the same key that fits (lock held)."""
        if not self._queue:
            return []
        first = self._queue[0]
        chosen, p_len, new = [first], len(first.params.prompt_ids), first.params.max_tokens
        for job in list(self._queue)[1:]:
            if len(chosen) >= self.max_batch:
                break
            if job.key != first.key:
                continue
            p2, n2 = max(p_len, len(job.params.prompt_ids)), max(new, job.params.max_tokens)
            # The batch's KV cache holds (longest prompt + most new tokens) positions for every row.
            if p2 + n2 > self.context or (len(chosen) + 1) * (p2 + n2) > self.max_batch_tokens:
                continue
            chosen.append(job)
            p_len, new = p2, n2
        for job in chosen:
            self._queue.remove(job)
            self._running.add(job.id)
        self.stats["batches_total"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(chosen))
        return chosen

    def _loop(self) -> None:
        active: list[_BatchRun] = []
        while True:
            with self._cv:
                while not self._queue and not active and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    break
                idle = not active
            if idle and self.gather_s > 0:
                time.sleep(self.gather_s)  # requests sent together arrive a few ms apart: let them share a batch
            with self._cv:
                while len(active) < self.max_active_batches:
                    jobs = self._take_batch()
                    if not jobs:
                        break
                    try:
                        active.append(_BatchRun(self, jobs))
                    except Exception as exc:
                        for job in jobs:
                            job.sink({"type": "error", "message": f"generation failed: {exc}"})
                            job.status, job.finished = "error", True
                            self._record(job)
            for run in list(active):
                try:
                    over = run.step()
                except Exception as exc:
                    run.fail(f"generation failed: {type(exc).__name__}: {exc}")
                    over = True
                finished = [r.job for r in run.rows if r.done]
                with self._cv:
                    for job in finished:
                        if job.id in self._running:
                            self._record(job)
                if over:
                    active.remove(run)
        for run in active:
            run.fail("the server is shutting down")


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

        job = Job(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", params=params, sink=sink)
        created = int(job.created)
        engine.submit(job)

        if params.stream:
            return StreamingResponse(
                _stream(job, queue, created),
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

    async def _stream(job: Job, queue: asyncio.Queue, created: int):
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
                    if job.params.include_usage:
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
    p.add_argument("--max_batch", type=int, default=32, help="most requests in one generate batch")
    p.add_argument("--max_batch_tokens", type=int, default=131072, help="most KV-cache positions in one batch")
    p.add_argument("--max_active_batches", type=int, default=4, help="batches advanced in turn")
    p.add_argument("--max_queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--default_max_tokens", type=int, default=512, help="max_tokens when a request gives none")
    p.add_argument("--temperature", type=float, default=0.85, help="default temperature")
    p.add_argument("--top_p", type=float, default=0.85, help="default top_p")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_args(argv)
    for name in ("max_batch", "max_batch_tokens", "max_active_batches", "max_queue", "default_max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        p.error("--temperature must be in [0, 2] and --top_p in (0, 1]")
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    return args


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def load_for_serving(args: argparse.Namespace) -> tuple[torch.nn.Module, Tokenizer]:
    """The model in eval mode on its device (YaRN and a merged LoRA adapter as asked) and its tokenizer."""
    folder = Path(args.load)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise ServeError(f"--device {args.device!r} is not a device ({exc})") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ServeError(f"--device {args.device} asked for but CUDA is not available")
    try:
        ops = kernels.resolve(args.kernels)
        model, _, _ = load_model(folder, ops=ops, device=device)
        tokenizer = Tokenizer.load(folder if (folder / "tokenizer.json").is_file() else None)
    except (CheckpointError, ConfigError, TokenizerError, kernels.KernelSpecError) as exc:
        raise ServeError(_one_line(exc)) from exc
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ServeError(f"checkpoint {folder} cannot be loaded: {_one_line(exc)}") from exc
    if args.lora:
        from minimind_fast import lora

        try:
            lora.load_adapter(model, args.lora)
            lora.remove_lora(model, merge=True)  # merged: inference runs at the base model's speed
        except (lora.AdapterError, CheckpointError, OSError) as exc:
            raise ServeError(_one_line(exc)) from exc
    model.eval()
    if args.yarn:
        model.set_yarn(True)
    print(kernels.describe(ops), file=sys.stderr)
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
        max_active_batches=args.max_active_batches,
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
