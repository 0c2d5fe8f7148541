"""An audit of what training reads, recomputed from the token stores, not from the plan's own arithmetic.

    report = audit(prepared, process_counts=(1, 2))
    report.ok, report.problems, report.realized

For each process count, every micro-batch of every process at every step is produced by the same `Loader` that
`sparknet.train` iterates, and checked against an independent reading of the stores:

- the sequences of step k, over all processes and micro-batches, are exactly the plan's sequences of step k,
  each once (so step k is the same on 1 or N processes);
- each row's tokens equal the bytes at its planned position in its planned source's store: the position is
  derived here from the plan (source, ordinal), the seeded per-epoch slot order and the store's manifest, and
  the bytes are read from the shard files directly (not through the loader's reader);
- each row's labels take a loss on exactly the planned number of tokens, and its source id is the planned one;
- every store file it reads matches the sha256 recorded when it was written;
- realized tokens per source are counted from the yielded batches and must equal the plan (and so the spec);
- no document of a source's training region that the plan can read is identical to one of its own validation
  documents or another source's (compared as token sequences between end-of-text tokens).

SparkNet's v5 builder trained on another mixture than the configured one and nothing noticed; this audit fails,
naming the step, process and row, when the batches differ from what the stores and the plan say they must be.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

import numpy as np

from sparknet.data import IGNORE_INDEX, Loader

MAX_PROBLEMS = 20  # enough to see a pattern; the first one names the step


@dataclass
class AuditReport:
    process_counts: tuple[int, ...]
    steps: int
    sequences_checked: int = 0
    realized: dict[int, list[int]] = field(default_factory=dict)  # per process count, tokens per source
    planned: list[int] = field(default_factory=list)
    val_documents: dict[str, int] = field(default_factory=dict)
    train_documents_checked: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        elif len(self.problems) == MAX_PROBLEMS:
            self.problems.append("... more problems not listed")


class _RawSource:
    """One source's training tokens read straight from its shard files, and its slot order (the spec of where
    the k-th sequence drawn from a source lies), restated here independently of sparknet.data."""

    def __init__(self, store, name: str, drawn: int, seq_len: int, seed: int):
        m = store.manifest
        self.name, self.seq_len = name, seq_len
        self.shards = [np.memmap(store.dir / s["file"], dtype=np.dtype(m["dtype"]), mode="r") if s["tokens"]
                       else np.zeros(0, dtype=np.dtype(m["dtype"])) for s in m["train_shards"]]
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.shards], dtype=np.int64)])
        total = int(self.starts[-1])
        # Only the tokens prepare guaranteed for `drawn` sequences count (a store extended later by a larger
        # budget must not move this plan's slots): drawn x seq_len + 1, or all of an exhausted store.
        self.usable = min(total, drawn * seq_len + 1)
        self.num_slots = max(0, (self.usable - 1) // seq_len)
        self.seed = (seed, zlib.crc32(name.encode()))
        self.orders: dict[int, np.ndarray] = {}

    def read(self, start: int, n: int) -> np.ndarray:
        out = []
        k = int(np.searchsorted(self.starts, start, side="right") - 1)
        while n > 0:
            local = start - int(self.starts[k])
            piece = np.asarray(self.shards[k][local:local + n], dtype=np.int64)
            out.append(piece)
            start, n, k = start + len(piece), n - len(piece), k + 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def expected(self, ordinal: int) -> np.ndarray:
        epoch, k = divmod(int(ordinal), self.num_slots)
        if epoch not in self.orders:
            self.orders = {epoch: np.random.default_rng([*self.seed, epoch]).permutation(self.num_slots)}
        return self.read(int(self.orders[epoch][k]) * self.seq_len, self.seq_len + 1)


AUDIT_CHUNK_TOKENS = 1 << 24  # 16M tokens read at a time (~256 MiB as int64 with its copy): never a whole 1B store


def _document_digests(read, total: int, eot: int, chunk: int = AUDIT_CHUNK_TOKENS):
    """The digest of each complete document (the tokens before each end-of-text) of a token stream of `total`
    tokens, read `chunk` tokens at a time by `read(start, n)`; a document that spans chunks is carried over, and
    the tail after the last end-of-text (not a complete document) is left out."""
    carry = np.zeros(0, dtype=np.int64)
    for start in range(0, total, chunk):
        tokens = np.concatenate([carry, np.asarray(read(start, min(chunk, total - start)), dtype=np.int64)])
        ends = np.flatnonzero(tokens == eot)
        begin = 0
        for end in ends:
            yield hashlib.blake2b(tokens[begin:end].tobytes(), digest_size=16).digest()
            begin = int(end) + 1
        carry = tokens[begin:]


def _check_validation_disjoint(prepared, raw: dict[str, _RawSource], report: AuditReport,
                               chunk: int = AUDIT_CHUNK_TOKENS) -> None:
    """No training document of any source is identical to a validation document of any source (its own, or
    another's: two sources holding copies of one text would validate one on what the other trains)."""
    val_docs: dict[str, set[bytes]] = {}
    for name in raw:
        store = prepared.stores[name]
        eot = int(store.manifest["tokenizer"]["eot_id"])
        val_docs[name] = set(_document_digests(store.val().read, store.val_tokens, eot, chunk))
        report.val_documents[name] = len(val_docs[name])
    for name, src in raw.items():
        eot = int(prepared.stores[name].manifest["tokenizer"]["eot_id"])
        checked = 0
        leaked = dict.fromkeys(val_docs, 0)
        for digest in _document_digests(src.read, src.usable, eot, chunk):
            checked += 1
            for other, docs in val_docs.items():
                leaked[other] += digest in docs
        report.train_documents_checked[name] = checked
        if leaked[name]:
            report.fail(f"source {name}: {leaked[name]} training document(s) identical to validation documents")
        for other, n in leaked.items():
            if n and other != name:
                report.fail(f"source {name}: {n} training document(s) identical to validation documents of source "
                            f"{other}")


def _micro_batch_for(prepared, processes: int) -> int:
    """The config's micro-batch when the global batch splits into it on `processes`, else one micro-batch each
    (the micro-batch is operational: it changes no step's data)."""
    t = prepared.config.train
    per_process = t.sequences_per_step // processes
    mb = t.micro_batch_size
    return mb if isinstance(mb, int) and per_process % mb == 0 else per_process  # "auto": one micro-batch each


def audit(prepared, process_counts: tuple[int, ...] = (1,), loader_factory=None) -> AuditReport:
    """Walk every batch training would read on each process count and check it against the stores.

    `loader_factory(prepared, processes) -> Loader` replaces the real loader (tests use it to plant a fault)."""
    plan, t = prepared.plan, prepared.config.train
    sps = t.sequences_per_step
    num_steps = -(-plan.num_sequences // sps)
    report = AuditReport(tuple(process_counts), num_steps, planned=plan.tokens_per_source().tolist())
    # The audit vouches for the bytes it reads: each file's full sha256 first, so that bytes overwritten after they
    # were written are not checked against themselves.
    for name in plan.source_names:
        st = prepared.stores[name]
        for file in st.verify():
            report.fail(f"source {name}: {st.dir / file} does not match its sha256 (fix: run python -m "
                        f"sparknet.prepare again, which rebuilds it)")
    drawn = plan.sequences_per_source()
    raw = {name: _RawSource(prepared.stores[name], name, int(drawn[i]), plan.seq_len, plan.seed)
           for i, name in enumerate(plan.source_names)}

    def expected(n: int) -> np.ndarray:
        return raw[plan.source_names[int(plan.source_of[n])]].expected(int(plan.ordinal[n]))

    for world in process_counts:
        if sps % world:
            report.notes.append(f"{world} processes: skipped (the global batch of {sps} sequences does not split)")
            continue
        if loader_factory is not None:
            loader = loader_factory(prepared, world)
        else:
            micro = _micro_batch_for(prepared, world)
            loader = Loader(plan, prepared.stores, micro, sps // world // micro, world)
        counts = np.zeros(len(plan.source_names), dtype=np.int64)
        for step in range(loader.num_steps):
            seen: list[int] = []
            for micro in range(loader.grad_accum_steps):
                for rank in range(world):
                    where = f"step {step}, process {rank} of {world}, micro-batch {micro}"
                    b = loader.batch(step, micro, rank)
                    for row in range(len(b.sequence_index)):
                        n, src = int(b.sequence_index[row]), int(b.source_ids[row])
                        kept = int((b.labels[row] != IGNORE_INDEX).sum())
                        if n < 0:
                            if kept:
                                report.fail(f"{where}, row {row}: a padding row takes a loss on {kept} tokens")
                            continue
                        seen.append(n)
                        if src >= 0:
                            counts[src] += kept
                        planned_src = int(plan.source_of[n])
                        if src != planned_src:
                            report.fail(f"{where}, row {row}: sequence {n} is tagged source "
                                        f"{plan.source_names[src] if 0 <= src < len(plan.source_names) else src}, "
                                        f"planned {plan.source_names[planned_src]}")
                        want = expected(n)
                        keep = plan.sequence_tokens(n)
                        if kept != keep:
                            report.fail(f"{where}, row {row}: sequence {n} takes a loss on {kept} tokens, planned {keep}")
                        if not (np.array_equal(b.input_ids[row], want[:-1])
                                and np.array_equal(b.labels[row, :keep], want[1:keep + 1])):
                            report.fail(f"{where}, row {row}: sequence {n} holds other tokens than its planned "
                                        f"position in {plan.source_names[planned_src]}'s store")
                        report.sequences_checked += 1
            first, end = step * sps, min((step + 1) * sps, plan.num_sequences)
            if sorted(seen) != list(range(first, end)):
                report.fail(f"step {step} on {world} processes: reads sequences other than the plan's {first}..{end - 1} "
                            f"(got {len(seen)}, {len(set(seen))} distinct)")
        report.realized[world] = counts.tolist()
        if counts.tolist() != report.planned:
            report.fail(f"{world} processes: realized tokens per source {counts.tolist()} differ from the plan "
                        f"{report.planned}")
    _check_validation_disjoint(prepared, raw, report)
    return report


def format_audit(report: AuditReport, names: tuple[str, ...]) -> str:
    lines = []
    for world, realized in report.realized.items():
        for name, r, p in zip(names, realized, report.planned):
            lines.append(f"audit {world} process(es) {name:<14} realized {r:>13,} tokens, planned {p:>13,}: "
                         f"{'equal' if r == p else 'MISMATCH'}")
    for name in names:
        lines.append(f"audit {name:<14} {report.train_documents_checked.get(name, 0):,} training documents, none "
                     f"identical to its {report.val_documents.get(name, 0):,} validation documents or another "
                     f"source's"
                     if not any(p.startswith(f"source {name}:") for p in report.problems) else
                     f"audit {name:<14} training documents identical to validation documents: see below")
    lines += [f"audit: {n}" for n in report.notes]
    if report.ok:
        lines.append(f"audit: {report.steps:,} steps, {report.sequences_checked:,} sequences on "
                     f"{', '.join(map(str, report.realized))} process count(s): every sequence holds the tokens at its "
                     f"planned place in its source's store")
    else:
        lines += [f"audit FAILED: {p}" for p in report.problems]
    return "\n".join(lines)
