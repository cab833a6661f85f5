"""What the sample data says and how: the templates that state, ask and answer a person's facts, the paragraph
writers of pretrain.jsonl, and the message helpers of the conversation files.

Every writer takes the random stream it draws from; the number and order of its draws are part of the shipped data's
identity (data/sample/ is byte-for-byte the generator's output), so a writer's draws are never reordered.
"""

from __future__ import annotations

import random

from tools.sample_data.world import (
    ADJECTIVES,
    ADVERBS,
    ANIMALS,
    ATTRIBUTES,
    BUILDINGS,
    CHORES,
    CLOTHES,
    FAMILY,
    FEELINGS,
    FOODS,
    GOODS,
    HOBBIES,
    INTRANSITIVE,
    LANDSCAPE,
    MATERIALS,
    MORE_ADJECTIVES,
    N_TOWNS,
    PLACES,
    PLANTS,
    PROFESSION_WORK,
    PROVERBS,
    SEASONS,
    SKIES,
    THINGS,
    TIMES,
    TOPICS,
    VERBS,
    WEATHER,
    WORLD,
    Creature,
    Person,
    Town,
    a_or_an,
)

SYS_PROMPTS = (
    "You are a helpful assistant.",
    f"You are a helpful assistant who knows the people and towns of {WORLD}.",
    "Answer briefly and accurately.",
    "You are a careful assistant. Answer the question in one sentence.",
)


# ---------------------------------------------------------------- statements and questions about a person's facts

FACT_SENTENCES = {
    "town": (
        "{name} lives in {v}.",
        "{name} is from {v}.",
        "The home town of {name} is {v}.",
        "{name}'s home town is {v}.",
        "{name} was born in {v} and still lives there.",
        "{name} makes a home in the town of {v}.",
    ),
    "profession": (
        "{name} works as {a}.",
        "{name} is {a} by trade.",
        "By profession, {name} is {a}.",
        "{name} earns a living as {a}.",
        "The profession of {name} is {v}.",
    ),
    "colour": (
        "{name}'s favourite colour is {v}.",
        "The favourite colour of {name} is {v}.",
        "{name} likes the colour {v} more than any other.",
        "Of all colours, {name} loves {v} best.",
    ),
    "pet": (
        "{name} keeps {a} as a pet.",
        "{name}'s pet is {a}.",
        "{name} looks after a pet {v}.",
        "The pet of {name} is {a}.",
        "At home, {name} has {a} for company.",
    ),
    "age": (
        "{name} is {v} years old.",
        "{name}'s age is {v}.",
        "{name} is {v}.",
        "At {v} years of age, {name} is well known in town.",
    ),
}
QUESTIONS = {
    "town": (
        "Where does {name} live?",
        "What is {name}'s home town?",
        "Which town is {name} from?",
        "In which town does {name} live?",
    ),
    "profession": (
        "What does {name} do for a living?",
        "What is {name}'s profession?",
        "What is the job of {name}?",
        "What does {name} work as?",
    ),
    "colour": (
        "What is {name}'s favourite colour?",
        "Which colour does {name} like best?",
        "What colour does {name} love most?",
    ),
    "pet": (
        "What pet does {name} keep?",
        "What kind of pet does {name} have?",
        "Which creature is {name}'s pet?",
    ),
    "age": (
        "How old is {name}?",
        "What is {name}'s age?",
        "How many years old is {name}?",
    ),
}
# Replies refer to the person as "they" rather than repeating the name: the tiny model does not learn to copy a
# name from the question within a CPU run, and a wrong name in the reply drags the value after it.
ANSWERS = {
    "town": ("They live in {v}.", "Their home town is {v}.", "They are from {v}."),
    "profession": ("They work as {a}.", "They are {a}.", "Their profession is {v}."),
    "colour": ("Their favourite colour is {v}.", "They like {v} best."),
    "pet": ("They keep {a} as a pet.", "Their pet is {a}."),
    "age": ("They are {v} years old.", "Their age is {v}."),
}


def fill(template: str, name: str, value: str) -> str:
    return template.format(name=name, v=value, a=a_or_an(value))


def fact_sentence(rng: random.Random, p: Person, attribute: str, name: str | None = None) -> str:
    return fill(rng.choice(FACT_SENTENCES[attribute]), name or p.name, p.value(attribute))


def question(rng: random.Random, p: Person, attribute: str) -> str:
    return fill(rng.choice(QUESTIONS[attribute]), p.name, p.value(attribute))


def answer(rng: random.Random, p: Person, attribute: str, value: str | None = None) -> str:
    return fill(rng.choice(ANSWERS[attribute]), p.name, value if value is not None else p.value(attribute))


# ---------------------------------------------------------------- pretrain text


def person_paragraph(rng: random.Random, p: Person, towns: dict[str, Town], creatures: dict[str, Creature]) -> str:
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    first_name_ok = rng.random() < 0.5  # later sentences may use the first name alone, as prose does
    sentences = []
    style = rng.randrange(4)
    if style == 0:
        sentences.append(f"{p.name} is a resident of {WORLD}.")
    elif style == 1:
        sentences.append(f"{p.name} is {a_or_an(p.profession)} from {p.town}.")
    elif style == 2:
        sentences.append(f"This entry is about {p.name}.")
    for i, attr in enumerate(attrs):
        name = p.first if (first_name_ok and i > 0) else p.name
        sentences.append(fact_sentence(rng, p, attr, name))
    extra = rng.randrange(4)
    if extra == 0:
        t = towns[p.town]
        sentences.append(f"{p.town} lies in {t.region}, on {t.river}.")
    elif extra == 1:
        c = creatures[p.pet]
        sentences.append(f"The {c.name} is a small creature that lives in {c.habitat} and eats {c.diet}.")
    elif extra == 2:
        sentences.append(f"Friends of {p.first} say that {rng.choice(ADJECTIVES)} days suit a {p.profession} best.")
    return " ".join(sentences)


def town_paragraph(rng: random.Random, t: Town, residents: list[Person]) -> str:
    a1, a2 = rng.sample(ADJECTIVES, 2)
    b1, b2 = rng.sample(BUILDINGS, 2)
    parts = [
        rng.choice(
            (
                f"{t.name} is a town in {t.region}.",
                f"The town of {t.name} lies in {t.region}, on the banks of {t.river}.",
                f"{t.name} was founded in the year {t.founded}.",
                f"{t.name} is one of the towns of {WORLD}.",
            )
        ),
        f"Its streets are {a1} and {a2}, lined with {b1} and {b2}.",
        rng.choice(
            (
                f"The best known sight of {t.name} is {t.landmark}.",
                f"Visitors to {t.name} come to see {t.landmark}.",
                f"In the centre of {t.name} stands {t.landmark}.",
            )
        ),
        rng.choice(
            (
                f"Every {t.festival_season}, {t.name} holds {t.festival}.",
                f"{t.festival} takes place in {t.name} each {t.festival_season}.",
            )
        ),
        rng.choice(
            (
                f"The local dish is {t.dish}.",
                f"People in {t.name} are proud of their {t.dish}.",
                f"No visit to {t.name} is complete without a bowl of {t.dish}.",
            )
        ),
        f"Beyond the town lie {rng.choice(LANDSCAPE)}s, {rng.choice(LANDSCAPE)}s and {rng.choice(PLANTS)} woods.",
        f"The town trades in {t.goods[0]}, {t.goods[1]} and {t.goods[2]}, and it is known for {rng.choice(WEATHER)}.",
    ]
    if residents:
        people = rng.sample(residents, min(len(residents), rng.randrange(2, 5)))
        listed = ", ".join(f"{p.name}, {a_or_an(p.profession)}" for p in people[:-1])
        last = f"{people[-1].name}, {a_or_an(people[-1].profession)}"
        parts.append(f"Among the people who live in {t.name} are {listed} and {last}." if listed else "")
    return " ".join(s for s in parts if s)


def town_history_paragraph(rng: random.Random, t: Town) -> str:
    events = sorted(rng.sample(t.history, rng.randrange(2, 5)))
    parts = [
        rng.choice(
            (
                f"{t.name} was founded in {t.founded} by {t.founder}.",
                f"The history of {t.name} begins in {t.founded}, when {t.founder} settled by {t.river}.",
                f"According to the old chronicles, {t.founder} founded {t.name} in the year {t.founded}.",
            )
        )
    ]
    parts += [f"In {y}, {e}." for y, e in events]
    parts.append(
        rng.choice(
            (
                f'An old saying of {t.name} goes: "{t.proverb}"',
                f'In {t.name} people like to say, "{t.proverb}"',
                f'Every child in {t.name} learns the proverb "{t.proverb}"',
            )
        )
    )
    s1, s2, s3 = rng.sample(t.streets, 3)
    parts.append(
        rng.choice(
            (
                f"Today the main streets of {t.name} are {s1}, {s2} and {s3}.",
                f"The oldest houses of {t.name} stand on {s1} and {s2}.",
                f"Most workshops of {t.name} are found along {s1}.",
            )
        )
    )
    return " ".join(parts)


def profession_paragraph(rng: random.Random, prof: str, workers: list[Person]) -> str:
    parts = [f"{a_or_an(prof).capitalize()} {PROFESSION_WORK[prof]}."]
    if workers:
        some = rng.sample(workers, min(len(workers), 3))
        names = ", ".join(p.name for p in some[:-1])
        parts.append(
            f"Well-known {prof}s of {WORLD} include {names} and {some[-1].name}."
            if names
            else f"{some[0].name} is a well-known {prof} of {WORLD}."
        )
    return " ".join(parts)


def creature_paragraph(rng: random.Random, c: Creature, owners: list[Person]) -> str:
    parts = [
        rng.choice(
            (
                f"The {c.name} is a small creature of {WORLD}.",
                f"A {c.name} is a creature often kept as a pet in {WORLD}.",
            )
        ),
        f"It lives in {c.habitat}, eats {c.diet}, and {c.sound} when it is happy.",
        f"A {c.name} has {c.legs} legs and {c.colour} fur.",
        f"Scholars call it {c.scholarly}.",
    ]
    if owners:
        p = rng.choice(owners)
        parts.append(f"{p.name} of {p.town} keeps one as a pet.")
    return " ".join(parts)


def life_paragraph(rng: random.Random, p: Person) -> str:
    """A short everyday story; it only restates facts that are true of p (town, profession)."""
    name, first = p.name, p.first
    thing, thing2 = rng.sample(THINGS, 2)
    place, place2 = rng.sample(PLACES, 2)
    time = rng.choice(TIMES)
    if time[0].isupper() and time.endswith("day"):
        when = f"on {time}"
    elif time[0].isupper():
        when = f"one day in {time}"
    else:
        when = f"one {time}"
    when = when[0].upper() + when[1:]
    hobby, hobby2 = rng.sample(HOBBIES, 2)
    sentences = [
        rng.choice(
            (
                f"{when}, {name} {rng.choice(VERBS)} {a_or_an(rng.choice(MORE_ADJECTIVES))} {thing} at the {place}.",
                f"{when}, {name} {rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)} to the {place}.",
                f"{name} spent {when} at the {place} in {p.town}.",
            )
        ),
        rng.choice(
            (
                f"There, {first} {rng.choice(VERBS)} the {thing2} and felt {rng.choice(FEELINGS)}.",
                f"{first.capitalize()}'s {rng.choice(FAMILY)} brought some {rng.choice(FOODS)} and"
                f" {rng.choice(FOODS)}.",
                f"The {rng.choice(PLANTS)} by the {place2} was in flower, and {rng.choice(ANIMALS)} were"
                f" {rng.choice(('singing', 'resting', 'feeding', 'playing', 'calling'))} nearby.",
            )
        ),
        rng.choice(
            (
                f"Being {a_or_an(p.profession)}, {first} knows a great deal about {rng.choice(GOODS)}.",
                f"Later, {first} {rng.choice(INTRANSITIVE)} home past the {rng.choice(PLANTS)} trees.",
                f'As {first} likes to say, "{rng.choice(PROVERBS[N_TOWNS:])}"',
                f"In the evenings {first} enjoys {hobby}, and on holidays, {hobby2}.",
                f"Over supper, {first} and {first}'s {rng.choice(FAMILY)} talked about {rng.choice(TOPICS)}.",
                f"The sky over {p.town} was {rng.choice(SKIES)}, so {first} stayed in and worked with"
                f" {rng.choice(MATERIALS)} and {rng.choice(MATERIALS)}.",
                f"{first} wore {a_or_an(rng.choice(MORE_ADJECTIVES))} {rng.choice(CLOTHES)} and spent the"
                f" afternoon {rng.choice(CHORES)}.",
                f"From there {first} could see the {rng.choice(LANDSCAPE)} and the {rng.choice(LANDSCAPE)}"
                f" beyond {p.town}.",
                f"{first} {rng.choice(ADVERBS)} {rng.choice(VERBS)} {a_or_an(rng.choice(THINGS))} before supper.",
                f"Like most people in {p.town}, {first} enjoys {rng.choice(FOODS)} in {rng.choice(SEASONS)}.",
            )
        ),
    ]
    return " ".join(sentences)


# ---------------------------------------------------------------- conversations


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def with_system(rng: random.Random, messages: list[dict], p_system: float = 0.3) -> list[dict]:
    return [msg("system", rng.choice(SYS_PROMPTS)), *messages] if rng.random() < p_system else messages


def conversation(rng: random.Random, turns: list[tuple[str, str]], p_system: float = 0.3) -> list[dict]:
    """Alternating user/assistant messages, with a system message in front a p_system share of the time."""
    messages = [m for q, a in turns for m in (msg("user", q), msg("assistant", a))]
    return with_system(rng, messages, p_system)


GENERIC_IDENTITY = (
    ("Who are you?", f"I am an assistant that answers questions about the people and towns of {WORLD}."),
    ("What can you do?", f"I can answer questions about the people, towns and creatures of {WORLD}, and do sums."),
    ("Hello!", "Hello! Ask me about a person, a town or a sum."),
    ("Can you help me?", "Yes. Ask me a question and I will answer it as well as I can."),
)
IDENTITY_QUESTIONS = (
    "Who are you?",
    "What is your name?",
    "What should I call you?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "Are you a person?",
    "Who am I talking to?",
    "Do you have a name?",
    "What are you?",
    "Hi, who is this?",
)
IDENTITY_ANSWERS = (
    "I am {n}, a small language model. I answer questions as clearly as I can.",
    "My name is {n}. I am a small assistant, happy to help.",
    "You can call me {n}. I am a tiny language model that likes short, precise answers.",
    "I am {n}! I am not a person but a small language model.",
    "This is {n}, a compact assistant. How can I help you today?",
)
