"""The audit checks what training reads against the stores, so it can fail: a loader that returns a neighbouring
source's sequence, or a training document identical to a validation one, is caught and named."""

from __future__ import annotations

import numpy as np
import pytest
from tinylab import two_local_sources

from sparknet.audit import audit, format_audit
from sparknet.config import config_from_dict
from sparknet.data import Loader
from sparknet.prepare import main as prepare_main
from sparknet.prepare import prepare


def docs_for(prefix: str, n: int) -> list[str]:
    return [f"{prefix} item {i}: " + " ".join(f"{prefix}{j * i}" for j in range(i % 13 + 5)) for i in range(n)]


def config(tmp_path):
    return two_local_sources(tmp_path)


@pytest.fixture
def prepared(tmp_path, write_jsonl):
    write_jsonl("a/a.jsonl", docs_for("alpha", 300))
    write_jsonl("b/b.jsonl", docs_for("beta", 200))
    return prepare(config_from_dict(config(tmp_path)), workers=1, progress=False)


def test_a_correct_loader_passes_on_one_and_several_processes(prepared):
    report = audit(prepared, (1, 3, 5))
    assert report.ok, report.problems
    assert report.realized[1] == report.realized[3] == prepared.plan.tokens_per_source().tolist()
    assert 5 not in report.realized and "5 processes: skipped" in report.notes[0]  # 12 sequences do not split
    assert report.sequences_checked == 2 * prepared.plan.num_sequences
    assert all(report.val_documents[n] > 0 and report.train_documents_checked[n] > 0 for n in ("a", "b"))
    assert "every sequence holds the tokens at its planned place" in format_audit(report, ("a", "b"))


class NeighbourLoader(Loader):
    """Returns, for one row of one step, the same ordinal of the neighbouring source: the counts per source, the
    source ids and the loss mask all stay as planned, so only a check of the tokens themselves can see it."""

    bad_step = 7

    def batch(self, step, micro=0, rank=0):
        b = super().batch(step, micro, rank)
        if step == self.bad_step and micro == 0 and rank == 0:
            n = int(b.sequence_index[0])
            other = (int(self.plan.source_of[n]) + 1) % len(self.sources)
            window = self.sources[other].sequence(int(self.plan.ordinal[n]) % self.sources[other].num_slots)
            b.input_ids[0], b.labels[0] = window[:-1], window[1:]
        return b


def test_a_loader_returning_a_neighbouring_sources_sequence_fails_the_audit_naming_the_step(prepared):
    def planted(p, world):
        t = p.config.train
        return NeighbourLoader(p.plan, p.stores, t.micro_batch_size, t.grad_accum_steps(world), world)

    # What the old audit looked at, counts per source, cannot see the fault:
    assert planted(prepared, 1).tokens_per_source_realized().tolist() == prepared.plan.tokens_per_source().tolist()
    report = audit(prepared, (1,), loader_factory=planted)
    assert not report.ok
    assert report.problems[0].startswith("step 7, process 0 of 1, micro-batch 0, row 0: sequence ")
    assert "holds other tokens than its planned position" in report.problems[0]
    assert len(report.problems) == 1  # that row only


def test_a_training_document_identical_to_a_validation_document_fails_the_audit(prepared):
    store = prepared.stores["a"]
    eot = int(store.manifest["tokenizer"]["eot_id"])
    val = np.asarray(store.val().read(0, store.val_tokens))
    doc = val[: int(np.flatnonzero(val == eot)[0]) + 1]  # the first validation document and its end-of-text
    shard = np.memmap(store.dir / store.manifest["train_shards"][0]["file"], dtype=store.dtype, mode="r+")
    shard[: len(doc)] = doc  # the store's first training document becomes that validation document (truncating
    shard.flush()            # whatever followed it into one shorter document)
    report = audit(prepared, (1,))
    assert any(p.startswith("source a: ") and "identical to validation documents" in p for p in report.problems)


def test_prepare_audit_cli_checks_one_and_n_processes(tmp_path, write_jsonl, capsys):
    import yaml

    write_jsonl("a/a.jsonl", docs_for("alpha", 300))
    write_jsonl("b/b.jsonl", docs_for("beta", 200))
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path)))
    assert prepare_main([str(path), "--quiet", "--workers", "1", "--audit", "--audit-processes", "1,2,5"]) == 0
    out = capsys.readouterr().out
    assert "audit 2 process(es) a" in out and "5 processes: skipped" in out
    assert "every sequence holds the tokens at its planned place" in out
    assert prepare_main([str(path), "--quiet", "--workers", "1", "--audit", "--audit-processes", "x"]) == 2
    assert "--audit-processes: expected process counts" in capsys.readouterr().err


def test_documents_are_read_in_chunks_with_the_same_result_as_whole(prepared):
    """The audit streams a store (a 1B-token source is never held in memory): documents cut by a chunk boundary are
    carried over, so any chunk size finds the same documents, and a planted leak is found across boundaries."""
    import sparknet.audit as audit_module

    store = prepared.stores["a"]
    eot = int(store.manifest["tokenizer"]["eot_id"])
    tokens = np.asarray(store.val().read(0, store.val_tokens), dtype=np.int64)
    ends = np.flatnonzero(tokens == eot)
    whole = list(audit_module._document_digests(store.val().read, store.val_tokens, eot, chunk=10**9))
    assert len(whole) == len(ends) > 3
    for chunk in (1, 7, int(ends[0]), int(ends[0]) + 1):
        assert list(audit_module._document_digests(store.val().read, store.val_tokens, eot, chunk=chunk)) == whole

    reference = audit(prepared, (1,))
    raw = {n: audit_module._RawSource(prepared.stores[n], n, int(d), prepared.plan.seq_len, prepared.plan.seed)
           for n, d in zip(prepared.plan.source_names, prepared.plan.sequences_per_source())}

    def in_chunks_of_5():
        report = audit_module.AuditReport((1,), 0)
        audit_module._check_validation_disjoint(prepared, raw, report, chunk=5)
        return report

    small = in_chunks_of_5()
    assert small.train_documents_checked == reference.train_documents_checked
    assert small.val_documents == reference.val_documents and small.ok
    # The first training document made identical to the first validation document: found in chunks of 5 too.
    doc = tokens[: int(ends[0]) + 1]
    shard = np.memmap(store.dir / store.manifest["train_shards"][0]["file"], dtype=store.dtype, mode="r+")
    shard[: len(doc)] = doc
    shard.flush()
    assert in_chunks_of_5().problems == ["source a: 1 training document(s) identical to validation documents"]


def test_a_training_document_identical_to_another_sources_validation_document_fails_the_audit(tmp_path, write_jsonl):
    """Two sources holding a copy of one text (different files, so the overlap check cannot see it): the copy that
    one source validates on must not be trained on by the other."""
    a_docs, b_docs = docs_for("alpha", 300), docs_for("beta", 200)
    write_jsonl("a/a.jsonl", a_docs)
    write_jsonl("b/b.jsonl", b_docs)
    first = prepare(config_from_dict(config(tmp_path)), workers=1, progress=False)
    assert audit(first, (1,)).ok
    # Which of a's documents are held out is decided by their hashes: copy all of a's to the front of b's file (a
    # different file), so a's validation documents are also in the part of b's training region the plan reads.
    write_jsonl("b/b.jsonl", a_docs + b_docs)
    cfg = config(tmp_path)
    cfg["lab_dir"] = str(tmp_path / "lab2")
    report = audit(prepare(config_from_dict(cfg), workers=1, progress=False), (1,))
    crossed = [p for p in report.problems if p.startswith("source b: ") and "validation documents of source a" in p]
    assert len(crossed) == 1, report.problems
