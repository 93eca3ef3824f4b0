"""Reading a RAMP answer written as the reconstructed passage: the text that stands where each ``[mask]`` stood.

The prompt lets the policy answer with the spans (``a | b``) or with the whole passage, masks filled in. The old
reading of the second form asked whether each gold span occurs *anywhere* in the answer, which pays full marks for
a list of candidates. Here each span is read from where its mask stands, by aligning the answer with the masked
passage the policy was shown:

* both texts are cut into tokens (runs of letters, numbers with their decimal points and thousands separators,
  abbreviations like "D.C.", single CJK characters, single punctuation marks; case-folded), each ``[mask]`` of the passage becoming a placeholder that matches nothing;
* :class:`difflib.SequenceMatcher` aligns them (longest common blocks first, never crossing);
* a mask's fill is the answer text between the answer tokens aligned with the passage tokens right before and right
  after the mask. If either neighbour was not reproduced (rewritten, left out), the mask is *unreadable*: the
  answer does not say what stands there. Masks with no passage text between them form one region, read as one fill.

Text that is aligned with nothing and lies outside every fill (a second copy of the passage, a list appended after
it) may make up at most a tenth of the passage; beyond that the whole answer is unreadable, so writing the passage
twice with different fills earns nothing. Whatever lands inside a fill is scored by the caller (with the answer
metrics' commitment guard, which gives nothing to a fill that holds more than the span).
"""

from __future__ import annotations

import math
import re
from difflib import SequenceMatcher
from typing import NamedTuple

from envs.prompts import MASK_TOKEN

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
# Abbreviations ("D.C.") and numbers ("2.5", "4,000") are one token each: cut at their dots and commas, a passage
# that ends right after a masked "2.5 million" would align its full stop with the decimal point.
_TOKEN = re.compile(rf"(?:[^\W\d_]\.){{2,}}|\d+(?:[.,]\d+)*|[{_CJK}]|[^\W\d_{_CJK}]+|\S")
# Never produced by _TOKEN (tokens are single characters or runs of word characters), so it matches nothing.
_PLACEHOLDER = "\x00mask"

# Unaligned answer text outside the fills, as a share of the passage's own tokens (and at least this many tokens).
MAX_UNALIGNED_SHARE = 0.1
MIN_UNALIGNED_ALLOWANCE = 2


class Region(NamedTuple):
    """One fill of the answer: the masks it stands for (indices, in order) and its text (None: unreadable)."""

    masks: tuple[int, ...]
    text: str | None


def read_masked_regions(answer: str, masked_passage: str) -> list[Region] | None:
    """The answer's fill for each mask (or run of adjacent masks) of ``masked_passage``, in order.

    None when the answer is not a reading of this passage at all (too much text aligned with nothing).
    """
    pieces = masked_passage.split(MASK_TOKEN)
    passage_tokens: list[str] = []
    for number, piece in enumerate(pieces):
        if number:
            passage_tokens.append(_PLACEHOLDER)
        passage_tokens += [m.group().casefold() for m in _TOKEN.finditer(piece)]
    answer_matches = list(_TOKEN.finditer(answer))
    answer_tokens = [m.group().casefold() for m in answer_matches]

    aligned = [-1] * len(passage_tokens)  # passage token -> answer token aligned with it
    blocks = SequenceMatcher(None, passage_tokens, answer_tokens, autojunk=False).get_matching_blocks()
    for block in blocks:
        for offset in range(block.size):
            aligned[block.a + offset] = block.b + offset

    regions: list[Region] = []
    filled_tokens = 0
    mask_number = 0
    position = 0
    while position < len(passage_tokens):
        if passage_tokens[position] != _PLACEHOLDER:
            position += 1
            continue
        first = position
        while position < len(passage_tokens) and passage_tokens[position] == _PLACEHOLDER:
            position += 1
        masks = tuple(range(mask_number, mask_number + position - first))
        mask_number += len(masks)
        text, tokens = _fill(answer, answer_matches, aligned, first - 1, position)
        regions.append(Region(masks, text))
        filled_tokens += tokens

    context = len(passage_tokens) - mask_number
    matched = sum(block.size for block in blocks)
    unaligned = len(answer_tokens) - matched - filled_tokens
    if unaligned > max(MIN_UNALIGNED_ALLOWANCE, math.ceil(MAX_UNALIGNED_SHARE * context)):
        return None
    return regions


def _fill(answer: str, matches: list[re.Match], aligned: list[int], before: int, after: int) -> tuple[str | None, int]:
    """The answer text between the tokens aligned with passage tokens ``before`` and ``after`` (-1 / the end of the
    passage: the answer's start / end), and how many answer tokens it holds; (None, 0) when a neighbour is missing."""
    if before < 0:
        start_token, start = 0, 0
    elif aligned[before] < 0:
        return None, 0
    else:
        start_token, start = aligned[before] + 1, matches[aligned[before]].end()
    if after >= len(aligned):
        end_token, end = len(matches), len(answer)
    elif aligned[after] < 0:
        return None, 0
    else:
        end_token, end = aligned[after], matches[aligned[after]].start()
    return answer[start:end].strip(), end_token - start_token
