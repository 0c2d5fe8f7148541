"""Whether a proxy is big enough to answer (`sparknet.adequacy`), on generated text whose structure a count table
cannot hold: two local jsonl sources, each a second-order Markov chain over 32 letters (the previous letter narrows the
next to 4, the one before picks among them 90% of the time), tokenized byte by byte (a BPE of 257 tokens: no merges).
A bigram table gets ~1.8 nats/token; a model that learns the rule gets well under it: cpu-tiny does past ~50k tokens.

- A 4k-token leave-one-out ablation is flagged at the top of its README and in the terminal, with no effect sentences
  and no fit, the learning curve plotted, and best.yaml the best measured point with the caveat.
- `--proxy-tokens auto` picks a budget within a factor of two of the crossing a brute-force sweep of budgets finds
  (runs at 32k, 64k, 128k tokens, each with its own schedule); its study is not flagged and concludes; a rerun keeps
  the budget (no probe).
- A budget auto chose that some point's sources cannot supply (within max_repeats) is an error before it is stored.
- The power-law extrapolation recovers N on a synthetic curve, and says "not within 100x" when the curve flattens
  above the reference.
Bad inputs (a cap below one optimizer step, a negative margin, --auto-cap without auto) are rows of
tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import math
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from tinylab import tiny_mixture

from sparknet.ablate import main as ablate_main

LETTERS = "abcdefghijklmnopqrstuvwxyz012345"

# In-process runs on a busy 2-core machine: one torch thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def chain_documents(seed: int, chars: int, *, k: int = 4, p: float = 0.9, doc_chars: int = 400) -> list[str]:
    """Documents of a second-order Markov chain: after (a, b) comes successor[b][a mod k] with probability p, else a
    uniform letter."""
    rng = np.random.default_rng(seed)
    v = len(LETTERS)
    successor = np.array([rng.choice(v, k, replace=False) for _ in range(v)])
    docs = []
    for _ in range(-(-chars // doc_chars)):
        a, b = int(rng.integers(v)), int(rng.integers(v))
        out = [a, b]
        for _ in range(doc_chars - 2):
            c = int(successor[b][a % k]) if rng.random() < p else int(rng.integers(v))
            out.append(c)
            a, b = b, c
        docs.append("".join(LETTERS[i] for i in out))
    return docs


def write_lab(folder: Path, *, a_chars: int = 400_000, a_repeats: float = 4) -> Path:
    """Two chain sources (a, b: different successor tables) and a tiny recipe over them; returns the mixture file."""
    for name, seed, chars in (("a", 1, a_chars), ("b", 2, 400_000)):
        (folder / name).mkdir(parents=True)
        (folder / name / "part.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in chain_documents(seed, chars)))
    cfg = tiny_mixture(mixture={"sources": [{"name": n, "kind": "local", "path": str(folder / n), "weight": 0.5,
                                             "max_repeats": a_repeats if n == "a" else 4} for n in "ab"]},
                       tokenizer={"vocab_size": 257, "train_bytes_per_source": 100_000},
                       eval={"sample_prompts": ["a"]}, tracking={"enabled": False})
    cfg["lab_dir"] = str(folder / "lab")
    path = folder / "chain.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return write_lab(tmp_path_factory.mktemp("adequacy"))


def ablate(mix: Path, study: str, *extra: str) -> tuple[int, str]:
    out = StringIO()
    with redirect_stdout(out):
        code = ablate_main([str(mix), "--study", study, "--out", str(mix.parent / "experiments" / study),
                            "--objective", "val", *extra])
    return code, out.getvalue()


# ---------------------------------------------------------------------------------------------


def test_the_extrapolation_recovers_n_on_a_synthetic_curve_and_says_when_it_is_out_of_reach():
    from sparknet.adequacy import EXTRAPOLATE, Curve, crossing, fmt_tokens

    proxy = 1_000_000
    tokens = np.array([proxy * (i + 1) / 8 for i in range(8)])

    def loss(d):
        return 1.0 + 300 * d ** -0.35

    def ref(d):
        return 2.0 + 40 * d ** -0.25

    grid = np.geomspace(1e4, 1e10, 400_000)
    for scale, within in ((300, 0.05), (560, 0.2)):  # crossing at ~1.4x the proxy budget, and at ~20x
        truth = grid[np.argmax(ref(grid) - (1.0 + scale * grid ** -0.35) >= 0.05)]
        found, covered = [], 0
        for seed in range(20):  # measured with noise: the estimate is close, and its 90% interval covers the truth
            rng = np.random.default_rng(seed)
            curve = Curve(tokens, {"a": 1.0 + scale * tokens ** -0.35 + rng.normal(0, 0.004, 8)},
                          {"a": ref(tokens) + rng.normal(0, 0.002, 8)})
            e = crossing(curve, {"a": 0.05}, proxy, boot=100)
            found.append(e.tokens / truth)
            covered += e.low <= truth <= e.high
        assert abs(np.median(found) - 1) < within / 2 and max(abs(np.array(found) - 1)) < within, (truth, found)
        assert covered >= 14, covered
    e = crossing(curve, {"a": 0.05}, proxy, boot=100)
    assert e.method.startswith("loss: power law with a floor")
    assert e.text() == f"about {fmt_tokens(e.tokens)} tokens ({fmt_tokens(e.low)}..{fmt_tokens(e.high)})"

    # Four budgets or fewer: a pure power law (log-log linear), and it says so.
    short = Curve(tokens[-3:], {"a": curve.loss["a"][-3:]}, {"a": curve.ref["a"][-3:]})
    assert "log-log linear" in crossing(short, {"a": 0.05}, proxy, boot=20).method

    # A loss that flattens above the reference never crosses: not within 100x.
    flat = Curve(tokens, {"a": 2.3 + 300 * tokens ** -0.35}, {"a": ref(tokens)})
    e = crossing(flat, {"a": 0.05}, proxy, boot=20)
    assert e.tokens is None and e.text() == f"not within {EXTRAPOLATE}x this budget (100M tokens)"


def test_a_4k_token_proxy_is_flagged_and_concludes_nothing(lab, capsys):
    code, out = ablate(lab, "small", "--design", "leave-one-out", "--proxy-tokens", "4096")
    assert code == 0, out[-3000:]
    folder = lab.parent / "experiments" / "small"
    readme = (folder / "README.md").read_text()
    flag = "The proxies have not learned past a bigram table (by "
    assert readme.splitlines()[2].startswith(f"> **Not an answer about data.** {flag}"), readme[:600]
    assert "differences between points reflect optimization, not data; " in readme
    assert "raise --proxy-tokens" in readme.splitlines()[2]  # how far: about N, or not within 100x at this rate
    lines = out.splitlines()
    warned = next(i for i, line in enumerate(lines) if line.startswith("warning: "))
    assert lines[warned].startswith(f"warning: {flag}") and warned < lines.index(next(x for x in lines if "mixture" in x and "past bigram a" in x))
    # No effect sentences, no effects table, no fit, no predicted best: only the measured table.
    assert "Removing " not in readme and "## Fitted model" not in readme and "Predicted best" not in readme
    assert "## Which source helps which metric" not in readme and not (folder / "effects.csv").exists()
    assert "Removing " not in out and "fit: not fitted" in out
    assert "past bigram a" in readme and "past bigram b" in readme  # the column, per source (negative: not yet)
    assert (folder / "learning_curve.png").stat().st_size > 0 and "learning_curve.png" in readme
    best = (folder / "best.yaml").read_text().splitlines()
    assert any(line.startswith("# Caveat: the best measured point, not an answer:") for line in best[:5])
    import pandas as pd

    runs = pd.read_csv(folder / "results.csv")
    assert {"ref_unigram/a", "ref_bigram/b", "past_bigram/a"} <= set(runs.columns)
    assert (runs["past_bigram/a"] == runs["ref_bigram/a"] - runs["val/loss/a"]).all()
    assert (runs[[c for c in runs if c.startswith("past_bigram/")]] < 0.05).any(axis=None)


@pytest.mark.slow
def test_a_sweep_judges_its_baseline_and_best_and_auto_sizes_it(lab):
    """A sweep at 4k tokens says at the top of its README that its trials have not learned past a bigram table, and
    its best.yaml carries the caveat; the same sweep with --proxy-tokens auto probes the baseline once and concludes."""
    from sparknet.sweep import main as sweep_main

    space = lab.parent / "lr_space.yaml"
    space.write_text(yaml.safe_dump({"objective": "val", "eval_points": 2,
                                     "params": {"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
                                     "sampler": {"seed": 1, "n_startup_trials": 2},
                                     "pruner": {"n_startup_trials": 5, "n_warmup_steps": 1}}))

    def sweep(study: str, *extra: str) -> tuple[int, str, Path]:
        out, folder = StringIO(), lab.parent / "experiments" / study
        with redirect_stdout(out):
            code = sweep_main(["--mixture", str(lab), "--space", str(space), "--trials", "2", "--study", study,
                               "--out", str(folder), *extra])
        return code, out.getvalue(), folder

    code, out, folder = sweep("sweep-small", "--proxy-tokens", "4096")
    assert code == 0, out[-3000:]
    readme = (folder / "README.md").read_text()
    assert readme.splitlines()[2].startswith("> **Not an answer about hyperparameters.** The proxies have not "
                                             "learned past a bigram table (by "), readme[:600]
    assert "warning: The proxies have not learned past a bigram table" in out
    best = (folder / "best.yaml").read_text().splitlines()
    assert any(line.startswith("# Caveat: the best measured trial, not an answer:") for line in best[:6])

    code, out, folder = sweep("sweep-auto", "--proxy-tokens", "auto", "--auto-cap", "256k")
    assert code == 0, out[-3000:]
    readme = (folder / "README.md").read_text()
    assert "Not an answer" not in readme and "The budget was chosen by `--proxy-tokens auto`" in readme
    assert out.count("training the base point up to") == 1 and "adequacy: " in out

    # A time cap that ends the probe before the crossing: its tokens are the budget, and the study says it is short.
    code, out, folder = sweep("sweep-timed", "--proxy-tokens", "auto", "--auto-cap", "256k", "--auto-time", "1s")
    assert code == 0, out[-3000:]
    readme = (folder / "README.md").read_text()
    assert "before the time cap (--auto-time, 1 s) stopped it at" in readme, readme
    assert "> **Not an answer about hyperparameters.**" in readme


def _crossing_by_brute_force(lab: Path) -> int:
    """The smallest of 32k, 64k, 128k tokens at which a run of the base mixture (its own schedule) is past its bigram
    reference by the margin on both held-out slices."""
    from sparknet.adequacy import MARGIN
    from sparknet.config import load_config
    from sparknet.run import execute

    for budget in (32768, 65536, 131072):
        cfg = load_config(lab, [f"mixture.total_tokens={budget}", f"eval.every_tokens={budget}", f"name=brute{budget}"])
        r = execute(cfg, progress=False).result
        if all(r["val_ref_bigram"][s] - r["val_loss"][s] >= MARGIN for s in "ab"):
            return budget
    raise AssertionError("no budget up to 128k got past the bigram reference")


@pytest.mark.slow
def test_without_the_base_points_curve_the_readme_draws_the_auto_probes(tmp_path):
    """A base point that evaluated only at its end (or whose curve was lost) leaves the probe's curve, stored with the
    study's budget, to show how the budget was found: its losses and references, and where it crossed."""
    from sparknet.adequacy import Verdict, adequacy_section, plot_curve, probe_curve
    from sparknet.objective import Objective

    points = [{"tokens": t, "loss": {"a": 6.0 - t / 1e5, "b": 5.5 - t / 1e5}, "ref": {"a": 5.2, "b": 5.0}}
              for t in (20_000, 40_000, 60_000, 80_000)]
    auto = {"cap": 100_000, "margin": 0.05, "reads": ["a", "b"], "chosen": 90_112, "crossed": True,
            "crossed_at": 75_000, "stopped_at": 80_000, "every": 20_000, "seconds": 12.0, "curve": points}
    curve = probe_curve(auto)
    assert curve.label == "the probe" and list(curve.tokens) == [20_000, 40_000, 60_000, 80_000]
    assert list(curve.loss["b"]) == [5.3, 5.1, 4.9, 4.7] and list(curve.ref["a"]) == [5.2] * 4
    v = Verdict(Objective.parse("val", ("a", "b")), 0.05, 90_112, [])
    png = plot_curve(v, tmp_path / "learning_curve.png", "study", auto)
    assert png is not None and png.stat().st_size > 10_000
    text = adequacy_section(v, png, auto)
    assert "![learning curve of the --proxy-tokens auto probe](learning_curve.png)" in text
    assert "about 75,000 tokens" in text and "every run trains 90,112 tokens" in text
    # Nothing to draw: no base curve, and no probe (or one evaluation only).
    assert plot_curve(v, tmp_path / "none.png", "study") is None
    assert plot_curve(v, tmp_path / "none.png", "study", dict(auto, curve=points[:1])) is None


def test_auto_picks_about_the_crossing_and_a_resumed_study_keeps_it(lab):
    import optuna

    brute = _crossing_by_brute_force(lab)
    design = lab.parent / "two.yaml"  # both sources in every point: each held-out slice is in its points' training
    design.write_text(yaml.safe_dump({"points": [{"name": "even", "weights": {"a": 0.5, "b": 0.5}},
                                                 {"name": "more a", "weights": {"a": 0.7, "b": 0.3}}]}))
    argv = ["--design", str(design), "--proxy-tokens", "auto", "--auto-cap", "256k"]
    code, out = ablate(lab, "auto", *argv)
    assert code == 0, out[-3000:]
    study = optuna.load_study(study_name="auto", storage=f"sqlite:///{lab.parent / 'lab' / 'optuna.db'}")
    chosen = study.user_attrs["sparknet.proxy_tokens"]
    auto = study.user_attrs["sparknet.proxy_auto"]
    assert auto["crossed"] and auto["chosen"] == chosen and chosen % 512 == 0
    assert brute / 2 <= chosen <= brute * 2, (chosen, brute, auto["curve"])
    assert f"--proxy-tokens auto: {chosen:,} tokens for every run" in out
    readme = (lab.parent / "experiments" / "auto" / "README.md").read_text()
    assert "Not an answer" not in readme and "Every run is past its bigram reference by at least the margin" in readme
    assert "## What it says" in readme and "The best measured mixture is" in readme
    assert "The budget was chosen by `--proxy-tokens auto`" in readme
    # Proxies as long as the full run (the recipe's 131,072 tokens) are no proxies: the README says so.
    assert ("train longer than the full budget" in readme) == (chosen > 131_072), readme

    # Rerun: the study keeps the budget it chose, and nothing is probed again.
    code, out = ablate(lab, "auto", *argv)
    assert code == 0 and "probe" not in out.replace("not probing again", ""), out[-2000:]
    assert f"study auto has its budget stored, {chosen:,} tokens; using it, not probing again" in out
    assert optuna.load_study(study_name="auto", storage=f"sqlite:///{lab.parent / 'lab' / 'optuna.db'}"
                             ).user_attrs["sparknet.proxy_tokens"] == chosen


@pytest.mark.slow
def test_two_workers_started_at_once_probe_once_and_share_the_budget(tmp_path, subprocess_env):
    """The README's two-worker command: both start with --proxy-tokens auto on a new study; one probes, the other
    waits for the budget it stores (not an error), then both train the study's points, none twice."""
    import subprocess
    import sys

    import optuna

    mix = write_lab(tmp_path)
    design = tmp_path / "two.yaml"
    design.write_text(yaml.safe_dump({"points": [{"name": "even", "weights": {"a": 0.5, "b": 0.5}},
                                                 {"name": "more a", "weights": {"a": 0.7, "b": 0.3}}]}))
    cmd = [sys.executable, "-m", "sparknet.ablate", str(mix), "--study", "pair", "--objective", "val",
           "--out", str(tmp_path / "experiments" / "pair"), "--design", str(design), "--proxy-tokens", "auto",
           "--auto-cap", "256k"]
    env = dict(subprocess_env, OMP_NUM_THREADS="1")
    workers = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs[0][-2000:] + outs[1][-2000:]
    assert sorted(o.count("training the base point up to") for o in outs) == [0, 1], outs
    assert sum("is probing study pair's budget; waiting for it" in o for o in outs) == 1, outs
    study = optuna.load_study(study_name="pair", storage=f"sqlite:///{tmp_path / 'lab' / 'optuna.db'}")
    chosen = study.user_attrs["sparknet.proxy_tokens"]
    assert all(f"at a proxy budget of {chosen:,} tokens" in o for o in outs), outs
    trials = study.trials
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)


@pytest.mark.slow
def test_auto_stores_no_budget_that_a_point_cannot_train(tmp_path, capsys):
    """Source a holds ~28k training tokens and may repeat 1.5 times (~42k): the probe (the even base point, at most
    64k tokens, so at most 32k of a) can run, but the budget it chooses (~60k, or the cap) needs ~54k of a at the point
    that gives a 0.9. That is said before anything is stored, and a rerun would probe again rather than keep it."""
    import optuna

    mix = write_lab(tmp_path, a_chars=32_000, a_repeats=1.5)
    design = tmp_path / "lopsided.yaml"
    design.write_text(yaml.safe_dump({"points": [{"name": "even", "weights": {"a": 0.5, "b": 0.5}},
                                                 {"name": "mostly a", "weights": {"a": 0.9, "b": 0.1}}]}))
    code, out = ablate(mix, "short", "--design", str(design), "--proxy-tokens", "auto", "--auto-cap", "64k")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (out[-3000:], err)
    assert err.startswith("error: --proxy-tokens auto chose") and "mixture.sources.a:" in err and "max_repeats" in err
    assert "point 1 (mostly a" in err and "nothing was stored" in err, err
    storage = f"sqlite:///{tmp_path / 'lab' / 'optuna.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)] if (tmp_path / "lab" / "optuna.db").exists() else []
    assert "short" not in names or "sparknet.proxy_tokens" not in optuna.load_study(
        study_name="short", storage=storage).user_attrs


def test_the_verdict_reads_the_slices_its_objective_reads():
    from sparknet.adequacy import Curve, RunCheck, judge, run_pasts
    from sparknet.objective import Objective

    attrs = {"val_loss": {"a": 1.5, "b": 2.0}, "val_ref_bigram": {"a": 1.8, "b": 1.9},
             "wikitext_valid_bpb": 1.2, "wikitext_valid_ref_bigram_bpb": 1.3, "wikitext_valid_tokens_per_byte": 0.25}
    names = ["a", "b"]
    for text, adequate in (("val/a", True), ("val/b", False), ("val", False), ("wikitext-valid", True)):
        obj = Objective.parse(text, names)
        v = judge([RunCheck("base", True, run_pasts(attrs, obj, 0.05))], obj, 0.05, 4096)
        assert v.adequate is adequate, (text, v.headline())
    obj = Objective.parse("wikitext-valid", names)
    (p,) = run_pasts(attrs, obj, 0.05)
    assert p.margin == pytest.approx(0.05 / math.log(2) * 0.25) and p.unit == "bits/byte"
    v = judge([RunCheck("base", True, run_pasts(attrs, Objective.parse("val", names), 0.05))],
              Objective.parse("val", names), 0.05, 4096, enforced=False)
    assert not v.blocks and v.headline().startswith("Adequacy not enforced (--no-adequacy): the proxies have not")
    assert "by 0.100 nats at the base point, on val/b" in v.headline()
    none = judge([RunCheck("old", True, run_pasts({"val_loss": {"a": 1.0}}, obj, 0.05))], obj, 0.05, 4096)
    assert none.adequate is None and not none.blocks  # runs from before the references: said, not judged

    # WikiText-2 short of its margin: N from the held-out slices' mean curve, moved by WikiText-2's own gap.
    tokens = np.array([512.0 * (i + 1) for i in range(8)])
    curve = Curve(tokens, {s: 1.0 + 300 * tokens ** -0.35 for s in names}, {s: 2.0 + 40 * tokens ** -0.25 for s in names})
    final = {"val_loss": {s: float(curve.loss[s][-1]) for s in names},
             "val_ref_bigram": {s: float(curve.ref[s][-1]) for s in names}}
    short = dict(final, wikitext_valid_bpb=1.4, wikitext_valid_ref_bigram_bpb=1.3, wikitext_valid_tokens_per_byte=0.25)
    v = judge([RunCheck("base", True, run_pasts(short, obj, 0.05))], obj, 0.05, 4096, curve=curve)
    assert v.blocks and v.estimate is not None and v.estimate.series == "mean" and v.estimate.tokens > 4096
    assert "by 0.100 bits/byte at the base point, on wikitext-valid" in v.headline()
    assert any("WikiText-2 is scored only at the end" in line for line in v.details())
