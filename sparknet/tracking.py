"""MLflow tracking: the only module that imports mlflow.

Every metric is first appended to the run's local `metrics.jsonl`, then sent to MLflow in batches. If
the tracking server goes away mid-run, training goes on: the tracker says so once, keeps the backlog,
retries every `RETRY_S` seconds and sends it when the server is back. Nothing is lost locally, and a
run on the embedded SQLite store never needs a server at all.

Default store: `sqlite:///<lab>/mlflow.db` with artifacts in `<lab>/mlartifacts` (open it with
`mlflow ui --backend-store-uri sqlite:///lab/mlflow.db`). `MLFLOW_TRACKING_URI` or `tracking.uri`
point elsewhere, e.g. the shared server started by `lab/mlflow_server.sh`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sparknet.errors import SparknetError

RETRY_S = 30.0
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 500  # metrics per log_batch call (MLflow accepts up to 1000)


def resolve_uri(uri: str, lab: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store under the lab."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    lab.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(lab / 'mlflow.db').resolve()}"


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

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.local is not None:
            with open(self.local, "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class Tracker(NullTracker):
    """One MLflow run (new, or the one a resumed run started), robust to the server going away."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, *, timeout_s: float = 10.0,
                 parent_run_id: str | None = None, artifact_root: Path | None = None):
        super().__init__(run_dir)
        self.run_dir = Path(run_dir)
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        if uri.startswith("http"):
            # A dead server must cost seconds, not MLflow's default of minutes of retries per call.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.artifact_root = artifact_root
        self.backlog: list = []  # mlflow Metric entities not yet sent
        self.offline_since: float | None = None
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
        """Create (or reopen) the run; failing to reach the store here is a clear error, not a warning."""
        from mlflow.entities import Param, RunTag

        try:
            if resume_run_id:
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

        super().log_metrics(metrics, step)  # the local copy first: it is the one that cannot fail
        ts = int(time.time() * 1000)
        self.backlog.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        self.flush()

    def flush(self, force: bool = False) -> None:
        if self.run_id is None or not self.backlog:
            return
        if self.offline_since is not None and not force and time.time() - self._last_try < RETRY_S:
            return
        while self.backlog:
            chunk = self.backlog[:_BATCH]
            if not self._call("log metrics", self.client.log_batch, self.run_id, metrics=chunk):
                return
            del self.backlog[:_BATCH]

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if self.run_id:
            self._call("set tags", self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is None or not Path(path).exists():
            return
        if Path(path).is_dir():
            self._call(f"log {path}", self.client.log_artifacts, self.run_id, str(path), artifact_path)
        else:
            self._call(f"log {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        self.flush(force=True)
        if self.backlog:
            print(f"warning: {len(self.backlog)} metric values could not reach MLflow at {self.uri}; they "
                  f"are in {self.local}", file=sys.stderr)
        self._call("end run", self.client.set_terminated, self.run_id, status=status)


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
