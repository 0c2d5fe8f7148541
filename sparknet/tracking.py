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
        if uri.startswith("sqlite:///"):  # a new embedded store: SQLite creates the file, not its folder
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = _reader(uri, timeout_s)
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
                raise SparknetError(f"--run-id {run_id}: no such run at {uri}") from None
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
    tracker = Tracker(uri, experiment, Path(files[0]).parent if files else Path("."), timeout_s=timeout_s,
                      artifact_root=root)
    try:
        run_id = tracker.start({k: v[:_MAX_PARAM_CHARS] for k, v in params.items()}, tags, run_name=run_name)
    except SparknetError as exc:
        raise SparknetError(f"{exc} (or pass --no-log to skip logging the comparison)") from None
    for f in files:
        tracker.log_artifact(Path(f))
    tracker.end("FINISHED")
    if tracker.offline_since is not None:
        raise SparknetError(f"MLflow at {uri}: the comparison run {run_id} was created but its files could not "
                            f"all be logged (the files are kept in {Path(files[0]).parent if files else '.'})")
    return run_id
