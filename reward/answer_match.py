"""Answer matching: SQuAD-style normalisation and EM / F1 / token recall / cover-EM, for QA and RAMP.

One implementation shared by the RL reward and the evaluation harness, so training and reported numbers never
drift apart. Definitions:

* ``normalize_answer``: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace
  (the SQuAD v1.1 evaluation script's normalisation, in the same order).
* ``exact_match``: normalised strings are equal.
* ``f1_score``: SQuAD v1.1 token F1 over the multiset of normalised tokens (0 when nothing overlaps; as in the
  official script this includes the degenerate case of two empty answers).
* ``token_recall``: the share of gold tokens (multiset) found in the prediction — the MaskSearch paper's metric.
* ``cover_exact_match``: the normalised gold occurs inside the normalised prediction. By default the match must
  fall on token boundaries ("10" does not cover "1000"); ``word_boundary=False`` gives the plain substring test
  some QA papers use.

With several gold aliases every metric takes its own maximum over the aliases (as SQuAD does).

RAMP answers list the masked spans in order, ``span 1 | span 2``; :func:`score_spans` scores them position by
position and averages over the masks. A long answer without any separator is read as the reconstructed passage:
each span is read from where its mask stands (reward/passage_reading.py) and scored like a listed span.

Why RAMP spans (and the RL reward's QA answers) are scored with a *commitment guard*: token recall, the paper's
metric, pays for every gold token an answer contains, so "Paris Lyon London 1889 Eiffel ..." earns full marks for
every mask. A span that holds a token its gold lacks earns nothing (:func:`score_answer`'s ``max_extra_tokens``); a
part of the gold still earns its share of recall. More parts than masks earn nothing either.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

from envs.prompts import ANSWER_SEPARATOR
from reward.passage_reading import read_masked_regions

METRICS = ("em", "f1", "recall", "cover_em")

# A bare "|" splits spans; the surrounding spaces of ANSWER_SEPARATOR are optional when reading model output.
SPAN_DELIMITER = ANSWER_SEPARATOR.strip()

# Answers with no separator and at least this many words are read as a reconstructed paragraph.
DEFAULT_PARAGRAPH_MIN_WORDS = 12

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_ARTICLE_WORDS = frozenset(("a", "an", "the"))


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower, strip punctuation, strip articles, collapse whitespace."""
    return " ".join(_normalized_tokens(text))


def _normalized_tokens(text: str) -> list[str]:
    """The tokens of ``normalize_answer(text)``: scoring needs both, and the joined string splits back to these."""
    text = _PUNCT.sub("", text.lower())
    tokens = text.split()
    if "".join(tokens).isalnum():
        # Every token is made of word characters (regex \w minus "_", which is punctuation), so the official
        # \b(a|an|the)\b removal is exactly "drop the tokens a/an/the" -- and much cheaper than the regex.
        if _ARTICLE_WORDS.isdisjoint(tokens):
            return tokens
        return [token for token in tokens if token not in _ARTICLE_WORDS]
    return _ARTICLES.sub(" ", text).split()


class MatchScores(NamedTuple):
    """The four answer-match metrics for one prediction (each in [0, 1])."""

    em: float = 0.0
    f1: float = 0.0
    recall: float = 0.0
    cover_em: float = 0.0

    def get(self, metric: str) -> float:
        if metric not in METRICS:
            raise ValueError(f"unknown answer metric {metric!r}; choose one of {METRICS}")
        return getattr(self, metric)


ZERO = MatchScores()
EXACT = MatchScores(1.0, 1.0, 1.0, 1.0)
# Two answers that both normalise to "": an exact match (and so covered) with F1 0, as in the official script.
EXACT_EMPTY = MatchScores(em=1.0, cover_em=1.0)
COVER_ONLY = MatchScores(cover_em=1.0)  # a plain-substring cover without a common token ("10" inside "1000")


class _Gold(NamedTuple):
    norm: str  # normalize_answer(gold)
    num_tokens: int
    counts: tuple[tuple[str, int], ...]  # each distinct normalised token and how often it occurs


@lru_cache(maxsize=1 << 16)
def _normalized_gold(gold: str) -> _Gold:
    # Gold answers repeat across the n rollouts of a prompt: normalise and count each once.
    tokens = _normalized_tokens(gold)
    counts: dict[str, int] = {}
    for token in tokens:
        counts[token] = counts.get(token, 0) + 1
    return _Gold(" ".join(tokens), len(tokens), tuple(counts.items()))


def _match(
    pred_norm: str, pred_tokens: list[str], gold: str, word_boundary: bool, max_extra: int | None = None
) -> MatchScores:
    """The four metrics against one gold answer; ``pred_tokens`` is ``pred_norm.split()``.

    ``max_extra`` (the commitment guard, see :func:`score_answer`): a prediction with more tokens than that which
    the gold lacks scores zero on every metric.
    """
    gold_norm, gold_length, gold_counts = _normalized_gold(gold)
    if pred_norm == gold_norm:
        # Same tokens: overlap = both lengths, so precision = recall = F1 = 1 and the gold is covered.
        return EXACT if gold_norm else EXACT_EMPTY
    # Size of the multiset intersection, what SQuAD computes with Counter &: sum over gold tokens of the min count.
    same = 0
    for token, count in gold_counts:
        found = pred_tokens.count(token)
        same += found if found < count else count
    if max_extra is not None and (len(pred_tokens) - same > max_extra or not same):
        return ZERO  # tokens the gold lacks beyond the allowance (a list, padding, a guess beside the answer)
    if not same:
        # Nothing in common (F1 = recall = 0). Covered on token boundaries is impossible then, as the gold's tokens
        # would be common; an empty gold is covered only by an exact match; the plain substring test can pass.
        if word_boundary or not gold_norm or gold_norm not in pred_norm:
            return ZERO
        return COVER_ONLY
    if gold_norm not in pred_norm:  # necessary for either cover test, and cheap
        cover = 0.0
    elif word_boundary:
        cover = 1.0 if f" {gold_norm} " in f" {pred_norm} " else 0.0
    else:
        cover = 1.0
    precision = same / len(pred_tokens)
    recall = same / gold_length
    f1 = 2 * precision * recall / (precision + recall)
    return MatchScores(0.0, f1, recall, cover)


def _best_match(
    pred_norm: str, pred_tokens: list[str], aliases: Sequence[str], word_boundary: bool, max_extra: int | None = None
) -> MatchScores:
    """Each metric's maximum over the gold aliases (an already normalised prediction)."""
    if len(aliases) == 1:
        return _match(pred_norm, pred_tokens, str(aliases[0]), word_boundary, max_extra)
    scores = [_match(pred_norm, pred_tokens, str(alias), word_boundary, max_extra) for alias in aliases]
    if EXACT in scores:
        return EXACT  # every metric is at most 1: the maximum of each column is 1
    return MatchScores(*(max(column) for column in zip(*scores, strict=True)))


def _aliases(gold: str | Iterable[str]) -> Sequence[str]:
    """One gold answer or its aliases, as a non-empty sequence (items other than strings are read with ``str``)."""
    if isinstance(gold, str):
        return (gold,)
    aliases = gold if isinstance(gold, (list, tuple)) else list(gold)
    if not aliases:
        raise ValueError("gold answer has no aliases")
    return aliases


def score_answer(
    prediction: str, gold: str | Iterable[str], *, word_boundary: bool = True, max_extra_tokens: int | None = None
) -> MatchScores:
    """All four metrics of ``prediction`` against one gold answer or a list of aliases (max per metric).

    ``max_extra_tokens`` is the *commitment guard* the RL reward uses: against an alias, a prediction holding more
    than that many normalised tokens the alias lacks (multiset) scores zero on every metric. Token recall alone pays
    for every gold token a prediction contains, so a list of candidates earns full recall; with the guard at 0 a
    prediction earns recall only for a part of the gold it commits to ("Eiffel" for "Gustave Eiffel": 0.5), and
    nothing once it adds a word of its own. ``None`` (the default) gives the plain SQuAD-style metrics that
    evaluation reports.
    """
    if isinstance(gold, (list, tuple)) and gold:
        aliases: Sequence[str] = gold  # the usual shape, taken as it is (see _aliases)
    else:
        aliases = _aliases(gold)
    text = prediction.strip()
    for alias in aliases:
        if type(alias) is str and alias == text:
            # Shortcut, no normalisation: the same string normalises the same, so this alias is an exact match and
            # every metric takes its maximum (1; or, for an alias that normalises to "", the prediction has no
            # tokens either and no alias can beat (1, 0, 0, 1)).
            return EXACT if _normalized_gold(alias).norm else EXACT_EMPTY
    pred_tokens = _normalized_tokens(prediction)
    if len(aliases) == 1:  # (what _best_match does first, without the extra call)
        return _match(" ".join(pred_tokens), pred_tokens, str(aliases[0]), word_boundary, max_extra_tokens)
    return _best_match(" ".join(pred_tokens), pred_tokens, aliases, word_boundary, max_extra_tokens)


def exact_match(prediction: str, gold: str | Iterable[str]) -> float:
    return score_answer(prediction, gold).em


def f1_score(prediction: str, gold: str | Iterable[str]) -> float:
    return score_answer(prediction, gold).f1


def token_recall(prediction: str, gold: str | Iterable[str]) -> float:
    return score_answer(prediction, gold).recall


def cover_exact_match(prediction: str, gold: str | Iterable[str], *, word_boundary: bool = True) -> float:
    return score_answer(prediction, gold, word_boundary=word_boundary).cover_em


# ---------------------------------------------------------------------------------------------------- RAMP spans


def split_spans(answer: str) -> list[str]:
    """``"a | b |c"`` -> ``["a", "b", "c"]`` (spaces around the bar optional)."""
    return [part.strip() for part in answer.split(SPAN_DELIMITER)]


def is_paragraph_answer(answer: str, num_masks: int, min_words: int = DEFAULT_PARAGRAPH_MIN_WORDS) -> bool:
    """A multi-mask answer written as the reconstructed passage: no separator and at least ``min_words`` words."""
    return num_masks > 1 and SPAN_DELIMITER not in answer and len(answer.split()) >= min_words


class SpanScores(NamedTuple):
    """Mean metrics over the masks, the per-mask scores, and how the answer was read.

    ``mode`` is ``"aligned"`` (one part per mask), ``"paragraph"`` (the answer is the reconstructed passage, each
    span read where its mask stands) or ``"mismatch"`` (another number of parts: fewer are matched by position and
    missing masks score 0; more than there are masks score 0 throughout, as a list of guesses).
    """

    mean: MatchScores
    per_span: tuple[MatchScores, ...]
    mode: str


# The commitment guard's default for RAMP spans (see score_answer): a span earns nothing once it holds a token the
# gold span lacks.
DEFAULT_SPAN_EXTRA_TOKENS = 0


def score_spans(
    answer: str,
    gold_spans: Sequence[str | Iterable[str]],
    *,
    masked_passage: str | None = None,
    allow_paragraph: bool = True,
    paragraph_min_words: int = DEFAULT_PARAGRAPH_MIN_WORDS,
    word_boundary: bool = True,
    max_extra_tokens: int | None = DEFAULT_SPAN_EXTRA_TOKENS,
) -> SpanScores:
    """Score a RAMP answer against the masked spans (each a string or a list of aliases), averaged over masks.

    ``masked_passage`` (the item's ``query``) lets an answer written as the reconstructed passage be read: without
    it such an answer scores 0. ``max_extra_tokens`` is the commitment guard for each span (None: off, the plain
    metrics, which pay for lists of candidates).
    """
    per_span, mode = score_each_span(
        answer, gold_spans, allow_paragraph, paragraph_min_words, word_boundary, masked_passage, max_extra_tokens
    )
    return SpanScores(mean_scores(per_span), tuple(per_span), mode)


def score_each_span(
    answer: str,
    gold_spans: Sequence[str | Iterable[str]],
    allow_paragraph: bool = True,
    paragraph_min_words: int = DEFAULT_PARAGRAPH_MIN_WORDS,
    word_boundary: bool = True,
    masked_passage: str | None = None,
    max_extra_tokens: int | None = DEFAULT_SPAN_EXTRA_TOKENS,
) -> tuple[list[MatchScores], str]:
    """:func:`score_spans` before averaging: the scores of each mask and the mode (the reward needs no more)."""
    n = len(gold_spans)
    if n == 0:
        raise ValueError("a RAMP item needs at least one gold span")
    # (the usual answer has a separator: no need to count its words to see it is no paragraph)
    paragraph = (
        allow_paragraph and SPAN_DELIMITER not in answer and len(answer.split()) >= paragraph_min_words
    )
    if paragraph and n > 1:
        return _paragraph_scores(answer, gold_spans, masked_passage, word_boundary, max_extra_tokens), "paragraph"
    # split_spans without its strip (normalisation ignores surrounding whitespace)
    parts = answer.split(SPAN_DELIMITER)
    if len(parts) > n:
        return [ZERO] * n, "mismatch"  # more answers than masks: a list of guesses earns nothing
    per_span = [
        score_answer(part, gold, word_boundary=word_boundary, max_extra_tokens=max_extra_tokens)
        for part, gold in zip(parts, gold_spans)
    ]
    if len(per_span) < n:
        per_span += [ZERO] * (n - len(per_span))
        return per_span, "mismatch"
    if paragraph and masked_passage is not None:  # one mask: the answer may be its span or the whole passage
        whole = _paragraph_scores(answer, gold_spans, masked_passage, word_boundary, max_extra_tokens)
        if whole[0].recall > per_span[0].recall:
            return whole, "paragraph"
    return per_span, "aligned"


def _paragraph_scores(
    answer: str,
    gold_spans: Sequence[str | Iterable[str]],
    masked_passage: str | None,
    word_boundary: bool,
    max_extra_tokens: int | None,
) -> list[MatchScores]:
    """Each mask's score for an answer written as the passage: its fill, read where the mask stands, against its
    gold (a run of adjacent masks: the run's fill against their golds joined). 0 where the fill cannot be read."""
    n = len(gold_spans)
    regions = read_masked_regions(answer, masked_passage) if masked_passage is not None else None
    if regions is None or sum(len(region.masks) for region in regions) != n:
        return [ZERO] * n
    per_span = [ZERO] * n
    for masks, text in regions:
        if not text:
            continue
        if len(masks) == 1:
            gold = gold_spans[masks[0]]
        else:
            gold = " ".join(_aliases(gold_spans[i])[0] for i in masks)
        scores = score_answer(text, gold, word_boundary=word_boundary, max_extra_tokens=max_extra_tokens)
        for i in masks:
            per_span[i] = scores
    return per_span


def mean_scores(scores: Sequence[MatchScores]) -> MatchScores:
    """Each metric's mean over the masks (``sum(column) / n``, the order of the masks kept)."""
    n = len(scores)
    if n and scores.count(EXACT) == n:
        return EXACT  # every mask exact, the usual case for a good policy: n times 1.0, divided by n, is 1.0
    em, f1, recall, cover_em = map(sum, zip(*scores))
    return MatchScores(em / n, f1 / n, recall / n, cover_em / n)
