"""Mixture reuse (Olmix): `python -m sparknet.ablate NEW.yaml --design ... --reuse OLD` reuses the finished runs of
study OLD that a study over one more or one fewer source would train again.

A run of OLD applies to a planned run (point, seed) of the new study when it would have trained exactly that run:

- its weight vector, mapped onto the union of both studies' sources, equals the new point's (the added source at
  weight 0 in the new point, or the removed source at weight 0 in the old one);
- the same tokenizer: a byte-level BPE trained on the mixture's sources (`tokenizer.name=bpe`) is another tokenizer
  once a source is added or removed, and then nothing is reusable (one line says so, and every run trains); GPT-2's
  BPE or a tokenizer both studies name (a path or a hub name) is the same;
- the same recipe and proxy budget: the run's own config (its run folder's config.yaml) equals the new run's config
  in every key that changes what is trained (`sparknet.run.run_identity`: model, train, tokenizer, the mixture's
  budget, seed, validation and windowing, each common source's spec) and in eval.val_tokens, and the two mixture
  plans draw the same source for every sequence, in the same order.

Each reused run enters the new study as a finished trial (Optuna's `create_trial` + `study.add_trial`) with the user
attrs a run records (held-out losses, realized and planned tokens per source, run folder, MLflow run, seconds) and
`reused_from` {study, trial, storage}. The added source's held-out loss, which the old run never measured, is measured
on the old run's final model exactly as a run measures it at its end (`sparknet.train.source_val_loss` on the new
study's store of that source, with the run's accelerator), and named in `reused_measured`; a removed source's loss is
dropped. The objective is recomputed with the new sources (the mean held-out loss changes when a source is added), or
kept from the old trial when it is the same objective on the same data, else measured on the final model.

Only the reuse is new: the study is a plain `sparknet.ablation.Ablation` (same identity, workers, resume), whose
`before_create` measures the reused runs once the stores are prepared and whose `queue` adds them before queueing
the runs that still train.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from sparknet.ablate_transfer import existing_study
from sparknet.ablation import Ablation
from sparknet.errors import SparknetError


@dataclass
class ReusePlan:
    """Which planned runs of the new study reuse which trials of study `old`."""

    old: str
    old_names: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    old_attrs: dict[str, Any]
    storage_url: str
    proxy_tokens: int  # the new study's budget when it was checked (--proxy-tokens auto settles it later)
    new: str = ""
    existing: int | None = None  # the new study exists with trials already: how many of them were reused
    matches: dict[tuple[int, int], Any] = field(default_factory=dict)  # (point, seed) -> the old FrozenTrial
    why_none: str = ""  # why nothing is reusable, in one line ("" when runs were matched one by one)
    skipped: Counter = field(default_factory=Counter)  # old runs with the right weights not reused: reason -> count

    def change(self) -> str:
        if self.added:
            return f"{', '.join(self.added)} added, at weight 0 in the reused points"
        if self.removed:
            return f"{', '.join(self.removed)} removed, at weight 0 in the reused runs"
        return "the same sources"

    def summary(self, planned: int) -> str:
        if self.existing is not None:
            return (f"--reuse {self.old}: study {self.new} exists already, with {self.existing} runs reused when it "
                    f"was created; nothing more is reused")
        if self.why_none:
            return f"--reuse {self.old}: nothing reusable: {self.why_none}; all {planned} runs will train"
        n = len(self.matches)
        line = (f"--reuse {self.old}: {n} of {planned} runs reused from study {self.old} ({self.change()}); "
                f"{planned - n} will train")
        if self.skipped:
            count = sum(self.skipped.values())
            line += (f"; {count} finished run{'s' if count != 1 else ''} of {self.old} with a matching weight vector "
                     f"not reused: {'; '.join(f'{k} ({v})' for k, v in self.skipped.most_common(3))}")
        return line


def _first_difference(old: dict[str, Any], new: dict[str, Any], keys) -> str | None:
    for key in keys:
        if old.get(key) != new.get(key):
            return f"{key}={old.get(key, '(unset)')}, this study's {key}={new.get(key, '(unset)')}"
    return None


def check_reuse(abl: Ablation, old_name: str) -> ReusePlan:
    """Before anything starts: the old study (an ablation in the same storage), how its sources differ (two or more
    changes are an error), whether anything can be reused at all, and which old run each planned run reuses."""
    from sparknet.study import recipe
    from sparknet.study_storage import find_study

    if old_name == abl.study_name:
        raise SparknetError(f"--reuse {old_name}: is this study itself (fix: --reuse another study, or drop --reuse: "
                            f"a rerun continues the study)")
    storage, old = existing_study(old_name, abl.storage_url, abl.heartbeat_s, "--reuse")
    attrs = dict(old.user_attrs)
    if attrs.get("sparknet.kind") != "ablate" or "sparknet.design" not in attrs:
        kind = attrs.get("sparknet.kind")
        raise SparknetError(f"--reuse {old_name}: it is {f'a {kind} study' if kind else 'not a sparknet study'}, not a "
                            f"mixture ablation (fix: --reuse a study of python -m sparknet.ablate)")
    design = attrs["sparknet.design"]
    old_names, new_names = tuple(design["sources"]), abl.names
    if design.get("stage") is not None or abl.stage is not None:
        raise SparknetError(f"--reuse {old_name}: staged ablations (--stage) are not supported (fix: drop --reuse)")
    added = tuple(n for n in new_names if n not in old_names)
    removed = tuple(n for n in old_names if n not in new_names)
    old_rec, new_rec = attrs.get("sparknet.recipe") or {}, recipe(abl.base_config())
    modified = []
    for n in (n for n in new_names if n in old_names):
        keys = sorted({k for k in [*old_rec, *new_rec] if k.startswith(f"mixture.sources.{n}.")} -
                      {f"mixture.sources.{n}.weight"})
        diff = _first_difference(old_rec, new_rec, keys)
        if diff:
            modified.append((n, diff))
    changed = len(added) + len(removed) + len(modified)
    if changed >= 2:
        parts = ([f"{', '.join(added)} added"] if added else []) + ([f"{', '.join(removed)} removed"] if removed else []) \
            + [f"{n} changed" for n, _ in modified]
        raise SparknetError(f"--reuse {old_name}: its sources are {', '.join(old_names)}, this mixture's "
                            f"{', '.join(new_names)}: {changed} sources changed ({'; '.join(parts)}); runs are reused "
                            f"only across one more or one fewer source (fix: --reuse a study whose mixture differs by "
                            f"one source, or drop --reuse)")
    plan = ReusePlan(old_name, old_names, added, removed, attrs, abl.storage_url, abl.proxy_tokens, abl.study_name)
    mine = find_study(abl.study_name, storage)
    if mine is not None and mine.trials:  # a rerun: what was reused is in it, and it is not reused again
        plan.existing = sum("reused_from" in t.user_attrs for t in mine.get_trials(deepcopy=False))
        return plan
    proxy = attrs.get("sparknet.proxy_tokens")
    tokenizer_keys = sorted(k for k in {*old_rec, *new_rec} if k.startswith("tokenizer."))
    other_keys = [k for k in [*old_rec, *(k for k in new_rec if k not in old_rec)]
                  if not k.startswith(("mixture.sources.", "tokenizer.")) and k != "mixture.total_tokens"]
    if modified:
        n, diff = modified[0]
        plan.why_none = f"source {n} is not the same source as in study {old_name} (its {diff})"
    elif proxy != abl.proxy_tokens:
        plan.why_none = f"its proxy budget is {proxy:,} tokens, this study's {abl.proxy_tokens:,} (--proxy-tokens)"
    elif _first_difference(old_rec, new_rec, tokenizer_keys):
        plan.why_none = f"its tokenizer has {_first_difference(old_rec, new_rec, tokenizer_keys)}: another tokenizer"
    elif new_rec.get("tokenizer.name") == "bpe" and (added or removed):
        src = (added or removed)[0]
        plan.why_none = (f"the tokenizer is a BPE trained on the mixture's sources (tokenizer.name=bpe), so "
                         f"{'adding' if added else 'removing'} {src} trains another one and no run of {old_name} "
                         f"tokenized its data as this study will (fix: tokenizer.name=gpt2, or a tokenizer both "
                         f"studies name, lets runs be reused)")
    elif _first_difference(old_rec, new_rec, other_keys):
        plan.why_none = f"its recipe has {_first_difference(old_rec, new_rec, other_keys)}"
    if plan.why_none:
        return plan
    _match_runs(abl, plan, old)
    return plan


def _union_weights(names: tuple[str, ...], weights, union: list[str]) -> np.ndarray:
    by = dict(zip(names, (float(w) for w in weights)))
    w = np.array([by.get(n, 0.0) for n in union])
    return w / w.sum() if w.sum() > 0 else w


def _match_runs(abl: Ablation, plan: ReusePlan, old) -> None:
    """For each planned run, a finished run of the old study that trained exactly it (`run_difference`)."""
    from sparknet.study_storage import complete_trials

    union = [*plan.old_names, *plan.added]
    by_seed: dict[int, list] = {}
    for t in complete_trials(old):
        if "seed" in t.params and all(f"weight.{n}" in t.params for n in plan.old_names):
            by_seed.setdefault(int(t.params["seed"]), []).append(t)
    used: set[int] = set()
    plans: dict[str, Any] = {}
    curve_run = getattr(abl, "curve_run", None)
    for key in abl.planned_runs():
        point, seed = key
        # The study's learning curve (its base point, evaluated along the way) is trained: every source's curve, the
        # added one's included, is what it is for, and no old run has that.
        curve = curve_run is not None and curve_run(None, abl.point_config(point, seed))
        want = _union_weights(abl.names, abl.points[point].weights, union)
        for t in by_seed.get(seed, []):
            have = _union_weights(plan.old_names, [t.params[f"weight.{n}"] for n in plan.old_names], union)
            if t.number in used or not np.allclose(want, have, atol=1e-9):
                continue
            why = ("it would stand for this study's learning-curve run (its base point, evaluated along the way), "
                   "which always trains") if curve else run_difference(abl, key, t, plan, plans)
            if why:
                plan.skipped[why] += 1
                continue
            plan.matches[key] = t
            used.add(t.number)
            break


def _plain(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


def _mixture_sequence(cfg, cache: dict[str, Any]) -> tuple[list[str], list[int]]:
    """The plan as (source name of each sequence, its ordinal): what a run draws, whatever the sources' order."""
    from sparknet.config import to_dict
    from sparknet.mixture import build_plan

    key = json.dumps(_plain(to_dict(cfg)["mixture"]), sort_keys=True) + f"|{cfg.train.seq_len}"
    if key not in cache:
        p = build_plan(cfg.mixture, cfg.train.seq_len)
        cache[key] = ([p.source_names[i] for i in p.source_of], p.ordinal.tolist())
    return cache[key]


def run_difference(abl: Ablation, key: tuple[int, int], trial, plan: ReusePlan, cache: dict[str, Any]) -> str:
    """Why the old `trial` is not the new planned run `key` ("" when it is): its config (its run folder's
    config.yaml) against the new run's, in everything that changes what is trained, and the two plans."""
    from sparknet.config import load_config, to_dict
    from sparknet.run import run_identity

    run_dir = trial.user_attrs.get("run_dir")
    if not run_dir or not (Path(run_dir) / "config.yaml").is_file():
        return "its run folder is not on this machine"
    if plan.added and not (Path(run_dir) / "final" / "model.safetensors").is_file():
        return "its final model is missing (the added source's held-out loss cannot be measured)"
    try:
        old_cfg = load_config(Path(run_dir) / "config.yaml")
    except SparknetError:
        return "its config.yaml no longer loads"
    new_cfg = abl.point_config(*key)
    old_d, new_d = _plain(to_dict(old_cfg)), _plain(to_dict(new_cfg))
    old_id, new_id = run_identity(old_d), run_identity(new_d)
    for section in ("tokenizer", "model", "train"):
        diff = _first_difference(old_id[section], new_id[section], sorted({*old_id[section], *new_id[section]}))
        if diff:
            return f"its {section}.{diff}"
    om = {k: v for k, v in old_id["mixture"].items() if k != "sources"}
    nm = {k: v for k, v in new_id["mixture"].items() if k != "sources"}
    diff = _first_difference(om, nm, sorted({*om, *nm}))
    if diff:
        return f"its mixture.{diff}"
    if old_d["eval"]["val_tokens"] != new_d["eval"]["val_tokens"]:
        return f"its eval.val_tokens={old_d['eval']['val_tokens']}"
    old_src = {s["name"]: {k: v for k, v in s.items() if k != "weight"} for s in old_id["mixture"]["sources"]}
    new_src = {s["name"]: {k: v for k, v in s.items() if k != "weight"} for s in new_id["mixture"]["sources"]}
    for n in set(old_src) & set(new_src):
        if old_src[n] != new_src[n]:
            return f"its source {n} differs"
    if _mixture_sequence(old_cfg, cache) != _mixture_sequence(new_cfg, cache):
        return "its mixture plan draws the sequences in another order"
    return ""


# ---------------------------------------------------------------------------------------------
# Measuring what the old runs lack, and the trials they become


def held_out_losses(model_dir: Path, cfg, prepared, sources) -> dict[str, float]:
    """The held-out loss of each of `sources` for the exported model in `model_dir`, as a run measures it at its end
    (`sparknet.train.source_val_loss`: non-overlapping seq_len windows of the source's held-out slice, up to
    eval.val_tokens, on the run's device and autocast)."""
    from sparknet.model import load_exported
    from sparknet.run import make_accelerator
    from sparknet.train import source_val_loss

    accelerator = make_accelerator(cfg)
    model = load_exported(model_dir, cfg.model).to(accelerator.device).eval()
    view = SimpleNamespace(plan=SimpleNamespace(source_names=list(sources)), stores=prepared.stores)
    try:
        return source_val_loss(model, view, cfg.train.seq_len, cfg.eval.val_tokens, cfg.eval.batch_size,
                               accelerator.device, accelerator.autocast)
    finally:
        del model


def references(cfg, prepared):
    """The count-table references (`sparknet.references`) a run of `cfg` computes at its end, on every source's held-out
    slice: unigram and bigram models of exactly the tokens its plan draws."""
    from sparknet.mixture import build_plan
    from sparknet.references import run_references

    return run_references(build_plan(cfg.mixture, cfg.train.seq_len), prepared.stores, prepared.tokenizer.vocab_size,
                          cfg.train.seq_len, cfg.eval.val_tokens)


def reused_trials(abl: Ablation, plan: ReusePlan) -> list[dict[str, Any]]:
    """Each matched old run as the finished trial of the new study it stands for (what `optuna.trial.create_trial`
    takes): the held-out losses of the new sources (the added one measured on the old final model), the objective
    recomputed, the user attrs a run records, and `reused_from`."""
    from optuna.distributions import FloatDistribution, IntDistribution

    from sparknet.locks import prepare_lock
    from sparknet.prepare import prepare
    from sparknet.run import RunOutcome
    from sparknet.study_storage import redact

    if not plan.matches:
        return []
    obj = abl.objective
    same_objective = (plan.old_attrs.get("sparknet.objective") == obj.name and obj.kind not in ("val",)
                      and (plan.old_attrs.get("sparknet.objective_data") or {}) == _objective_data(abl))
    prepared = None
    out = []
    started = time.perf_counter()
    measured_count = 0
    for (point, seed), t in sorted(plan.matches.items()):
        cfg = abl.point_config(point, seed)
        old_val = t.user_attrs.get("val_loss") or {}
        val = {n: float(old_val[n]) for n in abl.names if n in old_val}
        missing = [n for n in abl.names if n not in val]
        measured: dict[str, float] = {}
        if missing:
            if prepared is None:  # the stores are the study's, prepared already (before_create): nothing is read
                with prepare_lock(cfg.lab_path):
                    prepared = prepare(cfg, progress=False, write_report=False)
            measured = held_out_losses(Path(t.user_attrs["run_dir"]) / "final", cfg, prepared, missing)
            measured_count += 1
            val |= measured
        attrs = {k: v for k, v in t.user_attrs.items()
                 if k not in ("reason", "val_loss_by_eval", "val_loss", "planned_tokens", "tokens_per_source",
                              "ref_bigram_by_eval")}
        extra: dict[str, Any] = {}
        for ref in ("val_ref_unigram", "val_ref_bigram"):  # the count-table references a run keeps (new sources')
            if isinstance(attrs.get(ref), dict):
                attrs[ref] = {n: float(v) for n, v in attrs[ref].items() if n in abl.names}
        if isinstance(attrs.get("val_ref_bigram"), dict) and any(n not in attrs["val_ref_bigram"] for n in abl.names):
            if prepared is None:
                with prepare_lock(cfg.lab_path):
                    prepared = prepare(cfg, progress=False, write_report=False)
            refs = references(cfg, prepared)  # of the tokens the plan drew: the old run's, since the plans are equal
            extra |= {"val_ref_unigram": refs.unigram, "val_ref_bigram": refs.bigram}
        if obj.kind in ("val", "source"):
            value = obj.value(val)
        elif same_objective and t.value is not None:
            value = float(t.value)
        else:  # another objective on the final model (WikiText-2 validation, downstream select items)
            metrics = obj.measure(RunOutcome(Path(t.user_attrs["run_dir"]), {"val_loss": val}, None), cfg)
            value = metrics[obj.metric]
            if "wikitext-valid/bpb" in metrics:
                extra["wikitext_valid_bpb"] = metrics["wikitext-valid/bpb"]
            measured[obj.metric] = value
        planned = t.user_attrs.get("planned_tokens") or {}
        realized = t.user_attrs.get("tokens_per_source") or {}
        attrs |= extra | {
            "point": point, "seed": seed, "point_name": abl.points[point].name, "val_loss": val,
            "planned_tokens": {n: int(planned.get(n, 0)) for n in abl.names},
            "tokens_per_source": {n: int(realized.get(n, 0)) for n in abl.names},
            "reused_from": {"study": plan.old, "trial": t.number, "storage": redact(plan.storage_url)},
            "reused_measured": measured}
        dists = {"point": IntDistribution(0, max(0, len(abl.points) - 1)), "seed": IntDistribution(seed, seed),
                 **{f"weight.{n}": FloatDistribution(0.0, 1.0) for n in abl.names}}
        out.append({"value": float(value), "params": abl.params(point, seed), "distributions": dists,
                    "user_attrs": attrs})
    if measured_count:
        what = ", ".join(f"val/{n}" for n in plan.added) or "the objective"
        print(f"--reuse {plan.old}: measured {what} on the final models of {measured_count} reused run"
              f"{'s' if measured_count != 1 else ''} ({time.perf_counter() - started:.1f} s)", flush=True)
    return out


def _objective_data(abl: Ablation) -> dict[str, Any]:
    data = abl.objective.data(abl.base_config())
    return {k: data[k] for k in ("sha256", "rows")} if data else {}


@dataclass(kw_only=True)
class ReuseAblation(Ablation):
    """An Ablation that starts, when it is created, with the finished runs of another study that apply (`plan`)."""

    reuse: ReusePlan
    _trials: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, abl: Ablation, plan: ReusePlan) -> ReuseAblation:
        return cls(**{f.name: getattr(abl, f.name) for f in fields(abl)}, reuse=plan)

    def before_create(self, existing) -> None:
        super().before_create(existing)  # the stores, prepared for every point (the added source's included)
        if existing is not None and existing.trials:
            return  # runs are reused when a study is created (`ReusePlan.existing` said so)
        if self.reuse.existing is None and self.reuse.proxy_tokens != self.proxy_tokens:
            # --proxy-tokens auto chose the budget since the check: the runs that apply are those of that budget
            self.reuse = check_reuse(self, self.reuse.old)
            print(self.reuse.summary(self.planned()), flush=True)
        self._trials = reused_trials(self, self.reuse)

    def queue(self, study) -> None:
        if study.trials or not self._trials:
            return super().queue(study)
        import optuna

        for r in self._trials:
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, **r))
        for key in self.planned_runs():
            if key not in self.reuse.matches:
                self.enqueue_run(study, key)
