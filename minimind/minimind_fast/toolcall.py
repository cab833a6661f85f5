"""The project's tools for tool-calling models: parsing a reply's tool calls, and running them safely.

    calls_text, calls = parse_tool_calls(reply)           # reply text minus its <tool_call> blocks, and the calls
    box = Toolbox("data/sample/world.json")               # calculator + lookup (calculator only without a world)
    messages.append(tool_message(call, box.run(call)))    # {"role": "tool", "content": '{"result": 85}'}
    prompt = tok.apply_chat_template(messages, tools=box.specs, add_generation_prompt=True, enable_thinking=False)

Formats (MiniMind's chat template, rendered by minimind_fast/tokenizer.py):
  - An assistant reply carries each call as `<tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>`.
    parse_tool_calls also reads OpenAI's shapes: "arguments" as a JSON string that decodes to an object, and the
    call wrapped as {"type": "function", "function": {"name": ..., "arguments": ...}}.
  - A result goes back as {"role": "tool", "content": RESULT}; the template renders it inside a user turn as a
    `<tool_response>` block. RESULT is compact JSON (json.dumps, ensure_ascii=False, default separators):
    {"result": 85} from the calculator, {"name": "...", "age": "27"} from lookup, and {"error": "..."} (one line) for
    anything that went wrong: an unknown tool, arguments that fail the tool's schema, an unknown person, a bad
    expression. The model reads the error; Toolbox.run never raises.

Tools (TOOL_SPECS, OpenAI function specs; their parameters are checked by validate_arguments, a JSON-schema subset:
type object/string/integer/number/boolean, properties, required, enum; properties not listed are refused):
  calculator(expression)  exact arithmetic on integers: + - * / (also written × ÷ and the Unicode minus −),
                          parentheses, unary minus, whitespace; nothing else. fractions.Fraction throughout; the
                          result is an int when whole, else a float rounded to 6 decimals.
  lookup(name, attribute) one fact (age, town, profession, colour, pet) about a person of the world file
                          ({"world": "Kethmar", "people": [{"name": ..., "age": "27", ...}, ...]}, all values strings),
                          read once when the Toolbox is made; names match case-insensitively, whitespace normalised.

Bounds: an expression of at most 200 characters, parentheses nested at most 32 deep, integer literals of at most 12
digits, every intermediate value within 1e18 in absolute value (division by zero is an error); a name of at most 200
characters; a tool_call block of at most 10,000 characters; a result of at most 1,000 characters (a longer one is
replaced by an error). Each call is pure Python over input bounded so, which bounds its time without threads,
signals or timeouts.

The calculator parses the expression itself and never calls eval: MiniMind's calculator tool passes the model's text
to Python's eval, which runs whatever code the model writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

CALCULATOR_SPEC: dict = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": (
            "Evaluate an arithmetic expression of integers with + - * / and parentheses; returns the exact result."
        ),
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example: (12 + 7) * 3"}},
            "required": ["expression"],
        },
    },
}
ATTRIBUTES = ("age", "town", "profession", "colour", "pet")
LOOKUP_SPEC: dict = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up one fact about a person of Kethmar: age, town, profession, colour or pet.",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "the person's full name"},
                "attribute": {"type": "string", "enum": list(ATTRIBUTES)},
            },
            "required": ["name", "attribute"],
        },
    },
}
TOOL_SPECS: list[dict] = [CALCULATOR_SPEC, LOOKUP_SPEC]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_EXPRESSION_CHARS = 200
MAX_DEPTH = 32
MAX_LITERAL_DIGITS = 12
MAX_MAGNITUDE = 10**18
MAX_NAME_CHARS = 200
MAX_CALL_CHARS = 10_000
MAX_RESULT_CHARS = 1_000
SHOW_CHARS = 60  # how much of a bad value an error message quotes


@dataclass
class ToolCall:
    """One call read from a reply. error is set (and name/arguments hold what could be read) when the block was
    unusable; raw is the text between the tags (the rest of the reply for an unclosed block)."""

    name: str
    arguments: dict = field(default_factory=dict)
    error: str | None = None
    raw: str = ""


def _show(value: Any) -> str:
    """value quoted for a one-line error message, cut to SHOW_CHARS characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > SHOW_CHARS:
        text = text[:SHOW_CHARS] + "..."
    return repr(text)  # repr escapes newlines, so the message stays on one line


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------------------
# Parsing replies
# ---------------------------------------------------------------------------------------------------------------------


def _read_call(raw: str) -> ToolCall:
    """The text between <tool_call> and </tool_call> -> a ToolCall (error set when it is not a usable call)."""
    if len(raw) > MAX_CALL_CHARS:
        return ToolCall("", {}, f"tool call is {len(raw)} characters long, at most {MAX_CALL_CHARS} allowed", raw)
    try:
        obj = json.loads(raw)
    except RecursionError:
        return ToolCall("", {}, "tool call JSON is nested too deeply", raw)
    except json.JSONDecodeError as exc:
        return ToolCall("", {}, f"tool call is not valid JSON ({exc.msg} at column {exc.colno})", raw)
    except ValueError:  # an integer past Python's digit limit for int()
        return ToolCall("", {}, "tool call holds a number too long to read", raw)
    if not isinstance(obj, dict):
        expected = '{"name": ..., "arguments": {...}}'
        return ToolCall("", {}, f"tool call must be a JSON object {expected}, got {_json_type(obj)}", raw)
    if isinstance(obj.get("function"), dict):  # OpenAI's {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall("", {}, 'tool call needs a non-empty string "name"', raw)
    if "arguments" not in obj:
        return ToolCall(name, {}, f'tool call to {_show(name)} has no "arguments" object', raw)
    args = obj["arguments"]
    if isinstance(args, str):  # OpenAI's arguments: a JSON string holding the object
        try:
            args = json.loads(args)
        except RecursionError:
            return ToolCall(name, {}, f"arguments of {_show(name)} are nested too deeply", raw)
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
            return ToolCall(name, {}, f"arguments of {_show(name)} are a string that is {problem}", raw)
        except ValueError:
            return ToolCall(name, {}, f"arguments of {_show(name)} hold a number too long to read", raw)
    if not isinstance(args, dict):
        return ToolCall(name, {}, f"arguments of {_show(name)} must be a JSON object, got {_json_type(args)}", raw)
    return ToolCall(name, args, None, raw)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(text with every <tool_call>...</tool_call> block removed, then stripped; the calls in order).

    A block that cannot be used gives a ToolCall with error set; so does an unclosed <tool_call> (everything after
    it is taken as that block)."""
    kept: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            kept.append(text[pos:])
            break
        kept.append(text[pos:start])
        body = start + len(OPEN)
        end = text.find(CLOSE, body)
        if end < 0:
            raw = text[body:]
            call = _read_call(raw.strip())
            call.error = "unclosed <tool_call> block (no </tool_call>)"
            call.raw = raw
            calls.append(call)
            break
        raw = text[body:end]
        call = _read_call(raw.strip())
        call.raw = raw
        calls.append(call)
        pos = end + len(CLOSE)
    return "".join(kept).strip(), calls


def render_tool_call(call: ToolCall) -> str:
    """call as the chat template writes it in an assistant turn."""
    args = json.dumps(call.arguments, ensure_ascii=False)
    return f'{OPEN}\n{{"name": "{call.name}", "arguments": {args}}}\n{CLOSE}'


def tool_call_id(index: int, seed: str) -> str:
    """A stable id for call number index of a response (OpenAI's tool_calls[i].id): "call_" + 24 hex digits."""
    return "call_" + hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:24]


def tool_message(call: ToolCall, result: str) -> dict:
    """The message that returns result (Toolbox.run's text) for call. MiniMind's template renders only the content,
    and results are matched to calls by order, so the call adds nothing to the message."""
    del call
    return {"role": "tool", "content": result}


# ---------------------------------------------------------------------------------------------------------------------
# JSON-schema subset
# ---------------------------------------------------------------------------------------------------------------------

SCHEMA_KEYWORDS = {"type", "properties", "required", "enum", "description"}


def _json_type(value: Any) -> str:
    """The JSON type name of a decoded value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "integer":  # JSON Schema: any number whose fractional part is zero (1.0 is an integer)
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    raise ValueError(f"schema type {kind!r} is not supported (object, string, integer, number, boolean)")


def schema_error(value: Any, schema: dict, path: tuple[str, ...] = ()) -> str | None:
    """What is wrong with value under schema (one line naming the argument and what was expected), or None.

    path: the keys leading to value ("arguments" itself when empty). Supports type (object, string, integer, number,
    boolean), properties, required and enum; an object may hold only the properties its schema lists. A schema using
    any other keyword raises ValueError: it is our own spec, so that is a bug here, not the model's mistake."""
    unknown = set(schema) - SCHEMA_KEYWORDS
    if unknown:
        raise ValueError(f"schema keyword(s) {', '.join(sorted(unknown))} not supported by this validator")
    where = f"argument {_show('.'.join(path))}" if path else "arguments"
    kind = schema.get("type")
    if kind is not None and not _is_type(value, kind):
        return f"{where} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {_json_type(value)}"
    if "enum" in schema and not any(_json_type(value) == _json_type(e) and value == e for e in schema["enum"]):
        options = ", ".join(json.dumps(e, ensure_ascii=False) for e in schema["enum"])
        return f"{where} must be one of {options}; got {_show(value)}"
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"missing required argument {_show('.'.join((*path, key)))}"
        for key, item in value.items():
            key = str(key)  # JSON keys are strings; a caller's dict may hold others, which fit no property
            if key not in props:
                allowed = ", ".join(props) or "none"
                return f"unexpected argument {_show('.'.join((*path, key)))} (expected only: {allowed})"
            err = schema_error(item, props[key], (*path, key))
            if err:
                return err
    return None


def validate_arguments(arguments: Any, spec: dict) -> str | None:
    """What is wrong with arguments for the tool spec (OpenAI function spec), or None when they fit its parameters."""
    return schema_error(arguments, spec["function"]["parameters"])


# ---------------------------------------------------------------------------------------------------------------------
# Calculator
# ---------------------------------------------------------------------------------------------------------------------

# The spellings a model writes for the operators, and what each means.
_OPERATORS = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "\u00d7": "*", "/": "/", "\u00f7": "/", "(": "(", ")": ")"}
_TOKEN = re.compile(r"\s*(?:([0-9]+)|(\S))")  # ASCII digits only: int() would read other scripts' too


class CalcError(ValueError):
    """An expression the calculator refuses; the message says why."""


def _tokens(expression: str) -> list[str | int]:
    out: list[str | int] = []
    for m in _TOKEN.finditer(expression):
        digits, other = m.group(1), m.group(2)
        if digits is not None:
            if len(digits) > MAX_LITERAL_DIGITS:
                raise CalcError(f"an integer has {len(digits)} digits, at most {MAX_LITERAL_DIGITS} allowed")
            out.append(int(digits))
        elif other is not None:
            if other not in _OPERATORS:
                if other == ".":
                    raise CalcError("only integers are supported (no decimal point)")
                raise CalcError(f"unexpected character {other!r}; expected digits, + - * / ( ) or whitespace")
            out.append(_OPERATORS[other])
    return out


class _Parser:
    """Recursive descent over the tokens: expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := '-'* atom; atom := INTEGER | '(' expr ')'. Only parentheses recurse, so depth is bounded by them."""

    def __init__(self, tokens: list[str | int]):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self) -> str | int | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str | int | None:
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            value = _bounded(value + right if op == "+" else value - right)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.unary()
            if op == "*":
                value = _bounded(value * right)
            elif right == 0:
                raise CalcError("division by zero")
            else:
                value = _bounded(value / right)
        return value

    def unary(self) -> Fraction:
        negate = False
        while self.peek() == "-":
            self.take()
            negate = not negate
        value = self.atom()
        return -value if negate else value

    def atom(self) -> Fraction:
        tok = self.take()
        if isinstance(tok, int):
            return Fraction(tok)
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise CalcError(f"parentheses nested more than {MAX_DEPTH} deep")
            value = self.expr()
            if self.take() != ")":
                raise CalcError("unbalanced parentheses: a '(' is not closed")
            self.depth -= 1
            return value
        if tok is None:
            raise CalcError("expression ends where a number was expected")
        raise CalcError(f"expected a number or '(' but found {tok!r}")


def _bounded(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE:
        raise CalcError("a value exceeds 1e18 in magnitude")
    return value


def evaluate(expression: str) -> int | float:
    """The exact value of an arithmetic expression (see the module docstring): an int when whole, else a float
    rounded to 6 decimals. Raises CalcError saying what is wrong."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"expression is {len(expression)} characters long, at most {MAX_EXPRESSION_CHARS}")
    tokens = _tokens(expression)
    if not tokens:
        raise CalcError("expression is empty")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.peek() is not None:
        extra = parser.peek()
        raise CalcError("unbalanced parentheses: a ')' has no '('" if extra == ")" else f"unexpected {extra!r}")
    if value.denominator == 1:
        return int(value)
    return round(float(value), 6) + 0.0  # + 0.0 turns a -0.0 into 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Lookup world
# ---------------------------------------------------------------------------------------------------------------------


class WorldError(ValueError):
    """A world file lookup cannot use; the message names the file and what was expected."""


def normalise_name(name: str) -> str:
    """The form names are matched in: whitespace runs as one space, ends trimmed, case folded."""
    return " ".join(name.split()).casefold()


@dataclass
class World:
    name: str
    people: dict[str, dict[str, str]]  # normalised name -> {"name": ..., attribute: value, ...}


def load_world(path: str | Path) -> World:
    """Read and check a world file ({"world": str, "people": [{"name": str, attribute: str, ...}, ...]})."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorldError(f"{path}: cannot read the world file ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorldError(f"{path}: not a JSON world file ({exc})") from exc
    expected = 'expected {"world": "...", "people": [{"name": "...", "age": "...", ...}, ...]}'
    if not isinstance(obj, dict) or not isinstance(obj.get("world"), str) or not isinstance(obj.get("people"), list):
        raise WorldError(f"{path}: {expected}")
    people: dict[str, dict[str, str]] = {}
    for k, person in enumerate(obj["people"]):
        if not isinstance(person, dict):
            raise WorldError(f"{path}: people[{k}] must be an object, got {_json_type(person)}")
        for key in ("name", *ATTRIBUTES):
            if not isinstance(person.get(key), str):
                got = _json_type(person[key]) if key in person else "nothing"
                raise WorldError(f"{path}: people[{k}].{key} must be a string, got {got}")
        key = normalise_name(person["name"])
        if not key:
            raise WorldError(f"{path}: people[{k}].name is empty")
        if key in people:
            raise WorldError(f"{path}: people[{k}].name {person['name']!r} is not unique")
        people[key] = {"name": person["name"], **{a: person[a] for a in ATTRIBUTES}}
    return World(obj["world"], people)


# ---------------------------------------------------------------------------------------------------------------------
# Toolbox
# ---------------------------------------------------------------------------------------------------------------------


class Toolbox:
    """The tools a model may call: the calculator, plus lookup when a world file is given (read once, here; a bad
    file raises WorldError). run(call) returns the result text and never raises."""

    def __init__(self, world_path: str | Path | None = None):
        self.world = load_world(world_path) if world_path is not None else None
        self.specs: list[dict] = [CALCULATOR_SPEC] + ([LOOKUP_SPEC] if self.world is not None else [])
        self._by_name = {spec["function"]["name"]: spec for spec in self.specs}

    def run(self, call: ToolCall) -> str:
        """The result JSON text of call: {"result": ...} / {"name": ..., attribute: ...} / {"error": "..."}."""
        try:
            result = self._run(call)
        except CalcError as exc:
            return _error(f"calculator: {exc}")
        except Exception as exc:  # a last guard: the model must get an answer, and the caller must not crash
            return _error(f"tool failed ({type(exc).__name__}: {_show(str(exc))})")
        if len(result) > MAX_RESULT_CHARS:
            return _error(f"tool result is {len(result)} characters long, more than the {MAX_RESULT_CHARS} allowed")
        return result

    def _run(self, call: ToolCall) -> str:
        if not isinstance(call, ToolCall):
            return _error(f"not a tool call (got {type(call).__name__})")
        if call.error:
            return _error(call.error)
        if not isinstance(call.name, str) or call.name not in self._by_name:
            return _error(f"unknown tool {_show(call.name)}; available: {', '.join(self._by_name)}")
        problem = validate_arguments(call.arguments, self._by_name[call.name])
        if problem:
            return _error(f"{call.name}: {problem}")
        if call.name == "calculator":
            return json.dumps({"result": evaluate(call.arguments["expression"])}, ensure_ascii=False)
        return self._lookup(call.arguments["name"], call.arguments["attribute"])

    def _lookup(self, name: str, attribute: str) -> str:
        assert self.world is not None  # lookup is offered only with a world
        if len(name) > MAX_NAME_CHARS:
            return _error(f"lookup: argument 'name' is {len(name)} characters long, at most {MAX_NAME_CHARS}")
        person = self.world.people.get(normalise_name(name))
        if person is None:
            return _error(f"no person named {_show(' '.join(name.split()))} in {self.world.name}")
        return json.dumps({"name": person["name"], attribute: person[attribute]}, ensure_ascii=False)
