"""Content-addressed token store: per source, uint16 shards, a held-out validation slice, a manifest. This module
is the layout, the keys and the read side, which checks what it reads (`SourceStore.damaged`); writing and repairing
a store is `sparknet.store_write`'s.

Layout (under `<lab>/tokens/<kind>-<key>/`, key = sha256 of the source's identity, the tokenizer's
fingerprint, the validation size and selection rule, and the shard size):

    manifest.json     source identity, tokenizer, counts, per-file sha256 and xxh3 and largest token id, the
                      items each shard consumed, how many items consumed, the
                      validation rule and what it selected, how many training documents were dropped as
                      copies of validation documents, and for a hub dataset the commit it was read at
    val.bin           the validation documents, EOT after each, in hash order: never trained on
    val-index.json    their hashes and item positions, so that every later extension still skips them
                      and drops their copies
    train-00000.bin   every other document, in source order, EOT after each, ~shard_tokens tokens per file

The validation slice is a seeded sample of whole documents spread over the source, chosen by each
document's `doc_hash` (salted 64-bit hash of its whitespace-normalized text; uniform, so "small hash" is a
random draw that is the same on every machine and for every budget):
- sized sources (local, blog, pydocs), whose whole text is cheap to read: one reading pass (hashing only)
  keeps the documents of smallest hash; the slice is those, in hash order, up to `val_tokens`, but never
  more than `val_max_fraction` (10%) of the source's tokens, so a five-post blog is not all validation
  (a document that would cross that bound is left to training, and the next one is tried).
- streamed sources (kind hf): no pass over a whole hub dataset, so a fixed rate (`val_stream_rate`, 1%):
  the documents whose hash is below 1% of the hash space, in stream order, until `val_tokens`. The slice
  is spread over the first ~val_tokens / 1% tokens of the stream (100M for the default 1M), which a
  shuffled hub dataset represents; a dataset smaller than that gives ~1% of itself.
The slice is stored in hash order, so any prefix of it (`eval.val_tokens`) is itself a spread sample.
Training then reads the source from the start and skips the validation documents by position; a training
document whose normalized text equals a validation document's is dropped and counted
(`val_duplicates_dropped`): the slice is disjoint from training by document and by content.

Every file is written to a temporary name, fsynced and renamed, and only then entered in the manifest
(itself replaced atomically). A run killed at any point leaves a valid store; the next run skips the
items already consumed and rewrites any shard that was not yet recorded, byte for byte the same (a
killed validation pass starts over: it writes nothing until it is complete).
The store holds only what the budget needs, and is extended when a later budget needs more: from the
same dataset commit it was created from, so it never mixes two versions of a moving hub dataset.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from sparknet.config import SourceConfig
from sparknet.errors import SparknetError
from sparknet.sources import (
    VAL_SALT,
    source_identity,
)
from sparknet.tokenizer import Tokenizer

# 2: validation slices are hash samples spread over the source (1: the first documents), with an index.
FORMAT_VERSION = 2
VAL_MAX_FRACTION = 0.10  # sized sources: at most this share of a source's tokens is held out
VAL_STREAM_RATE = 0.01  # streamed sources: the share of documents eligible for validation
# Sized sources keep the smallest-hash documents up to val_tokens x this many characters before tokenizing
# them: text has 3-5 characters per GPT-2 token, so 8 surely holds val_tokens tokens, in bounded memory.
CANDIDATE_CHARS_PER_TOKEN = 8


def val_rule(src: SourceConfig, val_max_fraction: float = VAL_MAX_FRACTION,
             val_stream_rate: float = VAL_STREAM_RATE) -> dict:
    """How the validation documents of `src` are selected; part of the store key and the manifest."""
    common = {"salt": VAL_SALT, "hash": "blake2b-64 of the whitespace-collapsed, stripped text"}
    if src.kind == "hf":
        return {"kind": "hash-rate", "rate": val_stream_rate} | common
    return {"kind": "smallest-hash", "max_fraction": val_max_fraction,
            "candidate_chars_per_token": CANDIDATE_CHARS_PER_TOKEN} | common


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65_536 else np.dtype(np.uint32)


def store_key(src: SourceConfig, tok: Tokenizer, val_tokens: int, shard_tokens: int, rule: dict | None = None) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "source": source_identity(src), "tokenizer": tok.fingerprint,
                       "val_tokens": val_tokens, "val_rule": rule or val_rule(src), "shard_tokens": shard_tokens},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def store_dir(src: SourceConfig, tok: Tokenizer, lab: Path, val_tokens: int, shard_tokens: int,
              rule: dict | None = None) -> Path:
    return lab / "tokens" / f"{src.kind}-{store_key(src, tok, val_tokens, shard_tokens, rule)}"


def store_complete(src: SourceConfig, tok: Tokenizer, lab: Path, *, train_tokens_needed: int, val_tokens: int,
                   shard_tokens: int, val_max_fraction: float = VAL_MAX_FRACTION,
                   val_stream_rate: float = VAL_STREAM_RATE) -> bool:
    """Whether the store of `src` already serves the budget, so that preparing it reads nothing (no network)."""
    rule = val_rule(src, val_max_fraction, val_stream_rate)
    path = store_dir(src, tok, lab, val_tokens, shard_tokens, rule) / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (m.get("format") == FORMAT_VERSION and m.get("val") is not None
            and (m.get("train_tokens", 0) >= train_tokens_needed or bool(m.get("exhausted"))))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _xxh3_file(path: Path) -> str:
    """The file's xxh3-64 (hex): the start-up content check. ~10 GB/s from memory, so a 1B-token store (2 GB) costs
    about a second when cached (sha256, ~1.2 GB/s here, stays in `--verify`)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:  # hashed in place: no copy of the file
            return xxhash.xxh3_64_hexdigest(view)


class TokenArray:
    """Several token files read as one long array (memory-mapped, read-only)."""

    def __init__(self, paths: list[Path], lengths: list[int], dtype: np.dtype):
        self._maps = [np.memmap(p, dtype=dtype, mode="r") if n else np.zeros(0, dtype) for p, n in zip(paths, lengths)]
        for p, m, n in zip(paths, self._maps, lengths):
            if len(m) != n:
                raise SparknetError(f"{p}: holds {len(m)} tokens, the manifest says {n}: the store is "
                                    f"damaged (fix: delete {p.parent} and run prepare again)")
        self._starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.dtype = dtype

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as a fresh int64 array."""
        if start < 0 or start + n > len(self):
            raise IndexError(f"read [{start}, {start + n}) outside [0, {len(self)})")
        out = np.empty(n, dtype=np.int64)
        pos, filled = start, 0
        k = int(np.searchsorted(self._starts, start, side="right") - 1)
        while filled < n:
            local = pos - int(self._starts[k])
            take = min(n - filled, len(self._maps[k]) - local)
            out[filled:filled + take] = self._maps[k][local:local + take]
            filled += take
            pos += take
            k += 1
        return out


@dataclass
class SourceStore:
    """The read side of one source's store."""

    dir: Path
    manifest: dict

    @property
    def train_tokens(self) -> int:
        return int(self.manifest["train_tokens"])

    @property
    def val_tokens(self) -> int:
        return int(self.manifest["val"]["tokens"]) if self.manifest["val"] else 0

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def train(self) -> TokenArray:
        shards = self.manifest["train_shards"]
        return TokenArray([self.dir / s["file"] for s in shards], [s["tokens"] for s in shards], self.dtype)

    def val(self) -> TokenArray:
        v = self.manifest["val"]
        return TokenArray([self.dir / v["file"]] if v else [], [v["tokens"]] if v else [], self.dtype)

    @property
    def val_documents(self) -> int:
        return int(self.manifest["val"]["documents"]) if self.manifest["val"] else 0

    @property
    def duplicates_dropped(self) -> int:
        """Training documents dropped so far because their normalized text is a validation document's."""
        return int(self.manifest.get("val_duplicates_dropped", 0))

    def val_index(self) -> dict:
        """{"hashes": [hex...], "items": [...]} of the validation documents, in val.bin's order."""
        v = self.manifest["val"]
        if not v or not v.get("index"):
            return {"hashes": [], "items": []}
        return json.loads((self.dir / v["index"]).read_text())

    def describe_val(self) -> str:
        """How the validation slice was drawn, in words (for the report)."""
        return describe_val(self.manifest)

    def files(self) -> list[dict]:
        """The manifest's entries of every token file: the training shards, then val.bin."""
        return list(self.manifest["train_shards"]) + ([self.manifest["val"]] if self.manifest["val"] else [])

    def damaged(self) -> list[tuple[str, str]]:
        """(file, what is wrong) for every file that does not hold what the manifest promises: present, of its
        size, its xxh3 content check, token ids below the tokenizer's vocabulary. Cheap enough for every start
        (one xxh3 pass over the store); `verify` is the full sha256."""
        vocab = int(self.manifest["tokenizer"]["vocab_size"])
        out: list[tuple[str, str]] = []
        v = self.manifest["val"]
        extra = [{"file": v["index"]}] if v and v.get("index") else []  # no token count: checked by sha256
        for e in self.files() + extra:
            path = self.dir / e["file"]
            want = e["tokens"] * self.dtype.itemsize if "tokens" in e else None
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                out.append((e["file"], "missing"))
                continue
            if want is not None and size != want:
                out.append((e["file"], f"{size:,} bytes, the manifest says {want:,}"))
            elif e.get("max_id", -1) >= vocab:
                out.append((e["file"], f"token id {e['max_id']} is not below the vocabulary size {vocab}"))
            elif "xxh3" in e and _xxh3_file(path) != e["xxh3"]:
                out.append((e["file"], "content differs from what was written (xxh3)"))
            elif e["file"] == (v or {}).get("index") and _sha256_file(path) != v["index_sha256"]:
                out.append((e["file"], "content differs from what was written (sha256)"))  # a small JSON file
        return out

    def verify(self) -> list[str]:
        """Files whose sha256 does not match the manifest (empty when the store is intact)."""
        files = [(e["file"], e["sha256"]) for e in self.files()]
        v = self.manifest["val"]
        if v and v.get("index"):
            files.append((v["index"], v["index_sha256"]))
        return [f for f, sha in files if not (self.dir / f).is_file() or _sha256_file(self.dir / f) != sha]


def describe_val(manifest: dict) -> str:
    """E.g. "1.0% hash sample of the first 4,210 docs streamed: 42 docs" or "42 of 4,210 docs (1.0%) with the
    smallest hashes, spread over the whole source"."""
    v, rule = manifest.get("val"), manifest.get("val_rule") or {}
    if not v:
        return "not drawn yet"
    if not v.get("index") and not v["documents"] and not v.get("source_documents"):
        return "none (mixture.val_tokens is 0)"
    docs, seen = v["documents"], v.get("source_documents", 0)
    share = f"{docs / seen:.1%}" if seen else "0%"
    if rule.get("kind") == "hash-rate":
        text = (f"{rule['rate']:.1%} hash sample of the first {seen:,} docs streamed: {docs:,} docs"
                + ("" if v.get("complete") else " (the source ended before val_tokens)"))
    else:
        text = f"{docs:,} of {seen:,} docs ({share}) with the smallest hashes, spread over the whole source"
        if v.get("capped"):
            text += (f", capped at {rule.get('max_fraction', VAL_MAX_FRACTION):.0%} of its "
                     f"~{v.get('source_tokens_estimate', 0):,} tokens")
    return text


def open_store(directory: Path) -> SourceStore:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SparknetError(f"{path}: no token store here (fix: run python -m sparknet.prepare first)") from None
    except json.JSONDecodeError:
        raise SparknetError(f"{path}: manifest is damaged (fix: delete {directory} and prepare again)") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise SparknetError(f"{path}: store format {manifest.get('format')} is not {FORMAT_VERSION} "
                            f"(fix: delete {directory} and prepare again)")
    return SourceStore(directory, manifest)
