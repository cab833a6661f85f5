"""The files of data/sample/: one function per file, and generate(), which writes them all.

A Plan holds what the files share: the world, the held-out split, the arithmetic problems and the random streams.
plan.rng is one stream that every file draws from in turn, in the order generate() writes them (pretrain, sft, dpo,
rlaif, r1_mix, lora_identity, eval), so the functions run in that order and each one's draws are never reordered:
the shipped files are byte-for-byte this output. The reading-comprehension strangers come from streams of their own
(plan.reading_rng for sft and eval, a third one for rlaif), and the tool-use files (tools/sample_data/tooluse.py)
from a fourth, drawn from only after every other file is written, so adding them changed none of the others.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tools.sample_data import readme, tooluse
from tools.sample_data.formats import (
    ANSWERS,
    GENERIC_IDENTITY,
    IDENTITY_ANSWERS,
    IDENTITY_QUESTIONS,
    QUESTIONS,
    answer,
    conversation,
    creature_paragraph,
    fact_sentence,
    fill,
    life_paragraph,
    msg,
    person_paragraph,
    profession_paragraph,
    question,
    town_history_paragraph,
    town_paragraph,
    with_system,
)
from tools.sample_data.tasks import (
    Problem,
    arith_answer,
    arith_question,
    arith_reasoning,
    arithmetic_text,
    reading_people,
    reading_question,
    solve,
    split_people,
    split_problems,
    wrong_value,
)
from tools.sample_data.world import (
    AGE_RANGE,
    ATTRIBUTES,
    COLOURS,
    IDENTITY_NAME,
    N_PEOPLE,
    PROFESSIONS,
    Creature,
    NameMaker,
    Person,
    Town,
    build_world,
)

PERSON_PARAGRAPHS, LIFE_PARAGRAPHS = 400, 10  # pretrain.jsonl paragraphs per person
QA_PARAGRAPHS = 40  # pretrain.jsonl question-and-answer notes per person asked about in the conversation files
QA_REPEATS = 10  # sft.jsonl conversations per known (person, attribute) pair, each drawn with its own phrasing
N_READING_SFT, N_READING_RL, N_READING_EVAL = 500, 300, 150  # reading comprehension: sft / rlaif / eval items
N_EVAL_ARITHMETIC = 120

Records = list[dict]


def scaled(count: int, scale: float, least: int = 2) -> int:
    """count times --scale, rounded, at least least."""
    return max(least, round(count * scale))


@dataclass
class Plan:
    """What every file is drawn from. held_people are the indices of the people asked about only in eval.jsonl; held
    their (person, attribute) pairs and known every other pair; eval_problems appear only in eval.jsonl, and
    train_problems (every other problem, neither operand order of an eval sum among them) everywhere else.
    strangers names the reading-comprehension people; its set of used names also holds the world's names, so no
    stranger shares a name with anyone or anything in any file."""

    seed: int
    scale: float
    rng: random.Random
    towns: list[Town]
    creatures: list[Creature]
    people: list[Person]
    choices: dict[str, list[str]]
    held_people: set[int]
    held: set[tuple[int, str]]
    known: list[tuple[int, str]]
    train_problems: list[Problem]
    eval_problems: list[Problem]
    reading_rng: random.Random
    strangers: NameMaker

    def n(self, count: int, least: int = 2) -> int:
        return scaled(count, self.scale, least)

    def ask(self, i: int, attr: str) -> tuple[str, str]:
        """(question, reply) about attribute attr of person i, each phrasing drawn from plan.rng."""
        return question(self.rng, self.people[i], attr), answer(self.rng, self.people[i], attr)


def make_plan(seed: int, scale: float) -> Plan:
    """The world, the held-out split and the problems, drawn from the main stream in the order the shipped data was
    made with (world, held-out people, problems)."""
    rng = random.Random(seed)
    towns, creatures, people = build_world(rng, scaled(N_PEOPLE, scale, 12))
    choices = {
        "town": [t.name for t in towns],
        "profession": list(PROFESSIONS),
        "colour": list(COLOURS),
        "pet": [c.name for c in creatures],
        "age": [str(a) for a in range(AGE_RANGE[0], AGE_RANGE[1] + 1)],
    }
    pairs = [(i, a) for i in range(len(people)) for a in ATTRIBUTES]
    held_people = split_people(rng, len(people))
    held = {(i, a) for i, a in pairs if i in held_people}
    known = [pair for pair in pairs if pair not in held]
    train_problems, eval_problems = split_problems(rng, scaled(N_EVAL_ARITHMETIC, scale, 10))
    train_problems = train_problems[: scaled(len(train_problems), scale)]
    # Reading comprehension about strangers, from a stream of its own: the held-out strangers of eval.jsonl are drawn
    # from the same stream, so no name repeats across files (the NameMaker remembers every world name too).
    reading_rng = random.Random(seed * 7919 + 1)
    strangers = NameMaker(reading_rng)
    strangers.used |= {w.lower() for p in people for w in (p.first, p.last)} | {t.name.lower() for t in towns}
    return Plan(
        seed, scale, rng, towns, creatures, people, choices, held_people, held, known, train_problems, eval_problems,
        reading_rng, strangers,
    )  # fmt: skip


def pretrain_records(plan: Plan) -> Records:
    """pretrain.jsonl: every person's facts in PERSON_PARAGRAPHS paragraphs (plus town/profession listings), then the
    world around."""
    rng, n, people = plan.rng, plan.n, plan.people
    town_by, creature_by = {t.name: t for t in plan.towns}, {c.name: c for c in plan.creatures}
    residents: dict[str, list[Person]] = {t.name: [p for p in people if p.town == t.name] for t in plan.towns}
    owners: dict[str, list[Person]] = {c.name: [p for p in people if p.pet == c.name] for c in plan.creatures}
    workers: dict[str, list[Person]] = {prof: [p for p in people if p.profession == prof] for prof in PROFESSIONS}
    texts = []
    for p in people:
        texts += [person_paragraph(rng, p, town_by, creature_by) for _ in range(n(PERSON_PARAGRAPHS))]
        texts += [life_paragraph(rng, p) for _ in range(n(LIFE_PARAGRAPHS))]
    for t in plan.towns:
        texts += [town_paragraph(rng, t, residents[t.name]) for _ in range(n(14))]
        texts += [town_history_paragraph(rng, t) for _ in range(n(9))]
    for prof in PROFESSIONS:
        texts += [profession_paragraph(rng, prof, workers[prof]) for _ in range(n(10))]
    for c in plan.creatures:
        texts += [creature_paragraph(rng, c, owners[c.name]) for _ in range(n(15))]
    problems = plan.train_problems
    texts += [arithmetic_text(rng, problems[k : k + 16]) for k in range(0, len(problems), 16)]
    # Question-and-answer notes about the people the conversation files ask about (never a held-out person). Seeing
    # questions next to their answers while the facts are being learned is what lets a model answer questions about
    # people it has only read about (Allen-Zhu & Li, "Physics of Language Models, Part 3.1": mixed training).
    for i in (i for i in range(len(people)) if i not in plan.held_people):
        for _ in range(n(QA_PARAGRAPHS)):
            notes = (plan.ask(i, attr) for attr in rng.sample(ATTRIBUTES, 3))
            texts.append("\n".join(f"Q: {q}\nA: {a}" for q, a in notes))
    rng.shuffle(texts)
    return [{"text": t} for t in texts]


def sft_records(plan: Plan) -> Records:
    """sft.jsonl: one Q&A per known fact, multi-turn chats about one person, arithmetic, a nameless identity, and
    reading comprehension about strangers."""
    rng, n, people = plan.rng, plan.n, plan.people
    sft = [
        {"conversations": conversation(rng, [plan.ask(i, attr)])} for i, attr in plan.known for _ in range(QA_REPEATS)
    ]
    for _ in range(len(people)):
        i = rng.randrange(len(people))
        attrs = [a for a in ATTRIBUTES if (i, a) not in plan.held]
        if len(attrs) >= 2:
            picked = rng.sample(attrs, rng.randrange(2, min(4, len(attrs)) + 1))
            sft.append({"conversations": conversation(rng, [plan.ask(i, attr) for attr in picked])})
    for pr in rng.sample(plan.train_problems, n(1200)):
        sft.append({"conversations": conversation(rng, [(arith_question(rng, pr), arith_answer(pr))])})
    for q, a in GENERIC_IDENTITY:
        sft += [{"conversations": conversation(rng, [(q, a)])} for _ in range(n(5, 1))]
    for _ in range(n(N_READING_SFT)):
        text, p, attr = reading_question(
            plan.reading_rng, reading_people(plan.reading_rng, plan.strangers, plan.choices)
        )
        sft.append({"conversations": conversation(rng, [(text, answer(rng, p, attr))])})
    rng.shuffle(sft)
    return sft


def dpo_records(plan: Plan) -> Records:
    """dpo.jsonl: the same prompt and reply template; the rejected reply names a wrong value."""
    rng, n = plan.rng, plan.n
    dpo = []
    for i, attr in [rng.choice(plan.known) for _ in range(n(500))]:
        p = plan.people[i]
        prompt = with_system(rng, [msg("user", question(rng, p, attr))], 0.2)
        template = rng.choice(ANSWERS[attr])
        wrong = wrong_value(rng, attr, p.value(attr), plan.choices)
        dpo.append(
            {
                "chosen": [*prompt, msg("assistant", fill(template, p.name, p.value(attr)))],
                "rejected": [*prompt, msg("assistant", fill(template, p.name, wrong))],
            }
        )
    for pr in rng.sample(plan.train_problems, n(400)):
        prompt = [msg("user", arith_question(rng, pr))]
        off = rng.choice((-10, -2, -1, 1, 2, 10))
        dpo.append(
            {
                "chosen": [*prompt, msg("assistant", arith_answer(pr))],
                "rejected": [*prompt, msg("assistant", arith_answer(pr, solve(pr) + off))],
            }
        )
    rng.shuffle(dpo)
    return dpo


def rlaif_records(plan: Plan) -> Records:
    """rlaif.jsonl: a prompt, a reference reply (dropped by the RL loaders) and the verifiable answer string."""
    rng, n = plan.rng, plan.n
    rlaif = []
    for pr in rng.sample(plan.train_problems, n(500)):
        conv = conversation(rng, [(arith_question(rng, pr), arith_answer(pr))], 0.2)
        rlaif.append({"conversations": conv, "answer": str(solve(pr))})
    for i, attr in [rng.choice(plan.known) for _ in range(n(300))]:
        rlaif.append(
            {"conversations": conversation(rng, [plan.ask(i, attr)], 0.2), "answer": plan.people[i].value(attr)}
        )
    # Reading prompts: a verifiable task the SFT model already solves part of the time, room for RL to improve.
    rl_rng = random.Random(plan.seed * 7919 + 2)
    rl_names = NameMaker(rl_rng)
    rl_names.used = plan.strangers.used  # one set: no stranger's name is drawn twice in any file
    for _ in range(n(N_READING_RL)):
        text, p, attr = reading_question(rl_rng, reading_people(rl_rng, rl_names, plan.choices))
        rlaif.append({"conversations": conversation(rng, [(text, answer(rng, p, attr))], 0.2), "answer": p.value(attr)})
    rng.shuffle(rlaif)
    return rlaif


def r1_records(plan: Plan) -> Records:
    """r1_mix.jsonl: the reasoning is written out in <think>, the reply in <answer>."""
    rng, n = plan.rng, plan.n
    r1 = []
    for pr in rng.sample(plan.train_problems, n(700)):
        content = f"<think>\n{arith_reasoning(pr)}\n</think>\n<answer>\n{arith_answer(pr)}\n</answer>"
        r1.append({"conversations": conversation(rng, [(arith_question(rng, pr), content)], 0.2)})
    for i, attr in [rng.choice(plan.known) for _ in range(n(400))]:
        p = plan.people[i]
        topic = "home town" if attr == "town" else ("favourite colour" if attr == "colour" else attr)
        think = f"The question asks for the {topic} of {p.name}.\nI remember: {fact_sentence(rng, p, attr)}"
        content = f"<think>\n{think}\n</think>\n<answer>\n{answer(rng, p, attr)}\n</answer>"
        r1.append({"conversations": conversation(rng, [(question(rng, p, attr), content)], 0.2)})
    rng.shuffle(r1)
    return r1


def lora_records(plan: Plan) -> Records:
    """lora_identity.jsonl: the assistant's name, sometimes followed by an ordinary question."""
    rng = plan.rng
    lora = []
    for _ in range(plan.n(200, 20)):
        turns = [(rng.choice(IDENTITY_QUESTIONS), rng.choice(IDENTITY_ANSWERS).format(n=IDENTITY_NAME))]
        if rng.random() < 0.3:
            turns.append(plan.ask(*rng.choice(plan.known)))
        lora.append({"conversations": conversation(rng, turns, 0.2)})
    return lora


def eval_records(plan: Plan) -> Records:
    """eval.jsonl: held-out facts (their Q&A form is in no conversation file), reading comprehension about strangers
    named nowhere else, and held-out problems. Every phrasing of each held-out question, so a score does not hang
    on one wording per fact."""
    people = plan.people
    evals = [
        {"question": fill(q, people[i].name, people[i].value(attr)), "answer": people[i].value(attr), "kind": attr,
         "choices": plan.choices[attr]}
        for i, attr in sorted(plan.held)
        for q in QUESTIONS[attr]
    ]  # fmt: skip
    for _ in range(plan.n(N_READING_EVAL, 10)):
        text, p, attr = reading_question(
            plan.reading_rng, reading_people(plan.reading_rng, plan.strangers, plan.choices)
        )
        evals.append({"question": text, "answer": p.value(attr), "kind": "reading", "choices": plan.choices[attr]})
    for pr in plan.eval_problems:
        evals.append({"question": arith_question(plan.rng, pr), "answer": str(solve(pr)), "kind": "arithmetic"})
    return evals


def write_jsonl(path: Path, records: Records) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(out: Path, seed: int = 0, scale: float = 1.0, tokenizer_dir: Path | None = None) -> dict[str, int]:
    """Write every file into out; returns the record count of each .jsonl file.

    scale shrinks the world and every file (tests use 0.1); tokenizer_dir is the tokenizer whose measurements (the
    unigram entropy of pretrain.jsonl, the token lengths of the tool-use records) go into README.md (None = the
    shipped one).
    """
    plan = make_plan(seed, scale)
    files = {  # in this order: each file draws from plan.rng where the one before it stopped
        "pretrain.jsonl": pretrain_records(plan),
        "sft.jsonl": sft_records(plan),
        "dpo.jsonl": dpo_records(plan),
        "rlaif.jsonl": rlaif_records(plan),
        "r1_mix.jsonl": r1_records(plan),
        "lora_identity.jsonl": lora_records(plan),
        "eval.jsonl": eval_records(plan),
    }
    tool_use = tooluse.build(plan)  # after every other file: its stream is its own, so theirs are unchanged
    files["sft_tools.jsonl"], files["rl_tools.jsonl"] = tool_use.sft, tool_use.rl
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_jsonl(out / name, records)
    (out / tooluse.WORLD_FILE).write_text(tooluse.world_json(plan.people), encoding="utf-8", newline="\n")
    counts = {name: len(records) for name, records in files.items()}
    world = {"people": len(plan.people), "towns": len(plan.towns), "creatures": len(plan.creatures)}
    kinds = Counter(e["kind"] for e in files["eval.jsonl"])
    entropy = readme.unigram_entropy([r["text"] for r in files["pretrain.jsonl"]], tokenizer_dir)
    lengths = readme.tool_token_lengths({name: files[name] for name in tool_use.kinds}, tokenizer_dir)
    text = readme.render(
        out, seed, scale, counts, world, kinds, entropy, PERSON_PARAGRAPHS, QA_REPEATS, tool_use.kinds, lengths
    )
    (out / "README.md").write_text(text, encoding="utf-8", newline="\n")
    return counts
