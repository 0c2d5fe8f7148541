"""How a run ends when it does not finish: SIGTERM ends its MLflow run KILLED (never left RUNNING), releases its lock
and leaves a resumable state; a resume with other measuring settings is refused before anything is rewritten."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sparknet.config import load_config
from sparknet.locks import run_busy
from sparknet.run import run_dir_for

EVAL = {"every_tokens": 8192, "val_tokens": 512}


@pytest.mark.slow
def test_sigterm_ends_the_mlflow_run_killed_and_a_changed_resume_is_refused(tmp_path, tiny_mixture, subprocess_env):
    from mlflow.tracking import MlflowClient

    mixture = tiny_mixture(tmp_path, train={"checkpoint_every_tokens": 4096}, eval=EVAL)
    cmd = [sys.executable, "-m", "sparknet.run", str(mixture), f"lab_dir={tmp_path / 'lab'}", "--quiet"]
    run_dir = run_dir_for(load_config(mixture, [f"lab_dir={tmp_path / 'lab'}"]))
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("step-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "interrupted"
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'lab' / 'mlflow.db'}").get_run(state["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run_busy(run_dir) == ""  # the lock is released (and names no holder)

    # A resume that would measure differently is refused, in one line, and rewrites nothing.
    config_before = (run_dir / "config.yaml").read_bytes()
    done = subprocess.run([*cmd, "eval.val_tokens=1024", "tracking.experiment=other"], env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = done.stderr
    assert "eval.val_tokens: then 512, now 1024" in line and "tracking.experiment: then '', now 'other'" in line
    assert "fix:" in line and "--fresh" in line
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert yaml.safe_load(config_before)["eval"]["val_tokens"] == 512

    # The same settings resume and finish; the MLflow run is the same one, now FINISHED.
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished"
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'lab' / 'mlflow.db'}").get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"


def test_the_sigterm_handler_is_the_runs_only_while_it_executes(tmp_path, tiny_mixture, monkeypatch):
    """In-process callers (tests, notebooks, a sweep's worker) get their own SIGTERM handler back after a run."""
    import sparknet.run as run

    seen = []

    def fake_execute(cfg, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return run.RunOutcome(tmp_path, {}, None)

    monkeypatch.setattr(run, "execute", fake_execute)
    monkeypatch.setattr(run, "preflight", lambda cfg: None)
    mine = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert run.main([str(tiny_mixture(tmp_path)), f"lab_dir={tmp_path / 'lab'}", "--quiet"]) == 0
        assert seen == [run._terminate] and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, mine)
