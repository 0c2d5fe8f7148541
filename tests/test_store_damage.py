"""A token store verifies itself: every open checks what its manifest promises (files present with their sizes, an
xxh3 content check, token ids below the vocabulary); `prepare` rebuilds exactly the damaged files, byte for byte, or
refuses in one line; nothing trains on a damaged store; `--audit` checks the sha256 of the bytes it vouches for."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from sparknet.config import SourceConfig
from sparknet.errors import SparknetError
from sparknet.store import open_store
from sparknet.store_write import prepare_source
from sparknet.tokenizer import TiktokenGPT2

TOK = TiktokenGPT2()
DOCS = [f"Document number {i} says {'hello ' * (i % 7 + 1)}and ends." for i in range(400)]


def _prepare(path, lab, **kw):
    src = SourceConfig(name="docs", kind="local", path=str(path), weight=1.0)
    return prepare_source(src, TOK, lab, train_tokens_needed=10**9, val_tokens=200, shard_tokens=1024, **kw)


def _digests(st) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(st.dir.iterdir()) if p.is_file()}


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(bytes(data[:-2]))
    elif how == "overwrite-in-vocab":  # same size, valid ids: only a content check sees it
        ids = np.frombuffer(bytes(data), dtype=np.uint16).copy()
        ids[len(ids) // 2] = (int(ids[len(ids) // 2]) + 1) % 1000
        path.write_bytes(ids.tobytes())
    elif how == "overwrite-out-of-vocab":  # an id the embedding has no row for
        ids = np.frombuffer(bytes(data), dtype=np.uint16).copy()
        ids[3] = 60_000
        path.write_bytes(ids.tobytes())


HOWS = ["delete", "truncate", "overwrite-in-vocab", "overwrite-out-of-vocab"]


@pytest.mark.parametrize("file", ["val.bin", "train-00002.bin"])
@pytest.mark.parametrize("how", HOWS)
def test_a_damaged_file_is_found_and_rebuilt_byte_for_byte(tmp_path, write_jsonl, capsys, file, how):
    path = write_jsonl("docs.jsonl", DOCS)
    st = _prepare(path, tmp_path / "lab")
    before = _digests(st)
    assert open_store(st.dir).damaged() == []
    _damage(st.dir / file, how)
    found = open_store(st.dir).damaged()
    assert [f for f, _ in found] == [file], found
    assert ("missing" in found[0][1]) == (how == "delete")
    again = _prepare(path, tmp_path / "lab")
    assert _digests(again) == before  # exactly the damaged file rewritten, as first written
    assert again.damaged() == [] and again.verify() == []
    err = capsys.readouterr().err
    assert f"repaired {st.dir}: {file}" in err and "identical to what was first written" in err


def test_the_validation_index_is_checked_and_rebuilt(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    st = _prepare(path, tmp_path / "lab")
    index = st.dir / "val-index.json"
    good = index.read_bytes()
    index.write_text(json.dumps({"salt": "x", "hashes": [], "items": []}))
    assert [f for f, _ in open_store(st.dir).damaged()] == ["val-index.json"]
    _prepare(path, tmp_path / "lab")
    assert index.read_bytes() == good


def test_a_store_whose_source_changed_is_refused_not_rebuilt_differently(tmp_path, write_jsonl, monkeypatch):
    import sparknet.store_write as store

    path = write_jsonl("docs.jsonl", DOCS)
    st = _prepare(path, tmp_path / "lab")
    shard = st.dir / "train-00001.bin"
    _damage(shard, "truncate")
    damaged_bytes = shard.read_bytes()
    # A local store's key holds its files' content, so changed files make a new store; a hub dataset's key holds its
    # name and commit, and what a commit serves can still change (a rewritten revision, another loader version):
    # the source now reads differently, and the shard can no longer be made as it was.
    reads = store.iter_documents
    monkeypatch.setattr(store, "iter_documents", lambda *a, **k: (d.replace("hello", "howdy") for d in reads(*a, **k)))
    with pytest.raises(SparknetError) as exc:
        _prepare(path, tmp_path / "lab")
    msg = str(exc.value)
    assert "\n" not in msg and "train-00001.bin" in msg and "cannot be rebuilt" in msg and "fix: delete" in msg
    assert shard.read_bytes() == damaged_bytes  # nothing written over it


def test_a_store_without_per_shard_records_is_refused_with_the_fix(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    st = _prepare(path, tmp_path / "lab")
    manifest = json.loads((st.dir / "manifest.json").read_text())
    for shard in manifest["train_shards"]:  # as a store written before shards recorded their items
        for key in ("items_start", "items", "dups", "xxh3", "max_id"):
            shard.pop(key)
    (st.dir / "manifest.json").write_text(json.dumps(manifest))
    (st.dir / "train-00000.bin").unlink()
    with pytest.raises(SparknetError, match=r"train-00000.bin \(missing\).*predates per-shard item records.*fix: delete"):
        _prepare(path, tmp_path / "lab")


def test_extension_after_a_repair_appends_the_same_bytes(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    src = SourceConfig(name="docs", kind="local", path=str(path), weight=1.0)
    full = _prepare(path, tmp_path / "whole")
    small = prepare_source(src, TOK, tmp_path / "lab", train_tokens_needed=3000, val_tokens=200, shard_tokens=1024)
    _damage(small.dir / "train-00000.bin", "overwrite-in-vocab")
    big = _prepare(path, tmp_path / "lab")
    # Shard boundaries differ (the small budget's last shard ended early); the token streams do not.
    assert big.train_tokens == full.train_tokens and big.damaged() == []
    assert np.array_equal(big.train().read(0, big.train_tokens), full.train().read(0, full.train_tokens))
    assert (big.dir / "val.bin").read_bytes() == (full.dir / "val.bin").read_bytes()


@pytest.mark.slow
def test_the_audit_checks_the_sha256_of_what_it_reads(tmp_path, tiny_mixture):
    from sparknet.audit import audit
    from sparknet.config import load_config
    from sparknet.prepare import prepare

    cfg = load_config(tiny_mixture(tmp_path), [f"lab_dir={tmp_path / 'lab'}", "mixture.total_tokens=8192"])
    prepared = prepare(cfg, progress=False)
    assert audit(prepared).ok
    st = prepared.stores["docs"]
    _damage(st.dir / st.manifest["train_shards"][0]["file"], "overwrite-in-vocab")
    report = audit(prepared)
    assert not report.ok and "does not match its sha256" in report.problems[0]


@pytest.mark.slow
def test_run_repairs_a_damaged_store_and_refuses_one_it_cannot_rebuild(tmp_path, tiny_mixture, subprocess_env):
    """`python -m sparknet.run` prepares first: a repairable store is rebuilt before training; one that cannot be
    rebuilt stops the run in one line, exit 2, before any step (no checkpoint, no result)."""
    mixture = tiny_mixture(tmp_path, mixture={"total_tokens": 8192, "sources": [
        {"name": "docs", "kind": "local", "path": str(tmp_path / "docs.jsonl"), "weight": 1.0}]})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d * 3}) + "\n" for d in DOCS))
    cmd = [sys.executable, "-m", "sparknet.run", str(mixture), f"lab_dir={tmp_path / 'lab'}", "--quiet"]
    run = lambda *extra: subprocess.run([*cmd, *extra], env=subprocess_env, capture_output=True, text=True,  # noqa: E731
                                        timeout=300)
    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    store = next((tmp_path / "lab" / "tokens").glob("local-*"))
    _damage(store / "train-00000.bin", "overwrite-out-of-vocab")
    second = run("--fresh")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "repaired" in second.stderr and open_store(store).damaged() == []

    # A store that cannot rebuild a shard alone (written before shards recorded their items), damaged.
    manifest = json.loads((store / "manifest.json").read_text())
    for shard in manifest["train_shards"]:
        shard.pop("items_start")
    (store / "manifest.json").write_text(json.dumps(manifest))
    _damage(store / "train-00000.bin", "overwrite-out-of-vocab")
    run_dir = next((tmp_path / "lab" / "runs").glob("tiny-*"))
    third = run("--fresh")
    assert third.returncode == 2
    lines = third.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-00000.bin" in lines[0] and "predates per-shard" in lines[0], third.stderr
    assert "Traceback" not in third.stderr and not (run_dir / "final").exists()
