"""Sweeps: a 4-trial study with MLflow parent/children and a best config that sparknet.run accepts; a
worker killed mid-trial and rerun; two workers on a real PostgreSQL; pruning; clean errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sparknet.sweep import main

ROOT = Path(__file__).resolve().parents[1]

SPACE = """
eval_points: 4
params:
  train.lr: {low: 1.0e-3, high: 1.0e-2, log: true}
  train.weight_decay: {low: 0.0, high: 0.2}
sampler: {seed: 7, n_startup_trials: 2}
pruner: {n_startup_trials: 2, n_warmup_steps: 1}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_mixture):
    d = tmp_path_factory.mktemp("sweeplab")
    tiny_mixture(d)  # the tiny real-text recipe of tests/tinylab.py as it is: 8 sequences a step
    (d / "space.yaml").write_text(SPACE)
    return d


def args_for(lab: Path, study: str, *extra: str, trials: int = 4, storage: str | None = None) -> list[str]:
    return ["--mixture", str(lab / "tiny.yaml"), "--space", str(lab / "space.yaml"), "--trials", str(trials),
            "--proxy-tokens", "8192", "--study", study, "--storage", storage or f"sqlite:///{lab / 'optuna.db'}",
            *extra, f"lab_dir={lab}"]


def trial_states(url: str, study: str) -> dict[str, int]:
    import optuna

    s = optuna.load_study(study_name=study, storage=url)
    out: dict[str, int] = {}
    for t in s.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_four_trial_sweep_records_everything_and_writes_a_runnable_best_config(lab, monkeypatch, capsys):
    import optuna
    from mlflow.tracking import MlflowClient

    from sparknet.run import main as run_main

    monkeypatch.chdir(lab)
    assert main(args_for(lab, "four")) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="four", storage=f"sqlite:///{lab / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 == len(study.trials)
    assert study.trials[0].user_attrs["baseline"] and study.trials[0].params["train.lr"] == pytest.approx(3e-3)
    assert "baseline (trial 0)" in out and "best: trial" in out

    client = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}")
    exp = client.get_experiment_by_name("four")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("sparknet.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    assert {r.data.tags["sparknet.trial"] for r in children} == {"0", "1", "2", "3"}
    assert all(r.data.params["mixture.total_tokens"] == "8192" for r in children)  # the proxy budget
    assert all("val/loss" in r.data.metrics for r in children if r.info.status == "FINISHED")
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"optimization_history.png", "trials.csv", "best.yaml", "best_overrides.yaml"} <= arts
    assert parent[0].data.metrics["best_val_loss"] == pytest.approx(study.best_value)

    best = lab / "experiments" / "four" / "best.yaml"
    assert best.exists() and (lab / "experiments" / "four" / "README.md").exists()
    assert run_main([str(best), "--dry-run"]) == 0  # sparknet.run accepts it as it is
    dry = capsys.readouterr().out
    assert "131,072 tokens" in dry  # the full budget, not the proxy
    from sparknet.config import load_config
    cfg = load_config(best)
    assert cfg.train.lr == pytest.approx(study.best_params["train.lr"])
    assert cfg.train.min_lr == pytest.approx(0.1 * cfg.train.lr)  # the recipe's min/peak ratio is kept


def test_rerunning_a_finished_study_adds_no_trials(lab, monkeypatch):
    monkeypatch.chdir(lab)
    before = trial_states(f"sqlite:///{lab / 'optuna.db'}", "four")
    assert main(args_for(lab, "four")) == 0
    assert trial_states(f"sqlite:///{lab / 'optuna.db'}", "four") == before


def test_worker_killed_mid_trial_then_rerun_ends_with_the_requested_trials(lab, subprocess_env):
    url = f"sqlite:///{lab / 'killed.db'}"
    cmd = [sys.executable, "-m", "sparknet.sweep", *args_for(lab, "killed", "--heartbeat", "1", trials=3,
                                                               storage=url)]
    proc = subprocess.Popen(cmd, env=subprocess_env, cwd=lab, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 180
    killed = False
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(lab / "killed.db", timeout=1) as db:
                states = [s for (s,) in db.execute("SELECT state FROM trials")]
        except sqlite3.Error:
            states = []
        if states.count("COMPLETE") >= 1 and "RUNNING" in states:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the worker finished before it could be killed mid-trial"
    assert trial_states(url, "killed").get("RUNNING") == 1

    done = subprocess.run(cmd, env=subprocess_env, cwd=lab, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    states = trial_states(url, "killed")
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 3
    assert states.get("FAIL") == 1 and "RUNNING" not in states  # the killed trial, failed by its heartbeat
    import optuna
    retried = [t for t in optuna.load_study(study_name="killed", storage=url).trials
               if "failed_trial" in t.system_attrs]
    assert len(retried) == 1 and retried[0].state.name in ("COMPLETE", "PRUNED")  # same params, rerun


def test_pruning_stops_a_deliberately_bad_space(lab, monkeypatch):
    import optuna

    bad = lab / "bad_space.yaml"  # learning rates 3 orders of magnitude too small: nothing is learned
    bad.write_text(SPACE.replace("low: 1.0e-3, high: 1.0e-2", "low: 1.0e-7, high: 1.0e-6")
                   .replace("n_startup_trials: 2, n_warmup_steps: 1", "n_startup_trials: 1, n_warmup_steps: 0"))
    monkeypatch.chdir(lab)
    argv = args_for(lab, "bad")
    argv[argv.index("--space") + 1] = str(bad)
    assert main(argv) == 0
    trials = optuna.load_study(study_name="bad", storage=f"sqlite:///{lab / 'optuna.db'}").trials
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert trials[0].state.name == "COMPLETE" and len(pruned) >= 2
    assert all("worse than the median" in t.user_attrs["reason"] for t in pruned)
    assert all(t.params["train.lr"] < 1e-5 for t in pruned)


def _pg_binaries() -> bool:
    return bool(shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))


@pytest.fixture(scope="module")
def postgres(subprocess_env):
    """A real PostgreSQL server on 127.0.0.1 (lab/postgres.sh), for this module only."""
    if not _pg_binaries():
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs them: apt-get install postgresql)")
    data = tempfile.mkdtemp(prefix="sparknet-pg-")  # under /tmp: the postgres user must reach it when we are root
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(subprocess_env, PGDATA=data, PORT=str(port))
    started = subprocess.run(["bash", str(ROOT / "lab" / "postgres.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stderr
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run(["bash", str(ROOT / "lab" / "postgres.sh"), "stop"], env=env, capture_output=True, timeout=60)
    shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_study_on_postgresql(lab, postgres, subprocess_env):
    import optuna

    url = postgres
    assert url.startswith("postgresql://") and "127.0.0.1" in url
    cmd = [sys.executable, "-m", "sparknet.sweep", *args_for(lab, "pg", trials=5, storage=url)]
    workers = [subprocess.Popen(cmd, env=subprocess_env, cwd=lab, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs[0][-2000:] + outs[1][-2000:]
    trials = optuna.load_study(study_name="pg", storage=url).trials
    assert len(trials) == 5 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)  # none lost, no extra
    assert sorted(t.number for t in trials) == list(range(5))
    params = {tuple(sorted(t.params.items())) for t in trials}
    assert len(params) == 5  # no trial duplicated across workers
    ran = [o.count(": val/loss") + o.count("pruned at") for o in outs]
    assert sum(ran) == 5 and min(ran) >= 1, ran  # both workers did work, 5 trials in all


@pytest.mark.parametrize("space, message", [
    ("params: {train.lr: {low: 1.0e-2, high: 1.0e-3}}", "params.train.lr: low 0.01 must be below high 0.001"),
    ("params: {train.lr: {low: 0, high: 1.0e-3, log: true}}", "params.train.lr: a log range needs low > 0"),
    ("params: {train.lrr: {low: 1.0e-4, high: 1.0e-3}}", "params.train.lrr: value 0.0001 is rejected"),
    ("params: {train.warmup_fraction: {low: 0.5, high: 1.5}}", "params.train.warmup_fraction: value 1.5 is rejected"),
    ("paramz: {}", "paramz: unknown key"),
    ("params: {train.lr: [1, 2]}", "params.train.lr: must be a mapping"),
    ("eval_points: 0\nparams: {train.lr: {low: 1.0e-4, high: 1.0e-3}}", "eval_points: must be an integer"),
    ("params: {train.lr: {low: 1.0e-4, high: 1.0e-3}\n", "not valid YAML"),
])
def test_bad_space_files_fail_before_any_trial(lab, tmp_path, capsys, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(space)
    argv = args_for(lab, "never", storage=f"sqlite:///{tmp_path / 'never.db'}")
    argv[argv.index("--space") + 1] = str(path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert not (tmp_path / "never.db").exists()  # nothing started


def test_unreachable_storage_is_a_clear_error(lab, capsys):
    assert main(args_for(lab, "x", storage="postgresql://nobody@127.0.0.1:9/optuna")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot open the Optuna storage" in err and "lab/postgres.sh" in err
