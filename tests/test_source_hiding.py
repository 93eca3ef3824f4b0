"""Hiding a RAMP item's source passage from search: the exclusion rule (property tests), the RL parquet rows that
carry it (pandas, pyarrow, Hugging Face ``datasets`` and verl's RLHFDataset read them back), and the whole path on a
synthetic world: row -> our retrieval server over HTTP -> the source (and its duplicate) no longer comes back."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from envs.search_client import row_exclusion
from masksearch_rl.corpus.passage import Passage, format_contents
from masksearch_rl.jsonl import read_jsonl
from masksearch_rl.ramp.export import ExportConfig, export_parquet, item_to_row
from masksearch_rl.ramp.source import source_exclusion, source_text
from masksearch_rl.retrieval.exclusion import MIN_QUOTE_CHARS, ExclusionError, SearchExclusion, normalize
from masksearch_rl.retrieval.types import Hit

# ------------------------------------------------------------------------------------------- the rule itself
_words = st.lists(st.text(alphabet=string.ascii_letters + string.digits + ",.;'", min_size=1, max_size=8),
                  min_size=1, max_size=40)
_spaces = st.text(alphabet=" \t\n", min_size=1, max_size=3)


def _respell(words: list[str], data) -> str:
    """The same words with other whitespace between them and letters in another case."""
    text = ""
    for i, word in enumerate(words):
        text += (data.draw(_spaces) if i else data.draw(st.text(alphabet=" \n", max_size=2)))
        text += "".join(c.swapcase() if data.draw(st.booleans()) else c for c in word)
    return text


@settings(max_examples=200, deadline=None)
@given(words=_words, data=st.data(), prefix=st.text(max_size=30), suffix=st.text(max_size=30))
def test_a_hit_holding_the_passage_in_any_spacing_or_case_is_excluded(words, data, prefix, suffix):
    passage = " ".join(words)
    exclusion = SearchExclusion(ids=("source",), texts=(passage,))
    hit_text = _respell(words, data)
    assert exclusion.excludes(Hit("other-id", format_contents("Any title", hit_text), 1.0))  # a duplicate
    assert exclusion.excludes(Hit("other-id", prefix + " " + hit_text + " " + suffix, 1.0))  # a page holding it
    assert exclusion.excludes(Hit("source", "whatever the text", 1.0))  # the source's own id


@settings(max_examples=200, deadline=None)
@given(
    passage=st.text(alphabet="abcdefghij ", min_size=1).filter(str.strip),
    other=st.text(alphabet="klmnopqrst .,\n"),
    hit_id=st.text(max_size=5),
)
def test_unrelated_text_is_never_excluded(passage, other, hit_id):
    exclusion = SearchExclusion(ids=("source",), texts=(passage,))
    assert not exclusion.excludes(Hit("x" + hit_id, other, 1.0))
    assert exclusion.keep([Hit("a", other, 1.0), Hit("source", passage, 0.5), Hit("b", other, 0.1)], 5) == \
        [Hit("a", other, 1.0), Hit("b", other, 0.1)]


@settings(max_examples=200, deadline=None)
@given(words=_words, data=st.data())
def test_a_snippet_quoting_the_passage_is_excluded_only_from_min_quote_chars(words, data):
    passage = " ".join(words)
    assume("..." not in passage)  # an ellipsis inside the quote would split it into shorter pieces
    start = data.draw(st.integers(0, len(passage)))
    end = data.draw(st.integers(start, len(passage)))
    quote = passage[start:end]
    exclusion = SearchExclusion(texts=(passage,))
    hit = Hit("https://example.org", f"Mar 5, 2021 ... {quote} ...", 1.0)  # a web snippet: date, excerpt, ellipses
    long_enough = len(normalize(quote)) >= MIN_QUOTE_CHARS
    if long_enough:
        assert exclusion.excludes(hit)
    elif normalize(passage) not in normalize(hit.text):
        assert not exclusion.excludes(hit)


def test_json_form_and_its_errors():
    exclusion = SearchExclusion(ids=("7",), texts=("Some passage.",))
    assert exclusion.to_json() == {"ids": ["7"], "texts": ["Some passage."]}
    assert SearchExclusion.from_json(exclusion.to_json()) == exclusion
    assert SearchExclusion.from_json(None) is None and SearchExclusion.from_json({"ids": [], "texts": []}) is None
    import numpy as np  # parquet rows read through pandas hold numpy arrays

    assert SearchExclusion.from_json({"ids": np.array(["7"], dtype=object), "texts": ("Some passage.",)}) == exclusion
    for bad, field in [("7", ""), ({"ids": "7"}, "ids"), ({"ids": [7]}, "ids.0"), ({"texts": [" \n"]}, "texts.0"),
                       ({"text": ["x"]}, "text")]:
        with pytest.raises(ExclusionError) as err:
            SearchExclusion.from_json(bad)
        assert err.value.field == field
    assert exclusion.fetch_k(3) > 3 + len(exclusion.ids)


# --------------------------------------------------------------------------------------- the item's source text
def test_source_text_is_the_indexed_text_also_when_ramp_put_the_subject_in_front():
    from masksearch_rl.ramp.items import item_text

    for passage in (Passage("p1", "Ovrin (river)", "It flows north for 80 kilometres."),
                    Passage("p2", "Ovrin", "Ovrin flows north for 80 kilometres.")):
        item = {"id": passage.id, "title": passage.title, "passage": item_text(passage, prepend_title=True)}
        assert source_text(item) == passage.text
        assert source_exclusion(item) == SearchExclusion(ids=(passage.id,), texts=(passage.text,))
    assert item_text(Passage("p1", "Ovrin (river)", "It flows."), True) == "Ovrin: It flows."  # what is undone


# ------------------------------------------------------------------------------------------ world and export
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic world, plus a passage that never names its subject (RAMP puts the title in front) and an exact
    duplicate of it under another id; RAMP items; a BM25 index of the lot."""
    from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
    from masksearch_rl.retrieval.index import build_index, load_index
    from masksearch_rl.synthetic import write_synthetic_corpus

    root = tmp_path_factory.mktemp("hiding")
    write_synthetic_corpus(root, num_passages=80, num_questions=1, seed=5, progress=False)
    corpus = root / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    text = ("It was built in 1854 by the engineer Tarvo Quelle. The bridge spans the Oskaril river in nine arches "
            "and carries the old post road to Vemmerdal.")
    unnamed = {"id": "unnamed", "title": "Quelle Bridge", "contents": format_contents("Quelle Bridge", text)}
    duplicate = {"id": "unnamed-copy", "title": "Quelle Bridge (copy)",
                 "contents": format_contents("Quelle Bridge (copy)", text.upper())}
    corpus.write_text("\n".join([json.dumps(unnamed), *lines, json.dumps(duplicate)]) + "\n")
    generate_ramp(RampConfig(corpus=str(corpus), out=str(root / "items.jsonl"), limit=25, progress=False))
    items = read_jsonl(root / "items.jsonl")
    retriever = load_index(build_index(corpus, root / "index", kind="bm25", show_progress=False))
    return {"root": root, "items": items, "retriever": retriever}


def test_rows_carry_the_exclusion_only_when_asked(world):
    item = next(i for i in world["items"] if i["id"] == "unnamed")
    assert item["passage"].startswith("Quelle Bridge: ")  # the title was put in front
    off = item_to_row(item, 0, "train", ExportConfig())
    on = item_to_row(item, 0, "train", ExportConfig(hide_source=True))
    assert off["extra_info"]["tools_kwargs"] == {"search": {"create_kwargs": {"item_id": "unnamed"}}}
    [hit] = [h for h in world["retriever"].search(["Quelle Bridge Oskaril"], 3)[0] if h.id == "unnamed"]
    assert on["extra_info"]["tools_kwargs"] == {"search": {"create_kwargs": {
        "item_id": "unnamed", "exclude": {"ids": ["unnamed"], "texts": [hit.text]}}}}
    assert {k: v for k, v in on.items() if k != "extra_info"} == {k: v for k, v in off.items() if k != "extra_info"}


@pytest.mark.parametrize("hide_source", [False, True])
def test_parquet_round_trips_through_pandas_pyarrow_datasets_and_verl(world, tmp_path, hide_source):
    import datasets
    import pandas as pd
    import pyarrow.parquet as pq

    result = export_parquet(world["root"] / "items.jsonl", tmp_path, ExportConfig(val_fraction=0.2,
                                                                                  hide_source=hide_source))
    by_id = {str(i["id"]): i for i in world["items"]}
    assert result["train"] + result["val"] == len(by_id)
    for split in ("train", "val"):
        path = tmp_path / f"{split}.parquet"
        schema = pq.read_schema(path).field("extra_info").type
        create = schema.field("tools_kwargs").type.field("search").type.field("create_kwargs").type
        assert [create.field(i).name for i in range(create.num_fields)] == \
            (["item_id", "exclude"] if hide_source else ["item_id"])
        frames = {"pandas": pd.read_parquet(path).to_dict("records"),
                  "datasets": list(datasets.load_dataset("parquet", data_files=str(path))["train"])}
        for reader, rows in frames.items():
            assert rows
            for row in rows:
                kwargs = row["extra_info"]["tools_kwargs"]["search"]["create_kwargs"]
                expected = source_exclusion(by_id[kwargs["item_id"]]) if hide_source else None
                assert row_exclusion(kwargs) == expected, reader
    # verl's own dataset (what the trainer feeds the agent loop with) hands over the row's tools_kwargs
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create({"filter_overlong_prompts": False, "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(str(tmp_path / "train.parquet"), tokenizer=None, config=config)
    sample = dataset[0]
    kwargs = sample["tools_kwargs"]["search"]["create_kwargs"]
    assert row_exclusion(kwargs) == (source_exclusion(by_id[kwargs["item_id"]]) if hide_source else None)


def test_ramp_export_cli_hides_the_source_only_when_asked(world, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from masksearch_rl.cli import app

    for flag, expected in (([], False), (["--hide-source"], True)):
        out = tmp_path / str(expected)
        result = CliRunner().invoke(app, ["ramp", "export", "--items", str(world["root"] / "items.jsonl"),
                                          "--out-dir", str(out), *flag])
        assert result.exit_code == 0, result.output
        rows = pd.read_parquet(out / "train.parquet")["extra_info"]
        assert {"exclude" in row["tools_kwargs"]["search"]["create_kwargs"] for row in rows} == {expected}


# ------------------------------------------------------------------------------- end to end, over real HTTP
async def test_pasting_the_masked_text_no_longer_returns_the_source(world, tmp_path):
    """Without hiding, searching an item's masked text returns its source passage first (the problem); with the row's
    exclusion, sent to our server over HTTP, neither the source nor its duplicate comes back, and topk hits do."""
    import datasets

    from masksearch_rl.retrieval.client import RetrievalServerBackend
    from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server

    export_parquet(world["root"] / "items.jsonl", tmp_path, ExportConfig(val_fraction=0.0, hide_source=True))
    rows = list(datasets.load_dataset("parquet", data_files=str(tmp_path / "train.parquet"))["train"])
    by_id = {str(i["id"]): i for i in world["items"]}
    topk = 3
    with running_server(create_app(world["retriever"], ServerConfig())) as url:
        backend = RetrievalServerBackend(url, timeout_s=120)
        try:
            queries = [by_id[row["extra_info"]["id"]]["query"] for row in rows]
            plain = await backend.search(queries, topk)
            hidden = [(await backend.search([query], topk, row_exclusion(
                row["extra_info"]["tools_kwargs"]["search"]["create_kwargs"])))[0]
                for query, row in zip(queries, rows)]
        finally:
            await backend.aclose()
    ids = [row["extra_info"]["id"] for row in rows]
    assert sum(hits[0].id == item_id for hits, item_id in zip(plain, ids)) >= 0.9 * len(ids)
    for item_id, hits in zip(ids, hidden):
        assert len(hits) == topk and item_id not in [h.id for h in hits]
    unnamed = hidden[ids.index("unnamed")]
    assert "unnamed-copy" in [h.id for h in plain[ids.index("unnamed")]]  # the duplicate ranks high unhidden
    assert not {"unnamed", "unnamed-copy"} & {h.id for h in unnamed}


async def test_local_backend_hides_the_source(world):
    from masksearch_rl.retrieval.types import LocalBackend

    item = next(i for i in world["items"] if i["id"] == "unnamed")
    backend = LocalBackend(world["retriever"])
    plain = (await backend.search([item["query"]], 3))[0]
    hidden = (await backend.search([item["query"]], 3, source_exclusion(item)))[0]
    assert [h.id for h in plain[:2]] == ["unnamed", "unnamed-copy"]
    assert len(hidden) == 3 and not {"unnamed", "unnamed-copy"} & {h.id for h in hidden}


# ------------------------------------------------------------------------------------------- the SFT oracle
def test_oracle_with_hidden_source_never_shows_it_and_keeps_only_items_whose_spans_were_shown(world, tmp_path):
    from dataclasses import asdict

    from typer.testing import CliRunner

    from envs.prompts import information_block
    from envs.search_client import results_text
    from masksearch_rl.cli import app
    from masksearch_rl.sft.oracle import HIDDEN_THOUGHTS, OracleConfig, oracle_trajectories, write_oracle_sft
    from reward.format import check_format

    items, retriever = world["items"], world["retriever"]
    config = OracleConfig(topk=3, max_info_tokens=120, max_searches=3, hide_source=True)
    records = oracle_trajectories(items, retriever, config)
    unhidden = oracle_trajectories(items, retriever, OracleConfig(**{**asdict(config), "hide_source": False}))
    assert sum(r["found"] for r in unhidden) >= 0.9 * len(items)  # the source is easy to find when not hidden
    for item, record in zip(items, records):
        exclusion = source_exclusion(item)
        infos = [m["content"] for m in record["messages"] if m["role"] == "tool"]
        assert len(infos) == len(record["queries"]) and record["source_rank"] is None and record["hide_source"]
        for query, info in zip(record["queries"], infos):
            hits = exclusion.keep(retriever.search([query], exclusion.fetch_k(3))[0], 3)
            assert info == information_block(results_text(hits, config.max_info_tokens)).strip()
            assert not any(exclusion.excludes(h) for h in hits) and item["id"] not in {h.id for h in hits}
        shown = normalize(" ".join(infos))
        assert record["found"] == all(normalize(m) in shown for m in item["masks"])
        assert record["keep"] == record["found"]
        final = HIDDEN_THOUGHTS["found" if record["found"] else "not_found"].split("{")[0]
        assert final in record["messages"][-1]["content"]
        assert check_format(record["response"], num_masks=item["num_masks"]).ok
    assert 0 < sum(r["found"] for r in records) < len(records)  # some facts are stated elsewhere, not all

    summary = write_oracle_sft(world["root"] / "items.jsonl", world["root"] / "index", tmp_path / "api", config)
    assert summary["found"] == summary["kept"] == sum(r["found"] for r in records)
    assert summary["source_rank"] == {} and summary["config"]["hide_source"] is True
    result = CliRunner().invoke(app, ["sft", "oracle", "--ramp", str(world["root"] / "items.jsonl"), "--index",
                                      str(world["root"] / "index"), "--out", str(tmp_path / "cli"), "--max-searches",
                                      "3", "--max-info-tokens", "120", "--hide-source"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["found"] == summary["found"]
