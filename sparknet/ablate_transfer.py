"""Does a mixture ablation's answer transfer? `python -m sparknet.ablate --transfer STUDY --budget 5x`.

    python -m sparknet.ablate --transfer STUDY --budget 5x [--transfer-points K] [--study NAME] [--storage URL]
           [--out DIR] [key=value ...]

The study's ranking was measured at its proxy budget. The transfer retrains a few of its mixtures at a larger budget
(`--budget 5x`: the proxy budget times 5; or a token count, `--budget 100M`) or with a larger model (key=value
overrides, e.g. model.preset=gpt2-124m), with the study's own seeds scheme (`--seeds`, `--seed-vary`) and
objective, and says whether the order of the mixtures holds:

- the mixtures: the study's answer (`best.yaml`, stored as the study's `sparknet.best_weights`), the best measured
  point, the base mixture (the mixture file's own weights), and K more points spread over the measured ranking
  (`--transfer-points K`, evenly spaced ranks from the best remaining to the worst; the default gives about 6-8 runs in
  all: `default_spread`);
- the retraining is itself a study: a plain `sparknet.ablation.Ablation` over those points (written as a design file,
  `points.yaml`), named `<study>-transfer-5x` (a hash of the overrides appended when there are any), on the same
  storage, with its own folder `<study folder>/transfer-5x/`. So workers, resume and "a rerun trains nothing" are the
  ablation's own;
- the answer, once every run finished: Spearman's rank correlation (`scipy.stats.spearmanr`) between the two
  budgets' mean objectives over the points measured at both, and the decision accuracy of every pair of them
  (DataDecide: the fraction of pairs ordered the same way at both budgets), also split by whether the pair's
  proxy-budget difference is beyond seed noise (Welch 95% interval excluding 0) or inside it. Stored in the original
  study's user attrs (`sparknet.transfer`, one entry per transfer study), rendered by
  `sparknet.ablate_sections.transfer_section` into a marked "Transfer" section of the study's README.md (replaced in
  place on every rerun) and written to `transfer.csv` beside it (one row per transfer and point).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparknet.ablate_report import points_frame, results_frame
from sparknet.ablate_sections import TRANSFER_ATTR, pair_fraction, transfer_section, with_section
from sparknet.ablation import Ablation, base_weights, dry_run_text
from sparknet.errors import SparknetError

ROLE_BEST_YAML = "best.yaml"
PERMUTATIONS = 9999  # for the rank correlation's p-value: exact up to 7 points (7! = 5,040)
ROLE_BEST_MEASURED = "best measured"
ROLE_BASE = "base mixture"
# The flags a transfer takes from its study (the budget is --budget, the rest is the study's).
STUDY_KEEPS = {"--proxy-tokens": "proxy budget (the transfer's budget is --budget)", "--objective": "objective",
               "--seeds": "seeds", "--seed-vary": "seeds scheme", "--stage": "stage", "--design-seed": "design",
               "--confirm": "best.yaml's confirmation (python -m sparknet.ablate ... --confirm on the study)"}


# ---------------------------------------------------------------------------------------------
# The study as an Ablation again


def existing_study(name: str, storage_url: str, heartbeat_s: int, flag: str):
    """The stored study `name` (never created: a SQLite file that does not exist is not made); a one-line error
    naming the storage and the studies it holds when there is none."""
    import optuna

    from sparknet.study_storage import open_storage, quiet_optuna, redact

    quiet_optuna()
    fix = "fix: --storage URL of the study's database, or lab_dir=... of its lab"
    if storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).is_file():
        raise SparknetError(f"{flag} {name}: no such study: {redact(storage_url)} does not exist ({fix})")
    storage = open_storage(storage_url, heartbeat_s)
    try:
        return storage, optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        there = f"it holds {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names else "it holds none"
        raise SparknetError(f"{flag} {name}: no such study at {redact(storage_url)} ({there}) ({fix})") from None


def _mixture_path(stored: str, flag: str, name: str) -> str:
    from sparknet.study import ROOT

    for p in (Path(stored), ROOT / stored):
        if p.is_file():
            return str(p)
    raise SparknetError(f"{flag} {name}: its mixture {stored} is not found from here (fix: run the command from the "
                        f"folder the study was started in)")


def ablation_of(study, storage_url: str, *, flag: str, out_dir: Path | None = None, heartbeat_s: int = 60):
    """The `sparknet.ablation.Ablation` a stored ablation study was run as (its mixture, overrides, points, seeds,
    objective, proxy budget), checked against the study's stored recipe: a mixture file changed since is an error."""
    from sparknet.config import load_config
    from sparknet.designs import Point
    from sparknet.objective import Objective
    from sparknet.study import recipe

    attrs, name = study.user_attrs, study.study_name
    kind = attrs.get("sparknet.kind")
    if kind != "ablate" or "sparknet.design" not in attrs:
        what = f"a {kind} study" if kind else "not a sparknet study"
        raise SparknetError(f"{flag} {name}: it is {what}, not a mixture ablation (fix: name a study of python -m "
                            f"sparknet.ablate)")
    design = attrs["sparknet.design"]
    names = tuple(design["sources"])
    points = [Point(str(n), tuple(float(x) for x in w)) for n, w in design["points"]]
    mixture = _mixture_path(str(attrs.get("sparknet.mixture", "")), flag, name)
    overrides = [str(o) for o in attrs.get("sparknet.overrides", [])]
    try:
        base = load_config(mixture, overrides)
    except SparknetError as exc:
        raise SparknetError(f"{flag} {name}: its mixture {mixture} with its overrides: {exc}") from None
    label = str(design.get("design", ""))
    m = re.fullmatch(r"(.*) \(seed (\d+)\)", label)
    design_text, design_seed = (m.group(1), int(m.group(2))) if m else (label.removeprefix("file "), 0)
    k = int(attrs.get("sparknet.seeds", 1))
    abl = Ablation(mixture=mixture, design=design_text, points=points, names=names, stage=design.get("stage"),
                   seeds=[base.train.seed + i for i in range(k)],
                   seed_vary=attrs.get("sparknet.seed_vary", "init" if "sparknet.seeds" in attrs else "both"),
                   data_seed=base.mixture.seed, base_overrides=overrides,
                   objective=Objective.parse(attrs["sparknet.objective"], names), design_seed=design_seed,
                   proxy_tokens=int(attrs["sparknet.proxy_tokens"]), study_name=name, storage_url=storage_url,
                   out_dir=out_dir, heartbeat_s=heartbeat_s)
    stored, now = attrs.get("sparknet.recipe") or {}, recipe(abl.base_config())
    for key in [*stored, *(k for k in now if k not in stored)]:
        if stored.get(key) != now.get(key):
            raise SparknetError(f"{flag} {name}: its recipe has {key}={stored.get(key, '(unset)')}, its mixture file "
                                f"{mixture} now gives {now.get(key, '(unset)')} (fix: restore the mixture file as the "
                                f"study ran it)")
    return abl


# ---------------------------------------------------------------------------------------------
# Which points are retrained


@dataclass
class Chosen:
    name: str
    weights: tuple[float, ...]
    roles: list[str]


def default_spread(num_seeds: int, num_chosen: int) -> int:
    """K so that the transfer trains about 6-8 runs: ceil(7 / seeds) points in all (at least 4, so that a rank
    correlation means something), less those already chosen (best.yaml, best measured, base)."""
    return max(0, max(4, math.ceil(7 / max(1, num_seeds))) - num_chosen)


def _same(a, b) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), atol=1e-6))


def choose_points(abl, study, k: int | None) -> list[Chosen]:
    """The study's answer (best.yaml), its best measured point, the base mixture, then K points spread evenly over
    the remaining measured ranking (from the best remaining to the worst); a mixture in several roles once."""
    from sparknet.config import load_config, read_yaml

    metric = abl.objective.metric
    pts = points_frame(abl, results_frame(abl, study))
    measured = pts.dropna(subset=[metric]).reset_index(drop=True) if len(pts) else pts
    if not len(measured):
        raise SparknetError(f"--transfer {abl.study_name}: no point has a finished run (fix: finish the study first)")
    rows = [(str(r["mixture"]), tuple(float(r[f"weight.{n}"]) for n in abl.names)) for _, r in measured.iterrows()]
    chosen: list[Chosen] = []

    def add(name: str, weights: tuple[float, ...], role: str) -> None:
        for c in chosen:
            if _same(c.weights, weights):
                c.roles.append(role)
                return
        twin = next((n for n, w in rows if _same(w, weights)), None)  # a measured point keeps its design name
        chosen.append(Chosen(twin or name, tuple(float(x) for x in weights), [role]))

    best = study.user_attrs.get("sparknet.best_weights")
    if best is None and (abl.out / "best.yaml").is_file():  # a summary from before the weights were kept
        best = abl.best_weights(read_yaml(abl.out / "best.yaml"))
    if best is not None and len(best) == len(abl.names):
        add(ROLE_BEST_YAML, tuple(float(x) for x in best), ROLE_BEST_YAML)
    add(rows[0][0], rows[0][1], ROLE_BEST_MEASURED)
    base = base_weights(load_config(abl.mixture, list(abl.base_overrides)), abl.stage)
    add(ROLE_BASE, base, ROLE_BASE)
    rest = [(i, n, w) for i, (n, w) in enumerate(rows) if not any(_same(c.weights, w) for c in chosen)]
    k = default_spread(len(abl.seeds), len(chosen)) if k is None else k
    if k >= len(rest):
        picks = list(range(len(rest)))
    elif k == 1:
        picks = [len(rest) // 2]
    else:
        picks = sorted({int(round(x)) for x in np.linspace(0, len(rest) - 1, k)}) if k else []
    for j in picks:
        i, n, w = rest[j]
        add(n, w, f"spread: rank {i + 1} of {len(rows)}")
    return chosen


def write_points_file(path: Path, names: tuple[str, ...], chosen: list[Chosen], origin: str) -> Path:
    """The transfer's design, as a design file `sparknet.ablate --design` reads."""
    import yaml

    from sparknet.study_files import write_text

    body = {"points": [{"name": c.name, "weights": {n: float(w) for n, w in zip(names, c.weights) if w > 0}}
                       for c in chosen]}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, f"# The points of {origin}, retrained by its transfer (python -m sparknet.ablate "
                            f"--transfer).\n" + yaml.safe_dump(body, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# --budget


def parse_budget_text(text: str) -> tuple[str, float]:
    """`5x` -> ("x", 5.0); a token count (`100M`, `81920`) -> ("tokens", n). One-line error otherwise."""
    from sparknet.config import parse_tokens

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[xX]\s*", text or "")
    if m:
        mult = float(m.group(1))
        if mult <= 0:
            raise SparknetError(f"--budget {text}: the multiple must be > 0 (fix: --budget 5x)")
        return "x", mult
    try:
        tokens = parse_tokens(text)
    except ValueError:
        raise SparknetError(f"--budget {text!r}: not like 5x (times the study's proxy budget) or a token count such as "
                            f"100M (fix: --budget 5x)") from None
    if tokens <= 0:
        raise SparknetError(f"--budget {text}: must be > 0 tokens (fix: --budget 5x, or e.g. --budget 100M)")
    return "tokens", float(tokens)


def _tokens_label(n: int) -> str:
    for div, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def budget_of(kind: str, value: float, proxy: int) -> tuple[int, str]:
    """(tokens, label for the study's name): `5x` of the proxy budget, or the token count."""
    if kind == "x":
        return int(round(proxy * value)), f"{value:g}x"
    return int(value), _tokens_label(int(value))


# ---------------------------------------------------------------------------------------------
# The comparison


def _side(pts, weights, names, metric) -> dict[str, Any] | None:
    """{mean, sd, n, failed} of the point of `pts` with these weights (None if it has none or no finished seed)."""
    for _, r in pts.iterrows():
        if _same([r[f"weight.{n}"] for n in names], weights):
            if not (r[metric] == r[metric]):
                return None
            sd = float(r["sd"])
            return {"mean": float(r[metric]), "sd": sd if sd == sd else None, "n": int(r["seeds"]),
                    "failed": int(r["failed"])}
    return None


def _ranks(values: list[float]) -> list[int]:
    order = np.argsort(np.asarray(values), kind="stable")
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(1, len(values) + 1)
    return [int(x) for x in ranks]


def compare(small: list[dict | None], large: list[dict | None]) -> dict[str, Any]:
    """Spearman and the decision accuracy of every pair over the points with a value at both budgets (`small`,
    `large`: per point, {mean, sd, n} or None). A pair agrees when its two differences have the same sign; it is
    `separated` when the small-budget difference's Welch 95% interval excludes 0, `noise` when it includes it, and
    `unmeasured` when a side has fewer than two seeds (or no spread)."""
    from scipy.stats import permutation_test, spearmanr

    from sparknet.ablate_stats import welch_from_stats

    both = [i for i in range(len(small)) if small[i] is not None and large[i] is not None]
    out: dict[str, Any] = {"points": both, "n": len(both), "spearman": None, "spearman_p": None,
                           "spearman_p_method": ""}
    if len(both) >= 3:
        a = np.array([small[i]["mean"] for i in both])
        b = np.array([large[i]["mean"] for i in both])
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            out["spearman"] = float(spearmanr(a, b).statistic)
            # Its p-value by permuting the pairings: exact (every permutation) up to 7 points, where the t
            # approximation spearmanr reports is poor (3 points: it says 0.67 for a correlation every other pairing
            # reaches too, p = 1); 9,999 seeded resamples beyond.
            res = permutation_test((a, b), lambda x, y: spearmanr(x, y).statistic, permutation_type="pairings",
                                   n_resamples=PERMUTATIONS, alternative="two-sided", rng=np.random.default_rng(0))
            out["spearman_p"] = float(res.pvalue)
            out["spearman_p_method"] = ("exact permutation" if math.factorial(len(both)) <= PERMUTATIONS else
                                        f"permutation, {PERMUTATIONS:,} resamples")
    pairs = {"all": [0, 0], "separated": [0, 0], "noise": [0, 0], "unmeasured": [0, 0]}
    for x, i in enumerate(both):
        for j in both[x + 1:]:
            s, lg = small[i], large[i]
            s2, lg2 = small[j], large[j]
            agree = (s["mean"] - s2["mean"]) * (lg["mean"] - lg2["mean"]) > 0
            nan = math.nan
            d = welch_from_stats(s["mean"], nan if s["sd"] is None else s["sd"], s["n"],
                                 s2["mean"], nan if s2["sd"] is None else s2["sd"], s2["n"])
            group = "unmeasured" if not d.measured else "separated" if (d.low > 0 or d.high < 0) else "noise"
            for g in ("all", group):
                pairs[g][0] += int(agree)
                pairs[g][1] += 1
    out["pairs"] = pairs
    return out


def transfer_result(orig, orig_study, tabl, tstudy, chosen: list[Chosen], label: str,
                    extra: list[str]) -> dict[str, Any]:
    """What the original study keeps of one transfer (JSON): the points with both budgets' means, the comparison."""
    metric = orig.objective.metric
    small_pts = points_frame(orig, results_frame(orig, orig_study))
    large_pts = points_frame(tabl, results_frame(tabl, tstudy))
    small = [_side(small_pts, c.weights, orig.names, metric) for c in chosen]
    large = [_side(large_pts, c.weights, tabl.names, metric) for c in chosen]
    cmp = compare(small, large)
    both = cmp.pop("points")
    rank_small = dict(zip(both, _ranks([small[i]["mean"] for i in both]))) if both else {}
    rank_large = dict(zip(both, _ranks([large[i]["mean"] for i in both]))) if both else {}
    have = [i for i in range(len(chosen)) if large[i] is not None]
    rank_all = dict(zip(have, _ranks([large[i]["mean"] for i in have]))) if have else {}
    points = [{"name": c.name, "roles": c.roles, "weights": dict(zip(orig.names, c.weights)),
               "small": small[i], "large": large[i], "small_rank": rank_small.get(i), "large_rank": rank_large.get(i),
               "large_rank_all": rank_all.get(i)} for i, c in enumerate(chosen)]
    return {"study": tabl.study_name, "label": label, "budget_tokens": tabl.proxy_tokens,
            "proxy_tokens": orig.proxy_tokens, "overrides": list(extra), "metric": metric,
            "unit": orig.objective.unit, "seeds": len(orig.seeds), "seed_vary": orig.seed_vary,
            "folder": tabl.out.name, "points": points, **cmp}


# ---------------------------------------------------------------------------------------------
# transfer.csv, and the README's Transfer section (rendered by sparknet.ablate_sections)


def transfer_frame(attrs: Mapping[str, Any]):
    """One row per transfer and point (transfer.csv)."""
    import pandas as pd

    rows = []
    for key, r in sorted((attrs.get(TRANSFER_ATTR) or {}).items()):
        for p in r["points"]:
            row = {"transfer": key, "budget_tokens": r["budget_tokens"], "proxy_tokens": r["proxy_tokens"],
                   "overrides": " ".join(r["overrides"]), "mixture": p["name"], "roles": "; ".join(p["roles"])}
            row |= {f"weight.{n}": w for n, w in p["weights"].items()}
            for side, col in (("small", "proxy"), ("large", "transfer")):
                s = p[side] or {}
                row |= {f"{col}_mean": s.get("mean"), f"{col}_sd": s.get("sd"), f"{col}_seeds": s.get("n"),
                        f"{col}_failed": s.get("failed")}
            row |= {"proxy_rank": p["small_rank"], "transfer_rank": p["large_rank"],
                    "spearman": r["spearman"], "spearman_p": r["spearman_p"],
                    "decision_accuracy": r["pairs"]["all"][0] / r["pairs"]["all"][1] if r["pairs"]["all"][1] else None}
            rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("proxy_seeds", "proxy_failed", "transfer_seeds", "transfer_failed", "proxy_rank", "transfer_rank"):
        if col in df:
            df[col] = df[col].astype("Int64")  # counts and ranks, blank where a point has none
    return df


def write_transfer(orig, orig_study, result: dict[str, Any]) -> tuple[Path, Path]:
    """Keep `result` in the original study's user attrs (under its lock), then write its README's section and
    transfer.csv from what the study keeps (every transfer of it)."""
    from sparknet.study_files import write_csv, write_text
    from sparknet.study_storage import study_lock

    with study_lock(orig.storage_url, orig.study_name):
        kept = dict(orig_study.user_attrs.get(TRANSFER_ATTR) or {})
        kept[result["study"]] = result
        orig_study.set_user_attr(TRANSFER_ATTR, kept)
    attrs = {TRANSFER_ATTR: kept}
    out = orig.out
    out.mkdir(parents=True, exist_ok=True)
    readme = out / "README.md"
    old = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    write_text(readme, with_section(old, transfer_section(attrs)))
    return readme, write_csv(out / "transfer.csv", transfer_frame(attrs))


# ---------------------------------------------------------------------------------------------
# The command


def _adequacy(args, kind) -> dict[str, Any]:
    """--adequacy-margin and --no-adequacy as the study's fields, where the study has them (sparknet.adequacy)."""
    from dataclasses import fields

    have = {f.name for f in fields(kind)}
    given = {"adequacy_margin": getattr(args, "adequacy_margin", None),
             "adequacy_enforced": None if not hasattr(args, "no_adequacy") else not args.no_adequacy}
    return {k: v for k, v in given.items() if k in have and v is not None}


def transfer_main(args, argv: list[str]) -> int:
    """`python -m sparknet.ablate --transfer STUDY --budget 5x ...` (args: sparknet.ablate's parsed flags)."""
    from sparknet.config import load_config
    from sparknet.designs import Point
    from sparknet.study import check_out_folder, parse_budget, parse_study_name
    from sparknet.study_storage import check_storage_url, default_storage, finished_trials, redact

    name = args.transfer
    if name is None:
        flag = "--budget" if args.budget is not None else "--transfer-points"
        raise SparknetError(f"{flag}: only with --transfer STUDY (fix: python -m sparknet.ablate --transfer STUDY "
                            f"--budget 5x)")
    if args.design is not None:
        raise SparknetError(f"--transfer {name}: takes its points from the study; --design starts a new study (fix: "
                            f"drop --design)")
    if args.reuse is not None:
        raise SparknetError(f"--transfer {name}: --reuse is for a new study over other sources (fix: drop --reuse)")
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for flag, what in STUDY_KEEPS.items():
        if flag in given:
            raise SparknetError(f"--transfer {name}: keeps the study's {what} (fix: drop {flag})")
    overrides = list(args.overrides)
    if args.mixture:
        if "=" not in args.mixture:
            raise SparknetError(f"--transfer {name}: the mixture is the study's; {args.mixture} is not a key=value "
                                f"override (fix: drop it)")
        overrides.insert(0, args.mixture)
    if args.budget is None:
        raise SparknetError(f"--transfer {name}: --budget is required (fix: --budget 5x, five times the study's "
                            f"proxy budget, or a token count such as --budget 100M)")
    kind, value = parse_budget_text(args.budget)
    if args.transfer_points is not None and args.transfer_points < 0:
        raise SparknetError(f"--transfer-points: must be >= 0, got {args.transfer_points} (fix: --transfer-points 3)")
    _, timeout = parse_budget(args, "20M")
    lab = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("lab_dir=")), "lab")
    if args.storage:
        check_storage_url(args.storage)
    url = args.storage or default_storage(Path(lab))
    storage, study = existing_study(name, url, args.heartbeat, "--transfer")
    orig = ablation_of(study, url, flag="--transfer", out_dir=Path(args.out) if args.out else None,
                       heartbeat_s=args.heartbeat)
    if orig.stage is not None:
        raise SparknetError(f"--transfer {name}: a staged ablation (stage {orig.stage}) is not supported yet (fix: "
                            f"retrain its best.yaml with python -m sparknet.run)")
    done = {(int(t.params["point"]), int(t.params["seed"])) for t in finished_trials(study) if "point" in t.params}
    planned = orig.planned_runs()
    if not all(key in done for key in planned):
        raise SparknetError(f"--transfer {name}: {sum(k in done for k in planned)} of {len(planned)} runs of the study "
                            f"finished (fix: finish it first: rerun its command, see its README)")
    tokens, label = budget_of(kind, value, orig.proxy_tokens)
    extra = [o for o in overrides if not o.startswith("lab_dir=")]
    if tokens == orig.proxy_tokens and not extra:
        raise SparknetError(f"--transfer {name}: --budget {args.budget} is the study's own proxy budget and no override "
                            f"changes the runs: they would be the study's (fix: --budget 5x, or a larger model, e.g. "
                            f"model.preset=gpt2-124m)")
    suffix = f"transfer-{label}" + (f"-{hashlib.sha256(json.dumps(extra).encode()).hexdigest()[:6]}" if extra else "")
    tname = parse_study_name(args.study or f"{name}-{suffix}")
    check_out_folder(orig.out, name, url)
    if not (orig.out / "README.md").is_file():
        raise SparknetError(f"--transfer {name}: {orig.out}/ has no README.md of the study, where the transfer's "
                            f"answer goes (fix: --out DIR of the study's folder, or run from where it was started)")
    out = orig.out / suffix
    check_out_folder(out, tname, url)
    base = load_config(orig.mixture, [*orig.base_overrides, *(o for o in overrides if o not in orig.base_overrides)])
    if base.train.batch_tokens > tokens:
        raise SparknetError(f"--budget {args.budget}: {tokens:,} tokens, less than one optimizer step of "
                            f"train.batch_tokens {base.train.batch_tokens:,} (fix: a larger --budget)")
    chosen = choose_points(orig, study, args.transfer_points)
    import optuna

    stored = None
    try:
        stored = optuna.load_study(study_name=tname, storage=storage).user_attrs.get("sparknet.design")
    except KeyError:
        pass
    if stored is not None:  # a rerun: the points the transfer study was made with (the study may have grown since)
        kept = []
        for pname, w in stored["points"]:
            twin = next((c for c in chosen if _same(c.weights, w)), None)
            kept.append(Chosen(str(pname), tuple(float(x) for x in w), twin.roles if twin else ["spread"]))
        chosen = kept
    points_file = out / "points.yaml"
    from sparknet.objective import Objective

    tabl = Ablation(mixture=orig.mixture, design=str(points_file), points=[Point(c.name, c.weights) for c in chosen],
                    names=orig.names, stage=None, seeds=[base.train.seed + i for i in range(len(orig.seeds))],
                    seed_vary=orig.seed_vary, data_seed=base.mixture.seed,
                    base_overrides=[*orig.base_overrides, *(o for o in overrides if o not in orig.base_overrides)],
                    objective=Objective.parse(orig.objective.name, orig.names), proxy_tokens=tokens, study_name=tname,
                    storage_url=url, out_dir=out, timeout_s=timeout, heartbeat_s=args.heartbeat,
                    progress=args.progress, storage_given=args.storage is not None, **_adequacy(args, Ablation))
    plans = tabl.plans  # every point at the transfer's budget, before anything starts
    roles = "; ".join(f"{c.name}: {', '.join(c.roles)}" for c in chosen)
    print(f"transfer of study {name} ({orig.proxy_tokens:,} tokens a run) at {tokens:,} tokens"
          + (f" with {' '.join(extra)}" if extra else "") + f": {len(chosen)} points x {len(tabl.seeds)} seeds "
          f"as study {tname} at {redact(url)} ({roles})", flush=True)
    if args.dry_run:
        print(dry_run_text(tabl, plans))
        return 0
    try:
        tabl.objective.check(tabl.point_config(0, tabl.seeds[0]))
    except SparknetError as exc:
        raise SparknetError(f"--transfer {name}: objective {tabl.objective.name}: {exc}") from None
    write_points_file(points_file, orig.names, chosen, f"study {name}")
    code = tabl.run(confirm=False)
    tstudy = optuna.load_study(study_name=tname, storage=storage)
    tdone = {(int(t.params["point"]), int(t.params["seed"])) for t in finished_trials(tstudy) if "point" in t.params}
    if code or not all(key in tdone for key in tabl.planned_runs()):
        print(f"transfer {tname}: not every run finished yet; rerun the same command to continue", flush=True)
        return code
    result = transfer_result(orig, study, tabl, tstudy, chosen, label, extra)
    readme, csv = write_transfer(orig, study, result)
    rho = (f"Spearman {result['spearman']:+.2f} ({result['spearman_p_method']} p = {result['spearman_p']:.2g})"
           if result["spearman"] is not None
           else "no rank correlation (too few points)")
    pairs = result["pairs"]
    print(f"transfer {tname}: over {result['n']} points measured at both budgets, {rho}; decision accuracy "
          f"{pair_fraction(pairs['all'])}; beyond seed noise at the proxy budget {pair_fraction(pairs['separated'])}, inside it "
          f"{pair_fraction(pairs['noise'])}" + (f", unmeasured {pair_fraction(pairs['unmeasured'])}" if pairs["unmeasured"][1] else ""),
          flush=True)
    print(f"wrote {csv} and the Transfer section of {readme}", flush=True)
    return 0
