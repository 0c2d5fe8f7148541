"""Whether a mixture is trainable at the full budget: what an ablation may propose (`best.yaml`).

An ablation measures mixtures at a proxy budget, but its answer is trained at the mixture's full budget, where a small
source can run out: a mixture that gives a 2M-token blog 20% of 1B tokens needs it 100 times over, past its
`max_repeats`. The check is the one `sparknet.prepare` makes before a run (`check_budget`: a source's planned
sequences against its training tokens' sequence slots, within `max_repeats`), made from the study's token stores
without writing anything:
- a store that holds its whole source (`exhausted`: a local folder, pydocs, a blog, or a hub dataset streamed to its
  end) gives the source's training tokens exactly;
- a store that stopped where the proxies' plans stopped (a 1B-token hub dataset) gives only a lower bound: such a
  source is assumed to have enough, and the answer says so (`prepare` checks it for real before the run trains).

`Limits.feasible(W)` masks an array of weight vectors (the fit's candidates) with the same arithmetic the planner uses
(a source's tokens at the full budget are linear in its weight: stage shares times stage fractions times the budget);
`Limits.shortfall(weights)` plans one mixture exactly (`build_plan`) and names the source that runs out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from sparknet.config import RunConfig
from sparknet.errors import SparknetError


@dataclass(frozen=True)
class SourceLimit:
    name: str
    train_tokens: int        # training tokens in the source's store now
    whole: bool              # the store holds the whole source: train_tokens is all there is
    max_repeats: float

    def max_sequences(self, seq_len: int) -> float:
        """The most sequences a plan may draw from this source (inf when its size is not known yet)."""
        if not self.whole:
            return math.inf
        from sparknet.data import num_slots

        return num_slots(self.train_tokens, None, seq_len) * self.max_repeats


@dataclass(frozen=True)
class Limits:
    """Every source's limit, and how the full-budget config of a weight vector is built (`full_config`)."""

    names: tuple[str, ...]
    sources: tuple[SourceLimit, ...]
    full_config: Callable[[tuple[float, ...]], RunConfig]

    @property
    def unknown(self) -> list[str]:
        """Sources whose stores do not hold the whole source: their size at the full budget is not known here."""
        return [s.name for s in self.sources if not s.whole]

    @cached_property
    def linear(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Sequences per source at the full budget as a + b * w (per source), from three exact plans: a source's
        sequences are its share of the ablated weights times that part of the budget, plus what other stages give it
        (the weights sum to 1, so the share is linear in its own weight)."""
        from sparknet.mixture import build_plan

        m = len(self.names)

        def plan(w: tuple[float, ...]) -> tuple[np.ndarray, int]:
            cfg = self.full_config(w)
            return np.asarray(build_plan(cfg.mixture, cfg.train.seq_len).sequences_per_source(), float), \
                cfg.train.seq_len

        uniform, seq_len = plan(tuple(1.0 / m for _ in range(m)))
        first, _ = plan(tuple(float(i == 0) for i in range(m)))    # every source but the first at weight 0
        second, _ = plan(tuple(float(i == 1) for i in range(m)))   # the first at weight 0
        a = np.concatenate([second[:1], first[1:]])
        b = m * (uniform - a)
        return a, b, seq_len

    def feasible(self, weights: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows of `weights` (N x sources) trainable at the full budget (1% margin: the
        planner rounds to whole sequences)."""
        w = np.atleast_2d(np.asarray(weights, dtype=float))
        a, b, seq_len = self.linear
        cap = np.array([s.max_sequences(seq_len) for s in self.sources])
        return ((a + b * w) * 1.01 <= cap).all(axis=1)

    def shortfall(self, weights: Sequence[float]) -> str | None:
        """None when `weights` plan within every source's limit at the full budget, else what runs out."""
        from sparknet.mixture import build_plan

        cfg = self.full_config(tuple(float(x) for x in weights))
        try:
            seqs = build_plan(cfg.mixture, cfg.train.seq_len).sequences_per_source()
        except SparknetError as exc:
            return str(exc)
        for s, n in zip(self.sources, seqs):
            cap = s.max_sequences(cfg.train.seq_len)
            if n > cap:
                need = n / (cap / s.max_repeats) if cap else math.inf
                return (f"{s.name} runs out at the full budget ({cfg.mixture.total_tokens:,} tokens): it needs "
                        f"{int(n) * cfg.train.seq_len:,} tokens, {need:.1f} epochs of its {s.train_tokens:,} "
                        f"training tokens, past max_repeats {s.max_repeats:g}")
        return None


    def nearest_feasible(self, weights: Sequence[float]) -> tuple[float, ...] | None:
        """`weights` with every source that runs out capped at the largest share its data allows at the full budget
        and the excess given to the others in proportion to their weights (repeated until nothing runs out); None
        when the sources together cannot fill the budget."""
        a, b, seq_len = self.linear
        cap = np.array([s.max_sequences(seq_len) for s in self.sources])
        top = np.clip(np.where(b > 0, (cap / 1.01 - a) / np.where(b > 0, b, 1), np.inf), 0, 1)  # the largest shares
        w = np.asarray(weights, dtype=float).copy()
        for _ in range(len(w) + 1):
            over = w > top + 1e-12
            if not over.any():
                return tuple(float(x) for x in w)
            excess = float((w[over] - top[over]).sum())
            w[over] = top[over]
            room = ~over & (w < top)
            if not room.any():
                return None
            share = w[room] if w[room].sum() > 0 else np.ones(room.sum())
            w[room] += excess * share / share.sum()
        return None


def source_limits(cfg: RunConfig, names: Sequence[str], full_config: Callable[[tuple[float, ...]], RunConfig]
                  ) -> Limits | None:
    """The limits of `cfg`'s sources from the lab's token stores (read only); None when a store or the tokenizer is
    not there (nothing prepared yet: nothing to check against)."""
    from sparknet.prepare import resolve_tokenizer, val_params
    from sparknet.store import open_store, store_dir, val_rule

    try:
        tok = resolve_tokenizer(cfg, 1)
        out = []
        for src in cfg.mixture.sources:
            if src.name not in names:
                continue
            rule = val_rule(src, **val_params(cfg))
            st = open_store(store_dir(src, tok, cfg.lab_path, cfg.mixture.val_tokens, cfg.prepare.shard_tokens, rule))
            out.append(SourceLimit(src.name, st.train_tokens, bool(st.manifest.get("exhausted")), src.max_repeats))
    except (SparknetError, OSError):
        return None
    return Limits(tuple(names), tuple(out), full_config)

