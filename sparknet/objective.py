"""What a study minimizes: one objective module for `sparknet.sweep` (hyperparameters) and `sparknet.ablate`
(mixture weights), so both rank runs by the same number.

    objective = Objective.parse("val/docs", ["docs", "code"])
    objective.check(cfg)                       # before any trial trains: WikiText-2 must be readable
    objective.check_prepared(prepared, cfg)    # ... and every held-out slice it needs must hold a window
    objective.intermediate(val_losses)         # what the pruner sees at each evaluation
    metrics = objective.measure(outcome, cfg)  # after the run: every number, the objective's among them
    value = metrics[objective.metric]          # == objective.final(outcome, cfg)

Three objectives, all lower-is-better:

- `val` (metric `val/loss`): the mean held-out loss over the mixture's sources, nats/token, each source
  weighted equally (not by its mixture weight: a source's share of training is what an ablation varies, so
  it must not also weigh the score).
- `val/<source>` (metric `val/loss/<source>`): one source's held-out loss, e.g. the source you care about.
- `wikitext-valid` (metric `wikitext-valid/bpb`): bits per byte on the WikiText-2 **validation** split,
  scored on the run's final model. The rows are joined with "\\n\\n" as in the strided protocol
  (`evaluate.evaluate_wikitext`), cut into windows of the model's context (stride = context: each token is
  scored once), and bits per byte is `evaluate`'s definition (mean NLL per token / ln 2 x tokens / UTF-8
  bytes of the joined text), so it compares across tokenizers and with the `hf-strided-*` bpb the runs
  report on the test split. The test split is never read here: it is for reporting only, and a model picked
  on the validation split has its validation figures marked as tuned (`tuned_on`).
  Pruning needs a number at every evaluation, and scoring WikiText-2 there would cost a forward pass over
  the whole split each time, so the intermediate value is the mean held-out loss (`intermediate_metric`
  says so); only the final value is bits per byte.

- `downstream` (metric `downstream-select/bpb`): the mean correct-answer bits per byte over the task set
  (`eval.downstream`, else the default set), and `downstream/<task>` (metric `downstream-select/<task>/bpb`): one
  task's. Scored on the final model, on the tasks' **select** items (validation files, or a fixed half: see
  `sparknet.downstream.tasks`), `eval.downstream_items` of each; the report items every run ends with are
  disjoint from them, so a study's choice is never judged on the items that chose it. As for wikitext-valid, the
  pruner sees the mean held-out loss.

Every trial records all per-source losses, so a study can be re-read against another objective:
`Objective.parse("val/code", names).value(trial.user_attrs["val_loss"])`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sparknet.errors import SparknetError

VAL = "val"
WIKITEXT_VALID = "wikitext-valid"
DOWNSTREAM = "downstream"
DOWNSTREAM_METRIC = "downstream-select"  # its metrics: downstream-select/bpb, downstream-select/<task>/bpb
# The metric names runs log (train.py: val/loss, val/loss/<source>), accepted as names too.
_VAL_ALIASES = ("val", "val/loss")


def _names_text(source_names: Sequence[str]) -> str:
    return f"{VAL}, {VAL}/<source> ({', '.join(source_names)}), {WIKITEXT_VALID}, {DOWNSTREAM} or {DOWNSTREAM}/<task>"


@dataclass(frozen=True)
class Objective:
    """A parsed objective. `sources` are the mixture's source names (the mean of `val` is over all of them)."""

    kind: str  # "val" | "source" | "wikitext-valid" | "downstream"
    sources: tuple[str, ...]
    source: str | None = None
    task: str | None = None  # downstream: one task, or None for the mean over the task set
    # WikiText-2 validation rows and token ids, loaded once (check) and reused by every trial.
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    # -- naming ----------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, source_names: Sequence[str]) -> Objective:
        """`val`, `val/<source>` (also `val/loss`, `val/loss/<source>`) or `wikitext-valid`; anything else is a
        one-line SparknetError listing the valid names."""
        names = tuple(source_names)
        t = str(text).strip()
        if t in _VAL_ALIASES:
            return cls(VAL, names)
        if t == WIKITEXT_VALID:
            return cls(WIKITEXT_VALID, names)
        if t == DOWNSTREAM:
            return cls(DOWNSTREAM, names)
        if t.startswith(DOWNSTREAM + "/"):
            from sparknet.downstream.tasks import task_spec

            return cls(DOWNSTREAM, names, task=task_spec(t[len(DOWNSTREAM) + 1:], field=f"objective {text!r}").name)
        for prefix in ("val/loss/", "val/"):
            if t.startswith(prefix):
                source = t[len(prefix):]
                if source not in names:
                    raise SparknetError(f"objective {text!r}: the mixture has no source {source!r} (fix: use "
                                        f"{_names_text(names)})")
                return cls("source", names, source)
        raise SparknetError(f"objective {text!r}: unknown (fix: use {_names_text(names)})")

    @property
    def name(self) -> str:
        """The canonical text: `Objective.parse(o.name, o.sources) == o`."""
        if self.kind == DOWNSTREAM:
            return f"{DOWNSTREAM}/{self.task}" if self.task else DOWNSTREAM
        return {VAL: VAL, WIKITEXT_VALID: WIKITEXT_VALID}.get(self.kind, f"{VAL}/{self.source}")

    @property
    def metric(self) -> str:
        """The metric the value is logged as (MLflow, tables)."""
        if self.kind == DOWNSTREAM:
            return f"{DOWNSTREAM_METRIC}/{self.task}/bpb" if self.task else f"{DOWNSTREAM_METRIC}/bpb"
        return {VAL: "val/loss", WIKITEXT_VALID: "wikitext-valid/bpb"}.get(self.kind, f"val/loss/{self.source}")

    @property
    def unit(self) -> str:
        return "bits/byte" if self.kind in (WIKITEXT_VALID, DOWNSTREAM) else "nats/token"

    @property
    def intermediate_metric(self) -> str:
        """What `intermediate` returns: the objective's own metric, except for wikitext-valid (mean val loss)."""
        return "val/loss" if self.kind in (WIKITEXT_VALID, DOWNSTREAM) else self.metric

    @property
    def tuned_on(self) -> str:
        """The evaluation data this objective selects on, for tables to mark as tuned ("" for held-out slices,
        which no report uses as a benchmark)."""
        if self.kind == DOWNSTREAM:
            return "downstream select items"
        return "wikitext-2-validation" if self.kind == WIKITEXT_VALID else ""

    # -- values ----------------------------------------------------------------------------------

    def _loss(self, val_losses: Mapping[str, float], source: str) -> float:
        if source not in val_losses:
            raise SparknetError(f"{self.metric}: no held-out loss for source {source!r} (its validation slice is "
                                f"shorter than one training sequence) (fix: raise mixture.val_tokens)")
        return float(val_losses[source])

    def mean_val_loss(self, val_losses: Mapping[str, float]) -> float:
        """The mean held-out loss over all the mixture's sources (each counted once)."""
        return sum(self._loss(val_losses, s) for s in self.sources) / len(self.sources)

    def intermediate(self, val_losses: Mapping[str, float]) -> float:
        """The value the pruner compares at an evaluation, from that evaluation's per-source losses."""
        if self.kind == "source":
            return self._loss(val_losses, self.source)
        return self.mean_val_loss(val_losses)

    def value(self, losses_or_result: Mapping[str, Any], wikitext_valid_bpb: float | None = None) -> float:
        """The objective from per-source losses ({source: loss}) or a run's result dict (its `val_loss`);
        wikitext-valid needs `wikitext_valid_bpb` (from `measure`, or a trial's `wikitext_valid_bpb` attr)."""
        result = losses_or_result
        losses = result["val_loss"] if isinstance(result.get("val_loss"), Mapping) else result
        if self.kind == DOWNSTREAM:
            if self.metric not in result:
                raise SparknetError(f"{self.metric}: this run was not scored on the downstream select items (fix: "
                                    f"Objective.measure(outcome, cfg) scores its final model)")
            return float(result[self.metric])
        if self.kind == WIKITEXT_VALID:
            bpb = wikitext_valid_bpb if wikitext_valid_bpb is not None else result.get("wikitext_valid_bpb")
            if bpb is None:
                raise SparknetError(f"{self.metric}: this run was not scored on WikiText-2 validation (fix: "
                                    f"Objective.measure(outcome, cfg) scores its final model)")
            return float(bpb)
        return self.intermediate(losses)

    # -- the run's final model -------------------------------------------------------------------

    def check(self, cfg) -> None:
        """Fail now (one line) if the objective cannot be computed for runs of `cfg`: for wikitext-valid, the
        validation split must be readable from eval.wikitext_path, $SPARKNET_WIKITEXT or the hub cache."""
        if self.kind == WIKITEXT_VALID:
            self._rows(cfg)
        if self.kind == DOWNSTREAM:
            from sparknet.downstream.tasks import check_data, resolve_data

            resolve_data(cfg.eval.downstream_path or None)  # a study cannot optimize what it cannot read
            check_data(self.tasks(cfg), cfg.eval.downstream_path or None, cfg.eval.downstream_shots)

    def check_prepared(self, prepared, cfg, *, pruned: bool = False) -> None:
        """Fail now (one line) if a held-out loss the objective needs will not exist once the runs have trained:
        `val` needs every source's, `val/<source>` that source's, and a source's loss exists only when its held-out
        slice (capped at eval.val_tokens) holds at least one window of train.seq_len + 1 tokens. Called with the
        prepared stores, before any run trains: found after training, it would waste every run of the study.
        `pruned`: the study prunes on `intermediate`, which for wikitext-valid is the mean over every source."""
        need = self.sources if self.kind == VAL or (pruned and self.kind in (WIKITEXT_VALID, DOWNSTREAM)) else \
            (self.source,) if self.kind == "source" else ()
        seq_len, cap = cfg.train.seq_len, cfg.eval.val_tokens
        for name in need:
            have = len(prepared.stores[name].val())
            usable = min(have, cap + 1) if cap else have
            if usable < seq_len + 1:
                held = f"{have:,} held-out tokens" + (f", {usable:,} of them read (eval.val_tokens {cap:,})"
                                                       if usable < have else "")
                raise SparknetError(
                    f"objective {self.name}: source {name!r} has {held}, fewer than one window of train.seq_len + 1 = "
                    f"{seq_len + 1:,}, so it would have no held-out loss after training (fix: raise "
                    f"mixture.val_tokens{' or eval.val_tokens' if usable < have else ''}, or choose another "
                    f"objective)")

    def tasks(self, cfg) -> tuple[str, ...]:
        """The downstream tasks the objective averages (one for downstream/<task>)."""
        from sparknet.config.schema import DEFAULT_DOWNSTREAM

        return (self.task,) if self.task else tuple(cfg.eval.downstream or DEFAULT_DOWNSTREAM)

    def data(self, cfg) -> dict[str, Any]:
        """Where the objective's evaluation text came from (wikitext-valid: path, rows, sha256, whether it is
        the canonical split); {} for the held-out slices, which the run's own stores define."""
        if self.kind != WIKITEXT_VALID:
            return {}
        from sparknet.evaluate import WIKITEXT_SHA256, rows_sha256

        rows, source = self._rows(cfg)
        sha = rows_sha256(rows)
        return {"source": source, "rows": len(rows), "sha256": sha, "canonical": sha == WIKITEXT_SHA256["validation"]}

    def _rows(self, cfg) -> tuple[list[str], str]:
        from sparknet.evaluate import load_wikitext_with_source

        key = ("rows", cfg.eval.wikitext_path)
        if key not in self._cache:
            rows, source = load_wikitext_with_source("validation", cfg.eval.wikitext_path or None)
            if not any(r.strip() for r in rows):
                raise SparknetError(f"{source}: the WikiText-2 validation split has no text (fix: point "
                                    f"eval.wikitext_path or SPARKNET_WIKITEXT at wiki.valid.raw)")
            self._cache[key] = (rows, source)
        return self._cache[key]

    def measure(self, outcome, cfg, *, device: Any = None) -> dict[str, float]:
        """Every number of a finished run (`run.RunOutcome`) the objectives use: `val/loss`, `val/loss/<source>`
        and, for wikitext-valid, `wikitext-valid/bpb` (+ `/loss` in nats/token, `/tokens` scored)."""
        losses = outcome.result["val_loss"]
        metrics = {f"val/loss/{s}": float(v) for s, v in losses.items()}
        if all(s in losses for s in self.sources):  # else only `val` itself needs it, and value() says what is missing
            metrics["val/loss"] = self.mean_val_loss(losses)
        if self.kind == DOWNSTREAM:
            metrics |= downstream_select_metrics(outcome.run_dir / "final", cfg, self.tasks(cfg), device=device)
        elif self.kind != WIKITEXT_VALID:
            metrics[self.metric] = self.value(losses)
        else:
            r = wikitext_valid_result(outcome.run_dir / "final", cfg, rows=self._rows(cfg)[0], device=device)
            metrics |= {"wikitext-valid/bpb": r.bits_per_byte, "wikitext-valid/loss": r.loss_nats,
                        "wikitext-valid/tokens": float(r.tokens)}
        return metrics

    def final(self, outcome, cfg, *, device: Any = None) -> float:
        """The objective's value for a finished run."""
        return self.measure(outcome, cfg, device=device)[self.metric]


@contextlib.contextmanager
def _final_model(model_dir, cfg, device: Any = None) -> Iterator[tuple[Any, Any]]:
    """(the exported model in `model_dir`, eval mode, on `device`; the device): default the run's (train.device).
    On a GPU its memory is given back on leaving, before the next trial."""
    import torch

    from sparknet.model import load_exported

    if device is None:
        device = "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = load_exported(model_dir, cfg.model).to(device).eval()
    try:
        yield model, device
    finally:
        if device.type == "cuda":
            model.cpu()
            torch.cuda.empty_cache()


def wikitext_valid_result(model_dir, cfg, *, rows: Sequence[str] | None = None, device: Any = None):
    """`evaluate.EvalResult` of the exported model in `model_dir` (sparknet.model.load_exported with cfg.model)
    on the WikiText-2 validation split, tokenized by the run's tokenizer: windows of the model's context, stride =
    context, with bits per byte. `device`: default the run's (train.device). The text's token ids are the
    process's (`references.wikitext_ids`): a study tokenizes it once, for the references and the objective alike."""
    from sparknet.evaluate import eval_hf_strided, load_wikitext
    from sparknet.prepare import resolve_tokenizer
    from sparknet.references import wikitext_ids, wikitext_text

    if rows is None:
        rows = load_wikitext("validation", cfg.eval.wikitext_path or None)
    tok = resolve_tokenizer(cfg, 1)  # the run's: trained and cached in the lab by the run itself
    text = wikitext_text(rows)  # as evaluate_wikitext joins the test split (rows already end with "\n")
    ids = wikitext_ids(tok, text)  # tokenized once per process: the run's references read the same ids
    with _final_model(model_dir, cfg, device) as (model, device):
        def logits_fn(x):  # float32, no autocast: every WikiText-2 figure follows evaluate.EVAL_DTYPE
            return model(x).float()

        ctx = model.shape.n_positions
        return eval_hf_strided(logits_fn, ids, tok.vocab_size, ctx, ctx, device=device, batch_size=cfg.eval.batch_size,
                               text_bytes=len(text.encode("utf-8")), split="validation")


def downstream_select_metrics(model_dir, cfg, tasks: Sequence[str], *, device: Any = None) -> dict[str, float]:
    """The exported model in `model_dir` on the select items of `tasks` (`eval.downstream_items` of each, the run's
    tokenizer): `downstream-select/<task>/bpb` per task and `downstream-select/bpb`, their mean."""
    from sparknet.downstream.evaluation import evaluate_configured
    from sparknet.downstream.score import gpt_scoring_model
    from sparknet.prepare import resolve_tokenizer

    tok = resolve_tokenizer(cfg, 1)
    with _final_model(model_dir, cfg, device) as (model, device):
        results = evaluate_configured(gpt_scoring_model(model, tok, device), cfg.eval, tasks, role="select")
    out = {f"{DOWNSTREAM_METRIC}/{r.task}/bpb": r.metrics["bpb"] for r in results}
    out[f"{DOWNSTREAM_METRIC}/bpb"] = sum(r.metrics["bpb"] for r in results) / len(results)
    return out
