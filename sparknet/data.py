"""Batches: the batch for optimizer step k is a pure function of (plan, stores, k).

Nothing here has state that survives a step: a resumed run asks for step k and gets exactly the batch
an uninterrupted run got. Sequence n of the plan is the `ordinal[n]`-th sequence drawn from its source;
within a source, sequence slots (seq_len + 1 tokens, overlapping by one so every slot predicts
seq_len tokens) are visited in a seeded random order per epoch, so a source is repeated only after
all of it has been seen, and its repeat factor is exactly `drawn / slots`.

With several processes, step k's sequences are split by (micro-step, rank): each process reads only
its own share, and together they read each planned sequence exactly once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from sparknet.errors import SparknetError
from sparknet.mixture import Plan
from sparknet.store import SourceStore, TokenArray

IGNORE_INDEX = -100  # label of positions that carry no loss (padding, the cut final sequence)


def num_slots(train_tokens: int, drawn: int | None, seq_len: int) -> int:
    """Sequence slots a source offers a plan that draws `drawn` sequences from it.

    Only the tokens that prepare guarantees for `drawn` sequences (drawn x seq_len + 1, or all of an
    exhausted store) count: a store extended later by a bigger budget, or by another source on the
    same files, must not change the slots and so the batches of this plan.
    """
    usable = train_tokens if drawn is None else min(train_tokens, drawn * seq_len + 1)
    return max(0, (usable - 1) // seq_len)


class SourceSequences:
    """Sequence slots of one source's training tokens, drawn in a seeded order per epoch."""

    def __init__(self, name: str, tokens: TokenArray, seq_len: int, seed: int, drawn: int | None = None):
        self.name, self.tokens, self.seq_len = name, tokens, seq_len
        self.num_slots = num_slots(len(tokens), drawn, seq_len)
        self._seed = (seed, zlib.crc32(name.encode()))
        self._orders: dict[int, np.ndarray] = {}
        if self.num_slots <= 0 and drawn != 0:  # a source the plan never draws needs no slot
            raise SparknetError(f"source {name!r}: only {len(tokens)} training tokens, fewer than one "
                                f"sequence of {seq_len + 1} (fix: add data or lower train.seq_len)")

    def _order(self, epoch: int) -> np.ndarray:
        # Cached per instance: a class-wide lru_cache(4) thrashed with more than 4 sources, redoing
        # a full permutation for nearly every row.
        if epoch not in self._orders:
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            rng = np.random.default_rng([*self._seed, epoch])
            self._orders[epoch] = rng.permutation(self.num_slots)
        return self._orders[epoch]

    def sequence(self, ordinal: int) -> np.ndarray:
        """seq_len + 1 tokens of the `ordinal`-th sequence drawn from this source."""
        epoch, k = divmod(int(ordinal), self.num_slots)
        start = int(self._order(epoch)[k]) * self.seq_len
        return self.tokens.read(start, self.seq_len + 1)


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [rows, seq_len]
    labels: np.ndarray  # int64 [rows, seq_len], IGNORE_INDEX where no loss is taken
    source_ids: np.ndarray  # int64 [rows], -1 for padding rows past the end of the plan
    sequence_index: np.ndarray  # int64 [rows], position in the plan, -1 for padding rows

    @property
    def num_tokens(self) -> int:
        """Predicted tokens in this batch."""
        return int((self.labels != IGNORE_INDEX).sum())


class Loader:
    """Batches of the plan for a given micro-batch size, accumulation and number of processes."""

    def __init__(self, plan: Plan, stores: dict[str, SourceStore], micro_batch_size: int,
                 grad_accum_steps: int = 1, world_size: int = 1):
        self.plan = plan
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        drawn = plan.sequences_per_source()
        self.sources = [SourceSequences(name, stores[name].train(), plan.seq_len, plan.seed, int(n))
                        for name, n in zip(plan.source_names, drawn)]

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def num_steps(self) -> int:
        return -(-self.plan.num_sequences // self.sequences_per_step)

    def repeat_factors(self) -> np.ndarray:
        """Epochs over each source's training tokens that the plan draws (1.0 = each slot once)."""
        drawn = self.plan.sequences_per_source()
        return np.array([d / s.num_slots if s.num_slots else 0.0 for d, s in zip(drawn, self.sources)])

    def batch(self, step: int, micro: int = 0, rank: int = 0) -> Batch:
        """The micro-batch `micro` of process `rank` at optimizer step `step`."""
        if not (0 <= step < self.num_steps and 0 <= micro < self.grad_accum_steps and 0 <= rank < self.world_size):
            raise IndexError(f"step {step}, micro {micro}, rank {rank} outside the plan")
        b, seq_len, plan = self.micro_batch_size, self.plan.seq_len, self.plan
        first = step * self.sequences_per_step + (micro * self.world_size + rank) * b
        inputs = np.zeros((b, seq_len), dtype=np.int64)
        labels = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)
        source_ids = np.full(b, -1, dtype=np.int64)
        index = np.full(b, -1, dtype=np.int64)
        for row in range(b):
            n = first + row
            if n >= plan.num_sequences:
                break  # the last step may be short: padding rows carry no loss
            src = int(plan.source_of[n])
            window = self.sources[src].sequence(int(plan.ordinal[n]))
            inputs[row] = window[:-1]
            keep = plan.sequence_tokens(n)
            labels[row, :keep] = window[1:keep + 1]
            source_ids[row], index[row] = src, n
        return Batch(inputs, labels, source_ids, index)

    def tokens_per_source_realized(self) -> np.ndarray:
        """Walk every batch of the run and count predicted tokens per source (the audit)."""
        counts = np.zeros(len(self.plan.source_names), dtype=np.int64)
        for step in range(self.num_steps):
            for micro in range(self.grad_accum_steps):
                for rank in range(self.world_size):
                    bt = self.batch(step, micro, rank)
                    per_row = (bt.labels != IGNORE_INDEX).sum(axis=1)
                    np.add.at(counts, bt.source_ids[bt.source_ids >= 0], per_row[bt.source_ids >= 0])
        return counts
