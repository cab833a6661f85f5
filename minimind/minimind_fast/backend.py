"""Where RL rollouts generate: the in-process engine (the default) or an OpenAI-compatible server over HTTP.

    backend = make_backend("engine", model, tokenizer)                       # minimind_fast.engine.Engine, here
    backend = make_backend("http://127.0.0.1:8998", model, tokenizer)        # tools/serve.py --allow_weight_reload
    done = backend.generate([ids_a, ids_b], [SamplingParams(max_tokens=64, temperature=0.8, seed=1), ...])
    done[0].output_ids, done[0].content, done[0].finish_reason               # "stop" | "length"
    backend.sync_weights(policy)                                              # after each optimizer step

The interface (RolloutBackend): generate(prompts, params) -> one Completion per prompt, in order: output_ids are the
sampled ids exactly (ending with eos when the model ended the answer), content the decoded text, finish_reason "stop"
(eos or a stop string) or "length" (max_tokens). eos_id and context (the model's positions) are what the rollout
code reads off an Engine. sync_weights(model): from now on generate with these weights. A failure is a BackendError
with one line naming where (the URL, or the prompt's index) and what went wrong.

EngineBackend(model, tokenizer, eos_id (default: the tokenizer's; one of the two is needed)): an Engine over the live
model, built for each call with every prompt in one batch (as train/rollout.py builds it), the model in eval mode
meanwhile; its tokens are exactly Engine.generate's. sync_weights is a no-op for the same model: the engine reads the
model's own parameters. Content is the whole decoded answer (a `<think>` part is not split off, as the HTTP answer's
text is not), "" without a tokenizer.

HTTPBackend(base_url, api_key, model_name, timeout): POST {base_url}/v1/completions, one request per prompt (each
with its own seed), many at once from a thread pool; results come back in the prompts' order. The server batches
concurrent requests, and on tools/serve.py a request's tokens do not depend on what else runs, so they are the
in-process engine's exactly. Each body: "prompt" as the list
of token ids (OpenAI's API allows an array of integers), max_tokens, temperature, top_p, n=1, "return_token_ids":
true (vLLM's extension, answered with the choice's "token_ids"), and where they differ from the defaults top_k, seed,
repetition_penalty, stop, ignore_eos (extensions that vLLM and tools/serve.py both take). context comes from the
server's model card ("max_model_len", as vLLM and tools/serve.py report it) unless given. Only the standard library
is used (urllib), so rollouts need no HTTP package.
sync_weights(model) writes the policy with the project's checkpoint writer (minimind_fast.checkpoint.save_checkpoint:
safetensors, manifest with sha256) into sync_dir (default: a temporary folder of this process), POSTs
{base_url}/v1/load_weights {"path": that folder}, and checks the answer: the sha256 of the model.safetensors it
loaded must be the one written, and its weights version must have moved forward. The server must see the folder at
the same path (loopback, or a shared file system mounted at the same place). The model is saved as its full state
dict (DDP and torch.compile prefixes removed): merge LoRA adapters first, gather a sharded model first. Requests
that are running on the server while it loads finish on the old weights (it drains before the copy).

Pointing rollouts at another OpenAI-compatible server (vLLM, SGLang):
  - It must accept a token-id prompt on /v1/completions and return the sampled ids in the choice as "token_ids" when
    asked with "return_token_ids" (vLLM does from 0.10.2; check your SGLang version: an answer without token_ids is a
    BackendError, never a re-tokenization of the text, which would not give back the sampled ids). RL needs the ids
    the policy sampled, eos included when it ended a turn: check that yours ends a "stop" answer with eos as ours does.
  - It must serve the same weights and tokenizer: export the policy with `python tools/export.py hf --load CKPT --out
    DIR` and serve DIR. Its tokens will not be bit-identical to this engine's (other kernels, another random stream);
    only tools/serve.py reproduces the in-process engine exactly (same greedy and same-seed tokens).
  - Weight sync is ours only: sync_weights talks to tools/serve.py's /v1/load_weights, and against another server it
    fails with a BackendError (HTTP 404) rather than go on sampling from stale weights. What to do instead: SGLang can
    reload a Hugging Face folder from disk (its POST /update_weights_from_disk), so export the policy after each step
    and call that yourself; for vLLM, restart `vllm serve` on a fresh export every few steps, or drive its own
    in-process weight-update machinery from a script of yours; otherwise keep tools/serve.py as the rollout server (or
    accept stale weights knowingly: off-policy rollouts that an importance-weighted loss must correct).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from http.client import HTTPException
from pathlib import Path
from typing import Any, Protocol

import torch

from minimind_fast.checkpoint import MANIFEST_FILE, MODEL_FILE, clean_state_keys, save_checkpoint
from minimind_fast.engine import Engine, RequestError, SamplingParams, params_per_prompt


class BackendError(RuntimeError):
    """A generation or weight sync that failed; the message is one line naming where and what. status: the HTTP
    status of the server's answer, when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Completion:
    """One generated answer: the sampled ids (eos included when the model ended it), its text, "stop" or "length"."""

    output_ids: list[int]
    content: str
    finish_reason: str

    @property
    def status(self) -> str:
        """The engine Request's name for how it ended, so code written against Engine.generate reads a Completion
        unchanged (a failed request raises BackendError instead of coming back with status "error")."""
        return self.finish_reason


class RolloutBackend(Protocol):
    """What every rollout caller uses (see the module docstring)."""

    @property
    def eos_id(self) -> int | None: ...

    @property
    def context(self) -> int: ...

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]: ...

    def sync_weights(self, model: torch.nn.Module) -> Any: ...


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# ----------------------------------------------------------------------------------------------------------------
# In-process


class EngineBackend:
    """Generate with minimind_fast.engine.Engine over the live model (the module docstring says how)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        eos_id: int | None = None,
        *,
        max_batch: int | None = None,
        max_batch_tokens: int = 1 << 62,
        compile_decode: bool | str = False,
    ):
        """eos_id: where answers end (default: the tokenizer's); max_batch None: every prompt of a call in one batch
        (and max_batch_tokens unbounded), as the rollouts run it; give both to bound the memory of the KV cache."""
        self.model, self.tokenizer = model, tokenizer
        self._eos = eos_id if eos_id is not None or tokenizer is None else tokenizer.eos_id
        if self._eos is None:  # an engine without one never stops early: a rollout never wants that by accident
            raise ValueError("EngineBackend needs eos_id or a tokenizer (whose eos_id ends the answers)")
        self.max_batch, self.max_batch_tokens, self.compile_decode = max_batch, max_batch_tokens, compile_decode

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def engine(self, rows: int) -> Engine:
        """The engine a call with `rows` prompts runs on."""
        return Engine(
            self.model,
            self.tokenizer,
            eos_id=self._eos,
            max_batch=self.max_batch or max(rows, 1),
            max_batch_tokens=self.max_batch_tokens,
            compile_decode=self.compile_decode,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        # The whole answer as content: the HTTP backend's text is not split either.
        each = [replace(p, split_reasoning=False) for p in params_per_prompt(prompts, params)]
        if not prompts:
            return []
        engine = self.engine(len(prompts))
        prompts = [[int(t) for t in p] for p in prompts]
        for i, (p, sp) in enumerate(zip(prompts, each)):
            try:
                engine.check(p, sp)
            except RequestError as exc:
                raise BackendError(f"engine: prompt {i}: {exc}") from None
        with _eval_mode(self.model):
            reqs = engine.generate(prompts, each)
        out = []
        for i, r in enumerate(reqs):
            if r.finish_reason not in ("stop", "length"):
                raise BackendError(f"engine: prompt {i}: {r.error or r.status}")
            out.append(Completion(list(r.output_ids), r.content, r.finish_reason))
        return out

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy for the model held (the engine reads its parameters at every step); another model object
        is held from now on."""
        self.model = model


# ----------------------------------------------------------------------------------------------------------------
# Over HTTP


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def _error_detail(raw: bytes) -> str:
    """The message of an error answer: OpenAI's {"error": {"message"}}, vLLM's older {"message"}, else the text."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        return _one_line(text) or "(empty body)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return _one_line(err["message"])
        if isinstance(err, str):
            return _one_line(err)
        if isinstance(body.get("message"), str):
            return _one_line(body["message"])
        if isinstance(body.get("detail"), str):
            return _one_line(body["detail"])
    return _one_line(text)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The MiniMind inside DDP (.module) or torch.compile (._orig_mod) wrappers."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise BackendError(f"sync_weights: a {type(model).__name__} is not a MiniMind model (no .config)")
        model = inner
    return model


class HTTPBackend:
    """Generate on an OpenAI-compatible server; sync weights with tools/serve.py (the module docstring says how)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model_name: str | None = None,
        timeout: float = 600.0,
        *,
        eos_id: int | None = None,
        context: int | None = None,
        max_concurrency: int = 64,
        sync_dir: str | Path | None = None,
    ):
        """base_url: http(s)://host:port (a trailing /v1 is accepted); model_name: sent as "model" (None: left out,
        which tools/serve.py and vLLM take as the one model served); timeout: seconds one request may take, a weight
        load included; eos_id: the tokenizer's turn end (what a rollout ends turns at); context: the model's positions
        (None: read from the server's model card); max_concurrency: requests in flight at once; sync_dir: where
        sync_weights writes the policy (None: a temporary folder, removed by close())."""
        url = base_url.strip().rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"rollout server {base_url!r}: expected http://host:port or https://host:port")
        if max_concurrency < 1 or not timeout > 0:
            raise ValueError("HTTPBackend: max_concurrency must be >= 1 and timeout > 0")
        self.base_url, self.api_key, self.model_name, self.timeout = url, api_key, model_name, float(timeout)
        self._eos, self._context, self.max_concurrency = eos_id, context, max_concurrency
        self._sync_dir = Path(sync_dir) if sync_dir is not None else None
        self._own_dir: Path | None = None
        self.weights_version: int | None = None  # the server's, as of our last sync
        # A proxy from the environment must not see loopback traffic (and often cannot reach it).
        local = parts.hostname in ("localhost", "::1") or (parts.hostname or "").startswith("127.")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if local else None

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def context(self) -> int:
        if self._context is None:
            cards = self._request("GET", "/v1/models").get("data")
            cards = cards if isinstance(cards, list) else []
            card = next((c for c in cards if isinstance(c, dict) and c.get("id") == self.model_name), None)
            card = card or (cards[0] if cards and isinstance(cards[0], dict) else {})
            n = card.get("max_model_len")
            if not isinstance(n, int) or n < 1:
                raise BackendError(
                    f"GET {self.base_url}/v1/models: the model card has no max_model_len; give the context "
                    "(HTTPBackend(context=N))"
                )
            self._context = n
        return self._context

    # -- requests
    def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        where = f"{method} {url}"
        try:
            opener = self._opener.open if self._opener is not None else urllib.request.urlopen
            with opener(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc.read())
            hint = " (a missing or wrong API key)" if exc.code == 401 else ""
            raise BackendError(f"{where}: HTTP {exc.code}{hint}: {detail}", exc.code) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ConnectionRefusedError):
                what = "connection refused (is the server running, on that port?)"
            elif isinstance(reason, TimeoutError):
                what = f"no answer within {self.timeout:g} s"
            elif isinstance(reason, socket.gaierror):
                what = f"unknown host ({reason})"
            else:
                what = _one_line(str(reason))
            raise BackendError(f"{where}: {what}") from None
        except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
            raise BackendError(f"{where}: no answer within {self.timeout:g} s") from None
        except (ConnectionError, HTTPException) as exc:
            raise BackendError(
                f"{where}: the connection failed ({type(exc).__name__}: {_one_line(str(exc))})"
            ) from None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise BackendError(
                f"{where}: the answer is not JSON: {_one_line(raw.decode('utf-8', 'replace'))}"
            ) from None
        if not isinstance(answer, dict):
            raise BackendError(f"{where}: the answer is not a JSON object")
        return answer

    def request_body(self, prompt: Sequence[int], p: SamplingParams) -> dict[str, Any]:
        """The /v1/completions body for one prompt (the fields at their defaults left out, for servers without them)."""
        body: dict[str, Any] = {
            "prompt": [int(t) for t in prompt],
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "n": 1,
            "return_token_ids": True,
        }
        if self.model_name is not None:
            body["model"] = self.model_name
        if p.top_k:
            body["top_k"] = p.top_k
        if p.seed is not None:
            body["seed"] = p.seed
        if p.repetition_penalty != 1.0:
            body["repetition_penalty"] = p.repetition_penalty
        if p.stop:
            body["stop"] = list(p.stop)
        if p.ignore_eos:
            body["ignore_eos"] = True
        return body

    def _complete(self, index: int, body: dict[str, Any]) -> Completion:
        where = f"POST {self.base_url}/v1/completions (prompt {index})"
        answer = self._request("POST", "/v1/completions", body)
        choices = answer.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise BackendError(f"{where}: expected one choice, got {_one_line(json.dumps(choices))[:120]}")
        choice = choices[0]
        ids = choice.get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BackendError(
                f"{where}: the choice carries no token_ids: the server must support return_token_ids "
                "(tools/serve.py; vLLM 0.10.2 or later)"
            )
        finish = choice.get("finish_reason")
        if finish not in ("stop", "length"):
            raise BackendError(f"{where}: finish_reason {finish!r} (expected stop or length)")
        text = choice.get("text")
        return Completion(list(ids), text if isinstance(text, str) else "", finish)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        bodies = [self.request_body(p, sp) for p, sp in zip(prompts, params_per_prompt(prompts, params))]
        if not bodies:
            return []
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(bodies)), thread_name_prefix="rollout-http")
        done = False
        try:
            futures = [pool.submit(self._complete, i, b) for i, b in enumerate(bodies)]
            out = [f.result() for f in futures]
            done = True
            return out
        finally:
            # On an error: raise at once; what has not started never starts (what runs ends on its own).
            pool.shutdown(wait=done, cancel_futures=True)

    # -- weights
    def sync_folder(self) -> Path:
        """The folder sync_weights writes (created on first use)."""
        if self._sync_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="minimind-rollout-sync-"))
            self._sync_dir = self._own_dir
        return (self._sync_dir / "policy").resolve()

    def sync_weights(self, model: torch.nn.Module) -> dict[str, Any]:
        """Write the policy, have the server load it, check what it loaded -> the server's answer
        {"loaded", "version", "sha256"}."""
        inner = _unwrap(model)
        folder = self.sync_folder()
        state = clean_state_keys(model.state_dict())
        save_checkpoint(folder, inner, inner.config, state_dict=state, meta={"purpose": "rollout weight sync"})
        written = json.loads((folder / MANIFEST_FILE).read_text())[MODEL_FILE]["sha256"]
        where = f"POST {self.base_url}/v1/load_weights"
        try:
            answer = self._request("POST", "/v1/load_weights", {"path": str(folder)})
        except BackendError as exc:
            if exc.status == 404:
                raise BackendError(
                    f"{exc}; weight sync needs tools/serve.py started with --allow_weight_reload (another server "
                    "cannot load our checkpoints: see minimind_fast.backend)",
                    404,
                ) from None
            raise
        version = answer.get("version")
        if answer.get("sha256") != written:
            raise BackendError(
                f"{where}: the server loaded weights with sha256 {answer.get('sha256')!r}, not the {written} written "
                f"to {folder} (does it see this folder at the same path?)"
            )
        if not isinstance(version, int) or (self.weights_version is not None and version <= self.weights_version):
            raise BackendError(f"{where}: weights version {version!r} did not move past {self.weights_version}")
        self.weights_version = version
        return answer

    def close(self) -> None:
        """Remove the temporary sync folder, if this backend made one."""
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = self._sync_dir = None

    def __enter__(self) -> HTTPBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# From a flag


SPEC_HELP = "'engine' or 'http://host:port[,key=KEY][,model=NAME][,timeout=SECONDS][,sync_dir=DIR]'"


def make_backend(
    spec: str,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    eos_id: int | None = None,
    api_key: str | None = None,
) -> EngineBackend | HTTPBackend:
    """A backend from a flag's value: "engine" (the in-process engine over model), or a server's URL with options
    after commas. The API key: api_key, else key= (visible in the process list: prefer the next), else the
    MINIMIND_API_KEY environment variable (the one tools/serve.py reads), else none."""
    text = spec.strip()
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_id
    if text == "engine":
        if model is None:
            raise ValueError("rollout backend 'engine' needs the model")
        return EngineBackend(model, tokenizer, eos_id)
    url, *options = [part.strip() for part in text.split(",")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"rollout backend {spec!r}: expected {SPEC_HELP}")
    kw: dict[str, Any] = {}
    key = None
    for opt in options:
        name, sep, value = opt.partition("=")
        if not sep or not value or name not in ("key", "model", "timeout", "sync_dir"):
            raise ValueError(
                f"rollout backend {spec!r}: option {opt!r} is not one of key=, model=, timeout=, sync_dir="
            )
        if name == "key":
            key = value
        elif name == "model":
            kw["model_name"] = value
        elif name == "sync_dir":
            kw["sync_dir"] = value
        else:
            try:
                kw["timeout"] = float(value)
            except ValueError:
                raise ValueError(f"rollout backend {spec!r}: timeout={value!r} is not a number of seconds") from None
    key = api_key or key or os.environ.get("MINIMIND_API_KEY") or None
    return HTTPBackend(url, api_key=key, eos_id=eos_id, **kw)
