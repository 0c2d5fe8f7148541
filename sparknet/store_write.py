"""Writing a token store: tokenizing a source in order, drawing its validation slice, appending training shards,
and rebuilding a damaged file byte for byte (the layout and the read side are `sparknet.store`'s).

Every file is written to a temporary name, fsynced and renamed, and only then entered in the manifest (itself
replaced atomically). A run killed at any point leaves a valid store; the next run skips the items already consumed
and rewrites any shard that was not yet recorded, byte for byte the same (a killed validation pass starts over: it
writes nothing until it is complete). Each shard records the items it consumed, so that a damaged shard is rebuilt
alone, and its sha256 must match again before it is used.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
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
from sparknet.store import (
    CANDIDATE_CHARS_PER_TOKEN,
    FORMAT_VERSION,
    VAL_MAX_FRACTION,
    VAL_STREAM_RATE,
    SourceStore,
    _dtype_for,
    open_store,
    store_key,
    val_rule,
)
from sparknet.tokenizer import Tokenizer, TokenizerSpec, from_spec


def _write_atomic(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data, durable=True)


def _file_entry(name: str, data: bytes, arr: np.ndarray) -> dict:
    """What the manifest promises about one written file: its size, both checksums and its largest token id."""
    return {"file": name, "tokens": int(len(arr)), "sha256": hashlib.sha256(data).hexdigest(),
            "xxh3": xxhash.xxh3_64_hexdigest(data), "max_id": int(arr.max()) if len(arr) else -1}


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
