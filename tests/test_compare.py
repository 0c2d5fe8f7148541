"""sparknet.compare on a real MLflow store: two tiny real runs (one scored on WikiText-2, one not), a local baseline
model, the published rows; gaps, --evaluate writing back, the baseline cache, offline baselines, clean errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from sparknet.compare import (
    COMPARE_EXPERIMENT,
    KIND_BASELINE,
    KIND_REPORTED,
    KIND_RUN,
    CompareOptions,
    compare,
    main,
)

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("sparknet-blog", "hf-strided-64")

# The tiny recipe of tests/test_train.py (tests/tinylab.py) at an eighth of its budget: a 512-token BPE, a
# ~137k-parameter model with a 64-token context, 16 steps. Two sources so that the per-source columns and the
# realized mixture show.
MIXTURE = dict(
    mixture={"total_tokens": 16384, "val_tokens": 2048},
    tokenizer={"train_bytes_per_source": 200000},
    train={"grad_accum_steps": 2, "warmup_fraction": 0.05, "log_every_steps": 4},
    eval={"every_tokens": 16384, "val_tokens": 1024},
    tracking={"experiment": "cmp-tiny"},
)


@dataclass
class Store:
    lab: Path
    uri: str
    scored: str  # run id of the run with WikiText-2 results (hf-strided-64)
    unscored: str  # run id of the run trained with eval.wikitext=[]
    wikitext: Path  # a small WikiText-2 copy: the first rows of each split, so every evaluation takes seconds
    baseline: Path  # a local HF model folder (random weights, the runs' tokenizer)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_mixture, shared_data) -> Store:
    """Built once: the real runs, through `sparknet.run.execute` into a SQLite MLflow store."""
    import torch

    from sparknet.config import ModelConfig, load_config
    from sparknet.evaluate import load_wikitext
    from sparknet.model import build_model, export_hf
    from sparknet.run import execute

    torch.set_num_threads(1)
    lab = tmp_path_factory.mktemp("cmp") / "lab"
    lab.mkdir()
    tiny_mixture(lab, **MIXTURE)
    wikitext = lab.parent / "wikitext"
    wikitext.mkdir()
    for split, n in (("test", 80), ("validation", 120)):
        rows = load_wikitext(split, shared_data / "wikitext-2-raw")[:n]
        (wikitext / f"{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))

    def run(*overrides: str) -> str:
        cfg = load_config(lab / "tiny.yaml", [f"lab_dir={lab}", *overrides])
        return execute(cfg, progress=False).mlflow_run_id

    scored = run("name=scored", "eval.wikitext=[hf-strided-64]", f"eval.wikitext_path={wikitext}")
    unscored = run("name=unscored", "mixture.sources.edu.weight=0.25", "mixture.sources.textbooks.weight=0.75",
                   "train.lr=2e-3")

    from transformers import AutoTokenizer

    final = next((lab / "runs").glob("scored-*/final"))
    tokenizer = AutoTokenizer.from_pretrained(final)
    baseline = lab.parent / "base-model"
    export_hf(build_model(ModelConfig(preset="cpu-tiny", n_positions=64), len(tokenizer), seed=7), baseline,
              tokenizer, eos_token_id=tokenizer.eos_token_id)
    return Store(lab, f"sqlite:///{lab / 'mlflow.db'}", scored, unscored, wikitext, baseline)


@pytest.fixture
def store(template, tmp_path) -> Store:
    """A private copy of the lab (store, artifacts, baseline cache): compare writes to it (--evaluate logs back,
    comparison runs), so each test starts from the same two runs whatever ran before it."""
    lab = tmp_path / "lab"
    shutil.copytree(template.lab, lab, ignore=shutil.ignore_patterns("tokens", "prepared"))
    return Store(lab, f"sqlite:///{lab / 'mlflow.db'}", template.scored, template.unscored, template.wikitext,
                 template.baseline)


def client(store: Store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.uri)


def opts(store: Store, **kw) -> CompareOptions:
    base = dict(lab=store.lab, baselines=(str(store.baseline),), protocols=PROTOCOLS, wikitext=str(store.wikitext),
                out=store.lab.parent / "out")
    return CompareOptions(**(base | kw))


def rows_by_model(frame: pd.DataFrame) -> dict[str, pd.Series]:
    return {r["model"]: r for _, r in frame.iterrows()}


def test_cli_builds_the_table_from_mlflow_with_gaps_reported_rows_files_and_a_comparison_run(store, capsys):
    out = store.lab.parent / "cli-out"
    code = main(["--lab", str(store.lab), "--baseline", str(store.baseline), "--no-default-baselines",
                 "--wikitext", str(store.wikitext), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("compare.md", "compare.csv", "perplexity.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = pd.read_csv(out / "compare.csv")
    # Default protocols: the three standard ones plus the one the scored run has.
    ppl_columns = [c for c in df.columns if c.endswith(" ppl")]
    assert ppl_columns == ["sparknet-blog ppl", "hf-strided-64 ppl", "hf-strided-512 ppl", "hf-strided-1024 ppl"]
    assert "hf-strided-1024 bpb" in df.columns and {"val/edu", "val/textbooks", "note"} <= set(df.columns)

    runs = df[df["kind"] == KIND_RUN].set_index("run_id")
    assert set(runs.index) == {store.scored, store.unscored}  # the comparison experiment is not read back
    m = client(store).get_run(store.scored).data.metrics
    scored, unscored = runs.loc[store.scored], runs.loc[store.unscored]
    assert scored["hf-strided-64 ppl"] == pytest.approx(m["wikitext/hf-strided-64/ppl"], rel=1e-12)
    assert scored["hf-strided-64 loss"] == pytest.approx(m["wikitext/hf-strided-64/loss"], rel=1e-12)
    assert scored["val/edu"] == pytest.approx(m["val/loss/edu"], rel=1e-12)
    assert scored["tokens"] == 16384 and scored["params_M"] == pytest.approx(0.13696)  # GPTShape count, exported
    assert scored["mixture"].startswith("scored: edu 6") and "textbooks 3" in scored["mixture"]  # realized 60/40
    assert unscored["mixture"].startswith("unscored: textbooks 7")
    assert scored["tokens/s"] > 0 and 0 < scored["wall time h"] < 1
    assert math.isnan(unscored["hf-strided-64 ppl"]) and math.isnan(unscored["sparknet-blog loss"])
    assert "eval.wikitext was empty" in unscored["note"] and "--evaluate" in unscored["note"]
    assert "scored under hf-strided-64 only" in scored["note"]

    base = df[df["kind"] == KIND_BASELINE].iloc[0]
    assert base["model"] == str(store.baseline) and "not evaluated yet" in base["note"]
    assert math.isnan(base["hf-strided-64 ppl"])

    reported = df[df["kind"] == KIND_REPORTED]
    assert set(reported["source"]) == {"reported (SparkNet)", "reported (Hugging Face docs)"}
    by_model = reported.set_index("model")
    assert by_model.loc["GPT-2 (openai-community/gpt2)", "sparknet-blog ppl"] == 51.45
    assert by_model.loc["GPT-2 (openai-community/gpt2)", "sparknet-blog loss"] == 3.9407
    assert by_model.loc["CodeLion gpt-2-70m", "sparknet-blog ppl"] == 150.35
    assert by_model.loc["SparkNet v1", "sparknet-blog ppl"] == 38937
    assert by_model.loc["GPT-2 small", "hf-strided-1024 ppl"] == 30 and math.isnan(
        by_model.loc["GPT-2 small", "hf-strided-1024 loss"])
    assert (df[df["kind"] != KIND_REPORTED]["source"] == "measured").all()

    md = (out / "compare.md").read_text()
    assert "| reported | reported (SparkNet) | SparkNet v1 |" in md and "38,937" in md and "≈30" in md
    unscored_line = next(line for line in md.splitlines() if store.unscored in line)
    assert "| — |" in unscored_line and "eval.wikitext was empty" in unscored_line
    assert store.unscored in printed and "notes:" in printed and "eval.wikitext was empty" in printed

    c = client(store)
    exp = c.get_experiment_by_name(COMPARE_EXPERIMENT)
    (comparison,) = c.search_runs([exp.experiment_id])
    assert comparison.info.status == "FINISHED" and comparison.info.run_id in printed
    assert set(comparison.data.params["run_ids"].split(",")) == {store.scored, store.unscored}
    assert {a.path for a in c.list_artifacts(comparison.info.run_id)} == {"compare.md", "compare.csv",
                                                                          "perplexity.png"}
    assert str(store.lab) in exp.artifact_location  # next to the SQLite store, not ./mlruns


def test_evaluate_fills_gaps_logs_them_back_and_the_baseline_cache_prevents_a_second_evaluation(store, monkeypatch):
    from sparknet import compare as compare_module
    from sparknet import evaluate

    first = compare(opts(store, evaluate=True, log=False), log=lambda msg: None)
    rows = rows_by_model(first.frame)
    frame = first.frame.set_index("run_id")

    # The run trained without WikiText-2 now has both protocols, logged back to its own MLflow run.
    run = client(store).get_run(store.unscored)
    for p in PROTOCOLS:
        value = frame.loc[store.unscored, f"{p} ppl"]
        assert 1 < value < 512  # better than uniform over the 512-token vocabulary
        assert run.data.metrics[f"wikitext/{p}/ppl"] == pytest.approx(value, rel=1e-12)
    assert run.data.metrics["wikitext/hf-strided-64/bpb"] == pytest.approx(frame.loc[store.unscored,
                                                                                     "hf-strided-64 bpb"])
    assert "sparknet.compare --evaluate" in run.data.tags["sparknet.wikitext_added"]
    # The scored run kept its own hf-strided-64 number and got only the missing protocol.
    scored_metrics = client(store).get_run(store.scored).data.metrics
    assert frame.loc[store.scored, "hf-strided-64 ppl"] == scored_metrics["wikitext/hf-strided-64/ppl"]
    assert "wikitext/sparknet-blog/ppl" in scored_metrics
    # The one note left says that the numbers come from the trimmed copy of WikiText-2, and stays on later reads.
    assert frame.loc[store.unscored, "note"] == ("sparknet-blog, hf-strided-64: scored on a non-canonical "
                                                 f"WikiText-2 copy in {store.wikitext}")

    # The local baseline: exactly what a direct call of the evaluation code gives.
    model, tokenizer = evaluate.load_hf_model(str(store.baseline))
    direct = evaluate.evaluate_wikitext(evaluate.hf_logits_fn(model), evaluate.hf_tokenize(tokenizer), len(tokenizer),
                                        evaluate.hf_context(model), PROTOCOLS, local=store.wikitext)
    base = rows[str(store.baseline)]
    assert base["kind"] == KIND_BASELINE and base["params_M"] * 1e6 == model.num_parameters()
    for r in direct:
        assert base[f"{r.protocol} loss"] == pytest.approx(r.loss_nats, rel=1e-9)
        assert base[f"{r.protocol} ppl"] == pytest.approx(r.perplexity, rel=1e-9)
    assert base["hf-strided-64 bpb"] == pytest.approx(direct[1].bits_per_byte, rel=1e-9)
    assert 400 < base["hf-strided-64 ppl"] < 700  # random weights: about uniform over 512 ids
    cached = [json.loads(p.read_text()) for p in (store.lab / "baselines").glob("*.json")]
    assert sorted(c["protocol"] for c in cached) == sorted(PROTOCOLS)
    assert {c["data_sha256"] for c in cached} == {r.details["data_sha256"] for r in direct}

    # Second compare: nothing may be evaluated (the runs have their metrics, the baseline is cached).
    def fail(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(compare_module, "_score", fail)
    monkeypatch.setattr(evaluate, "load_hf_model", fail)
    second = compare(opts(store, evaluate=True, log=False, out=store.lab.parent / "again"), log=lambda msg: None)
    columns = [c for c in first.frame.columns if c.endswith((" loss", " ppl", " bpb"))]
    pd.testing.assert_frame_equal(second.frame[columns + ["note"]], first.frame[columns + ["note"]])


def test_offline_default_baselines_are_gaps_with_the_reason(store, monkeypatch, tmp_path):
    from huggingface_hub import constants

    # An empty HF cache: the test must not depend on whether this machine ever downloaded GPT-2.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    missing = str(tmp_path / "no-such-model")
    result = compare(opts(store, baselines=("openai-community/gpt2", "codelion/gpt-2-70m", missing), evaluate=True,
                          run_ids=(store.scored,), tags={"sparknet.mixture": "scored"}, protocols=("hf-strided-64",),
                          log=False), log=lambda msg: None)
    rows = rows_by_model(result.frame)
    assert {r["run_id"] for r in rows.values() if r["kind"] == KIND_RUN} == {store.scored}
    for name in ("openai-community/gpt2", "codelion/gpt-2-70m"):
        row = rows[name]
        assert row["kind"] == KIND_BASELINE and math.isnan(row["hf-strided-64 ppl"])
        assert row["note"].startswith("hf-strided-64: not reachable offline: model ") and name in row["note"]
    assert rows[missing]["note"] == f"no such model folder: {missing}"  # a path typo is not blamed on the hub
    assert "— |" in result.files["md"].read_text()


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "no MLflow experiment named 'nope' at sqlite:"),
    (["--tag", "sparknet.mixture"], "--tag 'sparknet.mixture': expected KEY=VALUE"),
    (["--tag", "sparknet.mixture=nope"], "no finished training runs match all experiments but sparknet-compare; "
                                         "tags sparknet.mixture=nope"),
    (["--run-id", "0123456789abcdef0123456789abcdef"], "--run-id 0123456789abcdef0123456789abcdef: no such run"),
    (["--protocols", "hf-strided-x"], "unknown WikiText-2 protocol 'hf-strided-x'"),
    (["--tracking-uri", "http://127.0.0.1:9"], "MLflow at http://127.0.0.1:9: cannot list experiments"),
])
def test_bad_filters_and_unreachable_stores_are_one_line_errors(template, capsys, monkeypatch, args, message):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    code = main(["--lab", str(template.lab), "--no-log", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    if "experiment named" in message:
        assert "(existing: " in err and "cmp-tiny" in err


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path, capsys):
    code = main(["--lab", str(tmp_path / "nolab"), "--no-log"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "mlflow.db does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nolab").exists()


def test_module_entry_point_exits_2_with_one_line(template, subprocess_env):
    done = subprocess.run([sys.executable, "-m", "sparknet.compare", "--lab", str(template.lab), "--experiment",
                           "missing-exp"], env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no MLflow experiment named 'missing-exp'")
    assert len(done.stderr.strip().splitlines()) == 1
