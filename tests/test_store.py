"""Token store: exact contents, idempotence, extension, and a SIGKILLed prepare resumed byte-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sparknet.config import SourceConfig
from sparknet.errors import SparknetError
from sparknet.sources import doc_hash
from sparknet.store import open_store
from sparknet.store_write import prepare_source
from sparknet.tokenizer import TiktokenGPT2

TOK = TiktokenGPT2()
DOCS = [f"Document number {i} says {'hello ' * (i % 7 + 1)}and ends." for i in range(400)]


def local_source(path: Path, **kw) -> SourceConfig:
    return SourceConfig(name="docs", kind="local", path=str(path), weight=1.0, **kw)


def stream_of(docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids += TOK.encode(d) + [TOK.eot_id]
    return np.array(ids)


def texts_of(ids: np.ndarray) -> list[str]:
    """The documents of a token stream (EOT after each)."""
    ends = np.flatnonzero(ids == TOK.eot_id)
    return [TOK.decode(part[:-1].tolist()) for part in np.split(ids, ends + 1)[:len(ends)]]


def test_store_holds_val_then_train_with_eot_between_documents(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    st = prepare_source(local_source(path), TOK, tmp_path, train_tokens_needed=10**9, val_tokens=100,
                        shard_tokens=1024)
    val, train = st.val().read(0, st.val_tokens), st.train().read(0, st.train_tokens)
    val_docs, train_docs = texts_of(val), texts_of(train)
    # val = the documents of smallest hash, in hash order, whole, just past 100 tokens
    by_hash = sorted(DOCS, key=doc_hash)
    assert val_docs == by_hash[:len(val_docs)]
    assert val[-1] == TOK.eot_id and 100 <= st.val_tokens < 100 + 20
    assert st.val_index()["items"] == [DOCS.index(d) for d in val_docs]
    # train = all the rest, in source order; nothing shared
    assert train_docs == [d for d in DOCS if d not in set(val_docs)]
    assert np.array_equal(train, stream_of(train_docs))
    assert st.manifest["exhausted"] and st.manifest["documents"] == 400 and st.duplicates_dropped == 0
    assert all(abs(s["tokens"] - 1024) < 30 for s in st.manifest["train_shards"][:-1])  # shards end at a doc
    assert st.dtype == np.uint16 and st.verify() == []


def test_only_what_the_budget_needs_then_extension(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    src = local_source(path)
    small = prepare_source(src, TOK, tmp_path, train_tokens_needed=2000, val_tokens=0, shard_tokens=1024)
    assert 2000 <= small.train_tokens < 2000 + 30 and not small.manifest["exhausted"]
    first_files = {s["file"]: (small.dir / s["file"]).read_bytes() for s in small.manifest["train_shards"]}
    big = prepare_source(src, TOK, tmp_path, train_tokens_needed=4000, val_tokens=0, shard_tokens=1024)
    assert big.dir == small.dir and big.train_tokens >= 4000 and not big.manifest["exhausted"]
    for name, data in first_files.items():  # extension appends; it never rewrites what was there
        assert (big.dir / name).read_bytes() == data
    assert np.array_equal(big.train().read(0, big.train_tokens), stream_of(DOCS)[: big.train_tokens])
    assert big.verify() == []


def test_second_run_does_no_work(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    src = local_source(path)
    prepare_source(src, TOK, tmp_path, train_tokens_needed=3000, val_tokens=50, shard_tokens=1024)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "tokens").rglob("*.bin")}
    written = []
    again = prepare_source(src, TOK, tmp_path, train_tokens_needed=3000, val_tokens=50, shard_tokens=1024,
                           on_tokens=written.append)
    assert written == [] and again.train_tokens >= 3000
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "tokens").rglob("*.bin")} == mtimes


def test_store_is_content_addressed(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    a = prepare_source(local_source(path), TOK, tmp_path, train_tokens_needed=500, val_tokens=0, shard_tokens=1024)
    renamed = SourceConfig(name="other", kind="local", path=str(path), weight=0.2)
    b = prepare_source(renamed, TOK, tmp_path, train_tokens_needed=500, val_tokens=0, shard_tokens=1024)
    assert a.dir == b.dir  # name and weight do not change the content
    write_jsonl("docs.jsonl", DOCS[:-1] + ["changed text"])
    c = prepare_source(local_source(path), TOK, tmp_path, train_tokens_needed=500, val_tokens=0, shard_tokens=1024)
    assert c.dir != a.dir
    d = prepare_source(local_source(path), TOK, tmp_path, train_tokens_needed=500, val_tokens=64, shard_tokens=1024)
    assert d.dir != c.dir


def test_parallel_workers_write_the_same_bytes(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    one = prepare_source(local_source(path), TOK, tmp_path / "a", train_tokens_needed=10**9, val_tokens=64,
                         shard_tokens=1024, workers=1, batch_documents=7)
    two = prepare_source(local_source(path), TOK, tmp_path / "b", train_tokens_needed=10**9, val_tokens=64,
                         shard_tokens=1024, workers=2, batch_documents=7)
    files = sorted(p.name for p in one.dir.glob("*.bin"))
    assert files == sorted(p.name for p in two.dir.glob("*.bin")) and len(files) > 3
    for f in files:
        assert (one.dir / f).read_bytes() == (two.dir / f).read_bytes()


def test_damaged_store_is_a_clear_error(tmp_path, write_jsonl):
    path = write_jsonl("docs.jsonl", DOCS)
    st = prepare_source(local_source(path), TOK, tmp_path, train_tokens_needed=10**9, val_tokens=0, shard_tokens=1024)
    shard = st.dir / st.manifest["train_shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(SparknetError, match="damaged"):
        open_store(st.dir).train()
    (st.dir / "manifest.json").write_text("{not json")
    with pytest.raises(SparknetError, match="manifest is damaged"):
        open_store(st.dir)


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sparknet.config import SourceConfig
    from sparknet.store_write import prepare_source
    from sparknet.tokenizer import TiktokenGPT2
    src = SourceConfig(name="code", kind="pydocs", part="code", weight=1.0)
    prepare_source(src, TiktokenGPT2(), Path(sys.argv[1]), train_tokens_needed=1_500_000, val_tokens=5000,
                   shard_tokens=16384, workers=1, batch_documents=4)
""")


def _shard_count(lab: Path) -> int:
    manifests = list(lab.glob("tokens/*/manifest.json"))
    if not manifests:
        return 0
    try:
        return len(json.loads(manifests[0].read_text())["train_shards"])
    except (json.JSONDecodeError, OSError):
        return 0


@pytest.mark.slow
def test_sigkill_mid_prepare_then_resume_is_byte_identical(tmp_path):
    """A prepare killed with SIGKILL mid-way, then rerun, writes exactly the files an unkilled run does."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-c", KILL_SCRIPT]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([*run, str(ref)], check=True, env=env, timeout=300)
    total_shards = _shard_count(ref)
    assert total_shards > 20

    proc = subprocess.Popen([*run, str(killed)], env=env)
    deadline = time.time() + 120
    while _shard_count(killed) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = _shard_count(killed)
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert 0 < at_kill < total_shards

    subprocess.run([*run, str(killed)], check=True, env=env, timeout=300)  # the same command again
    ref_dir, killed_dir = next(ref.glob("tokens/*")), next(killed.glob("tokens/*"))
    assert ref_dir.name == killed_dir.name
    ref_files = sorted(p.name for p in ref_dir.glob("*.bin"))
    assert ref_files == sorted(p.name for p in killed_dir.glob("*.bin"))
    for name in ref_files:
        assert (ref_dir / name).read_bytes() == (killed_dir / name).read_bytes(), name
    m_ref, m_killed = (json.loads((d / "manifest.json").read_text()) for d in (ref_dir, killed_dir))
    for key in ("train_shards", "val", "train_tokens", "items_consumed", "documents", "exhausted"):
        assert m_ref[key] == m_killed[key], key
    assert not list(killed_dir.glob(".*.tmp*"))


def test_token_ids_that_do_not_fit_the_dtype_are_an_error_not_wrapped(tmp_path, write_jsonl, monkeypatch):
    import sparknet.store_write as store

    monkeypatch.setattr(store, "_dtype_for", lambda vocab_size: np.dtype(np.uint8))  # GPT-2 ids need 16 bits
    path = write_jsonl("docs.jsonl", DOCS[:20])
    with pytest.raises(SparknetError, match="does not fit the store's uint8"):
        prepare_source(local_source(path), TOK, tmp_path, train_tokens_needed=100, val_tokens=10,
                       shard_tokens=1024)


# ------------------------------------------------------------------------ hub datasets: one commit per store

SHA_A = "a" * 40
SHA_B = "b" * 40  # the branch after it moved upstream
HUB = {SHA_A: DOCS, SHA_B: [f"Rewritten document {i}." for i in range(400)]}


@pytest.fixture
def fake_hub(monkeypatch):
    """An offline stand-in for a hub dataset whose "main" moves: returns the state and the revisions read.

    `hub["head"]` is the commit "main" points at; the resolver and load_dataset both follow it.
    """
    import datasets

    import sparknet.store_write as store

    hub = {"head": SHA_A, "loaded": []}

    def load_dataset(path, *, name=None, split=None, revision=None, streaming=False):
        hub["loaded"].append(revision)
        rows = HUB[hub["head"] if revision in (None, "main") else revision]
        return datasets.Dataset.from_dict({"text": rows}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(store, "resolve_hf_commit", lambda src: hub["head"])
    return hub


def hub_source() -> SourceConfig:
    return SourceConfig(name="hub", kind="hf", path="sparknet-test-org/no-such-local-folder", weight=1.0)


HUB_VAL = {"val_tokens": 100, "val_stream_rate": 0.1}  # ~40 of the 400 documents eligible: the slice fills up


def test_hub_store_is_extended_from_the_commit_it_was_created_from(tmp_path, fake_hub):
    small = prepare_source(hub_source(), TOK, tmp_path / "lab", train_tokens_needed=2000, shard_tokens=1024,
                           **HUB_VAL)
    # read twice at the recorded commit: the validation pass (a prefix of the stream), then training
    assert small.manifest["source_commit"] == SHA_A and fake_hub["loaded"] == [SHA_A, SHA_A]
    assert json.loads((small.dir / "manifest.json").read_text())["source_commit"] == SHA_A
    consumed = small.manifest["items_consumed"]
    assert 0 < consumed < 400 and not small.manifest["exhausted"]

    fake_hub["head"] = SHA_B  # "main" moved upstream: reading "main" now would mix two versions
    big = prepare_source(hub_source(), TOK, tmp_path / "lab", train_tokens_needed=4000, shard_tokens=1024,
                         **HUB_VAL)
    assert big.dir == small.dir and fake_hub["loaded"] == [SHA_A, SHA_A, SHA_A]
    assert json.loads((big.dir / "manifest.json").read_text())["source_commit"] == SHA_A
    assert big.manifest["items_consumed"] > consumed and big.train_tokens >= 4000 and not big.manifest["exhausted"]
    # the extension is the continuation of commit A: the same store as one built at once at A
    fake_hub["head"] = SHA_A
    ref = prepare_source(hub_source(), TOK, tmp_path / "ref", train_tokens_needed=4000, shard_tokens=1024,
                         **HUB_VAL)
    assert big.train_tokens == ref.train_tokens and big.val_tokens == ref.val_tokens
    assert np.array_equal(big.val().read(0, big.val_tokens), ref.val().read(0, ref.val_tokens))
    assert np.array_equal(big.train().read(0, big.train_tokens), ref.train().read(0, ref.train_tokens))
    # val: the documents below 10% of the hash space, in stream order until 100 tokens (stored in hash order)
    eligible = [d for d in DOCS if doc_hash(d) < 0.1 * 2**64]
    val_docs = texts_of(big.val().read(0, big.val_tokens))
    assert sorted(val_docs, key=DOCS.index) == eligible[:len(val_docs)] and 100 <= big.val_tokens < 120
    assert val_docs == sorted(val_docs, key=doc_hash)
    # train: the stream without them, from commit A only
    rest = [d for d in DOCS if d not in set(val_docs)]
    assert np.array_equal(big.train().read(0, big.train_tokens), stream_of(rest)[:big.train_tokens])
    assert "10.0% hash sample of the first" in big.describe_val()
    assert big.verify() == []


def test_store_without_a_recorded_commit_still_opens_and_extends(tmp_path, fake_hub):
    """A store made before commits were recorded (or offline) extends from the configured revision."""
    small = prepare_source(hub_source(), TOK, tmp_path, train_tokens_needed=2000, val_tokens=0, shard_tokens=1024)
    mpath = small.dir / "manifest.json"
    old = json.loads(mpath.read_text())
    del old["source_commit"]
    mpath.write_text(json.dumps(old, indent=1))
    assert "source_commit" not in open_store(small.dir).manifest

    fake_hub["loaded"].clear()
    big = prepare_source(hub_source(), TOK, tmp_path, train_tokens_needed=4000, val_tokens=0, shard_tokens=1024)
    assert big.dir == small.dir and fake_hub["loaded"] == ["main"]  # as before: the configured revision
    assert "source_commit" not in json.loads(mpath.read_text())  # nothing made up after the fact
    assert big.train_tokens >= 4000
    assert np.array_equal(big.train().read(0, big.train_tokens), stream_of(DOCS)[: big.train_tokens])
    assert big.verify() == []


def test_local_store_records_no_commit(tmp_path, write_jsonl):
    st = prepare_source(local_source(write_jsonl("docs.jsonl", DOCS[:20])), TOK, tmp_path,
                        train_tokens_needed=100, val_tokens=0, shard_tokens=1024)
    assert st.manifest["source_commit"] is None
