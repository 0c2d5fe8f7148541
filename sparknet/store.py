"""Content-addressed token store: per source, uint16 shards, a held-out validation slice, a manifest.

Layout (under `<lab>/tokens/<kind>-<key>/`, key = sha256 of the source's identity, the tokenizer's
fingerprint, the validation size and the shard size):

    manifest.json     source identity, tokenizer, counts, per-file sha256, how many items consumed,
                      and for a hub dataset the commit it was read at (`source_commit`)
    val.bin           the first documents of the source, >= val_tokens tokens: never trained on
    train-00000.bin   the following documents, EOT after each, ~shard_tokens tokens per file

Every file is written to a temporary name, fsynced and renamed, and only then entered in the manifest
(itself replaced atomically). A run killed at any point leaves a valid store; the next run skips the
items already consumed and rewrites any shard that was not yet recorded, byte for byte the same.
The store holds only what the budget needs, and is extended when a later budget needs more: from the
same dataset commit it was created from, so it never mixes two versions of a moving hub dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparknet.config import SourceConfig
from sparknet.errors import SparknetError
from sparknet.sources import iter_documents, resolve_hf_commit, source_identity
from sparknet.tokenizer import Tokenizer, TokenizerSpec, from_spec

FORMAT_VERSION = 1


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65_536 else np.dtype(np.uint32)


def store_key(src: SourceConfig, tok: Tokenizer, val_tokens: int, shard_tokens: int) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "source": source_identity(src), "tokenizer": tok.fingerprint,
                       "val_tokens": val_tokens, "shard_tokens": shard_tokens}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


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

    def verify(self) -> list[str]:
        """Files whose checksum does not match the manifest (empty when the store is intact)."""
        entries = list(self.manifest["train_shards"]) + ([self.manifest["val"]] if self.manifest["val"] else [])
        return [e["file"] for e in entries if _sha256_file(self.dir / e["file"]) != e["sha256"]]


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


def _tokenize_items(spec: TokenizerSpec, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Worker: token ids of each non-empty text followed by EOT, flattened, plus per-item lengths."""
    tok = from_spec(spec)
    idx = [i for i, t in enumerate(texts) if t and t.strip()]
    lengths = np.zeros(len(texts), dtype=np.int64)
    if not idx:
        return np.zeros(0, dtype=np.int64), lengths
    encoded = tok.encode_batch([texts[i] for i in idx])
    for i, ids in zip(idx, encoded):
        lengths[i] = len(ids) + 1
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for ids in encoded:
        flat[pos:pos + len(ids)] = ids
        flat[pos + len(ids)] = tok.eot_id
        pos += len(ids) + 1
    return flat, lengths


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


def _tokenized_stream(spec: TokenizerSpec, batches: Iterator[list[str]], workers: int
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat tokens, lengths) per batch, in order; at most 2 x workers batches in flight."""
    if workers <= 1:
        for b in batches:
            yield _tokenize_items(spec, b)
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may hold threads (tokenizers, torch) that fork would copy half-made.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pending: deque = deque()
        for b in batches:
            pending.append(pool.apply_async(_tokenize_items, (spec, b)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another prepare to finish with {directory} ...", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _fresh_manifest(src: SourceConfig, tok: Tokenizer, key: str, val_target: int, shard_tokens: int) -> dict:
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
        "shard_tokens": shard_tokens,
        "val": None,
        "train_shards": [],
        "train_tokens": 0,
        "items_consumed": 0,
        "documents": 0,
        "exhausted": False,
        "created_unix": time.time(),
    }


def prepare_source(src: SourceConfig, tok: Tokenizer, lab: Path, *, train_tokens_needed: int,
                   val_tokens: int, shard_tokens: int, workers: int = 1, batch_documents: int = 256,
                   on_tokens: Callable[[int], None] | None = None) -> SourceStore:
    """Make sure the store of `src` holds >= `train_tokens_needed` training tokens (or all there is).

    Returns at once when it already does. `on_tokens(n)` is called as tokens are written (progress).
    """
    key = store_key(src, tok, val_tokens, shard_tokens)
    directory = lab / "tokens" / f"{src.kind}-{key}"
    with _locked(directory):
        for stale in directory.glob(".*.tmp*"):
            stale.unlink()  # a killed writer's partial file; its content was never recorded
        mpath = directory / "manifest.json"
        manifest = open_store(directory).manifest if mpath.exists() else \
            _fresh_manifest(src, tok, key, val_tokens, shard_tokens)
        manifest["name"] = src.name
        val_done = manifest["val"] is not None
        if val_done and (manifest["train_tokens"] >= train_tokens_needed or manifest["exhausted"]):
            return SourceStore(directory, manifest)

        dtype = np.dtype(manifest["dtype"])
        buf: list[np.ndarray] = []
        buf_tokens = buf_docs = buf_items = 0

        def flush(kind: str) -> None:
            nonlocal buf, buf_tokens, buf_docs, buf_items
            arr = np.concatenate(buf) if buf else np.zeros(0, dtype=np.int64)
            if len(arr) and not 0 <= int(arr.min()) <= int(arr.max()) <= np.iinfo(dtype).max:
                # astype would wrap such ids silently: the store would hold other tokens than the text
                raise SparknetError(
                    f"tokenizer {tok.spec.name or tok.spec.kind}: token id {int(arr.max())} does not fit the "
                    f"store's {dtype.name} (vocab_size {tok.vocab_size}) (fix: use a tokenizer whose ids "
                    f"are below its vocabulary size)")
            data = arr.astype(dtype).tobytes()
            if kind == "val":
                name = "val.bin"
            else:
                name = f"train-{len(manifest['train_shards']):05d}.bin"
            _write_atomic(directory / name, data)
            entry = {"file": name, "documents": buf_docs, "tokens": int(len(arr)),
                     "sha256": hashlib.sha256(data).hexdigest()}
            if kind == "val":
                manifest["val"] = entry
            else:
                manifest["train_shards"].append(entry)
                manifest["train_tokens"] += int(len(arr))
            manifest["items_consumed"] += buf_items
            manifest["documents"] += buf_docs
            _write_atomic(mpath, json.dumps(manifest, indent=1).encode())
            buf, buf_tokens, buf_docs, buf_items = [], 0, 0, 0

        if manifest["val"] is None and val_tokens == 0:
            flush("val")  # no held-out slice asked for: an empty one
        # .get: stores made before commits were recorded have no such key; they extend as they always did.
        docs = iter_documents(src, start=manifest["items_consumed"], revision=manifest.get("source_commit"))
        done = False
        for flat, lengths in _tokenized_stream(tok.spec, _batched(docs, batch_documents), workers):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for i, n in enumerate(lengths):
                buf_items += 1
                if n == 0:
                    continue
                buf.append(flat[offsets[i]:offsets[i + 1]])
                buf_tokens += int(n)
                buf_docs += 1
                if on_tokens:
                    on_tokens(int(n))
                if manifest["val"] is None:
                    if buf_tokens >= val_tokens:
                        flush("val")
                elif (buf_tokens >= shard_tokens
                      or manifest["train_tokens"] + buf_tokens >= train_tokens_needed):
                    flush("train")
                if manifest["val"] is not None and manifest["train_tokens"] >= train_tokens_needed:
                    done = True
                    break
            if done:
                break
        if not done:
            # The source ran out: keep what is left, and remember there is no more.
            if manifest["val"] is None:
                flush("val")
            elif buf:
                flush("train")
            manifest["items_consumed"] += buf_items
            manifest["exhausted"] = True
            _write_atomic(mpath, json.dumps(manifest, indent=1).encode())
        return SourceStore(directory, manifest)
