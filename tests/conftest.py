"""Shared fixtures. Tests run offline, on the CPU, in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never let a test wait ~25 s on the unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real text); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real text not available: {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, [texts]) -> path of a jsonl file of {"text": ...} records."""
    import json

    def make(name: str, texts: list[str], field: str = "text") -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({field: t}) + "\n")
        return p

    return make
