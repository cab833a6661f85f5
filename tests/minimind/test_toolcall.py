"""Tests of minimind_fast/toolcall.py: the calculator's arithmetic and bounds, the JSON-schema subset, lookup over a
world file, parse_tool_calls on good and bad replies, Toolbox.run on bad input (it must answer, never raise), and a
round trip through the real tokenizer's chat template.

Expected values are independent of the code under test: hand-written results, random expression trees valued by the
test's own recursion over Python ints and fractions, result strings written out from the format's definition.
"""

import ast
import hashlib
import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from minimind_fast import toolcall
from minimind_fast.toolcall import (
    TOOL_SPECS,
    Toolbox,
    ToolCall,
    WorldError,
    evaluate,
    parse_tool_calls,
    render_tool_call,
    schema_error,
    tool_call_id,
    tool_message,
    validate_arguments,
)

# The two specs exactly as the project defines them (written out here, not imported).
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression of integers with + - * / and parentheses; returns the exact "
        "result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example: (12 + 7) * 3"}},
            "required": ["expression"],
        },
    },
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up one fact about a person of Kethmar: age, town, profession, colour or pet.",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "the person's full name"},
                "attribute": {"type": "string", "enum": ["age", "town", "profession", "colour", "pet"]},
            },
            "required": ["name", "attribute"],
        },
    },
}

PEOPLE = [
    {
        "name": "Douvfla Gaedrendmi",
        "age": "27",
        "town": "Ålvik",
        "profession": "potter",
        "colour": "teal",
        "pet": "owl",
    },
    {"name": "Mirro Tasket", "age": "61", "town": "Brenn", "profession": "miller", "colour": "red", "pet": "none"},
    {"name": "Sel Ovanna", "age": "9", "town": "Brenn", "profession": "pupil", "colour": "gold", "pet": "cat"},
]


def calc(expression):
    return ToolCall("calculator", {"expression": expression})


def run_calc(expression) -> dict:
    return json.loads(Toolbox().run(calc(expression)))


def write_world(path: Path, people=PEOPLE, world="Kethmar") -> Path:
    path.write_text(json.dumps({"world": world, "people": people}, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def box(tmp_path) -> Toolbox:
    return Toolbox(write_world(tmp_path / "world.json"))


def one_line_error(result: str) -> str:
    """The error text of a result, after checking it is {"error": "<one line>"} and within the size bound."""
    obj = json.loads(result)
    assert list(obj) == ["error"] and isinstance(obj["error"], str) and obj["error"]
    assert "\n" not in result and "\n" not in obj["error"] and len(result) <= 1000
    return obj["error"]


# ------------------------------------------------------------------------------------------------------- the specs


def test_specs_are_the_project_tools(tmp_path):
    assert TOOL_SPECS == [CALCULATOR, LOOKUP]
    assert Toolbox().specs == [CALCULATOR]  # lookup needs a world
    assert Toolbox(write_world(tmp_path / "w.json")).specs == [CALCULATOR, LOOKUP]


# ------------------------------------------------------------------------------------------------------ calculator

HAND = [
    ("37 + 48", 85),
    ("(2+3)*4", 20),
    ("2+3*4", 14),
    ("2*3+4", 10),
    ("7/2", 3.5),
    ("10/4*2", 5),
    ("10-4-3", 3),  # left-associative
    ("100/10/5", 2),
    ("2*(3+4)*5", 70),
    ("((((7))))", 7),
    ("-3+5", 2),
    ("-(2+3)", -5),
    ("--4", 4),
    ("2*-3", -6),
    ("-7/2", -3.5),
    ("1/3", 0.333333),
    ("2/3", 0.666667),
    ("1/7*7", 1),  # exact: 1/7 is never rounded on the way
    ("12 × 3", 36),
    ("12 ÷ 4", 3),
    ("9 − 10", -1),
    (" 1\t+\n2 ", 3),
    ("007+1", 8),
    ("999999999999*1000000", 999999999999000000),
    ("1000000*1000000*1000000", 10**18),  # the bound itself is allowed
    ("1/1000000000", 0.0),  # rounds to 6 decimals
    ("-1/10000000", 0.0),  # and never to a negative zero
]


@pytest.mark.parametrize("expression,want", HAND)
def test_calculator_hand_cases(expression, want):
    got = evaluate(expression)
    assert got == want and type(got) is type(want)
    assert run_calc(expression) == {"result": want}


def test_calculator_result_text_is_compact_json():
    assert Toolbox().run(calc("37 + 48")) == '{"result": 85}'
    assert Toolbox().run(calc("7/2")) == '{"result": 3.5}'


def _tree(rng: random.Random, depth: int):
    """(expression text, exact value) of a random expression, every operation parenthesised so the text's structure
    is the tree's; the value comes from this recursion alone."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(0, 999)
        return str(n), Fraction(n)
    op = rng.choice("+-*/")
    (lt, lv), (rt, rv) = _tree(rng, depth - 1), _tree(rng, depth - 1)
    if op == "/" and rv == 0:
        op = "*"
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
    spell = {"+": "+", "-": rng.choice(["-", "−"]), "*": rng.choice(["*", "×"]), "/": rng.choice(["/", "÷"])}[op]
    pad = " " * rng.randint(0, 1)
    return f"({lt}{pad}{spell}{pad}{rt})", value


def test_calculator_random_trees_against_exact_values():
    rng = random.Random(1234)
    checked = 0
    for _ in range(300):
        text, value = _tree(rng, 4)
        if len(text) > 200:
            continue
        want = int(value) if value.denominator == 1 else round(float(value), 6)
        assert evaluate(text) == want, text
        checked += 1
    assert checked > 200


def test_calculator_random_flat_integer_chains():
    """Unparenthesised chains: sums and differences fold left to right, products are plain int products, and a mixed
    a*b + c*d - e*f is the sum of its products (precedence)."""
    rng = random.Random(99)
    for _ in range(200):
        nums = [rng.randint(0, 10**4) for _ in range(rng.randint(1, 8))]
        ops = [rng.choice("+-") for _ in nums[1:]]
        want = nums[0]
        for op, n in zip(ops, nums[1:]):
            want = want + n if op == "+" else want - n
        text = str(nums[0]) + "".join(f" {op} {n}" for op, n in zip(ops, nums[1:]))
        assert evaluate(text) == want
        factors = [rng.randint(1, 99) for _ in range(rng.randint(1, 6))]
        product = 1
        for f in factors:
            product *= f
        assert evaluate("*".join(map(str, factors))) == product
        a, b, c, d, e, f = (rng.randint(-50, 50) for _ in range(6))
        assert evaluate(f"{a}*{b} + {c}*{d} - {e}*{f}") == a * b + c * d - e * f


BAD_EXPRESSIONS = [
    ("1/0", "division by zero"),
    ("1/(2-2)", "division by zero"),
    ("0/0", "division by zero"),
    ("", "empty"),
    ("   ", "empty"),
    ("1+", "ends where a number was expected"),
    ("(1", "unbalanced parentheses"),
    ("1)", "unbalanced parentheses"),
    ("()", "expected a number"),
    ("2 3", "unexpected 3"),
    ("1.5+1", "only integers"),
    ("2**3", "expected a number or '\\(' but found '\\*'"),
    ("2^3", "unexpected character '\\^'"),
    ("+5", "expected a number"),  # unary plus is not part of the language
    ("2x3", "unexpected character 'x'"),
    ("1e3", "unexpected character 'e'"),
    ("1,000", "unexpected character ','"),
    ("٣+1", "unexpected character"),  # digits of other scripts are not read as numbers
    ("abs(1)", "unexpected character 'a'"),
    ("__import__('os').system('true')", "unexpected character '_'"),
    ("1000000000000", "13 digits, at most 12"),
    ("1000000*1000000*1000000*2", "exceeds 1e18"),
    ("-1000000*1000000*1000000-1", "exceeds 1e18"),
    ("1000000*1000000*1000000*10/100", "exceeds 1e18"),  # the final 1e17 does not excuse the intermediate 1e19
    ("1" + "+1" * 100, "201 characters long, at most 200"),
    ("(" * 33 + "1" + ")" * 33, "nested more than 32 deep"),
]


@pytest.mark.parametrize("expression,reason", BAD_EXPRESSIONS)
def test_calculator_errors(expression, reason):
    with pytest.raises(toolcall.CalcError, match=reason):
        evaluate(expression)
    assert re.search(reason, one_line_error(Toolbox().run(calc(expression))))


def test_calculator_bounds_are_inclusive():
    assert evaluate("1" + "+1" * 99 + "1") == 99 + 11  # exactly 200 characters
    assert evaluate("(" * 32 + "1" + ")" * 32) == 1
    assert evaluate("999999999999") == 999_999_999_999  # 12 digits


def test_module_never_calls_eval_or_exec():
    tree = ast.parse(Path(toolcall.__file__).read_text(encoding="utf-8"))
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}


# ------------------------------------------------------------------------------------------------ schema validator

SCHEMA = {
    "type": "object",
    "properties": {
        "i": {"type": "integer"},
        "x": {"type": "number"},
        "b": {"type": "boolean"},
        "s": {"type": "string", "enum": ["a", "b"]},
        "n": {"type": "integer", "enum": [1, 2]},
        "o": {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]},
    },
    "required": ["i"],
}


@pytest.mark.parametrize(
    "value",
    [
        {"i": 3},
        {"i": -3.0},  # JSON Schema: a number with zero fractional part is an integer
        {"i": 0, "x": 1.5, "b": False, "s": "a", "n": 2, "o": {"k": "v"}},
        {"i": 1, "x": 7},
    ],
)
def test_schema_accepts(value):
    assert schema_error(value, SCHEMA) is None


@pytest.mark.parametrize(
    "value,message",
    [
        ([1], "arguments must be an object, got array"),
        ("x", "arguments must be an object, got string"),
        (None, "arguments must be an object, got null"),
        ({}, "missing required argument 'i'"),
        ({"i": 3.5}, "argument 'i' must be an integer, got number"),
        ({"i": True}, "argument 'i' must be an integer, got boolean"),
        ({"i": "3"}, "argument 'i' must be an integer, got string"),
        ({"i": 1, "x": "1.5"}, "argument 'x' must be a number, got string"),
        ({"i": 1, "x": False}, "argument 'x' must be a number, got boolean"),
        ({"i": 1, "b": 1}, "argument 'b' must be a boolean, got integer"),
        ({"i": 1, "s": ["a"]}, "argument 's' must be a string, got array"),
        ({"i": 1, "s": "c"}, "argument 's' must be one of \"a\", \"b\"; got 'c'"),
        ({"i": 1, "n": True}, "argument 'n' must be an integer, got boolean"),
        ({"i": 1, "n": 3}, "argument 'n' must be one of 1, 2; got '3'"),
        ({"i": 1, "o": {}}, "missing required argument 'o.k'"),
        ({"i": 1, "o": {"k": 5}}, "argument 'o.k' must be a string, got integer"),
        ({"i": 1, "o": {"k": "v", "z": 1}}, "unexpected argument 'o.z' \\(expected only: k\\)"),
        ({"i": 1, "extra": 0}, "unexpected argument 'extra' \\(expected only: i, x, b, s, n, o\\)"),
        ({"i": 1, 7: 0}, "unexpected argument '7' \\(expected only: i, x, b, s, n, o\\)"),
    ],
)
def test_schema_rejects_naming_the_argument(value, message):
    assert re.fullmatch(message, schema_error(value, SCHEMA))


def test_schema_refuses_keywords_it_does_not_implement():
    with pytest.raises(ValueError, match="minimum"):
        schema_error(3, {"type": "integer", "minimum": 0})
    with pytest.raises(ValueError, match="array"):
        schema_error([], {"type": "array"})


def test_validate_arguments_on_the_project_specs():
    assert validate_arguments({"expression": "1+1"}, CALCULATOR) is None
    assert validate_arguments({"name": "x", "attribute": "pet"}, LOOKUP) is None
    assert validate_arguments({"name": "x", "attribute": "height"}, LOOKUP) == (
        'argument \'attribute\' must be one of "age", "town", "profession", "colour", "pet"; got \'height\''
    )
    assert validate_arguments({"name": "x"}, LOOKUP) == "missing required argument 'attribute'"


# ---------------------------------------------------------------------------------------------------------- lookup


def test_lookup_every_attribute(box):
    for person in PEOPLE:
        for attribute in ("age", "town", "profession", "colour", "pet"):
            got = box.run(ToolCall("lookup", {"name": person["name"], "attribute": attribute}))
            assert json.loads(got) == {"name": person["name"], attribute: person[attribute]}
    # Compact JSON, non-ASCII kept as it is.
    assert box.run(ToolCall("lookup", {"name": "Douvfla Gaedrendmi", "attribute": "age"})) == (
        '{"name": "Douvfla Gaedrendmi", "age": "27"}'
    )
    assert box.run(ToolCall("lookup", {"name": "Douvfla Gaedrendmi", "attribute": "town"})) == (
        '{"name": "Douvfla Gaedrendmi", "town": "Ålvik"}'
    )


def test_lookup_names_match_case_and_whitespace_insensitively(box):
    for spelling in ("mirro tasket", "  MIRRO\t  Tasket ", "Mirro\nTASKET"):
        got = json.loads(box.run(ToolCall("lookup", {"name": spelling, "attribute": "age"})))
        assert got == {"name": "Mirro Tasket", "age": "61"}  # the canonical name comes back


def test_lookup_unknown_person_uses_the_world_name(tmp_path, box):
    got = box.run(ToolCall("lookup", {"name": "Nobody  Here", "attribute": "age"}))
    assert json.loads(got) == {"error": "no person named 'Nobody Here' in Kethmar"}
    other = Toolbox(write_world(tmp_path / "vell.json", world="Vell"))
    assert json.loads(other.run(ToolCall("lookup", {"name": "x", "attribute": "pet"}))) == {
        "error": "no person named 'x' in Vell"
    }


def test_lookup_result_over_the_size_bound_is_an_error(tmp_path):
    people = [{**PEOPLE[0], "pet": "a" * 2000}]
    box = Toolbox(write_world(tmp_path / "w.json", people))
    assert "1000" in one_line_error(box.run(ToolCall("lookup", {"name": PEOPLE[0]["name"], "attribute": "pet"})))
    assert json.loads(box.run(ToolCall("lookup", {"name": PEOPLE[0]["name"], "attribute": "age"})))["age"] == "27"


BAD_WORLDS = [
    ("{", "not a JSON world file"),
    ("[]", "expected {"),
    ('{"people": []}', "expected {"),
    ('{"world": "K", "people": {}}', "expected {"),
    ('{"world": "K", "people": [1]}', "people\\[0\\] must be an object, got integer"),
    ('{"world": "K", "people": [{"name": "A"}]}', "people\\[0\\].age must be a string, got nothing"),
    (
        json.dumps({"world": "K", "people": [{**PEOPLE[0], "age": 27}]}),
        "people\\[0\\].age must be a string, got integer",
    ),
    (
        json.dumps({"world": "K", "people": [PEOPLE[0], {**PEOPLE[1], "name": " douvfla  GAEDRENDMI"}]}),
        "people\\[1\\].name ' douvfla  GAEDRENDMI' is not unique",
    ),
    (json.dumps({"world": "K", "people": [{**PEOPLE[0], "name": "  "}]}), "people\\[0\\].name is empty"),
]


@pytest.mark.parametrize("text,reason", BAD_WORLDS)
def test_bad_world_file_is_a_one_line_error_naming_it(tmp_path, text, reason):
    path = tmp_path / "world.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(WorldError, match=reason) as info:
        Toolbox(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_missing_world_file(tmp_path):
    with pytest.raises(WorldError, match=f"^{re.escape(str(tmp_path / 'nope.json'))}: cannot read"):
        Toolbox(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------- Toolbox.run, bad input


def _deep(n):
    value = "1"
    for _ in range(n):
        value = [value]
    return value


BAD_CALLS = [
    (ToolCall("weather", {"city": "Brenn"}), "unknown tool 'weather'; available: calculator, lookup"),
    (ToolCall("", {}), "unknown tool ''"),
    (ToolCall("x" * 100_000, {}), "unknown tool 'x{60}\\.\\.\\.'"),
    (ToolCall(None, {}), "unknown tool"),
    (ToolCall(["calculator"], {}), "unknown tool"),  # not even a string: still an answer
    (ToolCall("calculator", ["1+1"]), "calculator: arguments must be an object, got array"),
    (ToolCall("calculator", None), "calculator: arguments must be an object, got null"),
    (ToolCall("calculator", "1+1"), "calculator: arguments must be an object, got string"),
    (ToolCall("calculator", {}), "calculator: missing required argument 'expression'"),
    (ToolCall("calculator", {"expression": 85}), "argument 'expression' must be a string, got integer"),
    (ToolCall("calculator", {"expression": None}), "argument 'expression' must be a string, got null"),
    (ToolCall("calculator", {"expression": _deep(5000)}), "argument 'expression' must be a string, got array"),
    (ToolCall("calculator", {"expression": "1+1", "mode": "exact"}), "unexpected argument 'mode'"),
    (ToolCall("calculator", {"expression": "9" * 1_000_000}), "1000000 characters long, at most 200"),
    (ToolCall("lookup", {"name": "Sel Ovanna"}), "lookup: missing required argument 'attribute'"),
    (ToolCall("lookup", {"attribute": "age"}), "lookup: missing required argument 'name'"),
    (ToolCall("lookup", {"name": ["Sel Ovanna"], "attribute": "age"}), "argument 'name' must be a string, got array"),
    (ToolCall("lookup", {"name": "Sel Ovanna", "attribute": "height"}), "argument 'attribute' must be one of"),
    (ToolCall("lookup", {"name": "Sel Ovanna", "attribute": "Age"}), "argument 'attribute' must be one of"),
    (ToolCall("lookup", {"name": "Sel Ovanna", "attribute": 3}), "argument 'attribute' must be a string"),
    (ToolCall("lookup", {"name": "Sel", "attribute": "age", "x": 1}), "unexpected argument 'x'"),
    (ToolCall("lookup", {"name": "Sel " * 100_000, "attribute": "age"}), "at most 200"),
    (ToolCall("calculator", {}, "tool call is not valid JSON (x)"), "^tool call is not valid JSON \\(x\\)$"),
    ({"name": "calculator", "arguments": {"expression": "1"}}, "not a tool call \\(got dict\\)"),
    (None, "not a tool call"),
]


@pytest.mark.parametrize("call,reason", BAD_CALLS)
def test_run_answers_every_bad_call_with_an_error(box, call, reason):
    assert re.search(reason, one_line_error(box.run(call)))


def test_run_without_world_does_not_offer_lookup():
    got = one_line_error(Toolbox().run(ToolCall("lookup", {"name": "Sel Ovanna", "attribute": "age"})))
    assert got == "unknown tool 'lookup'; available: calculator"


# ---------------------------------------------------------------------------------------------- parse_tool_calls

BLOCK = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37 + 48"}}\n</tool_call>'


def test_parse_no_calls():
    assert parse_tool_calls("  It is 85.\n") == ("It is 85.", [])


def test_parse_one_block():
    text, calls = parse_tool_calls("Let me compute.\n" + BLOCK)
    assert text == "Let me compute."
    assert calls == [
        ToolCall(
            "calculator",
            {"expression": "37 + 48"},
            None,
            '\n{"name": "calculator", "arguments": {"expression": "37 + 48"}}\n',
        )
    ]


def test_parse_several_blocks_in_order_and_the_text_between():
    second = '<tool_call>{"name": "lookup", "arguments": {"name": "Sel Ovanna", "attribute": "pet"}}</tool_call>'
    text, calls = parse_tool_calls("a\n" + BLOCK + "\nb\n" + second + "  ")
    assert text == "a\n\nb"
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("calculator", {"expression": "37 + 48"}, None),
        ("lookup", {"name": "Sel Ovanna", "attribute": "pet"}, None),
    ]


def test_parse_openai_shapes():
    stringly = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+2\\"}"}</tool_call>'
    wrapped = (
        '<tool_call>{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "3"}}}'
        "</tool_call>"
    )
    _, calls = parse_tool_calls(stringly + wrapped)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("calculator", {"expression": "1+2"}, None),
        ("calculator", {"expression": "3"}, None),
    ]


MALFORMED = [
    ('{"name": "calculator", "arguments": {', "", "not valid JSON"),
    ("[1, 2]", "", "must be a JSON object"),
    ('{"arguments": {}}', "", 'non-empty string "name"'),
    ('{"name": 5, "arguments": {}}', "", 'non-empty string "name"'),
    ('{"name": "", "arguments": {}}', "", 'non-empty string "name"'),
    ('{"name": "calculator"}', "calculator", 'has no "arguments"'),
    ('{"name": "calculator", "arguments": [1]}', "calculator", "must be a JSON object, got array"),
    ('{"name": "calculator", "arguments": "1+1"}', "calculator", "a string that is not valid JSON"),
    ('{"name": "calculator", "arguments": "[1]"}', "calculator", "must be a JSON object, got array"),
    ("[" * 5000 + "]" * 5000, "", "nested too deeply"),
    ('{"name": "c", "arguments": {"n": ' + "9" * 5000 + "}}", "", "number too long"),
    ('{"name": "c", "arguments": "{\\"n\\": ' + "9" * 5000 + '}"}', "c", "number too long"),
    ('{"name": "c", "arguments": {"x": "' + "y" * 10_000 + '"}}', "", "at most 10000"),
]


@pytest.mark.parametrize("inner,name,reason", MALFORMED)
def test_parse_malformed_block(inner, name, reason, box):
    text, calls = parse_tool_calls(f"before <tool_call>\n{inner}\n</tool_call> after")
    assert text == "before  after" and len(calls) == 1
    call = calls[0]
    assert call.name == name and call.arguments == {} and reason in call.error and call.raw == f"\n{inner}\n"
    assert one_line_error(box.run(call)) == call.error  # the model is told what was wrong with its call


def test_parse_unclosed_block():
    text, calls = parse_tool_calls('Checking. <tool_call>\n{"name": "calculator", "arguments": {"expression": "1"}}')
    assert text == "Checking."
    assert len(calls) == 1 and calls[0].name == "calculator" and calls[0].arguments == {"expression": "1"}
    assert "unclosed <tool_call>" in calls[0].error
    text, calls = parse_tool_calls(BLOCK + "<tool_call>\n{")
    assert text == "" and calls[0].error is None and "unclosed" in calls[1].error and calls[1].raw == "\n{"


# ------------------------------------------------------------------------------- ids, messages, template round trip


def test_tool_call_id_is_stable_and_distinct():
    want = "call_" + hashlib.sha256(b"req-7:2").hexdigest()[:24]
    assert tool_call_id(2, "req-7") == want and re.fullmatch(r"call_[0-9a-f]{24}", want)
    assert len({tool_call_id(i, s) for i in range(5) for s in ("a", "b")}) == 10


def test_tool_message():
    assert tool_message(calc("1"), '{"result": 1}') == {"role": "tool", "content": '{"result": 1}'}


def test_round_trip_through_the_chat_template(tokenizer, box):
    calls = [
        {"name": "calculator", "arguments": {"expression": "37 + 48"}},
        {"type": "function", "function": {"name": "lookup", "arguments": {"name": "Zoë Ärn", "attribute": "town"}}},
    ]
    messages = [
        {"role": "user", "content": "What is 37+48, and where does Zoë Ärn live?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=box.specs)
    text = tokenizer.decode(tokenizer.encode(rendered))  # through the token ids and back
    reply = text[text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n") : text.rindex("<|im_end|>")]
    content, parsed = parse_tool_calls(reply)
    assert content == "Let me check."
    assert [(c.name, c.arguments, c.error) for c in parsed] == [
        ("calculator", {"expression": "37 + 48"}, None),
        ("lookup", {"name": "Zoë Ärn", "attribute": "town"}, None),
    ]
    assert reply == "Let me check.\n" + "\n".join(render_tool_call(c) for c in parsed)

    # The results go back as tool messages, rendered as one user turn of <tool_response> blocks.
    results = [box.run(c) for c in parsed]
    assert results == ['{"result": 85}', '{"error": "no person named \'Zoë Ärn\' in Kethmar"}']
    follow = tokenizer.apply_chat_template(
        [*messages, *(tool_message(c, r) for c, r in zip(parsed, results))],
        add_generation_prompt=True,
        tools=box.specs,
        enable_thinking=False,
    )
    assert follow.endswith(
        "<|im_start|>user\n<tool_response>\n"
        + results[0]
        + "\n</tool_response>\n<tool_response>\n"
        + results[1]
        + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
