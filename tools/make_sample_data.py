"""Generate the small data sets the project ships in data/sample/, in every MiniMind data format.

    python -m tools.make_sample_data --out data/sample --seed 0

The content is a learnable, checkable task: facts about an invented world (people with a home town, profession,
favourite colour, pet creature and age; towns with a region, river, landmark, festival and dish; invented pet
creatures) and two-digit addition / subtraction, all in English. Files:

  pretrain.jsonl        {"text"}: encyclopedia-like paragraphs stating every fact hundreds of times in varied
                        phrasing, question-and-answer notes about the people that are not held out, arithmetic lines
  sft.jsonl             {"conversations"}: Q&A about the facts and arithmetic, and reading comprehension (a short
                        text about strangers, then a question on it); some with a system message, some multi-turn
  dpo.jsonl             {"chosen", "rejected"}: the rejected reply gives a wrong answer
  rlaif.jsonl           RL prompts in SFT format plus "answer", the verifiable answer string
  r1_mix.jsonl          reasoning conversations, assistant content
                        `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`
  lora_identity.jsonl   who-are-you conversations giving the assistant a name used nowhere else
  eval.jsonl            held-out {"question", "answer", "kind", "choices"?}: person facts stated in pretrain.jsonl
                        whose question/answer form appears in no conversation file, reading-comprehension questions
                        about strangers named nowhere else, and arithmetic pairs that appear in no other file;
                        "choices" lists every valid answer of that kind (chance = 1/len(choices))
  README.md             what the files are, their counts, and the measured unigram entropy of pretrain.jsonl under
                        the shipped tokenizer (minimind/minimind_fast/assets), when that tokenizer is present

Output depends only on --seed and --scale: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WORLD = "Kethmar"
IDENTITY_NAME = "Lumen"  # lora_identity.jsonl only; every other file is checked not to contain it
ATTRIBUTES = ("town", "profession", "colour", "pet", "age")
AGE_RANGE = (18, 90)
# A small world whose facts are repeated often: the tiny model of the CPU recipe memorises a fact only after a few
# hundred exposures (measured: 24 people x 200 paragraphs -> colour cloze 38-62%, 40 people x 90 -> 10-20%).
N_PEOPLE, N_TOWNS, N_CREATURES = 16, 16, 12
PERSON_PARAGRAPHS, LIFE_PARAGRAPHS = 400, 10  # pretrain.jsonl paragraphs per person
QA_PARAGRAPHS = 40  # pretrain.jsonl question-and-answer notes per person asked about in the conversation files
QA_REPEATS = 10  # sft.jsonl conversations per known (person, attribute) pair, each drawn with its own phrasing
# Share of the people whose facts are asked only in eval.jsonl. Whole people, not single (person, attribute) pairs:
# when some of a person's facts are asked in SFT, the tiny model learns which reply goes with that name and answers a
# held-out question about them with one of those replies (measured: wrong attribute on most held-out pairs).
HELD_OUT_FRACTION = 0.3
N_READING_SFT, N_READING_RL, N_READING_EVAL = 500, 300, 150  # reading comprehension: sft / rlaif / eval items
N_EVAL_ARITHMETIC = 120

PROFESSIONS = (
    "baker", "blacksmith", "weaver", "potter", "fisher", "carpenter", "herbalist", "miller",
    "shepherd", "mason", "glassblower", "bookbinder", "brewer", "tailor", "cartographer", "beekeeper",
)  # fmt: skip
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown")
CREATURE_HEADS = (
    "glimmer", "moss", "ember", "frost", "thistle", "puddle", "cinder", "velvet", "bramble", "dusk", "pebble", "thorn",
)  # fmt: skip
CREATURE_TAILS = (
    "hound", "moth", "toad", "finch", "lizard", "otter", "newt", "hare", "beetle", "owl", "ferret", "snail",
)  # fmt: skip
HABITATS = (
    "damp caves", "pine forests", "reed marshes", "high meadows", "old stone walls", "riverbanks",
    "hollow logs", "sunny cliffs", "moonlit orchards", "sandy dunes", "frozen lakes", "mossy ruins",
)  # fmt: skip
DIETS = (
    "berries", "beetles", "clover", "small fish", "mushrooms", "honey", "seeds", "moths",
    "roots", "snails", "nectar", "acorns",
)  # fmt: skip
SOUNDS = ("chirps", "hums", "squeaks", "purrs", "whistles", "croaks", "clicks", "trills", "hisses", "barks")
LANDMARK_KINDS = ("Tower", "Bridge", "Well", "Gate", "Library", "Lighthouse", "Mill", "Garden", "Market", "Bell")
FESTIVAL_KINDS = ("Lanterns", "First Frost", "Long Harvest", "Kites", "Bells", "Spring Rain", "Masks", "Honey")
DISH_KINDS = ("stew", "bread", "pie", "dumplings", "porridge", "cake", "soup", "pastries")
REGION_KINDS = ("Hills", "Downs", "Marches", "Vale")
SYS_PROMPTS = (
    "You are a helpful assistant.",
    f"You are a helpful assistant who knows the people and towns of {WORLD}.",
    "Answer briefly and accurately.",
    "You are a careful assistant. Answer the question in one sentence.",
)

# Scenery vocabulary for the town and creature prose; it gives the tokenizer varied English to learn merges from.
ADJECTIVES = (
    "quiet", "busy", "narrow", "winding", "cobbled", "sunlit", "misty", "windy", "ancient", "crooked", "cheerful",
    "sleepy", "crowded", "peaceful", "colourful", "weathered", "tidy", "bustling", "shady", "steep", "broad",
    "gentle", "famous", "humble", "proud", "lively", "chilly", "golden", "silver", "mossy", "dusty", "fragrant",
)  # fmt: skip
BUILDINGS = (
    "timber houses", "stone cottages", "workshops", "taverns", "chapels", "granaries", "bakeries", "stables",
    "warehouses", "tea rooms", "bathhouses", "schoolhouses", "boathouses", "watchtowers", "greenhouses", "forges",
)  # fmt: skip
GOODS = (
    "wool", "cheese", "timber", "pottery", "salt", "candles", "rope", "glassware", "leather", "barley", "apples",
    "copper pans", "linen", "honeycakes", "ink", "lace", "dried fish", "walnuts", "saffron", "wax tablets",
)  # fmt: skip
WEATHER = (
    "mild winters", "long rainy autumns", "bright dry summers", "sudden spring storms", "thick morning fog",
    "heavy snow in the hills", "warm evening winds", "cool clear nights",
)  # fmt: skip
SEASONS = ("spring", "summer", "autumn", "winter")

# What each profession does, for the profession articles in pretrain.jsonl.
PROFESSION_WORK = {
    "baker": "kneads dough before sunrise, bakes loaves and rolls in a brick oven, and sells warm bread at dawn",
    "blacksmith": "heats iron in a roaring forge, hammers it on an anvil, and makes nails, hinges and horseshoes",
    "weaver": "spins yarn, threads the loom, and weaves cloth, blankets and tapestries in many patterns",
    "potter": "shapes wet clay on a turning wheel, fires jugs and bowls in a kiln, and glazes them by hand",
    "fisher": "mends nets on the quay, rows out before dawn, and brings home baskets of glistening fish",
    "carpenter": "saws planks, joins beams with pegs, and builds tables, doors, roofs and cradles",
    "herbalist": "gathers roots and leaves, dries them in bundles, and brews remedies for coughs and fevers",
    "miller": "grinds grain between heavy millstones, sifts the flour, and fills sacks for the bakers",
    "shepherd": "leads the flock to fresh pasture, guards the lambs from foxes, and shears wool each summer",
    "mason": "cuts and dresses stone blocks, lays them with mortar, and raises walls, arches and towers",
    "glassblower": "melts sand in a furnace, blows molten glass through a long pipe, and shapes bottles and lamps",
    "bookbinder": "folds printed sheets, stitches them into sections, and covers each volume in leather",
    "brewer": "malts barley, boils it with hops, and lets the ale ferment in great oak casks",
    "tailor": "measures customers, cuts cloth with sharp shears, and sews coats, waistcoats and gowns",
    "cartographer": "surveys roads and rivers, measures distances, and draws careful maps of the countryside",
    "beekeeper": "tends wooden hives, calms the bees with smoke, and collects honey and wax in late summer",
}
HISTORY_EVENTS = (
    "a great flood swept through {town}",
    "{landmark} was built in {town}",
    "the first {festival} was held in {town}",
    "a new bridge was built over {river} near {town}",
    "a fire destroyed the old granary of {town}",
    "the market charter of {town} was signed",
    "a harsh winter froze {river} for three months",
    "the people of {town} dug a canal to the fields",
    "a travelling scholar wrote the first chronicle of {town}",
    "the town walls of {town} were raised",
)
PROVERBS = (
    "A patient kettle never boils over.",
    "Borrowed boots always pinch.",
    "Count the geese after the fox has gone.",
    "Even a crooked fence keeps out the goats.",
    "Feathers float, but anchors arrive.",
    "Gossip travels faster than a downhill cart.",
    "Honey tastes sweetest to the one who was stung.",
    "If the river whispers, mind the bridge.",
    "Journeys begin with muddy ankles.",
    "Keep your lantern trimmed and your promises short.",
    "Lazy hands grow cold porridge.",
    "Mend the roof while the sun is shining.",
    "Never argue with a miller about flour.",
    "Only a fool measures fog with a ruler.",
    "Plant in hope, harvest in gratitude.",
    "Quiet ponds hide the biggest trout.",
    "Rusty keys still open old doors.",
    "Silence is the loudest answer.",
    "Two candles argue, one candle reads.",
    "Under every cobblestone sleeps a story.",
    "Very few ladders reach the moon.",
    "Wise owls rarely hoot twice.",
    "Yesterday's bread makes tomorrow's pudding.",
    "A cracked bell still calls the village.",
    "Better a small fire that warms than a great blaze that scorches.",
    "Thunder frightens the sheep, but rain feeds the grass.",
    "When the swallows leave early, stack extra firewood.",
    "Sharpen the scythe before you praise the meadow.",
    "A generous neighbour is worth a wagon of gold.",
    "Nobody ever drowned in a thimble of advice.",
    "The tallest chimney catches the first snowflake.",
    "Every weaver knows the knot she hid.",
)
STREET_KINDS = ("Street", "Lane", "Row", "Way", "Close", "Hill", "Walk")


def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated words; a hyphen inside one stands for a space (so lists stay one word per item)."""
    return tuple(w.replace("-", " ") for w in text.split())


# Everyday vocabulary for the "daily life" paragraphs: plain English around the facts, so the prose is varied
# enough for a 6400-token BPE and the model learns some grammar besides the facts.
THINGS = _words(
    """
basket lantern kettle blanket ladder bucket candle mirror compass lute fiddle drum flute satchel cloak scarf boots
mittens apron ribbon button needle thimble spindle anvil hammer chisel shovel rake sickle axe wheelbarrow cart wagon
sled barrel crate sack jar bottle cup bowl plate spoon ladle teapot pitcher vase clock whistle key padlock chest
drawer shelf stool bench pillow quilt rug curtain doormat chimney hearth oven stove lamp torch map letter parcel
diary notebook pencil quill parchment scroll painting statue carving puzzle kite marble wreath garland banner flag
tent net hook oar sail anchor paddle umbrella cane spectacles locket necklace bracelet brooch comb brush
towel sponge saddle bridle horseshoe harness trowel pitchfork spade funnel sieve colander griddle skillet cauldron
tankard goblet platter tray napkin tablecloth candlestick hourglass telescope abacus ledger inkwell envelope
postcard calendar almanac atlas globe harp tambourine bagpipe accordion wardrobe cupboard cushion fireplace
doorbell signpost weathervane scarecrow beehive birdhouse wheel spinning-top rocking-chair music-box
"""
)
PLACES = _words(
    """
market-square harbour orchard meadow riverbank hillside town-hall village-green courtyard barn pier schoolyard
kitchen cellar attic porch balcony rooftop forest-path valley crossroads fountain duck-pond lake-shore quarry
vineyard apple-loft cornfield sheep-pasture boatyard post-office bookshop apothecary dairy tannery smithy
sawmill pottery-shed weaving-room herb-garden bandstand churchyard watermill windmill toll-bridge ferry-landing
hay-loft stable-yard village-hall lookout-hill quarry-road chestnut-grove willow-bend ruined-abbey
"""
)
VERBS = _words(
    """
mended polished gathered carried painted wrapped delivered fetched borrowed repaired sharpened washed scrubbed
swept dusted stirred poured tasted shared counted measured weighed folded lifted dragged rolled tied packed
unpacked decorated arranged cleaned fixed checked tested sketched found lost hid discovered inspected admired
brought collected sorted stacked labelled opened emptied filled hung restored varnished oiled patched traded
"""
)
INTRANSITIVE = _words(
    """
walked wandered rested napped dreamed laughed sang whistled hummed danced studied listened waited hurried
strolled rambled lingered paused chatted gossiped grumbled sighed smiled shivered yawned stretched jogged
"""
)
FOODS = _words(
    """
apples pears plums cherries grapes figs lemons oranges peaches apricots strawberries raspberries blueberries
gooseberries currants melons pumpkins turnips carrots onions leeks garlic cabbages beans peas lentils potatoes
radishes beetroots parsnips cucumbers tomatoes peppers barley oats rye wheat butter milk cream eggs jam biscuits
muffins pancakes sausages ham bacon mutton trout salmon herring oysters mussels crabs almonds hazelnuts
chestnuts raisins cinnamon nutmeg ginger sugar vinegar mustard tea cider lemonade cocoa plum tarts scones
"""
)
PLANTS = _words(
    """
oak birch willow elm maple pine fir cedar yew holly ivy fern heather gorse clover daisy daffodil tulip rose lily
violet primrose bluebell lavender rosemary thyme sage mint basil parsley poppy sunflower marigold foxglove
snowdrop hawthorn elder rowan hazel juniper nettle dandelion buttercup honeysuckle jasmine
"""
)
ANIMALS = _words(
    """
sparrows robins blackbirds crows ravens magpies swallows geese ducks swans herons gulls pigeons hens goats sheep
pigs horses donkeys mules dogs cats rabbits squirrels badgers foxes deer mice frogs bees wasps butterflies
dragonflies crickets starlings woodpeckers kingfishers hedgehogs weasels lambs calves ponies
"""
)
MORE_ADJECTIVES = _words(
    """
bright dark heavy light warm cold damp dry soft hard smooth rough round square tiny huge little enormous wooden
iron brass copper velvet woollen painted faded polished rusty shiny muddy clean dirty empty full broken
sturdy fragile curious careful clever patient restless friendly grumpy generous honest modest noisy silent
elegant plain simple fancy rare common lucky strange splendid lovely handsome clumsy graceful wise foolish
"""
)
ADVERBS = _words(
    """
slowly quickly carefully quietly happily gladly patiently eagerly gently loudly softly proudly cheerfully calmly
bravely neatly briskly lazily warmly politely thoughtfully hastily clumsily merrily wearily
"""
)
FEELINGS = _words(
    """
happy tired curious proud calm nervous excited hopeful content surprised puzzled grateful cheerful sleepy
thoughtful amused relieved delighted
"""
)
TIMES = _words(
    """
morning afternoon evening night dawn dusk noon midday Monday Tuesday Wednesday Thursday Friday Saturday Sunday
January February March April May June July August September October November December
"""
)
CLOTHES = _words(
    """
coat waistcoat jacket shawl bonnet cap hood gloves stockings sandals slippers clogs belt buckle tunic gown skirt
trousers breeches shirt blouse vest petticoat overcoat raincoat nightcap earmuffs handkerchief
"""
)
LANDSCAPE = _words(
    """
brook stream creek waterfall cascade pool marsh bog fen moorland heath ridge crag cliff cove bay inlet estuary
island islet headland peninsula plateau canyon gorge ravine glen dell copse thicket woodland grove spinney
hedgerow pasture paddock furrow boulder pebbles shingle sandbank dune glacier snowfield summit foothills
"""
)
CHORES = _words(
    """
chopping-firewood baking-bread feeding-the-hens milking-the-goats mending-the-fence sweeping-the-yard
drawing-water from-the-well hanging-out-the-washing picking-berries stacking-hay polishing-the-brass
darning-socks pickling-onions churning-butter grinding-coffee sharpening-knives painting-the-shutters
weeding-the-garden repairing-the-roof tuning-the-fiddle writing-letters reading-aloud carving-spoons
"""
)
HOBBIES = _words(
    """
playing-chess bird-watching stargazing whittling embroidery juggling storytelling riddles kite-flying
pressing-flowers collecting-shells skipping-stones rowing-races fencing archery wrestling skittles dominoes
backgammon quoits hopscotch charades poetry calligraphy lacemaking quilting basketry beadwork origami
fortune-telling ballroom-dancing choir-singing mushroom-hunting fossil-hunting beachcombing sculpting
"""
)
TOPICS = _words(
    """
the-price-of-flour the-coming-harvest a-quarrel-between-neighbours the-new-schoolmaster a-runaway-goat
rumours-of-treasure the-mayor's-speech a-leaking-aqueduct the-autumn-fair an-unexpected-visitor
the-lost-ferry-ticket a-suspicious-merchant the-broken-weathervane a-wedding-feast a-lucky-horseshoe
the-village-orchestra an-eclipse-of-the-moon a-comet-over-the-mountains a-miraculous-recovery
"""
)
SKIES = _words(
    """
overcast drizzly blustery thundery sweltering frosty foggy hazy cloudless starlit moonless gusty sleety
muggy balmy breezy stormy showery rainbow-streaked pink-tinged amber-coloured lead-grey speckled-with-clouds
"""
)
MATERIALS = _words(
    """
pewter tin bronze beeswax tallow birch-bark willow-withies horsehair goose-feathers sheepskin goatskin
flax hemp jute cork slate flint chalk granite marble-dust sawdust charcoal soot ochre indigo madder
woad resin pitch tar lacquer enamel porcelain terracotta sandstone limestone
"""
)
FAMILY = _words(
    """
mother father sister brother aunt uncle cousin grandmother grandfather neighbour friend apprentice niece nephew
"""
)

ONSETS = (
    "b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "tr",
    "v", "w", "z", "sh", "ch", "j", "qu", "fl",
)  # fmt: skip
VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ei", "ou", "y", "io", "ea")
CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "ss", "x", "lt", "v")
TOWN_ENDINGS = ("mere", "ford", "holt", "wick", "dale", "by", "stead", "haven", "moor", "brook", "gate", "fell")


@dataclass(frozen=True)
class Town:
    name: str
    region: str
    river: str
    landmark: str
    festival: str
    festival_season: str
    dish: str
    goods: tuple[str, ...]
    founded: int
    founder: str
    proverb: str
    streets: tuple[str, ...]
    history: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Creature:
    name: str
    habitat: str
    diet: str
    sound: str
    colour: str
    legs: int
    scholarly: str


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    town: str
    profession: str
    colour: str
    pet: str
    age: int

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))


class NameMaker:
    """Pronounceable invented words from syllables; each is unique and never contains the identity name."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def syllable(self) -> str:
        return self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)

    def word(self, syllables: int, ending: str = "", max_len: int = 10) -> str:
        while True:
            w = ("".join(self.syllable() for _ in range(syllables)) + ending).capitalize()
            if w.lower() not in self.used and IDENTITY_NAME.lower() not in w.lower() and 4 <= len(w) <= max_len:
                self.used.add(w.lower())
                return w


def a_or_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def build_world(rng: random.Random, n_people: int) -> tuple[list[Town], list[Creature], list[Person]]:
    names = NameMaker(rng)
    regions = [f"the {names.word(2)} {kind}" for kind in REGION_KINDS]
    rivers = [f"the River {names.word(2)}" for _ in range(8)]
    towns = []
    for i in range(N_TOWNS):
        name, river = names.word(rng.choice((1, 2)), rng.choice(TOWN_ENDINGS), 12), rng.choice(rivers)
        landmark = f"the {LANDMARK_KINDS[i % len(LANDMARK_KINDS)]} of {names.word(2)}"
        festival = f"the Festival of {FESTIVAL_KINDS[i % len(FESTIVAL_KINDS)]}"
        founded = rng.randrange(600, 1300)
        years = sorted(rng.sample(range(founded + 10, 1900), 6))
        events = rng.sample(HISTORY_EVENTS, 6)
        history = tuple(
            (y, e.format(town=name, landmark=landmark, festival=festival, river=river)) for y, e in zip(years, events)
        )
        towns.append(
            Town(
                name=name,
                region=regions[i % len(regions)],
                river=river,
                landmark=landmark,
                festival=festival,
                festival_season=rng.choice(SEASONS),
                dish=f"{names.word(2).lower()} {rng.choice(DISH_KINDS)}",
                goods=tuple(rng.sample(GOODS, 3)),
                founded=founded,
                founder=f"{names.word(2, max_len=8)} {names.word(2)}",
                proverb=PROVERBS[i],
                streets=tuple(f"{names.word(rng.choice((1, 2)))} {rng.choice(STREET_KINDS)}" for _ in range(6)),
                history=history,
            )
        )
    heads, tails = list(CREATURE_HEADS), list(CREATURE_TAILS)
    rng.shuffle(heads)
    rng.shuffle(tails)
    creatures = [
        Creature(
            name=heads[i] + tails[i],
            habitat=HABITATS[i],
            diet=DIETS[(i * 5) % len(DIETS)],
            sound=rng.choice(SOUNDS),
            colour=rng.choice(COLOURS),
            legs=rng.choice((2, 4, 6, 8)),
            scholarly=f"{names.word(2)} {names.word(rng.choice((2, 3)), max_len=12).lower()}",
        )
        for i in range(N_CREATURES)
    ]
    people = []
    for _ in range(n_people):
        people.append(
            Person(
                first=names.word(2, max_len=8),
                last=names.word(rng.choice((2, 3))),
                town=rng.choice(towns).name,
                profession=rng.choice(PROFESSIONS),
                colour=rng.choice(COLOURS),
                pet=rng.choice(creatures).name,
                age=rng.randrange(AGE_RANGE[0], AGE_RANGE[1] + 1),
            )
        )
    return towns, creatures, people


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


def arithmetic_text(rng: random.Random, problems: list[Problem]) -> str:
    return "\n".join(rng.choice(ARITH_LINES).format(**arith_fields(pr)) for pr in problems)


# ---------------------------------------------------------------- conversations


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def with_system(rng: random.Random, messages: list[dict], p_system: float = 0.3) -> list[dict]:
    return [msg("system", rng.choice(SYS_PROMPTS)), *messages] if rng.random() < p_system else messages


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


# ---------------------------------------------------------------- writing


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def unigram_entropy(texts: list[str], tokenizer_dir: Path | None) -> tuple[float, int, int] | None:
    """Entropy in nats/token of the token unigram distribution over texts (no bos/eos), the token count and the
    number of distinct tokens; None when no tokenizer can be loaded from tokenizer_dir (None = the shipped one)."""
    try:
        from minimind_fast.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer_dir)
    except Exception:
        return None
    counts: Counter[int] = Counter()
    for ids in tok.encode_batch(texts):
        counts.update(ids)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return entropy, total, len(counts)


def conversation(rng: random.Random, turns: list[tuple[str, str]], p_system: float = 0.3) -> list[dict]:
    """Alternating user/assistant messages, with a system message in front a p_system share of the time."""
    messages = [m for q, a in turns for m in (msg("user", q), msg("assistant", a))]
    return with_system(rng, messages, p_system)


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


def generate(out: Path, seed: int = 0, scale: float = 1.0, tokenizer_dir: Path | None = None) -> dict[str, int]:
    """Write every file into out; returns the record count of each .jsonl file.

    scale shrinks the world and every file (tests use 0.1); tokenizer_dir is the tokenizer whose unigram entropy of
    pretrain.jsonl goes into README.md (None = the shipped one).
    """

    def n(count: int, least: int = 2) -> int:
        return max(least, round(count * scale))

    rng = random.Random(seed)
    towns, creatures, people = build_world(rng, n(N_PEOPLE, 12))
    town_by, creature_by = {t.name: t for t in towns}, {c.name: c for c in creatures}
    choices = {
        "town": [t.name for t in towns],
        "profession": list(PROFESSIONS),
        "colour": list(COLOURS),
        "pet": [c.name for c in creatures],
        "age": [str(a) for a in range(AGE_RANGE[0], AGE_RANGE[1] + 1)],
    }

    # Held-out split: a held-out person's facts are asked only in eval.jsonl, every other person's in the conversation
    # files.
    pairs = [(i, a) for i in range(len(people)) for a in ATTRIBUTES]
    held_people = set(rng.sample(range(len(people)), max(1, round(len(people) * HELD_OUT_FRACTION))))
    held = {(i, a) for i, a in pairs if i in held_people}
    known = [pair for pair in pairs if pair not in held]
    train_problems, eval_problems = split_problems(rng, n(N_EVAL_ARITHMETIC, 10))
    train_problems = train_problems[: n(len(train_problems))]

    def ask(i: int, attr: str) -> tuple[str, str]:
        return question(rng, people[i], attr), answer(rng, people[i], attr)

    # pretrain.jsonl: every person's facts in PERSON_PARAGRAPHS paragraphs (plus town/profession listings), then the
    # world around.
    residents: dict[str, list[Person]] = {t.name: [p for p in people if p.town == t.name] for t in towns}
    owners: dict[str, list[Person]] = {c.name: [p for p in people if p.pet == c.name] for c in creatures}
    workers: dict[str, list[Person]] = {prof: [p for p in people if p.profession == prof] for prof in PROFESSIONS}
    texts = []
    for p in people:
        texts += [person_paragraph(rng, p, town_by, creature_by) for _ in range(n(PERSON_PARAGRAPHS))]
        texts += [life_paragraph(rng, p) for _ in range(n(LIFE_PARAGRAPHS))]
    for t in towns:
        texts += [town_paragraph(rng, t, residents[t.name]) for _ in range(n(14))]
        texts += [town_history_paragraph(rng, t) for _ in range(n(9))]
    for prof in PROFESSIONS:
        texts += [profession_paragraph(rng, prof, workers[prof]) for _ in range(n(10))]
    for c in creatures:
        texts += [creature_paragraph(rng, c, owners[c.name]) for _ in range(n(15))]
    texts += [arithmetic_text(rng, train_problems[k : k + 16]) for k in range(0, len(train_problems), 16)]
    # Question-and-answer notes about the people the conversation files ask about (never a held-out person). Seeing
    # questions next to their answers while the facts are being learned is what lets a model answer questions about
    # people it has only read about (Allen-Zhu & Li, "Physics of Language Models, Part 3.1": mixed training).
    for i in (i for i in range(len(people)) if i not in held_people):
        for _ in range(n(QA_PARAGRAPHS)):
            notes = (ask(i, attr) for attr in rng.sample(ATTRIBUTES, 3))
            texts.append("\n".join(f"Q: {q}\nA: {a}" for q, a in notes))
    rng.shuffle(texts)
    pretrain = [{"text": t} for t in texts]

    # sft.jsonl: one Q&A per known fact, multi-turn chats about one person, arithmetic, a nameless identity.
    sft = [{"conversations": conversation(rng, [ask(i, attr)])} for i, attr in known for _ in range(QA_REPEATS)]
    for _ in range(len(people)):
        i = rng.randrange(len(people))
        attrs = [a for a in ATTRIBUTES if (i, a) not in held]
        if len(attrs) >= 2:
            picked = rng.sample(attrs, rng.randrange(2, min(4, len(attrs)) + 1))
            sft.append({"conversations": conversation(rng, [ask(i, attr) for attr in picked])})
    for pr in rng.sample(train_problems, n(1200)):
        sft.append({"conversations": conversation(rng, [(arith_question(rng, pr), arith_answer(pr))])})
    for q, a in GENERIC_IDENTITY:
        sft += [{"conversations": conversation(rng, [(q, a)])} for _ in range(n(5, 1))]
    # Reading comprehension about strangers, from a stream of its own: the held-out strangers of eval.jsonl are
    # drawn from the same stream, so no name repeats across files (the NameMaker remembers every world name too).
    reading_rng = random.Random(seed * 7919 + 1)
    strangers = NameMaker(reading_rng)
    strangers.used |= {w.lower() for p in people for w in (p.first, p.last)} | {t.name.lower() for t in towns}
    for _ in range(n(N_READING_SFT)):
        text, p, attr = reading_question(reading_rng, reading_people(reading_rng, strangers, choices))
        sft.append({"conversations": conversation(rng, [(text, answer(rng, p, attr))])})
    rng.shuffle(sft)

    # dpo.jsonl: the same prompt and reply template; the rejected reply names a wrong value.
    dpo = []
    for i, attr in [rng.choice(known) for _ in range(n(500))]:
        p = people[i]
        prompt = with_system(rng, [msg("user", question(rng, p, attr))], 0.2)
        template = rng.choice(ANSWERS[attr])
        wrong = wrong_value(rng, attr, p.value(attr), choices)
        dpo.append(
            {
                "chosen": [*prompt, msg("assistant", fill(template, p.name, p.value(attr)))],
                "rejected": [*prompt, msg("assistant", fill(template, p.name, wrong))],
            }
        )
    for pr in rng.sample(train_problems, n(400)):
        prompt = [msg("user", arith_question(rng, pr))]
        off = rng.choice((-10, -2, -1, 1, 2, 10))
        dpo.append(
            {
                "chosen": [*prompt, msg("assistant", arith_answer(pr))],
                "rejected": [*prompt, msg("assistant", arith_answer(pr, solve(pr) + off))],
            }
        )
    rng.shuffle(dpo)

    # rlaif.jsonl: a prompt, a reference reply (dropped by the RL loaders) and the verifiable answer string.
    rlaif = []
    for pr in rng.sample(train_problems, n(500)):
        conv = conversation(rng, [(arith_question(rng, pr), arith_answer(pr))], 0.2)
        rlaif.append({"conversations": conv, "answer": str(solve(pr))})
    for i, attr in [rng.choice(known) for _ in range(n(300))]:
        rlaif.append({"conversations": conversation(rng, [ask(i, attr)], 0.2), "answer": people[i].value(attr)})
    # Reading prompts: a verifiable task the SFT model already solves part of the time, room for RL to improve.
    rl_rng = random.Random(seed * 7919 + 2)
    rl_names = NameMaker(rl_rng)
    rl_names.used = strangers.used  # one set: no stranger's name is drawn twice in any file
    for _ in range(n(N_READING_RL)):
        text, p, attr = reading_question(rl_rng, reading_people(rl_rng, rl_names, choices))
        rlaif.append({"conversations": conversation(rng, [(text, answer(rng, p, attr))], 0.2), "answer": p.value(attr)})
    rng.shuffle(rlaif)

    # r1_mix.jsonl: the reasoning is written out in <think>, the reply in <answer>.
    r1 = []
    for pr in rng.sample(train_problems, n(700)):
        content = f"<think>\n{arith_reasoning(pr)}\n</think>\n<answer>\n{arith_answer(pr)}\n</answer>"
        r1.append({"conversations": conversation(rng, [(arith_question(rng, pr), content)], 0.2)})
    for i, attr in [rng.choice(known) for _ in range(n(400))]:
        p = people[i]
        topic = "home town" if attr == "town" else ("favourite colour" if attr == "colour" else attr)
        think = f"The question asks for the {topic} of {p.name}.\nI remember: {fact_sentence(rng, p, attr)}"
        content = f"<think>\n{think}\n</think>\n<answer>\n{answer(rng, p, attr)}\n</answer>"
        r1.append({"conversations": conversation(rng, [(question(rng, p, attr), content)], 0.2)})
    rng.shuffle(r1)

    # lora_identity.jsonl: the assistant's name, sometimes followed by an ordinary question.
    lora = []
    for _ in range(n(200, 20)):
        turns = [(rng.choice(IDENTITY_QUESTIONS), rng.choice(IDENTITY_ANSWERS).format(n=IDENTITY_NAME))]
        if rng.random() < 0.3:
            turns.append(ask(*rng.choice(known)))
        lora.append({"conversations": conversation(rng, turns, 0.2)})

    # eval.jsonl: held-out facts (their Q&A form is in no conversation file) and held-out problems.
    # Every phrasing of each held-out question, so a score does not hang on one wording per fact.
    evals = [
        {"question": fill(q, people[i].name, people[i].value(attr)), "answer": people[i].value(attr), "kind": attr,
         "choices": choices[attr]}
        for i, attr in sorted(held)
        for q in QUESTIONS[attr]
    ]  # fmt: skip
    for _ in range(n(N_READING_EVAL, 10)):
        text, p, attr = reading_question(reading_rng, reading_people(reading_rng, strangers, choices))
        evals.append({"question": text, "answer": p.value(attr), "kind": "reading", "choices": choices[attr]})
    for pr in eval_problems:
        evals.append({"question": arith_question(rng, pr), "answer": str(solve(pr)), "kind": "arithmetic"})

    files = {
        "pretrain.jsonl": pretrain,
        "sft.jsonl": sft,
        "dpo.jsonl": dpo,
        "rlaif.jsonl": rlaif,
        "r1_mix.jsonl": r1,
        "lora_identity.jsonl": lora,
        "eval.jsonl": evals,
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_jsonl(out / name, records)
    counts = {name: len(records) for name, records in files.items()}
    world = {"people": len(people), "towns": len(towns), "creatures": len(creatures)}
    kinds = Counter(e["kind"] for e in evals)
    readme = render_readme(out, seed, scale, counts, world, kinds, unigram_entropy(texts, tokenizer_dir))
    (out / "README.md").write_text(readme, encoding="utf-8", newline="\n")
    return counts


def render_readme(
    out: Path,
    seed: int,
    scale: float,
    counts: dict[str, int],
    world: dict[str, int],
    kinds: Counter[str],
    entropy: tuple[float, int, int] | None,
) -> str:
    sizes = {name: (out / name).stat().st_size for name in counts}
    command = "python -m tools.make_sample_data --out data/sample" + (f" --seed {seed}" if seed else "")
    command += f" --scale {scale}" if scale != 1.0 else ""
    rows = "\n".join(f"| {name} | {counts[name]} | {sizes[name]:,} | {FILE_NOTES[name]} |" for name in counts)
    if entropy is None:
        entropy_text = "Not measured: no tokenizer could be loaded when these files were generated."
    else:
        h, total, distinct = entropy
        entropy_text = (
            f"Unigram entropy of pretrain.jsonl under the shipped tokenizer (minimind/minimind_fast/assets): "
            f"**{h:.3f} nats/token**"
            f" ({total:,} tokens of text, bos/eos not counted, {distinct:,} distinct token ids). A model that"
            " learns nothing but token frequencies reaches this loss; one that learns the facts and templates goes"
            " far below it."
        )
    eval_text = (
        f'eval.jsonl: {", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))}. Fact items carry `"choices"`,'
        " every valid answer of that kind (all towns, all professions, ...); chance accuracy is `1 / len(choices)`."
        " Arithmetic items have no choices: the answer is an integer."
    )
    return README_TEMPLATE.format(
        command=command,
        rows=rows,
        total=f"{sum(sizes.values()):,}",
        entropy=textwrap.fill(entropy_text, 116),
        eval_text=textwrap.fill(eval_text, 116),
        identity=IDENTITY_NAME,
        world=WORLD,
        person_paragraphs=PERSON_PARAGRAPHS,
        qa_repeats=QA_REPEATS,
        **world,
    )


FILE_NOTES = {
    "pretrain.jsonl": '`{"text"}` paragraphs about people, towns, professions, creatures; Q&A notes; arithmetic',
    "sft.jsonl": '`{"conversations"}` Q&A on facts, sums and short texts; some with a system message, some multi-turn',
    "dpo.jsonl": '`{"chosen", "rejected"}`, the rejected reply gives a wrong value',
    "rlaif.jsonl": 'RL prompts in SFT format plus `"answer"`, the verifiable answer string',
    "r1_mix.jsonl": "reasoning: assistant content `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`",
    "lora_identity.jsonl": "who-are-you conversations that give the assistant its name",
    "eval.jsonl": '`{"question", "answer", "kind", "choices"?}` held-out questions',
}
README_TEMPLATE = """\
# Sample data

Small data sets in every MiniMind format, generated by `tools/make_sample_data.py` so that every training stage runs
on a fresh machine. They describe an invented world, {world}: {people} people (home town, profession, favourite
colour, pet creature, age), {towns} towns and {creatures} pet creatures, plus two-digit addition and subtraction.
Everything is procedurally generated and checkable; none of it is MiniMind's data.

Regenerate (same seed, same bytes; `tests/tools/test_sample_data.py` checks the shipped files are exactly this):

    {command}
    python -m tools.train_tokenizer --data data/sample/pretrain.jsonl data/sample/sft.jsonl data/sample/dpo.jsonl \\
        data/sample/rlaif.jsonl data/sample/r1_mix.jsonl data/sample/lora_identity.jsonl \\
        --out minimind/minimind_fast/assets

README.md (this file) is written by the first command; its entropy figure comes from the tokenizer in
minimind/minimind_fast/assets at the time, so run the first command again after retraining the tokenizer.

| file | records | bytes | content |
|---|---|---|---|
{rows}

Total {total} bytes of JSONL.

## The task

Every fact about a person is stated in pretrain.jsonl in {person_paragraphs} paragraphs, in several phrasings and
orders, and again in town and profession listings: the world is small so that each fact is read several hundred
times, which a tiny model needs before it recalls it. The people are split: for about seven in ten, every fact is
asked and answered (each in {qa_repeats} differently phrased conversations) in the conversation files (sft, dpo,
rlaif, r1_mix, lora_identity); the others are named in no conversation file and their facts are asked only in
eval.jsonl. So eval measures whether a model turns knowledge it read in pretraining into answers in a form it
learned about other people. Eval arithmetic problems (and, for sums, their swapped twins) appear in no other file.

Reading comprehension: sft.jsonl also holds conversations whose user message is a short text stating the five facts
of one or two strangers (invented names that appear nowhere else), then a question about one of those facts; the
reply states the value the text gives. eval.jsonl's reading items are built the same way about other strangers, so
they measure a skill learned in SFT (finding the asked fact in the context) rather than memorised knowledge. The tiny
model of the CPU recipe does not learn it (it does not learn to copy from its context within minutes); larger models
and longer runs are what these items are for.

{eval_text}

The assistant's name in lora_identity.jsonl, {identity}, appears in no other file, so a LoRA run on it is visible.

## Token statistics

{entropy}

## Using MiniMind's real data instead

MiniMind's data sets (ModelScope / Hugging Face, `minimind_dataset`: pretrain_hq.jsonl, sft_mini_512.jsonl,
sft_512/1024/2048.jsonl, dpo.jsonl, r1_mix_1024.jsonl, rlaif-mini.jsonl, lora_identity.jsonl, lora_medical.jsonl)
are in the same formats and are not shipped. Download them yourself and point the stage scripts at them, e.g.
`--data_path /path/to/pretrain_hq.jsonl` for pretraining and `--data_path /path/to/sft_mini_512.jsonl` for SFT.
MiniMind's own tokenizer folder loads unchanged with `Tokenizer.load("/path/to/minimind_tokenizer")`.
"""


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="size multiplier (tests use a small one)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for README's entropy (default: shipped)")
    args = parser.parse_args(argv)
    counts = generate(Path(args.out), args.seed, args.scale, Path(args.tokenizer) if args.tokenizer else None)
    for name, count in counts.items():
        print(f"{name:22s} {count:7d} records")
    return counts


if __name__ == "__main__":
    main()
