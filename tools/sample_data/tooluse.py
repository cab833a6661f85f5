"""Tool-use data around the sample world: world.json, sft_tools.jsonl and rl_tools.jsonl.

The two tools are the project's own, offered with their specs from minimind_fast.toolcall: `calculator` (an arithmetic
expression of integers) and `lookup` (one fact about a person of Kethmar, answered from world.json). Formats:

  world.json        {"world": "Kethmar", "people": [{"name", "age", "town", "profession", "colour", "pet"}, ...]},
                    every person of the world (held-out ones too: the pretraining text states their facts as well),
                    all values strings
  sft_tools.jsonl   MiniMind's tool-call SFT format, one conversation per line:
                      {"role": "system", "content": ..., "tools": "<JSON string: the offered specs>"}
                      {"role": "user", "content": question}
                      {"role": "assistant", "content": "", "tool_calls": "<JSON string: [{"name", "arguments"}]>"}
                      {"role": "tool", "content": the tool's result, compact JSON}
                      {"role": "assistant", "content": the reply}
                    or, where no tool is needed (reading comprehension with the text in the question, greetings),
                    system, user and the assistant's direct reply
  rl_tools.jsonl    {"conversations": [system with "tools", user question], "answer": the verifiable answer string}

Results are what the tools return: {"result": 85} (calculator), {"name": "...", "age": "27"} (lookup),
{"error": "no person named '...' in Kethmar"} (lookup of a name not in the world). Replies state the value the way
the other conversation files do ("37 + 48 = 85.", "Their age is 27.").

Held out, as in the other files: no eval.jsonl problem (either operand order of a sum) is asked, only the problems of
plan.train_problems; no held-out person is asked about, only the (person, attribute) pairs of plan.known; the
strangers of the reading questions and the unknown names share one set of used names with every other file, so none
of them names anyone of the world or of eval.jsonl.

All randomness comes from random.Random(seed * 7919 + 3), a stream no other file draws from, used only after every
other file is written: the other files are the same bytes with or without these.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minimind_fast.toolcall import CALCULATOR_SPEC, LOOKUP_SPEC, TOOL_SPECS
from tools.sample_data.formats import GENERIC_IDENTITY, QUESTIONS, answer, question
from tools.sample_data.tasks import Problem, arith_answer, arith_question, reading_people, reading_question, solve
from tools.sample_data.world import ATTRIBUTES, WORLD, NameMaker, Person

if TYPE_CHECKING:  # files.py imports this module; the Plan is only a type here
    from tools.sample_data.files import Plan

WORLD_FILE = "world.json"
SPEC_BY_NAME = {spec["function"]["name"]: spec for spec in TOOL_SPECS}

TOOL_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer briefly and accurately.",
    "You are a helpful assistant. Call a tool when the question needs one.",
)
UNKNOWN_ANSWERS = (
    f"There is no one of that name in {WORLD}, so I cannot tell you.",
    f"I could not find that person: nobody of that name is known in {WORLD}.",
    "That person is unknown to me.",
)
# Records per kind at --scale 1. A fifth of sft_tools needs no tool (reading comprehension, greetings), so that a
# model offered tools still answers directly when a tool would not help.
SFT_KINDS = {
    "calculator": 500,
    "lookup": 620,
    "unknown person": 80,
    "reading (no tool)": 200,
    "greeting (no tool)": 100,
}
RL_KINDS = {"calculator": 300, "lookup": 300}
P_BOTH_TOOLS = 0.5  # share of the tool-needing records offered both tools, only one of which fits
BOTH = "offered both tools"  # the key under which ToolUse.kinds counts the records that offered both

Records = list[dict]


@dataclass
class ToolUse:
    """The two files' records, and per file how many records of each kind (and how many offered both tools)."""

    sft: Records
    rl: Records
    kinds: dict[str, Counter[str]] = field(default_factory=dict)


def dumps(obj: object) -> str:
    """Compact JSON as the tools return it and as the JSON-string fields hold it (json.dumps, non-ASCII kept)."""
    return json.dumps(obj, ensure_ascii=False)


def person_facts(p: Person) -> dict[str, str]:
    return {"name": p.name, **{a: p.value(a) for a in ("age", "town", "profession", "colour", "pet")}}


def world_json(people: list[Person]) -> str:
    """world.json's text: every person in the world's order, values as strings."""
    return (
        json.dumps({"world": WORLD, "people": [person_facts(p) for p in people]}, ensure_ascii=False, indent=2) + "\n"
    )


def calculator_result(problem: Problem) -> str:
    return dumps({"result": solve(problem)})


def lookup_result(p: Person, attribute: str) -> str:
    return dumps({"name": p.name, attribute: p.value(attribute)})


def unknown_person_result(name: str) -> str:
    return dumps({"error": f"no person named '{name}' in {WORLD}"})


def expression(problem: Problem) -> str:
    a, op, b = problem
    return f"{a} {op} {b}"


def system_message(rng: random.Random, specs: list[dict]) -> dict[str, str]:
    return {"role": "system", "content": rng.choice(TOOL_SYSTEM_PROMPTS), "tools": dumps(specs)}


def offered(rng: random.Random, needed: str | None, counter: Counter[str]) -> list[dict]:
    """The specs a record offers: the needed tool, or both tools a P_BOTH_TOOLS share of the time; any one or both
    when none is needed."""
    if needed is None:
        specs = rng.choice(([CALCULATOR_SPEC], [LOOKUP_SPEC], TOOL_SPECS))
    else:
        specs = TOOL_SPECS if rng.random() < P_BOTH_TOOLS else [SPEC_BY_NAME[needed]]
    counter[BOTH] += int(len(specs) == 2)
    return specs


def with_tool(system: dict, user: str, name: str, arguments: dict, result: str, reply: str) -> dict:
    """A conversation whose assistant calls one tool, reads its result and replies."""
    call = {"role": "assistant", "content": "", "tool_calls": dumps([{"name": name, "arguments": arguments}])}
    turns = [system, {"role": "user", "content": user}, call, {"role": "tool", "content": result}]
    return {"conversations": [*turns, {"role": "assistant", "content": reply}]}


def build(plan: Plan) -> ToolUse:
    """sft_tools.jsonl's and rl_tools.jsonl's records, drawn from their own stream (see the module docstring)."""
    rng = random.Random(plan.seed * 7919 + 3)
    names = NameMaker(rng)
    names.used = plan.strangers.used  # one set for every file: no new name repeats a world name or a stranger's
    sft_n = {kind: plan.n(count) for kind, count in SFT_KINDS.items()}
    rl_n = {kind: plan.n(count) for kind, count in RL_KINDS.items()}
    problems = rng.sample(plan.train_problems, sft_n["calculator"] + rl_n["calculator"])
    sft_problems, rl_problems = problems[: sft_n["calculator"]], problems[sft_n["calculator"] :]
    sft_kinds, rl_kinds = Counter(sft_n), Counter(rl_n)

    sft = []
    for pr in sft_problems:
        system = system_message(rng, offered(rng, "calculator", sft_kinds))
        user = arith_question(rng, pr)
        sft.append(with_tool(system, user, "calculator", {"expression": expression(pr)}, calculator_result(pr),
                             arith_answer(pr)))  # fmt: skip
    for _ in range(sft_n["lookup"]):
        i, attr = rng.choice(plan.known)
        p = plan.people[i]
        system = system_message(rng, offered(rng, "lookup", sft_kinds))
        arguments = {"name": p.name, "attribute": attr}
        sft.append(with_tool(system, question(rng, p, attr), "lookup", arguments, lookup_result(p, attr),
                             answer(rng, p, attr)))  # fmt: skip
    for _ in range(sft_n["unknown person"]):
        name = f"{names.word(2, max_len=8)} {names.word(rng.choice((2, 3)))}"  # shaped like the world's names
        attr = rng.choice(ATTRIBUTES)
        system = system_message(rng, offered(rng, "lookup", sft_kinds))
        user = rng.choice(QUESTIONS[attr]).format(name=name)  # question templates hold only the name
        arguments = {"name": name, "attribute": attr}
        sft.append(with_tool(system, user, "lookup", arguments, unknown_person_result(name),
                             rng.choice(UNKNOWN_ANSWERS)))  # fmt: skip
    for _ in range(sft_n["reading (no tool)"]):
        system = system_message(rng, offered(rng, None, sft_kinds))
        text, p, attr = reading_question(rng, reading_people(rng, names, plan.choices))
        sft.append({"conversations": [system, {"role": "user", "content": text},
                                      {"role": "assistant", "content": answer(rng, p, attr)}]})  # fmt: skip
    for _ in range(sft_n["greeting (no tool)"]):
        system = system_message(rng, offered(rng, None, sft_kinds))
        q, a = rng.choice(GENERIC_IDENTITY)
        sft.append({"conversations": [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    rng.shuffle(sft)

    rl = []
    for pr in rl_problems:
        system = system_message(rng, offered(rng, "calculator", rl_kinds))
        rl.append({"conversations": [system, {"role": "user", "content": arith_question(rng, pr)}],
                   "answer": str(solve(pr))})  # fmt: skip
    for _ in range(rl_n["lookup"]):
        i, attr = rng.choice(plan.known)
        p = plan.people[i]
        system = system_message(rng, offered(rng, "lookup", rl_kinds))
        rl.append({"conversations": [system, {"role": "user", "content": question(rng, p, attr)}],
                   "answer": p.value(attr)})  # fmt: skip
    rng.shuffle(rl)
    return ToolUse(sft, rl, {"sft_tools.jsonl": sft_kinds, "rl_tools.jsonl": rl_kinds})


def chat_messages(record: dict) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of a record for a chat template: the system message's "tools" and each assistant's
    "tool_calls" decoded from their JSON strings, as MiniMind's data reader does."""
    messages, tools = [], None
    for m in record["conversations"]:
        m = dict(m)
        if m["role"] == "system" and "tools" in m:
            tools = json.loads(m.pop("tools"))
        if isinstance(m.get("tool_calls"), str):
            m["tool_calls"] = json.loads(m["tool_calls"])
        messages.append(m)
    return messages, tools
