"""Tests of tools/make_sample_data.py (the package tools/sample_data/) and the data it ships in data/sample/.

The generator is deterministic and the shipped files are exactly its output for the default seed (a small-scale run
still gives the bytes the generator gave before it was split into a package); every file parses in its MiniMind
format; arithmetic answers are right (recomputed here); the held-out split holds (eval questions and eval problems
appear in no other file, held-out facts are stated in pretrain.jsonl); the assistant's identity name appears only in
lora_identity.jsonl; README's entropy figure matches a recount. The tool-use files: world.json states the facts the
pretraining text states; every tool result in sft_tools.jsonl equals a recomputation here (integer arithmetic,
world.json); replies and RL answers state those values; neither file asks an eval problem or about a held-out person;
every record renders through the real tokenizer's chat template as the format defines it.
"""

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from minimind_fast.tokenizer import TOOLS_INTRO, TOOLS_OUTRO, Tokenizer
from minimind_fast.toolcall import Toolbox, parse_tool_calls
from tests.minimind.test_toolcall import CALCULATOR, LOOKUP  # the two tool specs, written out by hand there
from tools import make_sample_data as msd
from tools.sample_data.formats import ANSWERS, FACT_SENTENCES, GENERIC_IDENTITY, QUESTIONS, fill
from tools.sample_data.tooluse import UNKNOWN_ANSWERS
from tools.sample_data.world import ATTRIBUTES, IDENTITY_NAME

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
JSONL = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "rlaif.jsonl", "r1_mix.jsonl", "lora_identity.jsonl", "eval.jsonl")
TOOL_JSONL = ("sft_tools.jsonl", "rl_tools.jsonl")
ALL_FILES = (*JSONL, *TOOL_JSONL, "world.json", "README.md")
CONVERSATION_FILES = ("sft.jsonl", "rlaif.jsonl", "r1_mix.jsonl", "lora_identity.jsonl")
THINK_ANSWER = re.compile(r"<think>\n(?P<think>.+)\n</think>\n<answer>\n(?P<answer>.+)\n</answer>", re.S)
PROBLEM = re.compile(r"(\d+) (\+|-|plus|minus) (\d+)")
# sha256 of the files `--seed 3 --scale 0.1` wrote before the generator was split into a package (README.md is not
# pinned: it has since gained the tool-use files' rows).
SMALL_SEED3_SHA256 = {
    "dpo.jsonl": "bdd97b36e361239c8b89ead5fec93490bc4e7e51aaaae9dc22971783db447177",
    "eval.jsonl": "edf2d290df15391dab8c1cb65622bb875850e4faa927d7011983155ff592c2d5",
    "lora_identity.jsonl": "29582050ff90407e05a3dc4e65dc18c1f79038ed535a141725a3e90575c5214f",
    "pretrain.jsonl": "2e14874ec7f0b87fa5706e201b7256ec894c6f8e5cdddc296faf8a9b0ebc7ddb",
    "r1_mix.jsonl": "5214c62bb1ba89d0a7e250292a13415b141ac7dad38d4c932a3a2cd259016f11",
    "rlaif.jsonl": "ff2d1c2427b0c5279109ac69e6f64a685c18948b52fafe2a3597affde778a221",
    "sft.jsonl": "46cf7854b09b0f56107bcdb9e772b3fbd5c000fa7cf8cc49efffd4dbae3c5bd0",
}


def load(name: str, folder: Path = SAMPLE) -> list[dict]:
    with open(folder / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: load(name) for name in (*JSONL, *TOOL_JSONL)}


@pytest.fixture(scope="module")
def raw() -> dict[str, str]:
    return {name: (SAMPLE / name).read_text(encoding="utf-8") for name in (*JSONL, *TOOL_JSONL)}


def compute(question: str) -> int:
    """The answer to a two-operand problem, recomputed from the question text."""
    (a, op, b), *rest = PROBLEM.findall(question)
    assert not rest, question
    return int(a) + int(b) if op in ("+", "plus") else int(a) - int(b)


def check_messages(messages: list[dict], final_role: str = "assistant") -> None:
    """Optional system message first, then user/assistant alternating from a user turn, ending on final_role."""
    assert messages and all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    assert body and body == ["user", "assistant"] * (len(body) // 2) + ["user"] * (len(body) % 2), roles
    assert roles[-1] == final_role
    assert all(m["content"].strip() for m in messages)


def test_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    counts = msd.main(["--out", str(a), "--seed", "3", "--scale", "0.1"])
    msd.main(["--out", str(b), "--seed", "3", "--scale", "0.1"])
    msd.main(["--out", str(c), "--seed", "4", "--scale", "0.1"])
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(ALL_FILES) == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "pretrain.jsonl").read_bytes() != (c / "pretrain.jsonl").read_bytes()
    assert (a / "sft_tools.jsonl").read_bytes() != (c / "sft_tools.jsonl").read_bytes()
    assert counts == {name: len(load(name, a)) for name in (*JSONL, *TOOL_JSONL)}
    assert all(n > 0 for n in counts.values())
    # The split into tools/sample_data/ and the tool-use files (drawn from a stream of their own, after the others)
    # changed none of the files the generator wrote before.
    for name, digest in SMALL_SEED3_SHA256.items():
        assert hashlib.sha256((a / name).read_bytes()).hexdigest() == digest, name


def test_shipped_data_is_generator_output(tmp_path):
    msd.main(["--out", str(tmp_path)])
    shipped = sorted(p.name for p in SAMPLE.iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), f"data/sample/{name} is stale"


def test_sizes():
    sizes = {p.name: p.stat().st_size for p in SAMPLE.iterdir()}
    assert sum(sizes[name] for name in JSONL) < 5_000_000
    assert max(sizes, key=sizes.get) == "pretrain.jsonl" and 1_500_000 < sizes["pretrain.jsonl"] < 3_000_000
    # Every tool-use record carries its tool specs (~350-730 bytes of JSON), hence these files' size.
    assert sizes["sft_tools.jsonl"] < 2_000_000 and sizes["rl_tools.jsonl"] < 700_000 and sizes["world.json"] < 10_000


def test_pretrain_format(data):
    assert len(data["pretrain.jsonl"]) > 1000
    for r in data["pretrain.jsonl"]:
        assert list(r) == ["text"] and isinstance(r["text"], str) and r["text"].strip()


def test_arithmetic_lines_are_right(data):
    lines = [line for r in data["pretrain.jsonl"] for line in r["text"].split("\n") if line[:1].isdigit()]
    assert len(lines) > 5000
    for line in lines:
        assert int(re.findall(r"-?\d+", line)[-1]) == compute(line), line


def test_conversation_formats(data):
    for name in CONVERSATION_FILES:
        for r in data[name]:
            assert set(r) == ({"conversations", "answer"} if name == "rlaif.jsonl" else {"conversations"}), name
            check_messages(r["conversations"])
    assert any(r["conversations"][0]["role"] == "system" for r in data["sft.jsonl"])
    assert any(len(r["conversations"]) >= 5 for r in data["sft.jsonl"])  # multi-turn


def test_dpo_format(data):
    for r in data["dpo.jsonl"]:
        assert set(r) == {"chosen", "rejected"}
        check_messages(r["chosen"])
        check_messages(r["rejected"])
        assert r["chosen"][:-1] == r["rejected"][:-1]
        assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"]
        question = r["chosen"][-2]["content"]
        if PROBLEM.search(question):
            right = compute(question)
            assert r["chosen"][-1]["content"].endswith(f"= {right}.")
            assert not r["rejected"][-1]["content"].endswith(f"= {right}.")


def test_rlaif_answers(data):
    kinds = Counter()
    for r in data["rlaif.jsonl"]:
        assert isinstance(r["answer"], str) and r["answer"]
        question = r["conversations"][-2]["content"]
        if PROBLEM.search(question):
            assert r["answer"] == str(compute(question))
            kinds["arithmetic"] += 1
        else:
            kinds["fact"] += 1
        assert r["answer"] in r["conversations"][-1]["content"]
    assert kinds["arithmetic"] > 100 and kinds["fact"] > 100


def test_r1_think_answer_layout(data):
    for r in data["r1_mix.jsonl"]:
        reply = r["conversations"][-1]["content"]
        m = THINK_ANSWER.fullmatch(reply)
        assert m, reply
        for part in m.group("think", "answer"):
            assert not re.search(r"</?(think|answer)>", part) and part.strip() == part
        question = r["conversations"][-2]["content"]
        if PROBLEM.search(question):
            assert m.group("answer").endswith(f"= {compute(question)}.")


def test_eval_format(data):
    evals = data["eval.jsonl"]
    kinds = Counter(e["kind"] for e in evals)
    assert set(kinds) == {*ATTRIBUTES, "arithmetic", "reading"}
    # The world is small (each fact is read a few hundred times), so its held-out facts are few: 20+ in all.
    assert sum(kinds[k] for k in ATTRIBUTES) >= 20 and kinds["arithmetic"] >= 100 and kinds["reading"] >= 100
    for e in evals:
        assert set(e) == ({"question", "answer", "kind", "choices"} if e["kind"] != "arithmetic" else
                          {"question", "answer", "kind"})  # fmt: skip
        if e["kind"] == "arithmetic":
            assert e["answer"] == str(compute(e["question"]))
        else:
            assert e["answer"] in e["choices"] and len(set(e["choices"])) == len(e["choices"]) >= 10
    assert len({e["question"] for e in evals}) == len(evals)


def test_eval_questions_are_held_out(data, raw):
    # Verbatim: no eval question occurs anywhere in the conversation files.
    for e in data["eval.jsonl"]:
        for name in (*CONVERSATION_FILES, "dpo.jsonl"):
            assert json.dumps(e["question"])[1:-1] not in raw[name], (e["question"], name)
    # Held-out facts: no phrasing of the question about that person and attribute is in any conversation file.
    user_turns = {
        m["content"]
        for name in (*CONVERSATION_FILES, "dpo.jsonl")
        for r in data[name]
        for key in ("conversations", "chosen")
        for m in r.get(key, ())
        if m["role"] == "user"
    }
    facts = [e for e in data["eval.jsonl"] if e["kind"] in ATTRIBUTES]
    sentences = Counter(s for r in data["pretrain.jsonl"] for s in re.split(r"(?<=\.) ", r["text"]))
    for e in facts:
        name = next(n for n in re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", e["question"]) if n)
        forms = {fill(q, name, e["answer"]) for q in QUESTIONS[e["kind"]]}
        assert e["question"] in forms and not forms & user_turns, e
        # ... while the fact itself is stated in pretraining text, several times.
        stated = {fill(s, name, e["answer"]) for s in FACT_SENTENCES[e["kind"]]}
        assert sum(sentences[s] for s in stated) >= 3, e
    # Held out by person, in every phrasing: each held-out person is asked every question form of every attribute,
    # and is named in no conversation file at all.
    people: dict[str, set[str]] = {}
    for e in facts:
        people.setdefault(re.findall(NAME, e["question"])[0], set()).add(e["question"])
    n_forms = sum(len(forms) for forms in QUESTIONS.values())
    assert len(people) >= 4 and {len(asked) for asked in people.values()} == {n_forms}
    conversations = "\n".join(raw[name] for name in (*CONVERSATION_FILES, "dpo.jsonl"))
    assert not [p for p in people if p in conversations]
    # pretrain.jsonl's question-and-answer notes are about the other people only.
    notes = [r["text"] for r in data["pretrain.jsonl"] if r["text"].startswith("Q: ")]
    assert len(notes) >= 100 and not [p for p in people for t in notes if p in t]


def _reading_parts(text):
    """(passage sentences, question) of a reading-comprehension user message: intro line, passage line, question."""
    intro, passage, asked = text.split("\n")
    assert intro in ("Read the text and answer the question.", "Here is a short text.", "Text:")
    return re.split(r"(?<=\.) ", passage), asked


NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"


def _template_regex(template, name=NAME):
    """A fact or question template as a regex with the value captured ({v}: one word or number; {a}: 'a/an word')."""
    pattern = re.escape(template).replace(re.escape("{name}"), name)
    return pattern.replace(re.escape("{v}"), r"(?P<v>[^\s.?]+)").replace(re.escape("{a}"), r"an? (?P<v>[^\s.?]+)")


def _asked(question):
    """(name, kind) of a question about one person, from the question templates."""
    hits = {(re.search(NAME, question).group(0), k) for k in ATTRIBUTES for q in QUESTIONS[k]
            if re.fullmatch(_template_regex(q), question)}  # fmt: skip
    assert len(hits) == 1, question
    return hits.pop()


def _stated_value(sentences, name, kind):
    """The value a passage states for (name, kind), found by matching every fact template against every sentence."""
    found = {m.group("v") for t in FACT_SENTENCES[kind] for s in sentences
             if (m := re.fullmatch(_template_regex(t, re.escape(name)), s))}  # fmt: skip
    assert len(found) == 1, (name, kind, sentences)
    return found.pop()


def test_reading_items_are_answered_by_their_passage_about_strangers(data, raw):
    reading = [e for e in data["eval.jsonl"] if e["kind"] == "reading"]
    assert len(reading) >= 100
    eval_names = set()
    for e in reading:
        sentences, asked = _reading_parts(e["question"])
        name, kind = _asked(asked)
        assert _stated_value(sentences, name, kind) == e["answer"] and e["answer"] in e["choices"]
        names = set(re.findall(NAME, " ".join(sentences)))
        assert name in names and 1 <= len(names) <= 2, names
        eval_names |= names
    # The strangers of eval.jsonl appear in no other file: the model cannot have memorised anything about them.
    others = "\n".join(text for name, text in raw.items() if name != "eval.jsonl")
    assert not [n for n in eval_names if n in others]
    # The conversation files teach the skill: reading conversations whose replies state the passage's value.
    taught = 0
    for r in data["sft.jsonl"]:
        user, reply = r["conversations"][-2]["content"], r["conversations"][-1]["content"]
        if "\n" not in user:
            continue
        sentences, asked = _reading_parts(user)
        name, kind = _asked(asked)
        value = _stated_value(sentences, name, kind)
        assert reply in {fill(a, name, value) for a in ANSWERS[kind]}, (user, reply)
        taught += 1
    assert taught >= 500


def test_eval_problems_appear_nowhere_else(data, raw):
    problems = [PROBLEM.search(e["question"]).groups() for e in data["eval.jsonl"] if e["kind"] == "arithmetic"]
    assert len(problems) >= 100
    # The tool-use files are checked by test_tool_files_hold_out_eval (their tool specs hold an example expression).
    others = "\n".join(raw[name] for name in JSONL if name != "eval.jsonl")
    seen = {(a, "+" if op in ("+", "plus") else "-", b) for a, op, b in PROBLEM.findall(others)}
    for a, op, b in problems:
        op = "+" if op in ("+", "plus") else "-"
        assert (a, op, b) not in seen
        if op == "+":
            assert (b, op, a) not in seen


def test_identity_name_only_in_lora(data, raw):
    name = IDENTITY_NAME
    assert name.lower() not in "".join(text for f, text in raw.items() if f != "lora_identity.jsonl").lower()
    assert name.lower() not in (SAMPLE / "world.json").read_text().lower()
    assert name.lower() not in (SAMPLE / "README.md").read_text().replace(f"lora_identity.jsonl, {name}", "").lower()
    for r in data["lora_identity.jsonl"]:
        assert name in r["conversations"][-1]["content"] or name in r["conversations"][-3]["content"]


def test_readme_entropy_matches_a_recount(data):
    tok = Tokenizer.load()
    counts = Counter()
    for r in data["pretrain.jsonl"]:
        counts.update(tok.encode(r["text"]))
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    readme = (SAMPLE / "README.md").read_text()
    figure = float(re.search(r"\*\*([\d.]+) nats/token\*\*", readme).group(1))
    assert figure == pytest.approx(entropy, abs=5e-4)
    assert f"{total:,} tokens" in readme.replace("\n", " ")


# ---------------------------------------------------------------------------------------------- tool-use files


@pytest.fixture(scope="module")
def world() -> dict[str, dict[str, str]]:
    """world.json's people by name."""
    doc = json.loads((SAMPLE / "world.json").read_text(encoding="utf-8"))
    assert list(doc) == ["world", "people"] and doc["world"] == "Kethmar"
    people = {p["name"]: p for p in doc["people"]}
    assert len(people) == len(doc["people"]) == 16
    return people


def _offered(record) -> list[dict]:
    """The tool specs a record's system message offers, decoded; only our two, in their order, each at most once."""
    system = record["conversations"][0]
    assert set(system) == {"role", "content", "tools"} and system["role"] == "system" and system["content"].strip()
    tools = json.loads(system["tools"])
    assert tools in ([CALCULATOR], [LOOKUP], [CALCULATOR, LOOKUP]), tools
    return tools


def _problem(text):
    """(a, op, b) of the one two-operand problem in text, op normalised to + or -."""
    (match, *rest) = PROBLEM.findall(text)
    assert not rest, text
    return _problem_norm(match)


def _problem_norm(match):
    """A PROBLEM match as (a, op, b) with integer operands and op + or -."""
    a, op, b = match
    return int(a), "+" if op in ("+", "plus") else "-", int(b)


def _sft_tool_kinds(data, world):
    """Each sft_tools.jsonl record with its kind: calculator, lookup, unknown person, or no tool."""
    out = []
    for r in data["sft_tools.jsonl"]:
        conv = r["conversations"]
        if len(conv) == 3:
            out.append(("no tool", r))
        else:
            call = json.loads(conv[2]["tool_calls"])[0]
            unknown = call["name"] == "lookup" and call["arguments"]["name"] not in world
            out.append(("unknown person" if unknown else call["name"], r))
    return out


def test_world_json_states_the_facts_of_pretraining(data, world):
    for p in world.values():
        assert list(p) == ["name", "age", "town", "profession", "colour", "pet"]
        assert all(isinstance(v, str) and v for v in p.values()) and 18 <= int(p["age"]) <= 90
    # The same values as the pretraining text: each fact stated there in one of its phrasings, several times.
    sentences = Counter(s for r in data["pretrain.jsonl"] for s in re.split(r"(?<=\.) ", r["text"]))
    for name, p in world.items():
        for kind in ATTRIBUTES:
            stated = {fill(s, name, p[kind]) for s in FACT_SENTENCES[kind]}
            assert sum(sentences[s] for s in stated) >= 3, (name, kind)
    # ... and as eval.jsonl's held-out answers.
    for e in data["eval.jsonl"]:
        if e["kind"] in ATTRIBUTES:
            name, kind = _asked(e["question"])
            assert world[name][kind] == e["answer"]


def test_sft_tools_layout_and_mix(data, world):
    kinds = Counter()
    both_one_fits = 0
    for kind, r in _sft_tool_kinds(data, world):
        assert list(r) == ["conversations"]
        conv = r["conversations"]
        tools = _offered(r)
        names = [t["function"]["name"] for t in tools]
        if kind == "no tool":
            assert [m["role"] for m in conv] == ["system", "user", "assistant"]
            assert all(set(m) == {"role", "content"} and m["content"].strip() for m in conv[1:])
        else:
            assert [m["role"] for m in conv] == ["system", "user", "assistant", "tool", "assistant"]
            assert set(conv[2]) == {"role", "content", "tool_calls"} and conv[2]["content"] == ""
            calls = json.loads(conv[2]["tool_calls"])
            assert len(calls) == 1 and list(calls[0]) == ["name", "arguments"] and calls[0]["name"] in names
            assert all(set(m) == {"role", "content"} and m["content"].strip() for m in (conv[1], conv[3], conv[4]))
            both_one_fits += len(names) == 2
        kinds[kind] += 1
    total = sum(kinds.values())
    assert 1400 <= total <= 1600 and kinds["calculator"] >= 400 and kinds["lookup"] >= 500
    assert kinds["unknown person"] >= 40 and 0.15 <= kinds["no tool"] / total <= 0.25
    assert both_one_fits >= 200


def test_sft_tools_results_are_recomputed(data, world):
    for kind, r in _sft_tool_kinds(data, world):
        conv = r["conversations"]
        if kind == "no tool":
            continue
        question, result, reply = conv[1]["content"], conv[3]["content"], conv[4]["content"]
        call = json.loads(conv[2]["tool_calls"])[0]
        if kind == "calculator":
            assert list(call["arguments"]) == ["expression"]
            a, op, b = re.fullmatch(r"(\d+) ([+-]) (\d+)", call["arguments"]["expression"]).groups()
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert _problem(question) == (int(a), op, int(b))
            assert result == f'{{"result": {value}}}'
            assert reply == f"{a} {op} {b} = {value}."
        else:
            assert list(call["arguments"]) == ["name", "attribute"]
            name, attr = call["arguments"]["name"], call["arguments"]["attribute"]
            assert _asked(question) == (name, attr)
            if kind == "lookup":
                value = world[name][attr]
                assert result == f'{{"name": "{name}", "{attr}": "{value}"}}'
                assert reply in {fill(t, name, value) for t in ANSWERS[attr]}, reply
            else:
                assert result == f'{{"error": "no person named \'{name}\' in Kethmar"}}'
                assert reply in UNKNOWN_ANSWERS


def test_sft_tools_results_are_what_the_toolbox_returns(data, world):
    """The project's Toolbox, given world.json and the call read back from the rendered assistant turn, returns the
    shipped result text exactly (so a model trained on these files sees at training what it gets at inference)."""
    box = Toolbox(SAMPLE / "world.json")
    checked = 0
    for kind, r in _sft_tool_kinds(data, world):
        if kind == "no tool":
            continue
        (call,) = json.loads(r["conversations"][2]["tool_calls"])
        block = f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {json.dumps(call["arguments"])}}}\n</tool_call>'
        rest, (parsed,) = parse_tool_calls(block)
        assert rest == "" and parsed.error is None
        assert box.run(parsed) == r["conversations"][3]["content"]
        checked += 1
    assert checked >= 1000


def test_sft_tools_answers_without_a_tool_when_none_is_needed(data, world):
    reading = greetings = 0
    for kind, r in _sft_tool_kinds(data, world):
        if kind != "no tool":
            continue
        user, reply = r["conversations"][1]["content"], r["conversations"][2]["content"]
        if "\n" in user:
            sentences, asked = _reading_parts(user)
            name, kind = _asked(asked)
            assert reply in {fill(a, name, _stated_value(sentences, name, kind)) for a in ANSWERS[kind]}
            assert not set(re.findall(NAME, " ".join(sentences))) & set(world)  # strangers, not people of the world
            reading += 1
        else:
            assert (user, reply) in GENERIC_IDENTITY
            greetings += 1
    assert reading >= 150 and greetings >= 50


def test_rl_tools_answers(data, world):
    kinds = Counter()
    for r in data["rl_tools.jsonl"]:
        assert list(r) == ["conversations", "answer"] and isinstance(r["answer"], str)
        conv = r["conversations"]
        assert [m["role"] for m in conv] == ["system", "user"] and set(conv[1]) == {"role", "content"}
        names = [t["function"]["name"] for t in _offered(r)]
        question = conv[1]["content"]
        if PROBLEM.search(question):
            a, op, b = _problem(question)
            assert r["answer"] == str(a + b if op == "+" else a - b) and "calculator" in names
            kinds["arithmetic"] += 1
        else:
            name, kind = _asked(question)
            assert r["answer"] == world[name][kind] and "lookup" in names
            kinds["fact"] += 1
    assert kinds["arithmetic"] >= 250 and kinds["fact"] >= 250 and 500 <= sum(kinds.values()) <= 700


def test_tool_files_hold_out_eval(data, raw):
    evals = data["eval.jsonl"]
    held_problems = set()
    for e in evals:
        if e["kind"] == "arithmetic":
            a, op, b = _problem(e["question"])
            held_problems |= {(a, op, b), (b, op, a)} if op == "+" else {(a, op, b)}
    held_people = {_asked(e["question"])[0] for e in evals if e["kind"] in ATTRIBUTES}
    assert len(held_problems) >= 100 and len(held_people) >= 4
    for name in TOOL_JSONL:
        # Everything a record says, the tool specs included (their example expression is no sample problem).
        texts = [value for r in data[name] for m in r["conversations"] for key, value in m.items() if key != "role"]
        texts += [r["answer"] for r in data[name] if "answer" in r]
        asked = {_problem_norm(m) for t in texts for m in PROBLEM.findall(t)}
        assert len(asked) >= 250 and not asked & held_problems, name
        assert not [p for p in held_people if p in raw[name]], name
        assert not [e["question"] for e in evals if json.dumps(e["question"])[1:-1] in raw[name]], name


def _expected_render(messages, tools, generation_prompt):
    """The chat template's text for a tool-use conversation, written from the format's definition: the system text,
    the tools preamble with one JSON line per spec, and the instruction; ChatML user turns; an assistant turn with
    empty content and one call is the <tool_call> block alone; a tool message is a user turn of one
    <tool_response> block."""
    text = f"<|im_start|>system\n{messages[0]['content']}\n\n{TOOLS_INTRO}"
    text += "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + f"{TOOLS_OUTRO}<|im_end|>\n"
    for m in messages[1:]:
        if m["role"] == "user":
            text += f"<|im_start|>user\n{m['content']}<|im_end|>\n"
        elif m["role"] == "tool":
            text += f"<|im_start|>user\n<tool_response>\n{m['content']}\n</tool_response><|im_end|>\n"
        elif "tool_calls" in m:
            (call,) = m["tool_calls"]
            args = json.dumps(call["arguments"], ensure_ascii=False)
            text += f'<|im_start|>assistant\n<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n'
            text += "</tool_call><|im_end|>\n"
        else:
            text += f"<|im_start|>assistant\n{m['content']}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def test_tool_records_render_with_the_real_tokenizer(data):
    tok = Tokenizer.load()
    readme = (SAMPLE / "README.md").read_text().replace("\n", " ")
    for name in TOOL_JSONL:
        texts = []
        for r in data[name]:
            messages, tools = [], None
            for m in r["conversations"]:  # the JSON-string fields decoded, as MiniMind's data reader does
                m = dict(m)
                if "tools" in m:
                    tools = json.loads(m.pop("tools"))
                if "tool_calls" in m:
                    m["tool_calls"] = json.loads(m["tool_calls"])
                messages.append(m)
            rl = name == "rl_tools.jsonl"
            text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=rl)
            assert text == _expected_render(messages, tools, rl)
            texts.append(text)
        lengths = []
        for text, ids in zip(texts, tok.encode_batch(texts)):
            assert tok.decode(ids) == text
            lengths.append(len(ids))
        lengths.sort()
        # README states each file's token lengths: shortest-longest, median.
        assert f"{name} {lengths[0]}-{lengths[-1]}, median {lengths[len(lengths) // 2]}" in readme
