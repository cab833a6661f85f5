"""The inference engine: one model, many requests, continuous batching. The server, chat, evaluation and RL rollouts
all generate through it.

    engine = Engine(model, tokenizer)                       # model.eval() on its device
    done = engine.generate([ids_a, ids_b], SamplingParams(max_tokens=64, temperature=0))
    done[0].content, done[0].output_ids, done[0].finish_reason

    engine.start()                                          # or: a worker thread steps it (the server)
    req = engine.submit(ids, SamplingParams(max_tokens=64), sink=print)
    req.wait(); engine.stop()

How requests are run:
  - A request waits in a FIFO queue. Between two decode steps, waiting requests join the running batch while there
    is a free row and room in the KV-cache budget (rows x cache width <= max_batch_tokens): each is prefilled alone
    (its prompt through the model with a one-row cache, exactly as if it were the only request), its cache copied
    into a free row of the shared RowKVCache, and its first token chosen at once.
  - Every decode step feeds one token per running row; each row sits at its own position (its own length, from
    column 0) and attends to its own columns only. A row leaves as soon as it ends (eos, a stop string, its
    max_tokens, or cancel()); the last row moves into its place, so the running rows stay contiguous.
  - Sampling is per row: rows with equal settings are processed together (repetition penalty, temperature, top-k,
    top-p, in fp32, as minimind_fast.generate does); greedy rows take the argmax; a seeded row draws from its own
    generator, seeded with its seed, so its answer does not depend on what else runs.
  So a request's tokens are those of generate() on its prompt alone (greedy, or with the same seed): the tests
  compare them while other requests come and go.

Text: each row decodes its tokens incrementally (IncrementalDecoder), cuts at its stop strings and splits a
`<think>` answer into reasoning and content (minimind_fast.textstream). A sink, if given, is called from the
stepping thread with {"type": "delta", "reasoning", "content"} as text becomes final, then once with
{"type": "done", "finish_reason": "stop"|"length", "usage"} or {"type": "error", "message"}; a cancelled request
gets no further event. finish_reason "stop" is eos or a stop string; completion_tokens counts every token generated,
eos included. The request object holds the same: output_ids, content, reasoning, finish_reason, status.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from minimind_fast.generate import IncrementalDecoder, decode_step, process_logits
from minimind_fast.model import KVCache, RowKVCache
from minimind_fast.textstream import ReasoningSplitter, StopMatcher

Sink = Callable[[dict[str, Any]], None]


class EngineError(RuntimeError):
    """Something the engine cannot do for a request."""


class RequestError(EngineError, ValueError):
    """A request that cannot be run as given; `param` names the offending field, `code` a machine-readable kind."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFull(EngineError):
    """max_queue requests are already waiting."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is generated. temperature 0 is greedy (the argmax after the repetition penalty)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    split_reasoning: bool = True  # a `<think>` answer's reasoning goes apart from its content

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processing_key(self) -> tuple:
        """Rows with equal keys process their logits together."""
        if self.greedy:
            return (True, self.repetition_penalty)
        return (False, self.temperature, self.top_k, self.top_p, self.repetition_penalty)


def params_per_prompt(
    prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
) -> list[SamplingParams]:
    """One SamplingParams for every prompt, or one per prompt (a count that differs is a ValueError)."""
    each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(each) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(each)} sampling settings")
    return each


@dataclass(eq=False)
class Request:
    """One generation: what was asked and, as it runs, what came out."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink | None = None
    status: str = "queued"  # queued, running, stop, length, cancelled, error
    output_ids: list[int] = field(default_factory=list)
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    finished: bool = False
    created: float = field(default_factory=time.time)
    first_token_at: float | None = None
    finished_at: float | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def usage(self) -> dict[str, int]:
        p, c = len(self.prompt_ids), len(self.output_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has ended (any status); False on timeout."""
        return self._done.wait(timeout)


class _Row:
    """A running request: its place in the cache and its text state."""

    def __init__(self, req: Request, tokenizer, eos_id: int | None, device: torch.device):
        self.req, self.eos_id = req, eos_id
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True) if tokenizer is not None else None
        self.stop = StopMatcher(list(req.params.stop))
        self.split = ReasoningSplitter() if req.params.split_reasoning else None
        self.length = len(req.prompt_ids)  # positions in the cache
        self.last = -1  # the token chosen last, fed at the next decode step
        self.generator = None
        if req.params.seed is not None and not req.params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(req.params.seed)
        self.done = False

    def _send(self, text: str) -> None:
        reasoning, content = self.split.push(text) if self.split is not None else ("", text)
        self._deliver(reasoning, content)

    def _deliver(self, reasoning: str, content: str) -> None:
        if reasoning or content:
            self.req.reasoning += reasoning
            self.req.content += content
            if self.req.sink is not None:
                self.req.sink({"type": "delta", "reasoning": reasoning, "content": content})

    def accept(self, tok: int) -> None:
        """Take the next token; ends the row on eos, a stop string or max_tokens."""
        req = self.req
        if req.first_token_at is None:
            req.first_token_at = time.time()
        req.output_ids.append(tok)
        self.last = tok
        if tok == self.eos_id:
            self.finish("stop")
            return
        if self.decoder is None:  # ids only (no tokenizer): no text, no stop strings
            if len(req.output_ids) >= req.params.max_tokens:
                self.finish("length")
            return
        text, hit = self.stop.push(self.decoder.push(tok))
        self._send(text)
        if hit:
            self.finish("stop", hit_stop=True)
        elif len(req.output_ids) >= req.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str, hit_stop: bool = False, message: str | None = None) -> None:
        """End the row: "stop", "length", "cancelled" or "error"."""
        if self.done:
            return
        self.done = True
        req = self.req
        if reason in ("stop", "length") and self.decoder is not None:
            if not hit_stop:  # the answer ends here: release what was held back (text after a stop is not)
                tail, hit = self.stop.push(self.decoder.flush())
                self._send(tail)
                if not hit:
                    self._send(self.stop.flush())
            if self.split is not None:
                self._deliver(*self.split.flush())
        _end(req, reason, message)


def _end(req: Request, reason: str, message: str | None = None) -> None:
    req.status, req.finished, req.finished_at = reason, True, time.time()
    if reason in ("stop", "length"):
        req.finish_reason = reason
        if req.sink is not None:
            req.sink({"type": "done", "finish_reason": reason, "usage": req.usage()})
    elif reason == "error":
        req.error = message
        if req.sink is not None:
            req.sink({"type": "error", "message": message})
    req._done.set()


class Engine:
    """Owns the model for inference; requests come from any thread (submit/cancel), one thread steps the batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch: int = 32,
        max_batch_tokens: int = 131072,
        max_queue: int = 256,
        max_prefill_rows: int = 16,
        compile_decode: bool | str | Callable = False,
        eos_id: int | None = None,
    ):
        if min(max_batch, max_batch_tokens, max_queue, max_prefill_rows) < 1:
            raise ValueError("max_batch, max_batch_tokens, max_queue and max_prefill_rows must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.eos_id = eos_id if eos_id is not None or tokenizer is None else tokenizer.eos_id
        self.max_prefill_rows = max_prefill_rows
        self.config = model.config
        self.context = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        p = next(model.parameters())
        self.device = p.device
        self.autocast = self.device.type == "cuda" and p.dtype == torch.float32
        self.cache_dtype = torch.bfloat16 if self.autocast else p.dtype
        self.max_batch, self.max_batch_tokens, self.max_queue = max_batch, max_batch_tokens, max_queue
        self.decode_fn = decode_step(compile_decode)
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Row] = []
        self._cache: RowKVCache | None = None
        self._present = torch.zeros((max_batch, self.vocab_size), dtype=torch.bool, device=self.device)
        self.stats = dict(
            requests_total=0,
            requests_finished=0,
            requests_cancelled=0,
            requests_failed=0,
            completion_tokens_total=0,
            decode_steps_total=0,
            largest_batch=0,
        )
        self._running: int = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=256)

    # -- requests (any thread)
    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestError when the request cannot run as given."""
        if len(prompt_ids) == 0:
            raise RequestError("the prompt is empty (it needs at least one token)", "prompt")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise RequestError(f"the prompt has token ids outside [0, {self.vocab_size}): {bad[:5]}", "prompt")
        p = params
        if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {p.max_tokens!r}", "max_tokens")
        if len(prompt_ids) + p.max_tokens > self.context:
            raise RequestError(
                f"max_tokens {p.max_tokens} + the prompt's {len(prompt_ids)} tokens exceed the model's context of "
                f"{self.context}",
                "max_tokens",
                "context_length_exceeded",
            )
        checks = [
            (p.temperature >= 0, "temperature", "must be >= 0"),
            (p.top_k >= 0, "top_k", "must be >= 0 (0 = off)"),
            (0 < p.top_p <= 1, "top_p", "must be in (0, 1]"),
            (p.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (all(isinstance(s, str) and s for s in p.stop), "stop", "must be non-empty strings"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise RequestError(f"{name} {what}, got {getattr(p, name)!r}", name)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Sink | None = None,
        request_id: str | None = None,
        *,
        _force: bool = False,
    ) -> Request:
        """Queue a request; raises RequestError (bad request) or QueueFull. Returns it at once."""
        prompt = [int(t) for t in prompt_ids]
        self.check(prompt, params)
        req = Request(request_id or f"req-{uuid.uuid4().hex[:24]}", prompt, params, sink)
        with self._cv:
            if self._stopping:
                raise EngineError("the engine is stopped")
            if len(self._queue) >= self.max_queue and not _force:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.stats["requests_total"] += 1
            self._queue.append(req)
            self._cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request: dropped from the queue, or its row leaves before the next step. Safe to call twice."""
        with self._cv:
            if req.finished or req.cancelled:
                return
            req.cancelled = True
            if req in self._queue:
                self._queue.remove(req)
                _end(req, "cancelled")
                self._record(req)
            self._cv.notify_all()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]):
        """Run these requests to their end and return them in order (from the calling thread when no worker runs,
        otherwise by waiting on the worker)."""
        reqs = [self.submit(p, sp, _force=True) for p, sp in zip(prompts, params_per_prompt(prompts, params))]
        if self.alive:
            for r in reqs:
                r.wait()
        else:
            while not all(r.finished for r in reqs):
                self.step()
        return reqs

    def metrics(self) -> dict[str, Any]:
        with self._cv:
            return {
                **self.stats,
                "requests_queued": len(self._queue),
                "requests_running": self._running,
                "requests_active": len(self._queue) + self._running,
                "recent": list(self.recent),
            }

    # -- the worker thread
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="minimind-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is waiting, stop the worker (running rows end with an error)."""
        with self._cv:
            self._stopping = True
            while self._queue:
                req = self._queue.popleft()
                _end(req, "error", "the server is shutting down")
                self._record(req)
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._rows and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    break
            self.step()
        self._fail_running("the server is shutting down")

    # -- stepping (one thread)
    def step(self) -> bool:
        """Admit what fits, then one decode step for every running row. False when there was nothing to do.
        A failure inside the model ends every running row with an error instead of raising."""
        try:
            with torch.inference_mode():
                return self._step()
        except Exception as exc:
            self._fail_running(f"generation failed: {type(exc).__name__}: {exc}")
            return True

    def _step(self) -> bool:
        admitted = self._admit()
        self._leave()
        if not self._rows:
            return admitted
        self._decode()
        self._leave()
        return True

    def _amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def _width_needed(self, extra: Sequence[Request] = ()) -> int:
        reqs = [r.req for r in self._rows] + list(extra)
        return max((len(r.prompt_ids) + r.params.max_tokens for r in reqs), default=0)

    def _fits(self, req: Request, joining: int = 0) -> bool:
        """Whether `req` can join the running rows plus `joining` others taken this step."""
        n = len(self._rows) + joining
        if n >= self.max_batch:
            return False
        return n == 0 or (n + 1) * self._width_needed([req]) <= self.max_batch_tokens

    def _admit(self) -> bool:
        """Take the waiting requests that fit (FIFO) and prefill them, a few at a time."""
        joining: list[Request] = []
        with self._cv:
            while self._queue and len(joining) < self.max_prefill_rows:
                if not self._fits(self._queue[0], len(joining)):
                    break
                req = self._queue.popleft()
                req.status = "running"
                self._running += 1
                joining.append(req)
        if not joining:
            return False
        # Prefill in groups of similar length (right padding costs compute, never changes a row's result).
        joining.sort(key=lambda r: len(r.prompt_ids))
        group: list[Request] = []
        for req in joining:
            longest = len(req.prompt_ids)
            if group and longest * (len(group) + 1) > 1.25 * sum(len(r.prompt_ids) for r in [*group, req]) + 16:
                self._prefill(group)
                group = []
            group.append(req)
        self._prefill(group)
        return True

    def _ensure_cache(self, rows: int, cached: int) -> None:
        """A RowKVCache with room for `rows` rows as wide as the widest request; rows 0..cached-1 carried over."""
        width = self._width_needed()
        c = self._cache
        if c is not None and c.max_len >= width and c.slots >= rows:
            return
        width = min(self.context, -(-max(width, c.max_len if c is not None else 0) // 64) * 64)
        slots = min(self.max_batch, max(rows, self.max_batch_tokens // width))
        new = RowKVCache(self.config, slots, width, device=self.device, dtype=self.cache_dtype)
        if c is not None and cached > 0:
            new.k[:, :cached, :, : c.max_len] = c.k[:, :cached]
            new.v[:, :cached, :, : c.max_len] = c.v[:, :cached]
        self._cache = new

    def _prefill(self, reqs: list[Request]) -> None:
        """Prompts through the model as one right-padded batch: with a causal mask a row never sees the padding after
        it, so each row's keys, values and last logits are those of its prompt run alone. Then each row's cache is
        copied into a free row and its first token chosen."""
        rows = [_Row(r, self.tokenizer, None if r.params.ignore_eos else self.eos_id, self.device) for r in reqs]
        try:
            lens = [len(r.prompt_ids) for r in reqs]
            t = max(lens)
            ids_BT = torch.zeros((len(reqs), t), dtype=torch.long)
            for i, r in enumerate(reqs):
                ids_BT[i, : lens[i]] = torch.tensor(r.prompt_ids, dtype=torch.long)
            ids_BT = ids_BT.to(self.device)
            pos_BT = torch.arange(t, device=self.device)[None].expand(len(reqs), t)
            prompt_cache = KVCache(self.config, len(reqs), t, device=self.device, dtype=self.cache_dtype)
            last_B = torch.tensor(lens, device=self.device) - 1
            with self._amp():
                out = self.model(ids_BT, position_ids=pos_BT, kv_cache=prompt_cache, return_hidden=True,
                                 return_logits=False)  # fmt: skip
                h_BD = out.hidden[torch.arange(len(reqs), device=self.device), last_B][:, None]
                logits_BV = torch.nn.functional.linear(h_BD, self.model.lm_head.weight)[:, -1].float()
            first = len(self._rows)
            self._rows.extend(rows)
            self._ensure_cache(len(self._rows), first)
            for i in range(len(reqs)):
                self._cache.load_row(first + i, prompt_cache, src_row=i, length=lens[i])
                self._present[first + i] = False
                self._present[first + i, ids_BT[i, : lens[i]]] = True
            self._choose(logits_BV, rows, first_slot=first)
        except Exception as exc:
            for row in rows:
                if row in self._rows:
                    self._rows.remove(row)
                row.finish("error", message=f"generation failed: {type(exc).__name__}: {exc}")
            self._finish_record(rows)

    def _decode(self) -> None:
        rows = self._rows
        cache = self._cache
        cache.set_rows([r.length for r in rows])
        ids_N1 = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)
        with self._amp():
            logits_NV = self.decode_fn(self.model, ids_N1, None, cache.pos_N[:, None], cache)
        for r in rows:
            r.length += 1
        with self._cv:
            self.stats["decode_steps_total"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        self._choose(logits_NV, rows, first_slot=0)

    def _choose(self, logits_NV: torch.Tensor, rows: list[_Row], first_slot: int) -> None:
        """Pick one token for each of `rows` (cache slots first_slot.. in order) and hand it to the row."""
        n = len(rows)
        toks_N = torch.empty(n, dtype=torch.long, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.req.params.processing_key(), []).append(i)
        for idx in groups.values():
            p = rows[idx[0]].req.params
            idx_G = torch.tensor(idx, device=self.device)
            present_GV = self._present[first_slot + idx_G] if p.repetition_penalty != 1.0 else None
            logits_GV = process_logits(
                logits_NV[idx_G],
                present_GV,
                temperature=1.0 if p.greedy else p.temperature,
                top_k=0 if p.greedy else p.top_k,
                top_p=1.0 if p.greedy else p.top_p,
                repetition_penalty=p.repetition_penalty,
            )
            if p.greedy:
                toks_N[idx_G] = logits_GV.argmax(dim=-1)
                continue
            probs_GV = logits_GV.softmax(dim=-1)
            shared = [g for g, i in enumerate(idx) if rows[i].generator is None]
            if shared:
                sel = torch.tensor(shared, device=self.device)
                toks_N[idx_G[sel]] = torch.multinomial(probs_GV[sel], 1).squeeze(-1)
            for g, i in enumerate(idx):
                if rows[i].generator is not None:
                    toks_N[i] = torch.multinomial(probs_GV[g : g + 1], 1, generator=rows[i].generator)[0, 0]
        self._present[torch.arange(first_slot, first_slot + n, device=self.device), toks_N] = True
        produced = toks_N.tolist()  # the one host sync per step
        for r, tok in zip(rows, produced):
            r.accept(tok)
        with self._cv:
            self.stats["completion_tokens_total"] += n

    def _leave(self) -> None:
        """Rows that ended, or whose request was cancelled, leave; the last row fills each hole."""
        rows = self._rows
        ended = []
        for i in range(len(rows) - 1, -1, -1):
            r = rows[i]
            if not r.done and r.req.cancelled:
                r.done = True
                _end(r.req, "cancelled")
            if not r.done:
                continue
            ended.append(r)
            last = len(rows) - 1
            if i != last:
                self._cache.move(last, i, rows[last].length)
                self._present[i] = self._present[last]
                rows[i] = rows[last]
            rows.pop()
        self._finish_record(ended)

    def _finish_record(self, rows: list[_Row]) -> None:
        if not rows:
            return
        with self._cv:
            for r in rows:
                self._running -= 1
                self._record(r.req)

    def _fail_running(self, message: str) -> None:
        rows, self._rows = self._rows, []
        for r in rows:
            r.finish("error", message=message)
        self._finish_record(rows)

    def _record(self, req: Request) -> None:
        """Book-keeping for an ended request (lock held)."""
        name = {"cancelled": "requests_cancelled", "error": "requests_failed"}.get(req.status, "requests_finished")
        self.stats[name] += 1
        ttft = None if req.first_token_at is None else round(req.first_token_at - req.created, 4)
        self.recent.append(
            {
                "id": req.id,
                "status": req.status,
                "completion_tokens": req.completion_tokens,
                "max_tokens": req.params.max_tokens,
                "prompt_tokens": len(req.prompt_ids),
                "time_to_first_token_s": ttft,
            }
        )
