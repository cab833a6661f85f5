"""MiniMind's tokenizer: byte-level BPE (HF `tokenizers`), vocab 6400, specials at ids 0-2, MiniMind2's chat template.

    tok = Tokenizer.load()                    # the tokenizer shipped with the project (minimind/minimind_fast/assets/)
    tok = Tokenizer.load("path/to/dir")      # any folder with tokenizer.json (MiniMind's own works unchanged)
    ids = tok.encode("hello")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    text = tok.apply_chat_template(messages, tools=[schema, ...], add_generation_prompt=True, enable_thinking=False)

The chat template renders what MiniMind2's own renders: model/tokenizer_config.json of jingyaogong/minimind at
83e52f6 (the last MiniMind2 commit; that template already has tools and the thinking switch, so no later template is
needed for them). In words:
  - The first turn is a system turn: the first message's text when it is a system message, else
    `You are a helpful assistant`. With `tools`, that turn holds the system text (if any) plus "\\n\\n", a "# Tools"
    preamble, each tool as one JSON line inside <tools></tools>, and the instruction to answer in <tool_call> blocks.
  - Every user message, and every system message after the first, is `<|im_start|>{role}\\n{content}<|im_end|>\\n`.
  - An assistant message is the same, with its `tool_calls` after the content, each
    `<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>` (ARGS as given when a string, else as JSON),
    joined by "\\n" and separated by "\\n" from non-empty content.
  - A run of consecutive `tool` messages is one user turn of `\\n<tool_response>\\n{content}\\n</tool_response>` blocks.
  - add_generation_prompt appends `<|im_start|>assistant\\n`, and `<think>\\n\\n</think>\\n\\n` after it when
    enable_thinking is False (None or True leave the model free to open its answer with <think>).
  - Content that is not a string (None, as for a tool-call-only assistant message) renders as empty text.
Where the template silently drops a message (a role it does not know), render_chatml refuses it instead: a record
with `"role": "human"` would otherwise train on a conversation with turns missing.

The template exists twice: CHAT_TEMPLATE, our Jinja, which saved folders carry so that transformers renders it, and
render_chatml, the same rendering in Python, which training calls (no Jinja per sample, and the character span of
every assistant turn comes with it). tests/minimind/test_template_fidelity.py checks both against MiniMind's own
template through transformers' apply_chat_template.

CHAT_TEMPLATE_M3 is our Jinja for the prompt format of MiniMind-3 (jingyaogong/minimind's model/tokenizer_config.json at
its 2026 HEAD), written from the format's description; tests/minimind/test_minimind3_template.py checks it against what
MiniMind-3's own template renders (tests/minimind/data/minimind3_renders.json). In words, where it differs from the
above:
  - No default system turn: a system turn comes first only when the first message is a system message (its text), or
    when `tools` are given (then as above: the system text and "\n\n" if any, the tools block, the instruction).
  - Every assistant turn opens with a thought block: `<|im_start|>assistant\n<think>\n{thought}\n</think>\n\n{answer}`.
    The thought is the message's `reasoning_content` when that is a string (the content is then the answer as it
    is); else, when the content holds `</think>`, the thought is what lies between the last `<think>` before the
    first `</think>` and that `</think>`, and the answer is what follows the last `</think>` minus leading newlines;
    else the thought is empty and the content is the answer. Newlines at either end of the thought, and at the
    start of the answer, are not rendered. An assistant turn with nothing to think still renders the empty block.
  - Tool calls follow the answer as above; the "\n" before the first one is written when the answer (before its
    leading newlines are dropped) is not empty.
  - Users, later system messages and runs of tool messages render as above; other roles are left out.
  - add_generation_prompt appends `<|im_start|>assistant\n<think>\n\n</think>\n\n` (the thought closed, empty),
    or `<|im_start|>assistant\n<think>\n` (the thought left open) when the template variable open_thinking is
    true; apply_chat_template(enable_thinking=True/False) passes it.
No Python renderer exists for it: a tokenizer carrying it renders through Jinja, as for any other template.

A tokenizer keeps the chat template of the folder it was loaded from (chat_template.jinja, else tokenizer_config.json's
chat_template; the shipped one when there is none) and saves that one again, so a model trained with MiniMind's or
anyone's tokenizer is saved with the template it was trained on. apply_chat_template renders through the tokenizer's
own template: in Python when it is ours or MiniMind2's (recognised by its sha256), else through Jinja set up as
transformers sets it up, so the text trained on is the text the saved template renders at inference.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
ROLES = ("system", "user", "assistant", "tool")
ASSETS = Path(__file__).resolve().parent / "assets"
CONFIG_FILE, TEMPLATE_FILE = "tokenizer_config.json", "chat_template.jinja"

ASSISTANT_HEADER = f"{BOS_TOKEN}assistant\n"
TURN_END = f"{EOS_TOKEN}\n"
DEFAULT_SYSTEM = "You are a helpful assistant"
NO_THINKING = "<think>\n\n</think>\n\n"
# Shared by both chat templates below: the tool calls after an assistant's text (the loop over them closed, the turn
# ended), then a run of tool messages as one user turn of <tool_response> blocks.
_JINJA_CALLS_AND_TOOL_TURN = [
    '{{ \'<tool_call>\\n{"name": "\' ~ fn.name ~ \'", "arguments": \' }}',
    "{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}",
    "{{ '}\\n</tool_call>' }}",
    "{% endfor %}",
    "{{ '<|im_end|>\\n' }}",
    "{% elif m.role == 'tool' %}",
    "{% if loop.first or loop.previtem.role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}",
    "{{ '\\n<tool_response>\\n' + text + '\\n</tool_response>' }}",
    "{% if loop.last or loop.nextitem.role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}",
]
# The tools preamble: MiniMind2's wording (a fact of its prompt format, which the model was trained to read).
TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def _jinja_str(s: str) -> str:
    """s as a Jinja string literal (JSON's escapes are valid Jinja ones)."""
    return json.dumps(s, ensure_ascii=False)


# Our Jinja, built from the constants above so that it cannot drift from render_chatml. One line with no text
# between the tags: transformers compiles with trim_blocks/lstrip_blocks, which then have nothing to trim.
CHAT_TEMPLATE = "".join(
    [
        "{% set lead_system = messages and messages[0].role == 'system' %}",
        "{{ '<|im_start|>system\\n' }}",
        "{% if tools %}",
        "{% if lead_system %}{{ messages[0].content + '\\n\\n' }}{% endif %}",
        "{{ " + _jinja_str(TOOLS_INTRO) + " }}",
        "{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}",
        "{{ " + _jinja_str(TOOLS_OUTRO) + " }}",
        "{% elif lead_system %}{{ messages[0].content }}",
        "{% else %}{{ " + _jinja_str(DEFAULT_SYSTEM) + " }}",
        "{% endif %}",
        "{{ '<|im_end|>\\n' }}",
        "{% for m in messages %}",
        "{% set text = m.content if m.content is string else '' %}",
        "{% if m.role == 'user' or (m.role == 'system' and not loop.first) %}",
        "{{ '<|im_start|>' + m.role + '\\n' + text + '<|im_end|>\\n' }}",
        "{% elif m.role == 'assistant' %}",
        "{{ '<|im_start|>assistant\\n' + text }}",
        "{% for call in (m.tool_calls or []) %}",
        "{% set fn = call.function if call.function else call %}",
        "{% if text or not loop.first %}{{ '\\n' }}{% endif %}",
        *_JINJA_CALLS_AND_TOOL_TURN,
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}",
        "{% if enable_thinking is defined and enable_thinking is false %}{{ " + _jinja_str(NO_THINKING) + " }}",
        "{% endif %}{% endif %}",
    ]
)

# MiniMind-3's prompt format (see the module docstring), written here from its description. Not rendered in Python:
# a tokenizer that carries it renders through Jinja, as any template other than ours or MiniMind2's.
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
CHAT_TEMPLATE_M3 = "".join(
    [
        "{% set lead_system = messages and messages[0].role == 'system' %}",
        "{% if tools %}",
        "{{ '<|im_start|>system\\n' }}",
        "{% if lead_system %}{{ messages[0].content + '\\n\\n' }}{% endif %}",
        "{{ " + _jinja_str(TOOLS_INTRO) + " }}",
        "{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}",
        "{{ " + _jinja_str(TOOLS_OUTRO + TURN_END) + " }}",
        "{% elif lead_system %}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}",
        "{% endif %}",
        "{% for m in messages %}",
        "{% set text = m.content if m.content is string else '' %}",
        "{% if m.role == 'user' or (m.role == 'system' and not loop.first) %}",
        "{{ '<|im_start|>' + m.role + '\\n' + text + '<|im_end|>\\n' }}",
        "{% elif m.role == 'assistant' %}",
        # thought: reasoning_content when it is a string; else what lies between the last <think> before the first
        # </think> and that </think>, the answer being what follows the last </think> (text without </think>: all
        # answer). Edge newlines of the thought are dropped, leading ones of the answer too.
        "{% if m.reasoning_content is string %}{% set thought, answer = m.reasoning_content, text %}",
        "{% elif '</think>' in text %}",
        "{% set thought = text.split('</think>')[0].split('<think>')[-1] %}",
        "{% set answer = text.split('</think>')[-1].lstrip('\\n') %}",
        "{% else %}{% set thought, answer = '', text %}",
        "{% endif %}",
        "{{ '<|im_start|>assistant\\n' + " + _jinja_str(THINK_OPEN) + " + thought.strip('\\n') }}",
        "{{ " + _jinja_str(THINK_CLOSE) + " + answer.lstrip('\\n') }}",
        "{% for call in (m.tool_calls or []) %}",
        "{% set fn = call.function if call.function else call %}",
        # The separator before the first call follows the answer as given (a lone "\n" shows as nothing, yet counts).
        "{% if answer or not loop.first %}{{ '\\n' }}{% endif %}",
        *_JINJA_CALLS_AND_TOOL_TURN,
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}",
        "{% if open_thinking is defined and open_thinking is true %}{{ " + _jinja_str(THINK_OPEN) + " }}",
        "{% else %}{{ " + _jinja_str(NO_THINKING) + " }}",
        "{% endif %}{% endif %}",
    ]
)

# sha256 of the templates render_chatml renders exactly: ours and MiniMind2's (the chat_template string of
# jingyaogong/minimind's model/tokenizer_config.json, identical from 4014e62 (2025-10) to 83e52f6).
MINIMIND2_TEMPLATE_SHA256 = "4f57494cd38c0e4e50e27f4632fb6907414a68cc48d0bbc48da5449c596c69fa"


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


PYTHON_RENDERED = frozenset({template_sha256(CHAT_TEMPLATE), MINIMIND2_TEMPLATE_SHA256})

# tokenizer_config.json of a tokenizer that has none of its own (a freshly trained one, the shipped one).
DEFAULT_CONFIG: dict[str, Any] = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "pad_token": PAD_TOKEN,
    "unk_token": PAD_TOKEN,
    "model_max_length": 32768,
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "chat_template": CHAT_TEMPLATE,
}


class TokenizerError(ValueError):
    """A tokenizer folder or a chat message that cannot be used."""


# ------------------------------------------------------------------------------------------------- Python rendering
def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None:  # transformers drops None-valued keys; the template renders a missing content as ""
        return ""
    if not isinstance(content, str):
        raise TokenizerError(f"message {i}: content must be a string (or null), got {type(content).__name__}")
    return content


def _tool_call(call: Any, i: int, k: int) -> str:
    where = f"message {i}: tool_calls[{k}]"
    if not isinstance(call, dict):
        raise TokenizerError(f"{where} must be an object, got {type(call).__name__}")
    fn = call.get("function") or call  # OpenAI's {"type": "function", "function": {...}} or the bare {name, arguments}
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
        raise TokenizerError(f'{where} needs a string "name" and "arguments" (directly or under "function")')
    args = fn["arguments"]
    if not isinstance(args, str):
        try:  # transformers' tojson: json.dumps with ensure_ascii=False and default separators
            args = json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TokenizerError(f"{where}: arguments are not JSON-serialisable ({exc})") from exc
    return f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>'


def _system_turn(messages: Sequence[dict], tools: Sequence[dict] | None) -> str:
    lead = None
    if messages and messages[0]["role"] == "system":
        lead = messages[0].get("content")
        if not isinstance(lead, str):  # the template concatenates it: anything else is an error there too
            raise TokenizerError(f"message 0: system content must be a string, got {type(lead).__name__}")
    if not tools:
        return f"{BOS_TOKEN}system\n{DEFAULT_SYSTEM if lead is None else lead}{TURN_END}"
    lines = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise TokenizerError(f"tools[{k}] must be a JSON-schema object, got {type(tool).__name__}")
        try:
            lines.append("\n" + json.dumps(tool, ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise TokenizerError(f"tools[{k}] is not JSON-serialisable ({exc})") from exc
    head = "" if lead is None else lead + "\n\n"
    return f"{BOS_TOKEN}system\n{head}{TOOLS_INTRO}{''.join(lines)}{TOOLS_OUTRO}{TURN_END}"


def render_chat_spans(
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    tools: Sequence[dict] | None = None,
    enable_thinking: bool | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [start, end) character span of every assistant turn's content through its `<|im_end|>\\n`)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {i} must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise TokenizerError(f"message {i}: role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
    parts, spans = [_system_turn(messages, tools)], []
    pos = len(parts[0])
    last = len(messages) - 1
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i == 0:
            continue  # already rendered as the system turn
        content = _content(m, i)
        if role in ("user", "system"):
            piece = f"{BOS_TOKEN}{role}\n{content}{TURN_END}"
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise TokenizerError(f"message {i}: tool_calls must be a list, got {type(calls).__name__}")
            body = content
            for k, call in enumerate(calls):
                body += ("\n" if k or content else "") + _tool_call(call, i, k)
            piece = f"{ASSISTANT_HEADER}{body}{TURN_END}"
            spans.append((pos + len(ASSISTANT_HEADER), pos + len(piece)))
        else:  # tool: consecutive tool messages share one user turn
            opens = i == 0 or messages[i - 1]["role"] != "tool"
            closes = i == last or messages[i + 1]["role"] != "tool"
            piece = (
                (f"{BOS_TOKEN}user" if opens else "")
                + f"\n<tool_response>\n{content}\n</tool_response>"
                + (TURN_END if closes else "")
            )
        parts.append(piece)
        pos += len(piece)
    if add_generation_prompt:
        parts.append(ASSISTANT_HEADER + (NO_THINKING if enable_thinking is False else ""))
    return "".join(parts), spans


def render_chatml(
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    tools: Sequence[dict] | None = None,
    enable_thinking: bool | None = None,
) -> str:
    """messages rendered as MiniMind2's chat template renders them (see the module docstring)."""
    return render_chat_spans(messages, add_generation_prompt, tools, enable_thinking)[0]


# -------------------------------------------------------------------------------------------------- Jinja rendering
def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    # transformers replaces Jinja's tojson (which HTML-escapes) with plain json.dumps, non-ASCII kept as is.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """template compiled in the environment transformers renders chat templates in: sandboxed, trim_blocks and
    lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# ------------------------------------------------------------------------------------------------------- tokenizer
def _read_template(folder: Path, config: dict[str, Any]) -> str | list | None:
    """The folder's chat template as transformers finds it: chat_template.jinja first, then the config's."""
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    return config.get("chat_template")


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, source: str = "<memory>", config: dict[str, Any] | None = None):
        """config: the tokenizer_config.json this tokenizer was loaded with (its chat_template is kept; keys it lacks
        are taken from DEFAULT_CONFIG)."""
        self.hf = hf
        self.source = source
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [0, 1, 2]:
            raise TokenizerError(f"{source}: special tokens {SPECIAL_TOKENS} must have ids 0, 1, 2; found {ids}")
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        if not self.config.get("chat_template"):
            self.config["chat_template"] = CHAT_TEMPLATE
        template = self.config["chat_template"]
        if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}, ...]
            try:
                self.templates = {t["name"]: t["template"] for t in template}
            except (TypeError, KeyError) as exc:
                raise TokenizerError(f"{source}: chat_template list entries need 'name' and 'template'") from exc
            if "default" not in self.templates:
                raise TokenizerError(f"{source}: chat_template has no template named 'default'")
        elif isinstance(template, str):
            self.templates = {"default": template}
        else:
            raise TokenizerError(f"{source}: chat_template must be a string, got {type(template).__name__}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tokenizer:
        """Load from a folder holding tokenizer.json, or from the tokenizer.json file itself (default: shipped).
        The chat template comes from that folder (chat_template.jinja or tokenizer_config.json), else it is ours."""
        p = Path(path) if path is not None else ASSETS
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json at {file}")
        try:
            hf = _HFTokenizer.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({exc})") from exc
        config: dict[str, Any] = {}
        cfg_file = file.parent / CONFIG_FILE
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"{cfg_file}: not readable JSON ({exc})") from exc
            if not isinstance(config, dict):
                raise TokenizerError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
        template = _read_template(file.parent, config)
        if template:
            config["chat_template"] = template
        return cls(hf, str(file), config)

    @property
    def chat_template(self) -> str:
        """The template a conversation without tools is rendered with."""
        return self.templates["default"]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token decodes to: a text longer than n times this cannot fit in n tokens (what a
        server checks before spending time on encoding a huge prompt). Computed once per tokenizer."""
        return max(len(self.decode([i])) for i in range(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """Token ids of text. No bos/eos is added; special tokens written in the text are recognised."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def _template_for(self, tools: Sequence[dict] | None) -> str:
        # transformers' choice among named templates: "tool_use" when tools are given and it exists.
        return self.templates.get("tool_use", self.chat_template) if tools else self.chat_template

    def renders_in_python(self, tools: Sequence[dict] | None = None) -> bool:
        """Whether render_chatml renders this tokenizer's template exactly (ours or MiniMind2's)."""
        return template_sha256(self._template_for(tools)) in PYTHON_RENDERED

    def _render_jinja(
        self, messages: Sequence[dict], add_generation_prompt: bool, tools: Sequence[dict] | None, **kwargs: Any
    ) -> str:
        # As transformers calls it: None-valued message keys dropped, the special tokens passed by name.
        chat = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        specials = {k: self.config[k] for k in names if isinstance(self.config.get(k), str)}
        template = self._template_for(tools)
        try:
            return _compiled(template).render(
                messages=chat,
                tools=list(tools) if tools else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**specials, **kwargs},
            )
        except TokenizerError:
            raise
        except Exception as exc:  # a template error of any kind (syntax, undefined, type): name the tokenizer
            raise TokenizerError(f"{self.source}: its chat template failed ({type(exc).__name__}: {exc})") from exc

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: Sequence[dict] | None = None,
        enable_thinking: bool | None = None,
    ) -> str | list[int]:
        """messages rendered with this tokenizer's chat template (ids when tokenize). enable_thinking=None leaves it
        undefined in the template, as not passing it to transformers does; True/False is given to a Jinja template
        both as enable_thinking and as open_thinking (MiniMind-3's name for the switch: its generation prompt closes
        the thinking block unless open_thinking is true)."""
        if self.renders_in_python(tools):
            text = render_chatml(messages, add_generation_prompt, tools, enable_thinking)
        else:
            # MiniMind2's and Qwen3's templates read enable_thinking, MiniMind-3's reads open_thinking: pass both.
            extra = (
                {}
                if enable_thinking is None
                else {"enable_thinking": enable_thinking, "open_thinking": enable_thinking}
            )
            text = self._render_jinja(messages, add_generation_prompt, tools, **extra)
        return self.encode(text) if tokenize else text

    def assistant_spans(
        self, messages: Sequence[dict], tools: Sequence[dict] | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """(rendered conversation, [start, end) character span of each assistant turn: from after its
        `<|im_start|>assistant\\n` to the end of what the template renders for it, `<|im_end|>\\n` included).

        For a template other than ours, a turn's span is found by rendering the conversation up to it and through
        it; a template that does not render a conversation's prefix as a prefix of the whole is refused."""
        if self.renders_in_python(tools):
            return render_chat_spans(messages, tools=tools)
        text = self.apply_chat_template(messages, tools=tools)
        spans, before = [], 0
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") == "assistant"):
                continue
            through = self.apply_chat_template(messages[: i + 1], tools=tools)
            head = through.rfind(ASSISTANT_HEADER, before)  # the turn just added is the last thing rendered
            if not text.startswith(through) or head < 0:
                raise TokenizerError(
                    f"{self.source}: its chat template does not render message {i} as a prefix of the whole "
                    f"conversation, so the assistant turns cannot be located"
                )
            spans.append((head + len(ASSISTANT_HEADER), len(through)))
            before = len(through)
        return text, spans

    def save(self, folder: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (HF-loadable, with this tokenizer's chat template)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(folder / "tokenizer.json"))
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        return folder
