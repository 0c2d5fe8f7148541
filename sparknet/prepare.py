"""`python -m sparknet.prepare MIXTURE.yaml [key=value ...]`: mixture spec -> token stores + report.

1. Build the plan (exact per-source sequence counts) from the config alone.
2. Check every source before tokenizing any (`preflight`): local paths exist and hold text, no two
   sources read the same data, a small local source can hold its share at all; then hub sources whose
   stores still need tokens must be reachable (in seconds, not after ~25 s of retries per source).
3. For each source, tokenize just enough into its store (cached, resumable, extended on demand): the
   sources read from disk first, so that one too small for its share stops the run before the hub
   sources stream hundreds of millions of tokens.
4. Report per source: tokens required and available, repeat factor, how the validation slice was
   drawn; fail (exit 2) before any training when a source cannot meet its share within `max_repeats`.

A second run with the same spec finds every store complete and does no tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparknet import atomic
from sparknet.config import RunConfig, config_from_cli, mixture_cli
from sparknet.data import Loader, num_slots
from sparknet.errors import SparknetError, at_least, cli_main
from sparknet.mixture import Plan, build_plan, window_deviation
from sparknet.sources import (
    check_hub_source,
    check_overlaps,
    check_source,
    doc_hash,
    is_hub,
    iter_documents,
    source_identity,
)
from sparknet.store import SourceStore, store_complete, val_rule
from sparknet.store_write import prepare_source, val_excluder
from sparknet.tokenizer import Tokenizer, TokenizerSpec, from_spec, train_bpe


@dataclass
class SourceReport:
    name: str
    weight: str
    sequences: int
    tokens_required: int
    tokens_spec: float  # weight x budget, summed over stages
    tokens_available: int
    val_tokens: int
    documents: int
    repeat_factor: float
    max_repeats: float
    store: str
    source_commit: str | None = None  # the hub dataset commit the store was read at
    val_documents: int = 0
    val_selection: str = ""  # how the validation slice was drawn, in words
    duplicates_dropped: int = 0  # training documents dropped as copies of validation documents

    @property
    def ok(self) -> bool:
        return self.repeat_factor <= self.max_repeats + 1e-12


@dataclass
class Prepared:
    config: RunConfig
    plan: Plan
    tokenizer: Tokenizer
    stores: dict[str, SourceStore]
    sources: list[SourceReport] = field(default_factory=list)
    window_deviation: float = 0.0
    seconds: float = 0.0
    tokens_written: int = 0

    def loader(self, world_size: int = 1) -> Loader:
        """Batches for `world_size` processes: the global batch of a step is the recipe's on any count, and
        each process's accumulation is derived from it."""
        t = self.config.train
        return Loader(self.plan, self.stores, t.micro_batch_size, t.grad_accum_steps(world_size), world_size)

    def to_dict(self) -> dict:
        return {
            "name": self.config.name,
            "total_tokens": self.plan.total_tokens,
            "seq_len": self.plan.seq_len,
            "num_sequences": self.plan.num_sequences,
            "plan_sha256": self.plan.fingerprint(),
            "window_sequences": self.plan.window_size,
            "max_window_deviation_sequences": self.window_deviation,
            "tokenizer": {"spec": list(vars(self.tokenizer.spec).values()),
                          "fingerprint": self.tokenizer.fingerprint},
            "sources": [vars(s) | {"ok": s.ok} for s in self.sources],
        }


def val_params(cfg: RunConfig) -> dict:
    """The validation selection knobs (config fields when present, else the store's defaults)."""
    return {"val_max_fraction": cfg.mixture.val_max_fraction, "val_stream_rate": cfg.mixture.val_stream_rate}


def _bpe_dir(cfg: RunConfig):
    tc = cfg.tokenizer
    # The validation rule is in the key: a BPE trained before validation documents were kept out of it
    # (or for another slice) has seen text it must not have.
    ident = json.dumps({"sources": [source_identity(s) for s in cfg.mixture.sources],
                        "vocab_size": tc.vocab_size, "bytes": tc.train_bytes_per_source,
                        "val_tokens": cfg.mixture.val_tokens,
                        "val_rules": [val_rule(s, **val_params(cfg)) for s in cfg.mixture.sources]}, sort_keys=True)
    return cfg.lab_path / "tokenizers" / f"bpe-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def bpe_texts(cfg: RunConfig) -> dict[str, list[str]]:
    """What the `bpe` tokenizer trains on: the first train_bytes_per_source of each source's training documents.

    Every document its store may hold out for validation is skipped (`val_excluder`: a superset of the slice,
    decided before the tokenizer exists), so nothing trained has seen a validation document.
    """
    tc = cfg.tokenizer
    texts: dict[str, list[str]] = {}
    for src in cfg.mixture.sources:
        held_out = val_excluder(src, cfg.mixture.val_tokens, **val_params(cfg))
        got, budget = [], tc.train_bytes_per_source
        for doc in iter_documents(src):
            if doc and doc.strip() and not held_out(doc_hash(doc)):
                got.append(doc)
                budget -= len(doc.encode("utf-8"))
                if budget <= 0:
                    break
        texts[src.name] = got
    return texts


def resolve_tokenizer(cfg: RunConfig, workers: int) -> Tokenizer:
    """The configured tokenizer; `bpe` is trained on the mixture's training documents once, cached in the lab."""
    tc = cfg.tokenizer
    if tc.name == "gpt2":
        return from_spec(TokenizerSpec("gpt2"))
    if tc.name != "bpe":
        return from_spec(TokenizerSpec("hf", tc.name, tc.revision))
    out = _bpe_dir(cfg)
    if not (out / "tokenizer.json").exists():
        print(f"training a byte-level BPE ({tc.vocab_size} tokens) on the mixture -> {out}", flush=True)
        texts = bpe_texts(cfg)
        out.parent.mkdir(parents=True, exist_ok=True)
        train_bpe(texts, tc.vocab_size, out)
    return from_spec(TokenizerSpec("hf", str(out.resolve()), "main"))


def check_lab(lab: Path) -> None:
    """lab_dir is a folder this process can write (or can create): one line naming it and the fix otherwise, before
    anything is read or written."""
    if lab.exists() and not lab.is_dir():
        raise SparknetError(f"lab_dir: {lab} is a file, not a folder (fix: lab_dir=PATH of a folder, or move the file "
                            f"away)")
    existing = next(p for p in (lab, *lab.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SparknetError(f"lab_dir: {existing} is not writable, so {lab} cannot hold the lab (fix: lab_dir=PATH "
                            f"of a folder you can write, or change its permissions)")


def preflight(cfg: RunConfig, plan: Plan) -> None:
    """Everything about the sources that can be checked without tokenizing, for all of them first.

    Local paths exist and hold supported, non-empty files (blog posts are read: they are few); no two
    sources read the same files or dataset; and a source of plain text files can hold its share at all:
    a token of a byte-level BPE (GPT-2's, sparknet's `bpe`) covers at least one byte, so its bytes (plus
    one end-of-text per file) bound its tokens from above. Hub reachability comes later: it depends on
    whether the stores still need tokens.
    """
    check_lab(cfg.lab_path)
    seq_len = cfg.train.seq_len
    byte_level = cfg.tokenizer.name in ("gpt2", "bpe")
    seq_per_source = plan.sequences_per_source()
    sizes = [check_source(src) for src in cfg.mixture.sources]
    check_overlaps(cfg.mixture.sources)  # before the sizes: a source read twice is the first thing to fix
    for i, src in enumerate(cfg.mixture.sources):
        size = sizes[i]
        if size is None or not byte_level:
            continue
        files, nbytes = size
        bound = nbytes + files
        max_slots = max(0, (bound - 1) // seq_len)
        seqs = int(seq_per_source[i])
        if seqs > src.max_repeats * max_slots:
            raise SparknetError(
                f"mixture.sources.{src.name}: its {files:,} file(s) under {src.path} hold {nbytes:,} bytes, at most "
                f"{bound:,} tokens, but its share is {seqs:,} sequences of {seq_len} tokens, more than "
                f"max_repeats={src.max_repeats:g} times that (fix: add text to it, lower its weight, raise "
                f"mixture.sources.{src.name}.max_repeats, or lower mixture.total_tokens)")


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)


def prepare(cfg: RunConfig, *, workers: int | None = None, progress: bool = True,
            write_report: bool = True) -> Prepared:
    """Plan the mixture and make sure every source's store can serve it."""
    t0 = time.time()
    n_workers = workers if workers is not None else (cfg.prepare.workers or os.cpu_count() or 1)
    plan = build_plan(cfg.mixture, cfg.train.seq_len)
    sources = cfg.mixture.sources
    preflight(cfg, plan)  # every source, before any is tokenized: a missing blog fails in milliseconds
    vp = val_params(cfg)
    seq_per_source = plan.sequences_per_source()
    # Enough tokens that every planned sequence gets its own slot: n * seq_len + 1 (one-token overlap).
    needed = [int(seq_per_source[i]) * cfg.train.seq_len + 1 for i in range(len(sources))]
    lab = cfg.lab_path
    checked: set[str] = set()
    if cfg.tokenizer.name == "bpe" and not (_bpe_dir(cfg) / "tokenizer.json").exists():
        for src in sources:  # training the tokenizer reads every source, the hub ones too
            check_hub_source(src)
            checked.add(src.name)
    tok = resolve_tokenizer(cfg, n_workers)
    store_args = {"val_tokens": cfg.mixture.val_tokens, "shard_tokens": cfg.prepare.shard_tokens} | vp
    # Only hub sources whose stores cannot serve the budget yet need the network: a finished store is
    # used offline.
    streaming = [i for i, src in enumerate(sources) if is_hub(src)
                 and not store_complete(src, tok, lab, train_tokens_needed=needed[i], **store_args)]
    for i in streaming:
        if sources[i].name not in checked:
            check_hub_source(sources[i])

    stores: dict[str, SourceStore] = {}
    written = 0
    # Sources read from disk first: if one cannot fill its share, say so before the hub sources stream.
    order = sorted(range(len(sources)), key=lambda i: i in streaming)
    for k, i in enumerate(order):
        src = sources[i]
        if streaming and i == streaming[0] and k:
            check_budget(Prepared(cfg, plan, tok, stores, [_report(cfg, plan, j, stores[sources[j].name])
                                                           for j in order[:k]]))
        bar = _progress(needed[i] + cfg.mixture.val_tokens, f"{src.name:>14}", progress)

        def on_tokens(n: int, bar=bar) -> None:
            nonlocal written
            written += n
            if bar is not None:
                bar.update(n)

        stores[src.name] = prepare_source(
            src, tok, lab, train_tokens_needed=needed[i], workers=n_workers,
            batch_documents=cfg.prepare.batch_documents, on_tokens=on_tokens, **store_args)
        if bar is not None:
            bar.close()
    stores = {src.name: stores[src.name] for src in sources}  # the mixture's order

    reports = [_report(cfg, plan, i, stores[src.name]) for i, src in enumerate(sources)]
    prepared = Prepared(cfg, plan, tok, stores, reports, window_deviation(plan), time.time() - t0, written)
    if write_report:
        out = lab / "prepared" / f"{cfg.name}.json"
        atomic.write_json(out, prepared.to_dict(), durable=True)
    return prepared


def _report(cfg: RunConfig, plan: Plan, i: int, st: SourceStore) -> SourceReport:
    src = cfg.mixture.sources[i]
    seqs = int(plan.sequences_per_source()[i])
    slots = num_slots(st.train_tokens, seqs, cfg.train.seq_len)  # as the loader sees it
    # The spec's own figure: weight share x stage fraction x budget, from the config's fractions.
    stages = cfg.mixture.stage_list()
    ends = [start for start, _ in stages[1:]] + [1.0]
    spec_tokens = sum(w[src.name] / sum(w.values()) * (end - start) * cfg.mixture.total_tokens
                      for (start, w), end in zip(stages, ends))
    weights = "/".join(f"{w[src.name]:g}" for _, w in stages)
    return SourceReport(
        name=src.name, weight=weights, sequences=seqs,
        tokens_required=int(plan.tokens_per_source()[i]), tokens_spec=float(spec_tokens),
        tokens_available=st.train_tokens, val_tokens=st.val_tokens,
        documents=int(st.manifest["documents"]),
        repeat_factor=float(seqs / slots) if slots else (np.inf if seqs else 0.0),
        max_repeats=src.max_repeats, store=str(st.dir), source_commit=st.manifest.get("source_commit"),
        val_documents=st.val_documents, val_selection=st.describe_val(), duplicates_dropped=st.duplicates_dropped)


def format_report(p: Prepared) -> str:
    head = (f"{'source':<14} {'weight':>9} {'sequences':>10} {'tokens req.':>13} {'available':>13} "
            f"{'val':>9} {'epochs':>7} {'max':>5}  status")
    lines = [f"mixture {p.config.name}: {p.plan.total_tokens:,} tokens = {p.plan.num_sequences:,} sequences "
             f"of {p.plan.seq_len} (last {p.plan.last_len}), tokenizer {p.tokenizer.spec.kind}"
             f"{':' + p.tokenizer.spec.name if p.tokenizer.spec.name else ''}", head, "-" * len(head)]
    for s in p.sources:
        status = "ok" if s.ok else "TOO SMALL"
        lines.append(f"{s.name:<14} {s.weight:>9} {s.sequences:>10,} {s.tokens_required:>13,} "
                     f"{s.tokens_available:>13,} {s.val_tokens:>9,} {s.repeat_factor:>7.2f} "
                     f"{s.max_repeats:>5g}  {status}")
    total_req = sum(s.tokens_required for s in p.sources)
    lines.append(f"{'total':<14} {'':>9} {p.plan.num_sequences:>10,} {total_req:>13,}")
    lines += [f"{s.name}: read at hub commit {s.source_commit}" for s in p.sources if s.source_commit]
    for s in p.sources:
        dropped = (f"; dropped {s.duplicates_dropped:,} training docs identical to validation docs"
                   if s.duplicates_dropped else "")
        lines.append(f"{s.name}: val {s.val_tokens:,} tokens = {s.val_selection}{dropped}")
    lines.append(f"every {p.plan.window_size:,}-sequence window holds each source's share to within "
                 f"{p.window_deviation:.3f} sequences; wrote {p.tokens_written:,} tokens in {p.seconds:.1f} s")
    return "\n".join(lines)


def check_budget(p: Prepared) -> None:
    """Fail before training when a source cannot supply its share within `max_repeats`."""
    for s in p.sources:
        if s.sequences and s.tokens_available <= p.plan.seq_len:
            raise SparknetError(
                f"mixture.sources.{s.name}: has {s.tokens_available:,} training tokens after the "
                f"{s.val_tokens:,}-token validation slice, too few for one sequence (fix: lower "
                f"mixture.val_tokens, add data to the source, or set its weight to 0)")
        if not s.ok:
            raise SparknetError(
                f"mixture.sources.{s.name}: needs {s.repeat_factor:.2f} epochs of its "
                f"{s.tokens_available:,} training tokens but max_repeats is {s.max_repeats:g} (fix: raise "
                f"mixture.sources.{s.name}.max_repeats, lower its weight, add data, or lower mixture.total_tokens)")


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = mixture_cli("python -m sparknet.prepare", __doc__.split("\n")[0], "mixture.total_tokens=50M")
    ap.add_argument("--workers", type=at_least(1, 2), default=None, help="tokenizer processes (default: all cores)")
    ap.add_argument("--verify", action="store_true", help="re-check every shard's sha256")
    ap.add_argument("--audit", action="store_true",
                    help="walk every batch training reads and check it against the stores: each sequence's tokens at "
                         "its planned position, realized tokens per source, no validation document trained on")
    ap.add_argument("--audit-processes", default="1,2", metavar="N,M",
                    help="with --audit: the process counts whose batches are walked (default 1,2)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args, cfg = config_from_cli(ap, argv)
    if cfg is None:
        return 0
    # Checked before anything is prepared: a typo must not cost a tokenization first.
    try:
        counts = tuple(int(x) for x in args.audit_processes.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise SparknetError(f"--audit-processes: expected process counts >= 1 such as 1,8, got "
                            f"{args.audit_processes!r} (fix: --audit-processes 1,2)")
    from sparknet.locks import prepare_lock

    check_lab(cfg.lab_path)  # before the lock, which would create the folder
    with prepare_lock(cfg.lab_path):  # a run or study preparing the same lab waits, rather than racing on a tokenizer
        prepared = prepare(cfg, workers=args.workers, progress=not args.quiet)
    print(format_report(prepared))
    if args.verify:
        for st in prepared.stores.values():
            bad = st.verify()
            if bad:
                raise SparknetError(f"{st.dir}: {', '.join(bad)} do not match their checksums "
                                    f"(fix: delete {st.dir} and prepare again)")
        print("verify: every shard matches its sha256")
    check_budget(prepared)
    if args.audit:
        from sparknet.audit import audit, format_audit

        report = audit(prepared, counts)
        print(format_audit(report, prepared.plan.source_names))
        if not report.ok:
            raise SparknetError(f"{args.mixture}: the audit failed: {report.problems[0]} (fix: this is a bug or a "
                                f"damaged store: run prepare --verify, and report it with this mixture)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
