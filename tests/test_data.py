"""Loader: batches are a pure function of (plan, step); realized per-source tokens equal the plan."""

from __future__ import annotations

import numpy as np
import pytest
from tinylab import two_local_sources

from sparknet.config import config_from_dict
from sparknet.data import IGNORE_INDEX, Loader
from sparknet.errors import SparknetError
from sparknet.prepare import prepare
from sparknet.store import open_store


def docs_for(prefix: str, n: int) -> list[str]:
    return [f"{prefix} item {i}: " + " ".join(f"{prefix}{j}" for j in range(i % 13 + 5)) for i in range(n)]


@pytest.fixture
def prepared(tmp_path, write_jsonl):
    write_jsonl("a/a.jsonl", docs_for("alpha", 300))
    write_jsonl("b/b.jsonl", docs_for("beta", 200))
    cfg = config_from_dict(two_local_sources(tmp_path))
    return prepare(cfg, workers=1, progress=False)


def test_realized_tokens_per_source_equal_the_plan_and_the_spec(prepared):
    loader = prepared.loader()
    realized = loader.tokens_per_source_realized()
    assert realized.tolist() == prepared.plan.tokens_per_source().tolist()
    assert realized.sum() == 20_000  # exactly the budget
    spec = np.array([0.7, 0.3]) * 20_000
    assert (np.abs(realized - spec) < 64).all()  # within one sequence of weight x budget


def test_processes_split_each_step_and_read_every_sequence_once(prepared):
    """The global batch is the recipe's: 1 process x 3 micro-batches and 3 processes x 1 read the same 12
    sequences at every step, and together every planned sequence exactly once."""
    one, three = prepared.loader(world_size=1), prepared.loader(world_size=3)
    assert (one.grad_accum_steps, three.grad_accum_steps) == (3, 1)
    assert one.num_steps == three.num_steps
    seen = []
    for step in range(three.num_steps):
        per_step = {w: [] for w in (1, 3)}
        for loader, world in ((one, 1), (three, 3)):
            for micro in range(loader.grad_accum_steps):
                for rank in range(world):
                    b = loader.batch(step, micro, rank)
                    idx = b.sequence_index
                    per_step[world].extend(idx[idx >= 0].tolist())
                    if world == 3:
                        ref = one.batch(step, rank)  # same micro-batch size: rank r reads 1-process micro r
                        assert np.array_equal(b.input_ids, ref.input_ids)
        assert sorted(per_step[1]) == sorted(per_step[3])
        seen.extend(per_step[3])
    assert sorted(seen) == list(range(prepared.plan.num_sequences))
    assert three.tokens_per_source_realized().tolist() == prepared.plan.tokens_per_source().tolist()
    with pytest.raises(SparknetError, match="cannot be split over 5 processes"):
        prepared.loader(world_size=5)


def test_batches_survive_a_restart_exactly(prepared):
    loader = prepared.loader()
    before = [loader.batch(k, m) for k in (0, 5, loader.num_steps - 1) for m in range(3)]
    # a "restarted" process: stores reopened from disk, a fresh loader, steps asked out of order
    stores = {n: open_store(s.dir) for n, s in prepared.stores.items()}
    fresh = Loader(prepared.plan, stores, 4, 3)
    after = [fresh.batch(k, m) for k in (0, 5, loader.num_steps - 1) for m in range(3)]
    for a, b in zip(before, after):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.source_ids, b.source_ids)


def test_batch_rows_are_store_windows_with_shifted_labels_and_source_ids(prepared):
    loader = prepared.loader()
    bt = loader.batch(2, 1)
    for row in range(bt.input_ids.shape[0]):
        n = int(bt.sequence_index[row])
        src = int(prepared.plan.source_of[n])
        assert bt.source_ids[row] == src
        window = loader.sources[src].sequence(int(prepared.plan.ordinal[n]))
        assert np.array_equal(bt.input_ids[row], window[:-1])
        assert np.array_equal(bt.labels[row], window[1:])
    assert bt.num_tokens == bt.labels.size


def test_last_step_is_padded_and_masked(prepared):
    loader = prepared.loader()
    plan = prepared.plan
    last = [loader.batch(loader.num_steps - 1, m) for m in range(3)]
    rows = np.concatenate([b.sequence_index for b in last])
    assert rows.max() == plan.num_sequences - 1
    for b in last:
        pad = b.sequence_index < 0
        assert (b.labels[pad] == IGNORE_INDEX).all() and (b.source_ids[pad] == -1).all()
    final = next(b for b in last if (b.sequence_index == plan.num_sequences - 1).any())
    row = int(np.flatnonzero(final.sequence_index == plan.num_sequences - 1)[0])
    assert (final.labels[row] != IGNORE_INDEX).sum() == plan.last_len


def test_each_epoch_visits_every_slot_once_before_repeating(prepared):
    loader = prepared.loader()
    a = loader.sources[0]
    slots = a.num_slots
    starts = [int(a._order(0)[k]) for k in range(slots)]
    assert sorted(starts) == list(range(slots))
    first, second = a._order(0), a._order(1)
    assert not np.array_equal(first, second)  # a new order each epoch
    assert np.array_equal(a.sequence(slots), a.sequence(slots))  # deterministic
    factors = loader.repeat_factors()
    assert factors[0] == prepared.plan.sequences_per_source()[0] / slots
    assert (factors > 1).all()  # this tiny corpus is repeated, and the loader says by how much
    assert factors.tolist() == pytest.approx([s.repeat_factor for s in prepared.sources])


def test_val_slice_is_never_trained_on(prepared):
    for name, st in prepared.stores.items():
        val = st.val().read(0, st.val_tokens)
        train = st.train().read(0, st.train_tokens)
        assert st.val_tokens >= 200
        # the held-out documents are the source's first ones; training starts after them
        val_docs = {tuple(d) for d in np.split(val, np.flatnonzero(val == 50256)[:-1] + 1)}
        train_docs = {tuple(d) for d in np.split(train, np.flatnonzero(train == 50256)[:-1] + 1)}
        assert val_docs and not (val_docs & train_docs), name


def small_and_big(tmp_path, write_jsonl, weights=(0.7, 0.3)):
    write_jsonl("a/a.jsonl", docs_for("alpha", 3000))
    write_jsonl("b/b.jsonl", docs_for("beta", 3000))

    def cfg(total):
        return config_from_dict({
            "lab_dir": str(tmp_path / "lab"),
            "mixture": {"total_tokens": total, "val_tokens": 200, "sources": [
                {"name": "a", "kind": "local", "path": str(tmp_path / "a"), "weight": weights[0]},
                {"name": "b", "kind": "local", "path": str(tmp_path / "b"), "weight": weights[1]}]},
            "model": {"preset": "cpu-tiny"},
            "train": {"seq_len": 64, "micro_batch_size": 4, "batch_tokens": 768},
            "prepare": {"shard_tokens": 2048},
        })
    return cfg(10_000), cfg(40_000)


def test_batches_do_not_change_when_another_budget_extends_the_store(tmp_path, write_jsonl):
    small_cfg, big_cfg = small_and_big(tmp_path, write_jsonl)
    small = prepare(small_cfg, workers=1, progress=False, write_report=False)
    assert not any(st.manifest["exhausted"] for st in small.stores.values())
    before = [small.loader().batch(k, m).input_ids for k in range(small.loader().num_steps) for m in range(3)]
    big = prepare(big_cfg, workers=1, progress=False, write_report=False)  # extends the same stores
    assert big.stores["a"].train_tokens > small.stores["a"].train_tokens
    again = prepare(small_cfg, workers=1, progress=False, write_report=False)  # e.g. a resumed small run
    assert again.stores["a"].train_tokens == big.stores["a"].train_tokens
    loader = again.loader()
    after = [loader.batch(k, m).input_ids for k in range(loader.num_steps) for m in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    assert [s.repeat_factor for s in again.sources] == [s.repeat_factor for s in small.sources]


def test_a_zero_weight_source_with_a_tiny_store_does_not_stop_the_loader(tmp_path, write_jsonl):
    write_jsonl("a/a.jsonl", docs_for("alpha", 300))
    write_jsonl("z/z.jsonl", ["tiny"] * 5)  # fewer tokens than one sequence
    cfg = config_from_dict({
        "lab_dir": str(tmp_path / "lab"),
        "mixture": {"total_tokens": 2_000, "val_tokens": 0, "sources": [
            {"name": "a", "kind": "local", "path": str(tmp_path / "a"), "weight": 1.0, "max_repeats": 5},
            {"name": "z", "kind": "local", "path": str(tmp_path / "z"), "weight": 0.0}]},
        "model": {"preset": "cpu-tiny"},
        "train": {"seq_len": 64, "micro_batch_size": 4, "batch_tokens": 256},
    })
    prepared = prepare(cfg, workers=1, progress=False, write_report=False)
    loader = prepared.loader()  # used to raise "only N training tokens" for the never-drawn source
    assert loader.repeat_factors()[1] == 0.0
    assert loader.tokens_per_source_realized().tolist() == [2_000, 0]
