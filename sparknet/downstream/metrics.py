"""Each item's scores from its log-likelihoods, and a task's figures with their standard errors.

Per item, as lm-evaluation-harness 0.4 defines them:
- `acc`: the choice with the highest log-likelihood is the gold one (ties: the first). LAMBADA: the last word is
  the greedy continuation. TruthfulQA mc2: the probability mass on the true answers, normalized over all answers.
- `acc_norm`: the same after dividing each log-likelihood by its choice's length in characters (the harness's
  `len(choice)`, the choice without the leading space).
- `bpb`: the correct answer's negative log-likelihood in bits per UTF-8 byte of the scored continuation (the
  OLMES/Olmix correct-answer bpb; mc2: the first true answer, TruthfulQA's best one). At 70M parameters accuracy
  sits near chance, bpb still moves: it is what mixture studies rank by.
- LAMBADA `perplexity`: exp(-mean log-likelihood of the last word), as the harness aggregates it.

Standard errors: the harness's for a mean (sample standard deviation with n - 1, over sqrt(n)); perplexity's by
the delta method (perplexity x the standard error of the mean log-likelihood) where the harness bootstraps.
MMLU: `acc` etc. are the micro average over all questions (the harness's group figure, weighted by size);
`acc_macro` the mean of the per-subject accuracies, as MMLU's paper averages.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sparknet.downstream.score import bits_per_byte
from sparknet.downstream.tasks import Item


def item_scores(item: Item, kind: str, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """The per-item metrics of one item from its pairs' (log-likelihood, greedy)."""
    lls = np.array([ll for ll, _ in results], dtype=np.float64)
    if kind == "last_word":
        ll, greedy = results[0]
        return {"acc": float(greedy), "loglikelihood": ll, "bpb": bits_per_byte(ll, item.continuations[0])}
    gold = item.gold
    gold_text = item.continuations[0] if kind == "partial" else item.continuations[gold]
    out = {"bpb": bits_per_byte(float(lls[gold]), gold_text)}
    if kind == "mc2":
        probs = np.exp(lls)
        probs = probs / probs.sum()
        out["acc"] = float(probs[np.array(item.labels) == 1].sum())
        return out
    out["acc"] = float(int(np.argmax(lls)) == gold)
    if kind == "multiple_choice":
        lengths = np.array([float(len(c)) for c in item.choices])
        out["acc_norm"] = float(int(np.argmax(lls / lengths)) == gold)
    return out


def _stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


@dataclass
class TaskScores:
    """A task's figures over its items: `metrics[name]`, `stderr[name]`, and the per-item values they came from."""

    task: str
    kind: str
    n_items: int
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    per_item: list[dict[str, float]] = field(default_factory=list)


def aggregate(task: str, kind: str, items: Sequence[Item], per_item: list[dict[str, float]]) -> TaskScores:
    scores = TaskScores(task, kind, len(items), per_item=per_item)
    names = [k for k in per_item[0] if k != "loglikelihood"] if per_item else []
    for name in names:
        values = [p[name] for p in per_item]
        scores.metrics[name] = float(np.mean(values))
        scores.stderr[name] = _stderr(values)
    if kind == "last_word":
        lls = [p["loglikelihood"] for p in per_item]
        mean_ll = float(np.mean(lls))
        scores.metrics["perplexity"] = math.exp(-mean_ll)
        scores.stderr["perplexity"] = scores.metrics["perplexity"] * _stderr(lls)
    if task == "mmlu":
        by_subject: dict[str, list[float]] = defaultdict(list)
        for it, p in zip(items, per_item):
            by_subject[it.stratum].append(p["acc"])
        subject_acc = [float(np.mean(v)) for _, v in sorted(by_subject.items())]
        scores.metrics["acc_macro"] = float(np.mean(subject_acc))
        scores.stderr["acc_macro"] = _stderr(subject_acc) if len(subject_acc) > 1 else float("nan")
    return scores


def score_items(task: str, kind: str, items: Sequence[Item],
                results: Sequence[tuple[float, bool]]) -> TaskScores:
    """A task's scores from the flat list of pair results (items' pairs in order, as `Item.pairs` lists them)."""
    per_item, pos = [], 0
    for it in items:
        n = len(it.pairs)
        per_item.append(item_scores(it, kind, results[pos:pos + n]))
        pos += n
    if pos != len(results):
        raise ValueError(f"{task}: {len(results)} results for {pos} pairs")
    return aggregate(task, kind, items, per_item)
