"""The checkable tasks of the sample data and their held-out splits: two-digit addition and subtraction, reading
comprehension about strangers, and which people and problems are kept for eval.jsonl only.

Every function takes the random stream it draws from; the number and order of its draws are part of the shipped
data's identity (data/sample/ is byte-for-byte the generator's output), so they are never reordered.
"""

from __future__ import annotations

import random

from tools.sample_data.formats import fact_sentence, question
from tools.sample_data.world import ATTRIBUTES, NameMaker, Person

# Share of the people whose facts are asked only in eval.jsonl. Whole people, not single (person, attribute) pairs:
# when some of a person's facts are asked in SFT, the tiny model learns which reply goes with that name and answers a
# held-out question about them with one of those replies (measured: wrong attribute on most held-out pairs).
HELD_OUT_FRACTION = 0.3


def split_people(rng: random.Random, n_people: int) -> set[int]:
    """Indices of the held-out people: their facts are asked only in eval.jsonl, every other person's in the
    conversation files. One rng.sample call (the draw the shipped data was made with)."""
    return set(rng.sample(range(n_people), max(1, round(n_people * HELD_OUT_FRACTION))))


# ---------------------------------------------------------------- arithmetic

Problem = tuple[int, str, int]  # (a, "+" or "-", b)


def solve(problem: Problem) -> int:
    a, op, b = problem
    return a + b if op == "+" else a - b


def problem_key(problem: Problem) -> Problem:
    """Addition is keyed by its unordered pair, so a held-out sum is not given away by its swapped twin."""
    a, op, b = problem
    return (min(a, b), op, max(a, b)) if op == "+" else problem


def all_problems() -> list[Problem]:
    adds = [(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    subs = [(a, "-", b) for a in range(10, 100) for b in range(10, a + 1)]
    return adds + subs


ARITH_LINES = (
    "{a} {op} {b} = {c}",
    "{a} {op} {b} = {c}",
    "{a} {opw} {b} is {c}.",
    "{a} {opw} {b} equals {c}.",
)
ARITH_QUESTIONS = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "What is {a} {opw} {b}?",
    "Calculate {a} {op} {b}.",
    "How much is {a} {opw} {b}?",
)


def arith_fields(problem: Problem) -> dict[str, object]:
    a, op, b = problem
    return {"a": a, "b": b, "op": op, "opw": "plus" if op == "+" else "minus", "c": solve(problem)}


def arith_question(rng: random.Random, problem: Problem) -> str:
    return rng.choice(ARITH_QUESTIONS).format(**arith_fields(problem))


def arith_answer(problem: Problem, value: int | None = None) -> str:
    f = arith_fields(problem)
    return f"{f['a']} {f['op']} {f['b']} = {value if value is not None else f['c']}."


def arith_reasoning(problem: Problem) -> str:
    """Column arithmetic written out digit by digit (units, then tens, with the carry or borrow).

    Every intermediate step has a one-digit operand, so no step restates another two-digit problem (an eval pair).
    """
    a, op, b = problem
    c = solve(problem)
    (at, au), (bt, bu) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        carry = int(au + bu >= 10)
        lines = [f"I need to add {a} and {b}.", f"Units: {au} + {bu} = {au + bu}."]
        if carry:
            lines.append(f"Write {au + bu - 10} and carry 1.")
        lines.append(f"Tens: {at} + {bt}{' + 1' if carry else ''} = {at + bt + carry}.")
    else:
        lines = [f"I need to subtract {b} from {a}."]
        if au >= bu:
            lines.append(f"Units: {au} - {bu} = {au - bu}.")
            lines.append(f"Tens: {at} - {bt} = {at - bt}.")
        else:
            lines.append(f"Units: {au} is less than {bu}, so borrow 10: {au + 10} - {bu} = {au + 10 - bu}.")
            lines.append(f"Tens: {at} - 1 - {bt} = {at - 1 - bt}.")
    lines.append(f"So {a} {op} {b} = {c}.")
    return "\n".join(lines)


def arithmetic_text(rng: random.Random, problems: list[Problem]) -> str:
    return "\n".join(rng.choice(ARITH_LINES).format(**arith_fields(pr)) for pr in problems)


# ---------------------------------------------------------------- reading comprehension about strangers


def reading_people(rng: random.Random, names: NameMaker, choices: dict[str, list[str]]) -> list[Person]:
    """One or two strangers (names used nowhere else) with random facts, for a reading-comprehension question."""
    return [
        Person(
            first=names.word(2, max_len=8),
            last=names.word(rng.choice((2, 3))),
            **{a: rng.choice(choices[a]) for a in ("town", "profession", "colour", "pet")},
            age=int(rng.choice(choices["age"])),
        )
        for _ in range(rng.choice((1, 2)))
    ]


def reading_question(rng: random.Random, people: list[Person]) -> tuple[str, Person, str]:
    """(user message, the person asked about, the attribute asked): a short passage stating every fact of each
    person in shuffled order, then a question about one fact of one of them. The answer is in the passage, so a
    model that has learned to read answers it without having seen the person before."""
    sentences = []
    for p in people:
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        sentences += [fact_sentence(rng, p, a) for a in attrs]
    target, attr = rng.choice(people), rng.choice(ATTRIBUTES)
    intro = rng.choice(("Read the text and answer the question.", "Here is a short text.", "Text:"))
    return f"{intro}\n{' '.join(sentences)}\n{question(rng, target, attr)}", target, attr


def wrong_value(rng: random.Random, attribute: str, right: str, choices: dict[str, list[str]]) -> str:
    return rng.choice([c for c in choices[attribute] if c != right])


# ---------------------------------------------------------------- held-out problems


def split_problems(rng: random.Random, n_eval: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems; no eval problem, nor its swapped twin for addition, is among the train ones."""
    problems = all_problems()
    rng.shuffle(problems)
    eval_keys: set[Problem] = set()
    eval_problems = []
    for pr in problems:
        if len(eval_problems) == n_eval:
            break
        if problem_key(pr) not in eval_keys:
            eval_keys.add(problem_key(pr))
            eval_problems.append(pr)
    return [pr for pr in problems if problem_key(pr) not in eval_keys], eval_problems
