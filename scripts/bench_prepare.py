"""Prepare throughput per core: sparknet's token store vs SparkNet's `datasets.map` path, on the same real text.

What is measured, for each side, on the same jsonl files (default: all of the five below from ../shared/data,
about 20 MB of text), in one process pinned to one CPU, alternating the two sides `--repeats` times:

- sparknet: what `python -m sparknet.prepare` does for a local source: `sparknet.store.prepare_source` reads
  the jsonl, tokenizes with the default GPT-2 BPE (tiktoken, built offline) with `workers=1` (in-process),
  and writes the uint16 store (shards, sha256 checksums, fsync, manifest) into a fresh temporary lab.
- hf-datasets (the earlier SparkNet project's path): per file, `datasets.load_dataset("json", ...)` into a
  fresh cache folder, then `Dataset.map(batched=True, num_proc=None)` with `transformers.GPT2TokenizerFast`
  (GPT-2's exact vocab, from `TiktokenGPT2().to_hf()`), writing `input_ids` (each document's ids + EOS) to
  the Arrow cache. The files have different columns, so they are loaded and mapped one by one.

Both sides count tokens the same way (each non-blank document's ids followed by one end-of-text, 50256;
blank documents are skipped, as sparknet does). The full token streams of both sides are compared once,
outside the timed region, and the run fails loudly if they differ. Timed: the whole path (read + tokenize +
write); the one-time construction of the tokenizers is excluded. The best (or median) of the repeats is
reported as tokens/s per core; with `--all-cores`, sparknet with `workers=os.cpu_count()` (unpinned) is
added as extra information, per core = tokens/s / workers.

Run (from the repository root):

    .venv/bin/python scripts/bench_prepare.py                 # all files, 2 repeats
    .venv/bin/python scripts/bench_prepare.py --max-mb 5 --repeats 3 --all-cores

Exit code: 0 whatever the ratio (PASS / BELOW TARGET is printed), 1 if the two sides' tokens differ, 2 if
the data folder or one of its files is missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from sparknet.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_FILES = (
    "academic/openstax_textbooks.jsonl",
    "web_general/dclm_pool_sample.jsonl",
    "web_general/cc_2019_30_sample.jsonl",
    "web_edu/fineweb_edu_sample.jsonl",
    "wikitext-2-raw/test.jsonl",
)
TARGET_RATIO = 4.0
EOT = 50256


def setup_env() -> set[int]:
    """Offline, single-threaded tokenizers, and the process pinned to one CPU; returns the original affinity.

    Must run before tokenizers/transformers/datasets are imported (they are imported lazily below).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    original = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(original)})
    return original


@dataclass
class Result:
    tokens: int
    wall_s: float
    cpu_s: float


# ------------------------------------------------------------------------------------------- inputs


def select_inputs(data_dir: Path, names: tuple[str, ...], max_mb: float | None, scratch: Path) -> list[Path]:
    """The jsonl files to benchmark, in order; with `max_mb`, a prefix of whole lines (truncated copies in scratch)."""
    if not data_dir.is_dir():
        sys.exit(_fail(f"data folder {data_dir} not found (expected ../shared/data next to the repository)"))
    files = [data_dir / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(_fail(f"data file(s) missing: {', '.join(missing)}"))
    if max_mb is None:
        return files
    budget = int(max_mb * 2**20)
    out: list[Path] = []
    for i, f in enumerate(files):
        if budget <= 0:
            break
        size = f.stat().st_size
        if size <= budget:
            out.append(f)
            budget -= size
            continue
        part = scratch / f"{i:02d}_{f.stem}.head.jsonl"
        with open(f, "rb") as src, open(part, "wb") as dst:
            for line in src:
                if len(line) > budget and dst.tell() > 0:  # at least one line
                    break
                dst.write(line)
                budget -= len(line)
        out.append(part)
        break
    return out


def _fail(msg: str) -> int:
    print(f"bench_prepare: {msg}", file=sys.stderr)
    return 2


def link_folder(files: list[Path], folder: Path) -> Path:
    """A folder of symlinks to `files`, named so that sparknet's sorted listing keeps their order."""
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        (folder / f"{i:02d}_{f.name}").symlink_to(f)
    return folder


# ------------------------------------------------------------------------------------------- the two sides


def run_sparknet(folder: Path, lab: Path, tok: Tokenizer, workers: int) -> tuple[Result, Path]:
    from sparknet.config import SourceConfig
    from sparknet.store_write import prepare_source

    src = SourceConfig(name="bench", kind="local", path=str(folder), weight=1.0, text_field="text")
    t0, c0 = time.perf_counter(), time.process_time()
    store = prepare_source(src, tok, lab=lab, train_tokens_needed=10**12, val_tokens=0, shard_tokens=2**25,
                           workers=workers, batch_documents=256)
    res = Result(store.train_tokens, time.perf_counter() - t0, time.process_time() - c0)
    return res, store.dir


def run_hf(files: list[Path], cache: Path, hf_tok: Any) -> tuple[Result, list[Any]]:
    import datasets

    def encode(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        texts = batch["text"]
        keep = [i for i, t in enumerate(texts) if t and t.strip()]
        ids = hf_tok([texts[i] for i in keep])["input_ids"] if keep else []
        out: list[list[int]] = [[] for _ in texts]
        for i, row in zip(keep, ids):
            out[i] = row + [EOT]
        return {"input_ids": out}

    t0, c0 = time.perf_counter(), time.process_time()
    mapped = []
    for f in files:
        ds = datasets.load_dataset("json", data_files=[str(f)], split="train", cache_dir=str(cache))
        mapped.append(ds.map(encode, batched=True, num_proc=None, remove_columns=ds.column_names,
                             load_from_cache_file=False))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(_hf_flat(m).size for m in mapped)
    return Result(tokens, wall, cpu), mapped


def _hf_flat(ds: Any) -> np.ndarray:
    col = ds.data.column("input_ids").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False)


def check_same(store_dir: Path, mapped: list[Any], n_docs: int = 5) -> None:
    """Fail loudly unless the two sides produced the very same token stream."""
    import numpy as np

    from sparknet.store import open_store

    store = open_store(store_dir)
    ours = store.train().read(0, store.train_tokens)
    theirs = np.concatenate([_hf_flat(m).astype(np.int64) for m in mapped])
    ours_docs = np.split(ours, np.flatnonzero(ours == EOT)[:n_docs] + 1)[:n_docs]
    theirs_docs = np.split(theirs, np.flatnonzero(theirs == EOT)[:n_docs] + 1)[:n_docs]
    for k, (a, b) in enumerate(zip(ours_docs, theirs_docs)):
        if not np.array_equal(a, b):
            raise SystemExit(f"bench_prepare: MISMATCH in document {k}: sparknet {a[:20].tolist()}... "
                             f"({a.size} ids) vs hf-datasets {b[:20].tolist()}... ({b.size} ids)")
    if ours.size != theirs.size:
        raise SystemExit(f"bench_prepare: MISMATCH in token counts: sparknet {ours.size} vs hf-datasets {theirs.size}")
    if not np.array_equal(ours, theirs):
        at = int(np.flatnonzero(ours != theirs)[0])
        raise SystemExit(f"bench_prepare: MISMATCH at token {at}: sparknet {ours[at:at + 10].tolist()} vs "
                         f"hf-datasets {theirs[at:at + 10].tolist()}")
    print(f"check: identical token streams ({ours.size:,} tokens, first {n_docs} documents compared "
          f"one by one, then the whole stream)")


# ------------------------------------------------------------------------------------------- main


def pick(results: list[Result], stat: str) -> Result:
    if stat == "best":
        return min(results, key=lambda r: r.wall_s)
    return Result(results[0].tokens, statistics.median(r.wall_s for r in results),
                  statistics.median(r.cpu_s for r in results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"default: {DEFAULT_DATA}")
    ap.add_argument("--max-mb", type=float, default=None, help="cap the text read (MiB of jsonl, whole lines)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each side (default 2)")
    ap.add_argument("--stat", choices=("best", "median"), default="best", help="how repeats are summarized")
    ap.add_argument("--all-cores", action="store_true", help="also run sparknet with workers=os.cpu_count()")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.max_mb is not None and not args.max_mb > 0:
        ap.error("--max-mb must be > 0 (megabytes of jsonl to read)")

    original_affinity = setup_env()
    cpu = min(os.sched_getaffinity(0))

    import datasets
    from transformers.utils import logging as hf_logging

    from sparknet.tokenizer import TiktokenGPT2, TokenizerSpec, from_spec

    hf_logging.set_verbosity_error()  # "sequence longer than 1024" warnings: irrelevant to tokenizing
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp_name:
        tmp = Path(tmp_name)
        files = select_inputs(args.data_dir, DEFAULT_FILES, args.max_mb, tmp)
        folder = link_folder(files, tmp / "inputs")
        mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"input: {len(files)} files, {mb:.1f} MiB of jsonl; pinned to cpu {cpu}; "
              f"{args.repeats} repeats, {args.stat}")
        for f in files:
            print(f"  {f}")

        # One-time tokenizer construction, outside the timings.
        tok = from_spec(TokenizerSpec("gpt2"))
        hf_tok = TiktokenGPT2().to_hf()

        runs: dict[str, list[Result]] = {"hf-datasets": [], "sparknet": []}
        for r in range(args.repeats):
            hf_res, mapped = run_hf(files, tmp / f"hf-cache-{r}", hf_tok)
            runs["hf-datasets"].append(hf_res)
            sp_res, store_dir = run_sparknet(folder, tmp / f"lab-{r}", tok, workers=1)
            runs["sparknet"].append(sp_res)
            print(f"repeat {r + 1}: hf-datasets {hf_res.wall_s:.2f} s, sparknet {sp_res.wall_s:.2f} s")
            if hf_res.tokens != sp_res.tokens:
                print(f"bench_prepare: MISMATCH: sparknet wrote {sp_res.tokens:,} tokens, hf-datasets "
                      f"{hf_res.tokens:,}", file=sys.stderr)
                return 1
            if r == 0:
                check_same(store_dir, mapped)
            del mapped

        extra: Result | None = None
        workers = os.cpu_count() or 1
        if args.all_cores:
            os.sched_setaffinity(0, original_affinity)
            extra, _ = run_sparknet(folder, tmp / "lab-all", tok, workers=workers)
            os.sched_setaffinity(0, {cpu})

    print()
    print(f"{'side':<28} {'tokens':>12} {'wall s':>8} {'cpu s':>8} {'tokens/s/core':>14}")
    rates: dict[str, float] = {}
    for name, results in runs.items():
        res = pick(results, args.stat)
        rates[name] = res.tokens / res.wall_s
        print(f"{name + ' (1 core)':<28} {res.tokens:>12,} {res.wall_s:>8.2f} {res.cpu_s:>8.2f} "
              f"{rates[name]:>14,.0f}")
    if extra is not None:
        label = f"sparknet ({workers} workers)"
        print(f"{label:<28} {extra.tokens:>12,} {extra.wall_s:>8.2f} {'-':>8} "
              f"{extra.tokens / extra.wall_s / workers:>14,.0f}   ({extra.tokens / extra.wall_s:,.0f} tokens/s total)")
    ratio = rates["sparknet"] / rates["hf-datasets"]
    verdict = "PASS" if ratio >= TARGET_RATIO else "BELOW TARGET"
    print(f"ratio sparknet/hf-datasets per core: {ratio:.1f}x (target >= {TARGET_RATIO:g}x) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
