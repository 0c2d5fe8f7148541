"""Validation slices that represent their source, never trained on, by document or by content (tokenizer included)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sparknet.config import SourceConfig, config_from_dict
from sparknet.sources import doc_hash, iter_documents, normalize_text
from sparknet.store_write import prepare_source, val_excluder
from sparknet.tokenizer import TiktokenGPT2

TOK = TiktokenGPT2()
TOPICS = {  # five files, five clearly different vocabularies: a slice from one file only is plain to see
    "news": "minister election parliament vote coalition budget reform protest senate policy".split(),
    "recipes": "flour butter oven simmer garlic whisk saucepan knead dough sugar".split(),
    "code": "function variable compiler pointer struct return loop array integer thread".split(),
    "poems": "moonlight sorrow whisper river longing meadow twilight ember dusk willow".split(),
    "legal": "plaintiff statute hereby liability tribunal clause defendant appeal covenant verdict".split(),
}


def topic_docs(topic: str, n: int = 60) -> list[str]:
    rng = random.Random(topic)
    return [f"{topic} {i}: " + " ".join(rng.choice(TOPICS[topic]) for _ in range(rng.randint(20, 60)))
            for i in range(n)]


def texts_of(ids: np.ndarray) -> list[str]:
    ends = np.flatnonzero(ids == TOK.eot_id)
    return [TOK.decode(part[:-1].tolist()) for part in np.split(ids, ends + 1)[:len(ends)]]


def write_topics(folder: Path, write_jsonl) -> dict[str, list[str]]:
    out = {}
    for k, topic in enumerate(TOPICS):
        out[topic] = topic_docs(topic)
        write_jsonl(f"{folder.name}/{k}_{topic}.jsonl", out[topic])
    return out


def local(path: Path, name: str = "web", kind: str = "local") -> SourceConfig:
    return SourceConfig(name=name, kind=kind, path=str(path), weight=1.0)


# ----------------------------------------------------------------------------------- 4: spread, stable, bounded


def test_val_slice_is_spread_over_every_file_stable_and_disjoint(tmp_path, write_jsonl):
    by_topic = write_topics(tmp_path / "web", write_jsonl)
    all_docs = [d for docs in by_topic.values() for d in docs]
    total = sum(len(ids) + 1 for ids in TOK.encode_batch(all_docs))
    src = local(tmp_path / "web")
    a = prepare_source(src, TOK, tmp_path / "a", train_tokens_needed=10**9, val_tokens=1000, shard_tokens=4096)
    val_docs = texts_of(a.val().read(0, a.val_tokens))
    train_docs = texts_of(a.train().read(0, a.train_tokens))

    # spread: documents of (almost) every file, none dominating; the first documents would all be news
    per_file = Counter(d.split()[0] for d in val_docs)
    assert len(per_file) >= 4 and max(per_file.values()) <= len(val_docs) / 2, per_file
    assert 1000 <= a.val_tokens < 1000 + 100 and a.val_tokens <= 0.1 * total
    # the smallest-hash documents, in hash order; the index names their positions in the source
    assert val_docs == sorted(all_docs, key=doc_hash)[:len(val_docs)]
    assert a.val_index()["items"] == [all_docs.index(d) for d in val_docs]
    # disjoint from training, and together they are the source
    assert not set(val_docs) & set(train_docs)
    assert sorted(val_docs + train_docs) == sorted(all_docs)
    assert train_docs == [d for d in all_docs if d not in set(val_docs)]  # training keeps the source's order

    # stable: another lab, another run: the very same bytes
    b = prepare_source(src, TOK, tmp_path / "b", train_tokens_needed=10**9, val_tokens=1000, shard_tokens=4096)
    for name in ("val.bin", "val-index.json"):
        assert (a.dir / name).read_bytes() == (b.dir / name).read_bytes()
    assert a.manifest["val"] == b.manifest["val"] and a.verify() == [] and b.verify() == []
    assert a.manifest["val_rule"]["kind"] == "smallest-hash" and a.manifest["val_rule"]["max_fraction"] == 0.1
    assert f"{len(val_docs)} of 300 docs" in a.describe_val() and "spread over the whole source" in a.describe_val()


def test_a_small_budget_still_validates_on_the_whole_source(tmp_path, write_jsonl):
    """The training pass stops early, the validation pass does not: the slice is the same for every budget."""
    write_topics(tmp_path / "web", write_jsonl)
    src = local(tmp_path / "web")
    small = prepare_source(src, TOK, tmp_path / "a", train_tokens_needed=500, val_tokens=1000, shard_tokens=4096)
    assert not small.manifest["exhausted"] and small.train_tokens < 1000
    full = prepare_source(src, TOK, tmp_path / "b", train_tokens_needed=10**9, val_tokens=1000, shard_tokens=4096)
    assert (small.dir / "val.bin").read_bytes() == (full.dir / "val.bin").read_bytes()
    assert len({d.split()[0] for d in texts_of(small.val().read(0, small.val_tokens))}) >= 4


def test_a_tiny_source_keeps_most_of_itself_for_training(tmp_path):
    """A five-post blog asked for 1M validation tokens gives at most 10% of its tokens to validation."""
    blog = tmp_path / "blog"
    blog.mkdir()
    rng = random.Random(5)
    for i in range(5):
        words = " ".join(rng.choice(TOPICS["poems"]) for _ in range(40 + 30 * i))
        (blog / f"post{i}.md").write_text(f"---\ntitle: Post {i}\n---\n\n# Post {i}\n\n{words}\n", encoding="utf-8")
    (blog / "note.md").write_text("A short note.\n", encoding="utf-8")
    st = prepare_source(local(blog, "blog", "blog"), TOK, tmp_path / "lab", train_tokens_needed=10**9,
                        val_tokens=1_000_000, shard_tokens=4096)
    total = st.val_tokens + st.train_tokens
    assert 0 < st.val_tokens <= 0.1 * total and st.val_documents <= 2
    assert "A short note." in texts_of(st.val().read(0, st.val_tokens))  # the only one small enough to go first
    assert st.manifest["documents"] == 6 and st.manifest["val"]["capped"]
    assert f"{st.val_documents} of 6 docs" in st.describe_val() and "capped at 10% of its" in st.describe_val()


def test_hub_val_is_a_fixed_rate_sample_of_the_stream(tmp_path, monkeypatch):
    import datasets

    import sparknet.store_write as store

    docs = topic_docs("news", 300) + topic_docs("legal", 300)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": docs})
                        .to_iterable_dataset())
    monkeypatch.setattr(store, "resolve_hf_commit", lambda src: None)
    src = SourceConfig(name="hub", kind="hf", path="org/data", weight=1.0)
    st = prepare_source(src, TOK, tmp_path, train_tokens_needed=10**9, val_tokens=400, shard_tokens=4096,
                        val_stream_rate=0.05)
    val_docs = texts_of(st.val().read(0, st.val_tokens))
    eligible = [d for d in docs if doc_hash(d) < 0.05 * 2**64]
    # the first eligible documents of the stream until 400 tokens; the eligible ones after it are trained on
    assert sorted(val_docs, key=docs.index) == eligible[:len(val_docs)] and len(val_docs) < len(eligible)
    train_docs = texts_of(st.train().read(0, st.train_tokens))
    assert train_docs == [d for d in docs if d not in set(val_docs)]
    assert st.manifest["val_rule"] == {"kind": "hash-rate", "rate": 0.05, "salt": "sparknet-val-1",
                                       "hash": "blake2b-64 of the whitespace-collapsed, stripped text"}
    window = docs.index(max(val_docs, key=docs.index)) + 1
    assert st.manifest["val"]["source_documents"] == window
    assert st.describe_val() == f"5.0% hash sample of the first {window:,} docs streamed: {len(val_docs)} docs"


# ----------------------------------------------------------------------------------- 5: no leakage by content


def reflowed(text: str, k: int) -> str:
    """The same document with other whitespace: wrapped, indented, trailing blanks."""
    words = text.split()
    return ("  " * k) + "\n".join(" ".join(words[i:i + 7]) for i in range(0, len(words), 7)) + " \n" * k


def test_copies_of_validation_docs_are_dropped_from_training_and_counted(tmp_path, write_jsonl):
    base = topic_docs("recipes", 120)
    write_jsonl("src/a.jsonl", base)
    write_jsonl("src/b.jsonl", [reflowed(d, 1) for d in base[::2]])  # every other doc again, re-wrapped
    write_jsonl("src/c.jsonl", [reflowed(d, 2) for d in base])  # all of them again
    src = local(tmp_path / "src")
    st = prepare_source(src, TOK, tmp_path / "lab", train_tokens_needed=10**9, val_tokens=500, shard_tokens=4096)
    val_docs = texts_of(st.val().read(0, st.val_tokens))
    assert val_docs and all(d in base for d in val_docs)  # each text once, at its first position
    val_norm = {normalize_text(d) for d in val_docs}
    train_docs = texts_of(st.train().read(0, st.train_tokens))
    assert not val_norm & {normalize_text(d) for d in train_docs}
    copies = sum(1 + (base.index(d) % 2 == 0) for d in val_docs)  # in c.jsonl, and in b.jsonl for even ones
    assert st.duplicates_dropped == st.manifest["val_duplicates_dropped"] == copies > 0
    assert len(train_docs) == 120 + 60 + 120 - len(val_docs) - copies  # nothing else is dropped

    # extended later, from a store holding a few shards: the copies are still found (the index is on disk)
    lab2 = tmp_path / "lab2"
    first = prepare_source(src, TOK, lab2, train_tokens_needed=1000, val_tokens=500, shard_tokens=1024)
    assert first.duplicates_dropped < copies and not first.manifest["exhausted"]
    (first.dir / "val-index.json").chmod(0o444)
    more = prepare_source(src, TOK, lab2, train_tokens_needed=10**9, val_tokens=500, shard_tokens=1024)
    assert more.duplicates_dropped == copies
    assert texts_of(more.train().read(0, more.train_tokens)) == train_docs


def test_prepare_report_names_the_dropped_copies(tmp_path, write_jsonl):
    from sparknet.prepare import format_report, prepare

    base = topic_docs("code", 100)
    write_jsonl("src/a.jsonl", base)
    write_jsonl("src/b.jsonl", [reflowed(d, 1) for d in base])
    cfg = config_from_dict({"lab_dir": str(tmp_path / "lab"), "name": "dups",
                            "mixture": {"total_tokens": "30k", "val_tokens": 300, "sources": [
                                {"name": "code", "kind": "local", "path": str(tmp_path / "src"), "weight": 1.0,
                                 "max_repeats": 4}]},
                            "model": {"preset": "cpu-tiny"}, "train": {"seq_len": 128},
                            "prepare": {"shard_tokens": 2048, "workers": 1}})
    p = prepare(cfg, workers=1, progress=False)
    s = p.sources[0]
    assert s.duplicates_dropped == s.val_documents > 0  # each validation doc has one copy, in b.jsonl
    assert (f"code: val {s.val_tokens:,} tokens = {s.val_documents} of 200 docs" in format_report(p))
    assert f"dropped {s.duplicates_dropped} training docs identical to validation docs" in format_report(p)
    saved = json.loads((tmp_path / "lab" / "prepared" / "dups.json").read_text())["sources"][0]
    assert saved["duplicates_dropped"] == s.duplicates_dropped and saved["val_documents"] == s.val_documents


def test_bpe_is_trained_on_training_documents_only(tmp_path, write_jsonl, monkeypatch):
    import sparknet.prepare as prep

    by_topic = write_topics(tmp_path / "web", write_jsonl)
    all_docs = [d for docs in by_topic.values() for d in docs]
    seen: dict[str, list[str]] = {}
    real = prep.train_bpe

    def capture(texts_by_source, vocab_size, out_dir):
        seen.update(texts_by_source)
        return real(texts_by_source, vocab_size, out_dir)

    monkeypatch.setattr(prep, "train_bpe", capture)
    cfg = config_from_dict({"lab_dir": str(tmp_path / "lab"), "name": "bpe",
                            "mixture": {"total_tokens": "4k", "val_tokens": 1000, "sources": [
                                {"name": "web", "kind": "local", "path": str(tmp_path / "web"), "weight": 1.0}]},
                            "tokenizer": {"name": "bpe", "vocab_size": 400},
                            "model": {"preset": "cpu-tiny"}, "train": {"seq_len": 128},
                            "prepare": {"shard_tokens": 2048, "workers": 1}})
    p = prep.prepare(cfg, workers=1, progress=False)
    st = p.stores["web"]
    val_texts = {all_docs[i] for i in st.val_index()["items"]}
    assert len(val_texts) == st.val_documents > 3
    trained = set(seen["web"])
    assert trained and not trained & val_texts  # on today's code the first docs, the old slice, were in it
    assert trained <= set(all_docs) and len(trained) >= 0.8 * len(all_docs)
    # the exclusion is decided before the tokenizer exists: a superset of the slice, not much more
    held_out = val_excluder(cfg.mixture.sources[0], 1000)
    excluded = {d for d in all_docs if held_out(doc_hash(d))}
    assert val_texts <= excluded and trained == set(all_docs) - excluded


def test_hub_exclusion_is_the_stream_rate():
    src = SourceConfig(name="hub", kind="hf", path="org/data", weight=1.0)
    held_out = val_excluder(src, 1000, val_stream_rate=0.25)
    assert held_out(0) and held_out(2**62 - 1) and not held_out(2**62) and not held_out(2**64 - 1)
    assert not val_excluder(src, 0)(0)  # no validation slice: nothing held out


@pytest.mark.parametrize("a,b,same", [("a  b\n c", "a b c", True), ("\ta b c  ", "a b c", True),
                                      ("a b c", "a b C", False), ("ab c", "a bc", False)])
def test_doc_hash_is_of_the_normalized_text(a, b, same):
    assert (doc_hash(a) == doc_hash(b)) is same
    assert 0 <= doc_hash(a) < 2**64 and doc_hash(a) != doc_hash(a, salt="other")


def test_pydocs_slice_is_spread_over_the_stdlib(tmp_path):
    src = SourceConfig(name="code", kind="pydocs", part="code", weight=1.0)
    # Enough held-out tokens for several modules whichever ones the hashes pick (one large module can hold 20k).
    st = prepare_source(src, TOK, tmp_path, train_tokens_needed=2000, val_tokens=100_000, shard_tokens=4096)
    items = st.val_index()["items"]
    n = st.manifest["val"]["source_documents"]
    assert len(items) >= 3 and n > 300
    assert max(items) - min(items) > n / 3  # not a run of neighbouring modules
    code = list(iter_documents(src))
    assert texts_of(st.val().read(0, st.val_tokens)) == [code[i] for i in items]
