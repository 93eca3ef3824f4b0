"""The lab's data: the synthetic world, a split that keeps held-out entities out of every training stage, verl RL
parquets for RAMP and QA, and oracle trajectories for pre-training and SFT.

The task keeps MaskSearch's shape: RAMP items mask spans of the world's passages, QA questions ask for facts, and
answers are only reachable through search (the world is invented, and the entities the lab evaluates on are never
in any training data, so a model cannot have memorised them). Choices that make it learnable by a tiny model on a
CPU, each measured in ``data/summary.json``:

* a search shows one passage (``topk=1``) cut to ``max_info_tokens`` of the policy's tokens, and the oracle's RAMP
  query is the masked text's opening words, which retrieve the source passage for nearly every item: the oracle then
  sees every masked span (``oracle_found_rate``);
* QA uses 1-hop questions searched by their own text, kept when that search shows the answer;
* several items per passage (``maskings`` independent draws of masks), so SFT sees many copies to make.

Layout under ``<out>/data``::

    world/ corpus.jsonl questions.jsonl      index/ (BM25)     ramp/items_<m>.jsonl
    items/ ramp_train.jsonl ramp_val.jsonl qa_train.jsonl qa_val.jsonl
    rl/ramp/{train,val}.parquet  rl/ramp_hidden/{train,val}.parquet  rl/qa/{train,val}.parquet
    sft/ trajectories.jsonl train.parquet val.parquet
    summary.json
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from masksearch_rl.jsonl import atomic_path, read_jsonl, write_jsonl
from masksearch_rl.lab.config import LabConfig

QA_SOURCE = "synthetic_qa"
RAMP_SOURCE = "ramp"


class LabPaths:
    """Where each piece of the lab's data lives (see the module docstring)."""

    def __init__(self, out_dir: Path):
        self.root = Path(out_dir) / "data"
        self.world = self.root / "world"
        self.corpus = self.world / "corpus.jsonl"
        self.questions = self.world / "questions.jsonl"
        self.index = self.root / "index"
        self.items = self.root / "items"
        self.rl = self.root / "rl"
        self.sft = self.root / "sft"
        self.summary = self.root / "summary.json"

    def rl_files(self, task: str) -> tuple[Path, Path]:
        """(train, val) parquet of ``task``: ``ramp``, ``ramp_hidden`` or ``qa``."""
        return self.rl / task / "train.parquet", self.rl / task / "val.parquet"


def is_heldout(title: str, seed: int, share: float) -> bool:
    """Whether an entity is held out: a fixed share of titles by hash, so every passage of it goes the same way."""
    digest = hashlib.sha256(f"{seed}\x1f{title}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x1e{key}".encode()).hexdigest()


def build_world(cfg: LabConfig, paths: LabPaths) -> None:
    """World (1-hop questions only) and its BM25 index; kept when already there."""
    from masksearch_rl.retrieval.index import build_index
    from masksearch_rl.synthetic import write_synthetic_corpus

    if not (paths.corpus.is_file() and paths.questions.is_file()):
        write_synthetic_corpus(paths.world, cfg.passages, cfg.questions, cfg.seed, hops=(1,), progress=False,
                               flavour=cfg.flavour)
    if not (paths.index / "manifest.json").is_file():
        build_index(paths.corpus, paths.index, kind="bm25")


def ramp_items(cfg: LabConfig, paths: LabPaths) -> list[dict[str, Any]]:
    """``maskings`` RAMP items per passage, each its own draw of masks (ids ``<passage id>#<m>``, ``passage_id``
    kept); a draw that repeats an earlier one of the same passage is dropped."""
    from masksearch_rl.ramp.masking import MaskingConfig
    from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp

    items, seen = [], set()
    for m in range(cfg.maskings):
        path = paths.root / "ramp" / f"items_{m}.jsonl"
        # (resumable: a finished file is read back, a killed run goes on where it stopped)
        generate_ramp(RampConfig(corpus=paths.corpus, out=path, seed=cfg.seed * 1000 + m, workers=1,
                                 masking=MaskingConfig(), progress=False))
        for item in read_jsonl(path):
            key = (item["id"], tuple(item["masks"]))
            if key in seen:
                continue
            seen.add(key)
            items.append({**item, "passage_id": item["id"], "id": f"{item['id']}#{m}"})
    return items


def split_items(cfg: LabConfig, items: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(train, val): every item of a training entity; ``val_ramp`` items of held-out entities, first masking only."""
    train = [item for item in items if not is_heldout(item["title"], cfg.seed, cfg.heldout_share)]
    heldout = [item for item in items if is_heldout(item["title"], cfg.seed, cfg.heldout_share)
               and item["id"].endswith("#0")]
    heldout.sort(key=lambda item: _rank(item["id"], cfg.seed))
    return train, heldout[: cfg.val_ramp]


def qa_records(cfg: LabConfig, paths: LabPaths, tokenizer_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(train trajectories, train questions, val questions) for the 1-hop questions whose own text, searched,
    shows the answer; held-out entities go to validation (``val_qa`` of them)."""
    from masksearch_rl.retrieval.index import load_index
    from masksearch_rl.sft.oracle import qa_oracle_trajectories

    questions = [{**q, "data_source": QA_SOURCE} for q in read_jsonl(paths.questions) if q["hops"] == 1]
    oracle = _oracle_config(cfg, tokenizer_dir)
    trajectories = qa_oracle_trajectories(questions, load_index(paths.index), oracle, strategy="question")
    found = {t["id"] for t in trajectories if t["found"]}
    train_q, val_q = [], []
    for question in questions:
        if question["id"] not in found:
            continue
        heldout = is_heldout(question["chain"][0], cfg.seed, cfg.heldout_share)
        (val_q if heldout else train_q).append(question)
    val_q.sort(key=lambda q: _rank(q["id"], cfg.seed))
    train_ids = {q["id"] for q in train_q}
    return [t for t in trajectories if t["id"] in train_ids], train_q, val_q[: cfg.val_qa]


def _oracle_config(cfg: LabConfig, tokenizer_dir: Path):
    from masksearch_rl.sft.oracle import OracleConfig

    return OracleConfig(topk=cfg.topk, max_info_tokens=cfg.max_info_tokens, tokenizer=str(tokenizer_dir),
                        max_searches=1, wording="fixed", queries=("opening",), opening_words=cfg.opening_words,
                        seed=cfg.seed)


def qa_rows(questions: list[dict], split: str) -> list[dict[str, Any]]:
    from masksearch_rl.eval.export import item_to_row
    from masksearch_rl.eval.loaders import QAItem

    return [item_to_row(QAItem(QA_SOURCE, str(q["id"]), q["question"], (str(q["answer"]),)), i, split)
            for i, q in enumerate(questions)]


def build_data(cfg: LabConfig, paths: LabPaths, tokenizer_dir: Path) -> dict[str, Any]:
    """Every data file of the lab (module docstring); returns and writes ``summary.json``. Kept when complete."""
    if paths.summary.is_file():
        return json.loads(paths.summary.read_text())
    from masksearch_rl.ramp.export import ExportConfig, export_items, write_rows
    from masksearch_rl.retrieval.index import load_index
    from masksearch_rl.sft.export import export_sft
    from masksearch_rl.sft.oracle import oracle_trajectories

    build_world(cfg, paths)
    ramp_train, ramp_val = split_items(cfg, ramp_items(cfg, paths))
    ramp_trajectories = oracle_trajectories(ramp_train, load_index(paths.index), _oracle_config(cfg, tokenizer_dir))
    qa_trajectories, qa_train, qa_val = qa_records(cfg, paths, tokenizer_dir)
    if not (ramp_train and ramp_val and qa_train and qa_val):
        raise ValueError(f"the lab world is too small: {len(ramp_train)} / {len(ramp_val)} RAMP train / val items, "
                         f"{len(qa_train)} / {len(qa_val)} QA train / val questions")

    for name, records in (("ramp_train", ramp_train), ("ramp_val", ramp_val), ("qa_train", qa_train),
                          ("qa_val", qa_val)):
        write_jsonl(paths.items / f"{name}.jsonl", records)
    for task, config in (("ramp", ExportConfig()), ("ramp_hidden", ExportConfig(hide_source=True))):
        train_file, val_file = paths.rl_files(task)
        export_items(ramp_train, train_file, "train", config)
        export_items(ramp_val, val_file, "val", config)
    train_file, val_file = paths.rl_files("qa")
    write_rows(qa_rows(qa_train, "train"), train_file)
    write_rows(qa_rows(qa_val, "val"), val_file)

    kept = [t for t in ramp_trajectories if t["keep"]] + [t for t in qa_trajectories if t["keep"]]
    write_jsonl(paths.sft / "trajectories.jsonl", kept)
    sft_export = export_sft([paths.sft / "trajectories.jsonl"], paths.sft, val_fraction=0.02, seed=cfg.seed)

    found = sum(t["found"] for t in ramp_trajectories)
    summary = {
        "passages": cfg.passages,
        "ramp_items": {"train": len(ramp_train), "val": len(ramp_val)},
        "ramp_val_masks": _histogram(item["num_masks"] for item in ramp_val),
        "qa_questions": {"train": len(qa_train), "val": len(qa_val)},
        "oracle_found_rate": round(found / max(1, len(ramp_trajectories)), 4),
        "sft_trajectories": {"ramp": sum(t["keep"] for t in ramp_trajectories),
                             "qa": sum(t["keep"] for t in qa_trajectories)},
        "sft_export": sft_export,
        "search": {"topk": cfg.topk, "max_info_tokens": cfg.max_info_tokens, "ramp_query": "opening",
                   "opening_words": cfg.opening_words, "qa_query": "question"},
    }
    with atomic_path(paths.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _histogram(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))
