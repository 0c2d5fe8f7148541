"""A careless user's inputs, one table over the six commands: each ends in exit 2 and ONE line that names the field or
file at fault and a fix, in under 2 seconds, with no traceback, and nothing in the lab changed (hashed before and
after). The commands run in-process (their `main(argv)`, as `python -m` runs it), so the table stays fast; a few
cases run as real subprocesses too, to keep the entry points honest.

Placeholders in a case's arguments: {mix} a valid tiny mixture, {lab} its prepared lab, {tmp} a scratch folder,
{file} a plain file, {space} a valid sweep space.
"""

from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from downstream_data import write_downstream
from tinylab import ROOT, tiny_mixture

# (id, command, arguments, substrings the one line must hold); every line must also hold "fix".
CASES: list[tuple[str, str, list[str], list[str]]] = [
    # --- the mixture file and its YAML (prepare and run read it alike)
    ("no-file", "prepare", ["{tmp}/nope.yaml"], ["nope.yaml", "file not found"]),
    ("folder", "prepare", ["{tmp}"], ["is a folder"]),
    ("empty", "prepare", ["{tmp}/empty.yaml"], ["empty.yaml", "is empty"]),
    ("list-yaml", "prepare", ["{tmp}/list.yaml"], ["list.yaml", "must be a mapping"]),
    ("invalid-yaml", "prepare", ["{tmp}/broken.yaml"], ["broken.yaml", "invalid YAML"]),
    ("dup-key", "prepare", ["{tmp}/dup.yaml"], ["dup.yaml", "duplicate key"]),
    ("not-utf8", "prepare", ["{tmp}/latin1.yaml"], ["latin1.yaml", "UTF-8"]),
    ("unknown-section", "prepare", ["{tmp}/typo.yaml"], ["typo.yaml", "trian", "did you mean"]),
    ("no-mixture", "run", ["{tmp}/nomix.yaml"], ["nomix.yaml", "mixture"]),
    ("missing-arg", "prepare", [], ["MIXTURE.yaml"]),
    # --- overrides name the override, not the file
    ("override-no-eq", "prepare", ["{mix}", "train.lr"], ["'train.lr'", "key.sub=value"]),
    ("override-unknown", "run", ["{mix}", "train.lrr=1"], ["train.lrr=1", "unknown key", "'lr'"]),
    ("override-type", "run", ["{mix}", "train.lr=abc"], ["train.lr=abc", "must be a number"]),
    ("lr-negative", "run", ["{mix}", "train.lr=-1"], ["train.lr=-1", "must be > 0"]),
    ("min-lr-above", "run", ["{mix}", "train.min_lr=1"], ["train.min_lr"]),
    ("tokens-zero", "prepare", ["{mix}", "mixture.total_tokens=0"], ["mixture.total_tokens", "> 0"]),
    ("tokens-word", "prepare", ["{mix}", "mixture.total_tokens=lots"], ["mixture.total_tokens", "token count"]),
    ("tokens-fraction", "run", ["{mix}", "mixture.total_tokens=1.5"], ["mixture.total_tokens", "whole"]),
    ("tokens-huge", "run", ["{mix}", "mixture.total_tokens=1e30"], ["mixture.total_tokens", "far too many"]),
    ("seq-len-zero", "run", ["{mix}", "train.seq_len=0"], ["train.seq_len"]),
    ("seq-len-context", "run", ["{mix}", "train.seq_len=128", "train.batch_tokens=1024"], ["train.seq_len", "context"]),
    ("micro-not-divide", "run", ["{mix}", "train.micro_batch_size=3"], ["train.micro_batch_size", "one of"]),
    ("micro-word", "run", ["{mix}", "train.micro_batch_size=many"], ["train.micro_batch_size", "auto"]),
    ("batch-not-multiple", "run", ["{mix}", "train.batch_tokens=100"], ["train.batch_tokens", "multiple of seq_len"]),
    ("batch-huge-divisor", "run", ["{mix}", "train.batch_tokens=1e12", "train.micro_batch_size=7"],
     ["train.micro_batch_size", "one of"]),
    ("batch-over-budget", "run", ["{mix}", "train.batch_tokens=1048576", "--dry-run"],
     ["train.batch_tokens", "exceed the whole budget"]),
    ("preset", "run", ["{mix}", "model.preset=gpt5"], ["model.preset", "gpt5"]),
    ("schedule", "run", ["{mix}", "train.schedule=zigzag"], ["train.schedule", "zigzag"]),
    ("warmup", "run", ["{mix}", "train.warmup_fraction=2"], ["train.warmup_fraction"]),
    ("seed-negative", "run", ["{mix}", "train.seed=-1"], ["train.seed"]),
    ("keep-zero", "run", ["{mix}", "train.keep_checkpoints=0"], ["train.keep_checkpoints", ">= 1"]),
    ("log-every-zero", "run", ["{mix}", "train.log_every_steps=0"], ["train.log_every_steps"]),
    ("diverge", "run", ["{mix}", "train.diverge_factor=1"], ["train.diverge_factor"]),
    ("compile-word", "run", ["{mix}", "train.compile=perhaps"], ["train.compile"]),
    ("bool-word", "run", ["{mix}", "tracking.enabled=maybe"], ["tracking.enabled", "true or false"]),
    ("name-path", "run", ["{mix}", "name=a/b"], ["name", "safe"]),
    ("experiment-name", "run", ["{mix}", "tracking.experiment=a b"], ["tracking.experiment"]),
    ("weight-negative", "prepare", ["{mix}", "mixture.sources.docs.weight=-1"], ["weight"]),
    ("weights-zero", "prepare", ["{mix}", "mixture.sources.docs.weight=0", "mixture.sources.code.weight=0"],
     ["weight"]),
    ("max-repeats", "prepare", ["{mix}", "mixture.sources.docs.max_repeats=0"], ["max_repeats"]),
    ("source-kind", "prepare", ["{mix}", "mixture.sources.docs.kind=ftp"], ["kind", "ftp"]),
    ("part", "prepare", ["{mix}", "mixture.sources.docs.part=poems"], ["part", "poems"]),
    ("val-tokens", "prepare", ["{mix}", "mixture.val_tokens=-5"], ["mixture.val_tokens"]),
    ("vocab", "prepare", ["{mix}", "tokenizer.vocab_size=3"], ["tokenizer.vocab_size"]),
    ("grad-accum-old", "run", ["{mix}", "train.grad_accum_steps=4"], ["grad_accum_steps", "batch_tokens"]),
    ("local-path", "prepare", ["{tmp}/local.yaml"], ["path", "nowhere"]),
    ("same-files", "prepare", ["{tmp}/twice.yaml"], ["same"]),
    # --- the command line
    ("prepare-flag", "prepare", ["{mix}", "--bogus"], ["--bogus", "--help"]),
    ("prepare-workers", "prepare", ["{mix}", "--workers", "0"], ["--workers", ">= 1"]),
    ("prepare-workers-word", "prepare", ["{mix}", "--workers", "x"], ["--workers"]),
    ("prepare-workers-missing", "prepare", ["{mix}", "--workers"], ["--workers", "expected one argument"]),
    ("audit-processes", "prepare", ["{mix}", "--audit", "--audit-processes", "0"], ["--audit-processes"]),
    ("audit-processes-word", "prepare", ["{mix}", "--audit", "--audit-processes", "one,two"], ["--audit-processes"]),
    ("run-flag", "run", ["{mix}", "--bogus"], ["--bogus"]),
    ("run-processes", "run", ["{mix}", "--dry-run", "--processes", "0"], ["--processes"]),
    ("run-processes-word", "run", ["{mix}", "--processes", "two"], ["--processes"]),
    # --- the lab and the tracking store
    ("lab-is-file", "prepare", ["{mix}", "lab_dir={file}"], ["lab_dir", "is a file"]),
    ("lab-is-file-run", "run", ["{mix}", "lab_dir={file}", "--dry-run"], ["lab_dir", "is a file"]),
    ("tracking-scheme", "run", ["{mix}", "tracking.uri=foo://x", "--dry-run"], ["tracking.uri", "foo://x"]),
    ("tracking-path", "run", ["{mix}", "tracking.uri=lab/mlflow.db", "--dry-run"], ["tracking.uri", "sqlite:///"]),
    ("tracking-folder", "run", ["{mix}", "tracking.uri=sqlite:////nonexistent/dir/mlflow.db", "--dry-run"],
     ["tracking.uri", "does not exist"]),
    ("tracking-corrupt", "run", ["{mix}", "tracking.uri=sqlite:///{tmp}/corrupt.db", "--dry-run"],
     ["corrupt.db", "not an MLflow database"]),
    ("wikitext-path", "run", ["{mix}", "eval.wikitext=[hf-strided-512]", "eval.wikitext_path={tmp}/no-wikitext", "--dry-run"],
     ["no-wikitext"]),
    # --- sweep
    ("sweep-flag", "sweep", ["--mixture", "{mix}", "--bogus"], ["--bogus"]),
    ("sweep-trials-zero", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--trials", "0"], ["--trials", ">= 1"]),
    ("sweep-trials-word", "sweep", ["--mixture", "{mix}", "--trials", "x"], ["--trials"]),
    ("sweep-no-space", "sweep", ["--mixture", "{mix}", "--space", "{tmp}/nospace.yaml"], ["nospace.yaml"]),
    ("sweep-space-field", "sweep", ["--mixture", "{mix}", "--space", "{tmp}/badspace.yaml"], ["badspace.yaml", "train.lr", "kind"]),
    ("sweep-objective", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--objective", "accuracy"],
     ["--objective", "accuracy"]),
    ("sweep-objective-source", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--objective", "val/poems"],
     ["poems"]),
    ("sweep-proxy-word", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--proxy-tokens", "lots"],
     ["--proxy-tokens"]),
    ("sweep-proxy-zero", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--proxy-tokens", "0"],
     ["--proxy-tokens"]),
    ("sweep-proxy-under-step", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--proxy-tokens", "100"],
     ["--proxy-tokens", "optimizer step"]),
    ("sweep-timeout", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--timeout", "soon"], ["--timeout"]),
    ("sweep-heartbeat", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--heartbeat", "0"], ["--heartbeat"]),
    ("sweep-study-name", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--study", "../x"], ["--study"]),
    ("sweep-storage-folder", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--storage",
                                       "sqlite:////nonexistent/dir/optuna.db"], ["--storage", "does not exist"]),
    ("sweep-storage-scheme", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--storage", "foo://x"],
     ["--storage"]),
    ("sweep-mixture-missing", "sweep", ["--mixture", "{tmp}/nope.yaml", "--space", "{space}"], ["nope.yaml"]),
    ("sweep-override", "sweep", ["--mixture", "{mix}", "--space", "{space}", "train.lr=abc"], ["train.lr=abc"]),
    ("sweep-out-taken", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--study", "mine", "--out",
                                  "{tmp}/taken"], ["--out", "taken", "another"]),
    ("sweep-out-file", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--out", "{file}"], ["--out", "is a file"]),
    # --- ablate
    ("ablate-out-file", "ablate", ["{mix}", "--design", "leave-one-out", "--out", "{file}"], ["--out", "is a file"]),
    ("ablate-flag", "ablate", ["{mix}", "--design", "leave-one-out", "--bogus"], ["--bogus"]),
    ("ablate-no-mixture", "ablate", [], ["MIXTURE"]),
    ("ablate-mixture-missing", "ablate", ["{tmp}/nope.yaml", "--design", "leave-one-out"], ["nope.yaml"]),
    ("ablate-design", "ablate", ["{mix}", "--design", "halves"], ["--design", "halves"]),
    ("ablate-grid-step", "ablate", ["{mix}", "--design", "grid:0.3"], ["grid:0.3", "divide"]),
    ("ablate-grid-huge", "ablate", ["{mix}", "--design", "grid:0.0001"], ["grid:0.0001", "points"]),
    ("ablate-random-zero", "ablate", ["{mix}", "--design", "random:0"], ["random:0"]),
    ("ablate-random-huge", "ablate", ["{mix}", "--design", "random:99999999"], ["random:99999999"]),
    ("ablate-design-file", "ablate", ["{mix}", "--design", "{tmp}/nodesign.yaml"], ["nodesign.yaml"]),
    ("ablate-design-no-weights", "ablate", ["{mix}", "--design", "{tmp}/noweights.yaml"],
     ["noweights.yaml", "points[0]", "no weights"]),
    ("ablate-design-source", "ablate", ["{mix}", "--design", "{tmp}/poems.yaml"], ["poems"]),
    ("ablate-design-sum", "ablate", ["{mix}", "--design", "{tmp}/half.yaml"], ["sum"]),
    ("ablate-seeds", "ablate", ["{mix}", "--design", "leave-one-out", "--seeds", "0"], ["--seeds"]),
    ("ablate-design-seed", "ablate", ["{mix}", "--design", "leave-one-out", "--design-seed", "-1"], ["--design-seed"]),
    ("ablate-stage", "ablate", ["{mix}", "--design", "leave-one-out", "--stage", "1"], ["--stage"]),
    ("ablate-objective", "ablate", ["{mix}", "--design", "leave-one-out", "--objective", "accuracy"], ["--objective"]),
    ("ablate-proxy", "ablate", ["{mix}", "--design", "leave-one-out", "--proxy-tokens", "0"], ["--proxy-tokens"]),
    ("ablate-storage", "ablate", ["{mix}", "--design", "leave-one-out", "--storage", "sqlite:////nonexistent/dir/optuna.db"], ["--storage"]),
    # --- whether the proxies can answer (sparknet.adequacy): --proxy-tokens auto and the margin
    ("ablate-auto-cap-under-step", "ablate", ["{mix}", "--design", "leave-one-out", "--proxy-tokens", "auto",
                                              "--auto-cap", "100"], ["--auto-cap 100", "one optimizer step", "512"]),
    ("sweep-auto-cap-under-step", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--proxy-tokens", "auto",
                                            "--auto-cap", "100"], ["--auto-cap 100", "one optimizer step"]),
    ("ablate-auto-cap-word", "ablate", ["{mix}", "--design", "leave-one-out", "--proxy-tokens", "auto", "--auto-cap",
                                        "lots"], ["--auto-cap", "token count"]),
    ("ablate-auto-cap-without-auto", "ablate", ["{mix}", "--design", "leave-one-out", "--auto-cap", "1M"],
     ["--auto-cap", "only with --proxy-tokens auto"]),
    ("ablate-auto-time", "ablate", ["{mix}", "--design", "leave-one-out", "--proxy-tokens", "auto", "--auto-time",
                                    "soon"], ["--auto-time", "not a duration"]),
    ("ablate-margin-negative", "ablate", ["{mix}", "--design", "leave-one-out", "--adequacy-margin", "-0.1"],
     ["--adequacy-margin", ">= 0", "--no-adequacy"]),
    ("sweep-margin-negative", "sweep", ["--mixture", "{mix}", "--space", "{space}", "--adequacy-margin", "-1"],
     ["--adequacy-margin", ">= 0"]),
    ("ablate-transfer-unknown", "ablate", ["--transfer", "nosuch", "--budget", "5x", "lab_dir={lab}"],
     ["--transfer nosuch", "no such study"]),
    ("ablate-transfer-budget", "ablate", ["--transfer", "nosuch", "--budget", "five"], ["--budget 'five'", "5x"]),
    ("ablate-transfer-no-budget", "ablate", ["--transfer", "nosuch"], ["--budget is required"]),
    ("ablate-transfer-design", "ablate", ["--transfer", "nosuch", "--budget", "5x", "--design", "leave-one-out"],
     ["--transfer nosuch", "--design"]),
    ("ablate-budget-alone", "ablate", ["{mix}", "--design", "leave-one-out", "--budget", "5x"],
     ["--budget", "only with --transfer"]),
    ("ablate-reuse-unknown", "ablate", ["{mix}", "--design", "leave-one-out", "--objective", "val", "--reuse", "nosuch"],
     ["--reuse nosuch", "no such study"]),
    # --- compare
    ("compare-flag", "compare", ["--bogus"], ["--bogus"]),
    ("compare-evaluate-choice", "compare", ["--evaluate", "bad"], ["--evaluate", "invalid choice"]),
    ("compare-batch", "compare", ["--batch-size", "0"], ["--batch-size"]),
    ("compare-name", "compare", ["--name", "../x"], ["--name"]),
    ("compare-tag", "compare", ["--tag", "novalue"], ["--tag", "KEY=VALUE"]),
    ("compare-store", "compare", ["--tracking-uri", "sqlite:///{tmp}/none.db"], ["none.db", "does not exist"]),
    ("compare-device", "compare", ["--evaluate", "--device", "cuda:7", "--lab", "{lab}"], ["--device"]),
    ("compare-device-word", "compare", ["--evaluate", "--device", "tpu", "--lab", "{lab}"], ["--device", "tpu"]),
    ("compare-wikitext", "compare", ["--evaluate", "--wikitext", "{tmp}/nowhere", "--lab", "{lab}"],
     ["--wikitext", "nowhere"]),
    ("compare-baseline", "compare", ["--evaluate", "--baseline", "./no-model", "--lab", "{lab}"],
     ["--baseline", "no-model"]),
    # --- downstream tasks: in the run's config, as an objective, and `python -m sparknet.evaluate downstream`
    ("run-downstream-task", "run", ["{mix}", "eval.downstream=[helaswag]"], ["eval.downstream[0]", "helaswag"]),
    ("run-downstream-items", "run", ["{mix}", "eval.downstream_items=many"], ["eval.downstream_items", "all"]),
    ("run-downstream-shots", "run", ["{mix}", "eval.downstream_shots=9"], ["eval.downstream_shots", "0 to 5"]),
    ("run-downstream-path", "run", ["{mix}", "eval.downstream=[piqa]", "eval.downstream_path={tmp}/nowhere", "--dry-run"],
     ["eval.downstream_path", "does not exist"]),
    ("run-downstream-file", "run", ["{mix}", "eval.downstream=[piqa]", "eval.downstream_path={tmp}/ds-nopiqa"],
     ["piqa/validation.jsonl", "missing"]),
    ("ablate-objective-task", "ablate", ["{mix}", "--design", "leave-one-out", "--objective", "downstream/helaswag"],
     ["helaswag", "one of"]),
    ("ablate-downstream-offline", "ablate", ["{mix}", "--design", "leave-one-out", "--objective", "downstream"],
     ["hub is offline", "SPARKNET_DOWNSTREAM"]),
    ("evaluate-command", "evaluate", ["wikitext"], ["unknown command", "downstream"]),
    ("evaluate-no-model", "evaluate", ["downstream", "{tmp}/no-model"], ["no-model", "no such folder"]),
    ("evaluate-not-checkpoint", "evaluate", ["downstream", "{tmp}"], ["no config.json"]),
    ("evaluate-no-tokenizer", "evaluate", ["downstream", "{tmp}/notok"], ["notok", "no tokenizer"]),
    ("evaluate-task", "evaluate", ["downstream", "gpt2", "--tasks", "helaswag"], ["--tasks", "helaswag"]),
    ("evaluate-items", "evaluate", ["downstream", "gpt2", "--items", "many"], ["--items", "not a number"]),
    ("evaluate-shots", "evaluate", ["downstream", "gpt2", "--tasks", "mmlu", "--shots", "6", "--data", "{tmp}/ds"],
     ["6 shots", "pool has 5"]),
    ("evaluate-missing-file", "evaluate", ["downstream", "gpt2", "--tasks", "piqa", "--data", "{tmp}/ds-nopiqa"],
     ["piqa/validation.jsonl", "missing"]),
    ("evaluate-malformed", "evaluate", ["downstream", "gpt2", "--tasks", "boolq", "--data", "{tmp}/ds-nopiqa"],
     ["boolq/validation.jsonl:2", "not a JSON line"]),
    ("evaluate-data", "evaluate", ["downstream", "gpt2", "--data", "{tmp}/nowhere"], ["--data", "does not exist"]),
    ("evaluate-offline", "evaluate", ["downstream", "gpt2", "--tasks", "piqa"], ["hub is offline"]),
    ("evaluate-device", "evaluate", ["downstream", "gpt2", "--tasks", "piqa", "--data", "{tmp}/ds", "--device", "tpu"],
     ["--device 'tpu'", "not a device torch knows"]),
    ("evaluate-device-gpu", "evaluate", ["downstream", "gpt2", "--tasks", "piqa", "--data", "{tmp}/ds", "--device",
                                         "cuda:7"], ["--device 'cuda:7'", "this machine has"]),
]

# Run as real processes too (`python -m sparknet.X`): the entry points wrap main the same way.
SUBPROCESS = {"folder", "override-type", "compare-flag", "lab-is-file-run", "evaluate-no-tokenizer"}


def _files_of(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A valid tiny mixture with its lab prepared (stores, tokenizer), and the broken files the cases name."""
    from sparknet.config import load_config
    from sparknet.locks import prepare_lock
    from sparknet.prepare import prepare

    tmp = tmp_path_factory.mktemp("bad-inputs")
    lab = tmp / "lab"
    cfg = tiny_mixture(mixture={"total_tokens": 8192}, eval={"val_tokens": 512})
    cfg["lab_dir"] = str(lab)
    mix = tmp / "tiny.yaml"
    mix.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with prepare_lock(lab):  # as the commands do: the lock file is there from now on
        prepare(load_config(mix), progress=False)
    scratch = tmp / "scratch"
    scratch.mkdir()
    (scratch / "empty.yaml").write_text("")
    (scratch / "list.yaml").write_text("- a\n- b\n")
    (scratch / "broken.yaml").write_text("mixture: [\n")
    (scratch / "dup.yaml").write_text("name: a\nname: b\n")
    (scratch / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (scratch / "typo.yaml").write_text(yaml.safe_dump(cfg | {"trian": {"lr": 1}}))
    (scratch / "nomix.yaml").write_text("train:\n  lr: 0.001\n")
    local = dict(cfg, mixture={"total_tokens": 8192, "sources": [
        {"name": "a", "kind": "local", "path": str(scratch / "nowhere"), "weight": 1.0}]})
    (scratch / "local.yaml").write_text(yaml.safe_dump(local))
    (scratch / "data.jsonl").write_text('{"text": "some text"}\n')
    twice = dict(cfg, mixture={"total_tokens": 8192, "sources": [
        {"name": n, "kind": "local", "path": str(scratch / "data.jsonl"), "weight": 0.5} for n in "ab"]})
    (scratch / "twice.yaml").write_text(yaml.safe_dump(twice))
    (scratch / "corrupt.db").write_bytes(b"this is not a database" * 100)
    space = yaml.safe_load((ROOT / "experiments" / "default_space.yaml").read_text())
    (scratch / "space.yaml").write_text(yaml.safe_dump(space))
    bad = dict(space)
    bad["params"] = dict(space["params"]) | {"train.lr": {"low": 1e-3, "kind": "log"}}
    (scratch / "badspace.yaml").write_text(yaml.safe_dump(bad))
    (scratch / "noweights.yaml").write_text("points:\n  - name: a\n")
    (scratch / "poems.yaml").write_text("points:\n  - name: a\n    weights: {poems: 1.0}\n")
    (scratch / "half.yaml").write_text("points:\n  - name: a\n    weights: {docs: 0.25, code: 0.25}\n")
    (scratch / "taken").mkdir()
    (scratch / "taken" / ".study.json").write_text('{"study": "mine", "storage": "postgresql://elsewhere/db"}')
    write_downstream(scratch / "ds", n=6)
    broken = write_downstream(scratch / "ds-nopiqa", n=6)
    (broken / "piqa" / "validation.jsonl").unlink()
    (broken / "boolq" / "validation.jsonl").write_text('{"question": "q"}\n{"broken\n')
    (scratch / "notok").mkdir()
    (scratch / "notok" / "config.json").write_text('{"model_type": "gpt2"}')
    plain = scratch / "plain-file"
    plain.write_text("not a folder")
    return {"mix": str(mix), "lab": str(lab), "tmp": str(scratch), "file": str(plain),
            "space": str(scratch / "space.yaml")}


def _fill(args: list[str], scene: dict[str, str]) -> list[str]:
    return [a.format(**scene) for a in args]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_exit_2_and_changes_nothing(case, scene, capsys, monkeypatch):
    name, command, args, expected = case
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SPARKNET_WIKITEXT", raising=False)
    monkeypatch.delenv("SPARKNET_DOWNSTREAM", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lab = Path(scene["lab"])
    before = _files_of(lab)
    main = importlib.import_module(f"sparknet.{command}").main
    started = time.perf_counter()
    code = main(_fill(args, scene))
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    line = lines[0]
    assert "Traceback" not in err and "usage:" not in err
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"
    assert "fix" in line, line
    assert seconds < 2, f"{seconds:.1f} s before the error"
    assert _files_of(lab) == before


@pytest.mark.parametrize("name", sorted(SUBPROCESS))
def test_the_entry_points_say_the_same_in_a_real_process(name, scene, subprocess_env):
    _, command, args, expected = next(c for c in CASES if c[0] == name)
    done = subprocess.run([sys.executable, "-m", f"sparknet.{command}", *_fill(args, scene)], env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert all(part in done.stderr for part in expected) and "fix" in done.stderr


def test_the_table_is_big_enough():
    assert len(CASES) >= 80, f"{len(CASES)} cases"
    assert {c[1] for c in CASES} == {"prepare", "run", "sweep", "ablate", "compare", "evaluate"}

