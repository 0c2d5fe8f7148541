"""Does an ablation's answer transfer (`python -m sparknet.ablate --transfer STUDY --budget 2x`), and mixture reuse
(`--reuse STUDY`), on the tiny lab (tests/tinylab.py: the installed Python's text, cpu-tiny, 16k-token proxies):

- a finished study's points retrained at twice its budget as a study of its own: its Spearman and decision accuracy
  equal a direct computation from the two studies' stored values, transfer.csv and the README's Transfer section say
  them, and a rerun trains nothing and rewrites the section in place;
- a study over one more source, with a tokenizer both studies share, starts with exactly the old runs that apply,
  their added source's held-out loss measured on the old final models (the same measurement as a run's own: the
  old sources' losses come out as the runs recorded them), and trains only the rest;
- with the mixture's own BPE, which changes with the sources, nothing is reused and one line says why;
- a study two sources away is a one-line error (the flags' other bad inputs are rows of tests/test_bad_inputs.py).

Every study writes under the module's lab, never into the checkout; MLflow is off (tracking.enabled=false) to keep
each tiny run at about a second."""

from __future__ import annotations

import itertools
import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tinylab import write_tiny_mixture

from sparknet.ablate import main

PROXY = 16384
DOCS = {"name": "docs", "kind": "pydocs", "part": "docstrings", "max_repeats": 8}
READMES = {"name": "readmes", "kind": "pydocs", "part": "readmes", "max_repeats": 8}
CODE = {"name": "code", "kind": "pydocs", "part": "code", "max_repeats": 8}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adequacy_off() -> list[str]:
    """--no-adequacy where the command has it: these proxies are far too small to learn past a bigram table, and the
    tests are about the bookkeeping, not about what the runs learned."""
    import contextlib

    out = StringIO()
    with contextlib.suppress(SystemExit), redirect_stdout(out):
        main(["--help"])
    return ["--no-adequacy"] if "--no-adequacy" in out.getvalue() else []


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Three mixtures of the tiny recipe (a BPE trained on 100 kB a source: a second, not twenty), and the two-source
    BPE as a tokenizer the studies name by its path (`tok`): the same tokenizer whatever the mixture's sources."""
    from sparknet.config import load_config
    from sparknet.prepare import _bpe_dir, resolve_tokenizer

    d = tmp_path_factory.mktemp("transferlab")
    common = {"tracking": {"enabled": False}, "tokenizer": {"train_bytes_per_source": 100_000}}
    write_tiny_mixture(d, "two.yaml", mixture={"sources": [DOCS | {"weight": 0.5}, CODE | {"weight": 0.5}]}, **common)
    write_tiny_mixture(d, "tri.yaml", mixture={"sources": [DOCS | {"weight": 0.4}, READMES | {"weight": 0.2},
                                                           CODE | {"weight": 0.4}]}, **common)
    write_tiny_mixture(d, "swap.yaml", mixture={"sources": [READMES | {"weight": 0.5}, CODE | {"weight": 0.5}]},
                       **common)
    cfg = load_config(d / "two.yaml", [f"lab_dir={d}"])
    resolve_tokenizer(cfg, 1)
    return SimpleNamespace(dir=d, url=f"sqlite:///{d / 'optuna.db'}", off=_adequacy_off(),
                           tok=f"tokenizer.name={_bpe_dir(cfg)}")


def run(argv: list[str], cwd: Path) -> tuple[int, str]:
    out = StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out):
        mp.chdir(cwd)
        code = main(argv)
    return code, out.getvalue()


def study_args(lab, mixture: str, study: str, design: str, *extra: str) -> list[str]:
    return [str(lab.dir / mixture), "--design", design, "--proxy-tokens", str(PROXY), "--objective", "val",
            "--study", study, "--storage", lab.url, "--out", str(lab.dir / "experiments" / study), *lab.off, *extra,
            f"lab_dir={lab.dir}"]


def load(lab, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=lab.url)


@pytest.fixture(scope="module")
def small(lab):
    """A finished study: grid:0.5 over docs and code (docs100, docs50 code50 = the base mixture, code100) x 2 seeds,
    with the shared tokenizer."""
    code, out = run(study_args(lab, "two.yaml", "small", "grid:0.5", "--seeds", "2", lab.tok), lab.dir)
    assert code == 0, out[-3000:]
    return lab.dir / "experiments" / "small"


def _means(trials, names) -> dict[tuple[float, ...], float]:
    """Mean objective per weight vector over a study's complete trials, straight from the storage."""
    by: dict[tuple[float, ...], list[float]] = {}
    for t in trials:
        if t.state.name == "COMPLETE":
            by.setdefault(tuple(round(t.params[f"weight.{n}"], 6) for n in names), []).append(t.value)
    return {w: float(np.mean(v)) for w, v in by.items()}


@pytest.mark.slow
def test_a_transfer_retrains_the_chosen_points_and_says_whether_the_ranking_holds(lab, small):
    import pandas as pd
    from scipy.stats import spearmanr

    from sparknet.ablate_sections import BEGIN, END, TRANSFER_ATTR, transfer_section

    argv = ["--transfer", "small", "--budget", "2x", "--storage", lab.url, "--out", str(small), *lab.off,
            f"lab_dir={lab.dir}"]
    code, out = run(argv, lab.dir)
    assert code == 0, out[-3000:]
    names = ("docs", "code")
    orig, tr = load(lab, "small"), load(lab, "small-transfer-2x")
    trials = tr.trials
    assert all(t.state.name == "COMPLETE" for t in trials)
    points = tr.user_attrs["sparknet.design"]["points"]
    # The best measured point (also best.yaml: 3 points support no fit), the base mixture 0.5/0.5 (a design point),
    # then points spread over the rest of the ranking (the default: 4 points at 2 seeds; the study has 3): every
    # point, each seed of each once, at 2 x 16,384 tokens.
    assert len(points) == 3 and out.count(" complete: val/loss") == len(trials) == 6
    assert sorted((t.params["point"], t.params["seed"]) for t in trials) == \
        [(p, s) for p in range(len(points)) for s in (1337, 1338)]
    assert all(sum(t.user_attrs["tokens_per_source"].values()) == 2 * PROXY for t in trials)
    small_means, large_means = _means(orig.trials, names), _means(trials, names)
    best = min(small_means, key=small_means.get)
    weights = [tuple(round(w, 6) for w in p[1]) for p in points]
    assert best in weights and (0.5, 0.5) in weights and tuple(orig.user_attrs["sparknet.best_weights"]) in weights
    assert (small / "transfer-2x" / "README.md").exists() and (small / "transfer-2x" / "points.yaml").exists()

    # The comparison, computed here from the two studies' stored values.
    both = [w for w in weights if w in small_means]
    a, b = [small_means[w] for w in both], [large_means[w] for w in both]
    rho = spearmanr(a, b).statistic
    # Its p-value by every pairing of the two budgets' means (3 points: 6 of them).
    null = [spearmanr(a, q).statistic for q in itertools.permutations(b)]
    p = float(np.mean([abs(r) >= abs(rho) - 1e-12 for r in null]))
    pairs = list(itertools.combinations(range(len(both)), 2))
    agree = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs)
    kept = orig.user_attrs[TRANSFER_ATTR]["small-transfer-2x"]
    assert kept["n"] == len(both) and kept["pairs"]["all"] == [agree, len(pairs)]
    assert kept["spearman"] == pytest.approx(rho) and kept["spearman_p"] == pytest.approx(p)
    assert sum(kept["pairs"][g][1] for g in ("separated", "noise", "unmeasured")) == len(pairs)

    readme = (small / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1 and "## Transfer" in readme
    assert transfer_section(orig.user_attrs) in readme  # the section a summary writer renders from the study
    assert f"over the {len(both)} points measured at both: {rho:+.2f} (scipy.stats.spearmanr; exact permutation " \
           f"p = {p:.2g})" in readme
    assert f"{agree} of {len(pairs)} pairs ({agree / len(pairs):.2f})" in readme
    assert re.search(r"Pairs whose 16,384-token difference is beyond seed noise .*: (no pairs|\d+ of \d+ pairs?)",
                     readme)
    csv = pd.read_csv(small / "transfer.csv")
    assert len(csv) == len(points) and set(csv["transfer"]) == {"small-transfer-2x"}
    for _, r in csv.iterrows():
        w = (round(r["weight.docs"], 6), round(r["weight.code"], 6))
        assert r["transfer_mean"] == pytest.approx(large_means[w])
        assert (r["proxy_mean"] == pytest.approx(small_means[w])) if w in small_means else pd.isna(r["proxy_mean"])
    assert csv["spearman"].tolist() == pytest.approx([rho] * len(csv))

    # A rerun trains nothing and replaces the section in place.
    before = len(trials)
    code, again = run(argv, lab.dir)
    assert code == 0, again[-3000:]
    assert " complete: " not in again and len(load(lab, "small-transfer-2x").trials) == before
    assert (small / "README.md").read_text() == readme and "Spearman" in again


def test_the_transfer_section_survives_a_rewritten_readme_and_is_replaced_not_appended():
    from sparknet.ablate_sections import BEGIN, END, with_section

    first = with_section("# Study\n\ntable\n", f"{BEGIN}\n## Transfer\nold\n{END}")
    assert first.count(BEGIN) == 1 and first.startswith("# Study\n\ntable\n\n")
    second = with_section(first + "\n![plot](x.png)\n", f"{BEGIN}\n## Transfer\nnew\n{END}")
    assert second.count(BEGIN) == 1 and "new" in second and "old" not in second and second.endswith("(x.png)\n")
    assert with_section("", f"{BEGIN}\nx\n{END}") == f"{BEGIN}\nx\n{END}\n"


@pytest.mark.slow
def test_one_more_source_reuses_exactly_the_points_that_apply_and_measures_the_added_source(lab, small):
    from sparknet.ablate_reuse import held_out_losses
    from sparknet.config import load_config
    from sparknet.locks import prepare_lock
    from sparknet.prepare import prepare

    tok = lab.tok
    code, out = run(study_args(lab, "tri.yaml", "new3", "grid:0.5", "--reuse", "small", tok), lab.dir)
    assert code == 0, out[-3000:]
    old, new = load(lab, "small"), load(lab, "new3")
    names = ("docs", "readmes", "code")
    # grid:0.5 over three sources: docs100, docs50 readmes50, docs50 code50, readmes100, readmes50 code50, code100.
    # Those with readmes at 0 are the old study's points, and its first seed (1337) is this study's only one; point 0
    # (docs100) is the new study's learning-curve run (evaluated along the way, so trained) where the study has one.
    from sparknet.ablation import Ablation

    curve = hasattr(Ablation, "curve_run")
    applies = {2, 5} | (set() if curve else {0})
    reused = {t.params["point"]: t for t in new.trials if "reused_from" in t.user_attrs}
    assert set(reused) == applies
    assert f"--reuse small: {len(applies)} of 6 runs reused from study small (readmes added, at weight 0 in the " \
           f"reused points); {6 - len(applies)} will train" in out
    assert out.count(" complete: val/loss") == 6 - len(applies)  # only the rest trained
    assert "--reuse small: measured val/readmes on the final models of" in out
    assert len(new.trials) == 6 and all(t.state.name == "COMPLETE" for t in new.trials)
    assert sorted(t.params["point"] for t in new.trials) == list(range(6))

    by_number = {t.number: t for t in old.trials}
    cfg = load_config(lab.dir / "tri.yaml", [f"lab_dir={lab.dir}", tok, f"mixture.total_tokens={PROXY}"])
    with prepare_lock(lab.dir):
        prepared = prepare(cfg, progress=False, write_report=False)
    for t in reused.values():
        src = by_number[t.user_attrs["reused_from"]["trial"]]
        assert t.user_attrs["reused_from"]["study"] == "small" and src.params["seed"] == 1337
        w_new = [t.params[f"weight.{n}"] for n in names]
        assert w_new[1] == 0 and [src.params["weight.docs"], src.params["weight.code"]] == [w_new[0], w_new[2]]
        val = t.user_attrs["val_loss"]
        assert {k: val[k] for k in ("docs", "code")} == src.user_attrs["val_loss"]  # the old run's own figures
        assert set(t.user_attrs["reused_measured"]) == {"readmes"} and val["readmes"] > 0
        assert t.value == pytest.approx(np.mean([val[n] for n in names]))  # the objective over the new sources
        assert t.user_attrs["tokens_per_source"]["readmes"] == 0 == t.user_attrs["planned_tokens"]["readmes"]
        # The measurement is a run's own: on the old sources it gives back what the old run recorded at its end.
        again = held_out_losses(Path(src.user_attrs["run_dir"]) / "final", cfg, prepared, ["docs", "code"])
        assert again == pytest.approx(src.user_attrs["val_loss"], abs=1e-5)
    # The data's own effect: models that never saw readmes predict it worse than those trained on half or all of it.
    seen = [t.user_attrs["val_loss"]["readmes"] for t in new.trials if t.params["weight.readmes"] > 0]
    unseen = [reused[p].user_attrs["val_loss"]["readmes"] for p in reused]
    assert min(unseen) > max(seen), (seen, unseen)
    assert (lab.dir / "experiments" / "new3" / "README.md").exists()
    # A rerun reuses (and trains) nothing more.
    code, again = run(study_args(lab, "tri.yaml", "new3", "grid:0.5", "--reuse", "small", tok), lab.dir)
    assert code == 0 and " complete: " not in again and len(load(lab, "new3").trials) == 6, again[-3000:]
    assert f"--reuse small: study new3 exists already, with {len(applies)} runs reused when it was created; nothing " \
           f"more is reused" in again


@pytest.mark.slow
def test_with_the_mixtures_own_bpe_nothing_is_reused_and_one_line_says_why(lab, small):
    # A study on the mixture's own BPE (created, not trained: --timeout stops it before its first run), then a study
    # with one more source, which trains another BPE: nothing of the first applies.
    code, out = run(study_args(lab, "two.yaml", "bpe2", "grid:0.5", "--timeout", "0.001s"), lab.dir)
    assert code == 0 and "timeout: stopping" in out, out[-3000:]
    code, out = run(study_args(lab, "tri.yaml", "bpe3", "grid:0.5", "--reuse", "bpe2", "--dry-run"), lab.dir)
    assert code == 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("--reuse")]
    assert lines == ["--reuse bpe2: nothing reusable: the tokenizer is a BPE trained on the mixture's sources "
                     "(tokenizer.name=bpe), so adding readmes trains another one and no run of bpe2 tokenized its "
                     "data as this study will (fix: tokenizer.name=gpt2, or a tokenizer both studies name, lets runs "
                     "be reused); all 6 runs will train"]


@pytest.mark.slow
def test_a_study_two_sources_away_is_a_one_line_error(lab, small, capsys):
    import optuna

    before = optuna.get_all_study_names(lab.url)
    argv = study_args(lab, "swap.yaml", "swap", "grid:0.5", "--reuse", "small", lab.tok)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --reuse small: its sources are docs, code, this "
                                                         "mixture's readmes, code: 2 sources changed "
                                                         "(readmes added; docs removed)"), err
    assert "fix:" in err and optuna.get_all_study_names(lab.url) == before
    assert not (lab.dir / "experiments" / "swap").exists()
