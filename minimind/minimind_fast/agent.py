"""Multi-turn tool use: the one loop in which a model answers, calls tools, reads their results and answers again.
Agentic RL (train/grpo.py --agent 1), evaluation with tools (tools/eval.py --tools) and any other caller run it.

    from minimind_fast.agent import run_agent
    from minimind_fast.toolcall import Toolbox
    box = Toolbox("data/sample/world.json")
    engine = Engine(model, tokenizer)
    results = run_agent(engine, tokenizer, [[{"role": "user", "content": "What is 37 + 48?"}]], box.specs, box,
                        SamplingParams(max_tokens=256, temperature=0), max_turns=3)
    results[0].reply, results[0].calls, results[0].completion_ids, results[0].model_mask

The loop, batched: every turn, all conversations that are still going generate together in ONE engine.generate call.
Per conversation:
  1. The prompt is rendered once, tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=True,
     enable_thinking=...), and encoded.
  2. A model turn is generated from the exact id list so far (prompt + every earlier turn + every observation; never
     a re-encoding of the text) until the turn-end token (eos, `<|im_end|>`) or its token budget. The sampled ids are
     kept exactly as sampled, the turn-end token included: it is the model's own decision to hand the turn over, so
     the model must learn it (mask 1). The text of the turn is their decoding (special tokens dropped).
  3. parse_tool_calls reads the turn's calls. None: the conversation is finished and the turn is its answer.
     Otherwise each call runs through toolbox.run (never raises; a bad call gets an {"error": ...} result), and
     the assistant message (content without the call blocks, plus tool_calls) and one tool message per call are
     appended to the messages.
  4. The observation: the tokens of the text the chat template adds after the model's turn-end token, i.e. the
     rest of the assistant turn's closing (MiniMind's "\\n"), the tool turn (`<|im_start|>user\\n<tool_response>...`)
     and the next generation prompt. Computed as TEXT, render(messages + tool messages, add_generation_prompt)
     minus render(messages through the assistant turn), plus what that rendering holds after the assistant's
     turn-end token, and then encoded on its own. The earlier rendering must be a prefix of the later one (and the
     assistant turn must end with the turn-end token): a template for which that fails is refused with AgentError,
     since the ids so far could then not be extended. These ids are appended with mask 0 (not the model's).
  Then the next turn (2.), up to max_turns model turns.

The assistant message's rendering by the template need not equal what the model wrote (the model's ids stay as
sampled): only the template's text AFTER the turn is taken from it.

Where a conversation stops (stop_reason) and whether it is finished (an answer was given, no call left pending):
  "answer"    a turn without any tool call (finished; also when that turn was cut by its token budget);
  "max_turns" the max_turns-th turn still called tools (not finished: the calls are run and their tool messages
              recorded, but no observation ids are appended, since no model turn would read them);
  "length"    a turn with calls ended without its turn-end token (cut at max_tokens or at the total budget): the
              model never handed the turn over, so its calls are not run (not finished);
  "context"   the observation does not fit within max_total_tokens with room for one more token (not finished;
              the calls were run and recorded, the observation ids are not appended).

Length bound: prompt + every model turn + every observation stays within max_total_tokens (default, and at most,
the model's max_position_embeddings): each turn's token budget is min(params.max_tokens, what is left).

Cost: each turn is a fresh engine request, so its whole context (prompt, earlier turns, observations) is prefilled
again; the engine keeps no cache between requests.

Sampling: params per conversation (or one for all). A seeded conversation samples turn t with seed
(seed + t * 0x9E3779B97F4A7C15) mod 2^63 (turn 0 with the seed itself), so every turn draws fresh randomness and a
conversation's tokens do not depend on what else runs in the batch (the engine's per-row generators).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from minimind_fast.backend import RolloutBackend
from minimind_fast.engine import Engine, SamplingParams
from minimind_fast.tokenizer import Tokenizer
from minimind_fast.toolcall import Toolbox, ToolCall, parse_tool_calls, tool_message

_SEED_STEP = 0x9E3779B97F4A7C15  # the golden-ratio increment: turn seeds far apart for neighbouring seeds
_SEED_MOD = 2**63


class AgentError(RuntimeError):
    """A conversation the loop cannot run as asked (a template that is not prefix-stable, a prompt with no room
    left, a failed generation); the message is one line."""


@dataclass
class AgentResult:
    """One conversation after the loop. completion_ids are every model turn and observation after the prompt, in
    order; model_mask[i] is 1 where completion_ids[i] was sampled by the model, 0 on observation tokens."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    model_mask: list[int] = field(default_factory=list)
    answer: str = ""  # the last model turn's text without its tool-call blocks (and any <think> part), stripped
    messages: list[dict] = field(default_factory=list)  # the input messages plus every assistant and tool message
    turns: int = 0  # model turns generated
    calls: list[dict] = field(default_factory=list)  # calls run: {"turn", "name", "arguments", "result", "error"}
    finished: bool = False  # the conversation ended with an answer (no call left pending)
    stop_reason: str = ""  # answer, max_turns, length or context (see the module docstring)

    @property
    def tool_calls(self) -> int:
        return len(self.calls)

    @property
    def tool_errors(self) -> int:
        """Calls whose result was an {"error": ...} (unparsable call, unknown tool, bad arguments, failed lookup)."""
        return sum(1 for c in self.calls if c["error"])

    @property
    def reply(self) -> str:
        """What a reward or an evaluation judges: the answer of a finished conversation, "" for an unfinished one
        (text written next to a pending call is not a final answer)."""
        return self.answer if self.finished else ""


def tools_from_messages(messages: Sequence[dict]) -> list[dict] | None:
    """The tools a conversation offers in MiniMind's format: a "tools" field on its leading system message, a JSON
    string or a list of OpenAI function specs. None when there is none; ValueError (one line) when unusable."""
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        return None
    raw = messages[0].get("tools")
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f'the system message\'s "tools" is a string that is not valid JSON ({exc})') from None
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ValueError('the system message\'s "tools" must be a list of function specs (or a JSON string of one)')
    for k, spec in enumerate(raw):
        fn = spec.get("function", spec)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f'tools[{k}] needs a non-empty string "name" (directly or under "function")')
    return raw


def render_prompt(
    tokenizer: Tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None, enable_thinking: bool | None = None
) -> list[int]:
    """The prompt ids of a conversation with its tools: the chat template's rendering with the generation prompt."""
    text = tokenizer.apply_chat_template(
        list(messages), tools=tools or None, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    return tokenizer.encode(text)


def observation_ids(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    tool_messages: Sequence[dict],
    tools: Sequence[dict] | None,
    enable_thinking: bool | None = None,
) -> list[int]:
    """The ids that follow a model turn's turn-end token: messages ends with that turn's assistant message,
    tool_messages are its results. See the module docstring (4.)."""
    before = tokenizer.apply_chat_template(list(messages), tools=tools or None)
    after = tokenizer.apply_chat_template(
        [*messages, *tool_messages], tools=tools or None, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    if not after.startswith(before):
        raise AgentError(
            f"the chat template of {tokenizer.source} does not render the conversation before the tool results as a "
            "prefix of the conversation with them, so a rollout's ids cannot be extended turn by turn"
        )
    eos_text = tokenizer.decode([tokenizer.eos_id])
    end = before.rfind(eos_text)
    closing = before[end + len(eos_text) :] if end >= 0 else before
    if end < 0 or closing.strip():
        raise AgentError(
            f"the chat template of {tokenizer.source} does not close an assistant turn with {eos_text!r}, the token "
            "a model turn ends with"
        )
    return tokenizer.encode(closing + after[len(before) :])


def _turn_params(params: SamplingParams, turn: int, budget: int) -> SamplingParams:
    seed = params.seed if params.seed is None or turn == 0 else (params.seed + turn * _SEED_STEP) % _SEED_MOD
    return replace(params, max_tokens=min(params.max_tokens, budget), seed=seed)


def _final_text(content: str) -> str:
    """A turn's text without its tool-call blocks (already removed) and any reasoning before the last </think>."""
    return content.rsplit("</think>", 1)[-1].strip()


def _per_conversation(value: Any, n: int, what: str) -> list:
    if isinstance(value, list) and len(value) != n:
        raise ValueError(f"{n} conversations but {len(value)} {what}")
    return value if isinstance(value, list) else [value] * n


def run_agent(
    engine: Engine | RolloutBackend,
    tokenizer: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    tools: Sequence[dict] | Sequence[Sequence[dict] | None] | None,
    toolbox: Toolbox,
    params: SamplingParams | Sequence[SamplingParams],
    max_turns: int,
    enable_thinking: bool | None = None,
    max_total_tokens: int | None = None,
) -> list[AgentResult]:
    """Run every conversation to its end (module docstring) -> one AgentResult per conversation, in order.

    engine: an Engine, or any rollout backend (minimind_fast.backend: the in-process EngineBackend, or HTTPBackend to
    a server); what is used of it is generate(), eos_id and context.
    tools: one list of function specs offered to every conversation, or one list (or None) per conversation.
    params: one SamplingParams for all, or one per conversation; stop strings are refused (a turn ends at the
    turn-end token) and ignore_eos too. enable_thinking is passed to the chat template (None: its default, the
    way the SFT data renders an assistant turn). max_total_tokens: the bound on prompt + turns + observations
    (default: the model's max_position_embeddings; never more)."""
    n = len(conversations)
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if engine.eos_id != tokenizer.eos_id:
        raise ValueError(f"the engine ends turns at id {engine.eos_id}, the tokenizer's turn end is {tokenizer.eos_id}")
    shared = tools is None or all(isinstance(t, dict) for t in tools)
    tools_each = [tools] * n if shared else _per_conversation(list(tools), n, "tool lists")
    params_each = _per_conversation(params if isinstance(params, SamplingParams) else list(params), n, "settings")
    for p in params_each:
        if p.stop or p.ignore_eos:
            raise ValueError("run_agent: a model turn ends at its turn-end token: no stop strings, no ignore_eos")
    limit = engine.context if max_total_tokens is None else min(max_total_tokens, engine.context)

    results, ids = [], []
    for i, conv in enumerate(conversations):
        prompt = render_prompt(tokenizer, conv, tools_each[i], enable_thinking)
        if len(prompt) >= limit:
            raise AgentError(
                f"conversation {i}: its prompt is {len(prompt)} tokens, which leaves no room for a reply within "
                f"{limit} tokens"
            )
        results.append(AgentResult(prompt_ids=prompt, messages=[dict(m) for m in conv]))
        ids.append(list(prompt))

    active = list(range(n))
    for turn in range(max_turns):
        if not active:
            break
        reqs = engine.generate(
            [ids[i] for i in active], [_turn_params(params_each[i], turn, limit - len(ids[i])) for i in active]
        )
        still = []
        for i, req in zip(active, reqs):
            if req.status == "error":
                raise AgentError(f"conversation {i}, turn {turn + 1}: {req.error}")
            res, out = results[i], list(req.output_ids)
            ids[i] += out
            res.completion_ids += out
            res.model_mask += [1] * len(out)
            res.turns += 1
            content, calls = parse_tool_calls(tokenizer.decode(out, skip_special_tokens=True))
            res.answer = _final_text(content)
            if not calls:
                res.messages.append({"role": "assistant", "content": content})
                res.finished, res.stop_reason = True, "answer"
                continue
            res.messages.append(
                {"role": "assistant", "content": content, "tool_calls": [_as_message(c) for c in calls]}
            )
            if not out or out[-1] != tokenizer.eos_id:
                res.stop_reason = "length"
                continue
            replies = []
            for call in calls:
                result = toolbox.run(call)
                replies.append(tool_message(call, result))
                res.calls.append(_call_record(turn, call, result))
            if turn == max_turns - 1:  # no turn would read the results: recorded, not appended
                res.messages += replies
                res.stop_reason = "max_turns"
                continue
            obs = observation_ids(tokenizer, res.messages, replies, tools_each[i], enable_thinking)
            res.messages += replies
            if len(ids[i]) + len(obs) >= limit:
                res.stop_reason = "context"
                continue
            ids[i] += obs
            res.completion_ids += obs
            res.model_mask += [0] * len(obs)
            still.append(i)
        active = still
    return results


def _as_message(call: ToolCall) -> dict:
    """A parsed call as an OpenAI tool_calls entry (what the template renders after the assistant's text)."""
    return {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _call_record(turn: int, call: ToolCall, result: str) -> dict:
    try:
        parsed = json.loads(result)
    except ValueError:
        parsed = None
    error = isinstance(parsed, dict) and "error" in parsed
    return {"turn": turn + 1, "name": call.name, "arguments": call.arguments, "result": result, "error": error}
