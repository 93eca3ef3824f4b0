"""``masksearch-rl index build`` and ``masksearch-rl search``: build an index directory, query it from the shell.

Heavy libraries (numba, faiss, torch) are imported inside the commands so ``masksearch-rl --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from masksearch_rl.retrieval.types import DEFAULT_TOPK

index_app = typer.Typer(help="Build search indexes (BM25, dense, hybrid) over a passage JSONL.", no_args_is_help=True)


@index_app.command("build")
def build(
    corpus: Annotated[Path, typer.Option("--corpus", "-c", help="Passage JSONL: {\"id\", \"contents\"} per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory (replaced atomically when done).")],
    kind: Annotated[str, typer.Option("--kind", "-k", help="bm25, dense or hybrid.")] = "bm25",
    preset: Annotated[str | None, typer.Option(
        help="BM25 preset: 'pyserini' (k1 0.9, b 0.4, Porter stemmer, Lucene's tokens: results close to "
             "pyserini/Search-R1's BM25); options given beside it override it.")] = None,
    k1: Annotated[float | None, typer.Option(help="BM25 k1.")] = None,
    b: Annotated[float | None, typer.Option(help="BM25 b.")] = None,
    stemmer: Annotated[str | None, typer.Option(help="BM25 PyStemmer language ('' = none).")] = None,
    stopwords: Annotated[str | None, typer.Option(help="BM25 stopword list, e.g. en ('' = none).")] = None,
    model: Annotated[str | None, typer.Option(help="Dense: sentence-transformers model (HF id or local dir).")] = None,
    index_type: Annotated[str | None, typer.Option(help="Dense: flat, hnsw or ivf.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Dense: encoding batch size.")] = None,
    device: Annotated[str | None, typer.Option(help="Dense: cpu, cuda, ...")] = None,
    query_prefix: Annotated[str | None, typer.Option(help="Dense: text put before queries (default by model).")] = None,
    passage_prefix: Annotated[str | None, typer.Option(help="Dense: text put before passages.")] = None,
    hnsw_m: Annotated[int | None, typer.Option(help="HNSW: links per node.")] = None,
    ef_construction: Annotated[int | None, typer.Option(help="HNSW: build-time beam.")] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW: search-time beam.")] = None,
    nlist: Annotated[int | None, typer.Option(help="IVF: number of lists (default ~4*sqrt(N)).")] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF: lists visited per query.")] = None,
    rrf_k: Annotated[float | None, typer.Option(help="Hybrid: reciprocal-rank-fusion k.")] = None,
    bm25_weight: Annotated[float | None, typer.Option(help="Hybrid: weight of the BM25 ranking.")] = None,
    dense_weight: Annotated[float | None, typer.Option(help="Hybrid: weight of the dense ranking.")] = None,
) -> None:
    """Build an index directory from a passage JSONL; prints build time, passage count and peak memory."""
    import resource
    import time

    from masksearch_rl.retrieval.index import build_index, read_manifest

    given = {
        "preset": preset, "k1": k1, "b": b, "stemmer": stemmer, "stopwords": stopwords, "model": model, "index_type": index_type,
        "batch_size": batch_size, "device": device, "query_prefix": query_prefix, "passage_prefix": passage_prefix,
        "hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search, "nlist": nlist,
        "nprobe": nprobe, "rrf_k": rrf_k, "bm25_weight": bm25_weight, "dense_weight": dense_weight,
    }
    options = {name: value for name, value in given.items() if value is not None}
    started = time.perf_counter()
    try:
        build_index(corpus, out, kind=kind, **options)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    elapsed = time.perf_counter() - started
    manifest = read_manifest(out)
    # Linux reports KiB; the tokenising worker processes are children (their own peak, not added to this one's)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    bad = manifest["corpus"]["bad_lines"]
    typer.echo(f"built {kind} index at {out}")
    typer.echo(f"  passages:   {manifest['num_passages']:,} ({bad['total']} bad lines skipped)")
    typer.echo(f"  build time: {elapsed:.1f} s")
    typer.echo(f"  peak RSS:   {peak_mb:,.0f} MiB (largest worker process: {children_mb:,.0f} MiB)")
    for example in bad["examples"][:5]:
        typer.echo(f"  skipped {example}")


def search(
    queries: Annotated[list[str], typer.Argument(help="One or more queries (searched as one batch).")],
    index: Annotated[Path, typer.Option("--index", "-i", help="Index directory.")],
    topk: Annotated[int, typer.Option("--topk", "-k", min=1)] = DEFAULT_TOPK,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per query instead of text.")] = False,
    nprobe: Annotated[int | None, typer.Option(help="IVF lists visited per query.")] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW search beam.")] = None,
) -> None:
    """Search an index and print the top passages of each query."""
    import time

    from masksearch_rl.corpus.passage import split_contents
    from masksearch_rl.retrieval.index import load_index

    overrides = {name: value for name, value in {"nprobe": nprobe, "ef_search": ef_search}.items() if value is not None}
    try:
        retriever = load_index(index, **overrides)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    started = time.perf_counter()
    results = retriever.search(list(queries), topk)
    elapsed = time.perf_counter() - started
    for query, hits in zip(queries, results):
        if as_json:
            typer.echo(json.dumps({"query": query, "hits": [h.to_search_r1() for h in hits]}, ensure_ascii=False))
            continue
        typer.echo(f"\n{query}")
        if not hits:
            typer.echo("  (no hits)")
        for rank, hit in enumerate(hits, start=1):
            title, text = split_contents(hit.contents)
            snippet = " ".join(text.split())[:160]
            typer.echo(f"  {rank}. [{hit.score:.3f}] {hit.id}  {title}\n     {snippet}")
    if not as_json:
        typer.echo(f"\n{len(queries)} queries in {elapsed * 1000:.1f} ms")


def register(app: typer.Typer) -> None:
    """Add ``index build`` and ``search`` to the top-level app."""
    app.add_typer(index_app, name="index")
    app.command("search")(search)
