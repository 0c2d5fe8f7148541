"""The tiny real-text lab that the end-to-end tests and scripts/bench_sweep.py train on: two local sources from
../shared/data, a 512-token BPE and the ~130k-parameter cpu-tiny model with a 64-token context.

Plain Python (no pytest), so that a script can import it too. The tests reach it through the fixtures of
tests/conftest.py (`shared_data`, `tiny_mixture`, `subprocess_env`); pytest's default import mode puts tests/ on
sys.path, and scripts/bench_sweep.py puts it there itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # real text; what needs it skips (tests) or fails clearly (scripts)
EDU = Path("web_edu") / "fineweb_edu_sample.jsonl"
BOOKS = Path("academic") / "openstax_textbooks.jsonl"

DROP = None  # an override value that removes the key from its section


def tiny_mixture(data: Path = SHARED_DATA, *, max_repeats: int = 4, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny recipe as the dict its YAML loads to. Each keyword names a section (mixture, tokenizer, model, train,
    eval, prepare, tracking, ...) whose keys it sets, or removes where the value is DROP (None); `max_repeats` is
    that of both sources. Without overrides: ~100k tokens at 8 sequences a step, which train in seconds."""
    cfg: dict[str, Any] = {
        "mixture": {"total_tokens": 131072, "val_tokens": 4096, "sources": [
            {"name": "edu", "kind": "local", "path": str(data / EDU), "weight": 0.6, "max_repeats": max_repeats},
            {"name": "textbooks", "kind": "local", "path": str(data / BOOKS), "weight": 0.4,
             "max_repeats": max_repeats},
        ]},
        "tokenizer": {"name": "bpe", "vocab_size": 512, "train_bytes_per_source": 400000},
        "model": {"preset": "cpu-tiny", "n_positions": 64},
        "train": {"seq_len": 64, "micro_batch_size": 8, "grad_accum_steps": 1, "lr": 3e-3, "min_lr": 3e-4,
                  "checkpoint_minutes": 0},
        "eval": {"val_tokens": 2048, "sample_tokens": 4, "sample_prompts": ["The"], "wikitext": []},
        "prepare": {"workers": 1, "shard_tokens": 65536},
    }
    for section, values in sections.items():
        merged = cfg.setdefault(section, {}) | values
        cfg[section] = {k: v for k, v in merged.items() if v is not DROP}
    return cfg


def write_tiny_mixture(folder: Path, data: Path = SHARED_DATA, name: str = "tiny.yaml", **overrides: Any) -> Path:
    """Write `tiny_mixture(data, **overrides)` to folder/name (the run name defaults to the file's stem)."""
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(tiny_mixture(data, **overrides), sort_keys=False), encoding="utf-8")
    return path
