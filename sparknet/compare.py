"""python -m sparknet.compare: one table of our runs, baseline models and published figures on WikiText-2.

Rows come in three kinds, kept apart in every output (the `kind` and `source` columns):

- `measured run`: a training run read back from MLflow (filter by --experiment, --run-id, --tag). Its WikiText-2
  numbers are the metrics the run logged (`wikitext/<protocol>/loss|ppl|bpb`); model size, tokens, realized
  mixture, per-source validation loss, tokens/s and wall time come from the same run.
- `measured baseline`: a Hugging Face model (hub id, `ID@REVISION`, or a local folder) scored here by the same
  `sparknet.evaluate.evaluate_wikitext` the runs use. Results are cached per (model, revision, protocol, WikiText
  text sha256) in `<lab>/baselines/<sha>.json`, so GPT-2 is evaluated once per protocol, ever.
- `reported`: figures others published (`REPORTED`, from DESIGN.md), never recomputed and never mixed with the
  measured ones.

Nothing is evaluated unless `--evaluate` is given: without it compare only reads (MLflow and the baseline cache)
and finishes in seconds, and what is missing is a gap marked "—" whose reason is in the `note` column. With
`--evaluate` it scores what is missing: uncached baselines, and runs without WikiText-2 results (their final
model, from the `sparknet.final_model` tag, when it is on this disk); the run's new metrics are logged back to
that run, so they too are computed once. An unreachable baseline (offline hub, unknown id) stays a gap.

Outputs (`<lab>/compare/<timestamp>/` or --out): compare.md, compare.csv (full precision, NaN for gaps),
perplexity.png, and, unless --no-log, a run in the MLflow experiment `sparknet-compare` holding the three.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparknet.errors import SparknetError, cli_main
from sparknet.evaluate import (
    DEFAULT_PROTOCOLS,
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
CACHE_VERSION = 1  # bump when a change in evaluate.py changes the numbers: old entries are then ignored
RUN_TAG = "sparknet.mixture"  # every training run has it; sweep parents and comparison runs do not


# ---------------------------------------------------------------------------------------------------------
# Published figures (DESIGN.md, "Reference facts"). Only what is written there: nothing derived from it.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reported:
    """One published row: per protocol (loss or None when only a perplexity was published, perplexity)."""

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
    wikitext: dict[str, dict[str, float]] = field(default_factory=dict)  # protocol -> loss/ppl/bpb
    val: dict[str, float] = field(default_factory=dict)  # source -> held-out loss
    tokens_per_s: float | None = None
    wall_s: float | None = None
    notes: list[str] = field(default_factory=list)
    caveats: dict[str, list[str]] = field(default_factory=dict)  # caveat -> the protocols it applies to
    approximate: bool = False  # reported figures given as "≈"

    def add_caveats(self, results: Sequence[EvalResult | dict]) -> None:
        for protocol, text in _result_caveats(results):
            if protocol not in self.caveats.setdefault(text, []):
                self.caveats[text].append(protocol)

    def note(self) -> str:
        """Gap reasons first, then each caveat once with the protocols it concerns."""
        return "; ".join([*self.notes, *(f"{', '.join(sort_protocols(ps))}: {text}" for text, ps in self.caveats.items())])


def protocol_split(protocol: str) -> str:
    return "validation" if protocol == PROTOCOL_BLOG else "test"


def sort_protocols(protocols: Sequence[str]) -> list[str]:
    """sparknet-blog first, then the strided protocols by stride; duplicates dropped."""
    unique = list(dict.fromkeys(protocols))
    return sorted(unique, key=lambda p: (p != PROTOCOL_BLOG, int(p[len(STRIDED_PREFIX):]) if p != PROTOCOL_BLOG
                                         else 0))


def bpb_protocol(protocols: Sequence[str]) -> str | None:
    """The strided protocol whose bits per byte the table shows: the largest stride (the most context)."""
    strided = [p for p in protocols if p.startswith(STRIDED_PREFIX)]
    return max(strided, key=lambda p: int(p[len(STRIDED_PREFIX):])) if strided else None


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
    """(protocol, caveat) a reader must know to read a number correctly: a strided protocol that ran at a smaller
    stride than its name (a model with a shorter context: its numbers equal the smaller stride's), or a score
    computed on a WikiText-2 copy that is not the canonical text (a trimmed copy is not comparable with the rest)."""
    out = []
    for result in results:
        r = result.to_dict() if isinstance(result, EvalResult) else result
        d = r.get("details") or {}
        if d.get("stride_clamped"):
            out.append((r["protocol"], f"ran at stride {d.get('stride_tokens')} (the model's context)"))
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
    """A loaded Hugging Face model (`sparknet.evaluate.load_hf_model`) on WikiText-2, by the code the runs use."""
    from sparknet.evaluate import evaluate_wikitext, hf_context, hf_logits_fn, hf_tokenize

    return evaluate_wikitext(hf_logits_fn(model), hf_tokenize(tokenizer), len(tokenizer), hf_context(model),
                             list(protocols), local=wikitext, device=device, batch_size=batch_size)


# -- measured runs ------------------------------------------------------------------------------------------

ADDED_DETAILS_TAG = "sparknet.wikitext_added_details"
_KEPT_DETAILS = ("stride_tokens", "stride_clamped", "data_canonical", "data_source", "data_sha256")


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


def run_row(record: Any, protocols: Sequence[str], *, uri: str, evaluate: bool, wikitext: str | None,
            device: str | None, batch_size: int, log: Any = print) -> Row:
    """The row of one training run; with `evaluate`, missing protocols are scored and logged back to the run."""
    from sparknet import tracking

    m, tags = record.metrics, record.tags
    result = tracking.read_run_json(uri, record.run_id, "result.json") or {}
    final_tag = tags.get("sparknet.final_model", "")
    final = Path(final_tag) if final_tag else None
    budget = record.params.get("mixture.total_tokens", "")
    row = Row(KIND_RUN, MEASURED, record.run_name or record.run_id, run_id=record.run_id,
              params=_count_params(record.params, final),
              tokens=m.get("tokens", float(budget) if budget.isdigit() else None), mixture=_mixture_text(record),
              val={k.removeprefix("val/loss/"): v for k, v in m.items() if k.startswith("val/loss/")},
              tokens_per_s=m.get("perf/tokens_per_s", result.get("tokens_per_s")))
    if result.get("seconds") is not None:
        row.wall_s = float(result["seconds"])  # training time over all sessions of a resumed run
    elif record.start_ms and record.end_ms:
        row.wall_s = (record.end_ms - record.start_ms) / 1000
    if record.status != "FINISHED":
        row.notes.append(f"run status {record.status}")
    # Caveats of the run's own scoring (result.json) and of any scoring compare --evaluate added later (a tag).
    row.add_caveats([r for r in result.get("wikitext") or [] if r.get("protocol") in protocols])
    added = _added_details(tags)
    row.add_caveats([{"protocol": p, "details": d} for p, d in added.items() if p in protocols])
    for p in protocols:
        if f"wikitext/{p}/ppl" in m:
            row.wikitext[p] = {k: m[f"wikitext/{p}/{k}"] for k in ("loss", "ppl", "bpb") if f"wikitext/{p}/{k}" in m}
    missing = [p for p in protocols if p not in row.wikitext]
    if not missing:
        return row

    if evaluate:
        reason = ""
        if final is None:
            reason = "the run recorded no final model (tag sparknet.final_model)"
        elif not (final / "config.json").is_file():
            reason = f"its final model {final} is not on this machine"
        else:
            from sparknet.evaluate import load_hf_model

            log(f"evaluating run {row.model} ({record.run_id}) on {', '.join(missing)} ...")
            device = device or _device()
            try:
                results = _score(*load_hf_model(str(final), device=device), missing, wikitext, device, batch_size)
            except EVAL_ERRORS as exc:
                reason = _reason(exc)
            else:
                metrics = {f"wikitext/{r.protocol}/{k}": v for r in results for k, v in _metrics_of(r).items()}
                details = added | {r.protocol: {k: r.details.get(k) for k in _KEPT_DETAILS} for r in results}
                # Logged back, so the next compare (and the MLflow UI) has them without evaluating again; the tag
                # keeps what the caveats need, as result.json does for the run's own scores.
                tracking.log_to_run(uri, record.run_id, metrics, step=int(result.get("steps", 0)), tags={
                    "sparknet.wikitext_added": f"{', '.join(sorted(details))} by sparknet.compare --evaluate, last "
                                               f"at {time.strftime('%F %T')}",
                    ADDED_DETAILS_TAG: json.dumps(details, separators=(",", ":"))})
                for r in results:
                    row.wikitext[r.protocol] = _metrics_of(r)
                row.add_caveats(results)
                return row
        row.notes.append(f"no WikiText-2 {', '.join(missing)}: not evaluated ({reason})")
        return row

    scored = sort_protocols([k.split("/")[1] for k in m if k.startswith("wikitext/") and k.endswith("/ppl")])
    skipped = tags.get("sparknet.wikitext_skipped", "")
    why = (f"the run was scored under {', '.join(scored)} only" if scored
           else skipped or "the run's eval.wikitext was empty")
    row.notes.append(f"no WikiText-2 {', '.join(missing)}: {why} (fix: --evaluate scores its final model)")
    return row


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


def cache_key(identity: str, revision: str, protocol: str, data_sha256: str) -> str:
    blob = json.dumps([CACHE_VERSION, identity, revision, protocol, data_sha256])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a reader sees the old file or the whole new one, never half of it


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


def hub_unreachable(timeout_s: float = 3.0) -> str:
    """"" when the Hugging Face hub answers a TCP connection, else why not (checked once per process).

    Why: with the hub unreachable but HF_HUB_OFFLINE unset, huggingface_hub retries every file five times with
    backoff, ~45 s per model; knowing up front lets the load go straight to the local cache. Behind a proxy the
    direct connection says nothing, so the probe is skipped there."""
    if "result" not in _HUB_PROBE:
        import socket
        from urllib.parse import urlparse

        from huggingface_hub import constants

        proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
        url = urlparse(constants.ENDPOINT)
        reason = ""
        if not proxied and url.hostname:
            try:
                socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
            except OSError as exc:
                reason = f"{url.hostname} did not answer: {exc.strerror or type(exc).__name__}"
        _HUB_PROBE["result"] = reason
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


def baseline_row(spec: str, protocols: Sequence[str], *, lab: Path, evaluate: bool, wikitext: str | None,
                 shas: WikitextShas, device: str | None, batch_size: int, log: Any = print) -> Row:
    """The row of one baseline: cached results, plus (with `evaluate`) the missing protocols scored and cached."""
    from sparknet.evaluate import (
        _hub_offline,  # the same test load_hf_model's message uses
        load_hf_model,
    )

    model, revision = split_baseline(spec)
    row = Row(KIND_BASELINE, MEASURED, spec)
    if not Path(model).expanduser().exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
        # Meant as a folder (a hub id is "owner/name"): say so, rather than blame the hub for a typo in a path.
        row.notes.append(f"no such model folder: {model}")
        return row
    try:
        identity = baseline_identity(model)
    except OSError as exc:
        row.notes.append(f"cannot read {model} ({exc.strerror or exc})")
        return row
    cache_dir = lab / "baselines"
    missing = []
    for p in protocols:
        path = cache_dir / f"{cache_key(identity, revision, p, shas.get(protocol_split(p)))}.json"
        try:
            entry = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            entry = None  # unreadable entry: recompute it
        if entry is None:
            missing.append(p)
            continue
        row.wikitext[p] = _metrics_of(entry["result"])
        row.add_caveats([entry["result"]])
        row.params = entry.get("params", row.params)
    if not missing:
        return row
    if not evaluate:
        row.notes.append(f"{', '.join(missing)}: not evaluated yet (fix: --evaluate; computed once, then cached "
                         f"in {cache_dir})")
        return row
    data_errors = {shas.errors[s] for s in {protocol_split(p) for p in missing} if s in shas.errors}
    if data_errors:
        row.notes.append(f"{', '.join(missing)}: not evaluated ({'; '.join(sorted(data_errors))})")
        return row

    local = Path(model).expanduser().exists()
    down = "" if local or _hub_offline() else hub_unreachable()
    device = device or _device()
    log(f"evaluating baseline {spec} on {', '.join(missing)} (once: cached in {cache_dir}) ...")
    try:
        with _offline(bool(down)):
            hf_model, tokenizer = load_hf_model(model, revision=revision, device=device)
    except SparknetError as exc:
        prefix = "cannot load it" if local else f"not reachable ({down})" if down \
            else "not reachable offline" if _hub_offline() else "not reachable"
        row.notes.append(f"{', '.join(missing)}: {prefix}: {exc}")
        return row
    # num_parameters() counts each tensor once, so GPT-2's tied input/output embedding counts once (124.44M).
    params = int(hf_model.num_parameters())
    row.params = float(params)
    try:
        results = _score(hf_model, tokenizer, missing, wikitext, device, batch_size)
    except EVAL_ERRORS as exc:
        row.notes.append(f"{', '.join(missing)}: not evaluated ({_reason(exc)})")
        return row
    commit = str(getattr(hf_model.config, "_commit_hash", "") or "")  # what "main" meant today, for the record
    for r in results:
        entry = {"model": model, "revision": revision, "commit": commit, "identity": identity,
                 "protocol": r.protocol, "data_sha256": r.details.get("data_sha256"), "params": params,
                 "device": device, "created": time.strftime("%F %T"), "result": r.to_dict()}
        key = cache_key(identity, revision, r.protocol, r.details.get("data_sha256") or shas.get(r.split))
        _write_atomic(cache_dir / f"{key}.json", entry)
        row.wikitext[r.protocol] = _metrics_of(r)
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
                  approximate=rep.approximate, notes=[rep.note] if rep.note else [])
        for p, (loss, ppl) in figures.items():
            row.wikitext[p] = {"ppl": ppl} | ({"loss": loss} if loss is not None else {})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# The table and its renderings
# ---------------------------------------------------------------------------------------------------------


def comparison_frame(rows: Sequence[Row], protocols: Sequence[str]) -> pd.DataFrame:
    """One DataFrame row per Row: kind, source, model, run_id, params_M, tokens, mixture, `<protocol> loss|ppl`,
    `<largest stride> bpb`, `val/<source>`, tokens/s, wall time h, note. Missing numbers are NaN."""
    import pandas as pd

    bpb_p = bpb_protocol(protocols)
    sources = sorted({s for r in rows for s in r.val})
    records = []
    for r in rows:
        rec: dict[str, Any] = {"kind": r.kind, "source": r.source, "model": r.model, "run_id": r.run_id,
                               "params_M": r.params / 1e6 if r.params is not None else math.nan,
                               "tokens": r.tokens if r.tokens is not None else math.nan, "mixture": r.mixture}
        for p in protocols:
            for k in ("loss", "ppl"):
                rec[f"{p} {k}"] = r.wikitext.get(p, {}).get(k, math.nan)
        if bpb_p:
            rec[f"{bpb_p} bpb"] = r.wikitext.get(bpb_p, {}).get("bpb", math.nan)
        for s in sources:
            rec[f"val/{s}"] = r.val.get(s, math.nan)
        rec["tokens/s"] = r.tokens_per_s if r.tokens_per_s is not None else math.nan
        rec["wall time h"] = r.wall_s / 3600 if r.wall_s is not None else math.nan
        rec["note"] = r.note()
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    frame["tokens"] = frame["tokens"].astype("Int64")  # a count: "16384" in the CSV, not "16384.0"
    # Which rows hold approximate published figures, for the "≈" in the markdown (the CSV keeps plain numbers).
    frame.attrs["approximate"] = [r.approximate for r in rows]
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


def to_text(frame: pd.DataFrame) -> str:
    """The table for a terminal: aligned columns, notes listed under it instead of a very wide last column."""
    text = formatted(frame).drop(columns=["note"])
    text.insert(0, "#", [str(i + 1) for i in range(len(text))])
    out = text.to_string(index=False)
    notes = [f"  {i + 1}. {n}" for i, n in enumerate(frame["note"]) if n]
    return out + ("\nnotes:\n" + "\n".join(notes) if notes else "")


def perplexity_png(frame: pd.DataFrame, protocols: Sequence[str], path: Path) -> Path:
    """Horizontal bars of perplexity, one panel per protocol, on one log axis starting at 1 (the best possible
    perplexity), so GPT-2's ~30 and an untrained model's ~50,000 are both readable and bar lengths compare across
    panels. Reported figures are hatched grey; a gap is written as text, never drawn as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    approx = frame.attrs.get("approximate", [False] * len(frame))
    labels = [f"{m} [{k}]" for m, k in zip(frame["model"], frame["kind"])]
    colors = {KIND_RUN: "tab:blue", KIND_BASELINE: "tab:orange", KIND_REPORTED: "0.6"}
    panels = list(protocols) or ["(no protocol)"]
    columns = [frame[f"{p} ppl"] if f"{p} ppl" in frame else _nans(len(frame)) for p in panels]
    finite = [float(v) for col in columns for v in col if _finite(v)]
    top = max(finite, default=10.0) * 4  # room for the value written after the longest bar
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2.5, 1.2 + 0.42 * max(1, len(frame))),
                             dpi=110, sharey=True, sharex=True, squeeze=False)
    for ax, p, values in zip(axes[0], panels, columns):
        for y, (v, kind) in enumerate(zip(values, frame["kind"])):
            if _finite(v):
                ax.barh(y, float(v) - 1, left=1, color=colors.get(kind, "tab:blue"),
                        hatch="//" if kind == KIND_REPORTED else None, edgecolor="black", linewidth=0.5)
                ax.text(float(v), y, " " + _cell(f"{p} ppl", float(v), approx[y]), va="center", fontsize=7)
            else:
                ax.text(1.1, y, f"{GAP} no value", va="center", fontsize=7, color="0.45")
        ax.set_xscale("log")
        ax.set_xlim(1, top)
        ax.set_title(f"WikiText-2 {p}", fontsize=9)
        ax.set_xlabel("perplexity (log scale, lower is better)", fontsize=8)
        ax.grid(axis="x", alpha=0.3, which="major")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        return False


def _nans(n: int) -> list[float]:
    return [math.nan] * n


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
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    protocols: tuple[str, ...] = ()  # empty: the default three plus any other the runs were scored under
    reported: bool = True
    evaluate: bool = False
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


def _describe_filters(opts: CompareOptions, uri: str) -> str:
    parts = [f"experiments {', '.join(opts.experiments)}" if opts.experiments
             else f"all experiments but {COMPARE_EXPERIMENT}"]
    if opts.tags:
        parts.append("tags " + ", ".join(f"{k}={v}" for k, v in opts.tags.items()))
    if opts.run_ids:
        parts.append(f"run ids {', '.join(opts.run_ids)}")
    return f"{'; '.join(parts)} at {uri}"


def _out_dir(opts: CompareOptions) -> Path:
    if opts.out is not None:
        return Path(opts.out)
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
    records, skipped = tracking.find_runs(
        uri, list(opts.experiments) or None, list(opts.run_ids), opts.tags, require_tag=RUN_TAG,
        exclude_experiments=(COMPARE_EXPERIMENT,), timeout_s=opts.timeout_s)
    if not records:
        left = f" ({', '.join(f'{n} {s.lower()}' for s, n in skipped.items())} left out: only finished runs count " \
               f"unless named with --run-id)" if skipped else ""
        raise SparknetError(f"no finished training runs match {_describe_filters(opts, uri)}{left} (fix: check the "
                            f"filters, or train one: python -m sparknet.run mixtures/quickstart.yaml)")

    found = {m.group(1) for r in records for k in r.metrics
             if (m := re.fullmatch(r"wikitext/(sparknet-blog|hf-strided-[1-9]\d*)/ppl", k))}
    protocols = sort_protocols(opts.protocols or (*DEFAULT_PROTOCOLS, *found))
    rows = [run_row(r, protocols, uri=uri, evaluate=opts.evaluate, wikitext=opts.wikitext, device=opts.device,
                    batch_size=opts.batch_size, log=log) for r in records]
    first = protocols[0]
    rows.sort(key=lambda r: r.wikitext.get(first, {}).get("ppl", math.inf))  # stable: ties keep start order
    shas = WikitextShas(opts.wikitext)
    rows += [baseline_row(b, protocols, lab=opts.lab, evaluate=opts.evaluate, wikitext=opts.wikitext, shas=shas,
                          device=opts.device, batch_size=opts.batch_size, log=log) for b in opts.baselines]
    if opts.reported:
        rows += reported_rows(protocols)
    frame = comparison_frame(rows, protocols)

    out_dir = _out_dir(opts)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"md": out_dir / "compare.md", "csv": out_dir / "compare.csv", "png": out_dir / "perplexity.png"}
    frame.to_csv(files["csv"], index=False)
    bpb_p = bpb_protocol(protocols)
    files["md"].write_text(
        f"# WikiText-2 comparison ({time.strftime('%F %T')})\n\n"
        f"Runs: {_describe_filters(opts, uri)}. Baselines: {', '.join(opts.baselines) or 'none'}.\n\n"
        f"{to_markdown(frame)}\n\n"
        f"- `kind`: *measured run* = a training run's logged metrics; *measured baseline* = scored here by "
        f"`sparknet.evaluate` (cached in `{opts.lab / 'baselines'}`); *reported* = published figures, not measured "
        f"here.\n"
        f"- Protocols: `sparknet-blog` = SparkNet's (validation, 2000 shuffled rows, 256 tokens, mean of batch "
        f"means); `hf-strided-N` = Hugging Face's fixed-length perplexity over the test split at stride N."
        + (f"\n- `{bpb_p} bpb`: bits per byte under {bpb_p} (tokenizer-independent)." if bpb_p else "")
        + f"\n- {GAP}: no value; the `note` column says why.\n")
    perplexity_png(frame, protocols, files["png"])
    result = Comparison(frame, rows, protocols, out_dir, files, uri)
    if opts.log:
        ids = [r.run_id for r in rows if r.run_id]
        result.mlflow_run_id = tracking.log_comparison(
            uri, COMPARE_EXPERIMENT, out_dir.name,
            params={"run_ids": ",".join(ids), "baselines": ",".join(opts.baselines), "protocols": ",".join(protocols),
                    "filters": _describe_filters(opts, uri), "evaluate": str(opts.evaluate)},
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
                    help="a run to include whatever its experiment, tags or status (repeatable)")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="keep only runs with this tag value, e.g. sparknet.mixture=quickstart (repeatable)")
    ap.add_argument("--baseline", action="append", default=[], metavar="ID_OR_PATH",
                    help="extra baseline: a hub id (ID@REVISION pins one) or a local model folder (repeatable)")
    ap.add_argument("--no-default-baselines", action="store_true",
                    help=f"leave out {' and '.join(DEFAULT_BASELINES)}")
    ap.add_argument("--no-reported", action="store_true", help="leave out the published reference rows")
    ap.add_argument("--protocols", default="", metavar="P1,P2",
                    help=f"WikiText-2 protocols (default: {','.join(DEFAULT_PROTOCOLS)} plus any the runs have)")
    ap.add_argument("--evaluate", action="store_true",
                    help="score what is missing: uncached baselines, and runs without WikiText-2 results (logged "
                         "back to the run)")
    ap.add_argument("--wikitext", default=None, metavar="DIR",
                    help="local WikiText-2 copy (default: $SPARKNET_WIKITEXT, else the hub)")
    ap.add_argument("--tracking-uri", default="", metavar="URI",
                    help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<lab>/mlflow.db)")
    ap.add_argument("--lab", default="lab", metavar="DIR", help="the lab folder (default: lab)")
    ap.add_argument("--name", default=None, help="name of the comparison: output in <lab>/compare/NAME and the "
                    "MLflow run's name (default: the date and time)")
    ap.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <lab>/compare/<name>)")
    ap.add_argument("--no-log", action="store_true", help=f"do not log the comparison to {COMPARE_EXPERIMENT}")
    ap.add_argument("--device", default=None, help="device for --evaluate (default: cuda if available, else cpu)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass for --evaluate")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        raise SparknetError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", args.name):
        raise SparknetError(f"--name {args.name!r}: not a safe folder name (fix: letters, digits, '.', '_', '-')")
    out = Path(args.out) if args.out else Path(args.lab) / "compare" / args.name if args.name else None
    opts = CompareOptions(
        lab=Path(args.lab), tracking_uri=args.tracking_uri, experiments=tuple(args.experiment),
        run_ids=tuple(args.run_id), tags=parse_tags(args.tag),
        baselines=tuple(dict.fromkeys(([] if args.no_default_baselines else list(DEFAULT_BASELINES)) + args.baseline)),
        protocols=tuple(p.strip() for p in args.protocols.split(",") if p.strip()), reported=not args.no_reported,
        evaluate=args.evaluate, wikitext=args.wikitext, out=out, log=not args.no_log,
        device=args.device, batch_size=args.batch_size)
    if opts.evaluate:  # a progress bar per model load is noise next to our one line per evaluation
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = compare(opts, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(to_text(result.frame))
    print(f"\nwritten: {', '.join(str(p) for p in result.files.values())}")
    if result.mlflow_run_id:
        print(f"logged: run {result.mlflow_run_id} in experiment {COMPARE_EXPERIMENT!r} at {result.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
