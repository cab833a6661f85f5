"""Tests of tools/make_sample_data.py and the data it ships in data/sample/.

The generator is deterministic and the shipped files are exactly its output for the default seed; every file parses
in its MiniMind format; arithmetic answers are right (recomputed here); the held-out split holds (eval questions and
eval problems appear in no other file, held-out facts are stated in pretrain.jsonl); the assistant's identity name
appears only in lora_identity.jsonl; README's entropy figure matches a recount.
"""

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from minimind_fast.tokenizer import Tokenizer
from tools import make_sample_data as msd

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
JSONL = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "rlaif.jsonl", "r1_mix.jsonl", "lora_identity.jsonl", "eval.jsonl")
CONVERSATION_FILES = ("sft.jsonl", "rlaif.jsonl", "r1_mix.jsonl", "lora_identity.jsonl")
THINK_ANSWER = re.compile(r"<think>\n(?P<think>.+)\n</think>\n<answer>\n(?P<answer>.+)\n</answer>", re.S)
PROBLEM = re.compile(r"(\d+) (\+|-|plus|minus) (\d+)")


def load(name: str, folder: Path = SAMPLE) -> list[dict]:
    with open(folder / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: load(name) for name in JSONL}


@pytest.fixture(scope="module")
def raw() -> dict[str, str]:
    return {name: (SAMPLE / name).read_text(encoding="utf-8") for name in JSONL}


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
    assert names == sorted([*JSONL, "README.md"]) == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "pretrain.jsonl").read_bytes() != (c / "pretrain.jsonl").read_bytes()
    assert counts == {name: len(load(name, a)) for name in JSONL}
    assert all(n > 0 for n in counts.values())


def test_shipped_data_is_generator_output(tmp_path):
    msd.main(["--out", str(tmp_path)])
    shipped = sorted(p.name for p in SAMPLE.iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), f"data/sample/{name} is stale"


def test_sizes():
    sizes = {p.name: p.stat().st_size for p in SAMPLE.iterdir()}
    assert sum(sizes.values()) < 5_000_000
    assert max(sizes, key=sizes.get) == "pretrain.jsonl" and 1_500_000 < sizes["pretrain.jsonl"] < 3_000_000


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
    assert set(kinds) == {*msd.ATTRIBUTES, "arithmetic", "reading"}
    # The world is small (each fact is read a few hundred times), so its held-out facts are few: 20+ in all.
    assert sum(kinds[k] for k in msd.ATTRIBUTES) >= 20 and kinds["arithmetic"] >= 100 and kinds["reading"] >= 100
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
    facts = [e for e in data["eval.jsonl"] if e["kind"] in msd.ATTRIBUTES]
    sentences = Counter(s for r in data["pretrain.jsonl"] for s in re.split(r"(?<=\.) ", r["text"]))
    for e in facts:
        name = next(n for n in re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", e["question"]) if n)
        forms = {msd.fill(q, name, e["answer"]) for q in msd.QUESTIONS[e["kind"]]}
        assert e["question"] in forms and not forms & user_turns, e
        # ... while the fact itself is stated in pretraining text, several times.
        stated = {msd.fill(s, name, e["answer"]) for s in msd.FACT_SENTENCES[e["kind"]]}
        assert sum(sentences[s] for s in stated) >= 3, e
    # Held out by person, in every phrasing: each held-out person is asked every question form of every attribute,
    # and is named in no conversation file at all.
    people: dict[str, set[str]] = {}
    for e in facts:
        people.setdefault(re.findall(NAME, e["question"])[0], set()).add(e["question"])
    n_forms = sum(len(forms) for forms in msd.QUESTIONS.values())
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
    hits = {(re.search(NAME, question).group(0), k) for k in msd.ATTRIBUTES for q in msd.QUESTIONS[k]
            if re.fullmatch(_template_regex(q), question)}  # fmt: skip
    assert len(hits) == 1, question
    return hits.pop()


def _stated_value(sentences, name, kind):
    """The value a passage states for (name, kind), found by matching every fact template against every sentence."""
    found = {m.group("v") for t in msd.FACT_SENTENCES[kind] for s in sentences
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
        assert reply in {msd.fill(a, name, value) for a in msd.ANSWERS[kind]}, (user, reply)
        taught += 1
    assert taught >= 500


def test_eval_problems_appear_nowhere_else(data, raw):
    problems = [PROBLEM.search(e["question"]).groups() for e in data["eval.jsonl"] if e["kind"] == "arithmetic"]
    assert len(problems) >= 100
    others = "\n".join(text for name, text in raw.items() if name != "eval.jsonl")
    seen = {(a, "+" if op in ("+", "plus") else "-", b) for a, op, b in PROBLEM.findall(others)}
    for a, op, b in problems:
        op = "+" if op in ("+", "plus") else "-"
        assert (a, op, b) not in seen
        if op == "+":
            assert (b, op, a) not in seen


def test_identity_name_only_in_lora(data, raw):
    name = msd.IDENTITY_NAME
    assert name.lower() not in "".join(raw[f] for f in JSONL if f != "lora_identity.jsonl").lower()
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
