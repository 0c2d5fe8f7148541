"""MLflow tracking: the only module that imports mlflow.

Every metric is first appended to the run's local `metrics.jsonl`, then sent to MLflow in batches. If
the tracking server goes away mid-run, training goes on: the tracker says so once, keeps the backlog,
retries every `RETRY_S` seconds and sends it when the server is back. Nothing is lost locally, and a
run on the embedded SQLite store never needs a server at all.

No run is left RUNNING for good: if the server is down as a run ends, the end-of-run calls (the last metrics,
tags, artifacts, the final status) retry with backoff for `END_RETRY_S`, and what still has not arrived is
recorded in the run folder (`mlflow_pending.json`: the metrics.jsonl offset of the backlog, the tags, the files,
the status and the true end time). `replay_pending` sends it and closes the MLflow run with that status; the next
`sparknet.run` of the same config and every `sparknet.compare` call it.

Default store: `sqlite:///<lab>/mlflow.db` with artifacts in `<lab>/mlartifacts` (open it with
`mlflow ui --backend-store-uri sqlite:///lab/mlflow.db`). `MLFLOW_TRACKING_URI` or `tracking.uri`
point elsewhere, e.g. the shared server started by `lab/mlflow_server.sh`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from sparknet import atomic
from sparknet.errors import SparknetError

RETRY_S = 30.0
# How long the end of a run keeps retrying a server that is down (backoff 1, 2, 4, ... s between tries): long
# enough to ride out a server restart, short enough that a sweep's next trial is not held up for minutes. What
# still has not arrived then waits in the run folder (PENDING) until the next `sparknet.run` of the same config or
# `sparknet.compare` sends it.
END_RETRY_S = 60.0
PENDING = "mlflow_pending.json"  # in the run folder: what MLflow has not received yet, and how the run ended
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
# A new SQLite store announces its tables and migrations at INFO on stderr (MLflow's and alembic's loggers): noise in
# a run's output, and a second and third line in front of a one-line error. Warnings still show.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
_BATCH = 500  # metrics per log_batch call (MLflow accepts up to 1000)


def resolve_uri(uri: str, lab: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store under the lab."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(lab / 'mlflow.db').resolve()}"  # created (with its folder) by the first Tracker


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"train.lr": "0.0005", "mixture.sources.dclm.weight": "0.3", ...}.

    Sources are keyed by name (stable across reorderings), other lists by index."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)) and tree and all(isinstance(x, dict) and "name" in x for x in tree):
        for x in tree:
            out.update(flatten({k: v for k, v in x.items() if k != "name"}, f"{prefix}.{x['name']}"))
    elif isinstance(tree, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in tree):
        for i, x in enumerate(tree):
            out.update(flatten(x, f"{prefix}.{i}"))
    else:
        text = json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)
        out[prefix] = text[:_MAX_PARAM_CHARS]
    return out


class NullTracker:
    """Tracking switched off (or a non-main process): metrics still go to the local jsonl."""

    run_id: str | None = None
    uri = ""
    url = ""

    def __init__(self, run_dir: Path | None = None):
        self.local = (Path(run_dir) / "metrics.jsonl") if run_dir else None

    def start(self, params: dict[str, str], tags: dict[str, str], run_name: str,
              resume_run_id: str | None = None) -> str | None:
        return None

    def _append_local(self, metrics: dict[str, float], step: int) -> tuple[float, int]:
        """Append one line; (its time, its byte offset in metrics.jsonl). The MLflow copy of these values carries the
        same timestamp, so a later replay of the line sends exactly the entities MLflow may already hold, and MLflow
        drops such duplicates."""
        t = time.time()
        if self.local is None:
            return t, 0
        with open(self.local, "a") as f:
            offset = f.tell()
            f.write(json.dumps({"step": step, "time": t, **metrics}) + "\n")
        return t, offset

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._append_local(metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class Tracker(NullTracker):
    """One MLflow run (new, or the one a resumed run started), robust to the server going away.

    What could not be sent (metric values, tags, artifacts, and at the end the run's final status) is kept: in
    memory while the run goes on, and in `<run_dir>/mlflow_pending.json` (PENDING) as soon as anything is
    pending, so that a killed process or a run that ended while the server was down loses nothing. The end of a
    run retries for END_RETRY_S with backoff; then `replay_pending` (called by the next `sparknet.run` of the same
    config, and by `sparknet.compare`) sends the rest and closes the MLflow run with the status it ended with."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, *, timeout_s: float = 10.0,
                 parent_run_id: str | None = None, artifact_root: Path | None = None, keep_pending: bool = True,
                 end_retry_s: float | None = None):
        super().__init__(run_dir)
        self.run_dir = Path(run_dir)
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        if uri.startswith("sqlite:///"):  # a new embedded store: SQLite creates the file, not its folder
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = _reader(uri, timeout_s)
        self.artifact_root = artifact_root
        self.keep_pending = keep_pending  # False: the caller reports a failure itself (a comparison run)
        self.end_retry_s = end_retry_s
        self.backlog: list = []  # mlflow Metric entities not yet sent
        self.backlog_offset: int | None = None  # metrics.jsonl offset of the first line the backlog came from
        self.pending_tags: dict[str, str] = {}
        self.pending_artifacts: dict[tuple[str, str | None], None] = {}  # ordered set of (path, artifact_path)
        self.end_time_ms: int | None = None
        self._saved: tuple = (None, (), (), None)  # what PENDING on disk says (nothing: no file)
        self.offline_since: float | None = None
        self._last_try = 0.0
        self.run_id = None
        self.url = ""

    # -- connection handling ---------------------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        """Run one MLflow call; on failure go offline (once, loudly) and report False."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # any transport or server error: training must not stop for it
            if self.offline_since is None:
                self.offline_since = time.time()
                print(f"warning: MLflow at {self.uri} is unreachable ({what}: {type(exc).__name__}); "
                      f"training continues, metrics are kept in {self.local} and sent when it is back",
                      file=sys.stderr, flush=True)
            self._last_try = time.time()
            return False
        if self.offline_since is not None:
            print(f"MLflow at {self.uri} is back after {time.time() - self.offline_since:.0f} s; "
                  f"sending the backlog", file=sys.stderr, flush=True)
            self.offline_since = None
        return True

    def _due(self) -> bool:
        """Whether to try the server now: always while it answers, every RETRY_S while it does not."""
        return self.offline_since is None or time.time() - self._last_try >= RETRY_S

    def _pending(self) -> bool:
        return bool(self.backlog or self.pending_tags or self.pending_artifacts)

    def _save_pending(self, status: str | None = None) -> None:
        """Write PENDING (or remove it when nothing is pending) if what is pending changed since it was last
        written: a long outage appends to the backlog every step, but the record changes once."""
        if not self.keep_pending or self.run_id is None:
            return
        offset = self.backlog_offset if self.backlog else None
        signature = (offset, tuple(self.pending_tags.items()), tuple(self.pending_artifacts), status)
        if signature == self._saved:
            return
        path = self.run_dir / PENDING
        if offset is None and not self.pending_tags and not self.pending_artifacts and status is None:
            path.unlink(missing_ok=True)
        else:
            atomic.write_json(path, {
                "uri": self.uri, "run_id": self.run_id, "experiment": self.experiment, "metrics_offset": offset,
                "tags": self.pending_tags, "artifacts": [list(k) for k in self.pending_artifacts],
                "status": status, "end_time_ms": self.end_time_ms, "written": time.time()})
        self._saved = signature

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = self.artifact_root.resolve().as_uri() + f"/{self.experiment}" if self.artifact_root else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # another process created it between our get and create
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, params: dict[str, str], tags: dict[str, str], run_name: str,
              resume_run_id: str | None = None) -> str:
        """Create (or reopen) the run; failing to reach the store here is a clear error, not a warning. A resumed
        run first sends what its earlier session could not (its PENDING file)."""
        from mlflow.entities import Param, RunTag

        try:
            if resume_run_id:
                # Before the status goes back to RUNNING: replay_pending must not close it afterwards.
                replay_pending(self.run_dir, uri=self.uri, only_ended=False, terminate=False,
                               log=lambda msg: print(msg, file=sys.stderr, flush=True))
                self.client.update_run(resume_run_id, status="RUNNING")
                self.run_id = resume_run_id
            else:
                all_tags = dict(tags)
                if self.parent_run_id:
                    all_tags["mlflow.parentRunId"] = self.parent_run_id
                run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=all_tags)
                self.run_id = run.info.run_id
                items = [Param(k, v) for k, v in params.items()]
                for i in range(0, len(items), 100):
                    self.client.log_batch(self.run_id, params=items[i:i + 100])
            if tags and resume_run_id:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as exc:
            raise SparknetError(
                f"tracking.uri: cannot start an MLflow run at {self.uri} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}) (fix: start the server, e.g. "
                f"bash lab/mlflow_server.sh, point tracking.uri or MLFLOW_TRACKING_URI at a reachable "
                f"store, or set tracking.enabled=false)") from None
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        self.url = f"{self.uri.rstrip('/')}/#/experiments/{exp_id}/runs/{self.run_id}" if self.uri.startswith(
            "http") else f"run {self.run_id} in experiment {self.experiment!r}"
        return self.run_id

    # -- logging ---------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        t, offset = self._append_local(metrics, step)  # the local copy first: it is the one that cannot fail
        if not self.backlog:
            self.backlog_offset = offset
        self.backlog.extend(Metric(k, float(v), int(t * 1000), step) for k, v in metrics.items())
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Send the metric backlog, then anything else pending; keep PENDING in step with what is left."""
        if self.run_id is None or not self._pending():
            return
        if not force and not self._due():
            self._save_pending()  # e.g. the first metrics after a failed tag call: the record must say so
            return
        while self.backlog:
            chunk = self.backlog[:_BATCH]
            if not self._call("log metrics", self.client.log_batch, self.run_id, metrics=chunk):
                break
            del self.backlog[:_BATCH]
        else:
            self._send_tags_and_artifacts()
        self._save_pending()

    def _send_tags_and_artifacts(self) -> bool:
        from mlflow.entities import RunTag

        if self.pending_tags:
            tags = [RunTag(k, v) for k, v in self.pending_tags.items()]
            if not self._call("set tags", self.client.log_batch, self.run_id, tags=tags):
                return False
            self.pending_tags.clear()
        for path, artifact_path in list(self.pending_artifacts):
            if Path(path).exists():  # a file removed since (an old checkpoint) is no longer wanted
                log = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
                if not self._call(f"log {path}", log, self.run_id, path, artifact_path):
                    return False
            del self.pending_artifacts[(path, artifact_path)]
        return True

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            self.pending_tags.update(tags)
            self._flush_other()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is None or not Path(path).exists():
            return
        self.pending_artifacts[(str(Path(path).resolve()), artifact_path)] = None
        self._flush_other()

    def _flush_other(self) -> None:
        """Send new tags or artifacts now (in order after any metric backlog), or note them in PENDING."""
        if self._due():
            self.flush(force=True)
        self._save_pending()

    def end(self, status: str = "FINISHED") -> None:
        """Send everything and mark the run `status`, retrying a server that is down for END_RETRY_S with backoff;
        then leave the rest, and the status, in PENDING (one warning says how it will be sent)."""
        if self.run_id is None:
            return
        self.end_time_ms = int(time.time() * 1000)  # the true end, whenever MLflow hears of it
        bound = END_RETRY_S if self.end_retry_s is None else self.end_retry_s
        deadline = time.monotonic() + bound
        wait = 1.0
        while True:
            self.flush(force=True)
            if not self._pending() and self._call("end run", self.client.set_terminated, self.run_id,
                                                  status=status, end_time=self.end_time_ms):
                self._save_pending()  # nothing left: no record
                return
            if time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
            wait = min(2 * wait, 15.0)
        self._save_pending(status)
        if self.keep_pending:
            print(f"warning: MLflow at {self.uri} did not answer for {bound:.0f} s at the end of the run: run "
                  f"{self.run_id} stays RUNNING there until its backlog ({len(self.backlog)} metric values, "
                  f"{len(self.pending_tags)} tags, {len(self.pending_artifacts)} files; all in {self.run_dir}) is "
                  f"sent, with its status {status}, by the next `python -m sparknet.run` of this config or "
                  f"`python -m sparknet.compare`", file=sys.stderr, flush=True)


def read_pending(run_dir: Path) -> dict | None:
    """A run folder's PENDING record, or None (none, or unreadable: it is rewritten whole, so that means absent)."""
    try:
        data = json.loads((Path(run_dir) / PENDING).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("run_id") and data.get("uri") else None


def _backlog_metrics(run_dir: Path, offset: int) -> list:
    """The Metric entities of metrics.jsonl from byte `offset` on, with the timestamps they were first sent with."""
    from mlflow.entities import Metric

    out = []
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
            ts, step = int(float(row["time"]) * 1000), int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by a kill mid-write
        out += [Metric(k, float(v), ts, step) for k, v in row.items()
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return out


def replay_pending(run_dir: Path, *, uri: str | None = None, only_ended: bool = True, terminate: bool = True,
                   timeout_s: float = 10.0, log: Any = print) -> str:
    """Send what a run folder's PENDING record lists (the metrics.jsonl backlog, tags, artifacts) and, with
    `terminate`, close its MLflow run with the status the run ended with and its true end time.

    Returns "" when there was nothing to do (no record; another store than `uri`; with `only_ended`, a run still
    going), "sent" when everything arrived (the record is removed), else why not (the record stays, nothing is
    lost: one warning line through `log`). Safe to repeat: MLflow drops metric values it already has."""
    run_dir = Path(run_dir)
    pending = read_pending(run_dir)
    if pending is None or (uri is not None and pending["uri"] != uri) or (only_ended and not pending.get("status")):
        return ""
    from mlflow.entities import RunTag

    target, run_id = pending["uri"], pending["run_id"]
    client = _reader(target, timeout_s)
    offset = pending.get("metrics_offset")
    metrics = _backlog_metrics(run_dir, int(offset)) if offset is not None else []
    tags = dict(pending.get("tags") or {})
    artifacts = [(p, a) for p, a in pending.get("artifacts") or [] if Path(p).exists()]
    try:
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + _BATCH])
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for path, artifact_path in artifacts:
            (client.log_artifacts if Path(path).is_dir() else client.log_artifact)(run_id, path, artifact_path)
        if terminate and pending.get("status"):
            client.set_terminated(run_id, status=pending["status"], end_time=pending.get("end_time_ms"))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        log(f"warning: {run_dir.name}: MLflow at {target} is still unreachable ({type(exc).__name__}: {first}); its "
            f"backlog stays in {run_dir / PENDING} and is sent by a later run or compare")
        return f"{type(exc).__name__}: {first}"
    (run_dir / PENDING).unlink(missing_ok=True)
    ended = f" and closed it as {pending['status']}" if terminate and pending.get("status") else ""
    log(f"{run_dir.name}: sent MLflow run {run_id} what it missed ({len(metrics)} metric values, {len(tags)} tags, "
        f"{len(artifacts)} files){ended}")
    return "sent"


def replay_lab(lab: Path, uri: str, *, timeout_s: float = 10.0, log: Any = print) -> dict[str, str]:
    """replay_pending for every ended run under `<lab>/runs/` recorded in the store `uri`: {run folder: outcome}.
    sparknet.compare calls it first, so that a run that ended while the server was down is read with its true
    status and all its metrics."""
    out = {}
    for path in sorted(Path(lab).glob(f"runs/*/{PENDING}")):
        outcome = replay_pending(path.parent, uri=uri, timeout_s=timeout_s, log=log)
        if outcome:
            out[path.parent.name] = outcome
    return out


def open_tracker(enabled: bool, uri: str, experiment: str, lab: Path, run_dir: Path, *, timeout_s: float = 10.0,
                 parent_run_id: str | None = None) -> NullTracker:
    """The tracker a run uses: MLflow when enabled, else only the local metrics file."""
    if not enabled:
        return NullTracker(run_dir)
    resolved = resolve_uri(uri, lab)
    # With a SQLite store, artifacts go next to the database (MLflow's default is ./mlruns in the cwd).
    root = Path(resolved.removeprefix("sqlite:///")).parent / "mlartifacts" if resolved.startswith("sqlite:///") \
        else None
    return Tracker(resolved, experiment, run_dir, timeout_s=timeout_s, parent_run_id=parent_run_id,
                   artifact_root=root)


def read_local_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    return rows


# ---------------------------------------------------------------------------------------------------------
# Reading runs back and writing to finished runs (used by sparknet.compare)
# ---------------------------------------------------------------------------------------------------------


class RunRecord:
    """What compare needs of one MLflow run: its identity, params, tags and latest metric values."""

    def __init__(self, run_id: str, experiment: str, run_name: str, status: str, start_ms: int | None,
                 end_ms: int | None, params: dict[str, str], tags: dict[str, str], metrics: dict[str, float]):
        self.run_id, self.experiment, self.run_name, self.status = run_id, experiment, run_name, status
        self.start_ms, self.end_ms = start_ms, end_ms
        self.params, self.tags, self.metrics = params, tags, metrics

    def __repr__(self) -> str:
        return f"RunRecord({self.run_id!r}, experiment={self.experiment!r}, name={self.run_name!r}, {self.status})"


def _reader(uri: str, timeout_s: float):
    """An MlflowClient whose HTTP calls give up after seconds: a dead server must cost seconds, not
    MLflow's default of minutes of retries per call. The training tracker's client is one of these."""
    if uri.startswith("http"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _unreachable(uri: str, what: str, exc: Exception) -> SparknetError:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return SparknetError(f"MLflow at {uri}: cannot {what} ({type(exc).__name__}: {first}) (fix: start the server, "
                         f"e.g. bash lab/mlflow_server.sh, or point --tracking-uri / MLFLOW_TRACKING_URI at a "
                         f"reachable store)")


def check_store(uri: str) -> None:
    """A SQLite store that does not exist is an error here, not a new empty database: reading runs from a
    store that was just created can only find nothing, and would leave a stray mlflow.db behind."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise SparknetError(f"MLflow store {path} does not exist (fix: train a run first, e.g. python -m "
                                f"sparknet.run mixtures/quickstart.yaml, or pass --tracking-uri / set "
                                f"MLFLOW_TRACKING_URI to the store the runs are in)")


# The stores MLflow can write runs to (its SQLAlchemy databases, a tracking server, a local folder, Databricks).
_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks")


def check_target(uri: str, *, where: str = "tracking.uri", lab: Path | None = None) -> None:
    """Before a run starts: the tracking store can take it. An unknown scheme, a SQLite file that is not a database
    (or whose folder does not exist: a typo must not create a new store somewhere), or a file store path that is a
    file are one-line errors naming `where` and the fix; nothing is created here. A server is not contacted (a run
    whose server is down keeps a backlog and sends it later)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if not scheme:
        fix = f"sqlite:///{uri}" if uri.endswith(".db") else f"file://{Path(uri).absolute()}"
        raise SparknetError(f"{where}: {uri!r} is a path, not a store URI (fix: {fix})")
    if scheme not in _SCHEMES:
        raise SparknetError(f"{where}: {uri!r} is not a tracking store MLflow knows (fix: sqlite:///lab/mlflow.db, "
                            f"http://HOST:5000 for a server, or leave it empty for the lab's own store)")
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            raise SparknetError(f"{where}: {uri!r} names no file (fix: sqlite:////absolute/path/mlflow.db)")
        made_by_the_run = lab is not None and path.parent.absolute() == lab.absolute()  # the lab's own store
        if not path.parent.is_dir() and not made_by_the_run:
            raise SparknetError(f"{where}: the folder of {path} does not exist (fix: create it, or correct the path; "
                                f"a new store is not made in a folder that is not there)")
        if path.exists():
            _check_sqlite(path, where)
    elif scheme == "file":
        path = Path(uri.removeprefix("file://"))
        if path.exists() and not path.is_dir():
            raise SparknetError(f"{where}: {path} is a file, not a folder for runs (fix: point it at a folder)")


def _check_sqlite(path: Path, where: str) -> None:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
            db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            return  # another process is writing: in use, so a database
        raise SparknetError(f"{where}: {path} cannot be read as a database ({exc}) (fix: check its permissions, or "
                            f"move it away to start a new store)") from None
    except sqlite3.DatabaseError as exc:
        raise SparknetError(f"{where}: {path} is not an MLflow database ({exc}) (fix: move it away and the next run "
                            f"starts a new store, or point tracking.uri at the right file)") from None


def _experiment_ids(client: Any, uri: str) -> dict[str, str]:
    try:
        ids: dict[str, str] = {}
        token = None
        while True:
            page = client.search_experiments(max_results=1000, page_token=token)
            ids.update((e.name, e.experiment_id) for e in page)
            token = page.token
            if not token:
                return ids
    except Exception as exc:
        raise _unreachable(uri, "list experiments", exc) from None


def list_experiments(uri: str, timeout_s: float = 10.0) -> list[str]:
    """Names of the active experiments in the store."""
    return list(_experiment_ids(_reader(uri, timeout_s), uri))


def _record(run: Any, experiment: str) -> RunRecord:
    return RunRecord(run.info.run_id, experiment, run.info.run_name or "", run.info.status, run.info.start_time,
                     run.info.end_time, dict(run.data.params), dict(run.data.tags), dict(run.data.metrics))


def find_runs(uri: str, experiments: list[str] | None = None, run_ids: list[str] | None = None,
              tags: dict[str, str] | None = None, *, require_tag: str = "", statuses: tuple[str, ...] = ("FINISHED",),
              exclude_experiments: tuple[str, ...] = (), timeout_s: float = 10.0) -> tuple[list[RunRecord], dict]:
    """Runs in `experiments` (None: every experiment but `exclude_experiments`) that carry all `tags`, the tag
    `require_tag` and a status in `statuses`, plus every run in `run_ids` whatever its tags or status.

    Returns (runs, skipped) where skipped counts the experiment runs left out by status, e.g. {"RUNNING": 1}.
    An unknown experiment or run id is a SparknetError naming it (and the existing experiments).
    """
    client = _reader(uri, timeout_s)
    tags = tags or {}
    existing = _experiment_ids(client, uri)
    if experiments is None:
        wanted = [n for n in existing if n not in exclude_experiments]
    else:
        unknown = [n for n in experiments if n not in existing]
        if unknown:
            raise SparknetError(f"no MLflow experiment named {', '.join(map(repr, unknown))} at {uri} (existing: "
                                f"{', '.join(existing) or 'none'})")
        wanted = list(experiments)
    runs: dict[str, RunRecord] = {}
    skipped: dict[str, int] = {}
    try:
        ids = {existing[name]: name for name in wanted}
        # Tag filters are checked here, not in an MLflow filter string: values may hold quotes that its
        # grammar cannot escape, and a Python comparison is exact.
        token = None
        while ids:
            page = client.search_runs(list(ids), max_results=1000, page_token=token,
                                      order_by=["attributes.start_time ASC"])
            for run in page:
                rt = run.data.tags
                if any(rt.get(k) != v for k, v in tags.items()) or (require_tag and require_tag not in rt):
                    continue
                if run.info.status not in statuses:
                    skipped[run.info.status] = skipped.get(run.info.status, 0) + 1
                    continue
                runs[run.info.run_id] = _record(run, ids[run.info.experiment_id])
            token = page.token
            if not token:
                break
    except Exception as exc:
        raise _unreachable(uri, "search runs", exc) from None
    for run_id in run_ids or []:
        if run_id in runs:
            continue
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                raise SparknetError(f"--run-id {run_id}: no such run at {uri} (fix: copy the id from the MLflow UI, or check --tracking-uri)") from None
            raise _unreachable(uri, f"read run {run_id}", exc) from None
        exp = client.get_experiment(run.info.experiment_id)
        runs[run_id] = _record(run, exp.name if exp is not None else run.info.experiment_id)
    return list(runs.values()), skipped


def read_run_json(uri: str, run_id: str, artifact_path: str, timeout_s: float = 10.0) -> dict | None:
    """A JSON artifact of a run (e.g. result.json), or None when the run has none or it cannot be read."""
    import tempfile

    _reader(uri, timeout_s)  # sets the HTTP timeouts
    # One small file per run: a progress bar for each would bury the table in noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp,
                                                        tracking_uri=uri)
            return json.loads(Path(local).read_text())
        except Exception:  # missing artifact, unreadable store, cut file: the caller shows a gap
            return None


def log_to_run(uri: str, run_id: str, metrics: dict[str, float], step: int = 0, tags: dict[str, str] | None = None,
               timeout_s: float = 10.0) -> None:
    """Add metrics (and tags) to an existing run, finished or not, e.g. WikiText-2 scores computed later."""
    from mlflow.entities import Metric, RunTag

    client = _reader(uri, timeout_s)
    ts = int(time.time() * 1000)
    try:
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    except Exception as exc:
        raise _unreachable(uri, f"log to run {run_id}", exc) from None


def log_comparison(uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str],
                   files: list[Path], timeout_s: float = 10.0) -> str:
    """One finished run in `experiment` holding `files` as artifacts; returns its id. Unlike a training run,
    nothing else is lost if this fails, so a failure is an error rather than a warning."""
    # With a SQLite store, artifacts go next to the database, as open_tracker arranges for training runs.
    root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" if uri.startswith("sqlite:///") else None
    # keep_pending=False: a comparison run has no run folder to replay from; a failure is reported instead, and the
    # end retries only briefly, as nothing is lost (the files are on disk).
    tracker = Tracker(uri, experiment, Path(files[0]).parent if files else Path("."), timeout_s=timeout_s,
                      artifact_root=root, keep_pending=False, end_retry_s=min(5.0, timeout_s))
    try:
        run_id = tracker.start({k: v[:_MAX_PARAM_CHARS] for k, v in params.items()}, tags, run_name=run_name)
    except SparknetError as exc:
        raise SparknetError(f"{exc} (or pass --no-log to skip logging the comparison)") from None
    for f in files:
        tracker.log_artifact(Path(f))
    tracker.end("FINISHED")
    if tracker.offline_since is not None or tracker._pending():
        raise SparknetError(f"MLflow at {uri}: the comparison run {run_id} was created but its files could not "
                            f"all be logged (the files are kept in {Path(files[0]).parent if files else '.'})")
    return run_id
