"""Mixture ablations (`python -m sparknet.ablate`) on three sources of text every Python installation carries (the
standard library's docstrings, the installed packages' READMEs, the standard library's code): a leave-one-out study
with two seeds that answers with a table, plots, a fitted-model verdict and a runnable best.yaml, where removing a
source raises that source's held-out loss (a real effect of the data) and every run's realized tokens per source
equal its plan; a study that remembers what it is (and grows with --seeds); grid and random designs through the
command; a worker killed mid-study and rerun, and two workers sharing one study, finishing exactly the planned
runs; staged mixtures ablating one stage; and a one-line error (exit 2, nothing trained) for every bad design.

Every study writes its summary under the test's lab (`--out`, or the lab as the working directory), never into the
checkout; each test builds the studies it reads (the leave-one-out study once per module, by the `loo` fixture, which
the tests that read it only read), so the tests pass in any order."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tinylab import kill_mid_study_then_rerun, write_tiny_mixture, write_wikitext_valid

from sparknet.ablate import main

SOURCES = [
    {"name": "docs", "kind": "pydocs", "part": "docstrings", "weight": 0.4, "max_repeats": 8},
    {"name": "readmes", "kind": "pydocs", "part": "readmes", "weight": 0.3, "max_repeats": 8},
    {"name": "code", "kind": "pydocs", "part": "code", "weight": 0.3, "max_repeats": 8},
]
NAMES = ("docs", "readmes", "code")
PROXY = 16384  # 32 steps of 8 x 64 tokens with cpu-tiny: about a second of training a run


# In-process runs on a busy 2-core machine: one torch thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_mixture):
    d = tmp_path_factory.mktemp("ablatelab")
    tiny_mixture(d, mixture={"sources": SOURCES})  # the tests' tiny recipe, with three sources
    (d / "tiny.yaml").rename(d / "tri.yaml")
    write_wikitext_valid(d / "wikitext", articles=10)
    return d


def args_for(lab: Path, study: str, *extra: str, design: str = "leave-one-out", storage: str | None = None,
             mixture: str = "tri.yaml", out: bool = True) -> list[str]:
    """The ablation's command line; `out`: --out <lab>/experiments/<study> (else the default, under the cwd).
    --no-adequacy: these 16k-token proxies of cpu-tiny have not learned past a bigram table, which would withhold the
    effect sentences and the fit these tests read (tests/test_adequacy.py tests the verdict itself)."""
    return [str(lab / mixture), "--design", design, "--proxy-tokens", str(PROXY), "--no-adequacy", "--study", study,
            "--storage", storage or f"sqlite:///{lab / 'optuna.db'}",
            *(["--out", str(lab / "experiments" / study)] if out else []),
            *extra, f"lab_dir={lab}"]


def load(url: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=url)


def keys(trials) -> list[tuple[int, int]]:
    """(point, seed) of each trial, from the fixed params it was queued with (a trial killed before it drew them has
    no params yet)."""
    from sparknet.ablate_report import key_of

    return sorted(key_of(t) for t in trials)


def loo_args(lab: Path) -> list[str]:
    # The default objective: WikiText-2 validation bits per byte (a small file in its layout, as in test_sweep).
    return args_for(lab, "loo", "--seeds", "2", f"eval.wikitext_path={lab / 'wikitext'}")


@pytest.fixture(scope="module")
def loo(lab):
    """The leave-one-out study "loo" (4 points x 2 seeds), built once for the tests that read it (none of them
    changes it): its printed output and its summary folder."""
    out = StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out):
        mp.chdir(lab)
        mp.delenv("SPARKNET_WIKITEXT", raising=False)
        code = main(loo_args(lab))
    assert code == 0, out.getvalue()[-2000:]
    return SimpleNamespace(out=out.getvalue(), folder=lab / "experiments" / "loo", url=f"sqlite:///{lab / 'optuna.db'}")


def test_leave_one_out_study_answers_with_table_plots_fit_and_a_runnable_best_config(lab, loo, capsys):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from sparknet.config import load_config
    from sparknet.mixture import build_plan
    from sparknet.run import main as run_main

    out = loo.out
    url = f"sqlite:///{lab / 'optuna.db'}"
    study = load(url, "loo")
    assert len(study.trials) == 8 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert keys(study.trials) == [(p, s) for p in range(4) for s in (1337, 1338)]  # 4 points x 2 seeds, once each
    attrs = study.user_attrs
    assert attrs["sparknet.kind"] == "ablate" and attrs["sparknet.objective"] == "wikitext-valid"
    assert attrs["sparknet.seeds"] == 2 and attrs["sparknet.proxy_tokens"] == PROXY
    assert [p[0] for p in attrs["sparknet.design"]["points"]] == ["base", "without docs", "without readmes",
                                                                 "without code"]
    for t in study.trials:  # the objective is the run's WikiText-2 validation bits per byte
        assert t.value == t.user_attrs["wikitext_valid_bpb"] and 0.5 < t.value < 10
        assert set(t.user_attrs["val_loss"]) == set(NAMES)  # every source's loss: any objective can be read later

    folder = loo.folder
    for name in ("README.md", "results.csv", "best.yaml", "loss_vs_weight.png", "objective.png"):
        assert (folder / name).stat().st_size > 0, name
    runs = pd.read_csv(folder / "results.csv")
    assert len(runs) == 8 and list(runs["wikitext-valid/bpb"]) == sorted(runs["wikitext-valid/bpb"])
    base_cfg = load_config(lab / "tri.yaml", [f"lab_dir={lab}"])
    for _, r in runs.iterrows():
        # Realized tokens (counted from the trained batches) equal the point's plan, which its weights give.
        weights = [r[f"weight.{n}"] for n in NAMES]
        cfg = load_config(lab / "tri.yaml", [f"lab_dir={lab}", f"mixture.total_tokens={PROXY}",
                                             *(f"mixture.sources.{n}.weight={w}" for n, w in zip(NAMES, weights))])
        plan = build_plan(cfg.mixture, cfg.train.seq_len).tokens_per_source()
        assert [r[f"tokens.{n}"] for n in NAMES] == [r[f"planned.{n}"] for n in NAMES] == list(plan)
        assert sum(r[f"tokens.{n}"] for n in NAMES) == PROXY
        assert all((r[f"tokens.{n}"] == 0) == (r[f"weight.{n}"] == 0) for n in NAMES)
    means = runs.groupby("mixture")[[f"val/loss/{n}" for n in NAMES]].mean()
    for n in NAMES:  # the data's own effect: a source left out is predicted worse than when it was trained on
        assert means.loc[f"without {n}", f"val/loss/{n}"] > means.loc["base", f"val/loss/{n}"] + 0.01, means

    effects = pd.read_csv(folder / "effects.csv")  # the source x metric table: a source helps its own slice
    for n in NAMES:
        own = effects[(effects["source"] == n) & (effects["metric"] == f"val/{n}")].iloc[0]
        assert own["effect"] == pytest.approx(means.loc["base", f"val/loss/{n}"] - means.loc[f"without {n}", f"val/loss/{n}"])
        assert own["effect"] < -0.01 and own["stderr"] > 0
    readme = (folder / "README.md").read_text()
    assert "## Which source helps which metric" in readme
    assert "python -m sparknet.ablate" in readme and "--design leave-one-out" in readme and "--seeds 2" in readme
    lines = readme.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next(i for i in range(first, len(lines)) if not lines[i].startswith("|"))
    table = [line for line in lines[first:end] if "---" not in line]  # the result table (the effects table follows)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:4] == ["mixture", "w docs", "w readmes", "w code"] and "sd over seeds" in header
    assert {"tokens docs", "val/docs", "val/code", "wikitext-valid/bpb"} <= set(header)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[1:]]
    objective = [float(r[header.index("wikitext-valid/bpb")]) for r in rows]
    assert len(rows) == 4 and objective == sorted(objective)  # one row per point, best first
    for r in rows:  # the mean over the two seeds, and their spread
        seeds = runs[runs["mixture"] == r[0]]["wikitext-valid/bpb"]
        assert float(r[header.index("wikitext-valid/bpb")]) == pytest.approx(seeds.mean(), abs=6e-5)
        assert float(r[header.index("sd over seeds")]) == pytest.approx(seeds.std(ddof=1), abs=6e-5)
    for n in NAMES:  # each removal and its own held-out loss, a claim or said to be inside seed noise
        assert re.search(rf"- Removing {n}(:| (raised|lowered|changed)) .*; its own held-out loss val/{n}"
                         rf"( (rose|fell) by \d\.\d{{3}} nats/token| changed by|: no change distinguishable from "
                         rf"seed noise)", readme), readme
    assert "The spread between seeds is" in readme and "A leave-one-out design supports no fitted model" in readme
    assert "tuned" in readme and "Realized tokens per source equal each point's plan" in readme

    best = folder / "best.yaml"
    best_point = runs.groupby("mixture")["wikitext-valid/bpb"].mean().idxmin()
    cfg = load_config(best)  # the best measured mixture (no trusted fit from 4 points) at the full budget
    got = {s.name: s.weight for s in cfg.mixture.sources}
    want = runs[runs["mixture"] == best_point].iloc[0]
    assert got == {n: pytest.approx(want[f"weight.{n}"]) for n in NAMES}
    assert cfg.mixture.total_tokens == base_cfg.mixture.total_tokens and "tuned" in best.read_text().splitlines()[3]
    assert run_main([str(best), "--dry-run"]) == 0  # sparknet.run accepts it as it is
    assert "131,072 tokens" in capsys.readouterr().out

    client = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}")
    mruns = client.search_runs([client.get_experiment_by_name("loo").experiment_id])
    parent = [r for r in mruns if r.data.tags.get("sparknet.kind") == "ablate"]
    children = [r for r in mruns if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["sparknet.tuned_on"] == "wikitext-2-validation"
    assert len(children) == 8 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    assert all(r.data.tags["sparknet.tuned_on"] == "wikitext-2-validation" for r in children)
    assert all(r.data.params["mixture.total_tokens"] == str(PROXY) for r in children)
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"objective.png", "loss_vs_weight.png", "results.csv", "best.yaml", "README.md"} <= arts
    assert out.count(f"wrote {folder}/") == 1


@pytest.mark.parametrize("change, message", [
    (["--proxy-tokens", "8192"], "its proxy budget is 16,384 tokens, this command asks for 8,192 (--proxy-tokens)"),
    (["--design", "single-source"], "its design is leave-one-out (4 points), this command's is single-source "
                                    "(3 points) (--design)"),
    (["--objective", "val"], "it minimizes wikitext-valid, this command asks for val (--objective)"),
    (["train.lr=0.001"], "its recipe has train.lr=0.003, this command gives train.lr=0.001"),
    (["--seeds", "1"], "it has 2 seeds per point, this command asks for 1 (--seeds may grow, not shrink: --seeds 2)"),
])
@pytest.mark.slow
def test_a_study_remembers_what_it_is_and_a_rerun_adds_nothing(lab, loo, monkeypatch, capsys, change, message):
    monkeypatch.chdir(lab)
    readme = loo.folder / "README.md"
    before, text = len(load(loo.url, "loo").trials), readme.read_text()
    argv = loo_args(lab)
    changed = [*argv, *change]  # a later flag wins
    if "--design" in change:
        changed = [*argv]
        changed[argv.index("--design") + 1] = change[1]
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --study loo: ") and message in err, err
    assert len(load(loo.url, "loo").trials) == before and readme.read_text() == text  # nothing trained or rewritten

    assert main([*argv, "train.log_every_steps=3"]) == 0  # the same study (an operational override): nothing to do
    assert f"summary in {loo.folder}/ was written by" in capsys.readouterr().out
    assert len(load(loo.url, "loo").trials) == before and readme.read_text() == text


@pytest.mark.slow
def test_more_seeds_grow_the_study_by_their_runs_only(lab, monkeypatch, capsys):
    """A study of one seed per point, then --seeds 2: only the new seed's runs train, and the summary is written again
    (no --out: to experiments/grow/ under the working directory, the lab)."""
    monkeypatch.chdir(lab)
    url = f"sqlite:///{lab / 'optuna.db'}"
    argv = args_for(lab, "grow", "--objective", "val", out=False)
    assert main(argv) == 0
    readme = lab / "experiments" / "grow" / "README.md"
    assert "(4 runs," in readme.read_text() and "One seed per point" in readme.read_text()
    capsys.readouterr()
    assert main([*argv, "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    study = load(url, "grow")
    assert keys(study.trials) == [(p, s) for p in range(4) for s in (1337, 1338)]  # 4 new runs, seed 1338
    assert out.count("complete: val/loss") == 4 and "4 of 8 runs finished" in out
    assert study.user_attrs["sparknet.seeds"] == 2
    text = readme.read_text()
    assert "(8 runs," in text and "--seeds 2" in text and "over the 2 seeds" in text and "--out" not in text
    assert out.count("wrote experiments/grow/") == 1


@pytest.mark.slow
def test_a_run_that_fails_after_training_keeps_its_learning_curve_when_it_resumes(lab, monkeypatch, capsys):
    """The base point's first seed evaluates along the way (its learning curve); when its trial fails after the
    training (here, in its scoring), the rerun continues the run from its final checkpoint, so nothing is evaluated
    again: the curve the failed trial recorded goes to the trial that completes it, and the README can draw it."""
    import sparknet.run

    url = f"sqlite:///{lab / 'resumecurve.db'}"
    argv = args_for(lab, "resumecurve", "--objective", "val", storage=url)
    real = sparknet.run.execute

    def fails_once(cfg, **kw):
        out = real(cfg, **kw)
        if cfg.name.endswith("-p0-s0"):
            raise ValueError("a fault in scoring, after the training")
        return out

    monkeypatch.setattr(sparknet.run, "execute", fails_once)
    with pytest.raises(ValueError):
        main(argv)
    monkeypatch.setattr(sparknet.run, "execute", real)
    failed = next(t for t in load(url, "resumecurve").trials if t.state.name == "FAIL")
    curve = failed.user_attrs["val_loss_by_eval"]
    assert len(curve) >= 3 and all(set(v) == set(NAMES) for v in curve.values())
    capsys.readouterr()
    assert main(argv) == 0
    base = [t for t in load(url, "resumecurve").trials if t.state.name == "COMPLETE" and key_of_(t) == (0, 1337)]
    assert len(base) == 1 and base[0].user_attrs["val_loss_by_eval"] == curve
    assert set(base[0].user_attrs["ref_bigram_by_eval"]) == set(curve)  # its references counted for each evaluation
    text = (lab / "experiments" / "resumecurve" / "README.md").read_text()
    assert "![learning curve of the base point](learning_curve.png)" in text

    # A rerun of a finished study writes nothing; with its README deleted, it writes the summary again.
    capsys.readouterr()
    assert main(argv) == 0 and "was written by" in capsys.readouterr().out
    (lab / "experiments" / "resumecurve" / "README.md").unlink()
    assert main(argv) == 0 and "wrote " in capsys.readouterr().out
    assert (lab / "experiments" / "resumecurve" / "README.md").read_text() == text

    # The full budget (best.yaml's) may be set after the study: no trial trains again, the summary is written for it,
    # and --confirm trains best.yaml at each new full budget once.
    n_trials = len(load(url, "resumecurve").trials)
    for full, says in ((PROXY, "The runs trained the full budget itself"),
                       (PROXY // 2, f"The proxies ({PROXY:,} tokens) train longer than the full budget")):
        assert main([*argv, "--confirm", f"mixture.total_tokens={full}"]) == 0
        out = capsys.readouterr().out
        assert "wrote " in out and f"at the full budget ({full:,} tokens)" in out, out[-2000:]
        assert main([*argv, "--confirm", f"mixture.total_tokens={full}"]) == 0
        assert "--confirm: the full-budget run of best.yaml was done" in capsys.readouterr().out  # done already for this budget: not trained again
        assert says in (lab / "experiments" / "resumecurve" / "README.md").read_text()
        best = (lab / "experiments" / "resumecurve" / "best.yaml").read_text()
        assert f"total_tokens: {full}" in best
    assert len(load(url, "resumecurve").trials) == n_trials


def key_of_(trial) -> tuple[int, int]:
    from sparknet.ablate_report import key_of

    return key_of(trial)


def _dry_points(capsys, argv) -> list[tuple[str, tuple[float, ...], tuple[int, ...]]]:
    assert main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = []
    for line in lines[2:]:
        cells = line.split()
        out.append((" ".join(cells[1:-6]), tuple(float(x) for x in cells[-6:-3]),
                    tuple(int(x.replace(",", "")) for x in cells[-3:])))
    return out


def test_grid_and_random_designs_give_the_right_points(lab, capsys, tmp_path):
    grid = _dry_points(capsys, args_for(lab, "g", design="grid:0.25", storage=f"sqlite:///{tmp_path / 'n.db'}"))
    assert len(grid) == 15 == math.comb(4 + 2, 2)  # the simplex lattice of step 1/4 over three sources
    w = np.array([p[1] for p in grid])
    assert np.allclose(w.sum(axis=1), 1) and np.allclose(w * 4, np.round(w * 4)) and len({p[1] for p in grid}) == 15
    assert all(sum(p[2]) == PROXY for p in grid)  # each point's plan spends the proxy budget exactly
    assert all((t == 0) == (x == 0) for p in grid for x, t in zip(p[1], p[2]))
    first = _dry_points(capsys, args_for(lab, "r", design="random:6"))
    again = _dry_points(capsys, args_for(lab, "r", design="random:6"))
    other = _dry_points(capsys, args_for(lab, "r", "--design-seed", "1", design="random:6"))
    assert len(first) == 6 and first == again and first != other  # seeded Dirichlet draws
    w = np.array([p[1] for p in first])
    assert np.allclose(w.sum(axis=1), 1, atol=3e-4) and ((w == 0) | (w >= 0.01)).all()
    assert not (tmp_path / "n.db").exists() and not (lab / "experiments" / "g").exists()  # --dry-run starts nothing


@pytest.mark.parametrize("design, extra, message", [
    ("FILE:points:\n  - {weights: {docs: 0.5, web: 0.5}}\n", [], "points[0].weights.web: no source named 'web'"),
    ("FILE:points:\n  - {weights: {docs: 0.5, code: 0.4}}\n", [], "points[0].weights: sum to 0.9, not 1"),
    ("FILE:points: []\n", [], "points: expected a non-empty list"),
    ("FILE:points:\n  - {weights: {docs: 1}}\n  - {weights: {docs: 1.0}}\n", [],
     "points[1].weights: the same mixture as points[0]"),
    ("grid:", [], "'grid:': the step is not a number"),
    ("grid:0.3", [], "the step 0.3 does not divide 1"),
    ("leave-two-out", [], "unknown design 'leave-two-out'"),
    ("leave-one-out", ["--stage", "1"], "--stage 1: the mixture has no stages"),
    ("leave-one-out", ["--seeds", "0"], "--seeds: must be >= 1"),
    ("random:4", ["--design-seed", "-1"], "--design-seed: must be >= 0, got -1"),
    ("NONE", [], "--design: required"),
    ("leave-one-out", ["--objective", "val/web"], "--objective: objective 'val/web': the mixture has no source 'web'"),
    ("FILE:points:\n  - {weights: {docs: 0.99, code: 0.01}}\n", ["--proxy-tokens", "1024"],
     "point 0 (docs99 code1: docs=0.99 readmes=0 code=0.01): mixture.total_tokens: 1024 tokens (16 sequences"),
])
def test_bad_designs_are_one_line_errors_before_anything_runs(lab, tmp_path, capsys, design, extra, message):
    storage = tmp_path / "never.db"
    argv = args_for(lab, "never", *extra, storage=f"sqlite:///{storage}")
    if design.startswith("FILE:"):
        (tmp_path / "design.yaml").write_text(design.removeprefix("FILE:"))
        design = str(tmp_path / "design.yaml")
    if design == "NONE":
        i = argv.index("--design")
        del argv[i:i + 2]
    else:
        argv[argv.index("--design") + 1] = design
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not storage.exists() and not (lab / "experiments" / "never").exists()  # nothing started


def test_the_default_objective_without_wikitext_fails_before_anything_starts(lab, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SPARKNET_WIKITEXT", raising=False)
    (tmp_path / "empty").mkdir()
    storage = tmp_path / "never.db"
    assert main(args_for(lab, "nowiki", f"eval.wikitext_path={tmp_path / 'empty'}", storage=f"sqlite:///{storage}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--objective wikitext-valid (the default): " in err, err
    assert "no WikiText-2 validation file in it" in err and "--objective val" in err
    assert not storage.exists()


def test_a_held_out_slice_too_short_for_the_objective_fails_before_any_run(lab, tmp_path, capsys):
    """val/code reads code's held-out loss, which exists only if its slice (read up to eval.val_tokens) holds one
    window of seq_len + 1 tokens: found with the prepared stores, before the first of the study's runs trains."""
    storage = tmp_path / "short.db"
    assert main(args_for(lab, "short", "--objective", "val/code", "eval.val_tokens=32",
                         storage=f"sqlite:///{storage}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--objective val/code: objective val/code: source 'code' has " in err
    assert "33 of them read (eval.val_tokens 32), fewer than one window of train.seq_len + 1 = 65" in err
    assert "fix: raise mixture.val_tokens or eval.val_tokens, or choose another objective" in err
    assert not list((lab / "runs").glob("short-*")) if (lab / "runs").exists() else True  # nothing trained
    if storage.exists():  # the storage is open, the study not created: no queued run is left behind
        import optuna

        assert "short" not in optuna.get_all_study_names(f"sqlite:///{storage}")


def test_a_source_too_small_for_a_point_fails_naming_the_point_before_any_run(lab, tmp_path, capsys):
    """A small local source (a few notes) that a single-source point would have to repeat past its max_repeats: the
    check runs before the first run trains, and names the point."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("A short note about rivers and cities. " * 20)
    mix = tmp_path / "four.yaml"
    text = (lab / "tri.yaml").read_text().replace(
        "  sources:\n", f"  sources:\n  - name: notes\n    kind: local\n    path: {notes}\n    weight: 0.0\n", 1)
    mix.write_text(text)
    argv = [str(mix), "--design", "single-source", "--proxy-tokens", str(PROXY), "--objective", "val", "--storage",
            f"sqlite:///{tmp_path / 'n.db'}", f"lab_dir={lab}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--design single-source: point 0 (only notes: notes=1 docs=0 readmes=0 code=0)" in err
    assert "mixture.sources.notes:" in err and "max_repeats" in err
    assert not (lab / "runs").exists() or not list((lab / "runs").glob("four-*"))  # nothing trained


def test_a_staged_mixture_ablates_one_stage_and_keeps_the_others(lab, tmp_path, capsys):
    from sparknet.ablation import Ablation, base_weights
    from sparknet.config import load_config
    from sparknet.designs import design_points
    from sparknet.objective import Objective

    staged = tmp_path / "staged.yaml"
    text = (lab / "tri.yaml").read_text()
    for n in NAMES:
        text = re.sub(rf"(name: {n}\n(?:    .*\n)*?)    weight: [0-9.]+\n", r"\1", text)
    text = text.replace("  sources:\n", "  stages:\n  - start_fraction: 0.0\n    weights: {docs: 0.5, readmes: 0.25, "
                                        "code: 0.25}\n  - start_fraction: 0.75\n    weights: {docs: 0.2, code: 0.8}\n"
                                        "  sources:\n", 1)
    staged.write_text(text)
    cfg = load_config(staged, [f"lab_dir={lab}"])
    assert base_weights(cfg, 1) == (0.2, 0.0, 0.8)
    argv = [str(staged), "--design", "leave-one-out", "--proxy-tokens", str(PROXY), "--objective", "val",
            f"lab_dir={lab}"]
    assert main(argv + ["--dry-run"]) == 2
    assert "--stage: the mixture has 2 stages (0: from 0, 1: from 0.75) (fix: --stage I" in capsys.readouterr().err
    assert main(argv + ["--stage", "2", "--dry-run"]) == 2
    assert "--stage 2: the mixture has stages 0 to 1" in capsys.readouterr().err
    assert main(argv + ["--stage", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(stage 1): 3 points" in out  # base, without docs, without code (readmes has no weight in stage 1)

    points = design_points("leave-one-out", NAMES, base_weights(cfg, 1))
    abl = Ablation(mixture=str(staged), design="leave-one-out", points=points, names=NAMES, stage=1, seeds=[1337],
                   proxy_tokens=PROXY, study_name="st", storage_url="sqlite://", base_overrides=[f"lab_dir={lab}"],
                   objective=Objective.parse("val", NAMES))
    for i, p in enumerate(points):
        c = abl.point_config(i, 1337)
        stages = c.mixture.stage_list()
        assert stages[0][1] == {"docs": 0.5, "readmes": 0.25, "code": 0.25}  # the other stage keeps its weights
        assert tuple(stages[1][1][n] for n in NAMES) == pytest.approx(p.weights)
        assert c.mixture.total_tokens == PROXY and c.train.seed == 1337


@pytest.mark.slow
def test_a_point_whose_run_folder_is_in_use_waits_and_is_never_run_twice(lab, tmp_path, monkeypatch, capsys):
    """A run folder locked by a live process (a worker whose trial was failed as stale while it trained on): the
    study neither queues nor takes that point meanwhile, runs the others, and takes it once the lock is gone."""
    import threading

    import sparknet.run
    from sparknet.ablation import Ablation
    from sparknet.config import load_config
    from sparknet.designs import design_points
    from sparknet.locks import run_lock
    from sparknet.objective import Objective
    from sparknet.run import run_dir_for

    mixture = str(lab / "tri.yaml")
    base = load_config(mixture, [f"lab_dir={lab}"])
    points = design_points("leave-one-out", NAMES, tuple(s.weight for s in base.mixture.sources))
    abl = Ablation(mixture=mixture, design="leave-one-out", points=points, names=NAMES, seeds=[base.train.seed],
                   proxy_tokens=PROXY, study_name="busy", storage_url="sqlite://", base_overrides=[f"lab_dir={lab}"],
                   objective=Objective.parse("val", NAMES))
    held = run_dir_for(abl.point_config(1, base.train.seed))
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    lock = run_lock(held)
    lock.__enter__()
    real = sparknet.run.execute

    def execute(cfg, **kw):
        out = real(cfg, **kw)
        if cfg.name.endswith("-p3-s0"):  # the other points are done: the live process ends a moment later
            threading.Timer(3.0, lambda: lock.__exit__(None, None, None)).start()
        return out

    monkeypatch.setattr(sparknet.run, "execute", execute)
    assert main(args_for(lab, "busy", "--objective", "val", storage=url)) == 0
    out = capsys.readouterr().out
    trials = load(url, "busy").trials
    # Every point is queued at the start: point 1's queued trial, taken while the folder was held, is failed as a
    # duplicate (not run), and the point is queued again only once the folder is free.
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["reason"].startswith(f"a duplicate, not run: its run folder is in use by pid "
                                                     f"{os.getpid()} on ")
    assert [t.user_attrs["point"] for t in trials] == [0, 1, 2, 3, 1]
    assert Path(trials[4].user_attrs["run_dir"]) == held and "seconds" in trials[4].user_attrs
    assert "trial 4: point 1 (without docs" in out


def test_findings_say_what_the_table_says():
    import pandas as pd

    from sparknet.ablate_report import findings, points_frame
    from sparknet.ablation import Ablation
    from sparknet.designs import design_points
    from sparknet.objective import Objective

    names = ("finepdfs", "dclm", "edu")
    points = design_points("leave-one-out", names, (0.5, 0.3, 0.2))
    abl = Ablation(mixture="m.yaml", design="leave-one-out", points=points, names=names, seeds=[1, 2, 3], seed_vary="init",
                   proxy_tokens=1000, study_name="s", storage_url="sqlite://", base_overrides=[],
                   objective=Objective.parse("wikitext-valid", names))
    rows = []  # three seeds a point: mean - sd, mean, mean + sd (their sd is sd), own losses 0.01 apart
    for i, (p, own, obj, sd) in enumerate(zip(points, (None, 3.91, 3.62, 3.35), (1.40, 1.432, 1.41, 1.399),
                                              (0.004, 0.003, 0.005, 0.004))):
        losses = {n: 3.5 for n in names}
        if own is not None:
            losses[p.name.removeprefix("without ")] = own
        for k, step in enumerate((-1, 0, 1)):
            rows.append({"point": i, "mixture": p.name, "seed": k + 1, "state": "COMPLETE", "note": "",
                         **{f"weight.{n}": w for n, w in zip(names, p.weights)},
                         **{f"tokens.{n}": round(1000 * w) for n, w in zip(names, p.weights)},
                         **{f"val/loss/{n}": losses[n] + 0.01 * step for n in names}, "val/loss": 3.5,
                         "wikitext-valid/bpb": obj + sd * step})
    pts = points_frame(abl, pd.DataFrame(rows))
    assert list(pts["sd"]) == pytest.approx([0.004, 0.004, 0.005, 0.003]) and set(pts["seeds"]) == {3}
    assert set(pts["failed"]) == {0}
    facts = findings(abl, pts)
    # Each removal against base: Welch over the seeds, Holm over the 7 comparisons stated (3 on the objective, 3 on
    # the removed source's own loss, finepdfs's effect against dclm's, the next largest).
    assert facts[0] == ("Removing finepdfs raised wikitext-valid/bpb by 0.0320 bits/byte (1.4000 -> 1.4320; 95% CI "
                        "0.0237..0.0403, Holm p = 0.0022); its own held-out loss val/finepdfs rose by 0.410 "
                        "nats/token (3.500 -> 3.910; 95% CI 0.387..0.433, Holm p < 0.0001).")
    assert facts[1].startswith("Removing dclm: no effect on wikitext-valid/bpb distinguishable from seed noise "
                               "(+0.0100 bits/byte, 95% CI -0.0005..+0.0205, Holm p = ")
    assert facts[2].startswith("Removing edu: no effect on wikitext-valid/bpb distinguishable from seed noise "
                               "(-0.0010 bits/byte") and "its own held-out loss val/edu fell by 0.150" in facts[2]
    assert facts[3].startswith("The source wikitext-valid/bpb needs most is finepdfs: removing it costs 0.0220 "
                               "bits/byte more than removing dclm, the next (removing finepdfs +0.0320 bits/byte, "
                               "removing dclm +0.0100 bits/byte; 95% CI 0.0118..0.0322, Holm p = ")
    assert facts[4].startswith("How these are tested:") and "Holm-corrected over the 7 comparisons" in facts[4]
    assert facts[5].startswith("The spread between seeds is 0.0040 bits/byte") and "largest 0.0050" in facts[5]
    assert "the seeds vary model initialization only" in facts[5] and len(facts) == 6
    # A table built by hand (no seeds' values kept): the objective's spread comes from its sd and seeds columns.
    bare = pd.DataFrame(pts.to_dict("records"))
    assert findings(abl, bare)[0].startswith(facts[0].split("; its own")[0])
    assert "val/finepdfs changed by +0.410 nats/token (3.500 -> 3.910; no spread measured, so not tested)" in \
        findings(abl, bare)[0]


def test_an_interval_that_misses_zero_without_passing_holm_reads_as_a_hint():
    from sparknet.ablate_report import _numbers
    from sparknet.ablate_stats import welch

    d = welch([1.0, 1.01, 1.02], [1.03, 1.04, 1.05])  # -0.03, its own 95% CI about -0.053..-0.007
    assert d.high < 0 and d.p < 0.05
    text = _numbers(d, 0.073, 4, "bits/byte")
    assert text.startswith(f"-0.0300 bits/byte, 95% CI {d.low:+.4f}..{d.high:+.4f} (uncorrected for the comparisons: "
                           f"a hint, not an effect), Holm p = 0.073"), text
    wide = welch([1.0, 1.03, 1.06], [1.02, 1.05, 1.08])
    assert wide.low < 0 < wide.high and "hint" not in _numbers(wide, 0.5, 4, "bits/byte")


def _states(url: str, study: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in load(url, study).trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@pytest.mark.slow
def test_a_worker_killed_mid_study_and_a_rerun_finish_exactly_the_planned_points(lab, subprocess_env):
    url = f"sqlite:///{lab / 'killed.db'}"
    cmd = [sys.executable, "-m", "sparknet.ablate", *args_for(lab, "killed", "--objective", "val", "--heartbeat", "1",
                                                             design="random:3", storage=url)]
    done = kill_mid_study_then_rerun(cmd, subprocess_env, lab, lab / "killed.db")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    study = load(url, "killed")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert keys(complete) == [(p, 1337) for p in range(3)]  # each planned point once, none twice, none extra
    assert _states(url, "killed") == {"COMPLETE": 3, "FAIL": 1}  # the killed run, failed by its heartbeat
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    retry = next(t for t in complete if "failed_trial" in t.system_attrs)
    assert retry.system_attrs["failed_trial"] == failed.number and keys([retry]) == keys([failed])
    from sparknet.designs import design_points

    want = design_points("random:3", NAMES, (0.4, 0.3, 0.3))
    for t in complete:  # the study ran the design's points, with their weights
        assert tuple(t.params[f"weight.{n}"] for n in NAMES) == pytest.approx(want[t.params["point"]].weights)
    assert (lab / "experiments" / "killed" / "README.md").exists()


@pytest.mark.slow
def test_two_workers_share_one_study_without_duplicates_and_one_confirms(lab, subprocess_env):
    from mlflow.tracking import MlflowClient

    url = f"sqlite:///{lab / 'pair.db'}"
    # A 16k-token full budget, so that --confirm (best.yaml at the full budget) takes seconds.
    cmd = [sys.executable, "-m", "sparknet.ablate", *args_for(lab, "pair", "--objective", "val", "--confirm",
                                                             "mixture.total_tokens=16384", design="grid:0.5",
                                                             storage=url)]
    workers = [subprocess.Popen(cmd, env=subprocess_env, cwd=lab, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs[0][-2000:] + outs[1][-2000:]
    trials = load(url, "pair").trials
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)  # 6 grid points, no extra
    assert keys(trials) == [(p, 1337) for p in range(6)]
    ran = [o.count(" complete: val/loss") for o in outs]
    assert sum(ran) == 6 and min(ran) >= 1, ran  # both workers trained, no point twice
    assert sorted(o.count(f"wrote {lab / 'experiments' / 'pair'}/") for o in outs) == [0, 1], outs  # one summary
    assert sorted(o.count("confirming best.yaml") for o in outs) == [0, 1], outs  # one confirmation run
    client = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}")
    mruns = client.search_runs([client.get_experiment_by_name("pair").experiment_id])
    confirm = [r for r in mruns if r.data.tags.get("sparknet.confirm") == "true"]
    assert len(confirm) == 1 and confirm[0].info.status == "FINISHED"
    assert confirm[0].data.params["mixture.total_tokens"] == "16384"
    best = load(url, "pair").user_attrs["sparknet.best_weights"]
    assert [float(confirm[0].data.params[f"mixture.sources.{n}.weight"]) for n in NAMES] == pytest.approx(best)
    folder = lab / "experiments" / "pair"
    assert (folder / "objective.png").exists()  # three sources, not leave-one-out: the ternary plot
    readme = (folder / "README.md").read_text()
    assert "## Fitted model" in readme and "6 points" in readme
    lines = (folder / "results.csv").read_text().splitlines()
    assert len(lines) == 7 and {f"weight.{n}" for n in NAMES} <= set(lines[0].split(","))


@pytest.mark.parametrize("vary, init, data", [("init", [7, 8, 9], [1234] * 3), ("data", [7] * 3, [1234, 1235, 1236]),
                                              ("both", [7, 8, 9], [1234, 1235, 1236])])
def test_seed_vary_moves_the_init_the_data_order_or_both_and_never_the_quotas(tmp_path, vary, init, data):
    from sparknet.ablation import Ablation
    from sparknet.designs import design_points
    from sparknet.mixture import build_plan
    from sparknet.objective import Objective

    mixture = write_tiny_mixture(tmp_path, "m.yaml", train={"seed": 7})
    names = ("docs", "code")
    points = design_points("leave-one-out", names, (0.6, 0.4))
    abl = Ablation(mixture=str(mixture), design="leave-one-out", points=points, names=names, seeds=[7, 8, 9],
                   seed_vary=vary, data_seed=1234, proxy_tokens=65536, study_name="s", storage_url="sqlite://",
                   base_overrides=[], objective=Objective.parse("val", names))
    cfgs = [abl.point_config(0, s) for s in (7, 8, 9)]
    assert [c.train.seed for c in cfgs] == init and [c.mixture.seed for c in cfgs] == data
    plans = [build_plan(c.mixture, c.train.seq_len) for c in cfgs]
    # The data order is another draw; the quotas (and so the stores, the validation slices and the tokenizer, which
    # no seed enters) are the same.
    assert all((p.tokens_per_source() == plans[0].tokens_per_source()).all() for p in plans)
    assert {c.mixture.val_tokens for c in cfgs} == {cfgs[0].mixture.val_tokens}
    from sparknet.data import SourceSequences

    orders = [SourceSequences("docs", np.zeros(64 * 100 + 1), 64, p.seed)._order(0) for p in plans]
    assert (orders[0] != orders[1]).any() == (vary != "init")  # which sequences come first: the data order
    assert abl.identity()["sparknet.seed_vary"] == vary
    other = "init" if vary != "init" else "both"
    assert "--seed-vary" in abl.identity_difference({"sparknet.seed_vary": other, "sparknet.seeds": 3},
                                                    abl.identity())
