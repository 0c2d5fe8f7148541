"""Count-table references (sparknet/references.py): the entropies equal a hand count under the stated smoothing, the
counted tokens are exactly what the loader trains on, a bigram sees bigram structure, and a run logs them."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tinylab import two_local_sources

from sparknet.data import IGNORE_INDEX, Loader
from sparknet.mixture import Plan
from sparknet.references import (
    NgramCounts,
    bits_per_byte_references,
    held_out_ids,
    plan_counts,
    run_references,
)
from sparknet.store import TokenArray


def hand_entropies(train: list[tuple[int, int]], held: list[tuple[int, int]], vocab: int, alpha: float):
    """(unigram, bigram) nats/token by plain loops: Lidstone unigram; absolute discounting with Ney's D (within
    [0.1, 0.9]) interpolated with it; the unigram alone after a context never seen."""
    uni = Counter(b for _, b in train)
    big = Counter(train)
    ctx_total, ctx_types = Counter(), Counter()
    for (a, _), c in big.items():
        ctx_total[a] += c
        ctx_types[a] += 1
    n = len(train)
    n1 = sum(1 for c in big.values() if c == 1)
    n2 = sum(1 for c in big.values() if c == 2)
    d = min(max(n1 / (n1 + 2 * n2), 0.1), 0.9) if n1 else 0.5
    u_sum = b_sum = 0.0
    for a, b in held:
        p_uni = (uni[b] + alpha) / (n + alpha * vocab)
        u_sum -= math.log(p_uni)
        if ctx_total[a]:
            p = max(big[(a, b)] - d, 0) / ctx_total[a] + d * ctx_types[a] / ctx_total[a] * p_uni
        else:
            p = p_uni
        b_sum -= math.log(p)
    return u_sum / len(held), b_sum / len(held)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_entropies_equal_a_hand_count(alpha):
    rng = np.random.default_rng(3)
    vocab = 9
    train = rng.integers(0, 7, 400)  # ids 7 and 8 never appear: unseen tokens and contexts
    train[::13] = 3  # some repeated structure, so that there are pairs counted 1, 2 and more
    held = np.concatenate([rng.integers(0, 9, 150), [8, 7, 8, 0]])
    counts = NgramCounts.from_pairs(train[:-1], train[1:], vocab, alpha=alpha)
    got = counts.cross_entropy(held[:-1], held[1:])
    want = hand_entropies(list(zip(train[:-1].tolist(), train[1:].tolist())),
                          list(zip(held[:-1].tolist(), held[1:].tolist())), vocab, alpha)
    assert got == pytest.approx(want, rel=1e-12)
    assert counts.tokens == len(train) - 1
    # Weighted pairs count as repeated pairs; merged counts as the counts of everything together.
    w = rng.integers(0, 3, len(train) - 1)
    weighted = NgramCounts.from_pairs(train[:-1], train[1:], vocab, weights=w, alpha=alpha)
    repeated = NgramCounts.from_pairs(np.repeat(train[:-1], w), np.repeat(train[1:], w), vocab, alpha=alpha)
    merged = NgramCounts.merge([NgramCounts.from_pairs(train[:-1][:100], train[1:][:100], vocab, alpha=alpha),
                                NgramCounts.from_pairs(train[:-1][100:], train[1:][100:], vocab, alpha=alpha)],
                               vocab, alpha)
    for a, b in ((weighted, repeated), (merged, counts)):
        assert (a.unigram == b.unigram).all() and (a.codes == b.codes).all() and (a.counts == b.counts).all()
    # Both are distributions over the vocabulary, whatever the context.
    for prev in range(vocab):
        nxt = np.arange(vocab)
        assert np.exp(counts.bigram_logprob(np.full(vocab, prev), nxt)).sum() == pytest.approx(1.0, abs=1e-12)
    assert np.exp(counts.unigram_logprob(np.arange(vocab))).sum() == pytest.approx(1.0, abs=1e-12)


class _Store:
    """The read side of a store as the loader and the references use it: train() and val()."""

    def __init__(self, folder: Path, name: str, train: np.ndarray, val: np.ndarray):
        self._arrays = {}
        for part, arr in (("train", train), ("val", val)):
            path = folder / f"{name}-{part}.bin"
            arr.astype(np.uint16).tofile(path)
            self._arrays[part] = TokenArray([path], [len(arr)], np.dtype(np.uint16))

    def train(self) -> TokenArray:
        return self._arrays["train"]

    def val(self) -> TokenArray:
        return self._arrays["val"]


def _plan(counts: dict[str, int], seq_len: int, cut: int, last: str, seed: int = 7) -> Plan:
    names = tuple(counts)
    rng = np.random.default_rng(seed)
    order = [names.index(n) for n, c in counts.items() for _ in range(c)]
    order.remove(names.index(last))
    source_of = np.array(rng.permutation(order).tolist() + [names.index(last)], dtype=np.int16)
    ordinal = np.empty(len(source_of), dtype=np.int64)
    for i in range(len(names)):
        idx = np.flatnonzero(source_of == i)
        ordinal[idx] = np.arange(len(idx))
    return Plan(names, seq_len, len(source_of) * seq_len - cut, source_of, ordinal, (0,), 8, seed)


def _loader_pairs(loader: Loader) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, label) pair that takes a loss in the whole run, read off the loader's batches."""
    prev, nxt = [], []
    for step in range(loader.num_steps):
        for micro in range(loader.grad_accum_steps):
            b = loader.batch(step, micro)
            keep = b.labels != IGNORE_INDEX
            prev.append(b.input_ids[keep])
            nxt.append(b.labels[keep])
    return np.concatenate(prev), np.concatenate(nxt)


@pytest.mark.parametrize("last,chunk", [("a", None), ("b", None), ("a", 40)])
def test_counted_tokens_are_exactly_what_the_loader_yields(tmp_path, monkeypatch, last, chunk):
    # a: 1,000 training tokens for 150 sequences of 16 (62 slots: 2 epochs and part of a third); b: 40 sequences of
    # a 2,000-token store (exactly its 40 slots). The final sequence is cut to 11 of its 16 tokens.
    if chunk:  # read and counted a few slots at a time, merged as it goes: the same counts
        monkeypatch.setattr("sparknet.references._CHUNK_TOKENS", chunk)
    rng = np.random.default_rng(0)
    vocab = 50257  # GPT-2's: pair codes up to V^2 ~ 2.5e9, past int32
    stores = {"a": _Store(tmp_path, "a", rng.integers(0, vocab, 1000), rng.integers(0, vocab, 300)),
              "b": _Store(tmp_path, "b", rng.integers(0, vocab, 2000), rng.integers(0, vocab, 10))}
    plan = _plan({"a": 150, "b": 40}, seq_len=16, cut=5, last=last)
    loader = Loader(plan, stores, micro_batch_size=4, grad_accum_steps=3)
    assert loader.repeat_factors()[0] > 2 and loader.repeat_factors()[1] == 1
    prev, nxt = _loader_pairs(loader)
    assert len(nxt) == plan.total_tokens
    want = NgramCounts.from_pairs(prev, nxt, vocab)
    got = plan_counts(plan, stores, vocab)
    assert got.tokens == plan.total_tokens
    assert (got.unigram == want.unigram).all()
    assert (got.codes == want.codes).all() and (got.counts == want.counts).all()
    # The held-out slices: b's 10 tokens hold no window of 16 (no reference, as no val loss); a's 300 tokens capped
    # at 100 + 1 are 6 windows of 16, the pairs train.source_val_loss scores.
    assert held_out_ids(stores["b"], 16, 0) is None
    ids = held_out_ids(stores["a"], 16, 100)
    windows = np.lib.stride_tricks.sliding_window_view(stores["a"].val().read(0, 97), 17)[::16]
    assert len(windows) == 6 and (ids == stores["a"].val().read(0, 97)).all()
    refs = run_references(plan, stores, vocab, 16, 100)
    assert set(refs.bigram) == {"a"} and refs.scored_tokens == {"a": 96}
    assert (refs.unigram["a"], refs.bigram["a"]) == pytest.approx(
        want.cross_entropy(windows[:, :-1].ravel(), windows[:, 1:].ravel()), rel=1e-12)


def test_bigram_reference_sees_bigram_structure():
    # A Markov chain over 300 tokens, each followed by one of 3 successors: ~ln 300 = 5.7 nats a token alone,
    # ~ln 3 = 1.1 given the previous token.
    rng = np.random.default_rng(1)
    vocab = 300
    successors = rng.integers(0, vocab, (vocab, 3))

    def chain(n: int, start: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        out[0] = start
        picks = rng.integers(0, 3, n)
        for i in range(1, n):
            out[i] = successors[out[i - 1], picks[i]]
        return out

    train, held = chain(60_000, 0), chain(5_000, 1)
    counts = NgramCounts.from_pairs(train[:-1], train[1:], vocab)
    uni, bi = counts.cross_entropy(held[:-1], held[1:])
    assert uni > 4.5 and bi < 1.5 and bi < uni - 3.0
    # Without structure (independent tokens) the bigram gains nothing over the unigram.
    flat = rng.integers(0, vocab, 60_000)
    uni_f, bi_f = NgramCounts.from_pairs(flat[:-1], flat[1:], vocab).cross_entropy(held[:-1], held[1:])
    assert bi_f > uni_f - 0.05


def test_bits_per_byte_follows_evaluate_definition():
    from sparknet.evaluate import strided_windows

    vocab = 64
    ids = np.random.default_rng(2).integers(0, vocab, 1000)
    # No training tokens: both references are the uniform distribution, whose bits per byte evaluate's docstring
    # gives exactly: log2(V) x text_tokens / text_bytes.
    empty = NgramCounts.merge([], vocab)
    r = bits_per_byte_references(empty, ids, 3_000, context=128)
    assert r["unigram_bpb"] == pytest.approx(math.log2(vocab) * 1000 / 3000, rel=1e-12)
    assert r["bigram_bpb"] == pytest.approx(r["unigram_bpb"], rel=1e-12)
    # The scored positions are the strided loop's at stride = context: every token but the first of each window.
    scored = [b + t for b, e, first in strided_windows(1000, 128, 128) for t in range(first, e - b)]
    assert r["tokens"] == len(scored) == 1000 - 8
    counts = NgramCounts.from_pairs(ids[:-1], ids[1:], vocab)
    r = bits_per_byte_references(counts, ids, 3_000, context=128)
    sc = np.array(scored)
    u, b = counts.cross_entropy(ids[sc - 1], ids[sc])
    assert (r["unigram_bpb"], r["bigram_bpb"]) == pytest.approx((u / math.log(2) * 1000 / 3000,
                                                                  b / math.log(2) * 1000 / 3000), rel=1e-12)


def _docs(prefix: str, n: int) -> list[str]:
    return [f"{prefix} item {i}: " + " ".join(f"{prefix}{j}" for j in range(i % 13 + 5)) for i in range(n)]


@pytest.mark.slow
def test_a_run_logs_its_references(tmp_path, write_jsonl, one_torch_thread, capsys):
    """A tiny run on two local sources (a 512-token BPE), a budget that cuts its last sequence, and a local
    WikiText-2 validation file: its MLflow run, result and folder hold the references of a direct count."""
    from mlflow.tracking import MlflowClient

    from sparknet.config import config_from_dict
    from sparknet.evaluate import load_wikitext
    from sparknet.prepare import prepare
    from sparknet.references import wikitext_text
    from sparknet.run import execute

    write_jsonl("a/a.jsonl", _docs("alpha", 300))
    write_jsonl("b/b.jsonl", _docs("beta", 200))
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "wiki.valid.raw").write_text(" \n = Valkyria Chronicles = \n \n The game 's battle system is "
                                         "used in the series . It was released in 2011 .\n \n", encoding="utf-8")
    budget = 6_000 + 37
    d = two_local_sources(tmp_path)
    d["mixture"] |= {"total_tokens": budget, "val_tokens": 300}
    d["tokenizer"] = {"name": "bpe", "vocab_size": 512, "train_bytes_per_source": 100_000}
    d["prepare"] |= {"workers": 1}
    d["eval"] = {"every_tokens": 1 << 20, "val_tokens": 256, "sample_tokens": 2, "sample_prompts": ["The"],
                 "wikitext": [], "downstream": [], "wikitext_path": str(wiki)}
    cfg = config_from_dict(d)
    out = execute(cfg, progress=False)
    r = out.result
    printed = capsys.readouterr().out

    # A direct computation: the pairs the loader trains on, the windows train.source_val_loss scores, the text the
    # wikitext-valid objective scores (windows of the model's context, the first token of each unscored).
    prepared = prepare(cfg, progress=False, write_report=False)
    vocab, seq_len = prepared.tokenizer.vocab_size, cfg.train.seq_len
    prev, nxt = _loader_pairs(prepared.loader())
    assert len(nxt) == budget
    counts = NgramCounts.from_pairs(prev, nxt, vocab)
    want = {}
    for name in ("a", "b"):
        val = prepared.stores[name].val()
        n = min(len(val), cfg.eval.val_tokens + 1)
        x = np.lib.stride_tricks.sliding_window_view(val.read(0, ((n - 1) // seq_len) * seq_len + 1),
                                                     seq_len + 1)[::seq_len]
        want[name] = counts.cross_entropy(x[:, :-1].ravel(), x[:, 1:].ravel())
    text = wikitext_text(load_wikitext("validation", str(wiki)))
    ids = np.array(prepared.tokenizer.encode_batch([text])[0])
    ctx = cfg.model.shape()[3]
    pos = np.array([t for t in range(1, len(ids)) if t % ctx])
    wu, wb = counts.cross_entropy(ids[pos - 1], ids[pos])
    scale = len(ids) / len(text.encode("utf-8")) / math.log(2)

    m = MlflowClient(tracking_uri=f"sqlite:///{cfg.lab_path / 'mlflow.db'}").get_run(out.mlflow_run_id).data.metrics
    assert set(want) == set(r["val_loss"]) == set(r["val_ref_bigram"])
    for name, (uni, bi) in want.items():
        assert m[f"val/ref_unigram/{name}"] == pytest.approx(uni, rel=1e-9)
        assert m[f"val/ref_bigram/{name}"] == pytest.approx(bi, rel=1e-9)
        assert r["val_ref_unigram"][name] == pytest.approx(uni, rel=1e-12)
        assert r["val_ref_bigram"][name] == pytest.approx(bi, rel=1e-12)
        assert f"past bigram by {bi - r['val_loss'][name]:.3f} nats" in printed
    assert m["wikitext-valid/ref_unigram_bpb"] == pytest.approx(wu * scale, rel=1e-9)
    assert m["wikitext-valid/ref_bigram_bpb"] == pytest.approx(wb * scale, rel=1e-9)
    assert r["wikitext_valid_ref_bigram_bpb"] == pytest.approx(wb * scale, rel=1e-12)
    assert r["references"]["train_tokens"] == budget and not r["references_skipped"]
    # The run's folder holds them too: result.json and the finished state.
    saved = json.loads((out.run_dir / "result.json").read_text())
    state = json.loads((out.run_dir / "state.json").read_text())
    assert saved["val_ref_bigram"] == state["result"]["val_ref_bigram"] == r["val_ref_bigram"]


def test_the_wikitext_text_is_tokenized_once_per_process_and_tokenizer():
    """A trial's references and its wikitext-valid objective read the same ids, tokenized once for the whole study."""
    from types import SimpleNamespace

    from sparknet.references import wikitext_ids

    calls = []

    def tok(fingerprint):
        def encode_batch(texts):
            calls.append(fingerprint)
            return [[len(texts[0]), ord(texts[0][0])]]
        return SimpleNamespace(fingerprint=fingerprint, encode_batch=encode_batch)

    a, b = tok("a"), tok("b")
    assert wikitext_ids(a, "= Valkyria =\n") == [13, ord("=")] and wikitext_ids(a, "= Valkyria =\n") == [13, 61]
    assert calls == ["a"]
    assert wikitext_ids(b, "= Valkyria =\n") == [13, 61] and calls == ["a", "b"]  # another tokenizer: its own ids
    assert wikitext_ids(b, "other text") == [10, ord("o")] and calls == ["a", "b", "b"]  # another text
