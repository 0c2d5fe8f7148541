"""sparknet.compare on a real MLflow store: two tiny real runs (one scored on WikiText-2, one not), a local baseline
model, the published rows; gaps, --evaluate writing back, the baseline cache, offline baselines, clean errors."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from sparknet.compare import (
    COMPARE_EXPERIMENT,
    KIND_BASELINE,
    KIND_REPORTED,
    KIND_RUN,
    NOT_GPT2,
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
    train={"batch_tokens": 1024, "warmup_fraction": 0.05, "log_every_steps": 4},
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


_WORDS = ("the", "river", "valley", "was", "built", "in", "1932", "by", "a", "company", "of", "engineers", "and",
          "its", "bridge", "@-@", "carries", "two", "lanes", ",", "which", "were", "widened", "after", "war", "north",
          "station", "album", "released", "song", "game", "team", "season", "played", "—", "café", "“quoted”")


def write_wikitext_like(folder: Path, rows: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A small WikiText-2-shaped copy ({test,validation}.jsonl, rows exactly as the HF dataset has them: "" for a
    blank line, else " text \\n", with " = Heading = " rows), made up here: the table's mechanics do not depend on
    the text, and a plain clone has no ../shared. Not the canonical text, so every score on it says so."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (rows or {"test": 80, "validation": 120}).items():
        out = []
        while len(out) < n:
            if len(out) % 12 == 0:
                out += ["", f" = {' '.join(rng.choice(_WORDS) for _ in range(3)).title()} = \n", ""]
            else:
                out.append(" " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 60))) + " . \n")
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": r}) + "\n" for r in out[:n])
    return folder


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_mixture) -> Store:
    """Built once: the real runs, through `sparknet.run.execute` into a SQLite MLflow store."""
    import torch

    from sparknet.config import ModelConfig, load_config
    from sparknet.model import build_model, export_hf
    from sparknet.run import execute

    torch.set_num_threads(1)
    lab = tmp_path_factory.mktemp("cmp") / "lab"
    lab.mkdir()
    tiny_mixture(lab, **MIXTURE)
    wikitext = write_wikitext_like(lab.parent / "wikitext")

    def run(*overrides: str) -> str:
        cfg = load_config(lab / "tiny.yaml", [f"lab_dir={lab}", *overrides])
        return execute(cfg, progress=False).mlflow_run_id

    scored = run("name=scored", "eval.wikitext=[hf-strided-64]", f"eval.wikitext_path={wikitext}")
    unscored = run("name=unscored", "mixture.sources.docs.weight=0.25", "mixture.sources.code.weight=0.75",
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
    assert "hf-strided-1024 bpb" in df.columns and {"val/docs", "val/code", "note"} <= set(df.columns)

    runs = df[df["kind"] == KIND_RUN].set_index("run_id")
    assert set(runs.index) == {store.scored, store.unscored}  # the comparison experiment is not read back
    m = client(store).get_run(store.scored).data.metrics
    scored, unscored = runs.loc[store.scored], runs.loc[store.unscored]
    assert scored["hf-strided-64 ppl"] == pytest.approx(m["wikitext/hf-strided-64/ppl"], rel=1e-12)
    assert scored["hf-strided-64 loss"] == pytest.approx(m["wikitext/hf-strided-64/loss"], rel=1e-12)
    assert scored["val/docs"] == pytest.approx(m["val/loss/docs"], rel=1e-12)
    # How far past its own training tokens' bigram table each held-out loss is (negative: not yet).
    assert scored["past bigram/docs"] == pytest.approx(m["val/ref_bigram/docs"] - m["val/loss/docs"], rel=1e-9)
    assert scored["tokens"] == 16384 and scored["params_M"] == pytest.approx(0.13696)  # GPTShape count, exported
    assert scored["mixture"].startswith("scored: docs 6") and "code 3" in scored["mixture"]  # realized 60/40
    assert unscored["mixture"].startswith("unscored: code 7")
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
    assert "unscored-" in printed and "notes:" in printed and "eval.wikitext was empty" in printed

    c = client(store)
    exp = c.get_experiment_by_name(COMPARE_EXPERIMENT)
    (comparison,) = c.search_runs([exp.experiment_id])
    assert comparison.info.status == "FINISHED" and comparison.info.run_id in printed
    assert set(comparison.data.params["run_ids"].split(",")) == {store.scored, store.unscored}
    assert {a.path for a in c.list_artifacts(comparison.info.run_id)} == {"compare.md", "compare.csv",
                                                                          "perplexity.png"}
    assert str(store.lab) in exp.artifact_location  # next to the SQLite store, not ./mlruns


def test_evaluate_fills_gaps_logs_them_back_and_the_baseline_cache_prevents_a_second_evaluation(store, monkeypatch):
    from sparknet import evaluate
    from sparknet.compare import scoring

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
    # The notes left: the tokenizer, the model's 64-token context under SparkNet's 256-token rows, and the made-up
    # copy of WikiText-2; they stay on later reads.
    assert frame.loc[store.unscored, "note"] == (
        f"tokenizer bpe-512: {NOT_GPT2}; sparknet-blog: context clamped to the model's 64 tokens, below the "
        f"protocol's; sparknet-blog, hf-strided-64: scored on a non-canonical WikiText-2 copy in {store.wikitext}")
    assert (frame["eval dtype"].loc[[store.scored, store.unscored]] == "float32").all()

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
    assert {c["dtype"] for c in cached} == {"float32"} and {c["commit"] for c in cached} == {""}  # a local folder
    assert not any(c["tokenizer"]["gpt2"] for c in cached) and base["tokenizer"] == "base-model (512)"

    # Second compare: nothing may be evaluated (the runs have their metrics, the baseline is cached).
    def fail(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(scoring, "score", fail)
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
@pytest.mark.slow
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


# --------------------------------------------------------------------------------------------------------
# Comparable numbers first (bits per byte, tokenizers, clamped contexts), a terminal-sized table
# --------------------------------------------------------------------------------------------------------


def test_bits_per_byte_for_every_strided_protocol_first_and_other_tokenizers_kept_apart(store, capsys):
    from sparknet.compare import plot_layout

    out = store.lab.parent / "bpb-out"
    code = main(["--lab", str(store.lab), "--baseline", str(store.baseline), "--no-default-baselines", "--wikitext",
                 str(store.wikitext), "--protocols", "sparknet-blog,hf-strided-64,hf-strided-512", "--evaluate",
                 "--out", str(out), "--no-log"])
    printed = capsys.readouterr().out
    assert code == 0
    df = pd.read_csv(out / "compare.csv")
    numbers = [c for c in df.columns if c.endswith((" bpb", " ppl", " loss"))]
    assert numbers[:2] == ["hf-strided-64 bpb", "hf-strided-512 bpb"]  # the comparable numbers lead
    assert numbers[2:5] == ["sparknet-blog ppl", "hf-strided-64 ppl", "hf-strided-512 ppl"]
    runs = df[df["kind"] == KIND_RUN].set_index("run_id")
    logged = client(store).get_run(store.scored).data.metrics
    # The run scored at 64 during training has its bits per byte in the table (not only the longest stride's).
    assert runs.loc[store.scored, "hf-strided-64 bpb"] == pytest.approx(logged["wikitext/hf-strided-64/bpb"])
    # Its 64-token context ran hf-strided-512 at 64: the same numbers, and the note says so.
    assert runs.loc[store.scored, "hf-strided-512 bpb"] == pytest.approx(runs.loc[store.scored, "hf-strided-64 bpb"])
    assert "sparknet-blog, hf-strided-512: context clamped to the model's 64 tokens, below the protocol's" in \
        runs.loc[store.scored, "note"]
    measured = df[df["kind"] != KIND_REPORTED]
    assert (measured["hf-strided-64 bpb"] > 0).all() and measured["note"].str.contains(NOT_GPT2, regex=False).all()
    assert set(measured["tokenizer"]) == {"bpe-512", "base-model (512)"}
    reported = df[df["kind"] == KIND_REPORTED]
    assert not reported["note"].str.contains(NOT_GPT2, regex=False).any() and set(reported["tokenizer"]) == {"gpt2"}

    header = printed.splitlines()[0].split()
    assert header.index("bpb@64") < header.index("bpb@512") < header.index("ppl")  # "ppl blog" comes after
    run_line = next(line for line in printed.splitlines() if line.split()[1].startswith("scored-"))
    assert run_line.count("*") == 3  # every perplexity of a BPE-512 run is marked
    assert f"* not GPT-2's tokenizer: {NOT_GPT2}" in printed
    gpt2_line = next(line for line in printed.splitlines() if "GPT-2 (openai-community/gpt2)" in line)
    assert "51.45" in gpt2_line and "*" not in gpt2_line

    result = compare(opts(store, protocols=("sparknet-blog", "hf-strided-64", "hf-strided-512"), log=False,
                          out=store.lab.parent / "again"), log=lambda msg: None)
    layout = plot_layout(result.frame, result.protocols)
    assert layout["panels"] == [("bpb", "hf-strided-64"), ("bpb", "hf-strided-512"), ("ppl", "sparknet-blog"),
                                ("ppl", "hf-strided-64"), ("ppl", "hf-strided-512")]
    kinds = [result.frame["kind"].iat[i] for i in layout["rows"]]
    apart = layout["apart_from"]
    assert set(kinds[:apart]) == {KIND_REPORTED} and KIND_REPORTED not in kinds[apart:]  # BPE rows below the line
    assert (result.out_dir / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_printed_table_fits_a_terminal_and_wide_prints_every_column(template, capsys):
    args = ["--lab", str(template.lab), "--no-log", "--no-default-baselines", "--baseline", str(template.baseline),
            "--protocols", "sparknet-blog,hf-strided-512,hf-strided-1024"]
    assert main([*args, "--out", str(template.lab.parent / "narrow")]) == 0
    compact = capsys.readouterr().out
    table = compact.split("\nwritten:")[0].splitlines()
    assert table[0].split() == ["#", "model", "tokens", "mixture", "bpb@512", "bpb@1024", "ppl", "blog", "ppl@512",
                                "ppl@1024", "val", "loss"]
    assert max(len(line) for line in table) <= 120, max(table, key=len)
    assert "-- measured runs" in compact and "-- reported (published figures, not measured here)" in compact
    assert "params_M" not in compact and "val/docs" not in compact
    run_line = next(line for line in table if line.split()[1].startswith("scored-"))
    assert run_line.split()[2] == "16.4k"  # tokens, human-sized
    val = client(template).get_run(template.scored).data.metrics["val/loss"]
    assert run_line.split()[-1] == f"{val:.4f}"  # the mean validation loss closes the line

    assert main([*args, "--wide", "--out", str(template.lab.parent / "wide")]) == 0
    wide = capsys.readouterr().out
    for column in ("params_M", "val/docs", "val/code", "tokens/s", "wall time h", "eval dtype", "tokenizer"):
        assert column in wide.splitlines()[0], column
    assert max(len(line) for line in wide.splitlines()) > 120


# --------------------------------------------------------------------------------------------------------
# Trials are not runs; dtype recorded per row
# --------------------------------------------------------------------------------------------------------


def add_run(store: Store, experiment: str, name: str, tags: dict[str, str], metrics: dict[str, float],
            params: dict[str, str] | None = None) -> str:
    """A finished MLflow run written directly (what a sweep's trial or a GPU run leaves), without training one."""
    from mlflow.entities import Metric, Param

    c = client(store)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    run_id = c.create_run(exp_id, run_name=name, tags=tags).info.run_id
    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()],
                params=[Param(k, v) for k, v in (params or {}).items()])
    c.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.mark.slow
def test_sweep_trials_stay_out_unless_asked_and_a_study_can_be_its_best_trial(store, capsys):
    parent = add_run(store, "lr-study", "sweep lr-study", {"sparknet.study": "lr-study", "sparknet.kind": "sweep"}, {})
    trials = {}
    # The study minimized val/code: trial 2 is its best, though trial 1 has the lowest mean.
    for number, (docs, code) in enumerate(((2.5, 3.5), (1.7, 2.7), (3.3, 2.3))):
        trials[number] = add_run(
            store, "lr-study", f"lr-study-t{number}",
            {"sparknet.mixture": "tiny", "sparknet.study": "lr-study", "sparknet.trial": str(number),
             "sparknet.objective": "val/code", "mlflow.parentRunId": parent},
            {"val/loss/docs": docs, "val/loss/code": code, "val/loss": (docs + code) / 2, "tokens": 8192.0})
    # The study's confirm run (its best setting at the full budget, selected on WikiText-2 validation): a result.
    confirm = add_run(store, "lr-study", "lr-study-confirm",
                      {"sparknet.mixture": "tiny", "sparknet.study": "lr-study", "sparknet.confirm": "true",
                       "mlflow.parentRunId": parent, "sparknet.tuned_on": "wikitext-2-validation"},
                      {"val/loss": 2.0, "wikitext/sparknet-blog/loss": 5.0, "wikitext/sparknet-blog/ppl": 148.41})

    def run_ids(**kw) -> set[str]:
        result = compare(opts(store, log=False, baselines=(), reported=False, **kw), log=lambda msg: None)
        return set(result.frame["run_id"]), result

    ids, result = run_ids()
    assert ids == {store.scored, store.unscored, confirm} and result.trials_left_out == {"lr-study": 3}
    tuned_note = result.frame.set_index("run_id").loc[confirm, "note"]
    assert "sparknet-blog: tuned, the model was selected on WikiText-2 validation" in tuned_note
    ids, result = run_ids(trials="all", out=store.lab.parent / "all")
    assert ids == {store.scored, store.unscored, confirm, *trials.values()}
    notes = result.frame.set_index("run_id")["note"]
    assert notes[trials[2]].startswith("trial 2 of study lr-study")
    ids, result = run_ids(trials="best", out=store.lab.parent / "best")
    assert ids == {store.scored, store.unscored, confirm, trials[2]} and result.trials_left_out == {"lr-study": 2}
    row = result.frame.set_index("run_id").loc[trials[2]]
    assert row["val loss"] == pytest.approx(2.8)  # the mean, shown; the choice was by val/loss/code
    assert "trial 2, the best of 3 finished trials of study lr-study (lowest val/loss/code, its objective" in row["note"]
    ids, _ = run_ids(run_ids=(trials[0],), out=store.lab.parent / "named")  # named with --run-id: always in
    assert trials[0] in ids and trials[1] not in ids

    code = main(["--lab", str(store.lab), "--no-log", "--no-default-baselines", "--out", str(store.lab.parent / "c")])
    printed = capsys.readouterr().out
    assert code == 0 and "3 sweep/ablation trials left out, of studies lr-study (3) (--include-trials" in printed
    confirm_line = next(line for line in printed.splitlines() if "lr-study-confirm" in line)
    assert "148.41†" in confirm_line and "† tuned: the model was selected on WikiText-2 validation" in printed
    code = main(["--lab", str(store.lab), "--no-log", "--experiment", "lr-study", "--tag", "sparknet.objective=val/code"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "3 sweep/ablation trials left out" in err \
        and "--include-trials" in err


def test_the_eval_dtype_is_in_every_row_and_off_policy_scores_are_flagged(store):
    gpu = add_run(store, "cmp-tiny", "gpu-run", {"sparknet.mixture": "gpu", "sparknet.device": "NVIDIA H100 80GB HBM3"},
                  {"wikitext/hf-strided-64/loss": 3.0, "wikitext/hf-strided-64/ppl": 20.09,
                   "wikitext/hf-strided-64/bpb": 1.1},
                  {"train.precision": "bf16", "tokenizer.name": "gpt2", "mixture.total_tokens": "1000000"})
    result = compare(opts(store, protocols=("hf-strided-64",), baselines=(), log=False), log=lambda msg: None)
    frame = result.frame.set_index("run_id")
    assert frame.loc[gpu, "eval dtype"] == "bfloat16 autocast" and frame.loc[store.scored, "eval dtype"] == "float32"
    assert frame.loc[gpu, "note"] == ("hf-strided-64: scored in bfloat16 autocast, not float32 as the rest of the "
                                      "table (fix: --evaluate re-scores it in float32)")  # GPT-2's tokenizer: no note
    assert frame.loc[gpu, "tokenizer"] == "gpt2"
    again = compare(opts(store, protocols=("hf-strided-64",), baselines=(), log=False, evaluate=True,
                         out=store.lab.parent / "re"), log=lambda msg: None).frame.set_index("run_id")
    assert "not re-scored in float32: the run recorded no final model" in again.loc[gpu, "note"]


def test_a_new_kind_of_column_plugs_in_as_one_more_row_source():
    from sparknet.compare import ROW_SOURCES, RowContext, build_rows, comparison_frame, to_markdown

    class Accuracy:  # what a downstream-task source would be: values for the rows already built
        def add(self, rows, ctx):
            for r in rows:
                r.columns["hellaswag acc"] = 0.25

    ctx = RowContext(CompareOptions(baselines=()), uri="", protocols=["hf-strided-512"])
    frame = comparison_frame(build_rows(ctx, (*ROW_SOURCES, Accuracy())), ctx.protocols)
    assert list(frame["model"]) == ["GPT-2 small"] and list(frame["hellaswag acc"]) == [0.25]
    columns = list(frame.columns)
    assert columns.index("val loss") < columns.index("hellaswag acc") < columns.index("eval dtype")
    assert "| 0.2500 |" in to_markdown(frame)
    assert "hellaswag acc" not in comparison_frame(build_rows(ctx), ctx.protocols)


# --------------------------------------------------------------------------------------------------------
# Baseline cache keys: the resolved commit and the dtype
# --------------------------------------------------------------------------------------------------------


def test_baseline_cache_keys_hold_the_resolved_commit_not_main_and_the_dtype(store, tmp_path, monkeypatch):
    """A hub id whose "main" moves to another commit is scored again; each commit's numbers stay cached."""
    from huggingface_hub import constants

    from sparknet.compare import cache_key, scoring
    from sparknet.config import ModelConfig
    from sparknet.evaluate import rows_sha256
    from sparknet.model import build_model, export_hf

    hub = tmp_path / "hf-cache" / "models--sparknet-test--tiny-gpt"
    commits = {"a": "a" * 40, "b": "b" * 40}
    (hub / "snapshots" / commits["a"]).mkdir(parents=True)
    for f in store.baseline.iterdir():
        shutil.copy2(f, hub / "snapshots" / commits["a"] / f.name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.baseline)
    export_hf(build_model(ModelConfig(preset="cpu-tiny", n_positions=64), len(tokenizer), seed=8),
              hub / "snapshots" / commits["b"], tokenizer, eos_token_id=tokenizer.eos_token_id)
    (hub / "refs").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    scored = []
    real_score = scoring.score
    monkeypatch.setattr(scoring, "score", lambda *a, **k: scored.append(a[2]) or real_score(*a, **k))

    def table(spec: str, evaluate: bool, name: str):
        # Only the run scored under hf-strided-64: --evaluate then scores baselines only.
        result = compare(opts(store, baselines=(spec,), protocols=("hf-strided-64",), evaluate=evaluate, log=False,
                              tags={"sparknet.mixture": "scored"}, out=tmp_path / name), log=lambda msg: None)
        return rows_by_model(result.frame)[spec]

    (hub / "refs" / "main").write_text(commits["a"])
    at_a = table("sparknet-test/tiny-gpt", True, "a")
    data_sha = rows_sha256([json.loads(x)["text"] for x in (store.wikitext / "test.jsonl").read_text().splitlines()])
    entry_a = store.lab / "baselines" / f"{cache_key('sparknet-test/tiny-gpt', commits['a'], 'float32', 'hf-strided-64', data_sha)}.json"
    assert json.loads(entry_a.read_text())["commit"] == commits["a"] and at_a["commit"] == commits["a"]
    assert json.loads(entry_a.read_text())["dtype"] == "float32" and len(scored) == 1
    assert cache_key("m", commits["a"], "bfloat16", "p", "s") != cache_key("m", commits["a"], "float32", "p", "s")

    (hub / "refs" / "main").write_text(commits["b"])  # "main" moved: same name, other weights
    at_b = table("sparknet-test/tiny-gpt", True, "b")
    assert len(scored) == 2 and at_b["commit"] == commits["b"]
    assert at_b["hf-strided-64 ppl"] != pytest.approx(at_a["hf-strided-64 ppl"], rel=1e-6)
    assert len(list((store.lab / "baselines").glob("*.json"))) == 2

    # Both commits stay cached: main back at a, or a pinned @a, reads a's numbers without scoring.
    (hub / "refs" / "main").write_text(commits["a"])
    assert table("sparknet-test/tiny-gpt", False, "a2")["hf-strided-64 ppl"] == at_a["hf-strided-64 ppl"]
    pinned = table(f"sparknet-test/tiny-gpt@{commits['b']}", False, "pinned")
    assert pinned["hf-strided-64 ppl"] == at_b["hf-strided-64 ppl"] and len(scored) == 2
    # main unknown here (offline, no ref): the newest numbers scored for main, with the commit they were for.
    (hub / "refs" / "main").unlink()
    fallback = table("sparknet-test/tiny-gpt", False, "fallback")
    assert fallback["hf-strided-64 ppl"] == at_b["hf-strided-64 ppl"] and len(scored) == 2
    assert f"commit {commits['b'][:12]}, what main was when scored on" in fallback["note"]


# --------------------------------------------------------------------------------------------------------
# Bad inputs: one line, nothing lost
# --------------------------------------------------------------------------------------------------------


def test_a_damaged_cache_entry_and_an_out_file_are_one_line_errors(store, capsys):
    base = ["--lab", str(store.lab), "--no-log", "--no-default-baselines", "--baseline", str(store.baseline),
            "--wikitext", str(store.wikitext), "--protocols", "hf-strided-64"]
    assert main([*base, "--evaluate", "--out", str(store.lab.parent / "first")]) == 0
    capsys.readouterr()
    (entry,) = (store.lab / "baselines").glob("*.json")
    damaged = {k: v for k, v in json.loads(entry.read_text()).items() if k != "result"}
    entry.write_text(json.dumps(damaged))
    assert main([*base, "--out", str(store.lab.parent / "second")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{entry}: a baseline cache entry without its result" in err
    assert f"rm {entry}" in err and json.loads(entry.read_text()) == damaged  # left for the user to look at
    entry.write_text('{"model": "x", "res')
    assert main([*base, "--out", str(store.lab.parent / "third")]) == 2
    assert "not a JSON baseline cache entry" in capsys.readouterr().err

    entry.unlink()
    taken = store.lab.parent / "taken.txt"
    taken.write_text("keep me")
    assert main([*base, "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out {taken}: is a file, not a folder" in err
    assert taken.read_text() == "keep me"


# --------------------------------------------------------------------------------------------------------
# The quickstart: offline, then with a local WikiText-2 copy
# --------------------------------------------------------------------------------------------------------

# The quickstart's steps on a tiny budget: the same script, mixture and sources, a smaller tokenizer, model and budget.
QUICK = ["tokenizer.vocab_size=512", "tokenizer.train_bytes_per_source=200000", "mixture.total_tokens=16384",
         "mixture.val_tokens=2048", "model.preset=cpu-tiny", "model.n_positions=64", "train.seq_len=64",
         "train.micro_batch_size=8", "train.batch_tokens=512", "eval.every_tokens=16384", "eval.val_tokens=1024",
         "eval.sample_tokens=4", "prepare.shard_tokens=65536", "prepare.workers=1", "--quiet"]


@pytest.mark.slow
def test_hub_check_gives_up_within_five_seconds_on_a_silent_server(subprocess_env):
    import socket

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        # No HF_HUB_OFFLINE: with it set the answer is "HF_HUB_OFFLINE=1" at once, without a probe.
        env = {k: v for k, v in subprocess_env.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sparknet.compare", "--check-hub"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - started
    assert done.returncode == 1 and "did not answer" in done.stdout and seconds < 5 + 2  # + the interpreter's start


@pytest.mark.slow
def test_quickstart_offline_finishes_with_one_line_then_scores_from_a_local_copy(tmp_path, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                  "SPARKNET_WIKITEXT", "SPARKNET_DOWNSTREAM")}
    # No HF_HUB_OFFLINE: the script must find out itself. A refused port stands for an unreachable hub.
    env |= {"SPARKNET_NO_INSTALL": "1", "SPARKNET_LAB": str(tmp_path / "lab"), "HF_ENDPOINT": "http://127.0.0.1:9",
            "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, on any machine
    env.pop("SPARKNET_SCORE_BASELINES", None)
    started = time.perf_counter()
    done = subprocess.run(["bash", "scripts/quickstart.sh", *QUICK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    offline_s = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("the Hugging Face hub is not reachable") and "working offline" in lines[0]
    hint = [line for line in lines if line.startswith("WikiText-2 not scored (offline)")]
    assert len(hint) == 1 and "sparknet.compare --evaluate" in hint[0] and "SPARKNET_WIKITEXT=DIR" in hint[0]
    hint = [line for line in lines if line.startswith("Downstream tasks not scored (offline)")]
    assert len(hint) == 1 and "sparknet.evaluate downstream" in hint[0] and "SPARKNET_DOWNSTREAM=DIR" in hint[0]
    assert "bpb@512" not in done.stdout  # no table of gaps
    assert offline_s < 300

    # Later, with a local copy: the run is not trained again; it is scored, and the table shows it.
    env["SPARKNET_WIKITEXT"] = str(write_wikitext_like(tmp_path / "wikitext"))
    done = subprocess.run(["bash", "scripts/quickstart.sh", *QUICK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "already finished" in out and "WikiText-2 not scored" not in out
    table = out[out.index("#  model"):]
    cells = next(re.split(r"\s{2,}", line.strip()) for line in table.splitlines()
                 if re.match(r"\s*\d+\s+quickstart-", line))  # columns are two spaces apart at least
    bpb_512, bpb_1024 = cells[4:6]
    assert 0 < float(bpb_512) == float(bpb_1024) < 20  # 64-token context: both strides run at 64
    assert "GPT-2 (openai-community/gpt2)" in table and "51.45" in table and "-- reported" in table
    notes = " ".join(table.split())  # the notes are wrapped to the terminal's width
    assert "hf-strided-512, hf-strided-1024: context clamped to the model's 64 tokens" in notes
    # Its own BPE makes a sparknet-blog perplexity incomparable: --evaluate does not spend time on it, and says so.
    assert "sparknet-blog: not scored by --evaluate: a perplexity only, not comparable for tokenizer bpe-512" in notes
    assert cells[6] == "—"  # its ppl blog cell
    # On a CPU the quickstart leaves GPT-2 and CodeLion to one later command, and says which.
    assert "baselines not scored (--evaluate runs): openai-community/gpt2, codelion/gpt-2-70m" in out
    assert "not evaluated yet (fix: --evaluate" in notes
