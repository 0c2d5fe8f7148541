"""The tiny real-text lab that the end-to-end tests and scripts/bench_sweep.py train on: two sources of text every
Python installation carries (the `pydocs` source: the standard library's docstrings, prose, and its code), a
512-token BPE and the ~130k-parameter cpu-tiny model with a 64-token context. Nothing beside the clone is needed.
Tests assert properties of the training (it learns, it spends the budget exactly), never figures that depend on
which Python is installed.

Plain Python (no pytest), so that a script can import it too. The tests reach it through the fixtures of
tests/conftest.py (`shared_data`, `tiny_mixture`, `subprocess_env`); pytest's default import mode puts tests/ on
sys.path, and scripts/bench_sweep.py puts it there itself.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # WikiText-2 and benchmarks only; what needs it skips with a reason

DROP = None  # an override value that removes the key from its section


def tiny_mixture(*, max_repeats: int = 4, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny recipe as the dict its YAML loads to. Each keyword names a section (mixture, tokenizer, model, train,
    eval, prepare, tracking, ...) whose keys it sets, or removes where the value is DROP (None); `max_repeats` is
    that of both sources. Without overrides: ~100k tokens at 8 sequences a step, which train in seconds."""
    cfg: dict[str, Any] = {
        "mixture": {"total_tokens": 131072, "val_tokens": 4096, "sources": [
            {"name": "docs", "kind": "pydocs", "part": "docstrings", "weight": 0.6, "max_repeats": max_repeats},
            {"name": "code", "kind": "pydocs", "part": "code", "weight": 0.4, "max_repeats": max_repeats},
        ]},
        "tokenizer": {"name": "bpe", "vocab_size": 512, "train_bytes_per_source": 400000},
        "model": {"preset": "cpu-tiny", "n_positions": 64},
        "train": {"seq_len": 64, "micro_batch_size": 8, "batch_tokens": 512, "lr": 3e-3, "min_lr": 3e-4,
                  "checkpoint_minutes": 0},
        "eval": {"val_tokens": 2048, "sample_tokens": 4, "sample_prompts": ["The"], "wikitext": [], "downstream": []},
        "prepare": {"workers": 1, "shard_tokens": 65536},
    }
    for section, values in sections.items():
        merged = cfg.setdefault(section, {}) | values
        cfg[section] = {k: v for k, v in merged.items() if v is not DROP}
    return cfg


def write_tiny_mixture(folder: Path, name: str = "tiny.yaml", **overrides: Any) -> Path:
    """Write `tiny_mixture(**overrides)` to folder/name (the run name defaults to the file's stem)."""
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(tiny_mixture(**overrides), sort_keys=False), encoding="utf-8")
    return path


def two_local_sources(folder: Path) -> dict[str, Any]:
    """A config dict over two local jsonl sources, `a` (70%) and `b` (30%), in folder/a and folder/b (the test writes
    them): 20,000 tokens of 64-token sequences, 12 a step, for tests of the plan, the loader and the audit."""
    return {
        "lab_dir": str(Path(folder) / "lab"),
        "mixture": {"total_tokens": 20_000, "val_tokens": 200, "sources": [
            {"name": "a", "kind": "local", "path": str(Path(folder) / "a"), "weight": 0.7, "max_repeats": 5},
            {"name": "b", "kind": "local", "path": str(Path(folder) / "b"), "weight": 0.3, "max_repeats": 5}]},
        "model": {"preset": "cpu-tiny"},
        "train": {"seq_len": 64, "micro_batch_size": 4, "batch_tokens": 768},
        "prepare": {"shard_tokens": 2048},
    }


def kill_mid_study(cmd: list[str], env: dict[str, str], cwd: Path, db: Path, timeout_s: float = 240) -> bool:
    """Start a study worker (`cmd`, on the SQLite study `db`) and SIGKILL its whole process group the moment one
    trial is complete and another running: no handler runs, the running trial's heartbeat just stops. True if it
    was killed so, False if it ended first."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + timeout_s
    killed = False
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(db, timeout=1) as con:
                states = [s for (s,) in con.execute("SELECT state FROM trials")]
        except sqlite3.Error:
            states = []
        if states.count("COMPLETE") >= 1 and "RUNNING" in states:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    return killed


def kill_mid_study_then_rerun(cmd: list[str], env: dict[str, str], cwd: Path, db: Path,
                              timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`kill_mid_study`, checked (it was killed so, and left exactly one trial RUNNING with no heartbeat), then the
    same command run again to the end: the rerun's CompletedProcess."""
    assert kill_mid_study(cmd, env, cwd, db), "the worker finished before it could be killed mid-study"
    with sqlite3.connect(db, timeout=5) as con:
        running = [s for (s,) in con.execute("SELECT state FROM trials") if s == "RUNNING"]
    assert len(running) == 1, f"{len(running)} trials RUNNING after the kill"
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def timed_study(prefix: str, proxy_tokens: str, cli, **mixture: Any) -> tuple[int, float, list, list, list]:
    """For the study benchmarks (scripts/bench_sweep.py, bench_ablate.py): in a temporary lab with the tiny recipe
    (`mixture`: tiny_mixture's overrides), warm the token stores and the BPE once (as a study's first run would),
    then time `cli(lab)`, a study named "bench" on the lab's SQLite storage. Returns (exit code, seconds, the
    study's trials, and per completed trial its training seconds and its overhead: wall time minus training)."""
    import tempfile

    import optuna

    from sparknet.config import load_config
    from sparknet.prepare import prepare

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        lab = Path(tmp)
        write_tiny_mixture(lab, **mixture)
        os.chdir(lab)
        prepare(load_config(lab / "tiny.yaml", [f"lab_dir={lab}", f"mixture.total_tokens={proxy_tokens}"]),
                progress=False)
        t0 = time.perf_counter()
        code = cli(lab)
        seconds = time.perf_counter() - t0
        trials = [] if code else optuna.load_study(study_name="bench", storage=f"sqlite:///{lab / 'optuna.db'}").trials
        os.chdir(ROOT)
    done = [t for t in trials if "wall_seconds" in t.user_attrs]
    train = [t.user_attrs["seconds"] for t in done]
    overhead = [t.user_attrs["wall_seconds"] - t.user_attrs["seconds"] for t in done]
    return code, seconds, trials, train, overhead


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, read from /proc (Linux): torchrun starts its workers in sessions of their own,
    so killing the launcher's process group leaves them training."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher's process group and every process below it (torchrun's workers included)."""
    below = descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in below:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_wikitext_valid(folder: Path, seed: int = 0, articles: int = 12) -> Path:
    """A small file in wiki.valid.raw's layout (rows joined by "\\n"; blank rows empty; headings as WikiText has
    them). What it says does not matter for the mechanics, only that it is read as the validation split."""
    rng = random.Random(seed)
    words = "the of a river city was in and to built north song album game first season team".split()
    rows = []
    for i in range(articles):
        rows += ["", f" = Article {i} = \n", ""]
        rows += [" " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + " .\n" for _ in range(3)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wiki.valid.raw").write_text("\n".join(rows), encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (one worker, no job runner, as lab/mlflow_server.sh starts it) that a test
    can stop and start again on the same port and store."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env, self.port, self.proc = folder, env, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import urllib.request

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
             "1", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}", "--artifacts-destination",
             str(self.folder / "server-artifacts")], env=dict(self.env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not start within 90 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
