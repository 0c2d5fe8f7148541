"""The tiny real-text lab that the end-to-end tests and scripts/bench_sweep.py train on: two sources of text every
Python installation carries (the `pydocs` source: the standard library's docstrings, prose, and its code), a
512-token BPE and the ~130k-parameter cpu-tiny model with a 64-token context. Nothing beside the clone is needed.
Tests assert properties of the training (it learns, it spends the budget exactly), never figures that depend on
which Python is installed.

Plain Python (no pytest), so that a script can import it too. The tests reach it through the fixtures of
tests/conftest.py (`shared_data`, `tiny_mixture`, `subprocess_env`); pytest's default import mode puts tests/ on
sys.path, and scripts/bench_sweep.py puts it there itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # WikiText-2 and benchmarks only; what needs it skips with a reason

DROP = None  # an override value that removes the key from its section


def tiny_mixture(*, max_repeats: int = 4, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny recipe as the dict its YAML loads to. Each keyword names a section (mixture, tokenizer, model, train,
    eval, prepare, tracking, ...) whose keys it sets, or removes where the value is DROP (None); `max_repeats` is
    that of both sources. Without overrides: ~100k tokens at 8 sequences a step, which train in seconds."""
    cfg: dict[str, Any] = {
        "mixture": {"total_tokens": 131072, "val_tokens": 4096, "sources": [
            {"name": "docs", "kind": "pydocs", "part": "docstrings", "weight": 0.6, "max_repeats": max_repeats},
            {"name": "code", "kind": "pydocs", "part": "code", "weight": 0.4, "max_repeats": max_repeats},
        ]},
        "tokenizer": {"name": "bpe", "vocab_size": 512, "train_bytes_per_source": 400000},
        "model": {"preset": "cpu-tiny", "n_positions": 64},
        "train": {"seq_len": 64, "micro_batch_size": 8, "batch_tokens": 512, "lr": 3e-3, "min_lr": 3e-4,
                  "checkpoint_minutes": 0},
        "eval": {"val_tokens": 2048, "sample_tokens": 4, "sample_prompts": ["The"], "wikitext": []},
        "prepare": {"workers": 1, "shard_tokens": 65536},
    }
    for section, values in sections.items():
        merged = cfg.setdefault(section, {}) | values
        cfg[section] = {k: v for k, v in merged.items() if v is not DROP}
    return cfg


def write_tiny_mixture(folder: Path, name: str = "tiny.yaml", **overrides: Any) -> Path:
    """Write `tiny_mixture(**overrides)` to folder/name (the run name defaults to the file's stem)."""
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(tiny_mixture(**overrides), sort_keys=False), encoding="utf-8")
    return path
