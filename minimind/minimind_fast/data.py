"""Data sets for every training stage, read from MiniMind's JSONL formats (one JSON object per line).

    pretrain   {"text": "..."}                                         -> PretrainDataset (packed rows)
    SFT, LoRA, reasoning, RL prompts
               {"conversations": [{"role": "system|user|assistant|tool", "content": "..."}, ...]}
                                                                       -> SFTDataset / RLPromptDataset
               with MiniMind's tool use: a system message may carry "tools" (tool specs), an assistant message
               "tool_calls" ([{"name", "arguments"}] or OpenAI's {"type": "function", "function": {...}}; its content
               may then be "" or null), both as JSON text or as JSON; {"role": "tool", "content": ...} holds a result
    DPO        {"chosen": [messages...], "rejected": [messages...]}  -> DPODataset

Large files are never read whole: pretrain JSONL is tokenized while streaming (or memory-mapped from the flat token
file that tools/prepare_data.py writes), and the conversation formats keep only a numpy array of line byte offsets
(JsonlIndex) and parse a record when it is asked for.

Loss mask (conversations): the loss covers every token after `<|im_start|>assistant\\n` up to and including the
`<|im_end|>\\n` that closes that turn (its `<tool_call>` blocks included); everything else is labelled -100, so the
tools block of the system turn and the tool results (which the template renders in a user turn) are never trained.
Labels are NOT shifted: labels[t] is the target for position t and the model shifts internally (position t-1
predicts token t).

Every error about the input names `path:lineno` and what was expected. With `skip_bad_lines=True` a data set counts
bad lines instead (`.bad_lines`, first few messages in `.bad_line_reasons`). A data set with no usable record is an
error, never a silent zero-step run.

Shape legend: T sequence length (<= max_seq_len), B batch, P padded prompt length.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from minimind_fast.tokenizer import ROLES, Tokenizer

IGNORE_INDEX = -100
TOKEN_DTYPE = np.uint16  # every id of a <= 65536-entry vocabulary fits; halves the size of int32 token files
MAX_VOCAB_FOR_UINT16 = 65536
MAX_REASONS = 5  # how many bad-line messages a data set keeps for its report
PROGRESS_BYTES = 32 << 20  # show a progress bar when tokenizing files larger than this
CHUNK_BYTES = 1 << 20  # lines are tokenized in batches of about this much text

ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>\n"


class DataError(ValueError):
    """An input file or record that cannot be used; the message names `path:lineno` and what was expected."""


class BadLines:
    """Where bad lines go: raised at once (default) or, with skip=True, counted and the first few kept."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.reasons: list[str] = []

    def report(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.count += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(str(err))

    def summary(self) -> str:
        if not self.count:
            return ""
        return f" ({self.count} bad lines skipped; first: {self.reasons[0]})"


# ---------------------------------------------------------------------------------------------------------------------
# Reading JSONL
# ---------------------------------------------------------------------------------------------------------------------


def parse_line(raw: bytes, path: str | Path, lineno: int) -> dict:
    """One JSONL line (bytes) -> its JSON object, or DataError naming path:lineno."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason}); expected UTF-8 JSON text") from exc
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    # JSON may escape a lone UTF-16 surrogate ("\ud800"); Python decodes it into a str that no UTF-8 encoder (the
    # tokenizer's included) accepts, so the line would crash the run when first tokenized. Only a line holding a
    # \uD8xx-\uDFxx escape can carry one, and a byte search for it is far cheaper than walking every string.
    if b"\\ud" in raw or b"\\uD" in raw:
        field = _lone_surrogate(obj, "")
        if field is not None:
            raise DataError(
                f"{path}:{lineno}: {field} holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without its "
                "pair), which is not Unicode text; expected valid UTF-8 text (astral characters as a surrogate pair)"
            )
    return obj


def _lone_surrogate(value: Any, where: str) -> str | None:
    """Where in a parsed JSON value a string (or key) holds an unpaired surrogate: 'conversations[1].content', or
    None. Paired surrogates were already joined into one character by the JSON decoder."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the value"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if _lone_surrogate(k, "key") is not None:
                return f"a key of {where}" if where else "a key"
            found = _lone_surrogate(v, f"{where}.{k}" if where else k)
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


def iter_numbered_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(lineno, raw bytes) for every non-blank line, streaming; lineno counts from 1 and includes blank lines."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw


def iter_jsonl(path: str | Path, on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Stream (lineno, object) from a JSONL file, one line at a time. Blank lines are skipped.

    A line that is not a JSON object raises DataError, unless on_error is given: then it is passed the error (it may
    raise it or record it) and the line is skipped.
    """
    for lineno, raw in iter_numbered_lines(path):
        try:
            obj = parse_line(raw, path, lineno)
        except DataError as err:
            if on_error is None:
                raise
            on_error(err)
            continue
        yield lineno, obj


def iter_line_chunks(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[list[tuple[int, bytes]], int]]:
    """Batches of (lineno, raw) lines of about chunk_bytes each, with the number of bytes (blank lines too) read."""
    chunk: list[tuple[int, bytes]] = []
    size = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            size += len(raw)
            if raw.strip():
                chunk.append((lineno, raw))
            if size >= chunk_bytes:
                yield chunk, size
                chunk, size = [], 0
    if chunk or size:
        yield chunk, size


class JsonlIndex:
    """Random access into a JSONL file without loading it: one pass stores where each record's line starts.

    `offsets[i]` / `linenos[i]` (int64 numpy arrays) locate record i; record(i) seeks there and parses that one line.
    With a `validate(obj, where)` callable every line is also parsed and checked during the pass, so bad records are
    reported (or skipped, see BadLines) before training starts rather than hours into it.
    """

    def __init__(
        self,
        path: str | Path,
        validate: Callable[[dict, str], Any] | None = None,
        bad: BadLines | None = None,
    ):
        self.path = str(path)
        bad = bad if bad is not None else BadLines(skip=False)
        offsets, linenos = array("q"), array("q")
        size = os.path.getsize(path)
        with (
            open(path, "rb") as f,
            tqdm(
                total=size, unit="B", unit_scale=True, desc=f"index {Path(path).name}", disable=size < PROGRESS_BYTES
            ) as bar,
        ):
            pos = 0
            for lineno, raw in enumerate(f, 1):
                start, pos = pos, pos + len(raw)
                if lineno % 4096 == 0:
                    bar.update(pos - bar.n)
                if not raw.strip():
                    continue
                if validate is not None:
                    try:
                        validate(parse_line(raw, path, lineno), f"{path}:{lineno}")
                    except DataError as err:
                        bad.report(err)
                        continue
                offsets.append(start)
                linenos.append(lineno)
            bar.update(pos - bar.n)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.linenos = np.frombuffer(linenos, dtype=np.int64)
        self._file = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.linenos[i])}"

    def record(self, i: int) -> dict:
        # One handle per process: DataLoader workers are forked and must not share a file position.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[i]))
        return parse_line(self._file.readline(), self.path, int(self.linenos[i]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}


# ---------------------------------------------------------------------------------------------------------------------
# Record checks (each returns the validated field; `where` is "path:lineno")
# ---------------------------------------------------------------------------------------------------------------------


def check_text(obj: dict, where: str) -> str:
    if "text" not in obj:
        raise DataError(f'{where}: missing field "text" (expected {{"text": "..."}})')
    if not isinstance(obj["text"], str):
        raise DataError(f'{where}: field "text" must be a string, got {type(obj["text"]).__name__}')
    return obj["text"]


def check_messages(obj: dict, key: str, where: str, need_assistant: bool = True) -> list[dict]:
    """obj[key] must be a non-empty list of {"role": system|user|assistant|tool, "content": str} (other keys ignored),
    with MiniMind's tool-use fields where present: "tools" on a system message, "tool_calls" on an assistant message
    (whose content may then be null or missing), each given as a JSON string or as JSON (see _check_tools and
    _check_tool_calls).

    A conversation without tool fields is returned as it is. One with them is returned as new message dicts (the
    record itself is left untouched) holding the decoded lists, and an assistant content that was null as "";
    conversation_tools(messages) then gives the tools to render its system turn with."""
    expected = f'expected "{key}": [{{"role": "system|user|assistant|tool", "content": "..."}}, ...]'
    if key not in obj:
        raise DataError(f'{where}: missing field "{key}" ({expected})')
    messages = obj[key]
    if not isinstance(messages, list):
        raise DataError(f'{where}: field "{key}" must be a list, got {type(messages).__name__} ({expected})')
    if not messages:
        raise DataError(f'{where}: field "{key}" is empty ({expected})')
    decoded: dict[int, dict] = {}  # message index -> its copy with tool fields decoded
    tools_at: int | None = None
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{j}] must be an object, got {type(m).__name__} ({expected})")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{j}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        # MiniMind's loader reads every message with null tool fields, so null, "" and [] mean "none" anywhere.
        tools, calls = m.get("tools"), m.get("tool_calls")
        if _given(calls):
            if role != "assistant":
                raise DataError(f"{where}: {key}[{j}].tool_calls is only allowed on an assistant message, not {role}")
            decoded[j] = {**m, "tool_calls": _check_tool_calls(calls, f"{key}[{j}].tool_calls", where)}
        if _given(tools):
            if role != "system":
                raise DataError(f"{where}: {key}[{j}].tools is only allowed on a system message, not {role}")
            if tools_at is not None:
                raise DataError(
                    f"{where}: {key}[{j}].tools: tools already given in {key}[{tools_at}]; expected one list"
                )
            tools_at = j
            decoded[j] = {**m, "tools": _check_tools(tools, f"{key}[{j}].tools", where)}
        content = m.get("content")
        if not isinstance(content, str):
            if content is None and decoded.get(j, {}).get("tool_calls"):  # a call-only turn, as MiniMind writes it
                decoded[j]["content"] = ""
                continue
            got = type(content).__name__ if "content" in m else "nothing"
            raise DataError(f"{where}: {key}[{j}].content must be a string, got {got}")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f'{where}: field "{key}" has no assistant message, so nothing to learn from')
    if decoded:
        return [decoded.get(j, m) for j, m in enumerate(messages)]
    return messages


def _given(value: Any) -> bool:
    """Whether a tool field holds something: null, "" and [] stand for none (as in MiniMind's own loader)."""
    return value is not None and value != "" and value != []


def _decode_json_field(value: Any, field: str, where: str) -> Any:
    """A field that may be given as JSON text: decoded once, here; any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: {field} is not valid JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError as exc:
        raise DataError(f"{where}: {field} is JSON nested too deeply to read") from exc


def _check_tools(value: Any, field: str, where: str) -> list[dict]:
    """A system message's "tools": a list of tool specs (objects, e.g. OpenAI's {"type": "function", ...}), given as
    a list or as a JSON string holding one. The template writes each as one JSON line of the tools block."""
    tools = _decode_json_field(value, field, where)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        got = type(tools).__name__ if not isinstance(tools, list) else "a list with a non-object entry"
        raise DataError(f"{where}: {field} must be a list of tool objects (JSON specs), got {got}")
    return tools


def _check_tool_calls(value: Any, field: str, where: str) -> list[dict]:
    """An assistant message's "tool_calls": a list (or a JSON string holding one) of {"name": str, "arguments": ...}
    or OpenAI's {"type": "function", "function": {"name": ..., "arguments": ...}}; arguments an object, or a JSON
    string holding one (the template writes such a string as it is)."""
    shape = '{"name": "...", "arguments": {...}}'
    calls = _decode_json_field(value, field, where)
    if not isinstance(calls, list):
        raise DataError(f"{where}: {field} must be a list of calls {shape}, got {type(calls).__name__}")
    for k, call in enumerate(calls):
        at = f"{field}[{k}]"
        if not isinstance(call, dict):
            raise DataError(f"{where}: {at} must be an object {shape}, got {type(call).__name__}")
        fn = call.get("function") or call  # what the template reads: OpenAI's wrapper, else the call itself
        if not isinstance(fn, dict):
            raise DataError(f"{where}: {at}.function must be an object {shape}, got {type(fn).__name__}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f'{where}: {at} has no "name" (expected a non-empty string, as in {shape})')
        if "arguments" not in fn:
            raise DataError(f'{where}: {at} has no "arguments" (expected an object, as in {shape})')
        args = _decode_json_field(fn["arguments"], f"{at}.arguments", where)
        if not isinstance(args, dict):
            raise DataError(f"{where}: {at}.arguments must be a JSON object, got {type(args).__name__}")
    return calls


def conversation_tools(messages: Sequence[dict]) -> list[dict] | None:
    """The tools a checked conversation is rendered with (its system message's decoded "tools"), or None."""
    for m in messages:
        tools = m.get("tools") if m.get("role") == "system" else None
        if _given(tools):
            if not isinstance(tools, list):
                raise DataError("conversation tools are still JSON text: pass the messages through check_messages")
            return tools
    return None


def check_sft(obj: dict, where: str) -> list[dict]:
    return check_messages(obj, "conversations", where)


def check_dpo(obj: dict, where: str) -> tuple[list[dict], list[dict]]:
    return check_messages(obj, "chosen", where), check_messages(obj, "rejected", where)


def check_prompt(obj: dict, where: str, require: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """prompt_messages, after checking that obj has each required top-level field: require = ((field, why), ...)."""
    for field, why in require:
        if field not in obj:
            raise DataError(f'{where}: missing field "{field}" ({why})')
    return prompt_messages(obj, where)


def prompt_messages(obj: dict, where: str) -> list[dict]:
    """The conversation minus its final assistant turn (if it ends with one): what the policy is asked."""
    messages = check_messages(obj, "conversations", where, need_assistant=False)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f'{where}: "conversations" holds only an assistant turn; expected a prompt before it')
    return messages


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization helpers
# ---------------------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the id -> token table: what the ids in a token file mean. Unlike the bytes of tokenizer.json it does
    not change with JSON formatting or the `tokenizers` version."""
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    table = sorted(vocab.items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_uint16_vocab(tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > MAX_VOCAB_FOR_UINT16:
        raise DataError(
            f"vocab size {tokenizer.vocab_size} does not fit uint16 token storage (at most {MAX_VOCAB_FOR_UINT16})"
        )


def encode_documents(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """[bos] + tokens + [eos] per text, concatenated in order -> uint16 [sum(len + 2)]."""
    flat: list[int] = []
    for ids in tokenizer.encode_batch(texts):
        flat.append(tokenizer.bos_id)
        flat.extend(ids)
        flat.append(tokenizer.eos_id)
    return np.array(flat, dtype=TOKEN_DTYPE)


def encode_pretrain_chunk(
    path: str | Path, lines: Sequence[tuple[int, bytes]], tokenizer: Tokenizer
) -> tuple[np.ndarray, int, list[DataError]]:
    """Pretrain lines -> (uint16 token stream of their documents, documents encoded, errors of the bad lines).

    The one function both PretrainDataset and tools/prepare_data.py tokenize with, so both give the same tokens.
    """
    texts, errors = [], []
    for lineno, raw in lines:
        try:
            texts.append(check_text(parse_line(raw, path, lineno), f"{path}:{lineno}"))
        except DataError as err:
            errors.append(err)
    return encode_documents(texts, tokenizer), len(texts), errors


def first_id_at_least(tokens: np.ndarray, limit: int, chunk: int = 1 << 24) -> tuple[int, int] | None:
    """(position, id) of the first token id >= limit, or None. Scans in chunks (32 MiB of uint16), so a memory-mapped
    file of any size is read once at memory speed without a full-size temporary."""
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start : start + chunk])
        if int(part.max()) >= limit:
            i = int(np.argmax(part >= limit))
            return start + i, int(part[i])
    return None


def token_file_meta_path(bin_path: str | Path) -> Path:
    """The JSON sidecar of a token file: `x.bin` -> `x.bin.json`."""
    p = Path(bin_path)
    return p.with_name(p.name + ".json")


def _find(ids: list[int], pattern: list[int], start: int) -> int:
    """First index >= start where pattern occurs in ids, or -1."""
    m = len(pattern)
    try:
        i = ids.index(pattern[0], start)  # C-speed scan to each candidate
        while ids[i : i + m] != pattern:
            i = ids.index(pattern[0], i + 1)
        return i
    except ValueError:
        return -1


def assistant_mask_from_ids(ids: list[int], header_ids: list[int], end_ids: list[int]) -> tuple[np.ndarray, int]:
    """Loss mask found on token ids -> (bool [T], number of assistant spans found).

    A span starts right after each occurrence of header_ids (`<|im_start|>assistant\\n`) and ends after the next
    end_ids (`<|im_end|>\\n`), both included in the mask; an unclosed span runs to the end.
    """
    mask = np.zeros(len(ids), dtype=bool)
    spans, i = 0, 0
    while (h := _find(ids, header_ids, i)) >= 0:
        begin = h + len(header_ids)
        e = _find(ids, end_ids, begin)
        stop = len(ids) if e < 0 else e + len(end_ids)
        mask[begin:stop] = True
        spans, i = spans + 1, stop
    return mask, spans


def assistant_char_spans(
    tokenizer: Tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the character spans [start, end) the loss covers (assistant content, its tool
    calls, turn end). The template renders more than the messages (a default system turn, the tools block, tool
    results), so the renderer says where."""
    return tokenizer.assistant_spans(messages, tools=tools)


def assistant_mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Loss mask from character offsets: a token is in the loss when it starts inside an assistant span."""
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    mask = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return mask


class ChatEncoder:
    """Conversation -> (input_ids, labels), both length <= max_seq_len (right-truncated).

    The mask is searched on token ids. Content that starts with whitespace can fuse with the header's `\\n` into one
    token (a BPE with a "\\n\\n" merge does so for content starting "\\n\\n"); that header is then not found as ids,
    the count of spans differs from the count of assistant turns, and the mask is taken from the character spans of
    the rendered string instead (a token is trained when it starts inside an assistant span).
    """

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.header_ids = tokenizer.encode(ASSISTANT_HEADER)
        self.end_ids = tokenizer.encode(TURN_END)
        self.offset_fallbacks = 0  # per process: DataLoader workers keep their own count

    def mask(self, messages: Sequence[dict]) -> tuple[list[int], np.ndarray]:
        """Untruncated ids and their loss mask (bool [T])."""
        tools = conversation_tools(messages)
        text = self.tokenizer.apply_chat_template(messages, tools=tools)
        ids = self.tokenizer.encode(text)
        mask, found = assistant_mask_from_ids(ids, self.header_ids, self.end_ids)
        if found != sum(m["role"] == "assistant" for m in messages):
            self.offset_fallbacks += 1
            rendered, spans = assistant_char_spans(self.tokenizer, messages, tools)
            assert rendered == text, "chat template is not a per-message concatenation"
            enc = self.tokenizer.hf.encode(text, add_special_tokens=False)
            mask = assistant_mask_from_offsets(enc.offsets, spans)
        return ids, mask

    def __call__(self, messages: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids LongTensor [T], labels LongTensor [T] (-100 outside assistant spans), T <= max_seq_len."""
        ids, mask = self.mask(messages)
        ids_T = torch.tensor(ids[: self.max_seq_len], dtype=torch.long)
        mask_T = torch.from_numpy(mask[: self.max_seq_len])
        labels_T = torch.where(mask_T, ids_T, torch.full_like(ids_T, IGNORE_INDEX))
        return ids_T, labels_T


class LabelProbe:
    """Counts, while a data set is indexed, the records whose conversation keeps no assistant token once cut to
    max_seq_len (they train nothing: every label is -100). A record with several conversations (a DPO pair) counts
    once if any of them loses its labels.

    Labels start at the first token after the first `<|im_start|>assistant\\n`, so a conversation is label-less when
    its text up to there takes max_seq_len tokens or more. Tokenizing every record at load would cost about as much as
    an epoch of tokenization; instead, since a byte-level BPE token covers at least one byte, a prefix shorter in UTF-8
    bytes than max_seq_len surely fits, and only the remaining prefixes are tokenized, in batches. (A tokenizer whose
    tokens could be shorter than a byte would only be under-counted: never a false alarm.)
    """

    BATCH = 512  # prefixes per encode_batch call

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.count = 0
        self.first: str | None = None  # path:lineno of the first label-less record
        self.fewest: int | None = None  # fewest tokens before a reply among label-less records
        self._pending: list[tuple[str, str]] = []  # (where, prefix) awaiting tokenization, in file order
        self._last: str | None = None  # the last record counted (a pair's two conversations count once)

    def add(self, messages: Sequence[dict], where: str) -> None:
        tools = conversation_tools(messages)
        text = self.tokenizer.apply_chat_template(messages, tools=tools)
        at = text.find(ASSISTANT_HEADER)
        if at >= 0:
            end = at + len(ASSISTANT_HEADER)
        else:  # a template whose assistant header differs: its renderer says where the first reply starts
            _, spans = assistant_char_spans(self.tokenizer, messages, tools)
            if not spans:
                return
            end = spans[0][0]
        prefix = text[:end]
        if len(prefix.encode("utf-8")) < self.max_seq_len:
            return
        self._pending.append((where, prefix))
        if len(self._pending) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lengths = [len(ids) for ids in self.tokenizer.encode_batch([p for _, p in self._pending])]
        for (where, _), n in zip(self._pending, lengths):
            if n < self.max_seq_len:
                continue
            self.fewest = n if self.fewest is None else min(self.fewest, n)
            if where != self._last:
                self.count += 1
                self.first = self.first or where
                self._last = where
        self._pending.clear()


def _require_records(n: int, path: str | Path, bad: BadLines) -> None:
    if n == 0:
        raise DataError(f"{path}: no usable records{bad.summary() or ' (empty file)'}")


# ---------------------------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------------------------


class PretrainDataset(Dataset):
    """Packed pretraining rows: __getitem__(i) -> LongTensor [max_seq_len], every row full (no padding).

    Every document becomes [bos] + tokens + [eos]; documents are concatenated in file order into one uint16 token
    stream, cut into rows of exactly max_seq_len tokens (a document may span rows; the final partial row is dropped).
    Labels = input ids: pass the row as both input_ids and labels, the model shifts internally (so a row trains
    max_seq_len - 1 predictions).

    path is either
      - a .jsonl of {"text": ...}, tokenized here while streaming (in batches, with a progress bar when large), or
      - a .bin token file from tools/prepare_data.py, memory-mapped; its .bin.json sidecar must match this tokenizer
        (dtype, token count, vocab size, fingerprint).
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, max_seq_len: int, skip_bad_lines: bool = False):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        check_uint16_vocab(tokenizer)
        self.path, self.max_seq_len = str(path), max_seq_len
        self._bad = BadLines(skip_bad_lines)
        self._mmap: np.ndarray | None = None
        if Path(path).suffix == ".bin":
            self._tokens = None
            self.num_tokens, self.num_documents = self._check_token_file(tokenizer)
        else:
            self._tokens, self.num_documents = self._tokenize_jsonl(tokenizer)
            self.num_tokens = len(self._tokens)
        if self.num_documents == 0:
            _require_records(0, path, self._bad)
        self.num_rows = self.num_tokens // max_seq_len
        if self.num_rows == 0:
            raise DataError(
                f"{path}: {self.num_tokens} tokens in {self.num_documents} documents, fewer than one row of "
                f"max_seq_len={max_seq_len}"
            )

    @property
    def bad_lines(self) -> int:
        return self._bad.count

    @property
    def bad_line_reasons(self) -> list[str]:
        return self._bad.reasons

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream, uint16 [num_tokens] (memory-mapped for .bin sources)."""
        if self._tokens is not None:
            return self._tokens
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")
        return self._mmap

    def _tokenize_jsonl(self, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
        """-> (token stream uint16 [N], number of documents)."""
        size = os.path.getsize(self.path)
        parts, documents = [], 0
        desc = f"tokenize {Path(self.path).name}"
        with tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=size < PROGRESS_BYTES) as bar:
            for lines, nbytes in iter_line_chunks(self.path):
                tokens, docs, errors = encode_pretrain_chunk(self.path, lines, tokenizer)
                for err in errors:
                    self._bad.report(err)
                parts.append(tokens)
                documents += docs
                bar.update(nbytes)
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)), documents

    def _check_token_file(self, tokenizer: Tokenizer) -> tuple[int, int]:
        meta_path = token_file_meta_path(self.path)
        if not meta_path.is_file():
            raise DataError(f"{self.path}: missing sidecar {meta_path} (write token files with tools/prepare_data.py)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_path}: malformed JSON ({exc.msg})") from exc
        if not isinstance(meta, dict):
            raise DataError(
                f"{meta_path}: expected a JSON object (as tools/prepare_data.py writes), got {type(meta).__name__}"
            )
        n_bytes = os.path.getsize(self.path)
        expected = {
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "tokens": n_bytes // np.dtype(TOKEN_DTYPE).itemsize,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        }
        for key, want in expected.items():
            if meta.get(key) != want:
                raise DataError(
                    f"{meta_path}: {key} is {meta.get(key)!r}, expected {want!r} for {self.path} with tokenizer "
                    f"{tokenizer.source}; re-run tools/prepare_data.py with this tokenizer"
                )
        if n_bytes % np.dtype(TOKEN_DTYPE).itemsize:
            raise DataError(f"{self.path}: size {n_bytes} bytes is not a whole number of uint16 tokens")
        # The sidecar vouches for the tokenizer, not for every id: a file written by another tool, or damaged, can hold
        # an id past the vocabulary, which the embedding lookup would only hit (IndexError) somewhere mid-run.
        if expected["tokens"]:
            at = first_id_at_least(np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r"), tokenizer.vocab_size)
            if at is not None:
                raise DataError(
                    f"{self.path}: token {at[0]:,} (counting from 0) is id {at[1]}, past the {tokenizer.vocab_size} "
                    f"ids of tokenizer {tokenizer.source}; re-run tools/prepare_data.py with this tokenizer"
                )
        self._bad.count = int(meta.get("bad_lines", 0))  # skipped when the file was written
        self._bad.reasons = list(meta.get("bad_line_reasons", []))
        return expected["tokens"], int(meta.get("documents", 0))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range [0, {self.num_rows})")
        start = i * self.max_seq_len
        row = np.asarray(self.tokens[start : start + self.max_seq_len], dtype=np.int64)
        return torch.from_numpy(row)

    def __getstate__(self) -> dict:
        # A memmap would be pickled as a full in-memory copy; spawned workers re-open the file instead.
        return {**self.__dict__, "_mmap": None}


class _IndexedJsonl(Dataset):
    """Shared plumbing: a JsonlIndex and the bad-line report.

    validate=True (default) parses and checks every record while indexing (about 90 MiB/s: 13 s for a 1.2 GB file),
    so bad lines surface, or are skipped, before training. validate=False only records offsets (about 500 MiB/s); a
    bad record then raises its DataError (path:lineno) when it is first read, and skip_bad_lines has no effect.

    probe(checked fields, where) is called for every valid record while validating (see LabelProbe): label_less is
    then the number of records that keep no label at this max_seq_len (None when not validated or not probed).
    """

    def __init__(
        self,
        path: str | Path,
        check: Callable[[dict, str], Any],
        skip_bad_lines: bool,
        validate: bool,
        probe: LabelProbe | None = None,
        probe_fields: Callable[[Any], Sequence[Sequence[dict]]] = lambda fields: (fields,),
    ):
        self.path = str(path)
        self._check = check
        self._bad = BadLines(skip_bad_lines)
        self.label_probe = probe if validate else None
        on_record = check
        if self.label_probe is not None:

            def on_record(obj: dict, where: str) -> None:
                for messages in probe_fields(check(obj, where)):
                    probe.add(messages, where)

        self.index = JsonlIndex(path, validate=on_record if validate else None, bad=self._bad)
        if self.label_probe is not None:
            self.label_probe.flush()
        _require_records(len(self.index), path, self._bad)

    @property
    def label_less(self) -> int | None:
        """Records whose conversation(s) keep no assistant token at this max_seq_len (None: not counted)."""
        return None if self.label_probe is None else self.label_probe.count

    @property
    def bad_lines(self) -> int:
        return self._bad.count

    @property
    def bad_line_reasons(self) -> list[str]:
        return self._bad.reasons

    def __len__(self) -> int:
        return len(self.index)

    def _record(self, i: int) -> tuple[dict, Any]:
        """(raw object, its checked fields) of record i."""
        obj = self.index.record(i)
        return obj, self._check(obj, self.index.where(i))


class SFTDataset(_IndexedJsonl):
    """Conversations for SFT, LoRA and reasoning distillation (think/answer text is ordinary content).

    __getitem__(i) -> {"input_ids": LongTensor [T], "labels": LongTensor [T]}, T <= max_seq_len (no padding; see
    collate_sft). labels[t] = input_ids[t] on assistant spans (content + `<|im_end|>\\n`), -100 elsewhere. A
    conversation truncated before its first assistant token has no label at all.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Tokenizer,
        max_seq_len: int,
        skip_bad_lines: bool = False,
        validate: bool = True,
    ):
        self.encoder = ChatEncoder(tokenizer, max_seq_len)
        super().__init__(path, check_sft, skip_bad_lines, validate, LabelProbe(tokenizer, max_seq_len))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        _, messages = self._record(i)
        ids_T, labels_T = self.encoder(messages)
        return {"input_ids": ids_T, "labels": labels_T}


class DPODataset(_IndexedJsonl):
    """Preference pairs. __getitem__(i) -> {"chosen_input_ids", "chosen_labels", "rejected_input_ids",
    "rejected_labels"}: LongTensors [Tc] / [Tr] (each <= max_seq_len), masked like SFTDataset."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: Tokenizer,
        max_seq_len: int,
        skip_bad_lines: bool = False,
        validate: bool = True,
    ):
        self.encoder = ChatEncoder(tokenizer, max_seq_len)
        # A pair whose chosen or rejected answer is cut away compares a log-prob of 0 (no tokens) with the other one.
        probe = LabelProbe(tokenizer, max_seq_len)
        super().__init__(path, check_dpo, skip_bad_lines, validate, probe, probe_fields=lambda pair: pair)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        _, (chosen, rejected) = self._record(i)
        c_ids, c_labels = self.encoder(chosen)
        r_ids, r_labels = self.encoder(rejected)
        return {
            "chosen_input_ids": c_ids,
            "chosen_labels": c_labels,
            "rejected_input_ids": r_ids,
            "rejected_labels": r_labels,
        }


class RLPromptDataset(_IndexedJsonl):
    """Prompts for PPO / GRPO / SPO from SFT-format records.

    The final assistant turn (if the conversation ends with one) is dropped and the generation prompt
    `<|im_start|>assistant\\n` appended. __getitem__(i) -> {"prompt_ids": LongTensor [P<=max_prompt_len],
    "prompt_text": str, "record": dict} where record is the raw JSON object (extra fields such as "answer" stay
    reachable for rewards). A prompt longer than max_prompt_len keeps its LAST tokens (the generation prompt must
    survive); prompt_text is then the decoding of the kept tokens.

    require: {field: why} top-level fields every record must have (e.g. {"answer": "--reward rule compares each
    reply with it"}); a record without one is a bad line (path:lineno), found in the same single pass as the rest.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Tokenizer,
        max_prompt_len: int,
        skip_bad_lines: bool = False,
        validate: bool = True,
        require: dict[str, str] | None = None,
    ):
        if max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        check = functools.partial(check_prompt, require=tuple((require or {}).items()))
        super().__init__(path, check, skip_bad_lines, validate)
        self.tokenizer, self.max_prompt_len = tokenizer, max_prompt_len

    def __getitem__(self, i: int) -> dict[str, Any]:
        record, messages = self._record(i)
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=conversation_tools(messages)
        )
        ids = self.tokenizer.encode(text)
        if len(ids) > self.max_prompt_len:
            ids = ids[-self.max_prompt_len :]
            text = self.tokenizer.decode(ids)
        return {"prompt_ids": torch.tensor(ids, dtype=torch.long), "prompt_text": text, "record": record}


# ---------------------------------------------------------------------------------------------------------------------
# Collate functions
# ---------------------------------------------------------------------------------------------------------------------


def _pad(rows: Sequence[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    """1-D LongTensors -> [B, max_len], padded with value on the right (or left)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, r in enumerate(rows):
        if left:
            out[b, width - len(r) :] = r
        else:
            out[b, : len(r)] = r
    return out


def _pad_pairs(ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    sizes = [len(r) for r in ids]
    width, lengths = max(sizes), torch.tensor(sizes)
    return {
        "input_ids": _pad(ids, pad_id),
        "labels": _pad(labels, IGNORE_INDEX),
        "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
    }


def collate_sft(batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row -> input_ids [B, T] (pad_id), labels [B, T] (-100), attention_mask [B, T] (1/0)."""
    return _pad_pairs([s["input_ids"] for s in batch], [s["labels"] for s in batch], pad_id)


def collate_dpo(batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows for a single forward: rows [0, B) are the chosen, rows [B, 2B) the rejected
    answers of the same pairs in the same order. -> input_ids, labels, attention_mask, each [2B, T]."""
    ids = [s["chosen_input_ids"] for s in batch] + [s["rejected_input_ids"] for s in batch]
    labels = [s["chosen_labels"] for s in batch] + [s["rejected_labels"] for s in batch]
    return _pad_pairs(ids, labels, pad_id)


def collate_prompts(batch: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Left-pad prompts so every row ends where generation starts -> input_ids [B, P], attention_mask [B, P] (0 on
    the padding), plus prompt_text and record as lists of length B."""
    sizes = [len(s["prompt_ids"]) for s in batch]
    width, lengths = max(sizes), torch.tensor(sizes)
    return {
        "input_ids": _pad([s["prompt_ids"] for s in batch], pad_id, left=True),
        "attention_mask": (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long(),
        "prompt_text": [s["prompt_text"] for s in batch],
        "record": [s["record"] for s in batch],
    }
