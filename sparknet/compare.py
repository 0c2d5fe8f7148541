"""python -m sparknet.compare: one table of our runs, baseline models and published figures on WikiText-2.

Rows come in three kinds, kept apart in every output (the `kind` and `source` columns):

- `measured run`: a training run read back from MLflow (filter by --experiment, --run-id, --tag). Its WikiText-2
  numbers are the metrics the run logged (`wikitext/<protocol>/loss|ppl|bpb`); model size, tokens, realized
  mixture, per-source validation loss, tokens/s and wall time come from the same run. Sweep (and ablation) trials
  are proxy runs, not results: they stay out unless --include-trials (every trial) or --best-trials (one row per
  study, its best trial by the study's objective) brings them in. A model selected on WikiText-2 validation has
  its sparknet-blog figure (which scores that split) marked as tuned.
- `measured baseline`: a Hugging Face model (hub id, `ID@REVISION`, or a local folder) scored here by the same
  `sparknet.evaluate.evaluate_wikitext` the runs use. Results are cached in `<lab>/baselines/<key>.json`, the key
  holding the model, the commit its revision resolved to (never a moving name like "main"), the dtype, the
  protocol and the WikiText text's sha256, so GPT-2 is evaluated once per protocol, ever.
- `reported`: figures others published (`REPORTED`, from DESIGN.md), never recomputed and never mixed with the
  measured ones.

Comparable numbers first: bits per byte (every hf-strided protocol has it) compares across tokenizers, perplexity
only between rows with the same tokenizer, so the table and perplexity.png lead with bits per byte, and a row whose
tokenizer is not GPT-2's says that its perplexity does not compare with the GPT-2 rows. Every number is computed in
float32 (the dtype policy of `sparknet.evaluate`); a row says which dtype its numbers were computed in, and
`--evaluate` re-scores in float32 what a run scored otherwise.

Nothing is evaluated unless `--evaluate` is given: without it compare only reads (MLflow and the baseline cache)
and finishes in seconds, and what is missing is a gap marked "—" whose reason is in the `note` column. With
`--evaluate` it scores what is missing: uncached baselines, and runs without WikiText-2 results (their final
model, from the `sparknet.final_model` tag, when it is on this disk); the run's new metrics are logged back to
that run, so they too are computed once. An unreachable baseline (offline hub, unknown id) stays a gap.

First, a run that ended while its MLflow server was down gets what the server missed and its final status
(`sparknet.tracking.replay_lab`), so it is read as it really ended.

Outputs (`<lab>/compare/<timestamp>/` or --out): compare.md, compare.csv (full precision, NaN for gaps, every
column), perplexity.png, and, unless --no-log, a run in the MLflow experiment `sparknet-compare` holding the three.
The terminal gets a compact table (model, tokens, mixture, bits per byte and perplexity per protocol, mean
validation loss); --wide prints every column.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparknet.errors import SparknetError, cli_main
from sparknet.evaluate import (
    DEFAULT_PROTOCOLS,
    EVAL_DTYPE,
    PROTOCOL_BLOG,
    STRIDED_PREFIX,
    WIKITEXT_ENV,
    WIKITEXT_SHA256,
    EvalResult,
    parse_protocols,
)

if TYPE_CHECKING:
    import pandas as pd

COMPARE_EXPERIMENT = "sparknet-compare"
DEFAULT_BASELINES = ("openai-community/gpt2", "codelion/gpt-2-70m")
KIND_RUN, KIND_BASELINE, KIND_REPORTED = "measured run", "measured baseline", "reported"
MEASURED = "measured"
GAP = "—"
CACHE_VERSION = 2  # bump when a change in evaluate.py changes the numbers: old entries are then ignored
RUN_TAG = "sparknet.mixture"  # every training run has it; sweep parents and comparison runs do not
# A trial (of a sweep, or an ablation on the same Optuna layer, sparknet.study) is a child run of its study's parent
# run, tagged with its trial number. A study's confirm run (the best setting at the full budget) is a child run too,
# but a result: tagged sparknet.confirm=true.
TRIAL_TAG, PARENT_TAG, CONFIRM_TAG, STUDY_TAG = "sparknet.trial", "mlflow.parentRunId", "sparknet.confirm", "sparknet.study"
OBJECTIVE_TAG = "sparknet.objective"  # what the study minimized (sparknet.objective names), on every trial
TUNED_TAG = "sparknet.tuned_on"  # a model selected on an evaluation split: that split's figures are tuned
WIKITEXT_VALIDATION = "wikitext-2-validation"  # the split sparknet-blog scores
NOT_GPT2 = "perplexity not comparable with GPT-2 rows; compare bits per byte"
GPT2_TOKENIZER_NAMES = ("gpt2", "openai-community/gpt2")  # tokenizer.name values that are GPT-2's BPE
TRIALS_NONE, TRIALS_ALL, TRIALS_BEST = "none", "all", "best"


# ---------------------------------------------------------------------------------------------------------
# Published figures (DESIGN.md, "Reference facts"). Only what is written there: nothing derived from it.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reported:
    """One published row: per protocol (loss or None when only a perplexity was published, perplexity). Every
    published row here was measured with GPT-2's tokenizer."""

    model: str
    who: str
    figures: tuple[tuple[str, float | None, float], ...]
    params: float | None = None
    tokens: float | None = None
    mixture: str = ""
    wall_h: float | None = None
    approximate: bool = False
    note: str = ""


REPORTED: tuple[Reported, ...] = (
    Reported("GPT-2 (openai-community/gpt2)", "SparkNet", ((PROTOCOL_BLOG, 3.9407, 51.45),),
             note="SparkNet's published WikiText-2 table"),
    Reported("CodeLion gpt-2-70m", "SparkNet", ((PROTOCOL_BLOG, 5.0129, 150.35),), params=64.09e6, tokens=1e9,
             mixture="finepdfs 50% + dclm 30% + fineweb-edu 20%", wall_h=8.0,
             note="loss/ppl: SparkNet's published table; params, tokens, mixture and ~8 h on one A100: CodeLion's "
                  "model card"),
    Reported("SparkNet v1", "SparkNet", ((PROTOCOL_BLOG, 10.5697, 38937.0),),
             note="SparkNet's published WikiText-2 table"),
    Reported("GPT-2 small", "Hugging Face docs", (("hf-strided-512", None, 25.0), ("hf-strided-1024", None, 30.0)),
             approximate=True,
             note="approximate (≈) perplexities from the docs' 'Perplexity of fixed-length models'; no loss given"),
)


# ---------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table before it becomes a DataFrame row; `notes` say why a value is missing."""

    kind: str
    source: str
    model: str
    run_id: str = ""
    params: float | None = None
    tokens: float | None = None
    mixture: str = ""
    tokenizer: str = ""  # "gpt2", "bpe-4096", a hub id; "" when not known
    gpt2_tokenizer: bool | None = None  # None: not known (a baseline not scored yet)
    wikitext: dict[str, dict[str, float]] = field(default_factory=dict)  # protocol -> loss/ppl/bpb
    dtypes: dict[str, str] = field(default_factory=dict)  # protocol -> the dtype its number was computed in
    commit: str = ""  # a baseline's resolved hub commit
    val: dict[str, float] = field(default_factory=dict)  # source -> held-out loss
    val_mean: float | None = None  # the mean over sources: what a sweep minimizes
    tokens_per_s: float | None = None
    wall_s: float | None = None
    notes: list[str] = field(default_factory=list)
    caveats: dict[str, list[str]] = field(default_factory=dict)  # caveat -> the protocols it applies to
    approximate: bool = False  # reported figures given as "≈"
    tuned_on: str = ""  # the evaluation split this model was selected on (its figures there are not a test)

    def add_caveats(self, results: Sequence[EvalResult | dict]) -> None:
        for protocol, text in _result_caveats(results):
            if protocol not in self.caveats.setdefault(text, []):
                self.caveats[text].append(protocol)

    @property
    def other_tokenizer(self) -> bool:
        """Its perplexities are counted in another tokenizer's tokens than the GPT-2 rows'."""
        return self.gpt2_tokenizer is False

    def note(self) -> str:
        """Gap reasons first, then the tokenizer, then each caveat once with the protocols it concerns, then a dtype
        other than the policy's."""
        parts = list(self.notes)
        if self.other_tokenizer and self.wikitext:
            parts.append(f"tokenizer {self.tokenizer}: {NOT_GPT2}")
        # Sorted, so a row reads the same whichever scoring found a caveat first ("commit", "context", "scored").
        parts += [f"{', '.join(sort_protocols(ps))}: {text}" for text, ps in sorted(self.caveats.items())]
        off: dict[str, list[str]] = {}
        for p, dtype in self.dtypes.items():
            if dtype and dtype != EVAL_DTYPE and p in self.wikitext:
                off.setdefault(dtype, []).append(p)
        parts += [f"{', '.join(sort_protocols(ps))}: scored in {dtype}, not {EVAL_DTYPE} as the rest of the table "
                  f"(fix: --evaluate re-scores it in {EVAL_DTYPE})" for dtype, ps in off.items()]
        if self.tuned:
            parts.append(f"{PROTOCOL_BLOG}: tuned, the model was selected on WikiText-2 validation, the split this "
                         f"protocol scores (report the test-split hf-strided figures)")
        return "; ".join(parts)

    @property
    def tuned(self) -> bool:
        """Its sparknet-blog figure is not a test: the model was selected on the split that protocol scores."""
        return self.tuned_on == WIKITEXT_VALIDATION and PROTOCOL_BLOG in self.wikitext


def protocol_split(protocol: str) -> str:
    return "validation" if protocol == PROTOCOL_BLOG else "test"


def _stride(protocol: str) -> int:
    return int(protocol[len(STRIDED_PREFIX):]) if protocol.startswith(STRIDED_PREFIX) else 0


def sort_protocols(protocols: Sequence[str]) -> list[str]:
    """sparknet-blog first, then the strided protocols by stride; duplicates dropped."""
    return sorted(dict.fromkeys(protocols), key=lambda p: (p != PROTOCOL_BLOG, _stride(p)))


def bpb_protocols(protocols: Sequence[str]) -> list[str]:
    """The protocols with bits per byte (every strided one; sparknet-blog's loss is a mean of batch means over
    rows cut at 256 tokens, not a per-byte figure of any text), in table order."""
    return [p for p in sort_protocols(protocols) if p.startswith(STRIDED_PREFIX)]


def _metrics_of(result: EvalResult | dict) -> dict[str, float]:
    r = result.to_dict() if isinstance(result, EvalResult) else result
    out = {"loss": r["loss_nats"], "ppl": r["perplexity"]}
    if r.get("bits_per_byte") is not None:
        out["bpb"] = r["bits_per_byte"]
    return out


# What a model that loads but cannot be scored raises (ids outside its vocabulary, CUDA out of memory, a file
# cut short): a gap with the reason in the table, like an unreachable model, not a crash of the whole comparison.
EVAL_ERRORS = (SparknetError, ValueError, RuntimeError, OSError)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, SparknetError) else " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _result_caveats(results: Sequence[EvalResult | dict]) -> list[tuple[str, str]]:
    """(protocol, caveat) a reader must know to read a number correctly: the model's context was shorter than the
    protocol's length (a strided protocol then runs at the context: its numbers equal the smaller stride's; the
    blog protocol cuts rows shorter), or a score computed on a WikiText-2 copy that is not the canonical text (a
    trimmed copy is not comparable with the rest)."""
    out = []
    for result in results:
        r = result.to_dict() if isinstance(result, EvalResult) else result
        d = r.get("details") or {}
        if d.get("stride_clamped"):
            context = d.get("context_tokens") or d.get("stride_tokens")
            out.append((r["protocol"], f"context clamped to the model's {context} tokens, below the protocol's"))
        if d.get("max_tokens_clamped"):
            out.append((r["protocol"], f"context clamped to the model's {d.get('max_tokens')} tokens, below the "
                                       f"protocol's"))
        if d.get("data_canonical") is False:
            where = str(d.get("data_source", ""))
            out.append((r["protocol"], "scored on a non-canonical WikiText-2 copy"
                        + (f" in {Path(where).parent}" if where and not where.startswith("hub:") else "")))
    return out


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _score(model: Any, tokenizer: Any, protocols: Sequence[str], wikitext: str | None, device: str,
           batch_size: int) -> list[EvalResult]:
    """A loaded Hugging Face model (`sparknet.evaluate.load_hf_model`, float32) on WikiText-2, by the code the runs
    use."""
    from sparknet.evaluate import evaluate_wikitext, hf_context, hf_logits_fn, hf_tokenize

    return evaluate_wikitext(hf_logits_fn(model), hf_tokenize(tokenizer), len(tokenizer), hf_context(model),
                             list(protocols), local=wikitext, device=device, batch_size=batch_size, dtype=EVAL_DTYPE)


def _load_fp32(name_or_path: str, revision: str, device: str) -> tuple[Any, Any]:
    import torch

    from sparknet.evaluate import load_hf_model

    return load_hf_model(name_or_path, revision=revision, device=device, dtype=torch.float32)


# Texts whose GPT-2 ids are known (tiktoken's GPT-2 BPE, offline): a tokenizer that gives the same ids on them and
# has GPT-2's 50,257 entries is GPT-2's.
_GPT2_PROBES = (" = Valkyria Chronicles III = \n", "Hello world", " naïve café: 1,200 m — “quoted” ½ ∑x² \t end",
                "don't we'll they're 12345 @-@ <unk>")


def is_gpt2_tokenizer(tokenizer: Any) -> bool:
    """Whether a transformers tokenizer encodes like GPT-2's BPE (so its perplexities compare with GPT-2's)."""
    from sparknet.evaluate import hf_tokenize
    from sparknet.tokenizer import GPT2_VOCAB, TiktokenGPT2

    try:
        return len(tokenizer) == GPT2_VOCAB and hf_tokenize(tokenizer)(list(_GPT2_PROBES)) == \
            TiktokenGPT2().encode_batch(list(_GPT2_PROBES))
    except Exception:  # a tokenizer that cannot even encode the probes is not GPT-2's
        return False


# -- measured runs ------------------------------------------------------------------------------------------

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
            device = device or _device()
            try:
                results = _score(*_load_fp32(str(final), "main", device), todo, wikitext, device, batch_size)
            except EVAL_ERRORS as exc:
                reason = _reason(exc)
            else:
                metrics = {f"wikitext/{r.protocol}/{k}": v for r in results for k, v in _metrics_of(r).items()}
                kept = added | {r.protocol: {k: r.details.get(k) for k in _KEPT_DETAILS} for r in results}
                # Logged back, so the next compare (and the MLflow UI) has them without evaluating again; the tag
                # keeps what the caveats need, as result.json does for the run's own scores. A re-scored protocol
                # is logged at the same step, later: MLflow's latest value is the new one.
                tracking.log_to_run(uri, record.run_id, metrics, step=int(result.get("steps", 0)), tags={
                    "sparknet.wikitext_added": f"{', '.join(sort_protocols(kept))} by sparknet.compare --evaluate, "
                                               f"last at {time.strftime('%F %T')}",
                    ADDED_DETAILS_TAG: json.dumps(kept, separators=(",", ":"))})
                for r in results:
                    row.wikitext[r.protocol] = _metrics_of(r)
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


# -- baselines ----------------------------------------------------------------------------------------------


def split_baseline(spec: str) -> tuple[str, str]:
    """"ID", "ID@REVISION" or a local path -> (model, revision)."""
    if Path(spec).expanduser().exists() or "@" not in spec:
        return spec, "main"
    model, revision = spec.rsplit("@", 1)
    return model, revision or "main"


def folder_sha256(path: Path) -> str:
    """Content hash of a local model folder (its top-level files), so an edited or retrained folder at the same
    path gets new cache entries and a moved one keeps its old ones."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def baseline_identity(model: str) -> str:
    """What names a baseline in the cache: the hub id, or `local-sha256:<content>` for a folder."""
    path = Path(model).expanduser()
    return f"local-sha256:{folder_sha256(path)}" if path.is_dir() else model


def cache_key(identity: str, commit: str, dtype: str, protocol: str, data_sha256: str) -> str:
    """The cache file's name: everything that changes the number. `commit` is the hub commit the revision resolved
    to ("" for a local folder, whose identity is its content), never a branch name: "main" moves."""
    blob = json.dumps([CACHE_VERSION, identity, commit, dtype, protocol, data_sha256])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a reader sees the old file or the whole new one, never half of it


_RESULT_KEYS = ("protocol", "loss_nats", "perplexity")


def read_cache_entry(path: Path) -> dict:
    """One cache file, checked: a damaged one is a one-line error naming it (written atomically, a file is never
    half-written by compare, so damage came from elsewhere; it is not deleted for the user)."""
    fix = f"(fix: delete it, rm {path}, and score that baseline again with --evaluate)"
    try:
        entry = json.loads(path.read_text())
    except OSError as exc:
        raise SparknetError(f"{path}: cannot read this baseline cache entry ({exc.strerror or exc}) {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SparknetError(f"{path}: not a JSON baseline cache entry {fix}") from None
    result = entry.get("result") if isinstance(entry, dict) else None
    if not isinstance(result, dict) or any(not isinstance(result.get(k), (str, int, float)) for k in _RESULT_KEYS):
        raise SparknetError(f"{path}: a baseline cache entry without its result {fix}")
    return entry


def hf_cache_commit(model: str, revision: str) -> str:
    """The commit `revision` pointed at when the model was last downloaded into the local HF cache ("" if never):
    what a load with HF_HUB_OFFLINE=1 would read."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model, repo_type="model") / "refs" / revision
        sha = ref.read_text().strip() if ref.is_file() else ""
    except (ImportError, OSError, ValueError):
        return ""
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else ""


def resolve_commit(model: str, revision: str, hub_down: str) -> tuple[str, str]:
    """(commit, where it came from) for a hub model's revision: the revision itself when it is a commit sha, else
    the hub's answer (one call, when it is reachable), else the local HF cache's ref; ("", why not) otherwise."""
    from sparknet.evaluate import _hub_offline

    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision, "pinned"
    if not hub_down and not _hub_offline():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(model, revision=revision, timeout=10).sha or ""
            if sha:
                return sha, "hub"
        except Exception:  # an unknown id or revision: the load says why, if it is asked for
            pass
    sha = hf_cache_commit(model, revision)
    if sha:
        return sha, "HF cache"
    why = hub_down or ("HF_HUB_OFFLINE is set" if _hub_offline() else "the hub did not say")
    return "", f"{revision} could not be resolved to a commit ({why}) and is not in the local HF cache"


class BaselineCache:
    """`<lab>/baselines/<key>.json`, one file per (model, commit, dtype, protocol, text)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, identity: str, commit: str, protocol: str, data_sha256: str) -> Path:
        return self.folder / f"{cache_key(identity, commit, EVAL_DTYPE, protocol, data_sha256)}.json"

    def get(self, identity: str, commit: str, protocol: str, data_sha256: str) -> dict | None:
        path = self.path(identity, commit, protocol, data_sha256)
        return read_cache_entry(path) if path.is_file() else None

    def latest(self, identity: str, revision: str, protocol: str, data_sha256: str) -> dict | None:
        """The newest entry scored for `revision` (by name), for when the name cannot be resolved to a commit now
        (offline, and not in the HF cache): what it meant then, said so in the note."""
        found = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            entry = read_cache_entry(path)
            if (entry.get("identity"), entry.get("revision"), entry.get("dtype"), entry.get("protocol"),
                    entry.get("data_sha256"), entry.get("version")) == (identity, revision, EVAL_DTYPE, protocol,
                                                                         data_sha256, CACHE_VERSION):
                found.append(entry)
        return max(found, key=lambda e: float(e.get("created_ts", 0))) if found else None

    def put(self, entry: dict) -> Path:
        path = self.path(entry["identity"], entry["commit"], entry["protocol"], entry["data_sha256"])
        _write_atomic(path, entry | {"version": CACHE_VERSION, "dtype": EVAL_DTYPE})
        return path


class WikitextShas:
    """sha256 of each split's rows (part of a baseline's cache key), computed once per compare.

    A local copy (--wikitext or $SPARKNET_WIKITEXT) is read and hashed: a trimmed or different copy gets its own
    cache entries. Without one, the text is the hub's, whose hash is the canonical one, so no download is needed
    just to look the cache up."""

    def __init__(self, local: str | None):
        self.local = local or os.environ.get(WIKITEXT_ENV) or None
        self.shas: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def get(self, split: str) -> str:
        from sparknet.evaluate import load_wikitext, rows_sha256

        if split not in self.shas:
            self.shas[split] = WIKITEXT_SHA256[split]
            if self.local is not None:
                try:
                    self.shas[split] = rows_sha256(load_wikitext(split, self.local))
                except SparknetError as exc:  # shown as the baseline's gap reason if it has to be evaluated
                    self.errors[split] = str(exc)
        return self.shas[split]


_HUB_PROBE: dict[str, str] = {}
HUB_PROBE_S = 4.0  # the whole probe, name lookup included: offline must be known within 5 s


def hub_unreachable(timeout_s: float = HUB_PROBE_S) -> str:
    """"" when the Hugging Face hub answers an HTTP request, else why not (checked once per process, at most
    `timeout_s` seconds in all).

    Why: with the hub unreachable but HF_HUB_OFFLINE unset, huggingface_hub retries every file five times with
    backoff, ~45 s per model, and `datasets` likewise; knowing up front lets the load go straight to the local
    cache. An HTTP answer, not a TCP connection, is the test: a sandbox or firewall may accept every connection and
    never answer. Any status counts (even 404): the server is there. The request runs in a thread because no
    socket timeout bounds the name lookup (a dead resolver can take 20 s and more); proxies are honoured."""
    if "result" not in _HUB_PROBE:
        import urllib.error
        import urllib.request

        from huggingface_hub import constants

        url = constants.ENDPOINT.rstrip("/") + "/api/models/openai-community/gpt2"
        outcome: list[str] = []

        def probe() -> None:
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
                outcome.append("")
            except urllib.error.HTTPError:  # an answer, if not a 200
                outcome.append("")
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                outcome.append(f"{constants.ENDPOINT} did not answer: {getattr(reason, 'strerror', None) or reason}")

        worker = threading.Thread(target=probe, daemon=True)  # daemon: a hung lookup must not hold the exit
        worker.start()
        worker.join(timeout_s)
        _HUB_PROBE["result"] = outcome[0] if outcome else f"{constants.ENDPOINT} did not answer within {timeout_s:g} s"
    return _HUB_PROBE["result"]


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """huggingface_hub's offline switch for the duration of one load: transformers reads it at call time, so a
    model in the local HF cache still loads and a missing one fails at once instead of after retries."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _tokenizer_label(info: dict | None) -> tuple[str, bool | None]:
    if not info:
        return "", None
    if info.get("gpt2"):
        return "gpt2", True
    name = str(info.get("name") or "")
    return f"{Path(name).name if Path(name).is_absolute() else name} ({int(info.get('vocab_size', 0)):,})", False


def baseline_row(spec: str, protocols: Sequence[str], *, lab: Path, evaluate: bool, wikitext: str | None,
                 shas: WikitextShas, device: str | None, batch_size: int, log: Any = print) -> Row:
    """The row of one baseline: cached results, plus (with `evaluate`) the missing protocols scored and cached."""
    from sparknet.evaluate import _hub_offline  # the same test load_hf_model's message uses

    model, revision = split_baseline(spec)
    row = Row(KIND_BASELINE, MEASURED, spec)
    local = Path(model).expanduser().exists()
    if not local and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
        # Meant as a folder (a hub id is "owner/name"): say so, rather than blame the hub for a typo in a path.
        row.notes.append(f"no such model folder: {model}")
        return row
    try:
        identity = baseline_identity(model)
    except OSError as exc:
        row.notes.append(f"cannot read {model} ({exc.strerror or exc})")
        return row
    cache = BaselineCache(lab / "baselines")
    down = "" if local or _hub_offline() else hub_unreachable()
    commit, how = ("", "local") if local else resolve_commit(model, revision, down)
    row.commit = commit
    missing = []
    for p in protocols:
        data_sha = shas.get(protocol_split(p))
        entry = cache.get(identity, commit, p, data_sha) if commit or local else None
        if entry is None and not commit and not local:
            entry = cache.latest(identity, revision, p, data_sha)
            if entry is not None:
                row.commit = str(entry.get("commit", ""))
                row.caveats.setdefault(f"commit {row.commit[:12]}, what {revision} was when scored on "
                                       f"{entry.get('created', '?')} ({how})", []).append(p)
        if entry is None:
            missing.append(p)
            continue
        row.wikitext[p] = _metrics_of(entry["result"])
        row.dtypes[p] = str(entry.get("dtype", ""))
        row.add_caveats([entry["result"]])
        row.params = entry.get("params", row.params)
        row.tokenizer, row.gpt2_tokenizer = _tokenizer_label(entry.get("tokenizer"))
    if not missing:
        return row
    if not evaluate:
        row.notes.append(f"{', '.join(missing)}: not evaluated yet (fix: --evaluate; computed once, then cached "
                         f"in {cache.folder})")
        return row
    data_errors = {shas.errors[s] for s in {protocol_split(p) for p in missing} if s in shas.errors}
    if data_errors:
        row.notes.append(f"{', '.join(missing)}: not evaluated ({'; '.join(sorted(data_errors))})")
        return row

    device = device or _device()
    log(f"evaluating baseline {spec} on {', '.join(missing)} (once: cached in {cache.folder}) ...")
    try:
        with _offline(bool(down)):
            # By its name (so the HF cache learns where the name points, for offline lookups later); the cache key
            # takes the commit that was loaded, whatever the name resolved to a moment ago.
            hf_model, tokenizer = _load_fp32(model, revision, device)
    except SparknetError as exc:
        prefix = "cannot load it" if local else f"not reachable ({down})" if down \
            else "not reachable offline" if _hub_offline() else "not reachable"
        row.notes.append(f"{', '.join(missing)}: {prefix}: {exc}")
        return row
    # num_parameters() counts each tensor once, so GPT-2's tied input/output embedding counts once (124.44M).
    params = int(hf_model.num_parameters())
    row.params = float(params)
    tok_info = {"name": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
                "gpt2": is_gpt2_tokenizer(tokenizer)}
    row.tokenizer, row.gpt2_tokenizer = _tokenizer_label(tok_info)
    try:
        results = _score(hf_model, tokenizer, missing, wikitext, device, batch_size)
    except EVAL_ERRORS as exc:
        row.notes.append(f"{', '.join(missing)}: not evaluated ({_reason(exc)})")
        return row
    loaded = "" if local else str(getattr(hf_model.config, "_commit_hash", "") or commit)
    row.commit = loaded
    for r in results:
        cache.put({"model": model, "revision": revision, "commit": loaded, "identity": identity,
                   "protocol": r.protocol, "data_sha256": r.details.get("data_sha256") or shas.get(r.split),
                   "params": params, "tokenizer": tok_info, "device": device, "created": time.strftime("%F %T"),
                   "created_ts": time.time(),
                   "result": r.to_dict()})
        row.wikitext[r.protocol] = _metrics_of(r)
        row.dtypes[r.protocol] = EVAL_DTYPE
    row.add_caveats(results)
    return row


# -- reported -----------------------------------------------------------------------------------------------


def reported_rows(protocols: Sequence[str]) -> list[Row]:
    """The published rows that have a figure under at least one of `protocols`."""
    rows = []
    for rep in REPORTED:
        figures = {p: (loss, ppl) for p, loss, ppl in rep.figures if p in protocols}
        if not figures:
            continue
        row = Row(KIND_REPORTED, f"reported ({rep.who})", rep.model, params=rep.params, tokens=rep.tokens,
                  mixture=rep.mixture, wall_s=rep.wall_h * 3600 if rep.wall_h is not None else None,
                  approximate=rep.approximate, notes=[rep.note] if rep.note else [], tokenizer="gpt2",
                  gpt2_tokenizer=True)
        for p, (loss, ppl) in figures.items():
            row.wikitext[p] = {"ppl": ppl} | ({"loss": loss} if loss is not None else {})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# The table and its renderings
# ---------------------------------------------------------------------------------------------------------


def comparison_frame(rows: Sequence[Row], protocols: Sequence[str]) -> pd.DataFrame:
    """One DataFrame row per Row: kind, source, model, run_id, tokenizer, params_M, tokens, mixture, then the
    comparable numbers first: `<protocol> bpb` for every strided protocol, `<protocol> ppl`, `<protocol> loss`, then
    `val loss` (mean over sources), `val/<source>`, eval dtype, commit, tokens/s, wall time h, note. Missing numbers
    are NaN."""
    import pandas as pd

    protocols = sort_protocols(protocols)
    sources = sorted({s for r in rows for s in r.val})
    records = []
    for r in rows:
        rec: dict[str, Any] = {"kind": r.kind, "source": r.source, "model": r.model, "run_id": r.run_id,
                               "tokenizer": r.tokenizer,
                               "params_M": r.params / 1e6 if r.params is not None else math.nan,
                               "tokens": r.tokens if r.tokens is not None else math.nan, "mixture": r.mixture}
        for p in bpb_protocols(protocols):
            rec[f"{p} bpb"] = r.wikitext.get(p, {}).get("bpb", math.nan)
        for k in ("ppl", "loss"):
            for p in protocols:
                rec[f"{p} {k}"] = r.wikitext.get(p, {}).get(k, math.nan)
        rec["val loss"] = r.val_mean if r.val_mean is not None else math.nan
        for s in sources:
            rec[f"val/{s}"] = r.val.get(s, math.nan)
        rec["eval dtype"] = ", ".join(sorted({d for p, d in r.dtypes.items() if d and p in r.wikitext}))
        rec["commit"] = r.commit
        rec["tokens/s"] = r.tokens_per_s if r.tokens_per_s is not None else math.nan
        rec["wall time h"] = r.wall_s / 3600 if r.wall_s is not None else math.nan
        rec["note"] = r.note()
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    frame["tokens"] = frame["tokens"].astype("Int64")  # a count: "16384" in the CSV, not "16384.0"
    # Which rows hold approximate published figures ("≈" in the markdown; the CSV keeps plain numbers), and whose
    # perplexities are in another tokenizer's tokens (kept apart in the plot, marked in the terminal table).
    frame.attrs["approximate"] = [r.approximate for r in rows]
    frame.attrs["other_tokenizer"] = [r.other_tokenizer for r in rows]
    frame.attrs["tuned"] = [r.tuned for r in rows]
    return frame


def _cell(column: str, value: Any, approximate: bool = False) -> str:
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\n", " ")
    import pandas as pd

    if pd.isna(value):  # NaN, None, or pandas' NA in the integer tokens column
        return GAP
    v = float(value)
    if column == "params_M":
        text = f"{v:.2f}"
    elif column in ("tokens", "tokens/s"):
        text = f"{v:,.0f}"
    elif column.endswith(" ppl"):
        text = f"{v:,.0f}" if v >= 1000 else f"{v:.2f}" if not approximate else f"{v:g}"
    elif column == "wall time h":
        text = f"{v:.3g}"
    else:  # losses, bits per byte
        text = f"{v:.4f}"
    return f"≈{text}" if approximate and column.endswith(" ppl") else text


def formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as display strings: "—" for a missing number, "≈" for approximate published figures."""
    approx = frame.attrs.get("approximate", [False] * len(frame))
    out = frame.copy().astype(object)
    for i in range(len(frame)):
        for c in frame.columns:
            out.iat[i, frame.columns.get_loc(c)] = _cell(c, frame.iat[i, frame.columns.get_loc(c)], approx[i])
    return out


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (written here: pandas' to_markdown needs the optional `tabulate`)."""
    text = formatted(frame)
    lines = ["| " + " | ".join(text.columns) + " |",
             "|" + "|".join("---:" if frame[c].dtype.kind in "fi" else "---" for c in frame.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in text.itertuples(index=False)]
    return "\n".join(lines)


def _notes_block(frame: pd.DataFrame, width: int) -> str:
    notes = []
    for i, n in enumerate(frame["note"]):
        if n:
            notes += textwrap.wrap(f"{i + 1}. {n}", width=width, initial_indent="  ", subsequent_indent="     ",
                                   break_on_hyphens=False)
    return ("\nnotes:\n" + "\n".join(notes)) if notes else ""


def to_text_wide(frame: pd.DataFrame, width: int = 120) -> str:
    """Every column (as in the CSV and markdown), notes listed under it instead of a very wide last column."""
    text = formatted(frame).drop(columns=["note"])
    text.insert(0, "#", [str(i + 1) for i in range(len(text))])
    return text.to_string(index=False) + _notes_block(frame, width)


def _short(protocol: str) -> str:
    return "blog" if protocol == PROTOCOL_BLOG else f"@{_stride(protocol)}"


def _human_count(v: Any) -> str:
    import pandas as pd

    if v is None or pd.isna(v):
        return GAP
    v = float(v)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(1, width - 1)] + "…"


_KIND_HEADINGS = {KIND_RUN: "measured runs", KIND_BASELINE: "measured baselines (scored here, cached)",
                  KIND_REPORTED: "reported (published figures, not measured here)"}


def terminal_width() -> int:
    """The terminal's width, within [80, 200]; 120 when there is no terminal (a pipe, a log, a test)."""
    return max(80, min(200, shutil.get_terminal_size((120, 24)).columns))


def to_text(frame: pd.DataFrame, protocols: Sequence[str] | None = None, width: int | None = None) -> str:
    """The compact table for a terminal: model, tokens, mixture, bits per byte and perplexity per protocol (bits
    per byte first: it compares across tokenizers), mean validation loss; rows grouped by kind under a heading,
    numbered for the notes below. The mixture column takes what the width leaves (clipped with "…")."""
    width = width or terminal_width()
    protocols = sort_protocols(protocols or [c[:-4] for c in frame.columns if c.endswith(" ppl")])
    approx = frame.attrs.get("approximate", [False] * len(frame))
    other = frame.attrs.get("other_tokenizer", [False] * len(frame))
    tuned = frame.attrs.get("tuned", [False] * len(frame))
    numeric = [(f"bpb{_short(p)}", f"{p} bpb") for p in bpb_protocols(protocols)]
    numeric += [(f"ppl{_short(p)}" if _short(p).startswith("@") else f"ppl {_short(p)}", f"{p} ppl")
                for p in protocols]
    numeric.append(("val loss", "val loss"))
    cells = []
    for i in range(len(frame)):
        values = []
        for _, col in numeric:
            text = _cell(col, frame[col].iat[i], approx[i]) if col in frame else GAP
            if col.endswith(" ppl") and other[i] and text != GAP:
                text += "*"  # counted in another tokenizer's tokens: see the legend
            if col == f"{PROTOCOL_BLOG} ppl" and tuned[i] and text != GAP:
                text += "†"  # selected on the split it scores: see the legend
            values.append(text)
        cells.append((str(i + 1), str(frame["model"].iat[i]), _human_count(frame["tokens"].iat[i]),
                      str(frame["mixture"].iat[i]) or GAP, values))
    w_num = [max(len(h), *(len(c[4][j]) for c in cells)) for j, (h, _) in enumerate(numeric)] if cells else []
    w_idx = max([1, *(len(c[0]) for c in cells)])
    w_model = min(36, max([5, *(len(c[1]) for c in cells)]))
    w_tokens = max([6, *(len(c[2]) for c in cells)])
    fixed = w_idx + w_model + w_tokens + sum(w_num) + 2 * (3 + len(numeric)) + 2
    w_mix = max(12, min(max([7, *(len(c[3]) for c in cells)]), width - fixed))

    def line(idx: str, model: str, tokens: str, mixture: str, values: Sequence[str]) -> str:
        parts = [idx.rjust(w_idx), _clip(model, w_model).ljust(w_model), tokens.rjust(w_tokens),
                 _clip(mixture, w_mix).ljust(w_mix)] + [v.rjust(w) for v, w in zip(values, w_num)]
        return "  ".join(parts).rstrip()

    out = [line("#", "model", "tokens", "mixture", [h for h, _ in numeric])]
    kind = None
    for i, c in enumerate(cells):
        if frame["kind"].iat[i] != kind:
            kind = frame["kind"].iat[i]
            out.append(f"-- {_KIND_HEADINGS.get(kind, kind)}")
        out.append(line(*c))
    legend = ["bpb = bits per byte (compares across tokenizers), ppl = perplexity, @N = hf-strided-N, blog = "
              "sparknet-blog; val loss = mean held-out loss over the run's sources (its own tokenizer and data)"]
    if any(other):
        legend.append(f"* not GPT-2's tokenizer: {NOT_GPT2}")
    if any(tuned):
        legend.append("† tuned: the model was selected on WikiText-2 validation, the split sparknet-blog scores")
    if any(approx):
        legend.append("≈ approximate published figure")
    legend.append(f"{GAP} no value: the notes say why; every column: --wide, compare.csv, compare.md")
    wrapped = [w for item in legend for w in textwrap.wrap(item, width=width, subsequent_indent="  ")]
    return "\n".join(out) + "\n" + "\n".join(wrapped) + _notes_block(frame, width)


def plot_layout(frame: pd.DataFrame, protocols: Sequence[str]) -> dict[str, Any]:
    """What perplexity.png draws, in order: panels (bits per byte first, one per strided protocol with any value;
    then perplexity per protocol) and the rows top to bottom, those whose perplexity is in another tokenizer's
    tokens after a separator, so that no bar of theirs stands among the GPT-2 rows."""
    protocols = sort_protocols(protocols)
    panels = [("bpb", p) for p in bpb_protocols(protocols)
              if f"{p} bpb" in frame and any(_finite(v) for v in frame[f"{p} bpb"])]
    panels += [("ppl", p) for p in protocols] or [("ppl", "(no protocol)")]
    other = frame.attrs.get("other_tokenizer", [False] * len(frame))
    same = [i for i in range(len(frame)) if not other[i]]
    apart = [i for i in range(len(frame)) if other[i]]
    return {"panels": panels, "rows": same + apart, "apart_from": len(same) if apart else None}


def perplexity_png(frame: pd.DataFrame, protocols: Sequence[str], path: Path) -> Path:
    """Horizontal bars, one panel per number (`plot_layout`): bits per byte on a linear axis from 0, then perplexity
    on one log axis starting at 1 (the best possible perplexity), so GPT-2's ~30 and an untrained model's ~50,000
    are both readable and bar lengths compare across panels. Rows with another tokenizer than GPT-2's sit below a
    line, hatched and labelled in the perplexity panels. Reported figures are hatched grey; a gap is written as
    text, never drawn as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = plot_layout(frame, protocols)
    order, apart = layout["rows"], layout["apart_from"]
    approx = frame.attrs.get("approximate", [False] * len(frame))
    other = frame.attrs.get("other_tokenizer", [False] * len(frame))
    labels = [f"{frame['model'].iat[i]} [{frame['kind'].iat[i]}]" + (" *" if other[i] else "") for i in order]
    colors = {KIND_RUN: "tab:blue", KIND_BASELINE: "tab:orange", KIND_REPORTED: "0.6"}
    ppl_values = [float(frame[f"{p} ppl"].iat[i]) for kind, p in layout["panels"] if kind == "ppl"
                  and f"{p} ppl" in frame for i in order if _finite(frame[f"{p} ppl"].iat[i])]
    bpb_values = [float(frame[f"{p} bpb"].iat[i]) for kind, p in layout["panels"] if kind == "bpb"
                  for i in order if _finite(frame[f"{p} bpb"].iat[i])]
    n = len(layout["panels"])
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n + 2.5, 1.4 + 0.42 * max(1, len(frame))), dpi=110, sharey=True,
                             squeeze=False)
    for ax, (kind, p) in zip(axes[0], layout["panels"]):
        column = f"{p} {kind}"
        for y, i in enumerate(order):
            v = frame[column].iat[i] if column in frame else math.nan
            row_kind = frame["kind"].iat[i]
            if _finite(v):
                v = float(v)
                hatch = "//" if row_kind == KIND_REPORTED else "xx" if kind == "ppl" and other[i] else None
                left = 1 if kind == "ppl" else 0
                ax.barh(y, v - left, left=left, color=colors.get(row_kind, "tab:blue"), hatch=hatch,
                        alpha=0.55 if kind == "ppl" and other[i] else 1.0, edgecolor="black", linewidth=0.5)
                ax.text(v, y, " " + _cell(column, v, approx[i]), va="center", fontsize=7)
            else:
                ax.text(1.1 if kind == "ppl" else 0.02, y, f"{GAP} no value", va="center", fontsize=7, color="0.45")
        if kind == "ppl":
            ax.set_xscale("log")
            ax.set_xlim(1, max(ppl_values, default=10.0) * 4)  # room for the value written after the longest bar
            ax.set_xlabel("perplexity (log scale, lower is better)", fontsize=8)
            ax.set_title(f"WikiText-2 {p}: perplexity", fontsize=9)
        else:
            ax.set_xlim(0, max(bpb_values, default=1.0) * 1.35)
            ax.set_xlabel("bits per byte (lower is better)", fontsize=8)
            ax.set_title(f"WikiText-2 {p}: bits per byte", fontsize=9)
        if apart is not None:
            ax.axhline(apart - 0.5, color="black", linewidth=1.2, linestyle="--")
            if kind == "ppl":
                ax.text(0.99, apart - 0.45, "below: not GPT-2's tokenizer,\nperplexity not comparable",
                        transform=ax.get_yaxis_transform(), ha="right", va="top", fontsize=6, color="0.3")
        ax.grid(axis="x", alpha=0.3, which="major")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("Compare bits per byte across tokenizers; perplexity only between rows with the same tokenizer"
                 + (f" (* {NOT_GPT2})" if apart is not None else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CompareOptions:
    """What `python -m sparknet.compare` was asked; see `main` for the flags."""

    lab: Path = Path("lab")
    tracking_uri: str = ""
    experiments: tuple[str, ...] = ()  # empty: every experiment but sparknet-compare
    run_ids: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    trials: str = TRIALS_NONE  # sweep/ablation trials: none, all, or the best of each study
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    protocols: tuple[str, ...] = ()  # empty: the default three plus any other the runs were scored under
    reported: bool = True
    evaluate: bool = False
    evaluate_only: str = ""  # with evaluate: "runs" or "baselines" to score only those ("": both)
    wikitext: str | None = None
    out: Path | None = None
    log: bool = True
    device: str | None = None
    batch_size: int = 8
    timeout_s: float = 10.0


@dataclass
class Comparison:
    frame: pd.DataFrame
    rows: list[Row]
    protocols: list[str]
    out_dir: Path
    files: dict[str, Path]
    uri: str
    mlflow_run_id: str | None = None
    trials_left_out: dict[str, int] = field(default_factory=dict)  # study -> trials not in the table


def _describe_filters(opts: CompareOptions, uri: str) -> str:
    parts = [f"experiments {', '.join(opts.experiments)}" if opts.experiments
             else f"all experiments but {COMPARE_EXPERIMENT}"]
    if opts.tags:
        parts.append("tags " + ", ".join(f"{k}={v}" for k, v in opts.tags.items()))
    if opts.run_ids:
        parts.append(f"run ids {', '.join(opts.run_ids)}")
    return f"{'; '.join(parts)} at {uri}"


def describe_trials(left_out: dict[str, int], mode: str) -> str:
    """One line on the trials not in the table ("" when none were left out)."""
    if not left_out:
        return ""
    n = sum(left_out.values())
    studies = ", ".join(f"{s} ({k})" for s, k in sorted(left_out.items()))
    more = "--include-trials shows every trial" + ("" if mode == TRIALS_BEST else ", --best-trials one per study")
    what = "other trials" if mode == TRIALS_BEST else "sweep/ablation trials"
    return f"{n} {what} left out, of studies {studies} ({more})"


def _out_dir(opts: CompareOptions) -> Path:
    if opts.out is not None:
        out = Path(opts.out)
        if out.exists() and not out.is_dir():
            raise SparknetError(f"--out {out}: is a file, not a folder (fix: name a new or existing folder; the "
                                f"comparison writes compare.md, compare.csv and perplexity.png into it)")
        return out
    base = opts.lab / "compare" / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():  # two compares in the same second keep both
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def compare(opts: CompareOptions, log: Any = print) -> Comparison:
    """Read the runs, build every row, write compare.md / compare.csv / perplexity.png and log them."""
    from sparknet import tracking

    uri = tracking.resolve_uri(opts.tracking_uri, opts.lab)
    tracking.check_store(uri)
    if opts.protocols:
        parse_protocols(opts.protocols)  # unknown names fail here, before any work
    out_dir = _out_dir(opts)  # a bad --out fails before any work too
    # Runs that ended while this store's server was down: their backlog and final status first.
    tracking.replay_lab(opts.lab, uri, timeout_s=opts.timeout_s, log=log)
    records, skipped = tracking.find_runs(
        uri, list(opts.experiments) or None, list(opts.run_ids), opts.tags, require_tag=RUN_TAG,
        exclude_experiments=(COMPARE_EXPERIMENT,), timeout_s=opts.timeout_s)
    records, trials_left, trial_notes = select_trials(records, opts.trials, opts.run_ids)
    if not records:
        left = [f"{n} {s.lower()}" for s, n in skipped.items()]
        if trials_left:
            left.append(f"{sum(trials_left.values())} sweep/ablation trials")
        why = f" ({', '.join(left)} left out: only finished runs that are not trials count unless named with " \
              f"--run-id, or --include-trials / --best-trials)" if left else ""
        raise SparknetError(f"no finished training runs match {_describe_filters(opts, uri)}{why} (fix: check the "
                            f"filters, or train one: python -m sparknet.run mixtures/quickstart.yaml)")

    found = {m.group(1) for r in records for k in r.metrics
             if (m := re.fullmatch(r"wikitext/(sparknet-blog|hf-strided-[1-9]\d*)/ppl", k))}
    protocols = sort_protocols(opts.protocols or (*DEFAULT_PROTOCOLS, *found))
    rows = []
    for r in records:
        row = run_row(r, protocols, uri=uri, evaluate=opts.evaluate and opts.evaluate_only != "baselines",
                      wikitext=opts.wikitext, device=opts.device,
                      batch_size=opts.batch_size, log=log, asked=bool(opts.protocols))
        if r.run_id in trial_notes:
            row.notes.insert(0, trial_notes[r.run_id])
            if opts.trials == TRIALS_BEST and objective_value(r)[0] == "wikitext-valid/bpb":
                row.tuned_on = WIKITEXT_VALIDATION  # the best of its study on WikiText-2 validation: selected on it
        rows.append(row)
    # Best first by the comparable number (bits per byte at the longest stride), then by the first protocol's
    # perplexity; stable, so ties keep the start order.
    bpb_p = (bpb_protocols(protocols) or [None])[-1]
    rows.sort(key=lambda r: (r.wikitext.get(bpb_p, {}).get("bpb", math.inf) if bpb_p else math.inf,
                             r.wikitext.get(protocols[0], {}).get("ppl", math.inf)))
    shas = WikitextShas(opts.wikitext)
    rows += [baseline_row(b, protocols, lab=opts.lab, evaluate=opts.evaluate and opts.evaluate_only != "runs",
                          wikitext=opts.wikitext, shas=shas,
                          device=opts.device, batch_size=opts.batch_size, log=log) for b in opts.baselines]
    if opts.reported:
        rows += reported_rows(protocols)
    frame = comparison_frame(rows, protocols)

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SparknetError(f"--out {out_dir}: cannot create it ({exc.strerror or exc}) (fix: name a folder in a "
                            f"writable place)") from None
    files = {"md": out_dir / "compare.md", "csv": out_dir / "compare.csv", "png": out_dir / "perplexity.png"}
    frame.to_csv(files["csv"], index=False)
    trials_line = describe_trials(trials_left, opts.trials)
    files["md"].write_text(
        f"# WikiText-2 comparison ({time.strftime('%F %T')})\n\n"
        f"Runs: {_describe_filters(opts, uri)}. Baselines: {', '.join(opts.baselines) or 'none'}."
        + (f" {trials_line[0].upper()}{trials_line[1:]}." if trials_line else "") + "\n\n"
        f"{to_markdown(frame)}\n\n"
        f"- Comparable numbers first: `<protocol> bpb` = bits per byte over the protocol's text, which compares "
        f"across tokenizers; perplexity and loss compare only between rows with the same tokenizer (a row with "
        f"another tokenizer than GPT-2's says so in `note`).\n"
        f"- `kind`: *measured run* = a training run's logged metrics; *measured baseline* = scored here by "
        f"`sparknet.evaluate` (cached in `{opts.lab / 'baselines'}` by model, resolved commit, dtype, protocol and "
        f"text); *reported* = published figures, not measured here.\n"
        f"- Protocols: `sparknet-blog` = SparkNet's (validation, 2000 shuffled rows, 256 tokens, mean of batch "
        f"means; no bits per byte); `hf-strided-N` = Hugging Face's fixed-length perplexity over the test split at "
        f"stride N.\n"
        f"- `eval dtype`: what the numbers were computed in; the policy is {EVAL_DTYPE}.\n"
        f"- `val loss`: mean held-out loss over the run's own sources (in its own tokenizer).\n"
        f"- {GAP}: no value; the `note` column says why.\n")
    perplexity_png(frame, protocols, files["png"])
    result = Comparison(frame, rows, protocols, out_dir, files, uri, trials_left_out=trials_left)
    if opts.log:
        ids = [r.run_id for r in rows if r.run_id]
        result.mlflow_run_id = tracking.log_comparison(
            uri, COMPARE_EXPERIMENT, out_dir.name,
            params={"run_ids": ",".join(ids), "baselines": ",".join(opts.baselines), "protocols": ",".join(protocols),
                    "filters": _describe_filters(opts, uri), "evaluate": (opts.evaluate_only or "all") if opts.evaluate else "no", "trials": opts.trials},
            tags={"sparknet.compare.num_runs": str(len(ids))}, files=list(files.values()), timeout_s=opts.timeout_s)
    return result


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SparknetError(f"--tag {item!r}: expected KEY=VALUE (fix: e.g. --tag sparknet.mixture=quickstart)")
        tags[key.strip()] = value
    return tags


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparknet.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", action="append", default=[], metavar="NAME",
                    help="MLflow experiment to read runs from (repeatable; default: all but sparknet-compare)")
    ap.add_argument("--run-id", action="append", default=[], metavar="ID",
                    help="a run to include whatever its experiment, tags, status or trial-ness (repeatable)")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="keep only runs with this tag value, e.g. sparknet.mixture=quickstart (repeatable)")
    trials = ap.add_mutually_exclusive_group()
    trials.add_argument("--include-trials", action="store_true",
                        help="include every sweep/ablation trial (default: trials are left out, and counted)")
    trials.add_argument("--best-trials", action="store_true",
                        help="include one row per sweep/ablation study: its finished trial with the lowest value "
                             "of the study's objective (tag sparknet.objective; default the mean validation loss)")
    ap.add_argument("--baseline", action="append", default=[], metavar="ID_OR_PATH",
                    help="extra baseline: a hub id (ID@REVISION pins one) or a local model folder (repeatable)")
    ap.add_argument("--no-default-baselines", action="store_true",
                    help=f"leave out {' and '.join(DEFAULT_BASELINES)}")
    ap.add_argument("--no-reported", action="store_true", help="leave out the published reference rows")
    ap.add_argument("--protocols", default="", metavar="P1,P2",
                    help=f"WikiText-2 protocols (default: {','.join(DEFAULT_PROTOCOLS)} plus any the runs have)")
    ap.add_argument("--evaluate", nargs="?", const="all", choices=("all", "runs", "baselines"), default=None,
                    metavar="runs|baselines",
                    help="score what is missing: uncached baselines, and runs without WikiText-2 results (logged "
                         f"back to the run) or with results in another dtype than {EVAL_DTYPE}; `--evaluate runs` "
                         "scores only the runs (GPT-2: tens of minutes on 2 CPU cores, seconds on a GPU)")
    ap.add_argument("--wikitext", default=None, metavar="DIR",
                    help="local WikiText-2 copy (default: $SPARKNET_WIKITEXT, else the hub)")
    ap.add_argument("--tracking-uri", default="", metavar="URI",
                    help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<lab>/mlflow.db)")
    ap.add_argument("--lab", default="lab", metavar="DIR", help="the lab folder (default: lab)")
    ap.add_argument("--name", default=None, help="name of the comparison: output in <lab>/compare/NAME and the "
                    "MLflow run's name (default: the date and time)")
    ap.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <lab>/compare/<name>)")
    ap.add_argument("--no-log", action="store_true", help=f"do not log the comparison to {COMPARE_EXPERIMENT}")
    ap.add_argument("--wide", action="store_true",
                    help="print every column (as in compare.csv and compare.md), not the compact table")
    ap.add_argument("--device", default=None, help="device for --evaluate (default: cuda if available, else cpu)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass for --evaluate")
    ap.add_argument("--check-hub", action="store_true",
                    help=f"only say whether the Hugging Face hub answers (one probe, at most {HUB_PROBE_S:g} s): "
                         f"exit 0 if it does, 1 if not (scripts/quickstart.sh uses it)")
    args = ap.parse_args(argv)
    if args.check_hub:
        down = hub_unreachable()
        print(f"the Hugging Face hub is not reachable: {down}" if down else "the Hugging Face hub answers")
        return 1 if down else 0
    if args.batch_size < 1:
        raise SparknetError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", args.name):
        raise SparknetError(f"--name {args.name!r}: not a safe folder name (fix: letters, digits, '.', '_', '-')")
    out = Path(args.out) if args.out else Path(args.lab) / "compare" / args.name if args.name else None
    opts = CompareOptions(
        lab=Path(args.lab), tracking_uri=args.tracking_uri, experiments=tuple(args.experiment),
        run_ids=tuple(args.run_id), tags=parse_tags(args.tag),
        trials=TRIALS_ALL if args.include_trials else TRIALS_BEST if args.best_trials else TRIALS_NONE,
        baselines=tuple(dict.fromkeys(([] if args.no_default_baselines else list(DEFAULT_BASELINES)) + args.baseline)),
        protocols=tuple(p.strip() for p in args.protocols.split(",") if p.strip()), reported=not args.no_reported,
        evaluate=args.evaluate is not None, evaluate_only="" if args.evaluate in (None, "all") else args.evaluate,
        wikitext=args.wikitext, out=out, log=not args.no_log,
        device=args.device, batch_size=args.batch_size)
    if opts.evaluate:  # a progress bar per model load is noise next to our one line per evaluation
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = compare(opts, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(to_text_wide(result.frame, terminal_width()) if args.wide else to_text(result.frame, result.protocols))
    trials_line = describe_trials(result.trials_left_out, opts.trials)
    if trials_line:
        print(trials_line)
    unscored = [r.model for r in result.rows if r.kind == KIND_BASELINE and len(r.wikitext) < len(result.protocols)
                and not any("no such model folder" in n or "cannot read" in n for n in r.notes)]
    if unscored and opts.evaluate_only == "runs":
        print(f"baselines not scored (--evaluate runs): {', '.join(unscored)}; `python -m sparknet.compare "
              f"--evaluate baselines` scores them once (cached; GPT-2: tens of minutes on 2 CPU cores, seconds on a GPU)")
    print(f"\nwritten: {', '.join(str(p) for p in result.files.values())}")
    if result.mlflow_run_id:
        print(f"logged: run {result.mlflow_run_id} in experiment {COMPARE_EXPERIMENT!r} at {result.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
