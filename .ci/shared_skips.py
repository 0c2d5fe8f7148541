"""pytest plugin for .ci/run: how many tests a plain clone skips (one with no ../shared beside it), counted honestly
without running the whole suite twice.

Pass 1, the README's `bash scripts/test.sh` next to ../shared, with `-p shared_skips --skips-record FILE`: records
every test's outcome (and a skip's reason), and whether the test could depend on ../shared:

- its fixtures include `shared_data` (tests/conftest.py: it skips where ../shared/data is absent), or
- its module's source names ../shared (`SHARED_DATA`, "shared/data"), or
- it opened or listed something under ../shared while it ran (an audit hook sees every open of this process; a
  subprocess's own reads are not seen, which is why the source is checked too).

Under pytest-xdist the collection and the audit hook live in the workers: each sends what it marked back to the
controller when it finishes (workeroutput), and the controller, which sees every report, writes the record.

Pass 2, in a copy of the clone with nothing beside it (.ci/plain_clone.sh), with `-p shared_skips --skips-rerun FILE
--max-skips N`: runs only the tests pass 1 marked (and any pass 1 did not see), then counts the plain clone's skips:
pass 2's skips of those plus pass 1's skips of all the others, which never touch ../shared and so skip or not alike
in both places. More than N: the session fails, with every skip and its reason listed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = os.path.abspath(ROOT.parent / "shared")
SOURCE_MARKERS = ("SHARED_DATA", "shared/data", "../shared")
_AUDITED = {"open", "os.listdir", "os.scandir", "glob.glob", "os.stat"}


class _State:
    current: str | None = None  # the test running now
    touched: set[str] = set()
    outcomes: dict[str, dict] = {}
    rerun: set[str] | None = None
    record: dict[str, dict] = {}
    hook_added = False


def _audit(event: str, args: tuple) -> None:
    # Called for every audited event of the process: cheap, and never raising.
    if _State.current is None or event not in _AUDITED or not args:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        try:
            p = os.path.abspath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if p == SHARED or p.startswith(SHARED + os.sep):
            _State.touched.add(_State.current)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shared_skips", "plain-clone skip count (.ci/run)")
    group.addoption("--skips-record", metavar="FILE", help="pass 1: write every test's outcome to FILE")
    group.addoption("--skips-rerun", metavar="FILE", help="pass 2: run only the tests FILE marks as possibly "
                    "depending on ../shared, and count the plain clone's skips")
    group.addoption("--max-skips", type=int, default=None, metavar="N", help="pass 2: fail above N skips in all")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--skips-rerun"):
        path = Path(config.getoption("--skips-rerun"))
        if not path.is_file():
            raise pytest.UsageError(f"--skips-rerun {path}: no such file (run pass 1 with --skips-record first)")
        _State.record = json.loads(path.read_text())
    if not _State.hook_added:
        sys.addaudithook(_audit)  # cannot be removed: it only looks at paths while a test runs
        _State.hook_added = True


def _statically_shared(item: pytest.Item) -> bool:
    if "shared_data" in getattr(item, "fixturenames", ()):
        return True
    try:
        source = Path(str(item.fspath)).read_text(encoding="utf-8")
    except OSError:
        return True  # cannot tell: run it
    return any(m in source for m in SOURCE_MARKERS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _statically_shared(item):
            _State.touched.add(item.nodeid)
    if not config.getoption("--skips-rerun"):
        return
    keep, drop = [], []
    for item in items:
        rec = _State.record.get(item.nodeid)
        (keep if rec is None or rec.get("shared") or item.nodeid in _State.touched else drop).append(item)
    _State.rerun = {i.nodeid for i in keep}
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    _State.current = item.nodeid
    try:
        yield
    finally:
        _State.current = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    out = _State.outcomes.setdefault(report.nodeid, {"outcome": "passed", "reason": ""})
    if report.skipped and out["outcome"] != "failed":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        out.update(outcome="skipped", reason=str(reason).removeprefix("Skipped: "))
    elif report.failed:
        out.update(outcome="failed", reason=f"failed in {report.when}")


def _plain_clone_skips() -> dict[str, str]:
    """nodeid -> reason of every test a plain clone skips: this pass's skips of what it reran, pass 1's of the rest."""
    rerun = _State.rerun or set()
    skips = {n: r["reason"] for n, r in _State.record.items() if n not in rerun and r["outcome"] == "skipped"}
    skips |= {n: r["reason"] for n, r in _State.outcomes.items() if n in rerun and r["outcome"] == "skipped"}
    return skips


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    # pytest-xdist's controller: a worker is done; take the tests it marked.
    _State.touched |= set(getattr(node, "workeroutput", {}).get("shared_touched", ()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: the controller records
        config.workeroutput["shared_touched"] = sorted(_State.touched)
        return
    if config.getoption("--skips-record"):
        record = {n: o | {"shared": n in _State.touched} for n, o in _State.outcomes.items()}
        Path(config.getoption("--skips-record")).write_text(json.dumps(record, indent=1))
    if config.getoption("--skips-rerun"):
        if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and not _State.rerun:
            session.exitstatus = pytest.ExitCode.OK  # nothing could depend on ../shared: nothing to rerun
        limit = config.getoption("--max-skips")
        if limit is not None and len(_plain_clone_skips()) > limit:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not config.getoption("--skips-rerun"):
        return
    skips = _plain_clone_skips()
    limit = config.getoption("--max-skips")
    verdict = "" if limit is None else f" (at most {limit} allowed): " + ("FAIL" if len(skips) > limit else "ok")
    terminalreporter.write_sep("=", f"plain clone (no ../shared): {len(skips)} tests skipped in all{verdict}; "
                                    f"{len(_State.rerun or ())} rerun here, the rest as in pass 1")
    for nodeid, reason in sorted(skips.items()):
        terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")
