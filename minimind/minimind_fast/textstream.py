"""Text of an answer as it streams: stop strings, the split of a `<think>` answer into reasoning and content, and
the `<tool_call>` blocks taken out of the content.

All work on text pieces as they are decoded and hold back only what could still change meaning (the start of a
stop string, the start of a tag, an open tool-call block), so that the released pieces concatenate to exactly what
the whole answer gives.

Reasoning: when an answer starts with `<think>`, the text up to `</think>` is the reasoning (stripped of surrounding
whitespace), and `<answer>`/`</answer>` tags are removed from the rest (MiniMind's R1-style format). An answer that
does not start with `<think>` is all content, untouched. ReasoningSplitter(opened=True) reads an answer whose prompt
already opened the thought (a generation prompt ending in `<think>`), as if the answer started with `<think>`.

Tool calls (split_tool_calls, ToolCallSplitter): a block runs from `<tool_call>` to the first `</tool_call>` after
it. A block that `parse` accepts is a call and leaves the content; one it refuses, and an unclosed block at the end,
stay in the content as the text they are. The content is what remains, stripped of surrounding whitespace.
tool_block_parser(names) is that `parse` for a caller that offered those functions (minimind_fast.toolcall reads
the block). AnswerStream chains the two for a caller of the engine (tools/serve.py, tools/chat.py), and
opens_thought(prompt) says when the reasoning split has to be made there rather than in the engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from minimind_fast.toolcall import ToolCall, parse_tool_calls

_THINK = re.compile(r"\s*<think>(.*?)(?:</think>(.*))?\Z", re.S)
_ANSWER_TAG = re.compile(r"</?answer>")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer (see the module docstring)."""
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

    def __init__(self, opened: bool = False):
        self.text, self.reasoning, self.content = "", "", ""
        self.thinking: bool | None = None  # unknown until the start of the answer is seen
        if opened:  # the prompt ended inside a thought: read the answer as if it began with the opening tag
            self.text, self.thinking = "<think>", True

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


TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
# parse(block) -> the call a whole `<tool_call>...</tool_call>` block holds, or None when it is not a usable call.
BlockParser = Callable[[str], Any]


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag (text that may still become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def split_tool_calls(text: str, parse: BlockParser) -> tuple[str, list]:
    """(content, calls) of a whole answer (see the module docstring)."""
    splitter = ToolCallSplitter(parse)
    content, calls = splitter.push(text)
    tail, more = splitter.flush()
    return content + tail, calls + more


def tool_block_parser(names: Iterable[str]) -> BlockParser:
    """parse(block) for the splitter: the block's ToolCall when it is a usable call (minimind_fast.toolcall) to one of
    the named functions, else None (the block then stays in the content as text: a caller offered only these)."""
    offered = frozenset(names)

    def parse(block: str) -> ToolCall | None:
        _, calls = parse_tool_calls(block)
        if len(calls) != 1 or calls[0].error is not None or calls[0].name not in offered:
            return None
        return calls[0]

    return parse


def opens_thought(prompt_text: str) -> bool:
    """Whether a rendered prompt's generation prompt ends inside an opened thought (MiniMind-3's template with
    open_thinking): the answer then holds no `<think>` of its own (use AnswerStream(think_opened=True))."""
    return prompt_text.rsplit("<|im_start|>assistant\n", 1)[-1].rstrip().endswith("<think>")


class ToolCallSplitter:
    """Incremental split_tool_calls: push content text, get (content delta, calls completed by it). Text before a
    block is released at once; a block is held until its `</tool_call>` arrives, then parsed (a refused block is
    released as text); a tail that could be the start of `<tool_call>` is held; whitespace is held while it could
    still turn out to end the content (or is all there is so far), so the deltas concatenate to the stripped
    content of split_tool_calls."""

    def __init__(self, parse: BlockParser):
        self.parse = parse
        self.text = ""  # what has been pushed, from the first character not yet resolved on
        self.started = False  # whether non-whitespace content has been released
        self.space = ""  # whitespace held after the last released content

    def _release(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.space + text
        end = len(text.rstrip())
        out, self.space = text[:end], text[end:]
        return out

    def push(self, piece: str) -> tuple[str, list]:
        self.text += piece
        out, calls = [], []
        while True:
            start = self.text.find(TOOL_OPEN)
            if start < 0:
                keep = _partial_tag_len(self.text, TOOL_OPEN)
                out.append(self._release(self.text[: len(self.text) - keep]))
                self.text = self.text[len(self.text) - keep :]
                break
            out.append(self._release(self.text[:start]))
            self.text = self.text[start:]
            end = self.text.find(TOOL_CLOSE, len(TOOL_OPEN))
            if end < 0:
                break  # an open block: held until it closes (or the answer ends)
            block, self.text = self.text[: end + len(TOOL_CLOSE)], self.text[end + len(TOOL_CLOSE) :]
            call = self.parse(block)
            if call is None:
                out.append(self._release(block))
            else:
                calls.append(call)
        return "".join(out), calls

    def flush(self) -> tuple[str, list]:
        """The end of the answer: a held partial tag or unclosed block is content; trailing whitespace is dropped."""
        out, self.text = self._release(self.text), ""
        return out, []


class AnswerStream:
    """What a caller of the engine shows: the engine's (reasoning, content) deltas in, (reasoning, content, calls)
    deltas out. think_opened: the prompt opened the thought, so the engine was asked not to split (its content is the
    raw answer) and the split happens here, as ReasoningSplitter(opened=True). parse: split tool-call blocks out of
    the content (None: content passes through untouched)."""

    def __init__(self, think_opened: bool = False, parse: BlockParser | None = None):
        self.reasoner = ReasoningSplitter(opened=True) if think_opened else None
        self.tools = ToolCallSplitter(parse) if parse is not None else None

    def _tool_split(self, reasoning: str, content: str, final: bool) -> tuple[str, str, list]:
        if self.tools is None:
            return reasoning, content, []
        text, calls = self.tools.push(content) if content else ("", [])
        if final:
            tail, more = self.tools.flush()
            text, calls = text + tail, calls + more
        return reasoning, text, calls

    def push(self, reasoning: str, content: str) -> tuple[str, str, list]:
        if self.reasoner is not None:
            reasoning, content = self.reasoner.push(content)
        return self._tool_split(reasoning, content, final=False)

    def flush(self) -> tuple[str, str, list]:
        reasoning, content = self.reasoner.flush() if self.reasoner is not None else ("", "")
        return self._tool_split(reasoning, content, final=True)
