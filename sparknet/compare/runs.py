"""Measured runs: the table row of one training run read back from MLflow (its logged WikiText-2 numbers, size,
tokens, realized mixture, per-source validation loss, speed; with --evaluate, missing protocols scored and logged
back to the run), and which sweep/ablation trials (proxy runs, not results) are kept."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparknet.compare import scoring
from sparknet.compare.table import KIND_RUN, MEASURED, Row, metrics_of, sort_protocols
from sparknet.evaluate import EVAL_DTYPE, PROTOCOL_BLOG

RUN_TAG = "sparknet.mixture"  # every training run has it; sweep parents and comparison runs do not
# A trial (of a sweep, or an ablation on the same Optuna layer, sparknet.study) is a child run of its study's parent
# run, tagged with its trial number. A study's confirm run (the best setting at the full budget) is a child run too,
# but a result: tagged sparknet.confirm=true.
TRIAL_TAG, PARENT_TAG, CONFIRM_TAG, STUDY_TAG = "sparknet.trial", "mlflow.parentRunId", "sparknet.confirm", "sparknet.study"
OBJECTIVE_TAG = "sparknet.objective"  # what the study minimized (sparknet.objective names), on every trial
TUNED_TAG = "sparknet.tuned_on"  # a model selected on an evaluation split: that split's figures are tuned
GPT2_TOKENIZER_NAMES = ("gpt2", "openai-community/gpt2")  # tokenizer.name values that are GPT-2's BPE
TRIALS_NONE, TRIALS_ALL, TRIALS_BEST = "none", "all", "best"
ADDED_DETAILS_TAG = "sparknet.wikitext_added_details"
_KEPT_DETAILS = ("stride_tokens", "stride_clamped", "context_tokens", "max_tokens", "max_tokens_clamped",
                 "data_canonical", "data_source", "data_sha256", "dtype", "same_as")


def _added_details(tags: dict[str, str]) -> dict[str, dict]:
    try:
        value = json.loads(tags.get(ADDED_DETAILS_TAG, "") or "{}")
        return value if isinstance(value, dict) else {}
    except json.JSONDecodeError:
        return {}


def _count_params(params: dict[str, str], final: Path | None) -> float | None:
    """Parameters of the exported model (tied embedding once, positions included), as GPTShape counts them:
    from the final checkpoint's config.json when it is here, else from the run's model and tokenizer params."""
    from sparknet.model import GPTShape

    try:
        if final is not None and (final / "config.json").is_file():
            c = json.loads((final / "config.json").read_text())
            return float(GPTShape(c["n_layer"], c["n_head"], c["n_embd"], c["n_positions"], c["vocab_size"],
                                  c["vocab_size"]).num_params())
        from sparknet.config import ModelConfig
        from sparknet.tokenizer import GPT2_VOCAB

        fields = {k: int(params[f"model.{k}"]) for k in ("n_layer", "n_head", "n_embd", "n_positions")
                  if params.get(f"model.{k}", "None") != "None"}
        model = ModelConfig(preset=params["model.preset"], **fields)
        name = params.get("tokenizer.name")
        if name not in ("gpt2", "bpe"):  # a hub tokenizer's size is not among the params
            return None
        vocab = GPT2_VOCAB if name == "gpt2" else int(params["tokenizer.vocab_size"])
        return float(GPTShape.from_config(model, vocab).num_params())
    except (KeyError, ValueError, TypeError, OSError):
        return None


def _run_tokenizer(params: dict[str, str]) -> tuple[str, bool | None]:
    """(what the table calls the run's tokenizer, whether it is GPT-2's) from its params."""
    name = params.get("tokenizer.name", "")
    if not name:
        return "", None
    if name == "bpe":
        vocab = params.get("tokenizer.vocab_size", "")
        return (f"bpe-{vocab}" if vocab.isdigit() else "bpe"), False
    return name, name in GPT2_TOKENIZER_NAMES


def _training_dtype(record: Any) -> str:
    """The dtype a run scored WikiText-2 in at the end of training, for runs whose results predate the record of
    it: bf16 autocast on CUDA with train.precision=bf16 (the default) until the float32 policy, float32 on a CPU."""
    device = record.tags.get("sparknet.device", "")
    if device and device != "cpu" and record.params.get("train.precision", "bf16") == "bf16":
        return "bfloat16 autocast"
    return EVAL_DTYPE


def _mixture_text(record: Any) -> str:
    """The mixture's name and its realized shares (tokens trained per source), else its configured weights."""
    name = record.tags.get(RUN_TAG, "")
    counts = {k.removeprefix("tokens/"): v for k, v in record.metrics.items() if k.startswith("tokens/")}
    total = sum(counts.values())
    if total > 0:
        parts = [f"{s} {100 * v / total:.3g}%" for s, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    else:
        weights = {m.group(1): v for k, v in record.params.items()
                   if (m := re.fullmatch(r"mixture\.sources\.(.+)\.weight", k))}
        parts = [f"{s} {w}" for s, w in weights.items()]
    return f"{name}: {' + '.join(parts)}" if parts else name


def mean_val_loss(metrics: dict[str, float]) -> float | None:
    """The mean held-out loss over sources (`val/loss`, else the mean of `val/loss/<source>`): the sweep's
    objective, and the table's in-distribution column."""
    if "val/loss" in metrics:
        return float(metrics["val/loss"])
    per_source = [v for k, v in metrics.items() if k.startswith("val/loss/")]
    return sum(per_source) / len(per_source) if per_source else None


def run_row(record: Any, protocols: Sequence[str], *, uri: str, evaluate: bool, wikitext: str | None,
            device: str | None, batch_size: int, log: Any = print, asked: bool = False) -> Row:
    """The row of one training run; with `evaluate`, missing protocols (and those scored in another dtype than
    float32) are scored and logged back to the run. Unless the protocols were `asked` for by name, a run with
    another tokenizer than GPT-2's is not scored under sparknet-blog: that protocol gives a perplexity only, which
    the table marks as not comparable for such a run, so scoring it would cost time (~40 s of 2 CPU cores for a
    1M-parameter model) for a number nobody can compare."""
    from sparknet import tracking

    m, tags = record.metrics, record.tags
    result = tracking.read_run_json(uri, record.run_id, "result.json") or {}
    final_tag = tags.get("sparknet.final_model", "")
    final = Path(final_tag) if final_tag else None
    budget = record.params.get("mixture.total_tokens", "")
    tokenizer, gpt2 = _run_tokenizer(record.params)
    row = Row(KIND_RUN, MEASURED, record.run_name or record.run_id, run_id=record.run_id,
              params=_count_params(record.params, final),
              tokens=m.get("tokens", float(budget) if budget.isdigit() else None), mixture=_mixture_text(record),
              tokenizer=tokenizer, gpt2_tokenizer=gpt2,
              val={k.removeprefix("val/loss/"): v for k, v in m.items() if k.startswith("val/loss/")},
              val_mean=mean_val_loss(m), tokens_per_s=m.get("perf/tokens_per_s", result.get("tokens_per_s")),
              tuned_on=tags.get(TUNED_TAG, ""))
    # How far each held-out loss is past the bigram table of the run's own training tokens (sparknet.references):
    # negative means the model has not yet learned what a count table of its data knows.
    for source, loss in row.val.items():
        ref = m.get(f"val/ref_bigram/{source}")
        if ref is not None:
            row.columns[f"past bigram/{source}"] = float(ref) - float(loss)
    if result.get("seconds") is not None:
        row.wall_s = float(result["seconds"])  # training time over all sessions of a resumed run
    elif record.start_ms and record.end_ms:
        row.wall_s = (record.end_ms - record.start_ms) / 1000
    if record.status != "FINISHED":
        row.notes.append(f"run status {record.status}")
    # Caveats and dtypes of the run's own scoring (result.json) and of any scoring compare --evaluate added later
    # (a tag); the later one wins where both scored a protocol.
    own = {r.get("protocol"): r.get("details") or {} for r in result.get("wikitext") or []}
    added = _added_details(tags)
    details = {p: d for p, d in (own | added).items() if p in protocols}
    row.add_caveats([{"protocol": p, "details": d} for p, d in details.items()])
    for p in protocols:
        if f"wikitext/{p}/ppl" in m:
            row.wikitext[p] = {k: m[f"wikitext/{p}/{k}"] for k in ("loss", "ppl", "bpb") if f"wikitext/{p}/{k}" in m}
            row.dtypes[p] = (details.get(p) or {}).get("dtype") or _training_dtype(record)
    missing = [p for p in protocols if p not in row.wikitext]
    off_policy = [p for p in protocols if p in row.wikitext and row.dtypes.get(p) != EVAL_DTYPE]
    if evaluate and not asked and gpt2 is False and PROTOCOL_BLOG in missing:
        missing.remove(PROTOCOL_BLOG)
        row.notes.append(f"{PROTOCOL_BLOG}: not scored by --evaluate: a perplexity only, not comparable for tokenizer "
                         f"{tokenizer} (fix: --protocols {PROTOCOL_BLOG} scores it anyway)")
    if not missing and not (evaluate and off_policy):
        return row

    if evaluate:
        todo = sort_protocols([*missing, *off_policy])
        reason = ""
        if final is None:
            reason = "the run recorded no final model (tag sparknet.final_model)"
        elif not (final / "config.json").is_file():
            reason = f"its final model {final} is not on this machine"
        else:
            log(f"evaluating run {row.model} ({record.run_id}) on {', '.join(todo)} ...")
            device = device or scoring.default_device()
            try:
                results = scoring.score(*scoring.load_fp32(str(final), "main", device), todo, wikitext, device,
                                         batch_size)
            except scoring.EVAL_ERRORS as exc:
                reason = scoring.reason(exc)
            else:
                metrics = {f"wikitext/{r.protocol}/{k}": v for r in results for k, v in metrics_of(r).items()}
                kept = added | {r.protocol: {k: r.details.get(k) for k in _KEPT_DETAILS} for r in results}
                # Logged back, so the next compare (and the MLflow UI) has them without evaluating again; the tag
                # keeps what the caveats need, as result.json does for the run's own scores. A re-scored protocol
                # is logged at the same step, later: MLflow's latest value is the new one.
                tracking.log_to_run(uri, record.run_id, metrics, step=int(result.get("steps", 0)), tags={
                    "sparknet.wikitext_added": f"{', '.join(sort_protocols(kept))} by sparknet.compare --evaluate, "
                                               f"last at {time.strftime('%F %T')}",
                    ADDED_DETAILS_TAG: json.dumps(kept, separators=(",", ":"))})
                for r in results:
                    row.wikitext[r.protocol] = metrics_of(r)
                    row.dtypes[r.protocol] = EVAL_DTYPE
                row.caveats.clear()
                row.add_caveats([{"protocol": p, "details": d} for p, d in (own | kept).items() if p in protocols])
                return row
        if missing:
            row.notes.append(f"no WikiText-2 {', '.join(missing)}: not evaluated ({reason})")
        else:
            row.notes.append(f"not re-scored in {EVAL_DTYPE}: {reason}")
        return row

    scored = sort_protocols([k.split("/")[1] for k in m if k.startswith("wikitext/") and k.endswith("/ppl")])
    skipped = tags.get("sparknet.wikitext_skipped", "")
    why = (f"the run was scored under {', '.join(scored)} only" if scored
           else skipped or "the run's eval.wikitext was empty")
    row.notes.append(f"no WikiText-2 {', '.join(missing)}: {why} (fix: --evaluate scores its final model)")
    return row


# -- trials -------------------------------------------------------------------------------------------------


def is_trial(record: Any) -> bool:
    """A sweep or ablation trial: a proxy run a study trained to compare settings, not a result of its own. Any
    other child run counts as one too, unless it is a study's confirm run."""
    tags = record.tags
    return TRIAL_TAG in tags or (PARENT_TAG in tags and tags.get(CONFIRM_TAG) != "true")


def study_of(record: Any) -> str:
    return record.tags.get(STUDY_TAG) or f"parent run {record.tags.get(PARENT_TAG, '?')}"


def objective_value(record: Any) -> tuple[str, float | None]:
    """(metric, value) of what the trial's study minimized (tag sparknet.objective: `val`, `val/<source>` or
    `wikitext-valid`, as sparknet.objective names them); the mean validation loss when the tag is absent."""
    name = record.tags.get(OBJECTIVE_TAG, "val")
    metric = ("val/loss" if name in ("val", "val/loss") else "wikitext-valid/bpb" if name == "wikitext-valid"
              else name if name.startswith("val/loss/") else f"val/loss/{name.removeprefix('val/')}")
    value = record.metrics.get(metric)
    if value is None and metric == "val/loss":
        value = mean_val_loss(record.metrics)
    return metric, value


def select_trials(records: Sequence[Any], mode: str, named: Sequence[str] = ()) -> tuple[list, dict[str, int],
                                                                                          dict[str, str]]:
    """(records kept, {study: trials left out}, {run id: the note of a kept trial}).

    mode "none" leaves every trial out, "all" keeps them, "best" keeps one per study: the finished trial with the
    lowest value of its study's objective (what the study minimized). A run named with --run-id is always kept."""
    kept, left_out, notes = [], {}, {}
    studies: dict[str, list] = {}
    for r in records:
        if not is_trial(r) or r.run_id in named:
            kept.append(r)
        else:
            studies.setdefault(study_of(r), []).append(r)
    for study, trials in studies.items():
        if mode == TRIALS_ALL:
            kept += trials
            for t in trials:
                notes[t.run_id] = f"trial {t.tags.get(TRIAL_TAG, '?')} of study {study}"
            continue
        scored = [t for t in trials if objective_value(t)[1] is not None]
        if mode == TRIALS_BEST and scored:
            best = min(scored, key=lambda t: objective_value(t)[1])
            kept.append(best)
            notes[best.run_id] = (f"trial {best.tags.get(TRIAL_TAG, '?')}, the best of {len(trials)} finished "
                                  f"trials of study {study} (lowest {objective_value(best)[0]}, its objective, at the "
                                  f"study's proxy budget)")
            trials = [t for t in trials if t is not best]
        if trials:
            left_out[study] = len(trials)
    return kept, left_out, notes


