"""A model on a set of downstream tasks: the items of each task, our scorer, the figures with their standard
errors, and how they are shown and recorded (the table printed, `downstream.json`, MLflow metrics
`downstream/<task>/<metric>` and `..._stderr`).

Every result says what it was measured on: the role of its items (`report`, `select` or `full`, see
`sparknet.downstream.tasks`), how many of how many (a subset is a subset, and the table says so), the shots,
the engine (`sparknet`: our scorer; `lm-eval`: the harness itself), and the data's caveat (HellaSwag's local copy
is preprocessed).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sparknet.downstream.metrics import TaskScores, score_items
from sparknet.downstream.score import ScoringModel, encode_pairs, loglikelihoods
from sparknet.downstream.tasks import Item, load_items, subset, task_spec
from sparknet.errors import SparknetError

# Metrics in the order tables show them: bpb first (it moves at 70M parameters where accuracy sits at chance).
METRIC_ORDER = ("bpb", "acc_norm", "acc", "acc_macro", "perplexity")


@dataclass
class TaskResult:
    task: str
    role: str
    n_items: int
    n_available: int
    shots: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    seconds: float
    engine: str = "sparknet"
    source: str = ""                  # the folder read, or "hub"
    caveat: str = ""
    items_sha256: str = ""            # of the items' positions: two results on the same items have the same one
    # Items left out because an answer is longer than the model's context (the harness refuses to score those): a
    # short-context model with a small vocabulary meets a few (PIQA's long solutions in a 512-token BPE).
    n_too_long: int = 0
    context: int = 0

    @property
    def subset(self) -> bool:
        return self.n_items < self.n_available

    def to_dict(self) -> dict:
        return asdict(self)


def items_sha256(items: Sequence[Item]) -> str:
    return hashlib.sha256(",".join(str(it.index) for it in items).encode()).hexdigest()


@dataclass
class TaskItems:
    """A task's items as one evaluation will score them, loaded (and so checked) before any model is."""

    name: str
    items: list[Item]
    n_available: int
    shots: int


def load_task_items(names: Sequence[str], *, role: str = "report", n_items: int | None = None,
                    shots: int | None = None, root: Path | None = None) -> list[TaskItems]:
    """Every task's items (`role`, at most `n_items`; `shots` for the tasks that take them, default each task's
    own). A missing or malformed file fails here, in one line."""
    out = []
    for name in names:
        spec = task_spec(name)
        task_shots = (spec.shots_default if shots is None else shots) if "pool" in spec.files else 0
        everything = load_items(name, role, None, task_shots, root)
        out.append(TaskItems(name, subset(everything, n_items), len(everything), task_shots))
    return out


def evaluate_tasks(model: ScoringModel, names: Sequence[str], *, role: str = "report", n_items: int | None = None,
                   shots: int | None = None, root: Path | None = None, max_batch_tokens: int | None = None,
                   echo=None, loaded: Sequence[TaskItems] | None = None) -> list[TaskResult]:
    """Score `model` on each task of `names` (items of `role`, at most `n_items` each; `shots` for the tasks that
    take them, default each task's own; `loaded`: the items, if `load_task_items` read them already). `echo(line)`
    is told each task's figures as they come."""
    results = []
    for task in loaded or load_task_items(names, role=role, n_items=n_items, shots=shots, root=root):
        start = time.perf_counter()
        kept, encoded = fitting_items(model, task.items)
        if not kept:
            raise SparknetError(f"eval.downstream: every {task.name} item scored has an answer longer than the "
                                f"model's {model.n_positions}-token context (fix: drop {task.name} from "
                                f"eval.downstream, or a longer model.n_positions)")
        scores = score_items(task.name, task_spec(task.name).kind, kept,
                             loglikelihoods(model, [e for item in encoded for e in item], max_batch_tokens))
        scored = TaskItems(task.name, kept, task.n_available, task.shots)
        result = task_result(scored, role, scores, time.perf_counter() - start, root)
        result.n_too_long, result.context = len(task.items) - len(kept), model.n_positions
        results.append(result)
        if echo:
            echo(result_line(result))
    return results


def fitting_items(model: ScoringModel, items: Sequence[Item]) -> tuple[list[Item], list[list]]:
    """The items whose every answer fits the model's context, and their encoded pairs; an item with one that does not
    is left out whole (its choices are compared with each other: scoring some of them would mean nothing)."""
    encoded = encode_pairs([p for it in items for p in it.pairs], model.encode, model.prefix_token_id)
    kept, kept_encoded, at = [], [], 0
    for it in items:
        mine = encoded[at:at + len(it.pairs)]
        at += len(it.pairs)
        if all(len(cont) <= model.n_positions for _, cont in mine):
            kept.append(it)
            kept_encoded.append(mine)
    return kept, kept_encoded


def task_result(task: TaskItems, role: str, scores: TaskScores, seconds: float, root: Path | None,
                engine: str = "sparknet") -> TaskResult:
    """The result of `task`'s items scored (by either engine), with what it was measured on."""
    caveat = task_spec(task.name).caveat if root is not None else ""  # the hub's copy is the harness's own
    return TaskResult(task.name, role, len(task.items), task.n_available, task.shots, scores.metrics, scores.stderr,
                      seconds, engine=engine, source=str(root) if root else "hub", caveat=caveat,
                      items_sha256=items_sha256(task.items))


def evaluate_configured(model: ScoringModel, eval_cfg, names: Sequence[str], *, role: str,
                        echo=None) -> list[TaskResult]:
    """`evaluate_tasks` with a run's settings (`eval.downstream_items`, `_shots`, `_path`): what a run reports on
    (role `report`) and what a `downstream` objective selects by (role `select`)."""
    from sparknet.downstream.tasks import resolve_data

    items = None if eval_cfg.downstream_items == "all" else eval_cfg.downstream_items
    return evaluate_tasks(model, names, role=role, n_items=items, shots=eval_cfg.downstream_shots,
                          root=resolve_data(eval_cfg.downstream_path or None), echo=echo)


def _fmt(value: float, stderr: float | None) -> str:
    if stderr is None or math.isnan(stderr):
        return f"{value:.4f}"
    return f"{value:.4f} ± {stderr:.4f}"


def result_line(r: TaskResult) -> str:
    figures = "  ".join(f"{m} {_fmt(r.metrics[m], r.stderr.get(m))}" for m in METRIC_ORDER if m in r.metrics)
    of = f"{r.n_items:,} of {r.n_available:,} {r.role} items" if r.subset else f"{r.n_items:,} {r.role} items"
    shots = f", {r.shots}-shot" if r.shots else ""
    caveat = "; the local preprocessed copy" if r.caveat else ""
    return f"downstream {r.task:<15} {figures}  ({of}{shots}{caveat}{too_long(r)}, {r.seconds:.1f} s)"


def too_long(r: TaskResult) -> str:
    """The note of a result that left items out (an answer longer than the model's context), else ""."""
    if not r.n_too_long:
        return ""
    return (f"; {r.n_too_long:,} more left out: an answer longer than the model's {r.context:,}-token context, which "
            f"the harness does not score either")


def table(results: Sequence[TaskResult]) -> str:
    """A markdown table of the results, bpb first, with the notes each needs (subsets, caveats)."""
    lines = ["| task | items | bpb | acc_norm | acc | other |", "|---|---|---|---|---|---|"]
    notes = []
    for r in results:
        items = f"{r.n_items:,} of {r.n_available:,} ({r.role})" if r.subset else f"{r.n_items:,} ({r.role})"
        if r.shots:
            items += f", {r.shots}-shot"
        if r.n_too_long:
            items += f", {r.n_too_long:,} left out (too long)"
            note = too_long(r)[2:].replace(" more left out", " items left out") + "."
            if note not in notes:
                notes.append(note)
        cells = [_fmt(r.metrics[m], r.stderr.get(m)) if m in r.metrics else "" for m in ("bpb", "acc_norm", "acc")]
        other = "; ".join(f"{m} {_fmt(r.metrics[m], r.stderr.get(m))}" for m in ("acc_macro", "perplexity")
                          if m in r.metrics)
        lines.append(f"| {r.task}{' *' if r.caveat else ''} | {items} | " + " | ".join(cells) + f" | {other} |")
        if r.caveat and r.caveat not in notes:
            notes.append(r.caveat)
    if any(r.role == "select" for r in results):
        lines.append("")
        lines.append("Select items: the items `downstream` objectives choose by; a model a study chose on them has "
                     "tuned figures here (report items are the test).")
    if any(r.subset for r in results):
        lines.append("")
        lines.append("Subsets: seeded and stratified (the same items for every model); full-set figures (model cards) "
                     "are not comparable to them cell for cell.")
    for n in notes:
        lines.append("")
        lines.append(f"\\* {n}")
    if any(r.task == "truthfulqa_mc2" for r in results):
        lines.append("")
        lines.append("truthfulqa_mc2 acc: the normalized probability mass on the true answers (the harness's mc2).")
    return "\n".join(lines)


def mlflow_metrics(results: Sequence[TaskResult], prefix: str = "downstream") -> dict[str, float]:
    """`downstream/<task>/<metric>` and `downstream/<task>/<metric>_stderr` for every figure."""
    out = {}
    for r in results:
        for m, v in r.metrics.items():
            out[f"{prefix}/{r.task}/{m}"] = v
            se = r.stderr.get(m)
            if se is not None and not math.isnan(se):
                out[f"{prefix}/{r.task}/{m}_stderr"] = se
    return out
