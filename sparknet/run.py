"""python -m sparknet.run MIXTURE.yaml [key=value ...] [--dry-run] [--fresh]: prepare, train, record.

The run lives in `<lab>/runs/<name>-<hash>/`, where the hash covers everything that changes what is
trained (mixture, tokenizer, model, optimization recipe). Rerunning the same command resumes from the
newest checkpoint in that folder; rerunning a finished run prints its result and does nothing else.
Multi-process: `torchrun --nproc_per_node N -m sparknet.run ...` (or `accelerate launch`); every process
reads its own share of each step from the plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sparknet import atomic
from sparknet.config import RunConfig, config_from_cli, mixture_cli, to_dict
from sparknet.errors import SparknetError, at_least, cli_main
from sparknet.locks import prepare_lock, run_lock

# Train fields that change how a run is operated, not what it computes: left out of the run's identity,
# so e.g. checkpointing more often or moving to another device still resumes the same run.
# The micro-batch is one of them: the recipe is the global `batch_tokens`, so a run may resume with another
# micro-batch (and accumulation) on another number of GPUs.
_OPERATIONAL = ("device", "compile", "checkpoint_minutes", "checkpoint_every_tokens", "keep_checkpoints",
                "log_every_steps", "diverge_factor", "peak_flops", "micro_batch_size", "dist_timeout_minutes")


def run_identity(d: dict) -> dict:
    """What changes what is trained, from a config's `to_dict`: the mixture, tokenizer, model and the train keys
    that are not operational. Two configs with the same identity train the same run."""
    return {"mixture": d["mixture"], "tokenizer": d["tokenizer"], "model": d["model"],
            "train": {k: v for k, v in d["train"].items() if k not in _OPERATIONAL}}


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(run_identity(to_dict(cfg)), sort_keys=True).encode()).hexdigest()[:10]


def run_dir_for(cfg: RunConfig) -> Path:
    return cfg.lab_path / "runs" / f"{cfg.name}-{config_hash(cfg)}"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run_tags(cfg: RunConfig, prepared, device_name: str, world: int) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    tags = {"sparknet.mixture": cfg.name, "sparknet.config_hash": config_hash(cfg),
            "sparknet.plan_sha256": prepared.plan.fingerprint(), "sparknet.tokenizer": prepared.tokenizer.fingerprint,
            "sparknet.git_commit": commit or "unknown",
            "sparknet.git_dirty": ("true" if _git("status", "--porcelain", "--untracked-files=no") else "false")
            if commit else "unknown",
            "sparknet.device": device_name, "sparknet.world_size": str(world),
            "sparknet.total_tokens": str(cfg.mixture.total_tokens),
            "version.python": platform.python_version()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for pkg in ("sparknet", "torch", "transformers", "accelerate", "mlflow", "numpy", "tiktoken"):
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    for name, st in prepared.stores.items():
        blob = json.dumps(st.manifest, sort_keys=True).encode()
        tags[f"sparknet.data.{name}"] = f"{st.dir.name} manifest:{hashlib.sha256(blob).hexdigest()[:16]}"
        if st.manifest.get("source_commit"):
            tags[f"sparknet.data.{name}.commit"] = st.manifest["source_commit"]
    return tags


_ACCELERATORS: dict = {}


def make_accelerator(cfg: RunConfig):
    """One accelerate.Accelerator per process (its state is process-global), bf16 on CUDA when asked. Under
    torchrun this creates the process group, with `train.dist_timeout_minutes` for its collectives."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from sparknet.device import check_cpu_fallback, configure_ptxas, cuda_missing_error

    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise cuda_missing_error()  # names the installed torch build and the GPU nvidia-smi shows, if any
    on_cuda = want != "cpu" and torch.cuda.is_available()
    is_main = int(os.environ.get("RANK", "0")) == 0
    # No silent CPU fallback: a GPU torch cannot use, or a run of more than a few hours on the CPU, stops here
    # (train.device=cpu insists); a short run on a GPU box with a CPU-only torch trains with a warning.
    note = check_cpu_fallback(cfg, int(os.environ.get("WORLD_SIZE", "1"))) if want == "auto" and not on_cuda else None
    if on_cuda:  # compute capability 12.x (DGX Spark): CUDA 13's ptxas for torch.compile, before anything compiles
        note = configure_ptxas(torch.cuda.get_device_capability())
    if note and is_main:
        print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
    mixed = "bf16" if on_cuda and cfg.train.precision == "bf16" else "no"
    key = (on_cuda, mixed)
    if key not in _ACCELERATORS:
        if _ACCELERATORS:  # accelerate keeps one state per process; a different setting needs a reset
            from accelerate.state import AcceleratorState
            AcceleratorState._reset_state(reset_partial_state=False)
            _ACCELERATORS.clear()
        timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.dist_timeout_minutes))
        _ACCELERATORS[key] = Accelerator(cpu=not on_cuda, mixed_precision=mixed, kwargs_handlers=[timeout])
    return _ACCELERATORS[key]


def loss_curve_png(run_dir: Path, out: Path, title: str) -> Path | None:
    """Training and per-source validation loss against tokens, from the run's local metrics."""
    from sparknet.tracking import read_local_metrics

    rows = read_local_metrics(run_dir)
    by_key: dict[str, dict[int, tuple[float, float]]] = {}
    for r in rows:  # a resumed run re-logs some steps: keep the last value per step
        for k, v in r.items():
            if k.startswith(("train/loss", "val/loss")) and "tokens" in r:
                by_key.setdefault(k, {})[r["step"]] = (r["tokens"], v)
    if not by_key:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for k in sorted(by_key):
        pts = sorted(by_key[k].values())
        style = {"lw": 1.6} if k == "train/loss" else {"lw": 1, "marker": "o", "ms": 3} if k.startswith("val") \
            else {"lw": 0.8, "alpha": 0.6}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, **style)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# The eval settings a finished run's figures depend on (eval.batch_size, say, changes none of them).
_EVAL_FIGURES = ("wikitext", "wikitext_path", "val_tokens", "every_tokens", "sample_prompts", "sample_tokens",
                 "downstream", "downstream_items", "downstream_shots", "downstream_path")


def settings_difference(run_dir: Path, cfg: RunConfig, keys: tuple[str, ...]) -> str:
    """How `cfg` differs, at the dotted `keys` ("eval.val_tokens"), from the config.yaml the run in `run_dir` was
    started with, as "eval.val_tokens: then 2048, now 4096; ..."; "" when they are the same (or unknown). These
    settings are not part of the run's identity (they change no weight), so the run's folder is found whatever
    they are: a difference must be said here, not silently passed over."""
    import yaml

    try:
        then = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    now = to_dict(cfg)
    diff = []
    for key in keys:
        section, name = key.split(".")
        old, new = (then.get(section) or {}).get(name), now[section][name]
        if old is not None and _plain(old) != _plain(new):
            diff.append(f"{key}: then {old!r}, now {new!r}")
    return "; ".join(diff)


def eval_difference(run_dir: Path, cfg: RunConfig) -> str:
    """A finished run rerun with other eval settings: its figures were computed under the old ones."""
    return settings_difference(run_dir, cfg, tuple(f"eval.{k}" for k in _EVAL_FIGURES))


def resume_difference(run_dir: Path, cfg: RunConfig) -> str:
    """An unfinished run resumed with other eval settings or another MLflow experiment: refused, or one run would
    hold two measurements."""
    return settings_difference(run_dir, cfg, (*(f"eval.{k}" for k in to_dict(cfg)["eval"]), "tracking.experiment"))


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _write_state(run_dir: Path, state: dict) -> None:
    atomic.write_json(run_dir / "state.json", state)


@dataclass
class RunOutcome:
    run_dir: Path
    result: dict  # TrainResult.to_dict()
    mlflow_run_id: str | None
    already_done: bool = False


def preflight(cfg: RunConfig) -> None:
    """What a run needs that can be checked in milliseconds, before any lock, store or process group: a budget that
    holds one optimizer step, a lab folder it can write, a tracking store it can use, and the local WikiText-2 copy
    it will score on. `--dry-run` checks the same."""
    from sparknet.prepare import check_lab
    from sparknet.tracking import check_target, resolve_uri

    cfg.check_trainable()
    check_lab(cfg.lab_path)
    if cfg.tracking.enabled:
        where = "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI" if os.environ.get(
            "MLFLOW_TRACKING_URI") else "the lab's MLflow store"
        check_target(resolve_uri(cfg.tracking.uri, cfg.lab_path), where=where, lab=cfg.lab_path)
    if cfg.eval.wikitext and cfg.eval.wikitext_path:
        from sparknet.evaluate import find_local_file

        try:
            find_local_file(cfg.eval.wikitext_path, "test")  # what the end of the run scores
        except SparknetError as exc:
            raise SparknetError(f"eval.wikitext_path: {exc}") from None
    if cfg.eval.downstream:
        from sparknet.downstream.tasks import check_data

        warning = check_data(cfg.eval.downstream, cfg.eval.downstream_path or None, cfg.eval.downstream_shots)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)


def execute(cfg: RunConfig, *, fresh: bool = False, progress: bool = True, parent_run_id: str | None = None,
            on_eval=None, fault=None, extra_tags: dict[str, str] | None = None) -> RunOutcome:
    """Prepare the data, train (or resume), evaluate and record one run. Used by the CLI and the sweep. The main
    process holds the run folder's lock throughout (`RunBusy` if another process has it)."""
    # The launcher's rank, read before any process group exists (torchrun and accelerate launch set RANK).
    is_main = int(os.environ.get("RANK", "0")) == 0
    run_dir = run_dir_for(cfg)
    preflight(cfg)
    with run_lock(run_dir) if is_main else contextlib.nullcontext():
        return _execute(cfg, run_dir, is_main, fresh=fresh, progress=progress, parent_run_id=parent_run_id,
                        on_eval=on_eval, fault=fault, extra_tags=extra_tags)


def _execute(cfg: RunConfig, run_dir: Path, is_main: bool, *, fresh: bool, progress: bool, parent_run_id: str | None,
             on_eval, fault, extra_tags: dict[str, str] | None) -> RunOutcome:
    from sparknet.prepare import check_budget, format_report, prepare
    from sparknet.tracking import NullTracker, open_tracker
    from sparknet.train import Diverged, train

    state_path = run_dir / "state.json"
    if fresh:
        if is_main and run_dir.exists():
            shutil.rmtree(run_dir)  # the other processes touch run_dir only after the barrier below
    elif state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("status") == "finished":  # every process reads the same file and returns
            if is_main:
                print(f"{run_dir}: already finished (rerun with --fresh to train again)")
                changed = eval_difference(run_dir, cfg)
                if changed:
                    print(f"{run_dir}: note: it was evaluated with other settings ({changed}); the figures shown are "
                          f"the finished run's (fix: python -m sparknet.compare --evaluate --run-id "
                          f"{state.get('mlflow_run_id') or 'ID'} scores WikiText-2 protocols it lacks; --fresh trains "
                          f"and evaluates again)", flush=True)
                # An MLflow server that was down as the run ended: send what it missed and close the run there.
                from sparknet.tracking import replay_pending

                replay_pending(run_dir, timeout_s=cfg.tracking.timeout_s)
            return RunOutcome(run_dir, state["result"], state.get("mlflow_run_id"), already_done=True)
        changed = resume_difference(run_dir, cfg)
        if changed:
            raise SparknetError(f"{run_dir}: this unfinished run was started with other settings ({changed}) (fix: "
                                f"rerun with the run's settings to resume it, or --fresh to train again with these)")

    # Prepare before the process group exists: streaming 1B tokens takes tens of minutes, far past any
    # collective's timeout, so no process may wait for it in a barrier. Each process takes the lab's prepare
    # lock in turn; the first one does the work, the others find the stores complete. (Several nodes without a
    # shared filesystem: each node prepares its own lab, or run `sparknet.prepare` on each first.)
    with prepare_lock(cfg.lab_path):
        prepared = prepare(cfg, progress=progress and is_main, write_report=is_main)
    check_budget(prepared)
    accelerator = make_accelerator(cfg)
    accelerator.wait_for_everyone()
    run_dir.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if is_main and progress:
        print(format_report(prepared), flush=True)

    experiment = cfg.tracking.experiment or cfg.name
    tracker = open_tracker(cfg.tracking.enabled, cfg.tracking.uri, experiment, cfg.lab_path, run_dir,
                           timeout_s=cfg.tracking.timeout_s, parent_run_id=parent_run_id) if is_main \
        else NullTracker(None)

    from sparknet.tracking import flatten

    device_name = accelerator.device.type
    if accelerator.device.type == "cuda":
        import torch
        device_name = torch.cuda.get_device_name(accelerator.device)
    tags = run_tags(cfg, prepared, device_name, accelerator.num_processes) | (extra_tags or {})
    if is_main:
        run_id = tracker.start(flatten(to_dict(cfg)), tags, run_name=run_dir.name,
                               resume_run_id=state.get("mlflow_run_id") if state.get("mlflow_uri") == tracker.uri
                               else None)
    try:
        if is_main:
            _record_start(cfg, run_dir, state, tracker, run_id, experiment, prepared)
        result = train(cfg, prepared, accelerator, run_dir, tracker, on_eval=on_eval, progress=progress,
                       fault=fault)
        if is_main:
            _record_finish(cfg, run_dir, result, prepared, accelerator, tracker, state,
                           wikitext_refs=wants_wikitext_references(cfg, extra_tags))
    except Diverged as exc:
        if is_main:
            state.update(status="diverged", error=str(exc))
            _write_state(run_dir, state)
            tracker.set_tags({"sparknet.failure": str(exc)[:5000]})
            _finish_artifacts(cfg, run_dir, tracker)
            tracker.end("FAILED")
        raise
    except KeyboardInterrupt:
        if is_main:
            state.update(status="interrupted")
            _write_state(run_dir, state)
            tracker.end("KILLED")
        raise
    except BaseException as exc:
        # A sweep's pruning arrives here as an exception that names its own ending (KILLED, "pruned").
        if is_main:
            state.update(status=getattr(exc, "state_status", "failed"), error=f"{type(exc).__name__}: {exc}"[:2000])
            _write_state(run_dir, state)
            tracker.set_tags({"sparknet.failure": f"{type(exc).__name__}: {exc}"[:5000]})
            _finish_artifacts(cfg, run_dir, tracker)
            tracker.end(getattr(exc, "run_status", "FAILED"))
        raise
    finally:
        accelerator.free_memory()  # the accelerator is process-wide: drop this run's model (a sweep runs many)

    # No barrier after the training: the main process alone scores WikiText-2 and uploads to MLflow (minutes
    # at real scale), and the other processes, done, must not wait for it under the collective timeout.
    return RunOutcome(run_dir, state.get("result") or result.to_dict(), state.get("mlflow_run_id"))


def _record_start(cfg: RunConfig, run_dir: Path, state: dict, tracker, run_id, experiment: str, prepared) -> None:
    """The run's state, config and mixture report in its folder and on its MLflow run."""
    import yaml

    from sparknet.prepare import format_report

    state.update({"status": "running", "config_hash": config_hash(cfg), "mlflow_run_id": run_id,
                  "mlflow_uri": tracker.uri, "experiment": experiment, "started": state.get("started", time.time())})
    _write_state(run_dir, state)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run_dir / "mixture_report.json").write_text(json.dumps(prepared.to_dict(), indent=1))
    (run_dir / "mixture_report.txt").write_text(format_report(prepared) + "\n")
    for name in ("config.yaml", "mixture_report.json", "mixture_report.txt"):
        tracker.log_artifact(run_dir / name)
    if tracker.url:
        print(f"tracking: {tracker.url}", flush=True)


def _record_finish(cfg: RunConfig, run_dir: Path, result, prepared, accelerator, tracker, state: dict, *,
                   wikitext_refs: bool = False) -> None:
    """The final model exported beside the checkpoints, scored on WikiText-2, its count-table references computed,
    and the run recorded as finished."""
    final = run_dir / "final"
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in Path(result.checkpoint).iterdir():
        if f.name not in ("trainer.safetensors", "trainer_state.json"):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    result.final_model = str(final)
    # The final model, loaded once for WikiText-2 and the downstream tasks.
    model = None
    if cfg.eval.wikitext or cfg.eval.downstream:
        from sparknet.model import load_exported

        model = load_exported(final, cfg.model).to(accelerator.device).eval()
    result_dict = result.to_dict() | score_references(cfg, prepared, result.val_loss, tracker, result.steps,
                                                      wikitext=wikitext_refs)
    result_dict |= score_wikitext(cfg, model, prepared, accelerator, tracker, result.steps)
    result_dict |= score_downstream(cfg, run_dir, model, prepared, accelerator, tracker, result.steps)
    (run_dir / "result.json").write_text(json.dumps(result_dict, indent=1))
    tracker.log_artifact(run_dir / "result.json")
    _finish_artifacts(cfg, run_dir, tracker)
    if cfg.tracking.log_model:
        tracker.log_artifact(final, "model")
    tracker.set_tags({"sparknet.final_model": str(final.resolve())})
    tracker.end("FINISHED")
    state.update(status="finished", result=result_dict, finished=time.time())
    _write_state(run_dir, state)


def wants_wikitext_references(cfg: RunConfig, extra_tags: dict[str, str] | None = None) -> bool:
    """Whether a run computes the WikiText-2 validation references: when it reads WikiText-2 anyway (eval.wikitext),
    when a local copy is configured (eval.wikitext_path, $SPARKNET_WIKITEXT), or when the study that started it
    minimizes WikiText-2 validation bits per byte (its `sparknet.objective` tag; such a study has checked that the
    split is readable). Otherwise the run does not go looking for the dataset."""
    from sparknet.evaluate import WIKITEXT_ENV
    from sparknet.objective import WIKITEXT_VALID

    return bool(cfg.eval.wikitext or cfg.eval.wikitext_path or os.environ.get(WIKITEXT_ENV)
                or (extra_tags or {}).get("sparknet.objective") == WIKITEXT_VALID)


def score_references(cfg: RunConfig, prepared, val_loss: dict[str, float], tracker, step: int, *,
                     wikitext: bool = False) -> dict:
    """The count-table references of the run (`sparknet.references`): unigram and bigram models of exactly the tokens
    its plan trained on, scored on each held-out slice as the run scores it, logged as `val/ref_unigram/<source>` and
    `val/ref_bigram/<source>` (nats/token), and with `wikitext`, on the WikiText-2 validation split as the
    wikitext-valid objective scores it, `wikitext-valid/ref_unigram_bpb` and `wikitext-valid/ref_bigram_bpb`. Printed
    per source with how far the model is past the bigram (ref_bigram - val_loss; negative: not yet). Returns the
    result's fields (`References.result_fields`); a failure is a recorded gap (`references_skipped`), never a
    failed run."""
    from sparknet.model import GPTShape
    from sparknet.references import past_bigram, run_references, wikitext_ids, wikitext_text

    tok = prepared.tokenizer
    ids, text_bytes, skipped = None, None, ""
    if wikitext:
        from sparknet.evaluate import load_wikitext

        try:
            text = wikitext_text(load_wikitext("validation", cfg.eval.wikitext_path or None))
            ids, text_bytes = wikitext_ids(tok, text), len(text.encode("utf-8"))
        except Exception as exc:  # an unreadable split is a recorded gap, as in score_wikitext
            skipped = str(exc) if isinstance(exc, SparknetError) else f"{type(exc).__name__}: {exc}"
    try:
        refs = run_references(prepared.plan, prepared.stores, tok.vocab_size, cfg.train.seq_len, cfg.eval.val_tokens,
                              wikitext_ids=ids, wikitext_bytes=text_bytes,
                              context=GPTShape.from_config(cfg.model, tok.vocab_size).n_positions)
    except Exception as exc:  # the training is done and must not be lost over a reference figure
        why = f"{type(exc).__name__}: {exc}"
        print(f"warning: count-table references not computed: {why}", file=sys.stderr)
        tracker.set_tags({"sparknet.references_skipped": why[:5000]})
        return {"references_skipped": why}
    refs.wikitext_skipped = skipped if wikitext else "not asked (no WikiText-2 objective, eval.wikitext or local copy)"
    tracker.log_metrics(refs.metrics(), step)
    past = past_bigram(val_loss, refs.bigram)
    print(f"references: count tables of the run's {refs.train_tokens:,} training tokens ({refs.smoothing}; "
          f"{refs.seconds:.2f} s)", flush=True)
    for name in refs.bigram:
        loss = f"val loss {val_loss[name]:.4f}, " if name in val_loss else ""
        print(f"  {name:<16} {loss}unigram {refs.unigram[name]:.4f}, bigram {refs.bigram[name]:.4f} nats/token"
              + (f": past bigram by {past[name]:.3f} nats" + (" (not yet)" if past[name] < 0 else "")
                 if name in past else ""), flush=True)
    if refs.wikitext_valid:
        w = refs.wikitext_valid
        print(f"  {'wikitext-valid':<16} unigram {w['unigram_bpb']:.4f}, bigram {w['bigram_bpb']:.4f} bits/byte "
              f"({w['tokens']:,} tokens scored)", flush=True)
    elif wikitext and skipped:
        print(f"warning: WikiText-2 validation references not computed: {skipped}", file=sys.stderr)
    return refs.result_fields() | {"references_skipped": ""}


def score_wikitext(cfg: RunConfig, model, prepared, accelerator, tracker, step: int) -> dict:
    """The final model (`sparknet.model.GPT`, eval mode) on WikiText-2 under `eval.wikitext`; an unreachable dataset
    is a recorded gap (`wikitext_skipped` with the reason), not a failed run: the training is done and must not be
    lost."""
    from sparknet.evaluate import EVAL_DTYPE, evaluate_wikitext

    if not cfg.eval.wikitext:
        return {"wikitext": [], "wikitext_skipped": "eval.wikitext is empty"}

    def logits_fn(ids):  # float32, no autocast: the dtype policy of sparknet.evaluate (EVAL_DTYPE)
        return model(ids).float()

    try:
        results = evaluate_wikitext(logits_fn, prepared.tokenizer.encode_batch, prepared.tokenizer.vocab_size,
                                    model.shape.n_positions, cfg.eval.wikitext, local=cfg.eval.wikitext_path or None,
                                    device=accelerator.device, batch_size=cfg.eval.batch_size, dtype=EVAL_DTYPE)
    except SparknetError as exc:
        print(f"warning: WikiText-2 not scored: {exc}", file=sys.stderr)
        tracker.set_tags({"sparknet.wikitext_skipped": str(exc)[:5000]})
        return {"wikitext": [], "wikitext_skipped": str(exc)}
    metrics = {}
    for r in results:
        metrics[f"wikitext/{r.protocol}/loss"] = r.loss_nats
        metrics[f"wikitext/{r.protocol}/ppl"] = r.perplexity
        if r.bits_per_byte is not None:
            metrics[f"wikitext/{r.protocol}/bpb"] = r.bits_per_byte
        print(f"wikitext-2 {r.protocol:<16} loss {r.loss_nats:.4f}  ppl {r.perplexity:,.2f}"
              + (f"  bpb {r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "")
              + f"  ({r.tokens:,} tokens, {r.seconds:.1f} s)", flush=True)
    tracker.log_metrics(metrics, step)
    return {"wikitext": [r.to_dict() for r in results], "wikitext_skipped": ""}


def score_downstream(cfg: RunConfig, run_dir: Path, model, prepared, accelerator, tracker, step: int) -> dict:
    """The final model (`sparknet.model.GPT`, eval mode) on `eval.downstream` (report items, `eval.downstream_items`
    of each), recorded as MLflow metrics `downstream/<task>/<metric>`, `downstream.json` and `downstream.md`;
    unreachable task data is a recorded gap (`downstream_skipped`), as for WikiText-2: the training is done and must
    not be lost."""
    from sparknet.downstream.evaluation import evaluate_configured, mlflow_metrics, table
    from sparknet.downstream.score import gpt_scoring_model

    if not cfg.eval.downstream:
        return {"downstream": [], "downstream_skipped": "eval.downstream is empty"}
    scorer = gpt_scoring_model(model, prepared.tokenizer, accelerator.device)
    try:
        results = evaluate_configured(scorer, cfg.eval, cfg.eval.downstream, role="report",
                                      echo=lambda line: print(line, flush=True))
    except SparknetError as exc:
        print(f"warning: downstream tasks not scored: {exc}", file=sys.stderr)
        tracker.set_tags({"sparknet.downstream_skipped": str(exc)[:5000]})
        return {"downstream": [], "downstream_skipped": str(exc)}
    tracker.log_metrics(mlflow_metrics(results), step)
    tracker.set_tags({"sparknet.downstream_source": results[0].source if results else "hub",
                      "sparknet.downstream_items": str(cfg.eval.downstream_items),
                      **{f"sparknet.downstream_caveat.{r.task}": r.caveat for r in results if r.caveat}})
    atomic.write_json(run_dir / "downstream.json", [r.to_dict() for r in results])
    atomic.write_bytes(run_dir / "downstream.md", (table(results) + "\n").encode())
    for name in ("downstream.json", "downstream.md"):
        tracker.log_artifact(run_dir / name)
    return {"downstream": [r.to_dict() for r in results], "downstream_skipped": ""}


def _finish_artifacts(cfg: RunConfig, run_dir: Path, tracker) -> None:
    png = loss_curve_png(run_dir, run_dir / "loss.png", f"{run_dir.name}")
    if png:
        tracker.log_artifact(png)
    tracker.log_artifact(run_dir / "samples.txt")
    tracker.log_artifact(run_dir / "metrics.jsonl")


def dry_run(cfg: RunConfig, num_processes: int | None = None) -> str:
    """What the run would do, without touching the data or the GPU: for `num_processes` processes (default: the
    launcher's WORLD_SIZE, else 1)."""
    from sparknet.device import describe_device, device_report, estimate_pick, peak_by_label
    from sparknet.mixture import build_plan
    from sparknet.model import GPTShape
    from sparknet.tokenizer import GPT2_VOCAB
    from sparknet.train import lr_at

    t = cfg.train
    plan = build_plan(cfg.mixture, t.seq_len)
    vocab = GPT2_VOCAB if cfg.tokenizer.name == "gpt2" else cfg.tokenizer.vocab_size
    shape = GPTShape.from_config(cfg.model, vocab)
    world = num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    device = describe_device(cfg, world)  # what this machine would train on: name, memory (CUDA is queried, not used)
    if t.micro_batch_size == "auto" and t.sequences_per_step % world == 0:  # the estimate's pick (training probes it)
        t = dataclasses.replace(t, micro_batch_size=estimate_pick(cfg, shape, world, device) or 1)
    accum = t.grad_accum_steps(world)  # a one-line error when the global batch does not split
    per_step = t.sequences_per_step
    num_steps = -(-plan.num_sequences // per_step)
    warmup = round(t.warmup_fraction * num_steps)
    flops = shape.flops_per_token(t.seq_len)
    lines = [
        f"run {run_dir_for(cfg)}",
        f"model {cfg.model.preset} {shape.n_layer}x{shape.n_embd} ({shape.n_head} heads, context "
        f"{shape.n_positions}): {shape.num_params() / 1e6:.2f}M parameters exported"
        + (f" (vocab {vocab:,}, padded to {shape.padded_vocab_size:,} while training)" if cfg.tokenizer.name == "gpt2"
           else f" (tokenizer {cfg.tokenizer.name}: vocab assumed {vocab:,})")
        + f", {flops / 1e6:.0f} MFLOP/token",
        f"budget {plan.total_tokens:,} tokens = {plan.num_sequences:,} sequences of {t.seq_len} (last "
        f"{plan.last_len}); {num_steps:,} steps of {per_step} sequences ({t.batch_tokens:,} tokens, the same on any "
        f"number of processes)",
        f"processes {world}: each {t.micro_batch_size} sequences x {accum} micro-batches (accumulation derived: "
        f"{per_step} / ({t.micro_batch_size} x {world}))",
        f"schedule {t.schedule}: warmup {warmup:,} steps to {t.lr:g}, ending at {lr_at(num_steps - 1, num_steps, t):.3g}"
        f"; AdamW betas ({t.beta1}, {t.beta2}), weight decay {t.weight_decay}, clip {t.grad_clip}",
    ]
    for name, tok in zip(plan.source_names, plan.tokens_per_source()):
        lines.append(f"  {name:<16} {int(tok):>15,} tokens ({tok / plan.total_tokens:6.2%})")
    total = flops * plan.total_tokens
    est = ", ".join(f"{gpu} {total / (peak_by_label(label) * 0.4) / 3600:.1f} h" for gpu, label in
                    (("H100", "H100 SXM"), ("A100", "A100"), ("GB10", "DGX Spark GB10")))
    lines.append(f"compute {total:.3g} FLOPs; at 40% MFU: {est}")
    lines += device_report(cfg, shape, world, device)  # device, peak memory estimate against it, ETA on it
    from sparknet.tracking import resolve_uri

    uri = resolve_uri(cfg.tracking.uri, cfg.lab_path) if cfg.tracking.enabled else "off"
    lines.append(f"tracking: {uri}, experiment {cfg.tracking.experiment or cfg.name}")
    return "\n".join(lines)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = mixture_cli("python -m sparknet.run", __doc__.split("\n")[0], "train.lr=3e-4")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, model and schedule; train nothing")
    ap.add_argument("--fresh", action="store_true", help="discard this run's checkpoints and start over")
    ap.add_argument("--processes", type=at_least(1, 2), default=None, metavar="N",
                    help="with --dry-run: plan for N processes (default: this launch's WORLD_SIZE, else 1)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or reports")
    args, cfg = config_from_cli(ap, argv)
    if cfg is None:
        return 0
    if args.dry_run:
        preflight(cfg)
        print(dry_run(cfg, args.processes))
        return 0

    if cfg.train.device == "auto":  # before preparing (tens of minutes at 1B tokens): refuse an accidental CPU run now
        import torch

        from sparknet.device import check_cpu_fallback

        if not torch.cuda.is_available():
            check_cpu_fallback(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # raises; a warning waits for training
    # SIGTERM (a scheduler's stop, `kill`, torchrun ending its workers) takes the Ctrl-C path: the run's MLflow run
    # ends KILLED and its state "interrupted", its lock is released, and a rerun resumes from the last checkpoint.
    # Only while this run executes: a caller in the same process (a test, a notebook) gets its handler back.
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        out = execute(cfg, fresh=args.fresh, progress=not args.quiet)
    finally:
        signal.signal(signal.SIGTERM, before)
    r = out.result
    if out.result:
        from sparknet.references import past_bigram

        past = past_bigram(r["val_loss"], r.get("val_ref_bigram") or {})
        val = ", ".join(f"{k} {v:.3f}" + (f" (past bigram by {past[k]:.3f} nats)" if k in past else "")
                        for k, v in r["val_loss"].items())
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        print(f"done: {r['tokens']:,} tokens in {r['steps']:,} steps, {r['seconds']:.0f} s "
              f"({r['tokens_per_s']:,.0f} tokens/s{mfu}); train loss {r['train_loss']:.4f}; val loss {val}")
        print(f"model: {r['final_model']}  (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
