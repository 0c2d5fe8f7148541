"""Content-addressed token store: per source, uint16 shards, a held-out validation slice, a manifest.

Layout (under `<lab>/tokens/<kind>-<key>/`, key = sha256 of the source's identity, the tokenizer's
fingerprint, the validation size and selection rule, and the shard size):

    manifest.json     source identity, tokenizer, counts, per-file sha256, how many items consumed, the
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
import heapq
import itertools
import json
import mmap
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from sparknet import atomic
from sparknet.config import SourceConfig
from sparknet.errors import SparknetError
from sparknet.locks import store_lock
from sparknet.sources import (
    HASH_SPACE,
    VAL_SALT,
    check_hub_source,
    doc_hash,
    is_hub,
    iter_documents,
    resolve_hf_commit,
    source_identity,
)
from sparknet.tokenizer import Tokenizer, TokenizerSpec, from_spec

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


def _write_atomic(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data, durable=True)


def _xxh3_file(path: Path) -> str:
    """The file's xxh3-64 (hex): the start-up content check. ~10 GB/s from memory, so a 1B-token store (2 GB) costs
    about a second when cached (sha256, ~1.2 GB/s here, stays in `--verify`)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:  # hashed in place: no copy of the file
            return xxhash.xxh3_64_hexdigest(view)


def _file_entry(name: str, data: bytes, arr: np.ndarray) -> dict:
    """What the manifest promises about one written file: its size, both checksums and its largest token id."""
    return {"file": name, "tokens": int(len(arr)), "sha256": hashlib.sha256(data).hexdigest(),
            "xxh3": xxhash.xxh3_64_hexdigest(data), "max_id": int(arr.max()) if len(arr) else -1}


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
        extra = [{"file": v["index"], "bytes": None}] if v and v.get("index") else []
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


# ------------------------------------------------------------------------------------- writing


def _tokenize_items(spec: TokenizerSpec, texts: list[str], salt: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Worker: token ids of each non-empty text followed by EOT, flattened, plus per-item lengths, and
    with `salt` each item's `doc_hash` (0 for empty items), so that the main process need not hash."""
    tok = from_spec(spec)
    idx = [i for i, t in enumerate(texts) if t and t.strip()]
    lengths = np.zeros(len(texts), dtype=np.int64)
    hashes = np.zeros(len(texts), dtype=np.uint64) if salt is not None else None
    if not idx:
        return np.zeros(0, dtype=np.int64), lengths, hashes
    encoded = tok.encode_batch([texts[i] for i in idx])
    for i, ids in zip(idx, encoded):
        lengths[i] = len(ids) + 1
        if hashes is not None:
            hashes[i] = doc_hash(texts[i], salt)
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for ids in encoded:
        flat[pos:pos + len(ids)] = ids
        flat[pos + len(ids)] = tok.eot_id
        pos += len(ids) + 1
    return flat, lengths, hashes


def _batched(it: Iterator[str], size: int, max_bytes: int = 8 << 20) -> Iterator[list[str]]:
    batch: list[str] = []
    nbytes = 0
    for doc in it:
        batch.append(doc)
        nbytes += len(doc)
        if len(batch) >= size or nbytes >= max_bytes:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def _tokenized_stream(spec: TokenizerSpec, batches: Iterator[list[str]], workers: int, salt: str | None = None
                      ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(flat tokens, lengths, hashes) per batch, in order; at most 2 x workers batches in flight."""
    if workers <= 1:
        for b in batches:
            yield _tokenize_items(spec, b, salt)
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may hold threads (tokenizers, torch) that fork would copy half-made.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pending: deque = deque()
        for b in batches:
            pending.append(pool.apply_async(_tokenize_items, (spec, b, salt)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _fresh_manifest(src: SourceConfig, tok: Tokenizer, key: str, val_target: int, shard_tokens: int,
                    rule: dict) -> dict:
    return {
        "format": FORMAT_VERSION,
        "key": key,
        "name": src.name,
        "source": source_identity(src),
        # Resolved once, here: `revision` may be a branch that moves; extensions read this commit.
        # None (offline, not a hub dataset): read at the configured revision, as before.
        "source_commit": resolve_hf_commit(src),
        "tokenizer": {"spec": [tok.spec.kind, tok.spec.name, tok.spec.revision],
                      "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "dtype": _dtype_for(tok.vocab_size).name,
        "val_target_tokens": val_target,
        "val_rule": rule,
        "shard_tokens": shard_tokens,
        "val": None,
        "train_shards": [],
        "train_tokens": 0,
        "items_consumed": 0,
        "documents": 0,
        "val_duplicates_dropped": 0,
        "exhausted": False,
        "created_unix": time.time(),
    }


# ------------------------------------------------------------------------------------- validation selection


@dataclass
class _Scan:
    """The smallest-hash documents of a whole source, with the source's totals."""

    candidates: list[tuple[int, int, str]]  # (hash, item, text), ascending hash, one per distinct text
    documents: int  # non-empty documents in the source
    chars: int  # their characters


_SCANS: dict[str, _Scan] = {}  # one prepare scans a source for the tokenizer's exclusion, then for its store


def _scan_key(src: SourceConfig, cap_chars: int) -> str:
    return json.dumps([source_identity(src), cap_chars, VAL_SALT], sort_keys=True)


def scan_smallest(src: SourceConfig, cap_chars: int, *, revision: str | None = None) -> _Scan:
    """One reading pass over the whole source (no tokenizing): the documents of smallest hash whose text adds
    up to >= cap_chars (all of them when the source is smaller), in bounded memory.

    A duplicate text counts once, at its first position; its copies are dropped from training later.
    """
    key = _scan_key(src, cap_chars)
    if key in _SCANS:
        return _SCANS[key]
    heap: list[tuple[int, int, str]] = []  # (-hash, item, text): the largest kept hash on top
    members: set[int] = set()
    kept = documents = chars = 0
    for item, text in enumerate(iter_documents(src, revision=revision)):
        if not text or not text.strip():
            continue
        documents += 1
        chars += len(text)
        h = doc_hash(text)
        if h in members or (kept >= cap_chars and h > -heap[0][0]):
            continue  # a copy of a kept text, or beyond the smallest cap_chars of the hash order
        heapq.heappush(heap, (-h, item, text))
        members.add(h)
        kept += len(text)
        # Keep the shortest hash-order prefix that reaches cap_chars: drop the largest while the rest still does.
        while len(heap) > 1 and kept - len(heap[0][2]) >= cap_chars:
            neg, _, dropped = heapq.heappop(heap)
            members.discard(-neg)
            kept -= len(dropped)
    scan = _Scan(sorted((-neg, item, text) for neg, item, text in heap), documents, chars)
    if len(_SCANS) >= 8:
        _SCANS.pop(next(iter(_SCANS)))
    _SCANS[key] = scan
    return scan


def val_excluder(src: SourceConfig, val_tokens: int, *, val_max_fraction: float = VAL_MAX_FRACTION,
                 val_stream_rate: float = VAL_STREAM_RATE) -> Callable[[int], bool]:
    """A predicate on `doc_hash` that is true for every document the store may hold out for validation (a
    superset: it does not depend on the tokenizer). What trains the tokenizer must pass it."""
    if val_tokens <= 0:
        return lambda h: False
    if val_rule(src, val_max_fraction, val_stream_rate)["kind"] == "hash-rate":
        below = int(val_stream_rate * HASH_SPACE)
        return lambda h: h < below
    scan = scan_smallest(src, val_tokens * CANDIDATE_CHARS_PER_TOKEN)
    if not scan.candidates:
        return lambda h: False
    top = scan.candidates[-1][0]  # the store's slice is drawn from these candidates (the same scan)
    return lambda h: h <= top


def _encode_docs(tok: Tokenizer, texts: list[str], workers: int) -> list[np.ndarray]:
    """Each text's ids followed by EOT."""
    out: list[np.ndarray] = []
    for flat, lengths, _ in _tokenized_stream(tok.spec, _batched(iter(texts), 256), workers):
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        out += [flat[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]
    return out


def _select_smallest(src: SourceConfig, tok: Tokenizer, val_tokens: int, max_fraction: float, workers: int,
                     revision: str | None) -> tuple[list[tuple[int, int, np.ndarray]], dict]:
    """Sized sources: the smallest-hash documents up to val_tokens, at most max_fraction of the source's tokens."""
    cap = val_tokens * CANDIDATE_CHARS_PER_TOKEN
    scan = scan_smallest(src, cap, revision=revision)
    _SCANS.pop(_scan_key(src, cap), None)  # used once per prepare: do not hold the texts any longer
    cand_chars = sum(len(t) for _, _, t in scan.candidates)
    # Worker processes take a second or two to start: worth it only for a large slice.
    ids = _encode_docs(tok, [t for _, _, t in scan.candidates], workers if cand_chars > 16 << 20 else 1)
    cand_tokens = sum(len(a) for a in ids)
    # Exact when every document is a candidate (a small source); otherwise the candidates are a random sample
    # of the source, so their tokens per character estimate the whole.
    est = cand_tokens if len(scan.candidates) == scan.documents else round(scan.chars * cand_tokens / max(cand_chars, 1))
    bound = int(max_fraction * est)
    chosen: list[tuple[int, int, np.ndarray]] = []
    tokens = skipped = 0
    for (h, item, _), arr in zip(scan.candidates, ids):
        if tokens >= val_tokens:
            break
        if tokens + len(arr) > bound:
            # Whole documents only: one that would cross the bound is left to training (a source's few
            # giant documents would otherwise end the slice far short of val_tokens).
            skipped += 1
            continue
        chosen.append((h, item, arr))
        tokens += len(arr)
    info = {"source_documents": scan.documents, "source_tokens_estimate": int(est), "bound_tokens": bound,
            "capped": bool(skipped) and tokens < val_tokens, "complete": tokens >= val_tokens}
    return chosen, info


def _select_stream(src: SourceConfig, tok: Tokenizer, val_tokens: int, rate: float, revision: str | None,
                   on_tokens: Callable[[int], None] | None = None) -> tuple[list[tuple[int, int, np.ndarray]], dict]:
    """Streamed sources: the documents with hash < rate, in stream order, until val_tokens (or the end)."""
    below = int(rate * HASH_SPACE)
    chosen: list[tuple[int, int, np.ndarray]] = []
    members: set[int] = set()
    tokens = seen = items = 0
    for item, text in enumerate(iter_documents(src, revision=revision)):
        items = item + 1
        if not text or not text.strip():
            continue
        seen += 1
        h = doc_hash(text)
        if h >= below or h in members:
            continue
        members.add(h)
        flat, _, _ = _tokenize_items(tok.spec, [text])  # ~1% of the documents: one at a time is cheap
        chosen.append((h, item, flat))
        tokens += len(flat)
        if on_tokens:  # the window may be 100M tokens of streaming: show it moving
            on_tokens(len(flat))
        if tokens >= val_tokens:
            break  # the window ends here; later documents below the rate are trained on (unless copies)
    return chosen, {"source_documents": seen, "window_items": items, "complete": tokens >= val_tokens}


# ------------------------------------------------------------------------------------- writing


def prepare_source(src: SourceConfig, tok: Tokenizer, lab: Path, *, train_tokens_needed: int,
                   val_tokens: int, shard_tokens: int, workers: int = 1, batch_documents: int = 256,
                   on_tokens: Callable[[int], None] | None = None, val_max_fraction: float = VAL_MAX_FRACTION,
                   val_stream_rate: float = VAL_STREAM_RATE) -> SourceStore:
    """Make sure the store of `src` is intact and holds >= `train_tokens_needed` training tokens (or all there is).

    An existing store is checked first (`SourceStore.damaged`): a file that is missing, truncated or overwritten
    is rebuilt, exactly that file, byte for byte as first written, or the store is refused in one line; nothing
    trains on a damaged store. Returns at once when the store is intact and big enough. `on_tokens(n)` is called
    as tokens are written (progress).
    """
    rule = val_rule(src, val_max_fraction, val_stream_rate)
    key = store_key(src, tok, val_tokens, shard_tokens, rule)
    directory = lab / "tokens" / f"{src.kind}-{key}"
    with store_lock(directory):
        for stale in directory.glob(".*.tmp*"):
            stale.unlink()  # a killed writer's partial file; its content was never recorded
        mpath = directory / "manifest.json"
        manifest = open_store(directory).manifest if mpath.exists() else \
            _fresh_manifest(src, tok, key, val_tokens, shard_tokens, rule)
        manifest["name"] = src.name
        writer = _Writer(src, tok, directory, manifest, rule, workers, batch_documents)
        writer.repair()
        val_done = manifest["val"] is not None
        if val_done and (manifest["train_tokens"] >= train_tokens_needed or manifest["exhausted"]):
            return SourceStore(directory, manifest)
        if not val_done:
            writer.write_val(val_tokens, on_tokens)
            if manifest["train_tokens"] >= train_tokens_needed:
                return SourceStore(directory, manifest)
        writer.extend(train_tokens_needed, shard_tokens, on_tokens)
        return SourceStore(directory, manifest)


class _Writer:
    """The write side of one store, under its lock: the validation pass, training shards, and repairs."""

    def __init__(self, src: SourceConfig, tok: Tokenizer, directory: Path, manifest: dict, rule: dict, workers: int,
                 batch_documents: int):
        self.src, self.tok, self.dir, self.manifest, self.rule = src, tok, directory, manifest, rule
        self.workers, self.batch_documents = workers, batch_documents
        self.dtype = np.dtype(manifest["dtype"])
        self.revision = manifest.get("source_commit")  # extensions and repairs read the commit the store began at

    def save_manifest(self) -> None:
        _write_atomic(self.dir / "manifest.json", json.dumps(self.manifest, indent=1).encode())

    def encode(self, name: str, arr: np.ndarray) -> tuple[bytes, dict]:
        if len(arr) and not 0 <= int(arr.min()) <= int(arr.max()) <= np.iinfo(self.dtype).max:
            # astype would wrap such ids silently: the store would hold other tokens than the text
            raise SparknetError(
                f"tokenizer {self.tok.spec.name or self.tok.spec.kind}: token id {int(arr.max())} does not fit the "
                f"store's {self.dtype.name} (vocab_size {self.tok.vocab_size}) (fix: use a tokenizer whose ids "
                f"are below its vocabulary size)")
        data = arr.astype(self.dtype).tobytes()
        return data, _file_entry(name, data, arr)

    def write(self, name: str, arr: np.ndarray) -> dict:
        data, entry = self.encode(name, arr)
        _write_atomic(self.dir / name, data)
        return entry

    # -- the validation pass

    def select_val(self, val_tokens: int, on_tokens=None) -> tuple[np.ndarray, bytes | None, dict]:
        """The validation slice's tokens (hash order), its index file's bytes (None without a slice) and facts."""
        if val_tokens == 0:
            chosen, info = [], {"source_documents": 0, "complete": True}
        elif self.rule["kind"] == "hash-rate":
            chosen, info = _select_stream(self.src, self.tok, val_tokens, self.rule["rate"], self.revision, on_tokens)
        else:
            chosen, info = _select_smallest(self.src, self.tok, val_tokens, self.rule["max_fraction"], self.workers,
                                            self.revision)
            if on_tokens and chosen:
                on_tokens(sum(len(c[2]) for c in chosen))
        chosen.sort(key=lambda c: c[0])  # hash order: any prefix is a spread sample too
        arr = np.concatenate([c[2] for c in chosen]) if chosen else np.zeros(0, dtype=np.int64)
        index = json.dumps({"salt": self.rule["salt"], "hashes": [f"{c[0]:016x}" for c in chosen],
                            "items": [c[1] for c in chosen]}).encode() if val_tokens else None
        return arr, index, info | {"documents": len(chosen)}

    def write_val(self, val_tokens: int, on_tokens) -> None:
        """Complete before any training shard, and nothing recorded until it is."""
        arr, index, info = self.select_val(val_tokens, on_tokens)
        entry = self.write("val.bin", arr)
        if index is not None:
            _write_atomic(self.dir / "val-index.json", index)
            entry |= {"index": "val-index.json", "index_sha256": hashlib.sha256(index).hexdigest()}
        self.manifest["val"] = entry | info
        self.manifest["documents"] += info["documents"]
        self.save_manifest()

    # -- training shards

    def held_out(self) -> tuple[set[int], set[int], str | None]:
        index = SourceStore(self.dir, self.manifest).val_index()
        hashes = {int(h, 16) for h in index["hashes"]}
        return set(index["items"]), hashes, (self.rule["salt"] if hashes else None)  # nothing held out: no hashing

    def documents(self, start: int) -> Iterator[tuple[int, np.ndarray | None, bool]]:
        """(item, tokens, is_copy) of every item from `start` on, in source order: tokens None for an empty item or
        a validation document; is_copy when its text is a validation document's (dropped, counted)."""
        val_items, val_hashes, salt = self.held_out()
        docs = iter_documents(self.src, start=start, revision=self.revision)
        item = start
        for flat, lengths, hashes in _tokenized_stream(self.tok.spec, _batched(docs, self.batch_documents),
                                                       self.workers, salt):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for i, n in enumerate(lengths):
                copy = bool(n > 0 and item not in val_items and hashes is not None and int(hashes[i]) in val_hashes)
                keep = bool(n > 0 and item not in val_items) and not copy
                yield item, flat[offsets[i]:offsets[i + 1]] if keep else None, copy
                item += 1

    def extend(self, train_tokens_needed: int, shard_tokens: int, on_tokens) -> None:
        """Append shards until the store holds train_tokens_needed training tokens, or the source ends. Each shard
        records the items it consumed, so that a damaged one can be rebuilt alone."""
        m = self.manifest
        buf: list[np.ndarray] = []
        tokens = docs = items = dups = 0
        start = m["items_consumed"]

        def flush() -> None:
            nonlocal buf, tokens, docs, items, dups, start
            arr = np.concatenate(buf) if buf else np.zeros(0, dtype=np.int64)
            entry = self.write(f"train-{len(m['train_shards']):05d}.bin", arr)
            m["train_shards"].append(entry | {"documents": docs, "items_start": start, "items": items, "dups": dups})
            m["train_tokens"] += int(len(arr))
            m["items_consumed"] += items
            m["documents"] += docs
            m["val_duplicates_dropped"] += dups
            self.save_manifest()
            start += items
            buf, tokens, docs, items, dups = [], 0, 0, 0, 0

        for _, arr, copy in self.documents(m["items_consumed"]):
            items += 1
            dups += copy  # the same text as a validation document: training on it would leak
            if arr is None:
                continue
            buf.append(arr)
            tokens += len(arr)
            docs += 1
            if on_tokens:
                on_tokens(len(arr))
            if tokens >= shard_tokens or m["train_tokens"] + tokens >= train_tokens_needed:
                flush()
            if m["train_tokens"] >= train_tokens_needed:
                return
        # The source ran out: keep what is left, and remember there is no more.
        if buf:
            flush()
        m["items_consumed"] += items
        m["val_duplicates_dropped"] += dups
        m["exhausted"] = True
        self.save_manifest()

    # -- repairs

    def repair(self) -> None:
        """Rebuild exactly the files that fail their check, byte for byte as first written (their sha256 must
        match again), or refuse in one line: the store is never used half-damaged."""
        if self.manifest["val"] is None:
            return
        store = SourceStore(self.dir, self.manifest)
        bad = dict(store.damaged())
        if not bad:
            return
        where = f"{self.dir}: {', '.join(f'{f} ({why})' for f, why in bad.items())}"
        fix = f"(fix: delete {self.dir} and run prepare again)"
        if is_hub(self.src):
            check_hub_source(self.src)  # offline: one line in seconds, not a stream that retries
        v = self.manifest["val"]
        if "val.bin" in bad or v.get("index") in bad:
            arr, index, _ = self.select_val(int(self.manifest["val_target_tokens"]))
            data, entry = self.encode("val.bin", arr)
            if entry["sha256"] != v["sha256"] or (index and hashlib.sha256(index).hexdigest() != v["index_sha256"]):
                raise SparknetError(f"{where}: cannot be rebuilt as it was (the source now reads differently) {fix}")
            _write_atomic(self.dir / "val.bin", data)
            if index is not None:
                _write_atomic(self.dir / v["index"], index)
        for shard in self.manifest["train_shards"]:
            if shard["file"] in bad:
                self.rebuild_shard(shard, where, fix)
        still = store.damaged()
        if still:
            raise SparknetError(f"{self.dir}: {still[0][0]} ({still[0][1]}) after a rebuild {fix}")
        print(f"repaired {where}: rebuilt from the source, identical to what was first written", file=sys.stderr,
              flush=True)

    def rebuild_shard(self, shard: dict, where: str, fix: str) -> None:
        if "items_start" not in shard:
            raise SparknetError(f"{where}: the store predates per-shard item records, so a shard cannot be rebuilt "
                                f"alone {fix}")
        parts = [arr for _, arr, _ in itertools.islice(self.documents(shard["items_start"]), shard["items"])
                 if arr is not None]
        data, entry = self.encode(shard["file"], np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
        if entry["sha256"] != shard["sha256"]:
            raise SparknetError(f"{where}: cannot be rebuilt as it was (the source now reads differently) {fix}")
        _write_atomic(self.dir / shard["file"], data)
