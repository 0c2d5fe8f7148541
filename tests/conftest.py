"""Shared fixtures. Tests run offline, on the CPU, in seconds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# tests/ is on sys.path (pytest's default import mode, no __init__.py here): the tiny lab is one plain module that
# scripts/bench_sweep.py shares; the test modules use it through the fixtures below.
from tinylab import ROOT, SHARED_DATA, write_tiny_mixture

# Never let a test wait ~25 s on the unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Printed tables wrap at the terminal's width; a test's terminal (a tty, a pipe, a pytest-xdist worker) must not
# change what the assertions see.
os.environ["COLUMNS"] = "120"

# For the subprocesses tests start (sparknet.run, sparknet.sweep, torchrun, mlflow server, PostgreSQL): offline, one
# thread each, this checkout's sparknet first.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder: whatever a command writes relative to the working directory
    (experiments/<study>/, lab/, mlflow.db) lands there, never in the checkout."""
    monkeypatch.chdir(tmp_path)


# Paths the test run itself may create inside the checkout: caches of the interpreter and of pytest/hypothesis.
_RUN_CACHES = ("__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache")


def _checkout_state() -> set[str] | None:
    """`git status --porcelain --ignored` of the checkout (tracked changes, untracked and ignored entries), less the
    run's own caches; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line for line in out.stdout.splitlines() if not any(c in line for c in _RUN_CACHES)}


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller only, not each pytest-xdist worker
        session.config._checkout_before = _checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    if before is None:
        return
    after = _checkout_state() or set()
    changed = sorted(after - before)
    if changed:
        # Tests write only under temporary folders: a test that wrote into the checkout fails the whole run.
        print("\nthe test run changed the checkout (tests must write only under temporary folders):\n  "
              + "\n  ".join(changed))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module's in-process runs on a busy 2-core machine: one torch thread (OpenMP's spinning threads make each
    tiny op take milliseconds). Subprocesses get OMP_NUM_THREADS=1 from ENV below."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (WikiText-2 and real text for benchmarks); the WikiText-2 checks that need it skip when it
    is absent. Session-scoped, so that module fixtures can use it too."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real text not available: {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_mixture():
    """write(folder, **overrides) -> folder/tiny.yaml: the tiny real-text recipe of tests/tinylab.py (the installed
    Python's text: runs in a plain clone), with the sections' keys that a test changes (`train={"batch_tokens":
    1024}`, `max_repeats=...`; see tinylab.tiny_mixture)."""

    def write(folder: Path, **overrides) -> Path:
        return write_tiny_mixture(folder, **overrides)

    return write


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """The environment for a subprocess a test starts (a copy: extend it with dict(subprocess_env, KEY=...))."""
    return dict(ENV)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, [texts]) -> path of a jsonl file of {"text": ...} records."""
    import json

    def make(name: str, texts: list[str], field: str = "text") -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({field: t}) + "\n")
        return p

    return make
