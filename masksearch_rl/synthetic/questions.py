"""Multi-hop questions over the synthetic world, with the passages and searches that answer them.

A k-hop question walks k entities: it starts at an entity named in the question, follows k-1 relations (each
written as a nested noun phrase: "the founder of the publisher of <Book>"), then asks for one fact of the last
entity. Answering it takes exactly k lookups, because passages state only an entity's own facts. Every record
is checkable: ``supporting_ids[j]`` is the passage of ``chain[j]`` that states the fact followed, so it contains
the name ``chain[j+1]`` (or, for the last one, the answer verbatim).

Record::

    {"id": "q17", "question": "In which year was the founder of Kelovar Press born?", "answer": "1873",
     "hops": 2, "chain": ["Kelovar Press", "Ilse Dravimon"], "supporting_ids": ["1203", "88"],
     "oracle_queries": ["Kelovar Press", "Ilse Dravimon"], "relations": ["founder", "birth_date"],
     "answer_type": "year"}

``oracle_queries`` is what a perfect agent would search, one query per hop (the entity names along the chain);
oracle trajectories replay it. ``relations`` lists the fact keys followed, the last one being the one asked.

Public API::

    generate_questions(world, n, seed, hops=(1, 2, 3, 4)) -> list[dict]   # hop counts round-robin over `hops`
"""

from __future__ import annotations

import logging
from functools import lru_cache

from masksearch_rl.synthetic.render import EntityPassages, render_entity
from masksearch_rl.synthetic.world import Fact, World, rng_for

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 200  # random walks tried per question before giving up on it (only tiny worlds run out)

# Relation key -> (noun phrase used inside a longer question, question asking for the related entity).
RELATIONS = {
    "born_in": ("the birthplace of {x}", "Where was {x} born?"),
    "died_in": ("the place of death of {x}", "Where did {x} die?"),
    "educated_at": ("the university attended by {x}", "Which university did {x} attend?"),
    "member_of": ("the band {x} performed with", "Which band was {x} a member of?"),
    "spouse": ("the spouse of {x}", "Who was {x} married to?"),
    "lived_in": ("the city {x} settled in", "In which city did {x} settle?"),
    "capital_of": ("the country whose capital is {x}", "Of which country is {x} the capital?"),
    "country": ("the country containing {x}", "In which country is {x}?"),
    "river": ("the river flowing through {x}", "Which river flows through {x}?"),
    "mayor": ("the mayor of {x}", "Who is the mayor of {x}?"),
    "capital": ("the capital of {x}", "What is the capital of {x}?"),
    "leader": ("the head of state of {x}", "Who is the head of state of {x}?"),
    "source": ("the country where {x} rises", "In which country does {x} rise?"),
    "mouth": ("the city at the mouth of {x}", "Near which city does {x} reach the sea?"),
    "first_ascent": ("the first person to climb {x}", "Who first climbed {x}?"),
    "founder": ("the founder of {x}", "Who founded {x}?"),
    "origin": ("the home city of {x}", "In which city was {x} formed?"),
    "headquarters": ("the home city of {x}", "In which city is {x} based?"),
    "author": ("the author of {x}", "Who wrote {x}?"),
    "director": ("the director of {x}", "Who directed {x}?"),
    "artist": ("the band behind {x}", "Which band recorded {x}?"),
    "publisher": ("the publisher of {x}", "Which publisher published {x}?"),
    "studio": ("the studio behind {x}", "Which studio produced {x}?"),
    "setting": ("the setting of {x}", "In which city is {x} set?"),
    "recorded_in": ("the city where {x} was recorded", "Where was {x} recorded?"),
}

# Attribute key -> ((question, answer form), ...); "year" answers only the year of a date.
ATTRIBUTES = {
    "occupation": (("What was the profession of {x}?", "text"),),
    "birth_date": (("When was {x} born?", "text"), ("In which year was {x} born?", "year")),
    "death_date": (("When did {x} die?", "text"), ("In which year did {x} die?", "year")),
    "children": (("How many children did {x} have?", "text"),),
    "languages": (("How many languages did {x} speak?", "text"),),
    "population": (("What is the population of {x}?", "text"),),
    "founded_year": (("In which year was {x} founded?", "text"),),
    "elevation": (("At what elevation does {x} lie?", "text"),),
    "area": (("What is the area of {x}?", "text"),),
    "known_for": (("For which attraction is {x} known?", "text"),),
    "government": (("What form of government does {x} have?", "text"),),
    "established": (("When was {x} established?", "text"), ("In which year was {x} established?", "year")),
    "currency": (("What is the currency of {x}?", "text"),),
    "length": (("How long is {x}?", "text"),),
    "discharge": (("What is the average discharge of {x}?", "text"),),
    "tributaries": (("How many major tributaries does {x} have?", "text"),),
    "height": (("How high is {x}?", "text"),),
    "ascent_year": (("In which year was {x} first climbed?", "text"),),
    "prominence": (("What is the topographic prominence of {x}?", "text"),),
    "specialty": (("What does {x} specialise in?", "text"),),
    "titles": (("How many titles has {x} published?", "text"),),
    "films": (("How many films has {x} produced?", "text"),),
    "employees": (("How many people does {x} employ?", "text"),),
    "students": (("How many students does {x} have?", "text"),),
    "industry": (("In which industry does {x} work?", "text"),),
    "genre": (("Which genre is {x} associated with?", "text"),),
    "members": (("How many members does {x} have?", "text"),),
    "year": (("In which year did {x} come out?", "text"),),
    "tracks": (("How many tracks does {x} have?", "text"),),
    "minutes": (("How long is {x}?", "text"),),
    "pages": (("How many pages does {x} have?", "text"),),
}


def generate_questions(world: World, n: int, seed: int, hops: tuple[int, ...] = (1, 2, 3, 4)) -> list[dict]:
    """``n`` distinct questions; question i has ``hops[i % len(hops)]`` hops, so every hop count is covered.

    Deterministic for ``(world, seed)``, and a prefix of a longer list for the same arguments. Fewer than ``n``
    come back only when a tiny world has run out of distinct questions (logged).
    """
    if not hops or any(not 1 <= h <= 8 for h in hops):
        raise ValueError(f"hops must be a non-empty tuple of integers in 1..8, got {hops!r}")

    @lru_cache(maxsize=4096)  # hubs recur across questions; bounded so memory stays flat
    def rendered(index: int) -> EntityPassages:
        return render_entity(world, index)

    questions: list[dict] = []
    seen: set[str] = set()
    for number in range(n):
        rng = rng_for(seed, number)
        num_hops = hops[number % len(hops)]
        for _ in range(MAX_ATTEMPTS):
            record = _walk(world, rng, num_hops, rendered)
            if record is not None and record["question"] not in seen:
                seen.add(record["question"])
                record = {"id": f"q{number}", **record}
                questions.append(record)
                break
        else:
            logger.warning("no new %d-hop question found for q%d after %d attempts", num_hops, number, MAX_ATTEMPTS)
    return questions


def _walk(world: World, rng, num_hops: int, rendered) -> dict | None:
    """One random walk of ``num_hops`` entities; None on a dead end (no unvisited relation to follow)."""
    chain = [rng.below(world.num_entities)]
    keys: list[str] = []
    entity = world.entity(chain[0])
    for _ in range(num_hops - 1):
        options = [f for f in entity.facts.values() if f.key in RELATIONS and f.target not in chain]
        if not options:
            return None
        fact = rng.choice(options)
        keys.append(fact.key)
        chain.append(fact.target)
        entity = world.entity(fact.target)
    finals = [f for f in entity.facts.values() if f.key in ATTRIBUTES or (f.key in RELATIONS and f.target not in chain)]
    if not finals:
        return None
    final: Fact = rng.choice(finals)
    keys.append(final.key)

    mention = world.name(chain[0])
    if world.kind(chain[0]) == "river":
        mention = "the " + mention
    for key in keys[:-1]:
        mention = RELATIONS[key][0].format(x=mention)
    if final.key in RELATIONS:
        question, answer, answer_type = RELATIONS[final.key][1], final.text, final.type
    else:
        question, form = rng.choice(ATTRIBUTES[final.key])
        answer, answer_type = (final.text.split()[-1], "year") if form == "year" else (final.text, final.type)
    names = [world.name(index) for index in chain]
    supporting = [
        str(world.passage_index(index, rendered(index).fact_part[key])) for index, key in zip(chain, keys)
    ]
    return {
        "question": question.format(x=mention),
        "answer": answer,
        "hops": num_hops,
        "chain": names,
        "supporting_ids": supporting,
        "oracle_queries": list(names),
        "relations": keys,
        "answer_type": answer_type,
    }
