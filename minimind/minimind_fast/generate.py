"""Batched autoregressive generation for MiniMind: KV-cached decoding, sampling processors, streaming text.

    from minimind_fast.generate import generate, stream_generate
    outs = generate(model, [tok.encode("a"), tok.encode("a longer prompt")], max_new_tokens=64, top_p=0.85)
    for deltas in stream_generate(model, tok, [ids], max_new_tokens=64, temperature=0.85):
        print(deltas[0], end="", flush=True)

How a batch is decoded:
  - Prompts of mixed lengths are left-padded to the longest one (P tokens). Row i's real tokens sit in the columns
    P-len_i..P-1 with rotary positions 0..len_i-1; an attention mask (1 real, 0 pad) hides the pad columns.
    A batch without padding passes no mask at all, so its prefill keeps SDPA's causal fast path.
  - One KVCache of exactly P + max_new_tokens positions is allocated up front and written in place: a prefill pass
    fills P positions, then every step feeds one token per row.
  - A row that has produced eos is finished: it keeps being fed pad tokens (the batch stays rectangular and the cache
    shared) but its output is frozen. The loop stops as soon as every row is finished, or after max_new_tokens.
  - Logits are processed in fp32, in this order: repetition penalty, temperature, top-k, top-p; then a token is
    drawn (or the argmax taken when greedy=True or temperature=0).

Everything runs under torch.inference_mode. The KV cache takes the model's dtype, or bf16 when the model is fp32 on
CUDA, where the forward passes run under bf16 autocast. The model runs in whatever mode it is in: call model.eval()
first (dropout in training mode would add noise).

compile_decode=True wraps the one-token decode forward (embedding, blocks, final norm, last-position head) in
torch.compile with dynamic shapes. Per step a small model is dominated by Python and by dozens of tiny kernel
launches; compiled, the step becomes a few fused kernels. The cache's growing length and the mask's width are dynamic
dimensions, so it compiles once (per batch size) rather than once per step; the first call pays the compile time
(tens of seconds). Prefill and sampling stay eager. A string or callable instead of True names the torch.compile
backend ("inductor" is the default; "eager"/"aot_eager" check the graph capture without code generation).

Streaming: a byte-level BPE token may hold only part of a UTF-8 character, so IncrementalDecoder holds tokens back
until their text decodes without a trailing U+FFFD; the pieces concatenate exactly to the full decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from minimind_fast.model import KVCache

StepCallback = Callable[[list[int | None]], None]


class GenerationError(ValueError):
    """Arguments that cannot be generated from (context too long, empty prompt, bad sampling parameter)."""


# ----------------------------------------------------------------------------------------------------------------
# Logits processors: each takes fp32 logits [B, V] and returns new ones; -inf marks a token that may not be drawn.


def apply_repetition_penalty(logits_BV: torch.Tensor, present_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already present in the row (prompt or output).

    CTRL (Keskar et al. 2019, "CTRL: A Conditional Transformer Language Model for Controllable Generation", sec. 4.1):
    a positive logit is divided by the penalty and a negative one multiplied by it, so that penalty > 1 always makes
    the token less likely (dividing a negative logit would raise it).
    """
    if penalty == 1.0:
        return logits_BV
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(present_BV, penalised, logits_BV)


def apply_temperature(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): T < 1 sharpens, T > 1 flattens."""
    if temperature == 1.0:
        return logits_BV
    return logits_BV / temperature


def apply_top_k(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (0 or k >= V: keep all)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    # Indices, not a threshold: a threshold would keep every token tied with the k-th.
    idx_BK = logits_BV.topk(k, dim=-1).indices
    keep_BV = torch.zeros_like(logits_BV, dtype=torch.bool).scatter_(-1, idx_BK, True)
    return logits_BV.masked_fill(~keep_BV, float("-inf"))


def apply_top_p(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration", sec. 3.1): keep the
    smallest set of most probable tokens whose total probability reaches p. p >= 1 keeps all."""
    if p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    # Probability mass strictly ahead of each token: a token is needed while that mass is still short of p.
    ahead_BV = torch.cat([torch.zeros_like(probs_BV[:, :1]), probs_BV.cumsum(dim=-1)[:, :-1]], dim=-1)
    drop_sorted_BV = ahead_BV >= p
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter_(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def process_logits(
    logits_BV: torch.Tensor,
    present_BV: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Repetition penalty, temperature, top-k, top-p, in that order, in fp32."""
    logits_BV = logits_BV.float()
    if present_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, present_BV, repetition_penalty)
    logits_BV = apply_temperature(logits_BV, temperature)
    logits_BV = apply_top_k(logits_BV, top_k)
    return apply_top_p(logits_BV, top_p)


def sample_tokens(logits_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(logits) [B, V] -> [B]."""
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def forward_last(model, ids_BT, mask_BS, pos_BT, cache) -> torch.Tensor:
    """Logits of the last position, fp32 [B, V]."""
    out = model(ids_BT, attention_mask=mask_BS, position_ids=pos_BT, kv_cache=cache, last_only=True)
    return out.logits[:, -1].float()


_COMPILED: dict[Any, Callable] = {}


def compiled_decode_step(backend: str | Callable = "inductor") -> Callable:
    """The decode forward under torch.compile(dynamic=True) for that backend, built once per process."""
    fn = _COMPILED.get(backend)
    if fn is None:
        fn = _COMPILED[backend] = torch.compile(forward_last, dynamic=True, backend=backend)
    return fn


def decode_step(compile_decode: bool | str | Callable = False) -> Callable:
    """The decode forward a generator or engine uses: forward_last, or compiled (True = inductor, or a backend)."""
    if not compile_decode:
        return forward_last
    return compiled_decode_step("inductor" if compile_decode is True else compile_decode)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def check_context(model: torch.nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    """Raise GenerationError when prompt_len + max_new_tokens does not fit the model's positions."""
    limit = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise GenerationError(
            f"context too long: prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} > max_position_embeddings {limit}; shorten the prompt or max_new_tokens"
        )


def _validate(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, vocab_size) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty (it needs at least one token, e.g. bos)")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise GenerationError(f"repetition_penalty must be > 0, got {repetition_penalty}")


class _BatchDecoder:
    """The state of one batched generation. Every tensor op happens inside one of the inference_mode methods, so
    nothing leaks grad-mode or autocast state to the caller between steps of generate_iter."""

    @torch.inference_mode()
    def __init__(self, model, prompts, max_new_tokens, sampling, eos_id, pad_id, generator, use_cache, compile_decode):
        self.model, self.sampling, self.eos_id, self.pad_id = model, sampling, eos_id, pad_id
        self.generator, self.use_cache = generator, use_cache
        self.device, dtype = _model_device_dtype(model)
        self.autocast = self.device.type == "cuda" and dtype == torch.float32
        cache_dtype = torch.bfloat16 if self.autocast else dtype
        b = len(prompts)
        lens = [len(p) for p in prompts]
        self.prompt_len = p_len = max(lens)
        self.max_new = max_new_tokens
        total = p_len + max_new_tokens
        ids_BL = torch.full((b, total), pad_id, dtype=torch.long)
        mask_BL = torch.zeros((b, total), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids_BL[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
            mask_BL[i, p_len - len(p) :] = 1
        self.padded = min(lens) < p_len
        # Column j of row i holds rotary position (number of real tokens before it); generated columns continue it.
        pos_BL = (mask_BL.cumsum(dim=-1) - 1).clamp(min=0)
        self.ids_BL, self.mask_BL, self.pos_BL = ids_BL.to(self.device), mask_BL.to(self.device), pos_BL.to(self.device)
        self.present_BV = None
        if sampling["repetition_penalty"] != 1.0:
            present = torch.zeros((b, model.config.vocab_size), dtype=torch.bool)
            for i, p in enumerate(prompts):
                present[i, torch.tensor(p, dtype=torch.long)] = True
            self.present_BV = present.to(self.device)
        self.done_B = torch.zeros(b, dtype=torch.bool, device=self.device)
        self.done = [False] * b
        self.step = 0
        self.cache = None
        if use_cache:
            self.cache = KVCache(model.config, b, total, device=self.device, dtype=cache_dtype)
        self.decode_fn = decode_step(compile_decode)

    @property
    def finished(self) -> bool:
        return self.step >= self.max_new or all(self.done)

    def _amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    @torch.inference_mode()
    def prefill(self) -> list[int | None]:
        p = self.prompt_len
        mask = self.mask_BL[:, :p] if self.padded else None
        with self._amp():
            logits_BV = forward_last(self.model, self.ids_BL[:, :p], mask, self.pos_BL[:, :p], self.cache)
        return self._choose(logits_BV)

    @torch.inference_mode()
    def decode(self) -> list[int | None]:
        col = self.prompt_len + self.step - 1  # the column of the token chosen last step, fed now
        mask = self.mask_BL[:, : col + 1] if self.padded else None
        with self._amp():
            if self.use_cache:
                logits_BV = self.decode_fn(
                    self.model, self.ids_BL[:, col : col + 1], mask, self.pos_BL[:, col : col + 1], self.cache
                )
            else:
                logits_BV = forward_last(self.model, self.ids_BL[:, : col + 1], mask, self.pos_BL[:, : col + 1], None)
        return self._choose(logits_BV)

    def _choose(self, logits_BV: torch.Tensor) -> list[int | None]:
        s = self.sampling
        greedy = s["greedy"] or s["temperature"] == 0
        logits_BV = process_logits(
            logits_BV,
            self.present_BV,
            temperature=1.0 if greedy else s["temperature"],
            top_k=0 if greedy else s["top_k"],
            top_p=1.0 if greedy else s["top_p"],
            repetition_penalty=s["repetition_penalty"],
        )
        tok_B = logits_BV.argmax(dim=-1) if greedy else sample_tokens(logits_BV, self.generator)
        tok_B = torch.where(self.done_B, torch.full_like(tok_B, self.pad_id), tok_B)
        self.ids_BL[:, self.prompt_len + self.step] = tok_B
        if self.eos_id is not None:
            self.done_B |= tok_B == self.eos_id
        if self.present_BV is not None:
            self.present_BV.scatter_(1, tok_B[:, None], True)
        self.step += 1
        toks = tok_B.tolist()  # the one host sync per step
        out: list[int | None] = []
        for i, t in enumerate(toks):
            if self.done[i]:
                out.append(None)
            else:
                out.append(t)
                self.done[i] = t == self.eos_id
        return out


def generate_iter(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    eos_id: int | None = 2,
    pad_id: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile_decode: bool | str | Callable = False,
) -> Iterator[list[int | None]]:
    """Yield, step by step, one new token per row: an int, or None for a row that finished at an earlier step.

    Arguments as for generate(). Validation and the context check happen at the first next().
    """
    prompts = [list(p) for p in prompts]
    _validate(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, model.config.vocab_size)
    check_context(model, max(len(p) for p in prompts), max_new_tokens)
    if max_new_tokens == 0:
        return
    if generator is None and seed is not None:
        generator = torch.Generator(device=_model_device_dtype(model)[0]).manual_seed(seed)
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, greedy=greedy
    )
    state = _BatchDecoder(
        model, prompts, max_new_tokens, sampling, eos_id, pad_id, generator, use_cache, compile_decode
    )
    yield state.prefill()
    while not state.finished:
        yield state.decode()


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    eos_id: int | None = 2,
    pad_id: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stream: StepCallback | None = None,
    use_cache: bool = True,
    compile_decode: bool | str | Callable = False,
) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt (lists of token ids, mixed lengths allowed, batched together).

    Returns each row's new tokens, ending with eos_id when it was produced (eos_id=None: never stop early).
    greedy=True or temperature=0 takes the argmax (after the repetition penalty). Sampling draws from `generator`,
    or from a fresh one seeded with `seed`, or from torch's global RNG. `stream`, if given, is called after every
    step with what generate_iter yields. use_cache=False recomputes the whole sequence every step (slow; for
    checking). Raises GenerationError when the longest prompt + max_new_tokens exceeds max_position_embeddings.
    """
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_iter(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        greedy=greedy,
        eos_id=eos_id,
        pad_id=pad_id,
        seed=seed,
        generator=generator,
        use_cache=use_cache,
        compile_decode=compile_decode,
    ):
        for row, t in zip(outs, step):
            if t is not None:
                row.append(t)
        if stream is not None:
            stream(step)
    return outs


# ----------------------------------------------------------------------------------------------------------------
# Streaming text


class IncrementalDecoder:
    """Token ids in, printable text pieces out.

    Tokens are held back while their text ends in U+FFFD (an unfinished UTF-8 character). A piece is released only
    when it ends on a whole character, so each held-back run starts on a character boundary and the pieces
    concatenate to exactly tokenizer.decode(all ids). flush() releases whatever is left (at the end of a generation).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens) if self.pending else ""
        self.pending = []
        return text


def stream_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    skip_special_tokens: bool = True,
    **kwargs: Any,
) -> Iterator[list[str]]:
    """Yield, per step, the new text of every row ("" when a row has nothing printable yet or has finished); a last
    item flushes held-back text. Concatenated, a row's pieces equal tokenizer.decode(its generate() output,
    skip_special_tokens). kwargs are generate()'s sampling and control arguments (not `stream`)."""
    decoders = [IncrementalDecoder(tokenizer, skip_special_tokens) for _ in prompts]
    for step in generate_iter(model, prompts, max_new_tokens, **kwargs):
        yield [d.push(t) if t is not None else "" for d, t in zip(decoders, step)]
    tail = [d.flush() for d in decoders]
    if any(tail):
        yield tail
