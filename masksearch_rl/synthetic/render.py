"""Passages for the synthetic world: varied templated English, one or two passages per entity.

Each entity's facts are written as sentences (a lead sentence first, the rest in a seeded order), padded with
fact-free "flavour" sentences to 60-130 words. Notable entities have their facts split over two passages; the
first sentence of every passage names the entity, so each passage stands alone in a search result. A passage
states only the entity's *own* facts (never, say, the country of a person's birth city): that keeps the number
of lookups a question needs equal to its hop count.

Every name, date, year, number and term printed is recorded as a span ``{"text", "type"}`` in
``Passage.entities`` (in order of first appearance, each text once), which the offline RAMP extractor masks.

Public API::

    render_entity(world, index) -> EntityPassages(passages, fact_part)   # fact key -> which passage states it
    iter_passages(world, start=0, stop=None) -> Iterator[Passage]         # passages [start, stop) in id order
    generate_passages(num_passages, seed, start=0, stop=None) -> Iterator[Passage]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from math import gcd
from string import Formatter

from masksearch_rl.corpus.passage import Passage
from masksearch_rl.synthetic.world import KIND_TYPE, Entity, World, build_world

MIN_WORDS = 60
MAX_WORDS = 130
NAME_AGAIN = 0.25  # chance that a later sentence names the entity instead of using a pronoun

_SUBJECT_FIELDS = ("Subj", "subj", "Poss", "poss")
_ARTICLE_KEYS = frozenset({"occupation", "government", "genre"})  # facts some templates print as "a/an <fact>"
_PRONOUN_FIELDS = (*_SUBJECT_FIELDS, "pron")


class _Template:
    """A sentence pattern. Fields: fact keys, ``a_<key>`` (the fact with "a"/"an" before it), "name", and
    pronoun fields ({Subj} = "He"/"It"/... or, when the sentence names the entity, the name)."""

    __slots__ = ("text", "fields", "subject", "pronoun_fields", "span_fields")

    def __init__(self, text: str):
        self.text = text
        self.fields = tuple(field for _, field, _, _ in Formatter().parse(text) if field)
        self.subject = next((f for f in self.fields if f in _SUBJECT_FIELDS), None)  # gets the name when named
        self.pronoun_fields = tuple(f for f in self.fields if f in _PRONOUN_FIELDS)
        self.span_fields = tuple(f for f in self.fields if f not in _PRONOUN_FIELDS or f == self.subject)


def _slots(*slots: tuple[tuple[str, ...], tuple[str, ...]]) -> tuple:
    return tuple((frozenset(keys), tuple(_Template(t) for t in texts)) for keys, texts in slots)


# Per kind: lead slots (the first whose keys all exist opens passage one) and body slots (each used if its keys
# exist). A slot is (fact keys, alternative templates that state exactly those facts).
_PERSON_LEAD = _slots(
    (("occupation", "birth_date", "born_in"), (
        "{name} was {a_occupation} born on {birth_date} in {born_in}.",
        "Born in {born_in} on {birth_date}, {name} went on to work as {a_occupation}.",
        "{name} (born {birth_date} in {born_in}) is best known as {a_occupation}.",
        "The {occupation} {name} was born in {born_in} on {birth_date}.",
    )),
)
_PERSON_BODY = _slots(
    (("death_date", "died_in"), (
        "{Subj} died in {died_in} on {death_date}.",
        "{Subj} died on {death_date} at {poss} home in {died_in}.",
        "{Poss} death came on {death_date}, in the city of {died_in}.",
    )),
    (("educated_at",), (
        "{Subj} studied at {educated_at}.",
        "As a young student, {subj} attended {educated_at}.",
        "{Subj} received {poss} education at {educated_at}.",
    )),
    (("member_of",), (
        "{Subj} was a long-standing member of {member_of}.",
        "For several years {subj} performed with {member_of}.",
        "{Subj} joined {member_of} early in {poss} career.",
    )),
    (("spouse",), (
        "{Subj} was married to {spouse}.",
        "{Subj} married {spouse}, with whom {pron} shared a house for decades.",
        "{Poss} spouse was {spouse}.",
    )),
    (("lived_in",), (
        "{Subj} later settled in {lived_in}.",
        "For much of {poss} life {subj} lived in {lived_in}.",
    )),
    (("children",), ("{Subj} had {children} children.", "{Subj} raised {children} children.")),
    (("languages",), (
        "{Subj} spoke {languages} languages fluently.",
        "{Subj} could read and write in {languages} languages.",
    )),
)
_ORG_BODY = _slots(
    (("headquarters",), (
        "{Subj} is based in {headquarters}.",
        "{Poss} headquarters are in {headquarters}.",
        "{Subj} has its main offices in {headquarters}.",
    )),
)
_WORK_BODY = _slots(
    (("genre",), ("{Subj} is {a_genre}.", "Critics usually classify {subj} as {a_genre}.")),
    (("setting",), ("{Subj} is set in {setting}.", "The story of {subj} takes place in {setting}.")),
)

TEMPLATES: dict[str, tuple[tuple, tuple]] = {
    **dict.fromkeys((k for k, t in KIND_TYPE.items() if t == "person"), (_PERSON_LEAD, _PERSON_BODY)),
    "city": (
        _slots(
            (("capital_of",), (
                "{name} is the capital of {capital_of}.",
                "{name} serves as the capital and largest city of {capital_of}.",
                "The city of {name} is the capital of {capital_of}.",
            )),
            (("country",), (
                "{name} is a city in {country}.",
                "{name} is a town in the north of {country}.",
                "The city of {name} lies in {country}.",
            )),
        ),
        _slots(
            (("population",), (
                "{Subj} has a population of {population}.",
                "About {population} people live in {subj}.",
                "At the last census {subj} had {population} inhabitants.",
            )),
            (("founded_year",), (
                "{Subj} was founded in {founded_year}.",
                "The first settlement at {name} dates from {founded_year}.",
                "Records show that {subj} was founded in {founded_year}.",
            )),
            (("river",), ("{Subj} lies on the banks of the {river}.", "The {river} flows through {subj}.")),
            (("mayor",), ("{Poss} current mayor is {mayor}.", "{mayor} serves as mayor of {subj}.")),
            (("elevation",), (
                "{Subj} lies at an elevation of {elevation}.",
                "The centre of {subj} sits {elevation} above sea level.",
            )),
            (("area",), ("{Subj} covers an area of {area}.", "The municipality of {subj} spans {area}.")),
            (("known_for",), ("{Subj} is known for its {known_for}.", "Visitors come to {subj} for its {known_for}.")),
        ),
    ),
    "country": (
        _slots(
            (("government", "capital"), (
                "{name} is {a_government} whose capital is {capital}.",
                "{name} is {a_government}; its capital and largest city is {capital}.",
                "The {government} of {name} is governed from its capital, {capital}.",
            )),
        ),
        _slots(
            (("established",), (
                "{Subj} was established on {established}.",
                "{Poss} independence dates from {established}.",
            )),
            (("population",), (
                "{Subj} has a population of {population}.",
                "Around {population} people live in {subj}.",
            )),
            (("area",), ("{Subj} covers {area}.", "The territory of {subj} extends over {area}.")),
            (("currency",), ("{Poss} currency is the {currency}.", "The {currency} is the currency of {subj}.")),
            (("leader",), ("{Poss} head of state is {leader}.", "{leader} serves as head of state of {subj}.")),
        ),
    ),
    "river": (
        _slots(
            (("source",), (
                "The {name} rises in the hills of {source}.",
                "The {name} has its source in {source}.",
                "Rising in {source}, the {name} crosses a wide plain.",
            )),
        ),
        _slots(
            (("length",), ("{Subj} is {length} long.", "{Subj} runs for {length}.")),
            (("mouth",), ("{Subj} reaches the sea near {mouth}.", "{Poss} mouth lies at {mouth}.")),
            (("discharge",), ("{Poss} average discharge is {discharge}.",)),
            (("tributaries",), ("{Subj} is fed by {tributaries} major tributaries.",)),
        ),
    ),
    "mountain": (
        _slots(
            (("country", "height"), (
                "{name} is a mountain in {country}, rising to {height}.",
                "At {height}, {name} is one of the highest peaks in {country}.",
                "{name} stands {height} tall in {country}.",
            )),
        ),
        _slots(
            (("first_ascent", "ascent_year"), (
                "{Poss} first ascent was made by {first_ascent} in {ascent_year}.",
                "{first_ascent} was the first to reach the summit of {subj}, in {ascent_year}.",
            )),
            (("prominence",), ("{Poss} topographic prominence is {prominence}.",)),
        ),
    ),
    "publisher": (
        _slots((("founder", "founded_year"), (
            "{name} is a publishing house founded by {founder} in {founded_year}.",
            "The publisher {name} was founded in {founded_year} by {founder}.",
        ))),
        _ORG_BODY + _slots(
            (("specialty",), ("{Subj} specialises in {specialty}.", "{Subj} is best known for {specialty}.")),
            (("titles",), ("{Subj} has published {titles}.", "{Poss} catalogue lists {titles}.")),
        ),
    ),
    "studio": (
        _slots((("founder", "founded_year"), (
            "{name} is a film studio founded by {founder} in {founded_year}.",
            "The film studio {name} was established in {founded_year} by {founder}.",
        ))),
        _ORG_BODY + _slots(
            (("films",), ("{Subj} has produced {films}.", "{Poss} catalogue includes {films}.")),
            (("employees",), ("{Subj} employs {employees}.", "{Subj} has a staff of {employees}.")),
        ),
    ),
    "band": (
        _slots((("founder", "founded_year"), (
            "{name} is a band formed by {founder} in {founded_year}.",
            "{founder} founded the band {name} in {founded_year}.",
        ))),
        _slots(
            (("origin",), ("{Subj} was formed in {origin}.", "The members of {subj} first met in {origin}.")),
            (("genre",), ("{Subj} plays {genre}.", "{Poss} music is usually described as {genre}.")),
            (("members",), ("{Subj} has {members} members.", "{Subj} performs as a group of {members} musicians.")),
        ),
    ),
    "university": (
        _slots((("founder", "founded_year"), (
            "{name} is a university founded in {founded_year} by {founder}.",
            "{founder} established {name}, a university, in {founded_year}.",
        ))),
        _ORG_BODY + _slots(
            (("students",), ("{Subj} has {students}.", "About {students} are enrolled at {subj}.")),
        ),
    ),
    "company": (
        _slots((("founder", "founded_year"), (
            "{name} is a company founded by {founder} in {founded_year}.",
            "The company {name} was founded in {founded_year} by {founder}.",
        ))),
        _ORG_BODY + _slots(
            (("industry",), ("{Subj} is active in {industry}.", "{Poss} main business is {industry}.")),
            (("employees",), ("{Subj} employs {employees}.", "{Subj} has a workforce of {employees}.")),
        ),
    ),
    "book": (
        _slots((("author", "year"), (
            "{name} is a book by {author}, first published in {year}.",
            "Published in {year}, {name} was written by {author}.",
            "{author} wrote {name}, which appeared in {year}.",
        ))),
        _WORK_BODY + _slots(
            (("publisher",), (
                "{Subj} was published by {publisher}.",
                "{publisher} published the first edition of {subj}.",
            )),
            (("pages",), ("{Subj} runs to {pages}.", "The first edition of {subj} had {pages}.")),
        ),
    ),
    "film": (
        _slots((("director", "year"), (
            "{name} is a film directed by {director}, released in {year}.",
            "Released in {year}, {name} was directed by {director}.",
            "{director} directed {name}, which came out in {year}.",
        ))),
        _WORK_BODY + _slots(
            (("studio",), ("{Subj} was produced by {studio}.", "{studio} produced {subj}.")),
            (("minutes",), ("{Subj} has a running time of {minutes}.", "{Subj} runs for {minutes}.")),
        ),
    ),
    "album": (
        _slots((("artist", "year"), (
            "{name} is an album by {artist}, released in {year}.",
            "{artist} released the album {name} in {year}.",
        ))),
        _slots(
            (("genre",), ("{Poss} style is usually described as {genre}.", "{Subj} is rooted in {genre}.")),
            (("tracks",), ("{Subj} contains {tracks} tracks.", "{Subj} has {tracks} tracks.")),
            (("minutes",), ("{Subj} lasts {minutes}.", "{Poss} total running time is {minutes}.")),
            (("recorded_in",), (
                "{Subj} was recorded in {recorded_in}.",
                "The sessions for {subj} took place in {recorded_in}.",
            )),
        ),
    ),
}

_PERSON_FILLERS = (
    "{Subj} kept detailed notebooks throughout {poss} working life.",
    "{Subj} struck contemporaries as patient, private and stubborn.",
    "{Poss} early years were marked by frequent travel.",
    "{Subj} rarely gave interviews and avoided public ceremonies.",
    "Several of {poss} letters survive in private collections.",
    "{Subj} was admired by younger colleagues for {poss} generosity.",
    "A small museum now displays some of {poss} personal belongings.",
    "{Subj} often spent the summer months in the countryside.",
    "Critics have debated the importance of {poss} work for many years.",
    "{Subj} wrote a short memoir that was never published.",
    "In later interviews {subj} spoke warmly of {poss} teachers.",
    "{Poss} reputation grew steadily over the following decades.",
    "{Subj} was known for a dry sense of humour.",
    "{Poss} friends remembered a careful listener and a poor cook.",
    "{Subj} took a keen interest in gardening and old maps.",
    "{Subj} disliked travelling by sea and avoided it whenever possible.",
    "{Subj} was a regular guest at the literary salons of the time.",
    "{Poss} handwriting was famously difficult to read.",
    "{Subj} corresponded with many scholars across the region.",
    "{Poss} biographers have drawn on diaries found in an attic.",
    "{Subj} was elected to several learned societies.",
    "{Poss} portrait hangs in a provincial gallery.",
)
_ORG_FILLERS = (
    "{Subj} went through a difficult period during an economic crisis.",
    "{Poss} archives are open to researchers by appointment.",
    "{Subj} has received several awards for its work.",
    "A new building was added to {poss} premises in recent years.",
    "{Subj} publishes an annual report on its activities.",
    "Former members of {subj} have gone on to found similar organisations.",
    "{Poss} logo has been redesigned several times.",
    "{Subj} supports a small foundation for young talent.",
    "The early years of {subj} were marked by financial difficulties.",
    "{Subj} has been praised for its independence.",
    "{Subj} maintains close ties with similar institutions abroad.",
    "Visitors can tour parts of {subj} on open days.",
    "{Subj} survived a long legal dispute over its name.",
    "{Poss} first offices were above a bakery.",
    "{Subj} was briefly threatened with closure but recovered.",
    "A history of {subj} was written for one of its anniversaries.",
    "{Subj} is often cited as a model for smaller organisations.",
    "{Poss} staff meet once a year for a large summer gathering.",
    "{Subj} has weathered several changes of ownership.",
    "Rivals of {subj} have often copied its methods.",
)
_WORK_FILLERS = (
    "{Subj} received mixed reviews on its first appearance.",
    "{Subj} was later reissued with additional material.",
    "{Subj} has been translated into several languages.",
    "Critics praised {poss} careful structure.",
    "{Subj} sold modestly at first but found a wider audience later.",
    "{Poss} opening has been widely discussed.",
    "{Subj} influenced a generation of younger artists.",
    "{Subj} was adapted for radio some years after its release.",
    "{Subj} is regarded by many as a minor classic.",
    "Some early drafts of {subj} survive in an archive.",
    "{Poss} ending divided audiences.",
    "{Subj} is still discussed in seminars and reading groups.",
    "{Poss} title was changed shortly before release.",
    "{Subj} caused a minor scandal when it first appeared.",
    "A sequel to {subj} was planned but never completed.",
    "{Subj} won a regional prize soon after its release.",
    "{Poss} cover design has become widely recognised.",
    "Several scenes of {subj} were cut by censors.",
    "{Subj} has appeared on many lists of favourites.",
    "Scholars have traced the influences on {subj} to folk tales.",
)
FILLERS: dict[str, tuple[_Template, ...]] = {
    **dict.fromkeys((k for k, t in KIND_TYPE.items() if t == "person"), tuple(map(_Template, _PERSON_FILLERS))),
    **dict.fromkeys((k for k, t in KIND_TYPE.items() if t == "organisation"), tuple(map(_Template, _ORG_FILLERS))),
    **dict.fromkeys((k for k, t in KIND_TYPE.items() if t == "work"), tuple(map(_Template, _WORK_FILLERS))),
    "city": tuple(map(_Template, (
        "{Subj} has a small but busy railway station.",
        "The old quarter of {subj} is built around a covered market.",
        "{Poss} winters are long and the summers mild.",
        "Many of the older houses in {subj} are built of grey stone.",
        "{Subj} hosts a weekly market on the main square.",
        "A network of narrow lanes connects the harbour district of {subj} with the centre.",
        "Local cuisine in {subj} is known for smoked fish and dark bread.",
        "Several bridges cross the canals of {poss} old town.",
        "{Subj} was badly damaged by a fire and later rebuilt.",
        "The town hall of {subj} is one of its oldest buildings.",
        "{Poss} university district is lively during term time.",
        "Tourism has grown in {subj} over recent decades.",
        "{Subj} is surrounded by vineyards and small farms.",
        "A large park lies to the west of {poss} centre.",
        "{Subj} holds a music festival every autumn.",
        "The cathedral of {subj} took more than a century to build.",
        "{Poss} harbour was once one of the busiest in the region.",
        "Trams have run through the streets of {subj} for many years.",
        "{Subj} is twinned with several towns abroad.",
        "Fog often settles over {subj} in the early morning.",
    ))),
    "country": tuple(map(_Template, (
        "{Poss} landscape ranges from coastal marshes to high plateaus.",
        "Most of the population of {subj} lives in the river valleys.",
        "{Subj} has a long tradition of choral music.",
        "Agriculture remains important in the southern provinces of {subj}.",
        "{Poss} parliament meets in a former monastery.",
        "A national railway links the major towns of {subj}.",
        "{Subj} is divided into provinces with their own councils.",
        "Winters in the highlands of {subj} are harsh.",
        "Fishing and forestry have shaped {poss} economy.",
        "{Subj} maintains friendly relations with its neighbours.",
        "{Poss} flag shows a white star on a field of green.",
        "{Subj} has a mild climate along its coast.",
        "The road network of {subj} was modernised in recent years.",
        "{Poss} national dish is a stew of beans and smoked meat.",
        "Folk dances remain popular in the villages of {subj}.",
        "{Subj} has several protected nature reserves.",
        "The constitution of {subj} has been amended many times.",
        "{Poss} northern border follows a chain of low hills.",
        "{Subj} exports timber, wool and dried fish.",
        "A large share of {poss} people speak more than one language.",
    ))),
    "river": tuple(map(_Template, (
        "{Poss} waters are used to irrigate the surrounding farmland.",
        "Several mills once stood along {poss} banks.",
        "{Subj} freezes over in the coldest winters.",
        "The valley of {subj} is known for its orchards.",
        "Boats carried timber down {subj} for centuries.",
        "Floods along {subj} were common until dikes were built.",
        "{Subj} is home to many species of freshwater fish.",
        "A footpath follows {subj} for much of its course.",
        "Herons and kingfishers nest along {poss} quieter stretches.",
        "{Poss} lower course is navigable by small barges.",
        "Several old stone bridges cross {subj}.",
        "{Subj} forms a wide delta before it ends.",
        "Anglers gather along {subj} in spring.",
        "{Poss} upper valley is narrow and steep.",
        "A hydroelectric dam was built on {subj} in the last century.",
        "Legends tell of a ferryman who once worked on {subj}.",
        "{Subj} changes colour after heavy rain in the hills.",
        "Water levels in {subj} fall sharply in late summer.",
        "{Poss} banks are lined with willows in many places.",
        "Pollution in {subj} has fallen in recent decades.",
    ))),
    "mountain": tuple(map(_Template, (
        "The summit of {subj} is covered by snow for most of the year.",
        "Several hiking trails lead to a hut below the summit of {subj}.",
        "{Poss} lower slopes are covered with pine forest.",
        "On clear days the summit of {subj} offers views across several valleys.",
        "{Subj} is popular with climbers in late summer.",
        "Rockfalls on {poss} northern face are frequent.",
        "Shepherds graze their flocks on the lower meadows of {subj}.",
        "A weather station stands near the summit ridge of {subj}.",
        "{Poss} glaciers have retreated markedly in recent decades.",
        "Local legends describe {subj} as the home of mountain spirits.",
        "{Subj} is made mostly of granite.",
        "Avalanches are a danger on {poss} eastern slopes in spring.",
        "A narrow pass crosses the ridge south of {subj}.",
        "{Subj} is often hidden in cloud in the afternoon.",
        "Wild goats can be seen on the upper slopes of {subj}.",
        "{Poss} summit cross was put up by villagers.",
        "Many climbers consider {subj} a good training peak.",
        "{Subj} appears on the coat of arms of a nearby town.",
        "The forests below {subj} are home to lynx and deer.",
        "{Poss} shape changes dramatically when seen from the north.",
    ))),
}

# How the entity is referred to when not named. One form is fixed; two are alternatives drawn per sentence.
_DESCRIPTIONS = {
    "city": "the city", "country": "the country", "river": "the river", "mountain": "the mountain",
    "publisher": "the publisher", "studio": "the studio", "band": "the band", "university": "the university",
    "company": "the company", "book": "the book", "film": "the film", "album": "the album",
}
_PERSON_PRONOUNS = (  # by gender: 0 = she, 1 = he
    {"Subj": ("She",), "subj": ("she",), "Poss": ("Her",), "poss": ("her",), "pron": ("she",)},
    {"Subj": ("He",), "subj": ("he",), "Poss": ("His",), "poss": ("his",), "pron": ("he",)},
)


@lru_cache(maxsize=None)
def _pronouns(kind: str, gender: int | None) -> dict[str, tuple[str, ...]]:
    if gender is not None:
        return _PERSON_PRONOUNS[gender]
    desc = _DESCRIPTIONS[kind]
    return {"Subj": ("It", desc.capitalize()), "subj": (desc,), "Poss": ("Its", desc.capitalize() + "'s"),
            "poss": ("its",), "pron": ("it",)}


@lru_cache(maxsize=None)
def _plain_fillers(kind: str, gender: int | None) -> tuple[tuple[str, int], ...]:
    """Fillers with pronouns filled in, and their word counts, computed once: most filler sentences are these."""
    plain = []
    for position, template in enumerate(FILLERS[kind]):
        values = {field: forms[position % len(forms)] for field, forms in _pronouns(kind, gender).items()}
        text = template.text.format_map(values)
        plain.append((text, len(text.split())))
    return tuple(plain)


# Strides coprime to each pool size: (start + k * step) % n visits a pool in a cheap random order.
_STRIDES = {n: tuple(step for step in range(1, n) if gcd(step, n) == 1) for n in {len(f) for f in FILLERS.values()}}


def _check_templates() -> None:
    """Fail at import, not in a 1M-passage run, if a template names a field it cannot fill."""
    for kind, (leads, body) in TEMPLATES.items():
        for keys, templates in (*leads, *body):
            for t in templates:
                facts = {f.removeprefix("a_") for f in t.fields} - set(_PRONOUN_FIELDS) - {"name"}
                assert facts == keys, (kind, t.text, facts ^ keys)
                assert "name" in t.fields or t.subject, (kind, t.text)  # can open a passage
        for t in FILLERS[kind]:
            assert t.subject and set(t.fields) <= set(_PRONOUN_FIELDS), (kind, t.text)


_check_templates()


@dataclass
class EntityPassages:
    passages: list[Passage]
    fact_part: dict[str, int]  # fact key -> index into passages of the passage that states it


class _Writer:
    """Fills one entity's templates: the name or a pronoun for the subject, and the spans each sentence prints."""

    def __init__(self, entity: Entity, rng):
        self.rng = rng
        self.name_span = (entity.name, entity.type)
        self.fact_spans = {key: (fact.text, fact.type) for key, fact in entity.facts.items()}
        self.values = {key: fact.text for key, fact in entity.facts.items()}
        self.values["name"] = entity.name
        for key in _ARTICLE_KEYS & entity.facts.keys():
            text = entity.facts[key].text
            self.values["a_" + key] = ("an " if text[0] in "aeiou" else "a ") + text
            self.fact_spans["a_" + key] = self.fact_spans[key]
        name = f"the {entity.name}" if entity.kind == "river" else entity.name
        capital = name[0].upper() + name[1:]
        self.named = {"Subj": capital, "subj": name, "Poss": capital + "'s", "poss": name + "'s"}
        self.pronouns = _pronouns(entity.kind, entity.gender)

    def sentence(self, template: _Template, named: bool) -> tuple[str, list[tuple[str, str]]]:
        values = self.values
        for field in template.pronoun_fields:
            forms = self.pronouns[field]
            values[field] = forms[0] if len(forms) == 1 else self.rng.choice(forms)
        subject = template.subject if named else None
        if subject:
            values[subject] = self.named[subject]
        spans = []
        for field in template.span_fields:
            if field in self.fact_spans:
                spans.append(self.fact_spans[field])
            elif field == "name" or field == subject:
                spans.append(self.name_span)
        return template.text.format_map(values), spans


def render_entity(world: World, index: int) -> EntityPassages:
    """All passages of one entity, plus which passage states each fact (questions cite that passage)."""
    entity, rng = world.entity_and_rng(index)
    present = entity.facts.keys()
    leads, body_slots = TEMPLATES[entity.kind]
    lead_keys, lead_templates = next(slot for slot in leads if slot[0] <= present)
    lead = (lead_keys, rng.choice(lead_templates))
    body = [(keys, rng.choice(templates)) for keys, templates in body_slots if keys <= present]
    rng.shuffle(body)
    num_parts = world.num_parts(index)
    chunks = [[lead, *body]] if num_parts == 1 else [[lead, *body[: len(body) // 2]], body[len(body) // 2 :]]

    pool = FILLERS[entity.kind]
    plain = _plain_fillers(entity.kind, entity.gender)
    start, step = rng.below(len(pool)), rng.choice(_STRIDES[len(pool)])

    writer = _Writer(entity, rng)
    passages, fact_part = [], {}
    for part, chunk in enumerate(chunks):
        sentences: list[tuple[str, list]] = []
        for keys, template in chunk:
            sentences.append(writer.sentence(template, named=not sentences or rng.random() < NAME_AGAIN))
            for key in keys:
                fact_part[key] = part
        words = sum(len(text.split()) for text, _ in sentences)
        target = rng.between(MIN_WORDS + 8, 100) if world.flavour else 0
        # This part's share of a random order of the pool: no flavour line repeats within an entity.
        fillers = [(start + k * step) % len(pool) for k in range(part, len(pool), num_parts)]
        while words < target and fillers:
            k = fillers.pop()
            if not sentences or rng.random() < NAME_AGAIN:
                text, spans = writer.sentence(pool[k], named=True)
                count = len(text.split())
            else:
                (text, count), spans = plain[k], []
            if words + count > MAX_WORDS:
                continue
            sentences.insert(rng.between(1, len(sentences)) if sentences else 0, (text, spans))
            words += count
        passages.append(_passage(world, entity, part, sentences))
    return EntityPassages(passages, fact_part)


def _passage(world: World, entity: Entity, part: int, sentences: list[tuple[str, list]]) -> Passage:
    seen: dict[str, str] = {}
    for _, spans in sentences:
        for text, span_type in spans:
            seen.setdefault(text, span_type)
    return Passage(
        id=str(world.passage_index(entity.index, part)),
        title=entity.name,
        text=" ".join(text for text, _ in sentences),
        entities=[{"text": text, "type": span_type} for text, span_type in seen.items()],
    )


def iter_passages(world: World, start: int = 0, stop: int | None = None) -> Iterator[Passage]:
    """Passages with index in [start, stop), in id order. Any slice equals the same slice of the full stream."""
    stop = world.num_passages if stop is None else min(stop, world.num_passages)
    if not 0 <= start <= stop:
        raise ValueError(f"bad passage range [{start}, {stop}) for a corpus of {world.num_passages}")
    position = start
    while position < stop:
        index, part = world.locate(position)
        for passage in render_entity(world, index).passages[part:]:
            if position >= stop:
                return
            yield passage
            position += 1


def generate_passages(num_passages: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[Passage]:
    """Stream the synthetic corpus of exactly ``num_passages`` passages for ``seed`` (memory stays flat)."""
    return iter_passages(build_world(seed, num_passages), start, stop)
