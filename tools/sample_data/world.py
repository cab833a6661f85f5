"""The invented world of the sample data, Kethmar: its word lists, invented names, towns, pet creatures and people.

build_world(rng, n_people) draws every town, creature and person from one random stream; the order of its draws is
part of the shipped data's identity (data/sample/ is byte-for-byte its output), so it is never reordered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORLD = "Kethmar"
IDENTITY_NAME = "Lumen"  # lora_identity.jsonl only; every other file is checked not to contain it
ATTRIBUTES = ("town", "profession", "colour", "pet", "age")
AGE_RANGE = (18, 90)
# A small world whose facts are repeated often: the tiny model of the CPU recipe memorises a fact only after a few
# hundred exposures (measured: 24 people x 200 paragraphs -> colour cloze 38-62%, 40 people x 90 -> 10-20%).
N_PEOPLE, N_TOWNS, N_CREATURES = 16, 16, 12

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
