"""Text of an answer as it streams: stop strings, and the split of a `<think>` answer into reasoning and content.

Both work on text pieces as they are decoded and hold back only what could still change meaning (the start of a
stop string, the start of a tag), so that the released pieces concatenate to exactly what the whole answer gives.

Reasoning: when an answer starts with `<think>`, the text up to `</think>` is the reasoning (stripped of surrounding
whitespace), and `<answer>`/`</answer>` tags are removed from the rest (MiniMind's R1-style format). An answer that
does not start with `<think>` is all content, untouched.
"""

from __future__ import annotations

import re

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
