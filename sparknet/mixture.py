"""Weights x budget -> an exact, smoothly interleaved plan of training sequences.

The plan is the whole training run as a list of sequences, each tagged with the source it comes from
and its ordinal within that source (the k-th sequence drawn from it). It is a pure function of the
mixture config and `seq_len`, so every process, and every resumed run, computes the same one.

Guarantees (tested):
- The run holds exactly `ceil(total_tokens / seq_len)` sequences; the last one is cut to the remainder,
  so the number of trained (predicted) tokens equals `total_tokens` exactly.
- Per stage, per-source counts are the largest-remainder apportionment of each source's exact share
  of the stage's tokens: every source's trained tokens are within one sequence (seq_len tokens) of
  weight x budget, and the counts sum to the stage length. The heaviest source owns the cut final
  sequence.
- Every aligned window of `window_fraction` of training (1% by default) holds each source's count
  to within one sequence of its share, and the windows' running totals track the ideal to within
  one sequence too (no slow drift). Inside a window sources are spread evenly (stride order).
- A staged (curriculum) mixture switches weights exactly at `round(start_fraction x sequences)`.

SparkNet's v5 builder drew a source by weight and then drained it, so its realized mixture was not
the configured one; here the realized per-source token counts are read off the plan and reported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from sparknet.config import MixtureConfig
from sparknet.errors import SparknetError


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `weights` that sum to `total`, each within 1 of the exact share.

    Ties go to the earlier source, so the result is deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total == 0:
        return np.zeros(len(w), dtype=np.int64)
    exact = w / w.sum() * total
    base = np.floor(exact).astype(np.int64)
    short = int(total - base.sum())
    if short:
        remainders = exact - base
        order = sorted(range(len(w)), key=lambda i: (-remainders[i], i))
        for i in order[:short]:
            base[i] += 1
    return base


def window_counts(sizes: list[int], quotas: np.ndarray) -> np.ndarray:
    """Split per-source `quotas` over consecutive windows of `sizes` (a controlled rounding).

    Returns counts[window, source] with rows summing to `sizes`, columns to `quotas`, every entry the
    floor or ceiling of its exact share size x quota / total, and every running total (windows 0..j)
    the floor or ceiling of its exact running share, so cumulative counts never drift.

    Why a flow: the constraints (row sums, column sums, column prefix sums) are two laminar families,
    so the constraint matrix is totally unimodular and the exact fractional split is a feasible flow;
    an integral max-flow therefore always finds a rounding. A greedy pass can paint itself into a
    corner (it did, on a 6-source mixture), so the rounding is solved globally.
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    sizes_a = np.asarray(sizes, dtype=np.int64)
    q = np.asarray(quotas, dtype=np.int64)
    total = int(sizes_a.sum())
    n_win, n_src = len(sizes_a), len(q)
    if total == 0:
        return np.zeros((n_win, n_src), dtype=np.int64)
    # Exact integer floors/ceilings of each cell and of each running total.
    cell_num = sizes_a[:, None] * q[None, :]
    cell_lo = cell_num // total
    cell_hi = cell_lo + (cell_num % total != 0)
    cum_num = np.cumsum(sizes_a)[:, None] * q[None, :]
    cum_lo = cum_num // total
    cum_hi = cum_lo + (cum_num % total != 0)

    # Nodes: 0 = super source, 1 = super sink, chain node (i, j) carries source i's running total
    # through window j, then one node per window.
    def chain(i: int, j: int) -> int:
        return 2 + i * n_win + j

    def window(j: int) -> int:
        return 2 + n_src * n_win + j

    n_nodes = 2 + n_src * n_win + n_win
    excess = np.zeros(n_nodes, dtype=np.int64)
    rows, cols, caps = [], [], []
    cell_edges = []

    def edge(u: int, v: int, lo: int, hi: int) -> int:
        # Lower bounds become node excesses; the edge keeps capacity hi - lo.
        excess[v] += lo
        excess[u] -= lo
        rows.append(u)
        cols.append(v)
        caps.append(hi - lo)
        return len(caps) - 1

    for i in range(n_src):
        excess[chain(i, n_win - 1)] += q[i]  # source i's whole quota enters at the top of its chain
        for j in range(n_win):
            cell_edges.append((j, i, int(cell_lo[j, i]), edge(chain(i, j), window(j), int(cell_lo[j, i]),
                                                            int(cell_hi[j, i]))))
            if j:
                edge(chain(i, j), chain(i, j - 1), int(cum_lo[j - 1, i]), int(cum_hi[j - 1, i]))
    for j in range(n_win):
        excess[window(j)] -= sizes_a[j]  # window j must hold exactly its size
    for v in np.flatnonzero(excess > 0):
        rows.append(0), cols.append(int(v)), caps.append(int(excess[v]))
    for v in np.flatnonzero(excess < 0):
        rows.append(int(v)), cols.append(1), caps.append(int(-excess[v]))
    graph = csr_array((np.asarray(caps, dtype=np.int32), (rows, cols)), shape=(n_nodes, n_nodes))
    result = maximum_flow(graph, 0, 1)
    if result.flow_value != int(excess[excess > 0].sum()):
        raise AssertionError("window rounding infeasible; please report this mixture")  # impossible by TU
    flow = result.flow.tocsr()
    counts = np.zeros((n_win, n_src), dtype=np.int64)
    for j, i, lo, k in cell_edges:
        counts[j, i] = lo + int(flow[rows[k], cols[k]])
    assert (counts.sum(axis=0) == q).all() and (counts.sum(axis=1) == sizes_a).all()
    return counts


def stride_order(counts: np.ndarray) -> np.ndarray:
    """Source ids for one window: source i's c_i sequences at evenly spaced slots, merged."""
    size = int(counts.sum())
    keys, ids = [], []
    for i, c in enumerate(counts):
        if c:
            keys.append((np.arange(c) + 0.5) * (size / c))
            ids.append(np.full(c, i, dtype=np.int16))
    if not keys:
        return np.zeros(0, dtype=np.int16)
    k, s = np.concatenate(keys), np.concatenate(ids)
    return s[np.lexsort((s, k))]


@dataclass(frozen=True)
class Plan:
    """The training run as sequences: which source each one is drawn from, in order."""

    source_names: tuple[str, ...]
    seq_len: int
    total_tokens: int
    source_of: np.ndarray  # int16 [num_sequences]
    ordinal: np.ndarray  # int64 [num_sequences]: the k-th sequence drawn from that source
    stage_starts: tuple[int, ...]  # sequence index where each stage begins
    window_size: int  # sequences per balance window
    seed: int

    @property
    def num_sequences(self) -> int:
        return int(len(self.source_of))

    @property
    def last_len(self) -> int:
        """Predicted tokens in the final sequence (seq_len unless the budget has a remainder)."""
        return self.total_tokens - (self.num_sequences - 1) * self.seq_len

    def sequences_per_source(self) -> np.ndarray:
        return np.bincount(self.source_of, minlength=len(self.source_names)).astype(np.int64)

    def tokens_per_source(self) -> np.ndarray:
        """Predicted tokens each source contributes over the whole run (sums to total_tokens)."""
        tokens = self.sequences_per_source() * self.seq_len
        tokens[self.source_of[-1]] -= self.seq_len - self.last_len
        return tokens

    def sequence_tokens(self, index: int) -> int:
        return self.last_len if index == self.num_sequences - 1 else self.seq_len

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(repr((self.source_names, self.seq_len, self.total_tokens, self.seed)).encode())
        h.update(self.source_of.tobytes())
        return h.hexdigest()


def build_plan(mix: MixtureConfig, seq_len: int) -> Plan:
    """The plan for `mix` at `seq_len` tokens per sequence."""
    names = tuple(s.name for s in mix.sources)
    num_seq = -(-mix.total_tokens // seq_len)
    stages = mix.stage_list()
    starts = [int(round(frac * num_seq)) for frac, _ in stages]
    window = max(1, int(round(mix.window_fraction * num_seq)))
    cut = num_seq * seq_len - mix.total_tokens  # tokens the final sequence is short by
    order_parts: list[np.ndarray] = []
    for idx, (start, (_, weights)) in enumerate(zip(starts, stages)):
        last_stage = idx + 1 == len(starts)
        end = num_seq if last_stage else starts[idx + 1]
        w = np.array([weights[n] for n in names], dtype=np.float64)
        sizes = [min(window, end - s) for s in range(start, end, window)]
        # Apportion in tokens, not sequences: each source's exact share of the stage's tokens, in
        # sequence units. The owner of the cut final sequence has its share raised by the missing
        # fraction, so every source's token count is within one sequence of weight x budget.
        exact = w / w.sum() * ((end - start) * seq_len - (cut if last_stage else 0)) / seq_len
        candidates = [int(np.argmax(w))] if last_stage and cut else [None]
        for owner in candidates:
            x = exact.copy()
            if owner is not None:
                x[owner] += cut / seq_len
            quotas = largest_remainder(x, end - start)
            starved = [n for n, wi, qi in zip(names, w, quotas) if wi > 0 and qi == 0]
            if starved:
                where = f"stage {idx} " if len(stages) > 1 else ""
                raise SparknetError(
                    f"mixture.total_tokens: {mix.total_tokens} tokens ({num_seq} sequences of {seq_len}) "
                    f"give source(s) {', '.join(starved)} no sequence in {where}(fix: raise the budget or "
                    f"the weights of those sources)")
            parts = [stride_order(row) for row in window_counts(sizes, quotas)]
            if owner is None:
                break
            final = parts[-1]
            hits = np.flatnonzero(final == owner)
            if len(hits):
                # Move the owner's last sequence in the final window to the very end: same counts.
                k = int(hits[-1])
                parts[-1] = np.concatenate([final[:k], final[k + 1:], final[k:k + 1]])
                break
            # The owner got no sequence in the final window: let a source that did own the cut.
            candidates.extend(int(c) for c in final[::-1] if int(c) not in candidates)
        else:
            # Every candidate pushed the final window to another source (it happens with a final
            # window of one sequence, e.g. 3148 tokens, seq_len 128, weights 1/.5/.5, window 0.1).
            # Reserve the very last slot for the heaviest source and round the rest around it; only
            # plans that used to fail here take this path, so existing plans are unchanged.
            owner = candidates[0]
            quotas = largest_remainder(exact + np.eye(len(w))[owner] * (cut / seq_len), end - start)
            rest = quotas.copy()
            rest[owner] -= 1  # >= 0: the starved check above saw this owner get a sequence
            head = sizes[:-1] + ([sizes[-1] - 1] if sizes[-1] > 1 else [])
            parts = [stride_order(row) for row in window_counts(head, rest)] if head else []
            tail = np.array([owner], dtype=np.int16)
            if sizes[-1] > 1:
                parts[-1] = np.concatenate([parts[-1], tail])
            else:
                parts.append(tail)
        order_parts.extend(parts)
    source_of = np.concatenate(order_parts).astype(np.int16)
    ordinal = np.empty(num_seq, dtype=np.int64)
    for i in range(len(names)):
        idx = np.flatnonzero(source_of == i)
        ordinal[idx] = np.arange(len(idx))
    return Plan(names, seq_len, mix.total_tokens, source_of, ordinal, tuple(starts), window, mix.seed)


def window_deviation(plan: Plan, weights_at: np.ndarray | None = None) -> float:
    """Largest |count - share| of any source in any aligned balance window (in sequences)."""
    worst = 0.0
    n = len(plan.source_names)
    bounds = list(plan.stage_starts) + [plan.num_sequences]
    for s, e in zip(bounds[:-1], bounds[1:]):
        stage_counts = np.bincount(plan.source_of[s:e], minlength=n)
        share = stage_counts / max(1, e - s)
        for w0 in range(s, e, plan.window_size):
            w1 = min(e, w0 + plan.window_size)
            counts = np.bincount(plan.source_of[w0:w1], minlength=n)
            worst = max(worst, float(np.abs(counts - share * (w1 - w0)).max()))
    return worst
