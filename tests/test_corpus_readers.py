"""Corpus readers and chunking: real KILT data, every input format, malformed input, chunking properties."""

from __future__ import annotations

import bz2
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from masksearch_rl.corpus import cli as corpus_cli
from masksearch_rl.corpus.chunking import (
    Article,
    chunk_article,
    chunk_paragraphs,
    max_chunk_words,
    rechunk_passage,
    split_article,
    split_sentences,
)
from masksearch_rl.corpus.passage import Passage, split_contents
from masksearch_rl.corpus.readers import ReadStats, detect_format, read_corpus
from masksearch_rl.jsonl import BadLines, InputError

KILT_SAMPLE = Path(os.environ["MASKSEARCH_SHARED_DATA"]) / "wiki" / "kilt_sample_100.jsonl"  # tests/conftest.py


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _by_title(passages: list[Passage]) -> dict[str, list[Passage]]:
    grouped: dict[str, list[Passage]] = {}
    for passage in passages:
        grouped.setdefault(passage.title, []).append(passage)
    return grouped


# ------------------------------------------------------------------------------------------------------------
# The real KILT sample


@pytest.fixture(scope="module")
def kilt_raw() -> list[dict]:
    return [json.loads(line) for line in KILT_SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def kilt_passages(kilt_raw) -> tuple[list[Passage], BadLines, ReadStats]:
    bad, stats = BadLines(), ReadStats()
    return list(read_corpus(KILT_SAMPLE, chunk_words=100, bad=bad, stats=stats)), bad, stats


def _expected_kilt_words(record: dict) -> list[str]:
    """The words a KILT article should contribute: paragraphs after the title, no headings, no bullet markers."""
    words = []
    for paragraph in record["text"][1:]:
        if paragraph.startswith("Section::::"):
            continue
        words.extend(re.sub(r"^BULLET::::-?", "", paragraph).split())
    return words


@pytest.mark.shared_data
def test_kilt_sample_is_detected_and_every_article_read(kilt_raw, kilt_passages):
    passages, bad, stats = kilt_passages
    assert detect_format(KILT_SAMPLE) == "kilt"
    assert stats.articles == len(kilt_raw) == 99
    assert stats.passages == len(passages)
    assert bad.total == 0
    assert list(_by_title(passages)) == [record["wikipedia_title"] for record in kilt_raw]


@pytest.mark.shared_data
def test_kilt_passages_carry_their_title_and_no_markup(kilt_passages):
    passages, _, _ = kilt_passages
    for passage in passages:
        record = passage.to_json()
        assert split_contents(record["contents"]) == (passage.title, passage.text)
        assert "Section::::" not in passage.text
        assert "BULLET::::" not in passage.text
        assert len(passage.text.split()) <= max_chunk_words(100)


@pytest.mark.shared_data
def test_kilt_chunks_reproduce_each_article_in_order_with_sequential_ids(kilt_raw, kilt_passages):
    passages, _, _ = kilt_passages
    grouped = _by_title(passages)
    for record in kilt_raw:
        chunks = grouped[record["wikipedia_title"]]
        assert [p.id for p in chunks] == [f"{record['wikipedia_title']}-{i}" for i in range(len(chunks))]
        assert [w for p in chunks for w in p.text.split()] == _expected_kilt_words(record)
    assert len({p.id for p in passages}) == len(passages)


@pytest.mark.shared_data
def test_kilt_sample_sizes_are_close_to_target(kilt_passages):
    passages, _, _ = kilt_passages
    sizes = [len(p.text.split()) for p in passages]
    assert 60 <= sum(sizes) / len(sizes) <= 110


@pytest.mark.shared_data
def test_kilt_whole_articles_without_chunking(kilt_raw):
    passages = list(read_corpus(KILT_SAMPLE, chunk_words=None))
    assert [p.id for p in passages] == [f"{r['wikipedia_title']}-0" for r in kilt_raw]
    assert [p.text.split() for p in passages] == [_expected_kilt_words(r) for r in kilt_raw]


# ------------------------------------------------------------------------------------------------------------
# Each format on small fixtures


def test_flashrag_passes_through_and_cuts_only_oversized_records(tmp_path):
    long_text = " ".join(f"w{i}." for i in range(400))
    path = _write_lines(
        tmp_path / "corpus.jsonl",
        [
            json.dumps({"id": "0", "contents": '"Aaron"\nAaron is a prophet.'}),
            json.dumps({"id": 1, "title": "Moses", "contents": '"Moses"\nMoses led them.'}),
            json.dumps({"id": "2", "title": "Plain", "text": "Title and text variant."}),
            json.dumps({"id": "3", "contents": "no quoted title line"}),
            json.dumps({"id": "big", "contents": f'"Big"\n{long_text}', "entities": [{"text": "w3.", "type": "X"}]}),
        ],
    )
    assert detect_format(path) == "flashrag"
    stats = ReadStats()
    passages = list(read_corpus(path, chunk_words=100, stats=stats))
    first = [p.to_json() for p in passages[:4]]
    assert first == [
        {"id": "0", "contents": '"Aaron"\nAaron is a prophet.', "title": "Aaron"},
        {"id": "1", "contents": '"Moses"\nMoses led them.', "title": "Moses"},
        {"id": "2", "contents": '"Plain"\nTitle and text variant.', "title": "Plain"},
        {"id": "3", "contents": "no quoted title line", "title": ""},
    ]
    big = passages[4:]
    assert [p.id for p in big] == [f"big-{i}" for i in range(4)]
    assert [w for p in big for w in p.text.split()] == long_text.split()
    assert big[0].entities == [{"text": "w3.", "type": "X"}] and big[1].entities == []
    assert (stats.articles, stats.passages) == (5, 8)
    assert len(list(read_corpus(path, chunk_words=None))) == 5


def test_kilt_fixture_ids_bullets_and_sections(tmp_path):
    record = {
        "wikipedia_id": "123",
        "wikipedia_title": "Thing",
        "text": [
            "Thing\n",
            "Thing is a thing.\n",
            "Section::::Kinds.\n",
            "BULLET::::- Red one\n",
            "BULLET::::2. Blue\n",
        ],
    }
    path = _write_lines(tmp_path / "kilt.jsonl", [json.dumps(record)])
    [passage] = read_corpus(path)
    assert passage.id == "123-0"
    assert passage.contents == '"Thing"\nThing is a thing. Red one 2. Blue'


def _doc(doc_id: str, title: str, body: list[str]) -> list[str]:
    return (
        [f'<doc id="{doc_id}" url="https://en.wikipedia.org/wiki?curid={doc_id}" title="{title}">', title, ""]
        + body
        + [
            "",
            "</doc>",
        ]
    )


def test_wikiextractor_doc_mode_tree_with_bz2(tmp_path):
    _write_lines(tmp_path / "AA" / "wiki_00", _doc("12", "Anarchism", ["Anarchism is a philosophy.", "History."]))
    (tmp_path / "AB").mkdir()
    doc = "\n".join(_doc("25", "AT&amp;T", ["AT&amp;T is a &lt;company&gt;."])) + "\n"
    (tmp_path / "AB" / "wiki_00.bz2").write_bytes(bz2.compress(doc.encode("utf-8")))
    assert detect_format(tmp_path) == "wikiextractor"
    passages = list(read_corpus(tmp_path))
    assert [(p.id, p.title, p.text) for p in passages] == [
        ("12-0", "Anarchism", "Anarchism is a philosophy. History."),
        ("25-0", "AT&T", "AT&T is a <company>."),
    ]


def test_wikiextractor_json_mode_bz2_file(tmp_path):
    lines = [
        json.dumps({"id": "7", "url": "u", "title": "Seven", "text": "Seven\n\nSeven is a number.\nIt is prime."}),
        json.dumps({"id": "8", "url": "u", "title": "Eight", "text": "Eight is a number."}),
    ]
    path = tmp_path / "wiki_00.bz2"
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode("utf-8")))
    assert detect_format(path) == "wikiextractor"
    whole = list(read_corpus(path, chunk_words=None))
    assert [(p.id, p.title, p.text) for p in whole] == [
        ("7-0", "Seven", "Seven is a number.\nIt is prime."),
        ("8-0", "Eight", "Eight is a number."),
    ]


def test_masksearch_article_dir(tmp_path):
    _write_lines(tmp_path / "Paris.txt", ["Paris is the capital of France.", "", "It is on the Seine."])
    _write_lines(tmp_path / "Lyon", ["Lyon is a city."])
    assert detect_format(tmp_path) == "masksearch-dir"
    passages = list(read_corpus(tmp_path))
    assert [(p.id, p.title, p.text) for p in passages] == [
        ("Lyon-0", "Lyon", "Lyon is a city."),
        ("Paris-0", "Paris", "Paris is the capital of France. It is on the Seine."),
    ]


def test_missing_path_unknown_format_and_undetectable_file_raise_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "nope.jsonl")
    path = _write_lines(tmp_path / "plain.txt", ["just some prose", "more prose"])
    with pytest.raises(ValueError, match="unknown corpus format 'csv'"):
        read_corpus(path, fmt="csv")
    with pytest.raises(ValueError, match="cannot detect"):
        read_corpus(path)
    with pytest.raises(ValueError, match="chunk_words"):
        read_corpus(path, fmt="masksearch-dir", chunk_words=0)


# ------------------------------------------------------------------------------------------------------------
# Malformed input: good records survive, bad ones are counted at the right file:line


def test_malformed_jsonl_lines_are_counted_not_fatal(tmp_path):
    path = _write_lines(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"id": "a", "contents": '"A"\nGood one.'}),  # 1
            '{"id": "b", "contents": ',  # 2 invalid JSON
            "[1, 2, 3]",  # 3 not an object
            json.dumps({"contents": '"C"\nNo id.'}),  # 4 missing id
            json.dumps({"id": "d", "contents": '"D"\n   '}),  # 5 empty text
            json.dumps({"id": "e", "contents": ["not", "a", "string"]}),  # 6 wrong type
            json.dumps({"id": "f"}),  # 7 no contents
            "",  # 8 blank: ignored
            json.dumps({"id": "g", "contents": '"G"\nGood too.'}),  # 9
        ],
    )
    bad = BadLines()
    passages = list(read_corpus(path, fmt="flashrag", bad=bad))
    assert [p.id for p in passages] == ["a", "g"]
    assert bad.total == 6
    lines = {int(example.split(":")[1]): example for example in bad.examples}
    assert sorted(lines) == [2, 3, 4, 5, 6, 7]
    assert "invalid JSON" in lines[2]
    assert "expected a JSON object, got list" in lines[3]
    assert "'id'" in lines[4]
    assert lines[5].endswith("empty text")
    assert "'contents' must be a string" in lines[6]
    assert "missing field 'contents'" in lines[7]
    assert all(example.startswith(f"{path}:") for example in bad.examples)


def test_malformed_kilt_records(tmp_path):
    path = _write_lines(
        tmp_path / "kilt.jsonl",
        [
            json.dumps({"wikipedia_title": "Ok", "text": ["Ok", "Fine text."]}),
            json.dumps({"wikipedia_title": "Only headings", "text": ["Only headings", "Section::::History."]}),
            json.dumps({"wikipedia_title": "Bad", "text": "not a list"}),
            json.dumps({"wikipedia_title": "NoText"}),
            "not json at all",
        ],
    )
    bad = BadLines()
    assert [p.title for p in read_corpus(path, fmt="kilt", bad=bad)] == ["Ok"]
    assert bad.examples == [
        f"{path}:2: empty text",
        f"{path}:3: field 'text' must be a list of strings",
        f"{path}:4: missing field(s) 'text'",
        f"{path}:5: invalid JSON (Expecting value at column 1)",
    ]


def test_malformed_wikiextractor_docs(tmp_path):
    lines = (
        ["stray text before any doc", "more stray"]  # 1-2: counted once
        + _doc("1", "Good", ["Good text."])  # 3-8
        + ['<doc id="2" url="u" title="Unclosed">', "Unclosed", "", "lost text"]  # 9-12
        + _doc("3", "Empty", [])  # 13-17
        + ["</doc>"]  # 18: close without open
        + _doc("4", "Last", ["Last text."])  # 19-24
        + ['<doc id="5" url="u" title="Truncated">', "Truncated", "", "cut off"]  # 25-28
    )
    path = _write_lines(tmp_path / "wiki_00", lines)
    bad = BadLines()
    assert [p.title for p in read_corpus(path, fmt="wikiextractor", bad=bad)] == ["Good", "Last"]
    assert bad.examples == [
        f"{path}:1: text outside <doc>...</doc>",
        f"{path}:9: <doc> not closed before the next <doc> at line 13",
        f"{path}:13: empty text",
        f"{path}:18: </doc> without an opening <doc>",
        f"{path}:25: <doc> not closed at end of file",
    ]


def test_undecodable_lines_are_counted_and_reading_goes_on(tmp_path):
    _write_lines(tmp_path / "a_good", ["Readable article."])
    (tmp_path / "b_binary").write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    (tmp_path / "c_empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "d_good.txt").write_bytes(b"First paragraph.\nbad \xe9 byte\nThird paragraph.\n")
    bad = BadLines()
    passages = list(read_corpus(tmp_path, fmt="masksearch-dir", bad=bad))
    assert [p.title for p in passages] == ["a_good", "d_good"]
    assert "First paragraph." in passages[1].text and "Third paragraph." in passages[1].text
    assert bad.counts == {"empty text": 1, "not valid UTF-8 (byte 0xff at column 1)": 1,
                          "not valid UTF-8 (byte 0xe9 at column 5)": 1}
    assert f"{tmp_path / 'd_good.txt'}:2: not valid UTF-8 (byte 0xe9 at column 5)" in bad.examples


def _flashrag_lines(n: int) -> list[bytes]:
    return [json.dumps({"id": str(i), "contents": f'"T{i}"\nPassage number {i} text.'}).encode() + b"\n"
            for i in range(1, n + 1)]


def test_one_non_utf8_byte_skips_its_line_alone_with_its_true_line_number(tmp_path):
    lines = _flashrag_lines(2000)
    lines[1000] = lines[1000].replace(b"Passage", b"Pass\xffage")  # line 1001
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"".join(lines))
    bad = BadLines()
    ids = [p.id for p in read_corpus(path, fmt="flashrag", chunk_words=None, bad=bad)]
    assert ids == [str(i) for i in range(1, 2001) if i != 1001]
    assert bad.total == 1 and bad.examples[0].startswith(f"{path}:1001: not valid UTF-8 (byte 0xff")


def test_a_utf8_bom_keeps_the_first_record(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(_flashrag_lines(3)))
    bad = BadLines()
    assert detect_format(path) == "flashrag"
    assert [p.id for p in read_corpus(path, chunk_words=None, bad=bad)] == ["1", "2", "3"] and bad.total == 0


@pytest.mark.parametrize("suffix", [".gz", ".bz2"])
def test_truncated_or_corrupt_compressed_input_is_an_error(tmp_path, suffix):
    import gzip

    compress = gzip.compress if suffix == ".gz" else bz2.compress
    whole = b"".join(_flashrag_lines(2000))
    truncated = tmp_path / f"corpus.jsonl{suffix}"
    truncated.write_bytes(compress(whole)[:-200])
    read = []
    with pytest.raises(InputError, match=re.escape(str(truncated)) + r": cannot be read past line \d+"):
        for passage in read_corpus(truncated, fmt="flashrag", chunk_words=None):
            read.append(passage)
    assert len(read) < 2000  # what came before the cut may have been read; the error says where it stopped

    garbage = tmp_path / f"other{suffix}"
    garbage.write_bytes(b"not compressed at all")
    with pytest.raises(InputError, match=re.escape(str(garbage))):
        list(read_corpus(garbage, fmt="flashrag"))
    (tmp_path / "tree").mkdir()  # also inside a directory tree: the whole read stops
    truncated.rename(tmp_path / "tree" / f"wiki_00{suffix}")
    with pytest.raises(InputError):
        list(read_corpus(tmp_path / "tree", fmt="flashrag"))


# ------------------------------------------------------------------------------------------------------------
# Chunking


def test_chunking_prefers_paragraph_then_sentence_boundaries():
    para_a = " ".join(["alpha"] * 59) + " end."
    sentences = ["Beta " + " ".join(["beta"] * 28) + " stop." for _ in range(4)]
    chunks = chunk_paragraphs([para_a, " ".join(sentences)], chunk_words=100)
    # A is 60 words (over half a chunk), so it closes at its paragraph boundary; B's 120 words split by sentence.
    assert [len(c) for c in chunks] == [60, 90, 30]
    assert all(c[-1] in ("end.", "stop.") for c in chunks)


def test_abbreviations_and_initials_do_not_end_sentences():
    text = "J. R. R. Tolkien met Dr. Smith in St. Louis. Then he left."
    assert split_sentences(text) == ["J. R. R. Tolkien met Dr. Smith in St. Louis.", "Then he left."]
    assert split_sentences('He moved to the USA. "Then" he left! (and) came back.') == [
        "He moved to the USA.",
        '"Then" he left! (and) came back.',
    ]
    chunks = chunk_paragraphs([text], chunk_words=10)
    assert [" ".join(c) for c in chunks] == ["J. R. R. Tolkien met Dr. Smith in St. Louis.", "Then he left."]


def test_short_tail_is_merged_and_long_sentence_is_cut_evenly():
    assert [len(c) for c in chunk_paragraphs([" ".join(["w"] * 250)], chunk_words=100)] == [84, 83, 83]
    assert [len(c) for c in chunk_paragraphs([" ".join(["a"] * 100), "tail words here."], chunk_words=100)] == [103]


def test_rechunk_keeps_fitting_passages_as_they_are():
    passage = Passage("p1", "T", " ".join(["w"] * 150))
    assert rechunk_passage(passage, 100) == [passage]
    assert rechunk_passage(passage, None) == [passage]
    assert [p.id for p in rechunk_passage(passage, 50)] == ["p1-0", "p1-1", "p1-2"]


# Words that exercise the sentence rules (ends, abbreviations, initials, quotes, caseless scripts) plus random ones.
_VOCABULARY = [
    "the",
    "The",
    "end.",
    "Dr.",
    "J.",
    "e.g.",
    "USA.",
    "why?",
    "Yes!",
    '"Quoted."',
    "(aside)",
    "é",
    "日本語。",
]
_word = st.one_of(
    st.sampled_from(_VOCABULARY),
    st.text(alphabet=st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")), min_size=1, max_size=6),
)
_paragraph = st.lists(_word, max_size=120).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(paragraphs=st.lists(_paragraph, max_size=12), chunk_words=st.integers(min_value=1, max_value=60))
def test_chunking_properties(paragraphs, chunk_words):
    article = Article("Title", paragraphs, id="doc")
    passages = chunk_article(article, chunk_words)
    words = [w for p in paragraphs for w in p.split()]
    assert [w for p in passages for w in p.text.split()] == words
    sizes = [len(p.text.split()) for p in passages]
    assert all(0 < size <= max_chunk_words(chunk_words) for size in sizes)
    assert all(size >= chunk_words // 4 for size in sizes[:-1])
    assert [p.id for p in passages] == [f"doc-{i}" for i in range(len(passages))]
    assert all(p.title == "Title" for p in passages)
    assert chunk_article(article, chunk_words) == passages  # deterministic
    assert split_article(article, None)[0].text.split() == words
    for paragraph in paragraphs:
        assert " ".join(split_sentences(paragraph)).split() == paragraph.split()


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# One-line junk: no line breaks (what Python's text reader splits on), not blank, not a JSON object.
_junk_line = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1, max_size=40
).filter(lambda line: line.strip() and not _is_json_object(line))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.one_of(st.tuples(st.just("good"), _paragraph.filter(str.strip)), _junk_line), max_size=25))
def test_jsonl_reader_keeps_good_records_and_locates_every_bad_line(rows):
    lines, good_ids, bad_lines = [], [], []
    for lineno, row in enumerate(rows, start=1):
        if isinstance(row, tuple):
            lines.append(json.dumps({"id": f"p{lineno}", "contents": f'"T"\n{row[1]}'}))
            good_ids.append(f"p{lineno}")
        else:
            lines.append(row)
            bad_lines.append(lineno)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_lines(Path(tmp) / "corpus.jsonl", lines)
        bad = BadLines(max_examples=100)
        assert [p.id for p in read_corpus(path, fmt="flashrag", chunk_words=None, bad=bad)] == good_ids
    assert [int(example.split(":")[1]) for example in bad.examples] == bad_lines


# ------------------------------------------------------------------------------------------------------------
# CLI


def _cli_app() -> typer.Typer:
    """A top-level app with only our commands registered (the real one also loads other domains' CLIs)."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    corpus_cli.register(app)
    return app


def test_cli_convert_writes_passages_and_reports_bad_lines(tmp_path):
    app = _cli_app()

    source = _write_lines(
        tmp_path / "kilt.jsonl",
        [json.dumps({"wikipedia_title": "Ok", "text": ["Ok", "Fine text here."]}), "{broken"],
    )
    out = tmp_path / "out" / "passages.jsonl"
    result = CliRunner().invoke(app, ["corpus", "convert", "--input", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": "Ok-0", "contents": '"Ok"\nFine text here.', "title": "Ok"}
    ]
    assert "wrote 1 passages" in result.output and "read 1 articles" in result.output
    assert f"{source}:2: invalid JSON" in result.output

    missing = CliRunner().invoke(app, ["corpus", "convert", "--input", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    nothing = _write_lines(tmp_path / "bad.jsonl", ["{broken"])
    empty = CliRunner().invoke(app, ["corpus", "convert", "-i", str(nothing), "-f", "kilt", "-o", str(out)])
    assert empty.exit_code == 1 and "left untouched" in empty.output
    assert out.read_text().count("\n") == 1  # the earlier output survived


def test_cli_convert_names_a_bad_byte_and_fails_on_a_truncated_gz(tmp_path):
    import gzip

    app = _cli_app()
    lines = _flashrag_lines(2000)
    lines[1000] = b"\x80" + lines[1000]
    source = tmp_path / "corpus.jsonl"
    source.write_bytes(b"".join(lines))
    out = tmp_path / "passages.jsonl"
    result = CliRunner().invoke(app, ["corpus", "convert", "-i", str(source), "-o", str(out), "--no-chunk"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 1999
    assert "wrote 1,999 passages" in result.output and "skipped 1 bad record(s)" in result.output
    assert f"{source}:1001: not valid UTF-8 (byte 0x80 at column 1)" in result.output

    truncated = tmp_path / "corpus.jsonl.gz"
    truncated.write_bytes(gzip.compress(b"".join(_flashrag_lines(2000)))[:-300])
    before = out.read_bytes()
    result = CliRunner().invoke(app, ["corpus", "convert", "-i", str(truncated), "-o", str(out), "--no-chunk"])
    assert result.exit_code == 1
    assert f"{truncated}: cannot be read past line" in result.output and "left untouched" in result.output
    assert out.read_bytes() == before
