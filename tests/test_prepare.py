"""`python -m sparknet.prepare`: the report, the budget check, idempotence, clean failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparknet.tokenizer import TiktokenGPT2

REPO = Path(__file__).resolve().parents[1]


def run_prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "sparknet.prepare", *args, "--quiet"], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


WEB = [f"web page {i} " + "words " * (i % 30 + 10) for i in range(800)]
BOOKS = [f"chapter {i}. " + "prose " * 40 for i in range(250)]


def spec(tmp_path: Path, write_jsonl, max_repeats: float = 1.0) -> Path:
    write_jsonl("web/part-0.jsonl", WEB)
    write_jsonl("books/b.jsonl", BOOKS)
    data = {
        "lab_dir": str(tmp_path / "lab"),
        "mixture": {"total_tokens": "20k", "val_tokens": 256, "sources": [
            {"name": "web", "kind": "local", "path": "web", "weight": 0.6, "max_repeats": 10},
            {"name": "books", "kind": "local", "path": "books/*.jsonl", "weight": 0.4, "max_repeats": max_repeats}]},
        "model": {"preset": "cpu-tiny"},
        "train": {"seq_len": 128},
        "prepare": {"shard_tokens": 4096},
    }
    p = tmp_path / "mix.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.slow
def test_report_and_idempotence(tmp_path, write_jsonl):
    p = spec(tmp_path, write_jsonl)
    first = run_prepare(str(p), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "mixture mix: 20,000 tokens = 157 sequences of 128 (last 32)" in out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in ("web", "books")}
    assert lines["web"][1] == "0.6" and lines["web"][-1] == "ok"
    report = json.loads((tmp_path / "lab" / "prepared" / "mix.json").read_text())
    by_name = {s["name"]: s for s in report["sources"]}
    assert by_name["web"]["tokens_required"] + by_name["books"]["tokens_required"] == 20_000
    assert abs(by_name["web"]["tokens_required"] - 12_000) < 128
    assert abs(by_name["web"]["tokens_spec"] - 12_000) < 1e-6
    assert report["max_window_deviation_sequences"] < 1
    # how each validation slice was drawn: in the report and the JSON
    for name in ("web", "books"):
        s = by_name[name]
        assert s["val_documents"] > 0 and s["duplicates_dropped"] == 0 and 256 <= s["val_tokens"] < 512
        assert "with the smallest hashes, spread over the whole source" in s["val_selection"]
        assert f"{name}: val {s['val_tokens']:,} tokens = {s['val_documents']} of " in out
    second = run_prepare(str(p), "--verify", cwd=tmp_path)
    assert second.returncode == 0 and "wrote 0 tokens" in second.stdout
    assert "every shard matches its sha256" in second.stdout


@pytest.mark.slow
def test_source_too_small_fails_before_training_and_keeps_the_store(tmp_path, write_jsonl):
    p = spec(tmp_path, write_jsonl, max_repeats=1.0)
    # books: ~11k tokens in ~64 kB; its 40% of 100k cannot be told from its bytes, only once tokenized
    proc = run_prepare(str(p), "mixture.total_tokens=100k", cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: mixture.sources.books: needs ")
    assert "max_repeats is 1" in err and "fix:" in err
    assert "TOO SMALL" in proc.stdout  # the report is printed before the failure
    # the stores written so far are intact and reused when the cap is raised
    ok = run_prepare(str(p), "mixture.total_tokens=100k", "mixture.sources.books.max_repeats=20", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 0 tokens" in ok.stdout


def test_source_that_cannot_hold_its_share_fails_before_tokenizing(tmp_path, write_jsonl):
    """Its bytes bound its tokens: 80k tokens cannot come from ~64 kB, so nothing is tokenized at all."""
    p = spec(tmp_path, write_jsonl, max_repeats=1.0)
    proc = run_prepare(str(p), "mixture.total_tokens=200k", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    err = proc.stderr
    assert "mixture.sources.books: its 1 file(s) under" in err and "bytes, at most" in err
    assert "max_repeats=1 times that" in err and "fix:" in err
    assert not (tmp_path / "lab" / "tokens").exists()


def test_missing_source_files_are_one_line_errors(tmp_path, write_jsonl):
    p = spec(tmp_path, write_jsonl)
    proc = run_prepare(str(p), "mixture.sources.web.path=nowhere", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "source 'web': path" in proc.stderr and "does not exist" in proc.stderr
    proc = run_prepare(str(p), "--workers", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "--workers: must be a whole number >= 1" in proc.stderr


@pytest.mark.slow
def test_quickstart_spec_prepares_offline(tmp_path):
    """The quickstart mixture reads only what a Python installation carries, offline."""
    proc = run_prepare(str(REPO / "mixtures" / "quickstart.yaml"), f"lab_dir={tmp_path / 'lab'}",
                       "mixture.total_tokens=200k", "tokenizer.train_bytes_per_source=262144", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("docstrings", "readmes", "code"):
        assert any(ln.startswith(name) and ln.endswith("ok") for ln in proc.stdout.splitlines()), proc.stdout


def test_codelion_spec_offline_is_a_one_line_error(tmp_path):
    """The real hub path runs; with the hub unreachable it says which source and how to fix it."""
    proc = run_prepare(str(REPO / "mixtures" / "codelion_502030.yaml"), f"lab_dir={tmp_path / 'lab'}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "source 'finepdfs' (hf 'codelion/finepdfs-1B'" in proc.stderr and "fix:" in proc.stderr


@pytest.mark.slow
def test_validation_slice_never_eats_the_source(tmp_path, write_jsonl):
    """val_tokens larger than a source: the slice stops at 10% of it, and the report says so."""
    p = spec(tmp_path, write_jsonl)
    proc = run_prepare(str(p), "mixture.val_tokens=10M", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "lab" / "prepared" / "mix.json").read_text())
    tok = TiktokenGPT2()
    for s in report["sources"]:
        total = sum(len(ids) + 1 for ids in tok.encode_batch(WEB if s["name"] == "web" else BOOKS))
        assert 0.05 * total < s["val_tokens"] <= 0.1 * total
        assert "capped at 10% of its" in s["val_selection"]
        assert f"{s['name']}: val {s['val_tokens']:,} tokens = " in proc.stdout
