"""sparknet.evaluate: the WikiText-2 protocols against hand-computed values, row selection on the real file,
the local/hub/offline data paths and their errors."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from sparknet import evaluate as ev
from sparknet.errors import SparknetError

TOY_VOCAB = 97


def char_tokenize(vocab: int):
    """A toy tokenizer: one id per character (so a multi-byte character is one token of several bytes)."""

    def tokenize(texts: list[str]) -> list[list[int]]:
        return [[ord(c) % vocab for c in t] for t in texts]

    return tokenize


def uniform_logits(padded_vocab: int):
    """A model that knows nothing: equal logits for every id, including the padding ids past the vocab."""

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, padded_vocab)

    return logits_fn


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models gain nothing from threads, and on a busy 2-core machine OpenMP's spinning threads make every
    tiny op take milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=TOY_VOCAB,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    return model


# Wiki-like rows in HF's shape ("" or a line ending in "\n"), with non-ASCII text so that tokens != bytes.
TOY_ROWS = [
    "",
    " = Café Ångström = \n",
    "",
    " The naïve façade , 1 @,@ 200 m — “quoted” and ½ of it . \n",
    " Short . \n",
    "",
    " = = Section = = \n",
    "",
    " A much longer paragraph with many words , which runs past the truncation length of the toy protocol "
    "and keeps going so that several windows cover it ; ends here . \n",
    " ∑ x² ≥ 0 for every real x . \n",
    " a \n",
    " Another row , of medium length , about lobsters in the Atlantic . \n",
    "",
]


def write_local_copy(folder, test_rows, valid_rows):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("test.jsonl", test_rows), ("validation.jsonl", valid_rows)):
        with open(folder / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"text": r}) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------------
# Uniform logits: perplexity = vocab size under every protocol
# --------------------------------------------------------------------------------------------------------


def test_uniform_logits_give_vocab_perplexity_everywhere(tmp_path, monkeypatch):
    vocab, padded = 300, 320  # logits padded to a multiple of 64: the 20 extra ids must be sliced away
    folder = write_local_copy(tmp_path / "wt2", TOY_ROWS * 3, TOY_ROWS * 2)
    monkeypatch.setenv(ev.WIKITEXT_ENV, str(folder))  # the local copy through the environment variable
    protocols = ("sparknet-blog", "hf-strided-16", "hf-strided-64", "hf-strided-512")
    results = ev.evaluate_wikitext(uniform_logits(padded), char_tokenize(vocab), vocab, 64, protocols=protocols,
                                   batch_size=3)
    assert [r.protocol for r in results] == list(protocols)
    text = "\n\n".join(TOY_ROWS * 3)
    n_tokens, n_bytes = len(text), len(text.encode("utf-8"))
    assert n_bytes > n_tokens  # the bpb check below is not the trivial 1 token = 1 byte case
    for r in results:
        assert r.perplexity == pytest.approx(vocab, rel=1e-4), r.protocol
        assert r.loss_nats == pytest.approx(math.log(vocab), rel=1e-5)
        assert r.details["data_source"] == str(folder / ("validation.jsonl" if r.protocol == "sparknet-blog"
                                                         else "test.jsonl"))
        assert r.details["data_canonical"] is False
        assert json.dumps(r.to_dict())  # JSON-ready for MLflow and the compare table
    blog, s16, s64, s512 = results
    assert blog.bits_per_byte is None and blog.bytes is None
    for r in (s16, s64, s512):
        assert r.bytes == n_bytes and r.details["text_tokens"] == n_tokens
        assert r.bits_per_byte == pytest.approx(math.log2(vocab) * n_tokens / n_bytes, rel=1e-5)
    # Predicted tokens: all but the first for stride < context; all but each window's first at stride == context.
    assert s16.tokens == n_tokens - 1
    assert s64.tokens == n_tokens - s64.details["windows"] and s64.details["windows"] == math.ceil(n_tokens / 64)
    assert s512.details["stride_clamped"] and s512.details["stride_tokens"] == 64 and s512.tokens == s64.tokens
    assert not s16.details["stride_clamped"]


def test_strides_clamped_to_the_same_context_run_once_and_results_record_the_dtype(tmp_path):
    """A 64-token model under hf-strided-64/128/512: 128 and 512 run at 64 too, so the work is done once and the
    three results are the same numbers, each saying what ran; every result records the dtype it was computed in."""
    folder = write_local_copy(tmp_path / "wt2", TOY_ROWS * 3, TOY_ROWS)
    calls = []

    def counting(ids: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape[0])
        return torch.zeros(*ids.shape, 100)

    protocols = ("hf-strided-64", "hf-strided-128", "hf-strided-512", "hf-strided-16")
    results = ev.evaluate_wikitext(counting, char_tokenize(100), 100, 64, protocols=protocols, local=folder,
                                   batch_size=4, dtype=ev.EVAL_DTYPE)
    windows_64, windows_16 = results[0].details["windows"], results[3].details["windows"]
    assert sum(calls) == windows_64 + windows_16  # one pass at stride 64, one at 16; none for 128 or 512
    s64, s128, s512, s16 = results
    assert [r.protocol for r in results] == list(protocols)
    for r in (s128, s512):
        assert (r.loss_nats, r.bits_per_byte, r.tokens) == (s64.loss_nats, s64.bits_per_byte, s64.tokens)
        assert r.details["stride_clamped"] and r.details["stride_tokens"] == 64 and r.details["same_as"] == s64.protocol
        assert r.seconds == 0.0 < s64.seconds  # no work done under this name
    assert not s64.details["stride_clamped"] and "same_as" not in s64.details
    assert {r.details["dtype"] for r in results} == {"float32"} == {ev.EVAL_DTYPE}
    unlabelled = ev.evaluate_wikitext(counting, char_tokenize(100), 100, 64, protocols=("hf-strided-64",), local=folder)
    assert "dtype" not in unlabelled[0].details  # the caller did not say: nothing is claimed


# --------------------------------------------------------------------------------------------------------
# hf-strided: equals HF's own per-window loop on a tiny model
# --------------------------------------------------------------------------------------------------------


def hand_strided(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The HF docs' loop, one window per forward and HF's own loss; each window's mean loss weighted by the
    number of labels the model really scores after its internal shift (the exact token-weighted mean)."""
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss.item()
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss * scored
        n_tokens += scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [5, 16, 32])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_strided_equals_hand_computed_loop(tiny_gpt2, stride, batch_size):
    text = " ".join(row.strip() for row in TOY_ROWS if row)
    ids = char_tokenize(TOY_VOCAB)([text])[0]
    assert len(ids) % stride and len(ids) > 300  # a partial last window and a few hundred tokens
    want_loss, want_tokens = hand_strided(tiny_gpt2, ids, 32, stride)
    got = ev.eval_hf_strided(ev.hf_logits_fn(tiny_gpt2), ids, TOY_VOCAB, 32, stride, batch_size=batch_size,
                             text_bytes=len(text.encode()))
    assert got.tokens == want_tokens
    assert got.loss_nats == pytest.approx(want_loss, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want_loss), rel=1e-5)
    assert got.protocol == f"hf-strided-{stride}"
    assert 1.0 < want_loss < 2 * math.log(TOY_VOCAB)  # a real, non-degenerate number


def test_strided_windows_follow_hf_loop():
    # N=10, context 4, stride 2: windows [0,4) [2,6) [4,8) [6,10); each later one scores its last 2 tokens.
    assert ev.strided_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    # The last window is cut at N and scores only what the previous one did not.
    assert ev.strided_windows(9, 4, 2) == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 9, 2)]
    # stride == context: every window's first token is context only.
    assert ev.strided_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 1), (8, 10, 1)]


def test_logits_narrower_than_vocab_and_ids_outside_vocab_fail():
    with pytest.raises(ValueError, match="fewer than"):
        ev.eval_hf_strided(uniform_logits(50), list(range(20)), 60, 8, 4)
    with pytest.raises(ValueError, match="outside vocab_size"):
        ev.eval_hf_strided(uniform_logits(64), [1, 2, 70], 64, 8, 4)


# --------------------------------------------------------------------------------------------------------
# sparknet-blog: mean of batch means, pad masked by position
# --------------------------------------------------------------------------------------------------------


def test_blog_equals_hand_computed_mean_of_batch_means(tiny_gpt2):
    import datasets

    rows = TOY_ROWS + [" x \n", "", " zz top \n"]
    num_rows, max_tokens, batch_rows, pad_id = 10, 16, 3, 0
    tokenize = char_tokenize(TOY_VOCAB)
    got = ev.eval_sparknet_blog(ev.hf_logits_fn(tiny_gpt2), tokenize, TOY_VOCAB, rows, n_positions=32,
                                batch_size=2, num_rows=num_rows, max_tokens=max_tokens, batch_rows=batch_rows,
                                pad_id=pad_id)

    # SparkNet's way, written out: datasets' shuffle, filter, then per batch a padded tensor, labels = ids with
    # padding (by attention mask) at -100, HF's own loss, and the plain mean of the batch losses.
    shuffled = datasets.Dataset.from_dict({"text": rows}).shuffle(seed=42)["text"]
    selected = [t for t in shuffled if len(t.strip()) > 0][:num_rows]
    batch_losses, nll_total, scored_total = [], 0.0, 0
    for start in range(0, len(selected), batch_rows):
        batch = [tokenize([t])[0][:max_tokens] for t in selected[start:start + batch_rows]]
        input_ids = torch.full((len(batch), max_tokens), pad_id)
        attention_mask = torch.zeros((len(batch), max_tokens), dtype=torch.long)
        for i, row in enumerate(batch):
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        with torch.no_grad():
            loss = tiny_gpt2(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item()
        batch_losses.append(loss)
        scored = int((labels[:, 1:] != -100).sum())
        nll_total += loss * scored
        scored_total += scored
    want = sum(batch_losses) / len(batch_losses)
    token_weighted = nll_total / scored_total

    assert len(batch_losses) == 4 and len(selected) == num_rows  # 3 + 3 + 3 + 1 rows: uneven batches
    assert got.loss_nats == pytest.approx(want, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-5)
    assert got.details["token_weighted_loss_nats"] == pytest.approx(token_weighted, rel=1e-5)
    assert abs(want - token_weighted) > 1e-3  # the two means really differ on padded batches
    assert got.tokens == scored_total and got.details["batches"] == 4
    assert got.details["truncated_rows"] >= 1  # some rows were cut at max_tokens
    # Some real tokens have the pad's id (ord("a") % 97 == 0): they are scored, because padding is by position.
    assert any(pad_id in tokenize([t])[0][1:max_tokens] for t in selected)


def test_blog_row_selection_matches_datasets_on_real_validation(shared_data):
    import datasets

    rows = ev.load_wikitext("validation", shared_data / "wikitext-2-raw")
    assert len(rows) == ev.WIKITEXT_NUM_ROWS["validation"] == 3760
    selected = ev.select_blog_rows(rows)
    shuffled = datasets.Dataset.from_dict({"text": rows}).shuffle(seed=42)["text"]
    assert selected == [t for t in shuffled if t.strip()][:2000]
    assert selected == [t for t in shuffled if len(t) > 0][:2000]  # both readings of "non-empty" agree here
    assert len(selected) == 2000 and all(t.strip() for t in selected)
    # Filtering before shuffling (the other reading) selects different rows: the order matters.
    non_empty = [t for t in rows if t.strip()]
    filter_first = datasets.Dataset.from_dict({"text": non_empty}).shuffle(seed=42)["text"][:2000]
    assert filter_first != selected


@pytest.mark.parametrize("n", [1, 37, 3760])
def test_shuffle_permutation_is_datasets_shuffle(n):
    import datasets

    shuffled = datasets.Dataset.from_dict({"i": list(range(n))}).shuffle(seed=42)["i"]
    assert ev.shuffle_permutation(n, 42) == list(shuffled)


def test_blog_tokenization_matches_sparknets_hf_tokenizer():
    """SparkNet: GPT2TokenizerFast, pad = eos, truncation + padding="max_length" to 256, no BOS. On wiki-like rows
    made here (the check is that two tokenizations agree, on any text), some longer than 256 tokens."""
    from sparknet.tokenizer import GPT2_EOT, TokenizerSpec, from_spec

    ours = from_spec(TokenizerSpec("gpt2", "", "main"))
    hf = ours.to_hf()
    hf.pad_token = hf.eos_token
    rows = ev.select_blog_rows(TOY_ROWS * 4 + [" ".join(r.strip() for r in TOY_ROWS if r) * 3 + " \n"], num_rows=40)
    enc = hf(rows, truncation=True, max_length=256, padding="max_length", return_tensors="pt")
    ids, mask = ev.pad_rows(ours.encode_batch(rows), 256, GPT2_EOT)
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    assert int(mask.sum(1).max()) == 256 and int(mask.sum(1).min()) < 256  # both truncated and padded rows
    assert ev.hf_tokenize(hf)(rows) == ours.encode_batch(rows)  # a baseline's tokenizer goes through the same path


# --------------------------------------------------------------------------------------------------------
# Data: local copies, the real files, errors
# --------------------------------------------------------------------------------------------------------


def test_real_files_all_layouts_give_the_hf_rows(shared_data):
    folder = shared_data / "wikitext-2-raw"
    for split, stem in (("test", "test"), ("validation", "valid")):
        with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
            want = [json.loads(line)["text"] for line in f]
        assert len(want) == ev.WIKITEXT_NUM_ROWS[split]
        # "\n".join(rows) layout, the original zip's one-line-per-row layout, and a folder lookup.
        assert ev.load_wikitext(split, folder / f"wiki.{stem}.raw") == want
        assert ev.load_wikitext(split, folder / "salesforce_format" / f"wiki.{stem}.raw") == want
        assert ev.load_wikitext(split, folder) == want
        assert ev.load_wikitext(split, folder / "salesforce_format") == want
        assert ev.rows_sha256(want) == ev.WIKITEXT_SHA256[split]


def test_local_copy_from_environment_and_argument(tmp_path, monkeypatch):
    env_copy = write_local_copy(tmp_path / "env", TOY_ROWS, TOY_ROWS * 2)
    monkeypatch.setenv(ev.WIKITEXT_ENV, str(env_copy))
    rows, source = ev.load_wikitext_with_source("valid")
    assert rows == TOY_ROWS * 2 and source == str(env_copy / "validation.jsonl")
    # An explicit argument wins over the environment.
    write_local_copy(tmp_path / "arg", ["", " a \n"], [" b \n"])
    assert ev.load_wikitext("test", tmp_path / "arg") == ["", " a \n"]


def test_parse_raw_both_layouts():
    rows = ["", " = T = \n", "", " Text here . \n", " More . \n", ""]
    assert ev.parse_raw("\n".join(rows)) == rows
    assert ev.parse_raw("\n".join(rows).replace("\n", "\r\n")) == rows  # CRLF copies
    zip_layout = " \n = T = \n \n Text here . \n More . \n \n"
    assert ev.parse_raw(zip_layout) == rows
    with pytest.raises(ValueError, match="line 2"):
        ev.parse_raw("a\nb\n\nc\n")


def test_offline_without_local_copy_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv(ev.WIKITEXT_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(SparknetError) as info:
        ev.load_wikitext("test", cache_dir=tmp_path / "empty-cache")  # an empty cache: nothing to fall back on
    assert time.perf_counter() - started < 15  # never waits on the network
    message = str(info.value)
    assert "\n" not in message
    assert "offline" in message and "--wikitext" in message and "SPARKNET_WIKITEXT" in message
    # evaluate_wikitext fails the same way before any model work.
    with pytest.raises(SparknetError, match="SPARKNET_WIKITEXT"):
        ev.evaluate_wikitext(uniform_logits(8), char_tokenize(8), 8, 16, protocols=("hf-strided-8",),
                             cache_dir=tmp_path / "empty-cache")


def test_missing_or_wrong_local_copy_errors_name_the_path(tmp_path, write_jsonl):
    missing = tmp_path / "nope"
    with pytest.raises(SparknetError, match=f"{missing}: no such file or folder"):
        ev.load_wikitext("test", missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SparknetError, match=r"empty: no WikiText-2 validation file in it \(looked for .*wiki\.valid\.raw"):
        ev.load_wikitext("validation", empty)
    test_file = write_jsonl("wiki.test.jsonl", [" a \n"])
    with pytest.raises(SparknetError, match="holds the test split, but the validation split is needed"):
        ev.load_wikitext("validation", test_file)
    bad = tmp_path / "bad" / "test.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "ok \\n"}\n{"txt": 1}\n')
    with pytest.raises(SparknetError, match=r"test\.jsonl:2: not a JSON object"):
        ev.load_wikitext("test", bad.parent)
    with pytest.raises(SparknetError, match="split 'train' is not one of"):
        ev.load_wikitext("train", tmp_path)


def test_unknown_protocol_is_a_user_error():
    with pytest.raises(SparknetError, match="unknown WikiText-2 protocol 'hf-strided'"):
        ev.evaluate_wikitext(uniform_logits(8), char_tokenize(8), 8, 16, protocols=("hf-strided",))


def test_hf_helpers(tiny_gpt2, monkeypatch):
    assert ev.hf_context(tiny_gpt2) == 32
    tiny_gpt2.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            ev.hf_logits_fn(tiny_gpt2)(torch.zeros(1, 4, dtype=torch.long))
    finally:
        tiny_gpt2.eval()
    assert ev.hf_logits_fn(tiny_gpt2)(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, TOY_VOCAB)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparknetError) as info:
        ev.load_hf_model("sparknet-test/not-a-model")
    assert "\n" not in str(info.value) and "not-a-model" in str(info.value)
