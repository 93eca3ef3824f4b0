"""The synthetic world: a seeded, fictional encyclopedia, the project's default corpus.

Why fictional: every name is invented, so a model can only answer from what it retrieves, never from memory;
that makes RAMP and multi-hop QA on this corpus a clean test of searching. Quickstart, tests, RAMP generation,
the CPU training run and the benchmarks all use it.

Properties: deterministic for a seed (byte-identical output), different seeds give different worlds, names are
unique across the world, any slice of the passage stream can be produced on its own, memory is flat from 100 to
millions of passages (see ``world.py`` for how).

Public API::

    build_world(seed, num_passages) -> World                      # instant; entities are computed on demand
    generate_passages(num_passages, seed, start=0, stop=None) -> Iterator[Passage]
    iter_passages(world, start=0, stop=None) -> Iterator[Passage]
    render_entity(world, index) -> EntityPassages                # passages + which one states each fact
    generate_questions(world, n, seed, hops=(1, 2, 3, 4)) -> list[dict]
    write_synthetic_corpus(out_dir, num_passages, num_questions, seed) -> dict   # corpus.jsonl + questions.jsonl

Passages are ``masksearch_rl.corpus.passage.Passage`` records (``to_json()``: ``{"id", "contents", "title",
"entities"}``) with ids "0".."N-1"; the question record format is documented in ``questions.py``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from masksearch_rl.synthetic.questions import generate_questions
from masksearch_rl.synthetic.render import EntityPassages, generate_passages, iter_passages, render_entity
from masksearch_rl.synthetic.world import Entity, Fact, World, build_world

__all__ = [
    "Entity", "EntityPassages", "Fact", "World", "build_world", "generate_passages", "generate_questions",
    "iter_passages", "render_entity", "write_synthetic_corpus",
]

CORPUS_FILE = "corpus.jsonl"
QUESTIONS_FILE = "questions.jsonl"


def write_synthetic_corpus(
    out_dir: str | os.PathLike,
    num_passages: int,
    num_questions: int,
    seed: int = 0,
    hops: tuple[int, ...] = (1, 2, 3, 4),
    progress: bool = True,
    flavour: bool = True,
) -> dict[str, Any]:
    """Write ``out_dir/corpus.jsonl`` and ``out_dir/questions.jsonl``, each atomically; return a summary.
    ``flavour=False``: facts only, no fact-free padding sentences (:class:`World`).

    Questions use the same seed as the world. A kill leaves either no file or a complete one, so a re-run
    simply starts over (generation is deterministic, so the result is the same).
    """
    from tqdm import tqdm

    from masksearch_rl.jsonl import atomic_path, write_jsonl

    out = Path(out_dir)
    world = build_world(seed, num_passages, flavour)
    passages = tqdm(iter_passages(world), total=num_passages, desc="passages", unit="p", disable=not progress,
                    mininterval=1.0)
    # Same bytes as write_jsonl, but one encoder for all lines: json.dumps(ensure_ascii=False) builds one per
    # call, which is ~5% of the time at 1M passages.
    encode = json.JSONEncoder(ensure_ascii=False).encode
    written = 0
    with atomic_path(out / CORPUS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for passage in passages:
            handle.write(encode(passage.to_json()) + "\n")
            written += 1
    questions = generate_questions(world, num_questions, seed, hops=hops)
    write_jsonl(out / QUESTIONS_FILE, questions)
    per_hops = Counter(q["hops"] for q in questions)
    return {
        "seed": seed,
        "passages": written,
        "entities": world.num_entities,
        "entities_per_type": world.entities_per_type(),
        "entities_per_kind": world.entities_per_kind(),
        "questions": len(questions),
        "questions_per_hops": {str(h): per_hops[h] for h in sorted(per_hops)},
        "corpus_path": str(out / CORPUS_FILE),
        "questions_path": str(out / QUESTIONS_FILE),
    }
