"""prepare checks every source before it tokenizes any: missing or empty paths, overlapping sources, and hub
datasets that cannot be streamed from here all fail in seconds with one line, and nothing is written."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import sparknet.prepare as prep
from sparknet import hub
from sparknet.config import SourceConfig, config_from_dict, load_config
from sparknet.errors import SparknetError
from sparknet.hub import hub_unreachable
from sparknet.sources import HUB_HINT, check_overlaps

REPO = Path(__file__).resolve().parents[1]


def cfg_of(tmp_path: Path, sources: list[dict], total: str = "8k", **mixture):
    return config_from_dict({"lab_dir": str(tmp_path / "lab"), "name": "pre",
                             "mixture": {"total_tokens": total, "val_tokens": 256, "sources": sources} | mixture,
                             "model": {"preset": "cpu-tiny"}, "train": {"seq_len": 128},
                             "prepare": {"shard_tokens": 4096, "workers": 1}})


def failure(cfg) -> tuple[str, float]:
    """prepare's one-line error and how long it took to come."""
    t0 = time.perf_counter()
    with pytest.raises(SparknetError) as exc:
        prep.prepare(cfg, workers=1, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg, time.perf_counter() - t0


@pytest.fixture
def hub_calls(monkeypatch):
    """Records hub checks and dataset loads instead of making them: the hub looks reachable and empty-handed."""
    import datasets

    calls: list[str] = []
    monkeypatch.setattr(prep, "check_hub_source", lambda src: calls.append(f"check {src.name}"))
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: calls.append(f"load {path}") or [])
    return calls


def allow_overlap(src: SourceConfig) -> SourceConfig:
    if "allow_overlap" in {f.name for f in dataclasses.fields(SourceConfig)}:
        return dataclasses.replace(src, allow_overlap=True)
    object.__setattr__(src, "allow_overlap", True)  # until config.py has the field
    return src


# ----------------------------------------------------------------------------------- local sources


def test_missing_blog_fails_before_the_hub_sources_stream(tmp_path, hub_calls):
    """mixtures/sparknet_blog.yaml without its blog/ folder: seconds, not after ~990M hub tokens."""
    blog = tmp_path / "blog"
    cfg = load_config(REPO / "mixtures" / "sparknet_blog.yaml", [f"lab_dir={tmp_path / 'lab'}",
                                                                  f"mixture.sources.blog.path={blog}"])
    msg, seconds = failure(cfg)
    assert seconds < 5
    assert msg.startswith("source 'blog': path") and str(blog) in msg and "does not exist" in msg
    assert "fix: set mixture.sources.blog.path" in msg
    assert hub_calls == [] and not (tmp_path / "lab" / "tokens").exists()


def test_missing_blog_is_exit_2_from_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sparknet.prepare", str(REPO / "mixtures" / "sparknet_blog.yaml"),
                           f"lab_dir={tmp_path / 'lab'}", f"mixture.sources.blog.path={tmp_path / 'blog'}", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: source 'blog': path") and "does not exist" in proc.stderr


def test_a_blog_too_small_for_its_share_fails_before_the_hub_sources(tmp_path, hub_calls):
    blog = tmp_path / "blog"
    blog.mkdir()
    for i in range(3):
        (blog / f"p{i}.md").write_text(f"# Post {i}\n\nA few words of post {i}.\n", encoding="utf-8")
    cfg = load_config(REPO / "mixtures" / "sparknet_blog.yaml", [f"lab_dir={tmp_path / 'lab'}",
                                                                  f"mixture.sources.blog.path={blog}"])
    msg, seconds = failure(cfg)
    assert seconds < 5 and hub_calls == []
    assert msg.startswith("mixture.sources.blog: its 3 file(s) under") and "max_repeats=20 times that" in msg
    assert "fix: add text to it" in msg


def test_a_small_local_source_is_tokenized_and_checked_before_the_hub_streams(tmp_path, write_jsonl, hub_calls):
    """Too small only once tokenized (its bytes allow it): still found before any hub source is read."""
    write_jsonl("local/a.jsonl", [f"chapter {i}. " + "prose " * 40 for i in range(60)])
    cfg = cfg_of(tmp_path, [{"name": "hub", "kind": "hf", "path": "org/data", "weight": 0.5},
                            {"name": "books", "kind": "local", "path": str(tmp_path / "local"), "weight": 0.5}],
                 total="10k")
    msg, _ = failure(cfg)
    assert msg.startswith("mixture.sources.books: needs ") and "max_repeats is 1" in msg
    assert hub_calls == ["check hub"]  # reachable, but never read


@pytest.mark.parametrize("case", ["empty glob", "no supported files", "empty file", "empty post"])
def test_local_paths_without_text_fail_before_tokenizing(tmp_path, write_jsonl, case):
    data = tmp_path / "data"
    data.mkdir()
    if case == "empty glob":
        path, kind, want = str(data / "*.jsonl"), "local", "no jsonl/"
    elif case == "no supported files":
        (data / "a.csv").write_text("x,y\n", encoding="utf-8")
        path, kind, want = str(data), "local", "it holds only .csv files"
    elif case == "empty file":
        write_jsonl("data/a.jsonl", ["text"])
        (data / "b.jsonl").write_bytes(b"")
        path, kind, want = str(data), "local", f"{data / 'b.jsonl'}: file is empty"
    else:
        (data / "a.md").write_text("# A post\n\ntext\n", encoding="utf-8")
        (data / "b.md").write_text("\n  \n", encoding="utf-8")
        path, kind, want = str(data), "blog", f"{data / 'b.md'}: post is empty"
    cfg = cfg_of(tmp_path, [{"name": "code", "kind": "pydocs", "part": "code", "weight": 0.5},
                            {"name": "mine", "kind": kind, "path": path, "weight": 0.5}])
    msg, seconds = failure(cfg)
    assert want in msg and "fix:" in msg and seconds < 5
    assert not (tmp_path / "lab" / "tokens").exists()  # the pydocs source, first, was not tokenized either


# ----------------------------------------------------------------------------------- overlapping sources


def test_two_sources_on_the_same_files_are_an_error(tmp_path, write_jsonl):
    write_jsonl("web/a.jsonl", ["one"])
    write_jsonl("web/b.jsonl", ["two"])
    cfg = cfg_of(tmp_path, [{"name": "web", "kind": "local", "path": str(tmp_path / "web"), "weight": 0.5},
                            {"name": "more", "kind": "local", "path": str(tmp_path / "web" / "b*"), "weight": 0.5}])
    msg, seconds = failure(cfg)
    assert msg.startswith("mixture.sources.more: reads the same data as source 'web'") and seconds < 5
    assert str(tmp_path / "web" / "b.jsonl") in msg
    assert "fix:" in msg and "mixture.sources.more.allow_overlap: true" in msg
    assert not (tmp_path / "lab" / "tokens").exists()


def hf(name: str, path: str = "org/data", **kw) -> SourceConfig:
    return SourceConfig(name=name, kind="hf", path=path, weight=1.0, **kw)


def test_overlap_rules(tmp_path, write_jsonl):
    with pytest.raises(SparknetError, match="mixture.sources.b: reads the same data as source 'a' "
                                            r"\(hf org/data split train\)"):
        check_overlaps([hf("a"), hf("b", path="ORG/data", revision="0" * 40)])  # any revision, any case
    check_overlaps([hf("a"), hf("b", split="test"), hf("c", subset="en"), hf("d", path="org/other")])
    with pytest.raises(SparknetError, match="source 'a'"):
        check_overlaps([SourceConfig(name="a", kind="pydocs", part="code"),
                        SourceConfig(name="b", kind="pydocs", part="code")])
    check_overlaps([SourceConfig(name=p, kind="pydocs", part=p) for p in ("docstrings", "readmes", "code")])
    # a local glob into a local dataset folder reads the same files
    f = write_jsonl("ds/train.jsonl", ["x"])
    with pytest.raises(SparknetError, match="mixture.sources.b: reads the same data as source 'a'"):
        check_overlaps([hf("a", path=str(tmp_path / "ds")),
                        SourceConfig(name="b", kind="local", path=str(f), weight=1.0)])
    # intended: either source says so
    check_overlaps([hf("a"), allow_overlap(hf("b"))])
    check_overlaps([allow_overlap(hf("a")), hf("b")])


def test_overlap_is_exit_2_from_the_command_line(tmp_path, write_jsonl):
    write_jsonl("web/a.jsonl", ["one"])
    spec = tmp_path / "mix.yaml"
    spec.write_text(yaml.safe_dump({"lab_dir": str(tmp_path / "lab"), "mixture": {"sources": [
        {"name": "web", "kind": "local", "path": "web", "weight": 0.5},
        {"name": "again", "kind": "local", "path": "web/*.jsonl", "weight": 0.5}]}}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sparknet.prepare", str(spec), "--quiet"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "error: mixture.sources.again: reads the same data as source 'web'" in proc.stderr


# ----------------------------------------------------------------------------------- hub sources


HUB_MIX = [{"name": "code", "kind": "pydocs", "part": "code", "weight": 0.5},
           {"name": "edu", "kind": "hf", "path": "codelion/fineweb-edu-1B", "weight": 0.5}]


def test_offline_hub_source_fails_in_seconds_with_a_fix_that_works(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    msg, seconds = failure(cfg_of(tmp_path, HUB_MIX))
    assert seconds < 5
    assert msg.startswith("source 'edu' (hf 'codelion/fineweb-edu-1B'") and "not reachable (HF_HUB_OFFLINE=1)" in msg
    assert f"fix: {HUB_HINT}" in msg and "prepare once online" in msg and "kind: local" in msg
    assert not (tmp_path / "lab" / "tokens").exists()


def test_unreachable_hub_without_the_offline_flag_fails_in_seconds(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, the network down: today ~25 s of retries; now the probe's few seconds."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1:9")  # non-routable: no answer, ever
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    msg, seconds = failure(cfg_of(tmp_path, HUB_MIX))
    assert seconds < 5
    # where a firewall accepts every connection (this sandbox does), the API call after the probe fails instead
    assert msg.startswith("source 'edu' (hf 'codelion/fineweb-edu-1B'")
    assert "the hub is not reachable (10.255.255.1 did not answer" in msg or "the hub did not answer (" in msg
    assert HUB_HINT in msg
    assert not (tmp_path / "lab" / "tokens").exists()


def test_hub_probe_gives_up_after_its_timeout(monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    def hanging_lookup(*args, **kwargs):  # a name lookup that hangs, then fails
        time.sleep(5)
        raise OSError("name lookup timed out")

    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    monkeypatch.setattr(hub, "_PROBES", {})  # asked once per process: this test asks afresh
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    t0 = time.perf_counter()
    assert hub_unreachable(0.5) == "https://huggingface.co did not answer within 0.5 s"
    assert time.perf_counter() - t0 < 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable() == "HF_HUB_OFFLINE=1"


def test_a_finished_hub_store_needs_no_network(tmp_path, monkeypatch):
    import datasets

    import sparknet.store_write as store

    rows = [f"Row {i} of the hub dataset, " + "with words " * (i % 9 + 3) for i in range(600)]
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, **kw: datasets.Dataset.from_dict({"text": rows}).to_iterable_dataset())
    monkeypatch.setattr(store, "resolve_hf_commit", lambda src: "c" * 40)
    real_check = prep.check_hub_source
    monkeypatch.setattr(prep, "check_hub_source", lambda src: None)  # "online"
    sources = [{"name": "code", "kind": "pydocs", "part": "code", "weight": 0.5},
               {"name": "hub", "kind": "hf", "path": "org/data", "weight": 0.5}]
    first = prep.prepare(cfg_of(tmp_path, sources), workers=1, progress=False)
    assert first.stores["hub"].manifest["source_commit"] == "c" * 40

    # offline now, and the hub would fail: the finished store is simply used
    monkeypatch.setattr(prep, "check_hub_source", real_check)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("read the hub"))
    again = prep.prepare(cfg_of(tmp_path, sources), workers=1, progress=False)
    assert again.tokens_written == 0 and again.stores["hub"].dir == first.stores["hub"].dir
    # a budget the store cannot serve yet needs the network: said at once
    msg, seconds = failure(cfg_of(tmp_path, sources, total="40k"))
    assert seconds < 5 and msg.startswith("source 'hub' (hf 'org/data'") and HUB_HINT in msg
