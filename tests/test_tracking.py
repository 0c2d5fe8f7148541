"""sparknet.tracking when MLflow is down as a run ends: the end retries for a bounded time, the run folder keeps what
MLflow missed (mlflow_pending.json), and the next `sparknet.run` of the same config, or `sparknet.compare`, sends it
and closes the MLflow run with its true status and end time. Against a real `mlflow server` stopped before the end
and started again, and against a store whose calls fail on demand."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tinylab import MlflowServer

from sparknet import tracking

SMALL = dict(mixture={"total_tokens": 16384, "val_tokens": 2048}, tokenizer={"train_bytes_per_source": 200000},
             train={"batch_tokens": 1024, "warmup_fraction": 0.05, "log_every_steps": 2},
             eval={"every_tokens": 8192, "val_tokens": 1024}, tracking={"experiment": "served"})


@pytest.fixture
def server(tmp_path, subprocess_env):
    s = MlflowServer(tmp_path, subprocess_env)
    s.start()
    yield s
    s.stop()


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_runs_ending_while_the_server_is_down_are_closed_later_by_run_and_by_compare(tmp_path, server, tiny_mixture,
                                                                                      monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from sparknet.compare import CompareOptions, compare
    from sparknet.config import load_config
    from sparknet.run import execute

    monkeypatch.setattr(tracking, "END_RETRY_S", 4.0)
    lab = tmp_path / "lab"
    lab.mkdir()
    tiny_mixture(lab, **SMALL)

    def cfg_of(name: str):
        return load_config(lab / "tiny.yaml", [f"lab_dir={lab}", f"name={name}", f"tracking.uri={server.url}",
                                               "tracking.timeout_s=3"])

    def train_and_lose_the_server_at_the_last_evaluation(name: str):
        cfg = cfg_of(name)

        def on_eval(tokens, val):
            if tokens >= cfg.mixture.total_tokens:
                server.stop()  # the final metrics, artifacts, tags and status have not been sent yet

        started = time.time()
        out = execute(cfg, progress=False, on_eval=on_eval)
        return cfg, out, time.time() - started

    cfg_a, out_a, _ = train_and_lose_the_server_at_the_last_evaluation("alpha")
    err = capsys.readouterr().err
    assert "stays RUNNING there" in err and "python -m sparknet.run" in err and "sparknet.compare" in err
    pending = json.loads((out_a.run_dir / tracking.PENDING).read_text())
    assert pending["status"] == "FINISHED" and pending["run_id"] == out_a.mlflow_run_id
    assert pending["tags"]["sparknet.final_model"] == str((out_a.run_dir / "final").resolve())
    assert {Path(p).name for p, _ in pending["artifacts"]} >= {"result.json", "metrics.jsonl", "loss.png"}
    assert json.loads((out_a.run_dir / "state.json").read_text())["status"] == "finished"  # the run itself is done

    server.start()
    cfg_b, out_b, seconds_b = train_and_lose_the_server_at_the_last_evaluation("beta")
    assert seconds_b < 90  # a dead server at the end costs the bounded retry (4 s here), not minutes
    server.start()
    client = MlflowClient(tracking_uri=server.url)
    for out in (out_a, out_b):  # what the server has: a run left RUNNING, without its last values
        run = client.get_run(out.mlflow_run_id)
        assert run.info.status == "RUNNING" and "sparknet.final_model" not in run.data.tags
        assert not any(k.startswith("tokens/") for k in run.data.metrics)

    # The same config again: nothing is trained, the backlog is sent, the run is closed as it ended.
    again = execute(cfg_a, progress=False)
    assert again.already_done and "sent MLflow run" in capsys.readouterr().out
    run = client.get_run(out_a.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == pending["end_time_ms"]
    assert run.data.tags["sparknet.final_model"] == pending["tags"]["sparknet.final_model"]
    assert {"result.json", "metrics.jsonl", "loss.png", "config.yaml"} <= {
        a.path for a in client.list_artifacts(out_a.mlflow_run_id)}
    local = _jsonl(out_a.run_dir)
    last = {k: v for row in local for k, v in row.items() if k.startswith("tokens/")}
    assert last and all(run.data.metrics[k] == v for k, v in last.items())
    # Every train/loss value once: the replay resent from the first unsent line, and nothing twice.
    history = client.get_metric_history(out_a.mlflow_run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == sorted(
        (row["step"], row["train/loss"]) for row in local if "train/loss" in row)
    assert not (out_a.run_dir / tracking.PENDING).exists()
    assert tracking.replay_pending(out_a.run_dir) == ""  # nothing left to do

    # compare sends the other run's backlog before reading, so it is in the table as the finished run it is.
    result = compare(CompareOptions(lab=lab, tracking_uri=server.url, baselines=(), reported=False, log=False,
                                    protocols=("hf-strided-64",), out=tmp_path / "cmp"), log=lambda msg: None)
    assert set(result.frame["run_id"]) == {out_a.mlflow_run_id, out_b.mlflow_run_id}
    run = client.get_run(out_b.mlflow_run_id)
    assert run.info.status == "FINISHED" and "sparknet.final_model" in run.data.tags
    assert not (out_b.run_dir / tracking.PENDING).exists()


class FlakyClient:
    """An MlflowClient whose calls fail while `down` is set, as a dead server's would."""

    def __init__(self, client):
        self.client, self.down, self.calls = client, False, 0

    def __getattr__(self, name):
        target = getattr(self.client, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.down:
                raise ConnectionError("server down")
            return target(*args, **kwargs)

        return call


def test_pending_record_follows_what_mlflow_missed_and_a_replay_sends_it_once(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(tracking, "END_RETRY_S", 0.5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = tracking.Tracker(uri, "flaky", run_dir, artifact_root=tmp_path / "art")
    tracker.client = flaky = FlakyClient(tracker.client)
    run_id = tracker.start({"p": "1"}, {"t": "1"}, run_name="flaky")
    tracker.log_metrics({"train/loss": 3.0}, 1)
    assert not (run_dir / tracking.PENDING).exists()  # nothing pending: no record

    flaky.down = True
    (run_dir / "result.json").write_text("{}")
    tracker.log_metrics({"train/loss": 2.5}, 2)  # fails: offline from here, the record says from which line
    record = tracking.read_pending(run_dir)
    assert record["metrics_offset"] == len((run_dir / "metrics.jsonl").read_text().splitlines()[0]) + 1
    calls = flaky.calls
    for step in range(3, 30):
        tracker.log_metrics({"train/loss": 2.0 - step / 100}, step)
    assert flaky.calls == calls  # while offline, no call per step (retried every RETRY_S)
    tracker.log_artifact(run_dir / "result.json")
    tracker.set_tags({"sparknet.final_model": "/x/final"})
    tracker.end("FAILED")
    assert "stays RUNNING" in capsys.readouterr().err
    record = tracking.read_pending(run_dir)
    assert record["status"] == "FAILED" and record["tags"] == {"sparknet.final_model": "/x/final"}
    assert [Path(p).name for p, _ in record["artifacts"]] == ["result.json"] and record["end_time_ms"] > 0

    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert tracking.replay_pending(run_dir, uri="sqlite:///elsewhere.db") == ""  # another store's record: untouched
    assert tracking.replay_pending(run_dir) == "sent"
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time == record["end_time_ms"]
    assert run.data.tags["sparknet.final_model"] == "/x/final"
    assert [a.path for a in client.list_artifacts(run_id)] == ["result.json"]
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 30))  # each step once
    local = _jsonl(run_dir)
    assert {m.step: m.timestamp for m in history} == {r["step"]: int(r["time"] * 1000) for r in local}
    assert not (run_dir / tracking.PENDING).exists()


def test_a_resumed_run_sends_its_earlier_backlog_first(tmp_path, monkeypatch):
    """A process killed while the server was down leaves a record without a status; the resumed run (same MLflow run)
    sends that backlog before it goes on, and compare leaves such a record alone (the run may still be going)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = tracking.Tracker(uri, "resumed", run_dir)
    first.client = flaky = FlakyClient(first.client)
    run_id = first.start({}, {}, run_name="resumed")
    flaky.down = True
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 4.0 - step}, step)
    # ... killed here: no end(). The record is there, without a status.
    assert tracking.read_pending(run_dir)["status"] is None
    assert tracking.replay_lab(tmp_path, uri) == {}  # not under <lab>/runs; and replay_pending alone:
    assert tracking.replay_pending(run_dir) == ""  # a run that has not ended is not closed by anyone else

    second = tracking.Tracker(uri, "resumed", run_dir)
    assert second.start({}, {}, run_name="resumed", resume_run_id=run_id) == run_id
    steps = [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3] and not (run_dir / tracking.PENDING).exists()
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "RUNNING"
    second.end("FINISHED")
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"
