"""Turning proposed spans into a RAMP item: validate, choose how many, pick which, mask, and check it round-trips.

The invariants every item satisfies (tests check them on real and random passages):

* each mask occurs exactly once in the passage, on word boundaries, within one sentence, not at the very start, and
  masks never overlap;
* masks are listed in order of appearance and drawn without replacement;
* ``num_masks == len(masks) == query.count("[mask]")``;
* putting the masks back into the ``[mask]`` slots in order gives the passage exactly.

The authors' script drew spans *with* replacement (so the same span could be "masked" twice while only one
``[mask]`` appeared) and trusted spans that occur several times; both produce items whose counts don't match.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from envs.prompts import MASK_TOKEN, RAMP_INSTRUCTION
from masksearch_rl.ramp.extractors import Span, detect_language, is_cjk
from masksearch_rl.ramp.sentences import crosses_sentence

K_DISTRIBUTIONS = ("paper", "uniform", "max_available")
WEIGHTINGS = ("paper", "uniform")


@dataclass(frozen=True)
class MaskingConfig:
    """How many spans to mask and which.

    ``k_dist``: ``"paper"`` (the default; the paper draws k at random, 0 < k < 5: k uniform over
    1..min(max_masks, candidates), so every curriculum stage gets data), ``"uniform"`` (the same rule under its
    plain name), ``"max_available"`` (the rule in the authors' script: 1 candidate -> 1, 2 -> 1 or 2, 3 -> 3,
    4+ -> 4, i.e. as many as available up to ``max_masks``; on Wikipedia ~80% of items then have k = 4), or
    explicit weights for k = 1, 2, ... such as ``"0.4,0.3,0.2,0.1"`` (renormalised over the feasible k).
    ``weighting``: ``"paper"`` (longer spans more likely: weight = words, or characters for Chinese; numbers get the
    largest weight) or ``"uniform"``. PPL masking (see ppl.py) replaces sampling by hardest-first selection.
    """

    max_masks: int = 4
    k_dist: str = "paper"
    weighting: str = "paper"
    instruction: str = RAMP_INSTRUCTION
    max_span_chars: int = 80

    def __post_init__(self) -> None:
        if self.max_masks < 1:
            raise ValueError(f"max_masks must be >= 1, got {self.max_masks}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.k_dist not in K_DISTRIBUTIONS:
            parse_k_weights(self.k_dist)  # raises with a clear message

    @property
    def k_weights(self) -> list[float] | None:
        return None if self.k_dist in K_DISTRIBUTIONS else parse_k_weights(self.k_dist)


def parse_k_weights(spec: str) -> list[float]:
    """``"0.4,0.3,0.2,0.1"`` -> weights for k = 1..4."""
    try:
        weights = [float(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"k_dist must be one of {K_DISTRIBUTIONS} or comma-separated weights for k=1,2,..., got {spec!r}"
        ) from None
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"k_dist weights must be non-negative with a positive sum, got {spec!r}")
    return weights


@dataclass(frozen=True)
class Candidate:
    """A usable span with its (unique) position in the passage."""

    text: str
    type: str
    start: int
    end: int


# --------------------------------------------------------------------------------------------------------------
# Validation


def find_all(text: str, span: str) -> list[int]:
    """Start offsets of every occurrence of ``span`` in ``text``, overlapping ones included."""
    starts, index = [], text.find(span)
    while index >= 0:
        starts.append(index)
        index = text.find(span, index + 1)
    return starts


def _word_char(char: str) -> bool:
    # CJK text has no spaces between words, so CJK characters never make a boundary "partial".
    return (char.isalnum() or char == "_") and (char.isascii() or not is_cjk(char))


def on_word_boundaries(text: str, start: int, end: int) -> bool:
    """True unless the span cuts a word: e.g. "America" inside "American"."""
    if start > 0 and _word_char(text[start - 1]) and _word_char(text[start]):
        return False
    if end < len(text) and _word_char(text[end - 1]) and _word_char(text[end]):
        return False
    return True


def title_forms(title: str) -> set[str]:
    """The title and its base without a parenthesised qualifier: "Mercury (planet)" -> {.., "mercury"}."""
    title = title.strip()
    return {form.casefold() for form in (title, title.split(" (")[0].strip()) if form}


def validate_candidates(
    text: str, spans: Sequence[Span], title: str = "", max_span_chars: int = 80
) -> tuple[list[Candidate], Counter]:
    """Keep the proposals that can be masked; returns them in order of appearance and the rejects by reason."""
    rejects: Counter = Counter()
    titles = title_forms(title)
    first_visible = len(text) - len(text.lstrip())
    seen: set[str] = set()
    candidates: list[Candidate] = []
    for span in spans:
        value = span.text.strip()
        if not value:
            rejects["empty"] += 1
        elif value in seen:
            rejects["duplicate"] += 1
        elif len(value) > max_span_chars:
            rejects["too_long"] += 1
        elif value.casefold() in titles:
            rejects["is_title"] += 1
        elif MASK_TOKEN in value:
            rejects["contains_mask_token"] += 1
        else:
            starts = find_all(text, value)
            if not starts:
                rejects["not_in_passage"] += 1
            elif len(starts) > 1:
                rejects["repeated_in_passage"] += 1
            elif not on_word_boundaries(text, starts[0], starts[0] + len(value)):
                rejects["partial_word"] += 1
            elif crosses_sentence(text, starts[0], starts[0] + len(value)):
                rejects["crosses_sentence"] += 1  # "D.C. He": the end of one sentence and the start of the next
            elif starts[0] <= first_visible:
                rejects["at_passage_start"] += 1  # a passage must not start with [mask]
            else:
                candidates.append(Candidate(value, span.type, starts[0], starts[0] + len(value)))
        seen.add(value)
    candidates.sort(key=lambda c: c.start)
    return candidates, rejects


# --------------------------------------------------------------------------------------------------------------
# Choosing k and the spans

_NUMERIC = re.compile(r"[\d.,%\s-]*\d[\d.,%\s-]*")


def is_numeric(span: str) -> bool:
    return bool(_NUMERIC.fullmatch(span))


def choose_k(n_candidates: int, config: MaskingConfig, rng: random.Random) -> int:
    """How many spans to mask in a passage with ``n_candidates`` usable spans (0 when there are none)."""
    top = min(n_candidates, config.max_masks)
    if top <= 0:
        return 0
    if config.k_dist in ("paper", "uniform"):
        return rng.randint(1, top)
    if config.k_dist == "max_available":
        return rng.randint(1, 2) if top == 2 else top
    weights = (config.k_weights or [])[:top]
    if sum(weights) <= 0:
        return top  # the configured distribution puts no mass on feasible k: mask as many as we can
    return rng.choices(range(1, len(weights) + 1), weights=weights, k=1)[0]


def span_weights(candidates: Sequence[Candidate], scheme: str, language: str = "en") -> list[float]:
    """Sampling weights. ``paper``: length in words (characters for Chinese); numbers get the largest weight."""
    if scheme == "uniform":
        return [1.0] * len(candidates)
    if scheme != "paper":
        raise ValueError(f"unknown weighting {scheme!r}")

    def length(span: str) -> float:
        return float(len(span.replace(" ", ""))) if language == "zh" else float(len(span.split()))

    numeric = [is_numeric(c.text) for c in candidates]
    lengths = [length(c.text) for c, num in zip(candidates, numeric) if not num]
    top = max(lengths, default=1.0)
    return [top if num else length(c.text) for c, num in zip(candidates, numeric)]


def _overlaps(a: Candidate, b: Candidate) -> bool:
    return a.start < b.end and b.start < a.end


def sample_spans(
    candidates: Sequence[Candidate], weights: Sequence[float], k: int, rng: random.Random
) -> list[Candidate]:
    """Draw up to ``k`` spans without replacement, proportional to ``weights``; a drawn span removes the candidates
    it overlaps. Returned in order of appearance (fewer than k only when overlaps leave too few)."""
    pool = list(zip(candidates, weights))
    chosen: list[Candidate] = []
    while pool and len(chosen) < k:
        index = rng.choices(range(len(pool)), weights=[w for _, w in pool], k=1)[0]
        picked = pool[index][0]
        chosen.append(picked)
        pool = [(c, w) for c, w in pool if not _overlaps(c, picked)]
    return sorted(chosen, key=lambda c: c.start)


def hardest_spans(candidates: Sequence[Candidate], scores: Sequence[float], k: int) -> list[Candidate]:
    """The ``k`` highest-scoring non-overlapping spans (ties: earlier first), in order of appearance."""
    ranked = sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i].start))
    chosen: list[Candidate] = []
    for i in ranked:
        if len(chosen) == k:
            break
        if not any(_overlaps(candidates[i], c) for c in chosen):
            chosen.append(candidates[i])
    return sorted(chosen, key=lambda c: c.start)


# --------------------------------------------------------------------------------------------------------------
# Masking and restoring


def mask_text(text: str, chosen: Sequence[Candidate]) -> str:
    """Replace each chosen span (non-overlapping, any order) by the mask token."""
    pieces, cursor = [], 0
    for cand in sorted(chosen, key=lambda c: c.start):
        if cand.start < cursor:
            raise ValueError(f"overlapping masks at offset {cand.start}")
        if text[cand.start : cand.end] != cand.text:
            raise ValueError(f"span {cand.text!r} is not at offset {cand.start}")
        pieces += [text[cursor : cand.start], MASK_TOKEN]
        cursor = cand.end
    pieces.append(text[cursor:])
    return "".join(pieces)


def restore_text(masked: str, masks: Sequence[str]) -> str:
    """Inverse of :func:`mask_text`: fill the mask tokens with ``masks`` in order."""
    parts = masked.split(MASK_TOKEN)
    if len(parts) != len(masks) + 1:
        raise ValueError(f"{len(parts) - 1} mask tokens but {len(masks)} masks")
    out = [parts[0]]
    for mask, part in zip(masks, parts[1:]):
        out += [mask, part]
    return "".join(out)


def has_mask_token(text: str) -> bool:
    """Passages that already contain the token (in any case) would break the count, so they are dropped."""
    return MASK_TOKEN.casefold() in text.casefold()


def select_masks(
    text: str,
    candidates: Sequence[Candidate],
    config: MaskingConfig,
    rng: random.Random,
    scores: Sequence[float] | None = None,
    language: str | None = None,
) -> list[Candidate]:
    """Choose k, then the spans: hardest-first when PPL ``scores`` are given, else weighted sampling."""
    k = choose_k(len(candidates), config, rng)
    if k == 0:
        return []
    if scores is not None:
        return hardest_spans(candidates, scores, k)
    weights = span_weights(candidates, config.weighting, language or detect_language(text))
    return sample_spans(candidates, weights, k, rng)
