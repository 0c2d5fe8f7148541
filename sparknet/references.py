"""Count-table references: what a unigram and a bigram model built from a run's own training tokens score on the
slices the run is scored on. A proxy run whose held-out loss is not below its bigram reference has not yet learned
more than a table of adjacent-token counts, so it cannot rank mixtures by anything a bigger model would learn.

What is counted: exactly the tokens the run's plan trains on. For every source, the plan's `drawn` sequences are
the slots `sparknet.data.SourceSequences` visits (its `num_slots` and per-epoch seeded orders, reused here, not
re-derived): a slot seen in `e` epochs counts `e` times, and the plan's final sequence, cut to `plan.last_len`
predicted tokens, counts only those. All sources are counted together (the model trains on the mixture), so the
unigram total is exactly `plan.total_tokens`. The draw order does not change a count, so the tokens are read slot
range by slot range, not sequence by sequence: seconds for tens of millions of tokens.

Boundaries, as the model sees them: a training slot is seq_len + 1 tokens (slots overlap by one), and every one of
its seq_len predicted tokens has its previous token inside the window; held-out slices are scored in
non-overlapping windows of seq_len + 1 tokens that overlap the same way (`train.source_val_loss`). So every
predicted token, in training and in validation, is conditioned on its predecessor: the bigram counts are the
(input, label) pairs the loader yields, and a held-out slice scores all its consecutive pairs. Pairs that span a
document's end (EOT, then the next document's first token) are counted and scored like any other, as the model
sees them. WikiText-2 is scored as `objective.wikitext_valid_result` scores it: windows of the model's context with
stride = context, whose first token has no context and is not scored (`context=None` scores every pair).

Smoothing (V = the tokenizer's vocabulary; counts over the run's training tokens):
- unigram, Lidstone (add-alpha, alpha = 0.5 by default): p(b) = (c(b) + alpha) / (N + alpha V).
- bigram, interpolated absolute discounting with that unigram as the lower order (Ney, Essen & Kneser 1994):
  p(b | a) = max(c(a b) - D, 0) / c(a .) + D N1+(a .) / c(a .) p(b), and p(b) itself when `a` was never a context
  (c(a .) = 0); N1+(a .) is the number of distinct tokens seen after `a`. The discount is Ney's estimate from the
  run's own bigram count-of-counts, D = n1 / (n1 + 2 n2), kept within [0.1, 0.9] (0.5 when there are no
  singletons): no parameter is tuned on the held-out slices. Both are proper distributions over the V tokens and
  give every token a nonzero probability, so every reference is finite.
Held-out references are in nats per predicted token (as `val/loss/<source>`); WikiText-2 ones in bits per byte
with `evaluate`'s definition: mean NLL per scored token / ln 2 x text tokens / UTF-8 bytes of the joined text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from sparknet.data import SourceSequences
from sparknet.mixture import Plan

ALPHA = 0.5  # unigram add-alpha
DISCOUNT_RANGE = (0.1, 0.9)
_CHUNK_TOKENS = 1 << 23  # positions read and counted at a time (bounds the int64 temporaries to ~100 MB)


def _group_sum(codes: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct codes, summed weights) of `codes`; weights None counts occurrences."""
    if weights is None:
        uniq, counts = np.unique(codes, return_counts=True)
        return uniq, counts.astype(np.int64)
    keep = weights != 0
    codes, weights = codes[keep], weights[keep]
    if len(codes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(codes, kind="stable")
    c, w = codes[order], weights[order].astype(np.int64)
    starts = np.flatnonzero(np.concatenate([[True], c[1:] != c[:-1]]))
    return c[starts], np.add.reduceat(w, starts)


@dataclass
class NgramCounts:
    """Unigram counts of predicted tokens and bigram counts of (previous, predicted) pairs, over `vocab_size` ids.
    Bigrams are kept sparse: sorted pair codes prev x V + next and their counts (never a dense V x V table)."""

    vocab_size: int
    unigram: np.ndarray  # int64 [V]
    codes: np.ndarray  # int64 [pairs seen], sorted
    counts: np.ndarray  # int64 [pairs seen]
    alpha: float = ALPHA

    @classmethod
    def from_pairs(cls, prev: np.ndarray, nxt: np.ndarray, vocab_size: int, weights: np.ndarray | None = None,
                   alpha: float = ALPHA) -> NgramCounts:
        """Counts of the pairs (prev[i], nxt[i]), each `weights[i]` times (an integer >= 0; default once)."""
        prev, nxt = np.asarray(prev, np.int64), np.asarray(nxt, np.int64)
        w = None if weights is None else np.asarray(weights, np.int64)
        if len(nxt) and (min(int(prev.min()), int(nxt.min())) < 0
                         or max(int(prev.max()), int(nxt.max())) >= vocab_size):
            raise ValueError(f"token ids outside [0, {vocab_size})")
        unigram = np.bincount(nxt, weights=w, minlength=vocab_size)
        codes, counts = _group_sum(prev * vocab_size + nxt, w)
        return cls(vocab_size, np.rint(unigram).astype(np.int64), codes, counts, alpha)

    @classmethod
    def merge(cls, parts: Sequence[NgramCounts], vocab_size: int, alpha: float = ALPHA) -> NgramCounts:
        """The counts of all `parts` together."""
        if not parts:
            return cls(vocab_size, np.zeros(vocab_size, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), alpha)
        if any(p.vocab_size != vocab_size for p in parts):
            raise ValueError("counts over different vocabularies")
        unigram = np.sum([p.unigram for p in parts], axis=0).astype(np.int64)
        if len(parts) == 1:
            return cls(vocab_size, unigram, parts[0].codes, parts[0].counts, alpha)
        codes, counts = _group_sum(np.concatenate([p.codes for p in parts]),
                                   np.concatenate([p.counts for p in parts]))
        return cls(vocab_size, unigram, codes, counts, alpha)

    @property
    def tokens(self) -> int:
        """Predicted tokens counted (= bigram pairs)."""
        return int(self.unigram.sum())

    @cached_property
    def _contexts(self) -> tuple[np.ndarray, np.ndarray]:
        prev = self.codes // self.vocab_size
        totals = np.bincount(prev, weights=self.counts, minlength=self.vocab_size)
        return np.rint(totals).astype(np.int64), np.bincount(prev, minlength=self.vocab_size).astype(np.int64)

    @property
    def context_totals(self) -> np.ndarray:
        """c(a .): pairs with `a` as the previous token."""
        return self._contexts[0]

    @property
    def context_types(self) -> np.ndarray:
        """N1+(a .): distinct tokens seen after `a`."""
        return self._contexts[1]

    @cached_property
    def discount(self) -> float:
        """Ney's D = n1 / (n1 + 2 n2) from the bigram count-of-counts, within DISCOUNT_RANGE (0.5 without n1)."""
        n1, n2 = int((self.counts == 1).sum()), int((self.counts == 2).sum())
        if n1 == 0:
            return 0.5
        return float(min(max(n1 / (n1 + 2 * n2), DISCOUNT_RANGE[0]), DISCOUNT_RANGE[1]))

    def unigram_logprob(self, nxt: np.ndarray) -> np.ndarray:
        """ln p(b) for each b in `nxt` (Lidstone)."""
        nxt = np.asarray(nxt, np.int64)
        v = self.vocab_size
        return np.log(self.unigram[nxt] + self.alpha) - math.log(self.tokens + self.alpha * v)

    def bigram_logprob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """ln p(b | a) for each pair (a, b) (absolute discounting interpolated with the unigram)."""
        prev, nxt = np.asarray(prev, np.int64), np.asarray(nxt, np.int64)
        p_uni = np.exp(self.unigram_logprob(nxt))
        query = prev * self.vocab_size + nxt
        idx = np.searchsorted(self.codes, query)
        found = idx < len(self.codes)
        found[found] = self.codes[idx[found]] == query[found]
        c_ab = np.zeros(len(query), np.float64)
        c_ab[found] = self.counts[idx[found]]
        c_a = self.context_totals[prev].astype(np.float64)
        t_a = self.context_types[prev].astype(np.float64)
        d = self.discount
        seen = c_a > 0
        safe = np.where(seen, c_a, 1.0)
        p = np.where(seen, np.maximum(c_ab - d, 0.0) / safe + d * t_a / safe * p_uni, p_uni)
        return np.log(p)

    def cross_entropy(self, prev: np.ndarray, nxt: np.ndarray) -> tuple[float, float]:
        """(unigram, bigram) mean NLL in nats per predicted token over the pairs (prev[i], nxt[i])."""
        if len(nxt) == 0:
            raise ValueError("no pair to score")
        return float(-self.unigram_logprob(nxt).mean()), float(-self.bigram_logprob(prev, nxt).mean())

    def describe(self) -> str:
        return (f"unigram add-{self.alpha:g} over {self.vocab_size:,} ids; bigram absolute discounting "
                f"D={self.discount:.3f} interpolated with that unigram")


# ---------------------------------------------------------------------------------------------------------
# The run's training tokens
# ---------------------------------------------------------------------------------------------------------


def slot_multiplicity(seqs: SourceSequences, drawn: int) -> np.ndarray:
    """How many times each slot of `seqs` is among the first `drawn` sequences drawn from it (its whole epochs,
    plus the head of the next epoch's seeded order, which `SourceSequences` itself draws)."""
    mult = np.zeros(seqs.num_slots, dtype=np.int64)
    if drawn <= 0:
        return mult
    epochs, rest = divmod(int(drawn), seqs.num_slots)
    mult += epochs
    if rest:
        mult[seqs._order(epochs)[:rest]] += 1
    return mult


def source_counts(name: str, tokens, drawn: int, seq_len: int, seed: int, vocab_size: int, *,
                  cut_ordinal: int | None = None, cut_len: int | None = None, alpha: float = ALPHA) -> NgramCounts:
    """Counts of the first `drawn` sequences the plan draws from source `name` (its training `tokens`, a
    `store.TokenArray` or anything with `len` and `read(start, n)`), every sequence predicting seq_len tokens
    except the one of ordinal `cut_ordinal`, which predicts `cut_len` (the plan's cut final sequence)."""
    if drawn <= 0:
        return NgramCounts.merge([], vocab_size, alpha)
    seqs = SourceSequences(name, tokens, seq_len, seed, int(drawn))
    mult = slot_multiplicity(seqs, drawn)
    cut_slot = -1
    if cut_ordinal is not None and cut_len is not None and cut_len < seq_len:
        epoch, k = divmod(int(cut_ordinal), seqs.num_slots)
        cut_slot = int(seqs._order(epoch)[k])
    acc: NgramCounts | None = None
    pending: list[NgramCounts] = []
    slots_per_chunk = max(1, _CHUNK_TOKENS // seq_len)
    for s0 in range(0, seqs.num_slots, slots_per_chunk):
        s1 = min(seqs.num_slots, s0 + slots_per_chunk)
        if not mult[s0:s1].any():
            continue
        w = np.repeat(mult[s0:s1], seq_len)  # per pair position i: (tokens[i], tokens[i + 1])
        if s0 <= cut_slot < s1:
            w[(cut_slot - s0) * seq_len + cut_len:(cut_slot - s0 + 1) * seq_len] -= 1
        ids = tokens.read(s0 * seq_len, len(w) + 1)
        pending.append(NgramCounts.from_pairs(ids[:-1], ids[1:], vocab_size, None if (w == 1).all() else w, alpha))
        # Merged whenever the pending parts outgrow what is merged already: bounded memory, O(n log n) in all.
        if acc is None or sum(len(p.codes) for p in pending) >= len(acc.codes):
            acc = NgramCounts.merge(([acc] if acc is not None else []) + pending, vocab_size, alpha)
            pending = []
    return NgramCounts.merge(([acc] if acc is not None else []) + pending, vocab_size, alpha)


def plan_counts(plan: Plan, stores: Mapping, vocab_size: int, alpha: float = ALPHA) -> NgramCounts:
    """Counts of every token the plan trains on, all sources together (`stores`: name -> `store.SourceStore`)."""
    drawn = plan.sequences_per_source()
    owner = int(plan.source_of[-1]) if plan.num_sequences else -1
    parts = []
    for i, name in enumerate(plan.source_names):
        cut = (int(plan.ordinal[-1]), plan.last_len) if i == owner else (None, None)
        parts.append(source_counts(name, stores[name].train(), int(drawn[i]), plan.seq_len, plan.seed, vocab_size,
                                   cut_ordinal=cut[0], cut_len=cut[1], alpha=alpha))
    return NgramCounts.merge(parts, vocab_size, alpha)


# ---------------------------------------------------------------------------------------------------------
# What is scored
# ---------------------------------------------------------------------------------------------------------


def held_out_ids(store, seq_len: int, max_tokens: int) -> np.ndarray | None:
    """The held-out tokens `train.source_val_loss` scores for `store` (its first eval.val_tokens + 1, cut to whole
    windows of seq_len predicted tokens; every consecutive pair is one prediction); None when not one window."""
    val = store.val()
    n = len(val) if not max_tokens else min(len(val), max_tokens + 1)
    windows = (n - 1) // seq_len if n else 0
    if windows <= 0:
        return None
    return val.read(0, windows * seq_len + 1)


def held_out_references(counts: NgramCounts, stores: Mapping, names: Sequence[str], seq_len: int,
                        max_tokens: int) -> dict[str, dict[str, float]]:
    """{source: {"unigram": nats, "bigram": nats, "tokens": predicted tokens}} on each source's held-out slice, as
    the run scores it (sources without one window are left out, as they have no val loss)."""
    out = {}
    for name in names:
        ids = held_out_ids(stores[name], seq_len, max_tokens)
        if ids is None:
            continue
        uni, bi = counts.cross_entropy(ids[:-1], ids[1:])
        out[name] = {"unigram": uni, "bigram": bi, "tokens": len(ids) - 1}
    return out


def bits_per_byte_references(counts: NgramCounts, ids: Sequence[int], text_bytes: int,
                             context: int | None = None) -> dict[str, float]:
    """Unigram and bigram bits per byte on a text of token `ids` and `text_bytes` UTF-8 bytes, as `evaluate`
    defines it: mean NLL per scored token / ln 2 x len(ids) / text_bytes. With `context`, the tokens at multiples
    of it (the first of each window when stride = context) are not scored, as the model's windows leave them."""
    ids = np.asarray(ids, np.int64)
    pos = np.arange(1, len(ids))
    if context:
        pos = pos[pos % context != 0]
    if len(pos) == 0 or text_bytes <= 0:
        raise ValueError("nothing to score")
    uni, bi = counts.cross_entropy(ids[pos - 1], ids[pos])
    scale = len(ids) / text_bytes / math.log(2)
    return {"unigram_bpb": uni * scale, "bigram_bpb": bi * scale, "unigram_nats": uni, "bigram_nats": bi,
            "tokens": int(len(pos)), "text_tokens": int(len(ids)), "bytes": int(text_bytes)}


def wikitext_text(rows: Sequence[str]) -> str:
    """The WikiText-2 text the objective scores: rows joined with "\\n\\n" (rows end with their own "\\n")."""
    return "\n\n".join(rows)


_WIKITEXT_IDS: dict = {}  # (tokenizer fingerprint, text length, text hash) -> ids: one entry, the latest


def wikitext_ids(tok, text: str) -> list[int]:
    """`text` (the WikiText-2 validation text) tokenized by `tok`, once per process and tokenizer: a study's trials
    share a process, and the run's references and the objective read the same ids."""
    key = (tok.fingerprint, len(text), hash(text))
    if key not in _WIKITEXT_IDS:
        _WIKITEXT_IDS.clear()
        _WIKITEXT_IDS[key] = tok.encode_batch([text])[0]
    return _WIKITEXT_IDS[key]


# ---------------------------------------------------------------------------------------------------------
# A run's references
# ---------------------------------------------------------------------------------------------------------


@dataclass
class References:
    """A run's count-table references. `unigram` / `bigram`: nats per token per held-out slice; `wikitext_valid`:
    {"unigram_bpb", "bigram_bpb", ...} on the WikiText-2 validation split, None when not computed."""

    unigram: dict[str, float]
    bigram: dict[str, float]
    scored_tokens: dict[str, int]
    train_tokens: int
    vocab_size: int
    alpha: float
    discount: float
    smoothing: str
    seconds: float
    wikitext_valid: dict | None = None
    wikitext_skipped: str = ""

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: val/ref_unigram/<source>, val/ref_bigram/<source>, wikitext-valid/ref_{unigram,bigram}_bpb."""
        out = {f"val/ref_unigram/{k}": v for k, v in self.unigram.items()}
        out |= {f"val/ref_bigram/{k}": v for k, v in self.bigram.items()}
        if self.wikitext_valid:
            out["wikitext-valid/ref_unigram_bpb"] = self.wikitext_valid["unigram_bpb"]
            out["wikitext-valid/ref_bigram_bpb"] = self.wikitext_valid["bigram_bpb"]
        return out

    def result_fields(self) -> dict:
        """What a run's result dict carries: `val_ref_unigram` and `val_ref_bigram` ({source: nats}, beside
        `val_loss`), `wikitext_valid_ref_unigram_bpb` / `_bigram_bpb` (None when not computed) and `references`
        (how they were computed)."""
        wv = self.wikitext_valid or {}
        return {"val_ref_unigram": dict(self.unigram), "val_ref_bigram": dict(self.bigram),
                "wikitext_valid_ref_unigram_bpb": wv.get("unigram_bpb"),
                "wikitext_valid_ref_bigram_bpb": wv.get("bigram_bpb"),
                "references": asdict(self)}


def past_bigram(val_loss: Mapping[str, float], ref_bigram: Mapping[str, float]) -> dict[str, float]:
    """{source: ref_bigram - val_loss}: how far the model is past its bigram reference (negative: not yet)."""
    return {k: float(ref_bigram[k]) - float(v) for k, v in val_loss.items() if k in ref_bigram}


def run_references(plan: Plan, stores: Mapping, vocab_size: int, seq_len: int, val_tokens: int, *,
                   wikitext_ids: Sequence[int] | None = None, wikitext_bytes: int | None = None,
                   context: int | None = None, alpha: float = ALPHA) -> References:
    """The references of a run trained on `plan` from `stores` (name -> `store.SourceStore`): every held-out slice
    as the run scores it (`seq_len`, `val_tokens` = eval.val_tokens), and, given the token ids and UTF-8 size of the
    WikiText-2 validation text (the run's tokenizer), its bits per byte with windows of `context` tokens."""
    t0 = time.perf_counter()
    counts = plan_counts(plan, stores, vocab_size, alpha)
    held = held_out_references(counts, stores, plan.source_names, seq_len, val_tokens)
    wikitext = None
    if wikitext_ids is not None and wikitext_bytes:
        wikitext = bits_per_byte_references(counts, wikitext_ids, wikitext_bytes, context)
    return References(
        unigram={k: v["unigram"] for k, v in held.items()}, bigram={k: v["bigram"] for k, v in held.items()},
        scored_tokens={k: int(v["tokens"]) for k, v in held.items()}, train_tokens=counts.tokens,
        vocab_size=vocab_size, alpha=alpha, discount=counts.discount, smoothing=counts.describe(),
        seconds=time.perf_counter() - t0, wikitext_valid=wikitext)
