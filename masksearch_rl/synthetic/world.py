"""A procedural fictional world: entities, attributes and relations, computed on demand from ``(seed, index)``.

Why procedural: the world must scale to millions of passages with bounded memory, and any slice of the corpus
must be producible without generating what comes before it. So nothing is stored. Entity ``i`` is a pure
function of ``(seed, i)``: its kind comes from a fixed repeating layout of slots, its name from a seeded
bijection of ``i`` onto a space of invented words, and each fact from a hash-seeded generator. Relations point to
other indices, picked with a skew towards low indices so that some entities become hubs (low indices are also the
"notable" entities that get two passages instead of one).

Names are unique by construction. Every name contains exactly one *core* word (three consonant-vowel syllables
plus an optional final consonant cluster, e.g. "Kelovar"), the core is a bijective function of the entity index,
and no other word used in names (given names, "River", "Mount", "Press", ...) has the shape of a core word.

Kinds and types (``type`` is what passage annotations and summaries use):
    person:       writer, filmmaker, musician, scientist, politician, explorer, architect
    place:        city, country, river, mountain
    organisation: publisher, studio, band, university, company
    work:         book, film, album

Public API::

    world = build_world(seed=0, num_passages=10_000)   # O(1): nothing is generated yet
    world.entity(i) -> Entity(index, kind, type, name, notable, facts)   # facts: key -> Fact(key, text, type, target)
    world.name(i), world.kind(i), world.type(i), world.passage_ids(i), world.locate(passage_index)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

# --- layout -------------------------------------------------------------------------------------------------
# Entity i has kind _CYCLE[i % len(_CYCLE)]. The proportions are those of the cycle; the country of each cycle
# takes the first city of the same cycle as its capital (so "capital of" is consistent in both directions).
_CYCLE = (
    "city", "writer", "book", "musician", "city", "publisher", "filmmaker", "film",
    "city", "scientist", "country", "writer", "album", "band", "politician", "city",
    "studio", "book", "explorer", "musician", "university", "river", "city", "writer",
    "film", "politician", "company", "architect", "mountain", "city", "musician", "filmmaker",
)
CYCLE_LEN = len(_CYCLE)
KIND_TYPE = {
    **dict.fromkeys(("writer", "filmmaker", "musician", "scientist", "politician", "explorer", "architect"), "person"),
    **dict.fromkeys(("city", "country", "river", "mountain"), "place"),
    **dict.fromkeys(("publisher", "studio", "band", "university", "company"), "organisation"),
    **dict.fromkeys(("book", "film", "album"), "work"),
}
ENTITY_TYPES = ("person", "place", "organisation", "work")
_CAPITAL_SLOT = _CYCLE.index("city")
_COUNTRY_SLOT = _CYCLE.index("country")
assert _CAPITAL_SLOT < _COUNTRY_SLOT  # a country that exists always has its capital

MIN_PASSAGES = 40  # at least one full cycle of entities, so every kind exists


class _Slots:
    """Positions of one group (a kind, or a whole type) inside the cycle: maps k-th member <-> global index."""

    def __init__(self, positions: tuple[int, ...]):
        self.positions = positions
        self._rank = {p: r for r, p in enumerate(positions)}

    def count(self, num_entities: int) -> int:
        full, rem = divmod(num_entities, CYCLE_LEN)
        return full * len(self.positions) + sum(p < rem for p in self.positions)

    def nth(self, k: int) -> int:
        cycle, r = divmod(k, len(self.positions))
        return cycle * CYCLE_LEN + self.positions[r]

    def rank(self, index: int) -> int:
        cycle, pos = divmod(index, CYCLE_LEN)
        return cycle * len(self.positions) + self._rank[pos]


_GROUPS = {
    group: _Slots(tuple(p for p, kind in enumerate(_CYCLE) if group in (kind, KIND_TYPE[kind])))
    for group in (*KIND_TYPE, *ENTITY_TYPES)
}

# --- names --------------------------------------------------------------------------------------------------
# Core words: 3 x (onset + nucleus) + coda. Onsets are consonant-only and nuclei vowel-only, so a word splits
# back into its parts uniquely (maximal consonant/vowel runs): 16 * 8 per syllable, 8 codas -> exactly 2**24 words.
_ONSETS = ("b", "d", "h", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th", "dr", "kr", "vr")
_NUCLEI = ("a", "e", "i", "o", "u", "y", "ai", "ei")
_CODAS = ("", "n", "r", "s", "l", "th", "m", "nd")
NAME_SPACE = 1 << 24
_SYLLABLES = tuple(onset + nucleus for onset in _ONSETS for nucleus in _NUCLEI)  # index = onset * 8 + nucleus
CORE_WORD = re.compile(
    "(?:{o})(?:{n})(?:{o})(?:{n})(?:{o})(?:{n})(?:{c})?".format(
        o="|".join(_ONSETS), n="|".join(_NUCLEI), c="|".join(c for c in _CODAS if c)
    ),
    re.IGNORECASE,
)

GIVEN_NAMES = (
    # female
    ("Aveline", "Brisca", "Cadie", "Delphe", "Elsabet", "Fenna", "Gwenna", "Hesper", "Ilse", "Jorunn", "Kestrel",
     "Liora", "Maelis", "Odalys", "Perrin", "Quenby", "Rhoswen", "Sabeth", "Tamsin", "Ulla", "Wrenna", "Ysolde"),
    # male
    ("Aldric", "Bastian", "Corvin", "Dariel", "Emrys", "Faolan", "Gideon", "Halvard", "Ivo", "Jasper", "Kasper",
     "Leander", "Magnus", "Nils", "Osric", "Piran", "Quill", "Rurik", "Soren", "Tobiah", "Ulric", "Wystan"),
)
# "{}" is the core word. Every other word here must not look like a core word (checked in the tests).
NAME_PATTERNS = {
    "city": ("{}",),
    "country": ("{}",),
    "river": ("{} River",),
    "mountain": ("Mount {}",),
    "publisher": ("{} Press", "{} Books", "{} House"),
    "studio": ("{} Pictures", "{} Films", "{} Studios"),
    "band": ("{} Ensemble", "{} Collective", "{} Sound", "{} Union"),
    "university": ("{} University", "{} Institute", "{} College"),
    "company": ("{} Industries", "{} Works", "{} Company", "{} Group"),
    "book": ("{}", "The {} Letters", "The Last Days of {}", "A Winter in {}", "The {} Archive"),
    "film": ("{}", "Return to {}", "The {} Affair", "Night over {}"),
    "album": ("{}", "{} Nights", "Songs from {}", "The {} Sessions"),
}

# --- attribute vocabularies ---------------------------------------------------------------------------------
OCCUPATIONS = {
    "writer": ("novelist", "poet", "essayist", "playwright", "short-story writer"),
    "filmmaker": ("film director", "screenwriter", "documentary maker"),
    "musician": ("composer", "violinist", "singer", "guitarist", "pianist", "cellist"),
    "scientist": ("astronomer", "chemist", "botanist", "geologist", "mathematician", "physician"),
    "politician": ("politician", "diplomat", "magistrate", "senator"),
    "explorer": ("explorer", "mountaineer", "navigator", "surveyor"),
    "architect": ("architect", "civil engineer", "town planner"),
}
BOOK_GENRES = ("historical novel", "detective novel", "poetry collection", "travelogue", "satire", "family saga",
               "science fiction novel", "biography")
FILM_GENRES = ("drama", "comedy", "thriller", "documentary", "western", "musical", "war film", "romance")
MUSIC_GENRES = ("folk music", "jazz", "chamber pop", "electronic music", "blues", "choral music", "progressive rock")
PUBLISHER_SPECIALTIES = ("children's books", "poetry", "scientific texts", "crime fiction", "maps and atlases",
                         "translated literature")
INDUSTRIES = ("shipbuilding", "textiles", "glassmaking", "railway engineering", "brewing", "printing",
              "clockmaking", "mining", "pharmaceuticals")
GOVERNMENTS = ("republic", "constitutional monarchy", "federal republic", "principality", "grand duchy")
CURRENCIES = ("florin", "crown", "mark", "ducat", "thaler", "shilling", "dinar")
CITY_FEATURES = ("glassworks", "salt markets", "tram network", "clock towers", "shipyards", "silk weaving",
                 "botanical gardens", "stone bridges", "winter fair", "lighthouse")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
LAST_YEAR = 2023

# --- deterministic randomness -------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Rng(random.Random):
    """Python's Mersenne Twister, drawn from only through ``random()``.

    Python guarantees that ``random()`` yields the same sequence for the same integer seed across versions, but
    not ``randrange``/``choice``/``shuffle``; so those are rebuilt here on ``random()`` alone. (A pure-Python
    hash generator was 3x slower at 1M passages.)
    """

    def below(self, n: int) -> int:
        return int(self.random() * n)

    def between(self, low: int, high: int) -> int:
        """Uniform integer in [low, high]."""
        return low + int(self.random() * (high - low + 1))

    def choice(self, seq):
        return seq[int(self.random() * len(seq))]

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = int(self.random() * (i + 1))
            items[i], items[j] = items[j], items[i]


def rng_for(*parts: int) -> Rng:
    """A generator seeded by a tuple of integers (e.g. ``(seed, question_number)``)."""
    state = 0
    for part in parts:
        state = _mix64(((state ^ (part & _MASK64)) + _GOLDEN) & _MASK64)
    return Rng(state)


# Salts: one independent stream per purpose, so e.g. a person's birth year can be computed without building them.
_FACTS, _NAMING, _BIRTH, _PAIR, _MARRY, _FOUNDER, _FOUNDED, _CREATOR, _WORK_YEAR, _FEISTEL = range(10)


# --- records ------------------------------------------------------------------------------------------------
class Fact(NamedTuple):
    """One fact about an entity. ``text`` is exactly what passages print; ``target`` is the related entity's
    index for relations (then ``text`` is its name) and None for attributes."""

    key: str
    text: str
    type: str  # person | place | organisation | work | date | year | number | term
    target: int | None = None


@dataclass
class Entity:
    index: int
    kind: str
    type: str
    name: str
    notable: bool
    facts: dict[str, Fact]
    gender: int | None = None  # persons only: 0 = she, 1 = he


class World:
    """The world behind a corpus of ``num_passages`` passages; every method is O(1) and pure."""

    def __init__(self, seed: int, num_passages: int, flavour: bool = True):
        """``flavour=False``: passages state their facts only, without the fact-free sentences that pad them to
        60-130 words (shorter texts, for the learning lab's CPU budget); everything else is the same."""
        if num_passages < MIN_PASSAGES:
            raise ValueError(f"num_passages must be at least {MIN_PASSAGES}, got {num_passages}")
        self.seed = seed
        self.num_passages = num_passages
        self.flavour = flavour
        # A quarter of the entities are "notable" (the lowest indices) and get two passages: N = E + E/4.
        self.num_entities = -(-num_passages * 4 // 5)
        self.num_notable = num_passages - self.num_entities
        if self.num_entities > NAME_SPACE:
            raise ValueError(f"num_passages={num_passages} needs more entities than the {NAME_SPACE} names we have")
        self._key = _mix64((seed & _MASK64) ^ 0x5EED5EED5EED5EED)
        self._feistel = tuple(self._hash(r, _FEISTEL) & 0xFFF for r in range(4))
        self._counts = {group: slots.count(self.num_entities) for group, slots in _GROUPS.items()}
        # Names are looked up once per mention and hubs are mentioned very often. Bounded (~40 MB at most).
        self.name = lru_cache(maxsize=1 << 18)(self._name)

    def __reduce__(self):
        """Pickle as its arguments (the name cache is not picklable, and is cheap to rebuild)."""
        return World, (self.seed, self.num_passages, self.flavour)

    # -- randomness --
    def _hash(self, index: int, salt: int) -> int:
        """Independent 64-bit value per (index, purpose): splitmix64 output number ``index * 64 + salt``."""
        return _mix64((self._key + (index << 6 | salt) * _GOLDEN) & _MASK64)

    def _uniform(self, index: int, salt: int) -> float:
        return (self._hash(index, salt) >> 11) * (1.0 / (1 << 53))

    def rng(self, index: int, salt: int) -> Rng:
        return Rng(self._hash(index, salt))

    # -- layout --
    def kind(self, index: int) -> str:
        return _CYCLE[index % CYCLE_LEN]

    def type(self, index: int) -> str:
        return KIND_TYPE[_CYCLE[index % CYCLE_LEN]]

    def count(self, group: str) -> int:
        """Number of entities of a kind ("city") or type ("person")."""
        return self._counts[group]

    def nth(self, group: str, k: int) -> int:
        """Global index of the k-th entity of a kind or type."""
        return _GROUPS[group].nth(k)

    def num_parts(self, index: int) -> int:
        return 2 if index < self.num_notable else 1

    def passage_index(self, index: int, part: int = 0) -> int:
        return 2 * index + part if index < self.num_notable else self.num_notable + index

    def passage_ids(self, index: int) -> list[str]:
        return [str(self.passage_index(index, part)) for part in range(self.num_parts(index))]

    def locate(self, passage_index: int) -> tuple[int, int]:
        """Inverse of :meth:`passage_index`: ``(entity index, part)``."""
        if passage_index < 2 * self.num_notable:
            return divmod(passage_index, 2)
        return passage_index - self.num_notable, 0

    def entities_per_type(self) -> dict[str, int]:
        return {t: self._counts[t] for t in ENTITY_TYPES}

    def entities_per_kind(self) -> dict[str, int]:
        return {k: self._counts[k] for k in KIND_TYPE}

    # -- names --
    def core(self, index: int) -> str:
        """The entity's unique invented word: a 4-round Feistel permutation of the index, spelled in syllables."""
        left, right = index >> 12, index & 0xFFF
        for key in self._feistel:
            left, right = right, left ^ ((((right ^ key) * 0x9E3779B1) >> 11) & 0xFFF)
        code = left << 12 | right
        syllables = _SYLLABLES[code >> 17] + _SYLLABLES[(code >> 10) & 127] + _SYLLABLES[(code >> 3) & 127]
        return (syllables + _CODAS[code & 7]).capitalize()

    def gender(self, index: int) -> int:
        return self._hash(index, _NAMING) & 1

    def _name(self, index: int) -> str:
        kind = self.kind(index)
        style = self._hash(index, _NAMING) >> 1  # bit 0 is the gender
        if KIND_TYPE[kind] == "person":
            given = GIVEN_NAMES[self.gender(index)]
            return f"{given[style % len(given)]} {self.core(index)}"
        patterns = NAME_PATTERNS[kind]
        return patterns[style % len(patterns)].format(self.core(index))

    # -- facts other entities depend on (independent streams, so no recursion into whole entities) --
    def _pick(self, rng: Rng, group: str) -> int:
        return self._skewed(rng.random(), group)

    def _skewed(self, u: float, group: str) -> int:
        """The member of a group at quantile u**2: skewed towards low (notable) indices, P(first 1%) = 10%."""
        return _GROUPS[group].nth(int(self._counts[group] * u * u))

    def birth_year(self, person: int) -> int:
        # Spouses are pairs (2k, 2k+1) of person ranks: their birth years share a base so ages are plausible.
        # Pairs with a filmmaker or musician are born after 1860, so films and albums are not from the 1700s.
        persons = _GROUPS["person"]
        pair = persons.rank(person) >> 1
        modern = any(_CYCLE[persons.nth(r) % CYCLE_LEN] in ("filmmaker", "musician") for r in (2 * pair, 2 * pair + 1))
        base = 1860 + self._hash(pair, _PAIR) % 120 if modern else 1650 + self._hash(pair, _PAIR) % 330
        return base + self._hash(person, _BIRTH) % 13 - 6

    def spouse(self, person: int) -> int | None:
        rank = _GROUPS["person"].rank(person)
        partner = rank ^ 1
        if partner >= self._counts["person"] or self._hash(rank >> 1, _MARRY) % 10 >= 6:
            return None
        return _GROUPS["person"].nth(partner)

    def founder(self, org: int) -> int:
        group = {"publisher": "writer", "studio": "filmmaker", "band": "musician", "university": "scientist",
                 "company": "person"}[self.kind(org)]
        return self._skewed(self._uniform(org, _FOUNDER), group)

    def founded_year(self, org: int) -> int:
        # Founded 25-59 years after the founder's birth, squeezed (not clipped) to end by LAST_YEAR - 3.
        born = self.birth_year(self.founder(org))
        return born + 25 + self._hash(org, _FOUNDED) % min(35, LAST_YEAR - 3 - born - 24)

    def creator(self, work: int) -> int:
        group = {"book": "writer", "film": "filmmaker", "album": "band"}[self.kind(work)]
        return self._skewed(self._uniform(work, _CREATOR), group)

    def work_year(self, work: int) -> int:
        creator = self.creator(work)
        if self.kind(work) == "album":
            start = self.founded_year(creator) + 1
            return start + self._hash(work, _WORK_YEAR) % min(20, LAST_YEAR - start + 1)
        start = self.birth_year(creator) + 22
        return start + self._hash(work, _WORK_YEAR) % min(40, LAST_YEAR - start + 1)

    # -- whole entities --
    def entity(self, index: int) -> Entity:
        return self.entity_and_rng(index)[0]

    def entity_and_rng(self, index: int) -> tuple[Entity, Rng]:
        """The entity plus its generator, positioned after the facts: the renderer draws on from there
        (seeding a generator costs as much as building the entity, so each entity gets one)."""
        if not 0 <= index < self.num_entities:
            raise IndexError(f"entity {index} outside 0..{self.num_entities - 1}")
        kind = self.kind(index)
        etype = KIND_TYPE[kind]
        rng = self.rng(index, _FACTS)
        facts: dict[str, Fact] = {}
        notable = index < self.num_notable
        if etype == "person":
            self._person_facts(index, kind, rng, facts, notable)
        elif etype == "organisation":
            self._organisation_facts(index, kind, rng, facts, notable)
        elif etype == "work":
            self._work_facts(index, kind, rng, facts, notable)
        else:
            {"city": self._city_facts, "country": self._country_facts, "river": self._river_facts,
             "mountain": self._mountain_facts}[kind](index, rng, facts, notable)
        gender = self.gender(index) if etype == "person" else None
        return Entity(index, kind, etype, self.name(index), notable, facts, gender), rng

    def _relate(self, facts: dict[str, Fact], key: str, target: int) -> None:
        facts[key] = Fact(key, self.name(target), self.type(target), target)

    def _person_facts(self, i: int, kind: str, rng: Rng, facts: dict, notable: bool) -> None:
        year = self.birth_year(i)
        facts["occupation"] = Fact("occupation", rng.choice(OCCUPATIONS[kind]), "term")
        facts["birth_date"] = Fact("birth_date", _date(rng, year), "date")
        self._relate(facts, "born_in", self._pick(rng, "city"))
        death = year + rng.between(40, 95)
        if death <= LAST_YEAR:
            facts["death_date"] = Fact("death_date", _date(rng, death), "date")
            self._relate(facts, "died_in", self._pick(rng, "city"))
        if rng.below(10) < 8:
            self._relate(facts, "educated_at", self._pick(rng, "university"))
        if kind == "musician":
            self._relate(facts, "member_of", self._pick(rng, "band"))
        spouse = self.spouse(i)
        if spouse is not None:
            self._relate(facts, "spouse", spouse)
        if rng.below(2) or notable:
            self._relate(facts, "lived_in", self._pick(rng, "city"))
        if rng.below(10) < 6:
            facts["children"] = Fact("children", NUMBER_WORDS[rng.between(2, 7)], "number")
        if notable:
            facts["languages"] = Fact("languages", NUMBER_WORDS[rng.between(2, 6)], "number")

    def _city_facts(self, i: int, rng: Rng, facts: dict, notable: bool) -> None:
        country = i - i % CYCLE_LEN + _COUNTRY_SLOT
        capital = i % CYCLE_LEN == _CAPITAL_SLOT and country < self.num_entities
        if capital:
            self._relate(facts, "capital_of", country)
        else:
            self._relate(facts, "country", self._pick(rng, "country"))
        population = rng.between(150_000, 3_500_000) if capital else rng.between(2_000, 900_000)
        facts["population"] = Fact("population", f"{population:,}", "number")
        facts["founded_year"] = Fact("founded_year", str(rng.between(1050, 1890)), "year")
        if rng.below(2) or notable:
            self._relate(facts, "river", self._pick(rng, "river"))
        if rng.below(10) < 7:
            self._relate(facts, "mayor", self._pick(rng, "politician"))
        facts["elevation"] = Fact("elevation", f"{rng.between(2, 1800):,} metres", "number")
        if notable:
            facts["area"] = Fact("area", f"{rng.between(20, 900):,} square kilometres", "number")
            facts["known_for"] = Fact("known_for", rng.choice(CITY_FEATURES), "term")

    def _country_facts(self, i: int, rng: Rng, facts: dict, notable: bool) -> None:
        facts["government"] = Fact("government", rng.choice(GOVERNMENTS), "term")
        self._relate(facts, "capital", i - _COUNTRY_SLOT + _CAPITAL_SLOT)
        facts["established"] = Fact("established", _date(rng, rng.between(1400, 1960)), "date")
        facts["population"] = Fact("population", f"{rng.between(300_000, 60_000_000):,}", "number")
        facts["area"] = Fact("area", f"{rng.between(2_000, 900_000):,} square kilometres", "number")
        if rng.below(2) or notable:
            facts["currency"] = Fact("currency", rng.choice(CURRENCIES), "term")
        if rng.below(10) < 8:
            self._relate(facts, "leader", self._pick(rng, "politician"))

    def _river_facts(self, i: int, rng: Rng, facts: dict, notable: bool) -> None:
        self._relate(facts, "source", self._pick(rng, "country"))
        facts["length"] = Fact("length", f"{rng.between(40, 2800):,} kilometres", "number")
        if rng.below(10) < 7:
            self._relate(facts, "mouth", self._pick(rng, "city"))
        if notable:
            facts["discharge"] = Fact("discharge", f"{rng.between(20, 9000):,} cubic metres per second", "number")
        if rng.below(2) or notable:
            facts["tributaries"] = Fact("tributaries", NUMBER_WORDS[rng.between(2, 9)], "number")

    def _mountain_facts(self, i: int, rng: Rng, facts: dict, notable: bool) -> None:
        self._relate(facts, "country", self._pick(rng, "country"))
        facts["height"] = Fact("height", f"{rng.between(1200, 7900):,} metres", "number")
        if rng.below(10) < 8:
            climber = self._pick(rng, "explorer")
            self._relate(facts, "first_ascent", climber)
            born = self.birth_year(climber)
            ascent = born + rng.between(22, min(45, LAST_YEAR - born))
            facts["ascent_year"] = Fact("ascent_year", str(ascent), "year")
        if notable:
            facts["prominence"] = Fact("prominence", f"{rng.between(300, 4000):,} metres", "number")

    def _organisation_facts(self, i: int, kind: str, rng: Rng, facts: dict, notable: bool) -> None:
        self._relate(facts, "founder", self.founder(i))
        facts["founded_year"] = Fact("founded_year", str(self.founded_year(i)), "year")
        if kind == "band":
            self._relate(facts, "origin", self._pick(rng, "city"))
            facts["genre"] = Fact("genre", rng.choice(MUSIC_GENRES), "term")
            facts["members"] = Fact("members", NUMBER_WORDS[rng.between(3, 8)], "number")
            return
        self._relate(facts, "headquarters", self._pick(rng, "city"))
        if kind == "publisher":
            facts["specialty"] = Fact("specialty", rng.choice(PUBLISHER_SPECIALTIES), "term")
            facts["titles"] = Fact("titles", f"{rng.between(200, 12_000):,} titles", "number")
        elif kind == "studio":
            facts["films"] = Fact("films", f"{rng.between(5, 400):,} films", "number")
            if notable:
                facts["employees"] = Fact("employees", f"{rng.between(40, 3_000):,} people", "number")
        elif kind == "university":
            facts["students"] = Fact("students", f"{rng.between(1_200, 60_000):,} students", "number")
        else:
            facts["industry"] = Fact("industry", rng.choice(INDUSTRIES), "term")
            facts["employees"] = Fact("employees", f"{rng.between(40, 90_000):,} people", "number")

    def _work_facts(self, i: int, kind: str, rng: Rng, facts: dict, notable: bool) -> None:
        creator_key = {"book": "author", "film": "director", "album": "artist"}[kind]
        self._relate(facts, creator_key, self.creator(i))
        facts["year"] = Fact("year", str(self.work_year(i)), "year")
        if kind == "album":
            facts["genre"] = Fact("genre", rng.choice(MUSIC_GENRES), "term")
            facts["tracks"] = Fact("tracks", NUMBER_WORDS[rng.between(6, 16)], "number")
            facts["minutes"] = Fact("minutes", f"{rng.between(28, 75)} minutes", "number")
            if rng.below(10) < 7 or notable:
                self._relate(facts, "recorded_in", self._pick(rng, "city"))
            return
        if rng.below(10) < 9:
            self._relate(facts, "publisher" if kind == "book" else "studio",
                         self._pick(rng, "publisher" if kind == "book" else "studio"))
        if kind == "book":
            facts["genre"] = Fact("genre", rng.choice(BOOK_GENRES), "term")
            facts["pages"] = Fact("pages", f"{rng.between(90, 1200):,} pages", "number")
        else:
            facts["genre"] = Fact("genre", rng.choice(FILM_GENRES), "term")
            facts["minutes"] = Fact("minutes", f"{rng.between(70, 190)} minutes", "number")
        if rng.below(10) < 7 or notable:
            self._relate(facts, "setting", self._pick(rng, "city"))


def _date(rng: Rng, year: int) -> str:
    return f"{rng.between(1, 28)} {rng.choice(MONTHS)} {year}"


def build_world(seed: int, num_passages: int, flavour: bool = True) -> World:
    """The world whose corpus has exactly ``num_passages`` passages (instant: entities are computed on demand);
    ``flavour=False`` leaves out the fact-free sentences (see :class:`World`)."""
    return World(seed, num_passages, flavour)
