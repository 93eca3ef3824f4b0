"""Resumable JSONL output: a kill's torn last line is cut and nothing else is; a bad line before the end stops the
job with ``file:line`` and leaves the file as it was; the error log forgets ids that later succeeded."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masksearch_rl.jsonl import CorruptOutputError, ErrorLog, ResumableJsonlWriter, read_jsonl


def _lines(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


@given(st.lists(st.text(max_size=30), min_size=1, max_size=8), st.data())
@settings(max_examples=80, deadline=None)
def test_a_torn_last_line_is_cut_and_every_complete_record_kept(tmp_path_factory, texts, data):
    path = tmp_path_factory.mktemp("torn") / "out.jsonl"
    records = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    complete = _lines(records[:-1])
    last = _lines(records[-1:])
    cut = data.draw(st.integers(min_value=1, max_value=len(last) - 2), label="bytes of the last record written")
    path.write_bytes(complete + last[:cut])  # a kill mid-write: the newline is always the last byte written
    with ResumableJsonlWriter(path) as writer:
        assert writer.done == {r["id"] for r in records[:-1]}
        assert writer.repaired_bytes == cut
        assert writer.write(records[-1]) and not writer.write(records[0])
    assert read_jsonl(path) == records


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(_lines([{"id": "a"}]) + b'{"id": "b"}')
    with ResumableJsonlWriter(path) as writer:
        assert writer.done == {"a", "b"} and writer.repaired_bytes == 0
        writer.write({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


@pytest.mark.parametrize("bad", [b"{not json\n", b'{"id": "x", "cut here\n', b"\x00\x00\x00\n"])
def test_a_bad_line_before_the_end_raises_with_file_and_line_and_touches_nothing(tmp_path, bad):
    path = tmp_path / "out.jsonl"
    content = _lines([{"id": "a"}, {"id": "b"}]) + bad + _lines([{"id": "c"}, {"id": "d"}]) + b'{"id": "e", "x'
    path.write_bytes(content)
    with pytest.raises(CorruptOutputError, match=re.escape(f"{path}:3: unparseable line")):
        ResumableJsonlWriter(path)
    assert path.read_bytes() == content  # not even the torn tail is cut: nothing is written before the check


def test_a_bad_last_line_with_its_newline_is_not_a_torn_write(tmp_path):
    path = tmp_path / "out.jsonl"
    content = _lines([{"id": "a"}]) + b"{garbage}\n"
    path.write_bytes(content)
    with pytest.raises(CorruptOutputError, match=re.escape(f"{path}:2:")):
        ResumableJsonlWriter(path)
    assert path.read_bytes() == content


def test_blank_lines_and_records_without_the_key_are_not_corruption(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(_lines([{"id": "a"}]) + b"\n  \n" + _lines([{"other": 1}, {"id": "b"}]))
    with ResumableJsonlWriter(path) as writer:
        assert writer.done == {"a", "b"} and writer.repaired_bytes == 0


def test_error_log_keeps_only_ids_that_are_still_failing(tmp_path):
    out = tmp_path / "out.jsonl"
    errors_path = tmp_path / "out.jsonl.errors.jsonl"
    errors_path.write_text('{"id": "old-fixed", "kind": "backend", "error": "down"}\nnot json at all\n')
    with ResumableJsonlWriter(out) as writer, ErrorLog(errors_path, writer.done) as errors:
        errors.add("a", "backend", "HTTP 503")
        errors.add("b", "task_error", "KeyError: 'x'", "Traceback ...")
        errors.add("b", "backend", "timed out")
        writer.write({"id": "a"})  # a later attempt succeeded
        writer.write({"id": "old-fixed"})
    assert errors.pending == 1
    kept = errors_path.read_text().splitlines()
    assert kept[0] == "not json at all"  # unreadable lines are left for a person, never dropped
    entries = [json.loads(line) for line in kept[1:]]
    assert [(e["id"], e["kind"]) for e in entries] == [("b", "task_error"), ("b", "backend")]
    assert entries[0]["traceback"] == "Traceback ..."
