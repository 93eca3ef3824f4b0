"""``masksearch-rl corpus ...``: turn a raw corpus (KILT, WikiExtractor, FlashRAG, per-article folder) into
passage JSONL, the one input every index and RAMP job reads.

Why a command: conversion streams a whole Wikipedia dump, so it needs a progress bar, an output that is either
complete or absent (written atomically), and a summary of what was skipped and where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_MAX_REASONS = 15

corpus_app = typer.Typer(
    help="Read corpora (FlashRAG/Search-R1 JSONL, KILT, WikiExtractor, per-article folders) into passages.",
    no_args_is_help=True,
)


@corpus_app.command("convert")
def convert(
    input_path: Annotated[
        Path, typer.Option("--input", "-i", help="Corpus file or directory (.bz2/.gz files are read too).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output passage JSONL ({id, contents, title}); written atomically.")
    ],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="auto, flashrag, kilt, wikiextractor or masksearch-dir.")
    ] = "auto",
    chunk_words: Annotated[int, typer.Option("--chunk-words", min=1, help="Target words per passage.")] = 100,
    no_chunk: Annotated[
        bool,
        typer.Option("--no-chunk", help="Keep each article whole (flashrag records are passed through as they are)."),
    ] = False,
) -> None:
    """Stream a corpus into passage JSONL, chunked to about --chunk-words words per passage."""
    import itertools

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from masksearch_rl.corpus.readers import ReadStats, read_corpus
    from masksearch_rl.jsonl import BadLines, InputError, write_jsonl

    bad, stats = BadLines(), ReadStats()
    try:
        passages = read_corpus(input_path, fmt, None if no_chunk else chunk_words, bad=bad, stats=stats)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None

    with logging_redirect_tqdm(), tqdm(desc="passages", unit=" passages", dynamic_ncols=True) as bar:
        try:
            first = next(passages, None)
            if first is None:
                bar.close()
                _print_summary(out, 0, stats, bad, wrote=False)
                typer.echo(f"error: no passages read from {input_path}; {out} left untouched", err=True)
                raise typer.Exit(1)

            def records():
                for passage in itertools.chain([first], passages):
                    bar.update()
                    yield passage.to_json()

            written = write_jsonl(out, records())
        except InputError as err:  # a truncated .gz: the output is written whole or not at all
            bar.close()
            _print_summary(out, 0, stats, bad, wrote=False)
            typer.echo(f"error: {err}\n{out} left untouched", err=True)
            raise typer.Exit(1) from None
    _print_summary(out, written, stats, bad, wrote=True)


def _print_summary(out: Path, written: int, stats, bad, wrote: bool) -> None:
    typer.echo(f"read {stats.articles:,} articles (source records) from {stats.files:,} file(s)")
    typer.echo(f"wrote {written:,} passages" + (f" to {out}" if wrote else ""))
    if bad.total:
        typer.echo(f"skipped {bad.total:,} bad record(s), by reason:")
        reasons = bad.counts.most_common()
        for reason, count in reasons[:_MAX_REASONS]:
            typer.echo(f"  {count:>8,}  {reason}")
        if len(reasons) > _MAX_REASONS:
            others = sum(count for _, count in reasons[_MAX_REASONS:])
            typer.echo(f"  {others:>8,}  ({len(reasons) - _MAX_REASONS} other reasons)")
        typer.echo("first examples:")
        for example in bad.examples[:10]:
            typer.echo(f"  {example}")


def register(app: typer.Typer) -> None:
    """Add the ``corpus`` command group to the top-level app."""
    app.add_typer(corpus_app, name="corpus")
