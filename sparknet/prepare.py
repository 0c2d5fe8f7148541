"""`python -m sparknet.prepare MIXTURE.yaml [key=value ...]`: mixture spec -> token stores + report.

1. Build the plan (exact per-source sequence counts) from the config alone.
2. For each source, tokenize just enough into its store (cached, resumable, extended on demand).
3. Report per source: tokens required and available, repeat factor; fail (exit 2) before any
   training when a source cannot meet its share within its `max_repeats`.

A second run with the same spec finds every store complete and does no tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from sparknet.config import RunConfig, config_from_cli, mixture_cli
from sparknet.data import Loader, num_slots
from sparknet.errors import SparknetError, cli_main
from sparknet.mixture import Plan, build_plan, window_deviation
from sparknet.sources import iter_documents, source_identity
from sparknet.store import SourceStore, _write_atomic, prepare_source
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
        t = self.config.train
        return Loader(self.plan, self.stores, t.micro_batch_size, t.grad_accum_steps, world_size)

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


def resolve_tokenizer(cfg: RunConfig, workers: int) -> Tokenizer:
    """The configured tokenizer; `bpe` is trained on the mixture once and cached under the lab."""
    tc = cfg.tokenizer
    if tc.name == "gpt2":
        return from_spec(TokenizerSpec("gpt2"))
    if tc.name != "bpe":
        return from_spec(TokenizerSpec("hf", tc.name, tc.revision))
    ident = json.dumps({"sources": [source_identity(s) for s in cfg.mixture.sources],
                        "vocab_size": tc.vocab_size, "bytes": tc.train_bytes_per_source}, sort_keys=True)
    out = cfg.lab_path / "tokenizers" / f"bpe-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
    if not (out / "tokenizer.json").exists():
        print(f"training a byte-level BPE ({tc.vocab_size} tokens) on the mixture -> {out}", flush=True)
        texts: dict[str, list[str]] = {}
        for src in cfg.mixture.sources:
            got, budget = [], tc.train_bytes_per_source
            for doc in iter_documents(src):
                if doc:
                    got.append(doc)
                    budget -= len(doc.encode("utf-8"))
                    if budget <= 0:
                        break
            texts[src.name] = got
        out.parent.mkdir(parents=True, exist_ok=True)
        train_bpe(texts, tc.vocab_size, out)
    return from_spec(TokenizerSpec("hf", str(out.resolve()), "main"))


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
    tok = resolve_tokenizer(cfg, n_workers)
    lab = cfg.lab_path
    seq_per_source = plan.sequences_per_source()
    tokens_per_source = plan.tokens_per_source()
    stages = cfg.mixture.stage_list()
    stores: dict[str, SourceStore] = {}
    written = 0
    for i, src in enumerate(cfg.mixture.sources):
        # Enough tokens that every planned sequence gets its own slot: n * seq_len + 1 (one-token overlap).
        needed = int(seq_per_source[i]) * cfg.train.seq_len + 1
        bar = _progress(needed + cfg.mixture.val_tokens, f"{src.name:>14}", progress)

        def on_tokens(n: int, bar=bar) -> None:
            nonlocal written
            written += n
            if bar is not None:
                bar.update(n)

        stores[src.name] = prepare_source(
            src, tok, lab, train_tokens_needed=needed, val_tokens=cfg.mixture.val_tokens,
            shard_tokens=cfg.prepare.shard_tokens, workers=n_workers,
            batch_documents=cfg.prepare.batch_documents, on_tokens=on_tokens)
        if bar is not None:
            bar.close()

    reports = []
    for i, src in enumerate(cfg.mixture.sources):
        st = stores[src.name]
        slots = num_slots(st.train_tokens, int(seq_per_source[i]), cfg.train.seq_len)  # as the loader sees it
        # The spec's own figure: weight share x stage fraction x budget, from the config's fractions.
        ends = [start for start, _ in stages[1:]] + [1.0]
        spec_tokens = sum(w[src.name] / sum(w.values()) * (end - start) * cfg.mixture.total_tokens
                          for (start, w), end in zip(stages, ends))
        weights = "/".join(f"{w[src.name]:g}" for _, w in stages)
        reports.append(SourceReport(
            name=src.name, weight=weights, sequences=int(seq_per_source[i]),
            tokens_required=int(tokens_per_source[i]), tokens_spec=float(spec_tokens),
            tokens_available=st.train_tokens, val_tokens=st.val_tokens,
            documents=int(st.manifest["documents"]),
            repeat_factor=float(seq_per_source[i] / slots) if slots else (np.inf if seq_per_source[i] else 0.0),
            max_repeats=src.max_repeats, store=str(st.dir), source_commit=st.manifest.get("source_commit")))
    prepared = Prepared(cfg, plan, tok, stores, reports, window_deviation(plan), time.time() - t0, written)
    if write_report:
        out = lab / "prepared" / f"{cfg.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, json.dumps(prepared.to_dict(), indent=1).encode())
    return prepared


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
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    ap.add_argument("--verify", action="store_true", help="re-check every shard's sha256")
    ap.add_argument("--audit", action="store_true",
                    help="walk every training batch and check realized tokens per source against the plan")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args, cfg = config_from_cli(ap, argv)
    if cfg is None:
        return 0
    if args.workers is not None and args.workers < 1:
        raise SparknetError(f"--workers: must be >= 1, got {args.workers}")
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
        loader = prepared.loader()
        realized = loader.tokens_per_source_realized()
        planned = prepared.plan.tokens_per_source()
        for name, r, p in zip(prepared.plan.source_names, realized, planned):
            print(f"audit {name:<14} realized {int(r):>13,} tokens, planned {int(p):>13,}: "
                  f"{'equal' if r == p else 'MISMATCH'}")
        if (realized != planned).any():
            raise SparknetError(f"{args.mixture}: realized tokens per source differ from the plan (a bug: "
                                f"please report it with this mixture)")
        print(f"audit: {loader.num_steps:,} steps of {loader.sequences_per_step} sequences hold exactly "
              f"{int(realized.sum()):,} tokens, as planned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
