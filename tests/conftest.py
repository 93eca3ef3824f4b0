"""Shared test helpers (pytest loads this file before any test module)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# The project's public sample files (KILT pages, QA benchmark samples) live beside the checkout in ../shared/data;
# MASKSEARCH_SHARED_DATA points elsewhere. Test modules read the resolved path from the environment.
SHARED_DATA = Path(os.environ.get("MASKSEARCH_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
os.environ["MASKSEARCH_SHARED_DATA"] = str(SHARED_DATA)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``shared_data`` skip, saying why, where the sample files are not (before their fixtures run)."""
    if item.get_closest_marker("shared_data") and not SHARED_DATA.is_dir():
        pytest.skip(f"the shared sample data is not at {SHARED_DATA} (set MASKSEARCH_SHARED_DATA)")


def read_offline_history(root: Path) -> dict[int, dict[str, Any]]:
    """Step -> logged keys of the one W&B offline run under ``root/wandb``, read from its ``run-*.wandb``
    transaction log: a 7-byte W&B header, then LevelDB log records (32 KiB blocks, 7-byte record headers) holding
    protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    [path] = root.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pending, history = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.HasField("history"):
                row = history.setdefault(record.history.step.num, {})
                row.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history


@pytest.fixture
def wandb_history():
    """``wandb_history(root)``: what an offline W&B run under ``root/wandb`` logged, step by step."""
    return read_offline_history
