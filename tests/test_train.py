"""Training end to end on real text with a tiny model: it learns, spends exactly the budget, resumes
exactly after SIGKILL, stops on divergence, runs as 2 gloo processes, and records itself in MLflow."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from tinylab import MlflowServer, kill_tree

from sparknet.config import TrainConfig, load_config
from sparknet.run import execute, main, run_dir_for
from sparknet.train import Diverged, lr_at

ROOT = Path(__file__).resolve().parents[1]

# The tiny real-text recipe (tests/tinylab.py): two domains, a 512-token BPE and a ~130k-parameter model: ~100k
# tokens train in seconds. Here 2 x 8 sequences a step, logged every step, evaluated every 49,152 tokens.
TRAIN = {"batch_tokens": 1024, "warmup_fraction": 0.05, "log_every_steps": 1}
EVAL = {"every_tokens": 49152, "sample_tokens": 8, "sample_prompts": ["The", "In 1990"]}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_mixture):
    d = tmp_path_factory.mktemp("lab")
    tiny_mixture(d, train=TRAIN, eval=EVAL)
    return d


def cfg_for(lab: Path, *overrides: str):
    return load_config(lab / "tiny.yaml", [f"lab_dir={lab}", *overrides])


@pytest.fixture(scope="module")
def finished(lab):
    """One uninterrupted reference run, shared by several tests."""
    torch.set_num_threads(1)
    cfg = cfg_for(lab)
    out = execute(cfg, progress=False)
    return cfg, out


def test_tiny_model_learns_real_text_and_trains_exactly_the_budget(finished):
    from sparknet.model import build_model
    from sparknet.prepare import prepare
    from sparknet.train import source_val_loss

    cfg, out = finished
    r = out.result
    prepared = prepare(cfg, progress=False, write_report=False)
    assert r["tokens"] == 131072
    assert r["tokens_per_source"] == dict(zip(prepared.plan.source_names, prepared.plan.tokens_per_source().tolist()))
    assert sum(r["tokens_per_source"].values()) == 131072
    # The untrained model's held-out loss is about ln(512) = 6.24; after 100k tokens it must be far below.
    untrained = build_model(cfg.model, prepared.tokenizer.vocab_size, cfg.train.seed)
    start = source_val_loss(untrained, prepared, 64, 2048, 16, torch.device("cpu"), nullcontext)
    for name, loss in r["val_loss"].items():
        assert start[name] > 6.0
        assert loss < start[name] - 1.0, (name, start[name], loss)
    assert len(r["samples"]) == 2 and r["samples"][0].startswith("The")


def test_rerunning_a_finished_run_does_nothing(finished, lab, capsys):
    cfg, out = finished
    again = execute(cfg, progress=False)
    assert again.already_done and again.result == out.result
    printed = capsys.readouterr().out
    assert "already finished" in printed and "other settings" not in printed
    # Other eval settings find the same finished run (eval is not part of its identity): said, not silently returned.
    other = cfg_for(lab, "eval.wikitext=[hf-strided-64]", "eval.val_tokens=1024")
    assert run_dir_for(other) == out.run_dir
    again = execute(other, progress=False)
    assert again.already_done and again.result == out.result
    note = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert len(note) == 1 and "it was evaluated with other settings (eval.wikitext: then [], now ['hf-strided-64']; " \
        "eval.val_tokens: then 2048, now 1024)" in note[0]
    assert f"sparknet.compare --evaluate --run-id {out.mlflow_run_id}" in note[0] and "--fresh trains" in note[0]


def test_a_second_launch_of_a_running_config_fails_and_touches_nothing(finished, lab, capsys):
    """The run folder's lock: a second `sparknet.run` of a config that is training (here: the lock held as the first
    launch holds it) fails in one line naming the holder, even with --fresh, which would delete the folder."""
    from sparknet.locks import run_busy, run_lock

    cfg, out = finished
    before = sorted((p.relative_to(out.run_dir), p.stat().st_mtime_ns) for p in out.run_dir.rglob("*"))
    with run_lock(out.run_dir):
        assert run_busy(out.run_dir).startswith(f"pid {os.getpid()} on ")
        for extra in ([], ["--fresh"]):
            assert main([str(lab / "tiny.yaml"), f"lab_dir={lab}", *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert f"{out.run_dir}: in use by pid {os.getpid()} on " in err and "fix: wait for it to end" in err
    assert sorted((p.relative_to(out.run_dir), p.stat().st_mtime_ns) for p in out.run_dir.rglob("*")) == before
    assert run_busy(out.run_dir) == ""  # released: the next launch goes ahead
    assert main([str(lab / "tiny.yaml"), f"lab_dir={lab}"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_resuming_from_the_final_checkpoint_reports_the_runs_figures(finished, tmp_path):
    """A run killed after its final checkpoint but before it recorded the result: training again from
    that checkpoint trains nothing and reports the same loss, tokens/s and counts (not NaN and zeros)."""
    import shutil

    from sparknet.prepare import prepare
    from sparknet.run import make_accelerator
    from sparknet.train import train

    cfg, out = finished
    shutil.copytree(run_dir_for(cfg) / "checkpoints", tmp_path / "checkpoints")
    again = train(cfg, prepare(cfg, progress=False, write_report=False), make_accelerator(cfg), tmp_path,
                  progress=False)
    ref = out.result
    assert again.steps == ref["steps"] and again.tokens == ref["tokens"] == 131072
    assert again.tokens_per_source == ref["tokens_per_source"]
    assert math.isfinite(again.train_loss) and again.train_loss == ref["train_loss"]
    assert again.tokens_per_s == ref["tokens_per_s"] > 0
    assert again.val_loss == pytest.approx(ref["val_loss"], abs=1e-6)


def test_checkpoint_round_trip_through_automodel(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparknet.checkpoint import list_checkpoints, load_checkpoint
    from sparknet.model import GPT, GPTShape
    from sparknet.train import build_optimizer

    cfg, out = finished
    final = Path(out.result["final_model"])
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok("The cell membrane is made of lipids.")["input_ids"]])
    ckpt = list_checkpoints(out.run_dir / "checkpoints")[-1]
    model = GPT(GPTShape.from_config(cfg.model, hf.config.vocab_size))
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    state = load_checkpoint(ckpt, model, opt)
    assert state["step"] == out.result["steps"] and state["tokens"] == 131072
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt")) and not list(final.glob("*.pkl"))


def test_mlflow_run_has_params_metrics_and_artifacts(finished):
    from mlflow.tracking import MlflowClient

    cfg, out = finished
    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.lab_path / 'mlflow.db'}")
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    p, tags, m = run.data.params, run.data.tags, run.data.metrics
    assert p["train.lr"] == "0.003" and p["mixture.sources.docs.weight"] == "0.6" and p["model.preset"] == "cpu-tiny"
    assert p["mixture.total_tokens"] == "131072"
    assert tags["sparknet.plan_sha256"] and tags["sparknet.git_commit"] and tags["version.torch"]
    assert tags["sparknet.git_dirty"] in ("true", "false", "unknown") and "sparknet.data.docs" in tags
    assert tags["sparknet.device"] == "cpu"
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "val/loss/docs",
                "val/loss/code", "train/loss/docs", "train/loss/code"):
        assert key in m, key
    assert m["tokens/docs"] + m["tokens/code"] == 131072
    assert m["tokens/docs"] == out.result["tokens_per_source"]["docs"]
    history = client.get_metric_history(out.mlflow_run_id, "train/loss")
    assert len(history) == out.result["steps"]  # logged every step (log_every_steps=1)
    assert history[-1].value < history[0].value - 1.0
    lr = [h.value for h in sorted(client.get_metric_history(out.mlflow_run_id, "train/lr"), key=lambda h: h.step)]
    assert max(lr) == pytest.approx(3e-3) and lr[-1] == pytest.approx(3e-4)
    names = {a.path for a in client.list_artifacts(out.mlflow_run_id)}
    assert {"config.yaml", "mixture_report.json", "mixture_report.txt", "samples.txt", "loss.png",
            "result.json", "metrics.jsonl"} <= names
    assert Path(cfg.lab_path / "mlartifacts").is_dir()  # artifacts next to the store, not ./mlruns


@pytest.mark.slow
def test_kill_and_resume_ends_exactly_like_an_uninterrupted_run(finished, lab, subprocess_env):
    cfg, ref = finished
    cmd = [sys.executable, "-m", "sparknet.run", str(lab / "tiny.yaml"), f"lab_dir={lab}", "name=killed",
           "train.checkpoint_every_tokens=4096", "train.keep_checkpoints=3", "--quiet"]
    killed_dir = run_dir_for(cfg_for(lab, "name=killed"))
    proc = subprocess.Popen(cmd, env=subprocess_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed_dir / "checkpoints").glob("step-*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted((killed_dir / "checkpoints").glob("step-*"))
    assert ckpts, "no checkpoint was written before the kill"
    assert json.loads((killed_dir / "state.json").read_text())["status"] == "running"  # really cut short
    steps_at_kill = int(ckpts[-1].name.split("-")[1])
    assert steps_at_kill < ref.result["steps"]

    done = subprocess.run(cmd, env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from step-" in done.stdout
    res = json.loads((killed_dir / "result.json").read_text())
    assert res["steps"] == ref.result["steps"] and res["tokens"] == 131072
    assert res["tokens_per_source"] == ref.result["tokens_per_source"]
    # Same final loss (the last step's, logged alone) and the same held-out losses as the reference.
    assert res["train_loss"] == pytest.approx(ref.result["train_loss"], rel=1e-6)
    for k, v in ref.result["val_loss"].items():
        assert res["val_loss"][k] == pytest.approx(v, rel=1e-6)
    a = (Path(ref.result["final_model"]) / "model.safetensors").read_bytes()
    b = (killed_dir / "final" / "model.safetensors").read_bytes()
    assert a == b  # bit-identical weights


def test_divergence_guard_stops_on_a_forced_nan_and_keeps_the_last_good_checkpoint(lab):
    from mlflow.tracking import MlflowClient

    cfg = cfg_for(lab, "name=nan", "train.checkpoint_every_tokens=2048")

    def fault(step, nll):
        return nll * float("nan") if step == 5 else nll

    with pytest.raises(Diverged, match=r"diverged at step 5 .*not finite.*last good checkpoint: .*step-00000004"):
        execute(cfg, progress=False, fault=fault)
    run_dir = run_dir_for(cfg)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "diverged" and "lower train.lr" in state["error"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))[-1] == "step-00000004"
    run = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}").get_run(state["mlflow_run_id"])
    assert run.info.status == "FAILED" and "not finite" in run.data.tags["sparknet.failure"]


def test_divergence_guard_fires_on_a_loss_spike(lab):
    cfg = cfg_for(lab, "name=spike", "tracking.enabled=false")
    with pytest.raises(Diverged, match=r"diverged at step 12 .*x its recent average"):
        execute(cfg, progress=False, fault=lambda step, nll: nll * 10 if step == 12 else nll)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# Run as `torchrun ... slow_launch.py ARGS`: sparknet.run with deliberately slow work where real runs are slow: the
# first process to prepare (streaming 1B tokens takes tens of minutes) and the main process's end (WikiText-2,
# MLflow uploads). Each lasts longer than the collective timeout the test sets.
SLOW_LAUNCH = """
import os, sys, time
import sparknet.prepare, sparknet.run
SLOW_S = float(os.environ["SPARKNET_TEST_SLOW_S"])
real_prepare, real_score = sparknet.prepare.prepare, sparknet.run.score_wikitext
marker = os.environ["SPARKNET_TEST_MARKER"]

def slow_prepare(cfg, **kw):
    if not os.path.exists(marker):  # the first process to take the lab's prepare lock does the (slow) work
        open(marker, "w").close()
        time.sleep(SLOW_S)
    return real_prepare(cfg, **kw)

def slow_score(*args, **kw):
    time.sleep(SLOW_S)
    return real_score(*args, **kw)

sparknet.prepare.prepare, sparknet.run.score_wikitext = slow_prepare, slow_score
sys.exit(sparknet.run.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process_despite_slow_main_work(finished, lab, subprocess_env, tmp_path):
    """The same config, micro-batch included, under torchrun with 2 processes: accumulation is derived from the
    global batch (1 micro-batch each instead of 2), so the steps, the tokens per step and per source are the
    recipe's. A collective timeout of 12 s is shorter than the slow preparation and the slow end (18 s each),
    and the run still finishes: no process waits for them in a collective. (The second process's own, cached
    preparation, after the first released the lab's lock, takes a few seconds: the first waits that long.)"""
    cfg, ref = finished
    (tmp_path / "slow_launch.py").write_text(SLOW_LAUNCH)
    env = dict(subprocess_env, SPARKNET_TEST_SLOW_S="18", SPARKNET_TEST_MARKER=str(tmp_path / "prepared-once"))
    overrides = ["name=ddp", "train.checkpoint_minutes=1e-6", "train.dist_timeout_minutes=0.2"]
    t0 = time.time()
    done = subprocess.run([*TORCHRUN, str(tmp_path / "slow_launch.py"), str(lab / "tiny.yaml"), f"lab_dir={lab}",
                           *overrides, "--quiet"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.time() - t0 > 36  # both slow parts really happened
    assert "8 sequences x 1 micro-batches x 2 process(es)" in done.stdout  # derived: 16 / (8 x 2)
    run_dir = run_dir_for(cfg_for(lab, *overrides))
    res = json.loads((run_dir / "result.json").read_text())
    # Time-based checkpoints (due at every logging step here) were decided by rank 0 for both processes:
    # both entered each checkpoint's barrier together (a disagreement deadlocks), so the step before the
    # end was checkpointed too (without them only the final checkpoint exists).
    n = ref.result["steps"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [f"step-{n - 1:08d}", f"step-{n:08d}"]
    assert res["steps"] == n and res["tokens"] == 131072 == n * 1024
    assert res["tokens_per_source"] == ref.result["tokens_per_source"]
    from mlflow.tracking import MlflowClient
    run = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}").get_run(
        json.loads((run_dir / "state.json").read_text())["mlflow_run_id"])
    assert run.data.tags["sparknet.world_size"] == "2"  # really two processes
    # Same data, same normalization: the losses agree up to float summation order.
    for k, v in ref.result["val_loss"].items():
        assert res["val_loss"][k] == pytest.approx(v, abs=2e-3)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)], ids=["1-then-2", "2-then-1"])
@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_on_another_process_count(finished, lab, subprocess_env, first, then):
    """Step k's global batch is the same for any process count, so a run SIGKILLed on `first` processes resumes
    on `then`: every planned token trained once (per source, as planned) and the losses of an uninterrupted run."""
    cfg, ref = finished
    overrides = [f"name=moved{first}{then}", "train.checkpoint_every_tokens=16384", "--quiet"]
    run_dir = run_dir_for(cfg_for(lab, *overrides[:2]))

    def command(processes: int) -> list[str]:
        launch = [*TORCHRUN[:-1], "2", "-m"] if processes == 2 else [sys.executable, "-m"]
        return [*launch, "sparknet.run", str(lab / "tiny.yaml"), f"lab_dir={lab}", *overrides]

    proc = subprocess.Popen(command(first), env=subprocess_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _checkpoints(run_dir) and proc.poll() is None:
        time.sleep(0.02)
    kill_tree(proc.pid)  # the launcher and its workers (torchrun's are in sessions of their own)
    proc.wait()
    assert _checkpoints(run_dir), "no checkpoint was written before the kill"
    killed_at = json.loads((_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    assert killed_at["world_size"] == first and 0 < killed_at["tokens"] < 131072

    done = subprocess.run(command(then), env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"tokens done; written by {first} process(es), resumed on {then}" in done.stdout
    res = json.loads((run_dir / "result.json").read_text())
    assert res["steps"] == ref.result["steps"] and res["tokens"] == 131072
    assert res["tokens_per_source"] == ref.result["tokens_per_source"]  # == the plan (checked by train too)
    for k, v in ref.result["val_loss"].items():
        assert res["val_loss"][k] == pytest.approx(v, abs=2e-3)


def _resume_point_worker(rank: int, init: str, steps: list[int], out: str) -> None:
    import torch.distributed as dist

    from sparknet.checkpoint import agree_on_resume_point
    from sparknet.errors import SparknetError

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        name = f"step-{steps[rank]:08d}" if steps[rank] else ""
        agree_on_resume_point(steps[rank], name, Path("lab/runs/r"))
        Path(f"{out}.{rank}").write_text("agreed")
    except SparknetError as exc:
        Path(f"{out}.{rank}").write_text(str(exc))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("steps", [[40, 0]])  # agreement: every two-process test above passes through it
@pytest.mark.slow
def test_processes_that_see_different_checkpoints_refuse_to_resume(tmp_path, steps):
    """Two nodes without a shared filesystem: rank 0 sees its checkpoint, rank 1 (another node's lab) none. Both
    fail with the same one-line error, instead of one of them training from step 0."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "out")
    mp.spawn(_resume_point_worker, args=(f"file://{tmp_path / 'rendezvous'}", steps, out), nprocs=2, join=True)
    said = [Path(f"{out}.{r}").read_text() for r in (0, 1)]
    if steps[0] == steps[1]:
        assert said == ["agreed", "agreed"]
        return
    assert said[0] == said[1] and "\n" not in said[0]
    assert said[0].startswith("lab/runs/r: the processes would resume from different points (rank 0 on ")
    assert ": step-00000040; rank 1 on " in said[0] and ": no checkpoint)" in said[0]
    assert "fix: put lab_dir on a filesystem every node mounts, or copy lab/runs/r to every node" in said[0]


def test_a_checkpoint_of_another_global_batch_is_refused(finished, tmp_path):
    import shutil

    from sparknet.errors import SparknetError
    from sparknet.prepare import prepare
    from sparknet.run import make_accelerator
    from sparknet.train import train

    cfg, out = finished
    shutil.copytree(run_dir_for(cfg) / "checkpoints", tmp_path / "checkpoints")
    other = cfg_for(cfg.lab_path, "train.batch_tokens=2048")
    with pytest.raises(SparknetError, match=r"written with train.batch_tokens=1024, this run has 2048 .*--fresh"):
        train(other, prepare(other, progress=False, write_report=False), make_accelerator(other), tmp_path,
              progress=False)


def test_a_checkpoint_restores_on_a_machine_with_fewer_gpus(finished, tmp_path, monkeypatch):
    """Checkpoints used to hold every visible GPU's RNG state and restore them all: on a machine with fewer GPUs
    that raised IndexError. Now each process saves and restores its own device's state; older checkpoints with
    a [num_gpus, n] stack restore their first row."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sparknet.checkpoint import list_checkpoints, load_checkpoint
    from sparknet.model import GPT, GPTShape
    from sparknet.train import build_optimizer

    cfg, out = finished
    ckpt = tmp_path / "ckpt"
    shutil.copytree(list_checkpoints(out.run_dir / "checkpoints")[-1], ckpt)
    tensors = load_file(str(ckpt / "trainer.safetensors"))
    eight_gpus = torch.arange(8 * 16, dtype=torch.uint8).reshape(8, 16)  # as an 8-GPU box wrote it
    save_file(tensors | {"rng.cuda": eight_gpus}, str(ckpt / "trainer.safetensors"))
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def set_all(states):  # what torch does with 8 states on a 1-GPU machine
        raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    model = GPT(GPTShape.from_config(cfg.model, 512))
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    meta = load_checkpoint(ckpt, model, opt, torch.device("cuda", 0))
    assert meta["step"] == out.result["steps"]
    assert len(restored) == 1 and torch.equal(restored[0][0], eight_gpus[0]) and restored[0][1] == torch.device("cuda", 0)


@pytest.fixture
def mlflow_server(tmp_path, subprocess_env):
    """A real `mlflow server` on 127.0.0.1 with lean settings (one worker, no job runner): (url, process)."""
    server = MlflowServer(tmp_path, subprocess_env)
    server.start()
    yield server.url, server.proc
    server.stop()


@pytest.mark.slow
def test_training_against_a_real_mlflow_server_that_goes_away_mid_run(lab, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    url, proc = mlflow_server
    cfg = cfg_for(lab, "name=served", f"tracking.uri={url}", "tracking.timeout_s=3")
    calls = []

    def stop_server_at_first_eval(tokens, val):
        calls.append(tokens)
        if len(calls) == 1:
            client = MlflowClient(tracking_uri=url)  # the run is there while the server lives
            run = client.get_run(json.loads((run_dir_for(cfg) / "state.json").read_text())["mlflow_run_id"])
            assert run.data.params["train.lr"] == "0.003"
            assert "train/loss" in run.data.metrics
            assert {"config.yaml", "mixture_report.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    t0 = time.time()
    out = execute(cfg, progress=False, on_eval=stop_server_at_first_eval)
    assert time.time() - t0 < 120  # a dead server costs seconds, not minutes of retries
    assert out.result["tokens"] == 131072 and len(calls) >= 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "training continues" in err
    rows = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"] for r in rows if "train/loss" in r}
    assert steps == set(range(1, out.result["steps"] + 1))  # nothing lost locally
    assert any("val/loss/docs" in r for r in rows) and math.isfinite(out.result["train_loss"])


@pytest.mark.slow
def test_final_model_is_scored_on_wikitext_and_recorded(lab, shared_data, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("SPARKNET_WIKITEXT", raising=False)
    cfg = cfg_for(lab, "name=wiki", "eval.wikitext=[hf-strided-64]",
                  f"eval.wikitext_path={shared_data / 'wikitext-2-raw'}", "mixture.total_tokens=32768")
    out = execute(cfg, progress=False)
    wiki = {r["protocol"]: r for r in out.result["wikitext"]}
    assert set(wiki) == {"hf-strided-64"} and not out.result["wikitext_skipped"]
    for r in wiki.values():
        assert r["perplexity"] == pytest.approx(math.exp(r["loss_nats"]))
        assert 1 < r["perplexity"] < 512  # better than uniform over the 512-token vocabulary
        assert r["bits_per_byte"] > 0 and r["details"]["data_canonical"]
    assert wiki["hf-strided-64"]["tokens"] > 500_000  # the whole test split (BPE-512 tokens)
    m = MlflowClient(tracking_uri=f"sqlite:///{lab / 'mlflow.db'}").get_run(out.mlflow_run_id).data.metrics
    assert m["wikitext/hf-strided-64/ppl"] == pytest.approx(wiki["hf-strided-64"]["perplexity"])


def test_unreachable_wikitext_is_a_recorded_gap_not_a_failed_run(lab, monkeypatch):
    monkeypatch.delenv("SPARKNET_WIKITEXT", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(lab / "empty-hf-cache"))
    cfg = cfg_for(lab, "name=nowiki", "eval.wikitext=[hf-strided-64]", "mixture.total_tokens=16384",
                  "tracking.enabled=false")
    out = execute(cfg, progress=False)
    assert out.result["tokens"] == 16384 and out.result["wikitext"] == []
    assert "SPARKNET_WIKITEXT" in out.result["wikitext_skipped"]
    assert json.loads((out.run_dir / "state.json").read_text())["status"] == "finished"


def test_lr_schedules_keep_their_shape_at_any_budget():
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_fraction=0.1, schedule="cosine")
    for n in (100, 1000):
        lrs = np.array([lr_at(s, n, t) for s in range(n)])
        w = round(0.1 * n)
        assert lrs[w - 1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 / w)
        assert lrs[-1] == pytest.approx(1e-4) and (np.diff(lrs[w:]) <= 1e-15).all()
        mid = w + (n - w) // 2
        assert lrs[mid - 1] == pytest.approx(5.5e-4, rel=0.02)  # cosine midpoint is the mean of lr and min_lr
    lin = TrainConfig(lr=1e-3, min_lr=0.0, warmup_fraction=0.0, schedule="linear")
    assert [lr_at(s, 4, lin) for s in range(4)] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    wsd = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_fraction=0.0, decay_fraction=0.2, schedule="wsd")
    lrs = [lr_at(s, 100, wsd) for s in range(100)]
    assert lrs[:80] == [1e-3] * 80 and lrs[-1] == pytest.approx(1e-4) and lrs[80] < 1e-3


@pytest.mark.parametrize("args, message", [
    (["train.lr=abc"], "override 'train.lr=abc': train.lr: must be a number"),
    (["train.lr=-1"], "train.lr: must be > 0"),
    (["train.schedule=cosnie"], "train.schedule: must be one of"),
    (["train.seq_len=4096", "train.batch_tokens=4096", "train.micro_batch_size=1"],
     "train.seq_len: 4096 exceeds the model's context"),
    (["train.device=cuda"], "train.device: cuda was asked for but no CUDA device"),
    (["trian.lr=1"], "unknown key"),
    (["tracking.uri=http://127.0.0.1:9"], "tracking.uri: cannot start an MLflow run"),
])
def test_bad_overrides_fail_cleanly(lab, capsys, args, message):
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code = main([str(lab / "tiny.yaml"), f"lab_dir={lab}", "name=bad", "tracking.timeout_s=2", *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_dry_run_prints_the_plan_without_training(capsys):
    assert main([str(ROOT / "mixtures" / "codelion_502030.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "64.09M parameters" in out and "457 MFLOP/token" in out
    assert "976,563 sequences" in out and "8,139 steps" in out and "500,000,256 tokens" in out
