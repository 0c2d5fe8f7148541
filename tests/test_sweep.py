"""Sweeps: a 4-trial study with MLflow parent/children and a best config that sparknet.run accepts (and that
best_overrides.yaml reproduces); a study that remembers its budget, objective, space and recipe; an interrupt that
leaves the trial resumable and a retry that continues the pruning steps; failures recorded, never left RUNNING; a
worker killed mid-trial and rerun; two workers on a real PostgreSQL with one summary and one --confirm; pruning;
the val/<source> and wikitext-valid objectives; clean errors for every bad space; Optuna through its public API only.

Every study writes its summary under the test's lab (`--out`, or the lab as the working directory), never into the
checkout; each test builds the studies it reads (the 4-trial study once per module, by the `four` fixture, which the
tests that read it only read), so the tests pass in any order."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from tinylab import kill_mid_study_then_rerun, write_wikitext_valid

from sparknet.config import ConfigError, load_config, to_dict
from sparknet.errors import SparknetError
from sparknet.sweep import main

ROOT = Path(__file__).resolve().parents[1]

SPACE = """
eval_points: 4
params:
  train.lr: {low: 1.0e-3, high: 1.0e-2, log: true}
  train.weight_decay: {low: 0.0, high: 0.2}
sampler: {seed: 7, n_startup_trials: 2}
pruner: {n_startup_trials: 2, n_warmup_steps: 1}
"""


# In-process runs on a busy 2-core machine: one torch thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_mixture):
    d = tmp_path_factory.mktemp("sweeplab")
    tiny_mixture(d)  # the tiny real-text recipe of tests/tinylab.py as it is: 8 sequences a step
    (d / "space.yaml").write_text(SPACE)
    return d


def args_for(lab: Path, study: str, *extra: str, trials: int = 4, storage: str | None = None,
             space: Path | None = None, out: bool = True) -> list[str]:
    """The sweep's command line; `out`: --out <lab>/experiments/<study> (else the default, under the cwd)."""
    return ["--mixture", str(lab / "tiny.yaml"), "--space", str(space or lab / "space.yaml"), "--trials", str(trials),
            "--proxy-tokens", "8192", "--study", study, "--storage", storage or f"sqlite:///{lab / 'optuna.db'}",
            *(["--out", str(lab / "experiments" / study)] if out else []), *extra, f"lab_dir={lab}"]


def storage_of(url: str):
    """The study storage as Optuna's public RDBStorage (what another worker would open)."""
    import optuna

    return optuna.storages.RDBStorage(url)


def load(lab: Path, study: str, url: str | None = None):
    import optuna

    return optuna.load_study(study_name=study, storage=url or f"sqlite:///{lab / 'optuna.db'}")


def trial_states(url: str, study: str) -> dict[str, int]:
    import optuna

    s = optuna.load_study(study_name=study, storage=url)
    out: dict[str, int] = {}
    for t in s.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@pytest.fixture(scope="module")
def four(lab):
    """The 4-trial study "four", built once for the tests that read it (none of them changes it): its printed output
    and its summary folder."""
    out = StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out):
        mp.chdir(lab)
        code = main(args_for(lab, "four"))
    assert code == 0, out.getvalue()[-2000:]
    return SimpleNamespace(out=out.getvalue(), folder=lab / "experiments" / "four", url=f"sqlite:///{lab / 'optuna.db'}")


def test_four_trial_sweep_records_everything_and_writes_a_runnable_best_config(lab, four, capsys):
    from mlflow.tracking import MlflowClient

    from sparknet.run import main as run_main
    from sparknet.sweep_space import overrides_args

    out = four.out
    study = load(lab, "four")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 == len(study.trials)
    assert study.trials[0].user_attrs["baseline"] and study.trials[0].params["train.lr"] == pytest.approx(3e-3)
    assert "baseline (trial 0)" in out and "best: trial" in out and out.count(f"wrote {four.folder}/") == 1
    for t in study.trials:  # every source's loss at every evaluation: the study can be re-read for any objective
        assert set(t.user_attrs["val_loss_by_eval"]) <= {"0", "1", "2"} and t.user_attrs["val_loss_by_eval"]
        for step, value in t.intermediate_values.items():
            losses = t.user_attrs["val_loss_by_eval"][str(step)]
            assert set(losses) == {"docs", "code"} and value == pytest.approx(sum(losses.values()) / 2)
        if t.state.name == "COMPLETE":
            assert t.value == pytest.approx(sum(t.user_attrs["val_loss"].values()) / 2)
    attrs = study.user_attrs  # what the study is, for later runs to compare against
    assert attrs["sparknet.proxy_tokens"] == 8192 and attrs["sparknet.objective"] == "val"
    assert attrs["sparknet.space"]["params"]["train.lr"] == {"low": 1e-3, "high": 1e-2, "log": True, "type": "float"}
    assert attrs["sparknet.recipe"]["train.lr"] == "0.003" and attrs["sparknet.model"]["preset"] == "cpu-tiny"
    assert attrs["sparknet.overrides"] == [f"lab_dir={lab}"] and len(attrs["sparknet.mixture_sha256"]) == 64

    client = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}")
    exp = client.get_experiment_by_name("four")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("sparknet.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    assert {r.data.tags["sparknet.trial"] for r in children} == {"0", "1", "2", "3"}
    assert all(r.data.params["mixture.total_tokens"] == "8192" for r in children)  # the proxy budget
    assert all("val/loss" in r.data.metrics for r in children if r.info.status == "FINISHED")
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"optimization_history.png", "trials.csv", "best.yaml", "best_overrides.yaml"} <= arts
    assert parent[0].data.metrics["best_value"] == pytest.approx(study.best_value)

    best = four.folder / "best.yaml"
    assert best.exists() and (four.folder / "README.md").exists()
    assert f"--out {four.folder}" in (four.folder / "README.md").read_text()  # the command that continues it
    assert run_main([str(best), "--dry-run"]) == 0  # sparknet.run accepts it as it is
    dry = capsys.readouterr().out
    assert "131,072 tokens" in dry  # the full budget, not the proxy
    cfg = load_config(best)
    assert cfg.train.lr == pytest.approx(study.best_params["train.lr"])
    assert cfg.train.min_lr == pytest.approx(0.1 * cfg.train.lr)  # the recipe's min/peak ratio is kept
    import yaml

    overrides = yaml.safe_load((four.folder / "best_overrides.yaml").read_text())
    assert to_dict(load_config(lab / "tiny.yaml", overrides_args(overrides))) == to_dict(cfg)


@pytest.mark.parametrize("space_params, params, min_lr", [
    ("train.lr: {low: 1.0e-3, high: 1.0e-2, log: true}", {"train.lr": 6e-3}, 6e-4),  # the recipe's ratio 0.1
    ("train.lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n  train.min_lr_ratio: {low: 0.01, high: 0.5}",
     {"train.lr": 6e-3, "train.min_lr_ratio": 0.25}, 1.5e-3),
    ("train.min_lr_ratio: {low: 0.01, high: 0.5}", {"train.min_lr_ratio": 0.05}, 1.5e-4),  # x the recipe's lr
])
def test_best_overrides_reproduce_best_yaml_with_real_config_keys_only(lab, tmp_path, monkeypatch, space_params,
                                                                        params, min_lr):
    import optuna
    import yaml

    from sparknet.sweep import Sweep
    from sparknet.sweep_space import load_space, overrides_args, suggest

    monkeypatch.chdir(tmp_path)
    space_file = tmp_path / "s.yaml"
    space_file.write_text(f"params:\n  {space_params}\n")
    base = [f"lab_dir={lab}", "model.n_embd=32"]  # the user's overrides are part of what best.yaml is
    space = load_space(space_file, lab / "tiny.yaml", base)
    sweep = Sweep(mixture=str(lab / "tiny.yaml"), space=space, base_overrides=base, n_trials=1, proxy_tokens=8192,
                  study_name="bo", storage_url="sqlite://", out_dir=tmp_path / "bo")
    study = optuna.create_study(study_name="bo")  # in memory: the summary needs only the trials
    study.enqueue_trial(params)  # as if the sampler had drawn them
    trial = study.ask()
    suggest(trial, space)
    study.tell(trial, 4.2)
    sweep.summarize(study)
    written = yaml.safe_load((tmp_path / "bo" / "best_overrides.yaml").read_text())
    assert "train.min_lr_ratio" not in written and written["train.min_lr"] == pytest.approx(min_lr, rel=1e-12)
    assert written["model.n_embd"] == 32 and written["lab_dir"] == str(lab)
    best = load_config(tmp_path / "bo" / "best.yaml")
    assert best.train.min_lr == pytest.approx(min_lr, rel=1e-12) and best.model.n_embd == 32
    assert to_dict(load_config(lab / "tiny.yaml", overrides_args(written))) == to_dict(best)


def test_rerunning_a_finished_study_adds_no_trials_and_rewrites_nothing(lab, four, monkeypatch, capsys):
    monkeypatch.chdir(lab)
    readme = four.folder / "README.md"
    before, text = trial_states(f"sqlite:///{lab / 'optuna.db'}", "four"), readme.read_text()
    mtime = readme.stat().st_mtime_ns
    overrides = load(lab, "four").user_attrs["sparknet.overrides"]
    try:
        assert main(args_for(lab, "four", "train.log_every_steps=5")) == 0  # an operational override: the same study
    finally:  # the rerun records its overrides on the study: leave the shared study as the fixture made it
        load(lab, "four").set_user_attr("sparknet.overrides", overrides)
    assert trial_states(f"sqlite:///{lab / 'optuna.db'}", "four") == before
    assert readme.stat().st_mtime_ns == mtime and readme.read_text() == text
    assert f"summary in {four.folder}/ was written by" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (["--proxy-tokens", "4096"], "its proxy budget is 8,192 tokens, this command asks for 4,096 (--proxy-tokens)"),
    (["train.beta2=0.9"], "its recipe has train.beta2=0.95, this command gives train.beta2=0.9"),
    (["model.preset=cpu-small"], "its recipe has model.preset=cpu-tiny, this command gives model.preset=cpu-small"),
    (["--objective", "val/docs"], "it minimizes val, this command asks for val/docs (--objective)"),
    (["SPACE"], "its space has train.lr: {\"high\": 0.01, \"log\": true, \"low\": 0.001, \"type\": \"float\"}, "
                "this space has {\"high\": 0.02"),
])
@pytest.mark.slow
def test_a_study_remembers_what_it_is(lab, four, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(lab)
    url = four.url
    readme = four.folder / "README.md"
    before, text = trial_states(url, "four"), readme.read_text()
    space = None
    if change == ["SPACE"]:
        space, change = tmp_path / "wider.yaml", []
        space.write_text(SPACE.replace("high: 1.0e-2", "high: 2.0e-2"))
    assert main(args_for(lab, "four", *change, space=space)) == 2  # a later --proxy-tokens wins
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --study four: ") and message in err, err
    assert "--study NAME" in err  # the fix
    assert trial_states(url, "four") == before and readme.read_text() == text  # nothing trained, nothing rewritten


@pytest.mark.slow
def test_an_interrupt_leaves_the_trial_resumable_and_its_retry_continues_the_pruning_steps(lab, monkeypatch, capsys):
    """SIGTERM at the second evaluation of trial 1: the trial is failed with the reason and queued again; the rerun
    resumes its checkpoint (2,048 tokens) and reports evaluations 1 and 2, not 0 and 1. The objective is one
    source's loss (val/code), the value the pruner sees at every step too."""
    import sparknet.run

    monkeypatch.chdir(lab)
    real = sparknet.run.execute
    evals = []

    def execute(cfg, **kw):
        on_eval = kw["on_eval"]

        def hooked(tokens, val):
            evals.append((cfg.name, tokens))
            if cfg.name.endswith("-t1") and tokens == 4096 and len([e for e in evals if e[0] == cfg.name]) == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, through the sweep's handler
            on_eval(tokens, val)

        return real(cfg, **dict(kw, on_eval=hooked))

    monkeypatch.setattr(sparknet.run, "execute", execute)
    argv = args_for(lab, "sig", "--objective", "val/code", "train.checkpoint_every_tokens=2048", trials=2)
    assert main(argv) == 130
    study = load(lab, "sig")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "WAITING"]  # never RUNNING; queued again
    failed, queued = study.trials[1], study.trials[2]
    assert failed.user_attrs["reason"].startswith("interrupted by SIGTERM while training")
    assert list(failed.intermediate_values) == [0]
    assert queued.params == failed.params and queued.system_attrs["failed_trial"] == 1
    # An interrupt is not a stale-heartbeat retry: Optuna's retry budget (max_retry) is left whole.
    assert queued.system_attrs["interrupt_history"] == [1] and "retry_history" not in queued.system_attrs

    monkeypatch.setattr(sparknet.run, "execute", real)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(retry of trial 1)" in out and "resuming from step-00000004: 2,048 of 8,192 tokens done" in out
    study = load(lab, "sig")
    retry = study.trials[2]
    assert retry.state.name == "COMPLETE" and retry.params == failed.params
    assert sorted(retry.intermediate_values) == [1, 2]  # 4,096 and 6,144 tokens: the same points as trial 0
    assert sorted(study.trials[0].intermediate_values) == [0, 1, 2]
    assert Path(retry.user_attrs["run_dir"]).name.startswith("sig-t1-")  # the original's run folder, continued
    for t in (study.trials[0], retry):  # the objective is the code source's loss, at every step and at the end
        assert t.value == pytest.approx(t.user_attrs["val_loss"]["code"])
        for step, value in t.intermediate_values.items():
            assert value == pytest.approx(t.user_attrs["val_loss_by_eval"][str(step)]["code"])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the sweep's handler is gone again


@pytest.mark.slow
def test_failed_trials_are_recorded_with_their_reason_and_never_retried(lab, monkeypatch, capsys):
    import sparknet.run
    from sparknet.sweep import Sweep

    monkeypatch.chdir(lab)
    argv = args_for(lab, "fails", trials=2)
    real_config, real_execute = Sweep.trial_config, sparknet.run.execute

    def trial_config(self, params, origin):
        if origin == 1:  # parameters the config rejects: failed, and the worker goes on
            raise ConfigError("space.yaml", "train.lr", "rejected for the test")
        return real_config(self, params, origin)

    def execute(cfg, **kw):
        if cfg.name.endswith("-t2"):
            raise SparknetError("the disk is full (fix: free some space)")
        return real_execute(cfg, **kw)

    monkeypatch.setattr(Sweep, "trial_config", trial_config)
    monkeypatch.setattr(sparknet.run, "execute", execute)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trial 2 failed while training (recorded as failed, not retried)" in err

    def boom(cfg, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(sparknet.run, "execute", boom)  # a bug: its traceback, but the trial is not left RUNNING
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)
    monkeypatch.setattr(sparknet.run, "execute", real_execute)
    monkeypatch.setattr(Sweep, "trial_config", real_config)
    assert main(argv) == 0
    trials = load(lab, "fails").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "FAIL", "COMPLETE"]
    assert trials[1].user_attrs["reason"].startswith("building its config: space.yaml: train.lr: rejected")
    assert trials[2].user_attrs["reason"] == "training: the disk is full (fix: free some space)"
    assert trials[3].user_attrs["reason"] == "training: RuntimeError: boom"
    assert all("failed_trial" not in t.system_attrs for t in trials)  # a failure is never retried


@pytest.mark.slow
def test_a_trial_failed_as_stale_while_it_trains_is_not_trained_twice_and_its_result_is_kept(lab, monkeypatch,
                                                                                               capsys):
    """A worker stopped (SIGSTOP, a suspended laptop) past the grace period: another worker fails its trial as stale
    and Optuna queues a retry. The retry must not train into the same run folder while the original lives (the run
    folder's lock), the original's result is kept (as a complete copy: a failed trial cannot become complete), and
    the retry, taken after the original finished, is a duplicate and is not run."""
    import optuna

    import sparknet.run
    from sparknet.locks import RunBusy

    real = sparknet.run.execute
    seen = []

    def execute(cfg, **kw):
        on_eval = kw["on_eval"]

        def hooked(tokens, val):
            if cfg.name.endswith("-t0") and not seen:
                seen.append(tokens)
                # What another worker does when this one's heartbeat went stale: fail it, queue the retry.
                study = load(lab, "stale")
                (running,) = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                storage = storage_of(f"sqlite:///{lab / 'optuna.db'}")
                trial_id = storage.get_trial_id_from_study_id_trial_number(
                    storage.get_study_id_from_name("stale"), running.number)
                storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, storage.get_trial(trial_id))
                # ... and the retry, started meanwhile, finds the run folder in use.
                with pytest.raises(RunBusy, match=r"in use by pid \d+ on .*training this config"):
                    real(cfg, progress=False)
            on_eval(tokens, val)

        return real(cfg, **dict(kw, on_eval=hooked))

    monkeypatch.setattr(sparknet.run, "execute", execute)
    assert main(args_for(lab, "stale", trials=2)) == 0
    out = capsys.readouterr().out
    assert "trial 0: failed as stale by another worker while still training here" in out
    assert "trial 0 was failed as stale by another worker while it trained here: its result is recorded as trial 2" \
        in out
    trials = load(lab, "stale").trials
    assert [t.state.name for t in trials[:3]] == ["FAIL", "FAIL", "COMPLETE"]
    original, retry, copy = trials[:3]
    assert copy.params == original.params and copy.system_attrs["completed_for"] == 0
    assert copy.value == pytest.approx(copy.user_attrs["val_loss"]["docs"] * 0.5
                                       + copy.user_attrs["val_loss"]["code"] * 0.5)
    assert Path(copy.user_attrs["run_dir"]).name.startswith("stale-t0-")
    assert retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["reason"] == "a duplicate, not run: the run of trial 0 finished, recorded as trial 2"
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2  # the study still ends with the trials it asked for
    assert len(list((lab / "runs").glob("stale-t0-*"))) == 1


@pytest.mark.slow
def test_worker_killed_mid_trial_then_rerun_ends_with_the_requested_trials(lab, subprocess_env):
    url = f"sqlite:///{lab / 'killed.db'}"
    cmd = [sys.executable, "-m", "sparknet.sweep", *args_for(lab, "killed", "--heartbeat", "1", trials=2,
                                                               storage=url)]
    done = kill_mid_study_then_rerun(cmd, subprocess_env, lab, lab / "killed.db")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    states = trial_states(url, "killed")
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 2
    assert states.get("FAIL") == 1 and "RUNNING" not in states  # the killed trial, failed by its heartbeat
    import optuna
    retried = [t for t in optuna.load_study(study_name="killed", storage=url).trials
               if "failed_trial" in t.system_attrs]
    assert len(retried) == 1 and retried[0].state.name in ("COMPLETE", "PRUNED")  # same params, rerun


@pytest.mark.slow
def test_a_trial_left_running_without_any_heartbeat_is_failed_and_retried(lab, monkeypatch, capsys):
    """A worker killed between taking a trial and its first heartbeat (Optuna never fails a RUNNING trial that has
    no heartbeat at all): the next run gives it one beat under the lock, so it goes stale and is retried."""
    monkeypatch.chdir(lab)
    url = f"sqlite:///{lab / 'orphan.db'}"
    assert main(args_for(lab, "orphan", trials=1, storage=url)) == 0
    orphan = load(lab, "orphan", url).ask()  # RUNNING, no heartbeat: what the dead worker left
    assert main(args_for(lab, "orphan", "--heartbeat", "1", trials=2, storage=url)) == 0
    trials = load(lab, "orphan", url).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].system_attrs["failed_trial"] == orphan.number == 1  # (it had drawn no parameters yet)


@pytest.mark.slow
def test_pruning_stops_a_deliberately_bad_space(lab, monkeypatch):
    """The mixture's lr is 1e-6 for this study and the space searches below it: every later trial learns less than
    the baseline by its first evaluation, and the median pruner (which compares completed trials only) stops each
    there, at step 0."""
    bad = lab / "bad_space.yaml"
    bad.write_text(SPACE.replace("low: 1.0e-3, high: 1.0e-2", "low: 1.0e-7, high: 1.0e-6")
                   .replace("n_startup_trials: 2, n_warmup_steps: 1", "n_startup_trials: 1, n_warmup_steps: 0"))
    monkeypatch.chdir(lab)  # no --out: the summary goes to experiments/bad/ under the working directory
    assert main(args_for(lab, "bad", "train.lr=1.0e-6", "train.min_lr=1.0e-7", space=bad, out=False)) == 0
    assert (lab / "experiments" / "bad" / "best.yaml").exists()
    trials = load(lab, "bad").trials
    assert trials[0].state.name == "COMPLETE" and trials[0].params["train.lr"] == pytest.approx(1e-6)
    pruned = trials[1:]
    assert len(pruned) == 3 and all(t.state.name == "PRUNED" for t in pruned)
    assert all("worse than the median" in t.user_attrs["reason"] for t in pruned)
    assert all(list(t.intermediate_values) == [0] and t.params["train.lr"] < 1e-6 for t in pruned)


@pytest.mark.slow
def test_wikitext_valid_objective_scores_the_validation_split_in_bits_per_byte(lab, tmp_path, monkeypatch):
    import torch
    import torch.nn.functional as F
    from mlflow.tracking import MlflowClient

    from sparknet.evaluate import load_wikitext
    from sparknet.model import load_exported
    from sparknet.prepare import resolve_tokenizer

    monkeypatch.chdir(lab)
    monkeypatch.delenv("SPARKNET_WIKITEXT", raising=False)
    wiki = write_wikitext_valid(tmp_path / "wikitext")
    (wiki / "wiki.test.raw").write_text("not\na\nwikitext\nfile\n")  # never read: scoring it would fail
    argv = args_for(lab, "wiki", "--objective", "wikitext-valid", f"eval.wikitext_path={wiki}", trials=2)
    assert main(argv) == 0
    study = load(lab, "wiki")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and study.user_attrs["sparknet.objective"] == "wikitext-valid"
    assert study.user_attrs["sparknet.objective_data"]["rows"] == len(load_wikitext("validation", wiki))

    # Bits per byte recomputed by hand from the final model: windows of the context, each token after a window's
    # first one scored once; mean NLL / ln 2 x tokens of the text / its UTF-8 bytes.
    cfg = load_config(lab / "tiny.yaml", [f"lab_dir={lab}"])
    tok = resolve_tokenizer(cfg, 1)
    text = "\n\n".join(load_wikitext("validation", wiki))
    ids = tok.encode_batch([text])[0]
    for t in done:
        model = load_exported(Path(t.user_attrs["run_dir"]) / "final", cfg.model).eval()
        ctx = model.shape.n_positions
        nll, count = 0.0, 0
        with torch.no_grad():
            for begin in range(0, len(ids), ctx):
                window = torch.tensor([ids[begin:begin + ctx]])
                if window.shape[1] < 2:
                    continue
                logits = model(window)[0, :-1, :tok.vocab_size].double()
                nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
                count += window.shape[1] - 1
        bpb = nll / count / math.log(2) * len(ids) / len(text.encode("utf-8"))
        assert t.value == pytest.approx(bpb, rel=1e-4) and t.user_attrs["wikitext_valid_bpb"] == t.value
        assert 0.5 < t.value < 10  # bits per byte of a barely trained model, not nats per token
        # Pruning used the mean held-out loss (each evaluation), the final value is bits per byte.
        for step, value in t.intermediate_values.items():
            assert value == pytest.approx(sum(t.user_attrs["val_loss_by_eval"][str(step)].values()) / 2)
    client = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}")
    run = client.get_run(done[0].user_attrs["mlflow_run_id"])
    assert run.data.metrics["wikitext-valid/bpb"] == pytest.approx(done[0].value)
    assert run.data.tags["sparknet.tuned_on"] == "wikitext-2-validation"
    readme = (lab / "experiments" / "wiki" / "README.md").read_text()
    assert "minimizing wikitext-valid/bpb (bits/byte; pruned on val/loss" in readme and "tuned on" in readme
    assert "tuned" in (lab / "experiments" / "wiki" / "best.yaml").read_text().splitlines()[2]


@pytest.mark.parametrize("setting, message", [
    ("eval.wikitext_path=EMPTY", "no WikiText-2 validation file in it"),
    ("", "WikiText-2 is not reachable offline"),
])
def test_wikitext_valid_without_the_data_fails_before_any_trial(lab, tmp_path, monkeypatch, capsys, setting,
                                                                message):
    monkeypatch.delenv("SPARKNET_WIKITEXT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    extra = [setting.replace("EMPTY", str(tmp_path / "empty"))] if setting else []
    argv = args_for(lab, "nowiki", "--objective", "wikitext-valid", *extra, storage=f"sqlite:///{tmp_path / 'n.db'}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "n.db").exists()  # nothing started


def _pg_binaries() -> bool:
    return bool(shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))


@pytest.fixture(scope="module")
def postgres(subprocess_env):
    """A real PostgreSQL server on 127.0.0.1 (lab/postgres.sh), for this module only."""
    if not _pg_binaries():
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs them: apt-get install postgresql)")
    data = tempfile.mkdtemp(prefix="sparknet-pg-")  # under /tmp: the postgres user must reach it when we are root
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(subprocess_env, PGDATA=data, PORT=str(port))
    started = subprocess.run(["bash", str(ROOT / "lab" / "postgres.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stderr
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run(["bash", str(ROOT / "lab" / "postgres.sh"), "stop"], env=env, capture_output=True, timeout=60)
    shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql_and_one_of_them_concludes(lab, postgres, subprocess_env):
    import optuna
    from mlflow.tracking import MlflowClient

    url = postgres
    assert url.startswith("postgresql://") and "127.0.0.1" in url
    # A 16k-token full budget, so that --confirm (the best config at the full budget) takes seconds.
    cmd = [sys.executable, "-m", "sparknet.sweep", *args_for(lab, "pg", "--confirm", "mixture.total_tokens=16384",
                                                               trials=3, storage=url)]
    workers = [subprocess.Popen(cmd, env=subprocess_env, cwd=lab, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs[0][-2000:] + outs[1][-2000:]
    trials = optuna.load_study(study_name="pg", storage=url).trials
    assert len(trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)  # none lost, no extra
    assert sorted(t.number for t in trials) == list(range(3))
    params = {tuple(sorted(t.params.items())) for t in trials}
    assert len(params) == 3  # no trial duplicated across workers
    ran = [o.count(" complete: val/loss") + o.count(" pruned: ") for o in outs]
    assert sum(ran) == 3 and min(ran) >= 1, ran  # both workers did work, 3 trials in all
    # The end happens once: one worker writes the summary and trains the confirmation, the other says so.
    assert sorted(o.count(f"wrote {lab / 'experiments' / 'pg'}/") for o in outs) == [0, 1], outs
    assert sorted(o.count("confirming trial") for o in outs) == [0, 1], outs
    client = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pg").experiment_id])
    confirm = [r for r in runs if r.data.tags.get("sparknet.confirm") == "true"]
    assert len(confirm) == 1 and confirm[0].info.status == "FINISHED"
    assert confirm[0].data.params["mixture.total_tokens"] == "16384"
    assert len([r for r in runs if r.data.tags.get("sparknet.kind") == "sweep"]) == 1


@pytest.mark.parametrize("space, message", [
    ("params: {train.lr: {low: 1.0e-2, high: 1.0e-3}}", "params.train.lr: low 0.01 must be below high 0.001"),
    ("params: {train.lr: {low: 0, high: 1.0e-3, log: true}}", "params.train.lr: a log range needs low > 0"),
    ("params: {train.lrr: {low: 1.0e-4, high: 1.0e-3}}", "params.train.lrr: value 0.0001 is rejected"),
    ("params: {train.warmup_fraction: {low: 0.5, high: 1.5}}", "params.train.warmup_fraction: value 1.5 is rejected"),
    ("paramz: {}", "paramz: unknown key"),
    ("params: {train.lr: [1, 2]}", "params.train.lr: must be a mapping"),
    ("eval_points: 0\nparams: {train.lr: {low: 1.0e-4, high: 1.0e-3}}", "eval_points: must be an integer"),
    ("params: {train.lr: {low: 1.0e-4, high: 1.0e-3}\n", "invalid YAML"),
    ("params:\n  train.lr: {low: 1.0e-3, high: 1.0e-2}\n  train.lr: {low: 1.0e-3, high: 2.0e-2}",
     "duplicate key 'train.lr'"),
    # Every choice is checked, not only the first.
    ("params: {train.weight_decay: {choices: [0.1, -1.0]}}", "params.train.weight_decay: value -1.0 is rejected"),
    ("params: {train.batch_tokens: {choices: [512, 768]}}", "params.train.batch_tokens: value 768 is rejected"),
    ("params: {model.n_layer: {low: 1.5, high: 4, type: int}}", "type int needs whole-number bounds"),
    ("params: {model.n_layer: {low: 1, high: 4}}", "is a whole number in the config, but this range would draw"),
    ("params: {train.schedule: {low: 0, high: 1}}", "is not a number in the config"),
    ("params: {train.lr: {low: 1.0e-3, high: 1.0e-2, log: \"false\"}}", "log must be true or false, got 'false'"),
    ("params: {train.lr: {low: 1.0e-3, high: 1.0e-2, step: 1.0e-3}}", "unknown field 'step'"),
    ("params: {train.lr: {choices: [1.0e-3, 3.0e-3], low: 1.0e-3}}", "choices cannot be combined with low"),
    ("params: {train.lr: {choices: [3.0e-3]}}", "at least two values"),
    # The baseline (trial 0, the mixture's own values) must be inside what is searched.
    ("params: {train.lr: {low: 1.0e-4, high: 1.0e-3}}",
     "params.train.lr: the mixture's own value 0.003 (trial 0, the baseline) is outside [0.0001, 0.001]"),
    ("params: {train.batch_tokens: {choices: [1024, 2048]}}",
     "the mixture's own value 512 (trial 0, the baseline) is not among the choices [1024, 2048] (fix: add 512"),
    ("params: {model.n_layer: {low: 3, high: 4, type: int}}", "the mixture's own value 2 (trial 0, the baseline)"),
    # Not the recipe, or not the space's to set.
    ("params: {train.micro_batch_size: {choices: [4, 8]}}", "does not change what is trained"),
    ("params: {train.grad_accum_steps: {choices: [1, 2]}}", "is derived now"),
    ("params: {mixture.total_tokens: {low: 4096, high: 8192, type: int}}", "is the proxy budget of every trial"),
    ("params:\n  train.lr: {low: 1.0e-3, high: 1.0e-2}\n  train.min_lr: {low: 1.0e-5, high: 1.0e-4}",
     "search train.min_lr_ratio"),
    ("objective: val/nope\nparams: {train.lr: {low: 1.0e-3, high: 1.0e-2}}",
     "objective: objective 'val/nope': the mixture has no source 'nope' (fix: use val, val/<source> (docs, code)"),
])
def test_bad_space_files_fail_before_any_trial(lab, tmp_path, capsys, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(space)
    argv = args_for(lab, "never", storage=f"sqlite:///{tmp_path / 'never.db'}", space=path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert not (tmp_path / "never.db").exists()  # nothing started


@pytest.mark.parametrize("objective, message", [
    ("val/nope", "--objective: objective 'val/nope': the mixture has no source 'nope'"),
    ("wikitext-test", "--objective: objective 'wikitext-test': unknown (fix: use val, val/<source> (docs, code), "
                      "wikitext-valid, downstream or downstream/<task>)"),
])
def test_bad_objectives_fail_before_any_trial(lab, tmp_path, capsys, objective, message):
    argv = args_for(lab, "never", "--objective", objective, storage=f"sqlite:///{tmp_path / 'never.db'}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "never.db").exists()


def test_a_held_out_slice_too_short_for_the_objective_fails_before_any_trial(lab, tmp_path, capsys):
    """The stores are prepared once before the study starts, and val/code needs a window of code's slice."""
    argv = args_for(lab, "short", "--objective", "val/code", "eval.val_tokens=16",
                    storage=f"sqlite:///{tmp_path / 'never.db'}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--objective: objective val/code: source 'code' has" in err and "(eval.val_tokens 16)" in err
    assert not (tmp_path / "never.db").exists()


def test_unreachable_storage_is_a_clear_error(lab, capsys):
    assert main(args_for(lab, "x", storage="postgresql://nobody@127.0.0.1:9/optuna")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot open the Optuna storage" in err and "lab/postgres.sh" in err


def test_the_studies_use_optunas_public_api_only():
    """No private Optuna attribute (study._storage, trial._trial_id, study._study_id, ...) and no SQL on Optuna's own
    tables in the study modules: what they need goes through Study, Trial, FrozenTrial and RDBStorage's public
    methods (see sparknet/study_storage.py), so an Optuna upgrade that keeps its API keeps the studies working."""
    import re

    private = re.compile(r"\.(_storage|_trial_id|_study_id|_cached_frozen_trial|_get_stale_trial_ids)\b"
                         r"|\b(trial_heartbeats|trial_values|FROM trials)\b")
    for name in ("study.py", "study_storage.py", "study_worker.py", "sweep.py", "sweep_space.py", "ablate.py",
                 "ablate_report.py"):
        text = (ROOT / "sparknet" / name).read_text()
        assert not private.search(text), f"sparknet/{name}: {private.search(text).group(0)}"


def test_a_trial_without_a_heartbeat_of_its_own_gets_one(tmp_path):
    """Optuna never fails a RUNNING trial that has no heartbeat, and has no public way to ask whether one has: a
    worker marks its trial's first beat (a system attr holding the trial's own number), and the next worker gives one
    beat to every RUNNING trial without its own mark. A retry carries the original's mark (Optuna copies the system
    attrs), which is not its own."""
    import optuna

    from sparknet.study_storage import FIRST_BEAT, TrialIds, first_beat, open_storage, rescue_unbeaten

    storage = open_storage(f"sqlite:///{tmp_path / 'beats.db'}", 60)
    study = optuna.create_study(study_name="beats", storage=storage)
    ids = TrialIds(storage, study)
    beating = study.ask()
    first_beat(ids, beating.number)
    study.ask()  # taken, never beaten: its worker died in between
    storage.set_trial_state_values(ids(beating.number), optuna.trial.TrialState.FAIL)  # stale, as fail_stale_trials
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, storage.get_trial(ids(beating.number)))
    retry = study.ask()
    assert storage.get_trial(ids(retry.number)).system_attrs[FIRST_BEAT] == beating.number  # the original's mark
    rescue_unbeaten(study, ids)
    assert {t.number: t.system_attrs.get(FIRST_BEAT) for t in study.trials} == {0: 0, 1: 1, 2: 2}
