"""WikiText-2 (wikitext-2-raw-v1) evaluation under three named protocols.

Every result names its protocol, because the same model scores very differently under each:

- `sparknet-blog`: the protocol behind SparkNet's published table (GPT-2 3.9407 / 51.45). Validation split,
  shuffled with `datasets`' `shuffle(seed=42)`, then the first 2000 non-empty rows, each row tokenized alone
  (no BOS), truncated to 256 tokens, batches of 8 rows padded to 256 with EOS, pad positions excluded from each
  batch's loss, loss = mean of the 250 batch means, perplexity = exp(loss).
- `hf-strided-<stride>` (512 and 1024 by default): Hugging Face's "perplexity of fixed-length models" loop over
  `"\\n\\n".join(test rows)`: windows of the model's context every `stride` tokens, each scoring only the tokens
  the previous window did not, loss = token-weighted mean NLL (GPT-2 small: about 25 at 512, 30 at 1024).
- bits per byte: reported on every `hf-strided-*` result, over the same text (see "Bits per byte").

Choices where the protocols are ambiguous (each is tested in tests/test_evaluate.py):

- Row selection (`select_blog_rows`): shuffle the whole validation split (3760 rows) first, then keep the
  non-empty rows in shuffled order, then take the first 2000 ("shuffled with seed 42, first 2000 non-empty
  rows"; filtering first would permute 2461 rows instead and select other rows). The permutation is
  `np.random.default_rng(42).permutation(3760)`, which is exactly what `Dataset.shuffle(seed=42)` draws, so a
  local copy selects the same rows as the hub. "Non-empty" is `text.strip() != ""`; on WikiText it is the same
  as `len(text) > 0`, because the HF rows are either "" or a line with visible text plus its "\\n".
- Padding is identified by position (the attention mask), not by token value: pad = EOS = 50256, so masking
  by value would also drop a real EOS inside a row. With right padding and causal attention, a real
  position never sees a pad position, so forward passes trim each batch to its longest row (and group rows
  by length) instead of padding to 256: the scores are the same, the work is a fraction.
- HF's loss shifts the labels inside the model: in the strided loop a window predicts its last `trg_len`
  tokens, except that the token at window position 0 can never be predicted. So the first window predicts
  `context - 1` tokens and, when stride == context, every window predicts `context - 1` (its first token is
  context only). The loss here is the exact token-weighted mean (sum of per-token NLL / predicted tokens);
  the HF docs' loop weights every window's mean by `valid - 1` instead, off by one token per window when
  stride < context (a ~1e-4 relative difference).
- A stride larger than the model's context would skip the tokens between windows, so it is clamped to the
  context (the result keeps its requested name; `details["stride_tokens"]` says what ran).

Bits per byte (the tokenizer-independent number): `bits_per_byte = loss_nats / ln 2 * text_tokens /
text_bytes`, where `text_bytes` is the UTF-8 size of the whole joined text and `text_tokens` its token count
(the Pile's definition, Gao et al. 2020): the mean per-token loss converted to a per-byte one by this
tokenizer's compression of this exact text. Why not "total NLL / bytes of the predicted tokens": the loop
leaves one token per window unscored at stride == context (~0.1% of the text), and counting those tokens'
bytes exactly needs a per-token byte decoder that a plain `tokenize` callable does not give; this definition
needs only the text and the token count, so any tokenizer is comparable. With uniform logits over V ids it is
exactly log2(V) * text_tokens / text_bytes. `sparknet-blog` has no bits per byte: its loss is a mean of batch
means over rows cut at 256 tokens, which is not a per-token average of any text.

Why the `evaluate` library is not used: version 0.4.x ships no metric modules inside the package;
`evaluate.load("perplexity")` downloads its script from the hub, then loads a model *by hub id* and
re-tokenizes the texts itself, and it computes the mean of per-text perplexities. It can neither score an
in-memory model nor run offline, and it implements neither protocol here, so using it would be a fake.

Precision: every WikiText-2 number is computed in float32 (`EVAL_DTYPE`), whoever computes it (the end of a
training run, `sparknet.compare --evaluate` for runs and baselines): bf16 autocast rounds every matmul to an
8-bit mantissa, so the same model would score differently depending on who scored it, and scoring costs a small
fraction of training. Each result records the dtype it was computed in (`details["dtype"]`), and the comparison
table shows it per row.

Data (`load_wikitext`): a local copy (an argument, else the SPARKNET_WIKITEXT environment variable) or the hub
through `datasets` (cached after the first download). Rows are returned exactly as
`load_dataset("wikitext", "wikitext-2-raw-v1", split=...)["text"]` has them: "" for blank lines, else the line
with its trailing "\\n".

The model is a `logits_fn` (ids [B, T] -> logits [B, T, V'], V' >= vocab_size; logits past the tokenizer's
vocab, e.g. padding to a multiple of 64, are dropped before the softmax) plus its context `n_positions`, so a
training loop, a checkpoint and a hub baseline are evaluated the same way. Put autocast inside `logits_fn`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparknet.errors import SparknetError
from sparknet.hf_models import hf_context, hf_logits_fn, hf_tokenize, load_hf_model  # noqa: F401
from sparknet.hub import hub_offline

if TYPE_CHECKING:
    import torch

LogitsFn = Callable[["torch.Tensor"], "torch.Tensor"]
TokenizeFn = Callable[[list[str]], list[list[int]]]

PROTOCOL_BLOG = "sparknet-blog"
STRIDED_PREFIX = "hf-strided-"
DEFAULT_PROTOCOLS = (PROTOCOL_BLOG, "hf-strided-512", "hf-strided-1024")
# The dtype policy (see the module docstring): WikiText-2 is scored in float32, weights and logits.
EVAL_DTYPE = "float32"

# SparkNet's published protocol.
BLOG_SEED = 42
BLOG_NUM_ROWS = 2000
BLOG_MAX_TOKENS = 256
BLOG_BATCH_ROWS = 8

WIKITEXT_ENV = "SPARKNET_WIKITEXT"
HUB_DATASET = "wikitext"
HUB_CONFIG = "wikitext-2-raw-v1"
FIX_HINT = ("fix: set SPARKNET_WIKITEXT=DIR (or eval.wikitext_path=DIR; compare: --wikitext DIR) to a folder with "
            "wiki.test.raw / wiki.valid.raw, or go online once: the hub copy is cached")
# Rows per split and sha256 of "\n".join(rows) (the widely shared 1,292,013-byte wiki.test.raw is that file
# for test): results say whether they were computed on the canonical text.
WIKITEXT_NUM_ROWS = {"test": 4358, "validation": 3760}
WIKITEXT_SHA256 = {
    "test": "aca2f46735043bcfd0a44eca981d04627b9cdf74c4c9a04bf0856d04066f58fc",
    "validation": "714a24a5de7459876f7cfdc64837e551dd7cde2a51f95b763ee083fff273e307",
}
_SPLIT_ALIASES = {"test": "test", "validation": "validation", "valid": "validation", "val": "validation"}
# Names a split's file may have inside a local folder, in order of preference: structured rows first
# (jsonl/parquet hold the rows as they are), then the raw text layouts (parsed by `parse_raw`).
_NAMES = {
    "test": ("test",),
    "validation": ("validation", "valid"),
}
_SUBFOLDERS = ("", "wikitext-2-raw-v1", "wikitext-2-raw")


@dataclass
class EvalResult:
    """One protocol's number. `loss_nats` is the protocol's loss (for `sparknet-blog` a mean of batch means);
    `tokens` the predicted (scored) tokens; `bytes` the UTF-8 bytes of the text behind `bits_per_byte`;
    `seconds` the forward and loss time (data loading and tokenization are in `details`)."""

    protocol: str
    split: str
    loss_nats: float
    perplexity: float
    bits_per_byte: float | None
    tokens: int
    bytes: int | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def canonical_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise SparknetError(f"WikiText-2 split {split!r} is not one of test, validation "
                            f"(the train split is not used for evaluation)") from None


def parse_raw(text: str) -> list[str]:
    """Rows of a raw WikiText file, as the HF dataset has them. Two layouts exist:

    - "\\n".join(rows) (what `"\\n".join(ds["text"])` writes; the common 1,292,013-byte wiki.test.raw): blank
      rows are empty lines and every non-blank row ends with its own "\\n", so the file always holds "\\n\\n".
    - one line per row (the original wikitext-2-raw-v1.zip): blank rows are " \\n", never an empty line. HF's
      builder reads it line by line and keeps a line (with its "\\n") if it has visible text, else yields "".
    """
    text = text.replace("\r\n", "\n")
    if "\n\n" in text:
        pieces = text.split("\n")
        rows: list[str] = []
        i = 0
        while i < len(pieces):
            if pieces[i] == "":
                rows.append("")
                i += 1
                continue
            # A non-blank row "X\n" followed by the joining "\n" splits into "X" and "".
            if i + 1 < len(pieces) and pieces[i + 1] != "":
                raise ValueError(f"line {i + 2}: two text lines in a row, which neither raw WikiText layout has")
            rows.append(pieces[i] + "\n")
            i += 2
        return rows
    lines = text.split("\n")
    with_ends = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return [line if line.strip() else "" for line in with_ends]


def _read_rows(path: Path) -> list[str]:
    """Rows of one local file: jsonl/json lines of {"text": ...}, parquet with a `text` column, or raw text."""
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".json")):
            rows = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise SparknetError(f"{path}:{lineno}: not a JSON object with a \"text\" field "
                                            f"(fix: one {{\"text\": row}} per line)") from None
            return rows
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise SparknetError(f"{path}: no `text` column (has {', '.join(table.column_names)}) (fix: a file with WikiText's `text` column)")
            return [t if t is not None else "" for t in table.column("text").to_pylist()]
        # newline=None: "\r\n" and "\r" read as "\n", as HF's builder reads the original files.
        with open(path, encoding="utf-8") as f:
            return parse_raw(f.read())
    except OSError as exc:
        raise SparknetError(f"{path}: cannot read it ({exc.strerror or exc}) (fix: check its permissions, or point at another copy)") from None
    except UnicodeDecodeError as exc:
        raise SparknetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}) (fix: use the raw UTF-8 files, wiki.*.raw)") from None
    except ValueError as exc:  # parse_raw
        raise SparknetError(f"{path}: not a WikiText raw file ({exc}) (fix: use wiki.test.raw / wiki.valid.raw, jsonl or parquet)") from None


def _split_of_name(name: str) -> str | None:
    name = name.lower()
    if "test" in name:
        return "test"
    if "valid" in name or name.startswith("val"):
        return "validation"
    return None


def find_local_file(local: str | os.PathLike[str], split: str) -> Path:
    """The file holding `split` in a local copy: the path itself if it is a file, else a known name in it."""
    split = canonical_split(split)
    path = Path(local).expanduser()
    if path.is_file():
        # A single file serves the split its name says (or any split if its name says none), never the other:
        # scoring the SparkNet protocol on test rows would be silently wrong.
        named = _split_of_name(path.name)
        if named is not None and named != split:
            raise SparknetError(f"{path}: holds the {named} split, but the {split} split is needed "
                                f"(fix: pass the folder holding both wiki.test.raw and wiki.valid.raw)")
        return path
    if not path.exists():
        raise SparknetError(f"{path}: no such file or folder (the local WikiText-2 copy; {FIX_HINT})")
    candidates = []
    for sub in _SUBFOLDERS:
        for stem in _NAMES[split]:
            for name in (f"{stem}.jsonl", f"wiki.{stem}.jsonl", f"{stem}.parquet", f"wiki.{stem}.parquet",
                         f"{stem}-00000-of-00001.parquet", f"wiki.{stem}.raw", f"wiki.{stem}.txt"):
                candidates.append(Path(sub) / name if sub else Path(name))
    for rel in candidates:
        if (path / rel).is_file():
            return path / rel
    looked = ", ".join(str(c) for c in candidates if c.parent == Path("."))
    raise SparknetError(f"{path}: no WikiText-2 {split} file in it (looked for {looked}, also under "
                        f"wikitext-2-raw-v1/) ({FIX_HINT})")


def _load_from_hub(split: str, cache_dir: str | os.PathLike[str] | None) -> list[str]:
    # Offline, `load_dataset` only looks in its cache (a fast failure, < 1 s), so it is still worth a try.
    try:
        import datasets

        ds = datasets.load_dataset(HUB_DATASET, HUB_CONFIG, split=split,
                                   cache_dir=str(cache_dir) if cache_dir is not None else None)
        return list(ds["text"])
    except Exception as exc:
        if hub_offline():
            raise SparknetError(f"WikiText-2 is not reachable offline: no local copy given and the {split} split "
                                f"is not in the datasets cache ({FIX_HINT})") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SparknetError(f"WikiText-2 {split} split could not be loaded from the hub ({reason}) "
                            f"({FIX_HINT})") from None


def load_wikitext_with_source(split: str, local: str | os.PathLike[str] | None = None,
                              cache_dir: str | os.PathLike[str] | None = None) -> tuple[list[str], str]:
    """`load_wikitext`, plus where the rows came from (a path, or `hub:wikitext/wikitext-2-raw-v1`)."""
    split = canonical_split(split)
    if local is None:
        local = os.environ.get(WIKITEXT_ENV) or None
    if local is not None:
        path = find_local_file(local, split)
        return _read_rows(path), str(path)
    return _load_from_hub(split, cache_dir), f"hub:{HUB_DATASET}/{HUB_CONFIG}"


def load_wikitext(split: str, local: str | os.PathLike[str] | None = None,
                  cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """WikiText-2 raw rows of `split` ("test" or "validation"), exactly as the HF dataset has them.

    From `local` (a folder with wiki.{test,valid}.raw, {test,validation}.jsonl or parquet, or one such file),
    else from $SPARKNET_WIKITEXT, else from the hub through `datasets` (cached). Offline with neither: a
    one-line SparknetError naming both options.
    """
    return load_wikitext_with_source(split, local, cache_dir)[0]


def rows_sha256(rows: Sequence[str]) -> str:
    """sha256 of "\\n".join(rows): equals WIKITEXT_SHA256[split] for the canonical text."""
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def _data_details(split: str, rows: Sequence[str], source: str) -> dict[str, Any]:
    sha = rows_sha256(rows)
    return {"data_source": source, "data_rows": len(rows), "data_sha256": sha,
            "data_canonical": sha == WIKITEXT_SHA256[split]}


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------


def shuffle_permutation(num_rows: int, seed: int) -> list[int]:
    """The order `datasets.Dataset.shuffle(seed=seed)` puts `num_rows` rows in (numpy's PCG64 permutation)."""
    import numpy as np

    return np.random.default_rng(seed).permutation(num_rows).tolist()


# Elements of float32 logits per cross-entropy call. CPU: 4M (16 MB) keeps each temporary under glibc's 32 MB
# mmap threshold, so it is reused instead of page-faulted in anew every call (that alone doubled CPU time for a
# 50,257-entry vocab). GPU: 256M (1 GB) makes one call per window.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, reduction: str) -> torch.Tensor:
    """-log p(target) for logits [B, T, V'] and targets [B, T], in float32 (as HF upcasts); targets of -100 count
    0. reduction "none" gives [B, T], "sum" a scalar.

    Logits past `vocab_size` (embedding padding) are dropped first: they are not tokens, and leaving them in the
    softmax would give probability to ids the tokenizer never produces.
    """
    import torch
    import torch.nn.functional as F

    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} entries per position, fewer than the tokenizer's "
                         f"vocab_size {vocab_size}")
    logits = logits[..., :vocab_size]
    num_rows, num_positions = targets.shape
    step = max(1, _CHUNK_ELEMENTS.get(logits.device.type, 1 << 26) // vocab_size)
    pieces = []
    for b in range(num_rows):
        for t in range(0, num_positions, step):
            pieces.append(F.cross_entropy(logits[b, t:t + step].float(), targets[b, t:t + step], ignore_index=-100,
                                          reduction=reduction))
    if reduction == "sum":
        return torch.stack(pieces).double().sum()
    return torch.cat(pieces).view(num_rows, num_positions)


def _check_ids(ids: Sequence[Sequence[int]], vocab_size: int) -> None:
    top = max((max(row) for row in ids if len(row)), default=-1)
    if top >= vocab_size:
        raise ValueError(f"tokenize produced id {top}, outside vocab_size {vocab_size}")


def _batched(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# Protocol 1: sparknet-blog
# ---------------------------------------------------------------------------------------------------------


def select_blog_rows(rows: Sequence[str], num_rows: int = BLOG_NUM_ROWS, seed: int = BLOG_SEED) -> list[str]:
    """SparkNet's rows: the split shuffled as `Dataset.shuffle(seed)` does, then its first `num_rows` non-empty
    rows (shuffle first, then filter; "non-empty" = visible text, identical to len > 0 on WikiText)."""
    selected: list[str] = []
    for i in shuffle_permutation(len(rows), seed):
        if rows[i].strip():
            selected.append(rows[i])
            if len(selected) == num_rows:
                break
    return selected


def pad_rows(ids: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or cut) every row to `length`: (input_ids, attention_mask), as a HF tokenizer with
    `truncation=True, max_length=length, padding="max_length"` returns them."""
    import torch

    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for r, row in enumerate(ids):
        row = list(row)[:length]
        input_ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, :len(row)] = 1
    return input_ids, mask


def eval_sparknet_blog(logits_fn: LogitsFn, tokenize: TokenizeFn, vocab_size: int, rows: Sequence[str], *,
                       n_positions: int | None = None, device: Any = "cpu", batch_size: int = 8,
                       num_rows: int = BLOG_NUM_ROWS, seed: int = BLOG_SEED, max_tokens: int = BLOG_MAX_TOKENS,
                       batch_rows: int = BLOG_BATCH_ROWS, pad_id: int | None = None,
                       split: str = "validation") -> EvalResult:
    """The `sparknet-blog` protocol over `rows`, the whole validation split (the selection is part of it).

    Each protocol batch of `batch_rows` rows gets HF's causal-LM loss (mean NLL over its non-pad positions
    that have a previous token); the result is the mean of those batch means. `batch_size` only sets how many
    sequences one forward pass holds (scaled to `n_positions`-token sequences), never the protocol's batches.
    `pad_id` (default EOS 50256 when the vocab has it, else 0) cannot change any score: pad positions sit
    after every real token and attention is causal.
    """
    import torch

    started = time.perf_counter()
    selected = select_blog_rows(rows, num_rows, seed)
    if not selected:
        raise SparknetError("sparknet-blog: the validation split has no non-empty row to score")
    length = max_tokens if n_positions is None else min(max_tokens, n_positions)
    ids = [list(r)[:length] for r in tokenize(list(selected))]
    _check_ids(ids, vocab_size)
    tokenize_s = time.perf_counter() - started
    if pad_id is None:
        pad_id = 50256 if vocab_size > 50256 else 0

    # Per row: sum of NLL over its predicted tokens (positions 1..n-1) and how many there are.
    row_nll = [0.0] * len(ids)
    row_count = [max(len(r) - 1, 0) for r in ids]
    rows_per_forward = max(1, batch_size * max(1, (n_positions or length) // max(length, 1)))
    # Longest first, so that each forward pass pads little and a memory problem shows on the first batch.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    started = time.perf_counter()
    with torch.inference_mode():
        for chunk in _batched(order, rows_per_forward):
            width = max(len(ids[i]) for i in chunk)
            if width < 2:
                continue
            x, mask = pad_rows([ids[i] for i in chunk], width, pad_id)
            x, mask = x.to(device), mask.to(device)
            logits = logits_fn(x)[:, :-1]
            targets = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # by position, not by the pad's value
            nll = _token_nll(logits, targets, vocab_size, "none")
            per_row = nll.view(len(chunk), width - 1).double().sum(dim=1).tolist()
            for i, value in zip(chunk, per_row):
                row_nll[i] = value
    _sync(device)
    seconds = time.perf_counter() - started

    batch_means = []
    skipped = 0
    for start in range(0, len(ids), batch_rows):
        count = sum(row_count[start:start + batch_rows])
        if count == 0:  # HF's loss would be NaN (0/0); such a batch carries no information
            skipped += 1
            continue
        batch_means.append(sum(row_nll[start:start + batch_rows]) / count)
    if not batch_means:
        raise SparknetError("sparknet-blog: every selected row is a single token; there is nothing to score")
    loss = sum(batch_means) / len(batch_means)
    tokens = sum(row_count)
    return EvalResult(
        protocol=PROTOCOL_BLOG, split=split, loss_nats=loss, perplexity=math.exp(loss), bits_per_byte=None,
        tokens=tokens, bytes=None, seconds=seconds,
        details={"rows": len(selected), "rows_wanted": num_rows, "seed": seed, "max_tokens": length,
                 "max_tokens_clamped": length != max_tokens,
                 "batch_rows": batch_rows, "batches": len(batch_means), "skipped_batches": skipped,
                 "token_weighted_loss_nats": sum(row_nll) / tokens,
                 "truncated_rows": sum(1 for r in ids if len(r) == length),
                 "tokenize_seconds": tokenize_s},
    )


# ---------------------------------------------------------------------------------------------------------
# Protocol 2: hf-strided-<stride>, with bits per byte
# ---------------------------------------------------------------------------------------------------------


def strided_windows(num_tokens: int, context_tokens: int, stride_tokens: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window of HF's loop, `first_target` in window coordinates.

    HF: end = min(begin + context, N); trg_len = end - prev_end; labels before the last trg_len are -100; the
    model's shift means the label at window position 0 is never predicted, hence max(1, ...).
    """
    windows = []
    prev_end = 0
    for begin in range(0, num_tokens, stride_tokens):
        end = min(begin + context_tokens, num_tokens)
        trg_len = end - prev_end
        windows.append((begin, end, max(1, (end - begin) - trg_len)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def eval_hf_strided(logits_fn: LogitsFn, ids: Sequence[int], vocab_size: int, n_positions: int, stride: int, *,
                    device: Any = "cpu", batch_size: int = 8, text_bytes: int | None = None,
                    split: str = "test") -> EvalResult:
    """HF's fixed-length-model perplexity over token ids `ids` (the whole joined text), several windows per
    forward pass. `text_bytes` (UTF-8 size of the text `ids` encode) enables bits per byte."""
    import torch

    if stride < 1 or n_positions < 2:
        raise ValueError(f"stride {stride} and n_positions {n_positions} must be >= 1 and >= 2")
    if len(ids) < 2:
        raise SparknetError(f"hf-strided: the text has {len(ids)} token(s); at least 2 are needed to score one")
    _check_ids([ids], vocab_size)
    stride_tokens = min(stride, n_positions)
    windows = strided_windows(len(ids), n_positions, stride_tokens)
    # Windows with the same length and first target stack into one tensor: the first window, the middle
    # ones, the last one (shorter or differently aligned) form at most three groups.
    groups: dict[tuple[int, int], list[int]] = {}
    for begin, end, first in windows:
        groups.setdefault((end - begin, first), []).append(begin)

    started = time.perf_counter()
    all_ids = torch.tensor(list(ids), dtype=torch.long, device=device)
    nll_total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    with torch.inference_mode():
        for (width, first), begins in groups.items():
            offsets = torch.arange(width, device=device)
            for chunk in _batched(begins, batch_size):
                x = all_ids[torch.tensor(chunk, device=device)[:, None] + offsets]
                logits = logits_fn(x)
                # Logits at position t predict token t + 1: score targets first..width-1 only.
                nll_total += _token_nll(logits[:, first - 1:width - 1], x[:, first:width], vocab_size, "sum").double()
                tokens += len(chunk) * (width - first)
    loss = nll_total.item() / tokens  # .item() waits for the device
    seconds = time.perf_counter() - started

    bpb = None if text_bytes is None else loss / math.log(2) * len(ids) / text_bytes
    return EvalResult(
        protocol=f"{STRIDED_PREFIX}{stride}", split=split, loss_nats=loss, perplexity=math.exp(loss),
        bits_per_byte=bpb, tokens=tokens, bytes=text_bytes, seconds=seconds,
        details={"stride_tokens": stride_tokens, "stride_clamped": stride_tokens != stride,
                 "context_tokens": n_positions, "windows": len(windows), "text_tokens": len(ids),
                 "tokens_per_second": tokens / seconds if seconds > 0 else None},
    )


# ---------------------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------------------


def parse_protocols(protocols: Sequence[str]) -> tuple[bool, list[int]]:
    """(whether sparknet-blog is asked, the strides asked); unknown names fail with the valid ones."""
    blog, strides = False, []
    for name in protocols:
        if name == PROTOCOL_BLOG:
            blog = True
        elif name.startswith(STRIDED_PREFIX) and name[len(STRIDED_PREFIX):].isdigit() \
                and int(name[len(STRIDED_PREFIX):]) > 0:
            strides.append(int(name[len(STRIDED_PREFIX):]))
        else:
            raise SparknetError(f"unknown WikiText-2 protocol {name!r} (fix: use {PROTOCOL_BLOG} or "
                                f"{STRIDED_PREFIX}<stride>, e.g. {', '.join(DEFAULT_PROTOCOLS)})")
    return blog, strides


def evaluate_wikitext(logits_fn: LogitsFn, tokenize: TokenizeFn, vocab_size: int, n_positions: int,
                      protocols: Sequence[str] = DEFAULT_PROTOCOLS, local: str | os.PathLike[str] | None = None,
                      device: Any = "cpu", batch_size: int = 8,
                      cache_dir: str | os.PathLike[str] | None = None, dtype: str | None = None) -> list[EvalResult]:
    """Score one model on WikiText-2 under `protocols`, in that order.

    logits_fn: ids [B, T] on `device` -> logits [B, T, >= vocab_size]. tokenize: texts -> ids, no special
    tokens added (e.g. `Tokenizer.encode_batch`, or `hf_tokenize(tok)`). vocab_size: the tokenizer's.
    n_positions: the model's context. batch_size: sequences of up to `n_positions` tokens per forward pass.
    dtype: the precision `logits_fn` computes in (EVAL_DTYPE, the policy, or e.g. "bfloat16 autocast"), recorded
    in every result's details: this function cannot see inside `logits_fn`, so the caller says it.

    Strided protocols whose stride the model's context clamps to the same value (a 256-token model under both
    hf-strided-512 and hf-strided-1024) give identical numbers, so they are computed once and reported under
    each name (`details["same_as"]` names the one that ran).
    """
    blog, strides = parse_protocols(protocols)
    results: dict[str, EvalResult] = {}
    if blog:
        rows, source = load_wikitext_with_source("validation", local, cache_dir)
        result = eval_sparknet_blog(logits_fn, tokenize, vocab_size, rows, n_positions=n_positions, device=device,
                                    batch_size=batch_size)
        result.details.update(_data_details("validation", rows, source))
        results[PROTOCOL_BLOG] = result
    if strides:
        rows, source = load_wikitext_with_source("test", local, cache_dir)
        text = "\n\n".join(rows)  # HF's recipe: rows already end with "\n", so paragraphs get a blank line
        started = time.perf_counter()
        ids = tokenize([text])[0]
        tokenize_s = time.perf_counter() - started
        text_bytes = len(text.encode("utf-8"))
        by_stride: dict[int, EvalResult] = {}  # effective stride -> the result computed for it
        for stride in strides:
            ran = by_stride.get(min(stride, n_positions))
            if ran is not None:
                # seconds=0: no work was done for this name (what it cost is on the result named in same_as).
                result = replace(ran, protocol=f"{STRIDED_PREFIX}{stride}", seconds=0.0, details=dict(
                    ran.details, stride_clamped=ran.details["stride_tokens"] != stride, same_as=ran.protocol))
            else:
                result = eval_hf_strided(logits_fn, ids, vocab_size, n_positions, stride, device=device,
                                         batch_size=batch_size, text_bytes=text_bytes)
                result.details.update(_data_details("test", rows, source), tokenize_seconds=tokenize_s)
                by_stride[result.details["stride_tokens"]] = result
            results[result.protocol] = result
    if dtype is not None:
        for result in results.values():
            result.details["dtype"] = dtype
    return [results[name] for name in protocols]


def main(argv: list[str] | None = None) -> int:
    """`python -m sparknet.evaluate downstream ...`: its one command (WikiText-2 is scored by runs and by
    `sparknet.compare --evaluate`)."""
    from sparknet.downstream.cli import main as downstream_main
    from sparknet.errors import cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["downstream"]:
        return cli_main(_usage)(argv)
    return downstream_main(argv[1:])


def _usage(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: python -m sparknet.evaluate downstream RUN_OR_CHECKPOINT [--tasks ...] (see its --help)")
        return 0
    raise SparknetError(f"python -m sparknet.evaluate: unknown command {' '.join(argv[:1]) or '(none)'!r} "
                        f"(fix: python -m sparknet.evaluate downstream RUN_OR_CHECKPOINT)")


if __name__ == "__main__":
    sys.exit(main())
