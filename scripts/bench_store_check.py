"""What the start-up check of a token store costs: `SourceStore.damaged()` (sizes, xxh3 of every file, recorded token
ids below the vocabulary), which every prepare and run does before using a store, against the full sha256 of
`prepare --verify`, side by side on the same files.

    .venv/bin/python scripts/bench_store_check.py                 # a 1B-token store (2 GB of uint16) in a temp folder
    .venv/bin/python scripts/bench_store_check.py --tokens 100M --dir /fast/disk

The files are written first, so the timings are from the page cache (a store in use is mostly cached); the first
check after a reboot reads from disk at the disk's speed instead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sparknet.config import parse_tokens
from sparknet.store import SourceStore
from sparknet.store_write import _file_entry

SHARD_TOKENS = 64 * 2**20  # 128 MiB shards


def build(directory: Path, tokens: int) -> SourceStore:
    rng = np.random.default_rng(0)
    shards = []
    for k, start in enumerate(range(0, tokens, SHARD_TOKENS)):
        arr = rng.integers(0, 50257, size=min(SHARD_TOKENS, tokens - start), dtype=np.uint16)
        data = arr.tobytes()
        (directory / f"train-{k:05d}.bin").write_bytes(data)
        shards.append(_file_entry(f"train-{k:05d}.bin", data, arr))
    manifest = {"dtype": "uint16", "tokenizer": {"vocab_size": 50257}, "train_shards": shards, "val": None}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return SourceStore(directory, manifest)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        assert not fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1B")
    ap.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    args = ap.parse_args()
    tokens = parse_tokens(args.tokens)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = build(Path(tmp), tokens)
        check_s = best_of(store.damaged)
        verify_s = best_of(store.verify, repeats=1)
    gb = tokens * 2 / 1e9
    print(f"{tokens:,} tokens ({gb:.2f} GB, {len(store.files())} shards)")
    print(f"start-up check (xxh3):  {check_s:6.2f} s  ({gb / check_s:5.2f} GB/s)")
    print(f"--verify (sha256):      {verify_s:6.2f} s  ({gb / verify_s:5.2f} GB/s)")
    print(f"ratio verify / check:   {verify_s / check_s:6.1f}x")


if __name__ == "__main__":
    main()
