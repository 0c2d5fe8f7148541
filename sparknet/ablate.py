"""python -m sparknet.ablate: a mixture ablation as one command — which sources, in which proportions?

    python -m sparknet.ablate MIXTURE.yaml --design DESIGN [--proxy-tokens 20M] [--objective wikitext-valid]
           [--study NAME] [--storage URL] [--out DIR] [--seeds K] [--confirm] [--stage I] [--reuse STUDY] [key=value ...]
    python -m sparknet.ablate --transfer STUDY --budget 5x [--transfer-points K] [key=value ...]

`--transfer` (sparknet.ablate_transfer) retrains a finished study's answer and a spread of its points at a larger
budget or model, as a study of its own, and writes whether the ranking holds; `--reuse` (sparknet.ablate_reuse) starts
a study over one more or one fewer source with the other study's finished runs that still apply.

DESIGN (sparknet.designs.design_points) is `leave-one-out`, `single-source`, `grid:STEP`, `random:N`, `prior:N[:C]` (seeded
Dirichlet draws, as RegMix) or a YAML file of weight vectors. An ablation is a kind of study
(`sparknet.study.StudyKind`), as a sweep is: the points x seeds are enqueued in an Optuna study with fixed
parameters (point index, model seed `train.seed`, the weights), so several workers on one storage (PostgreSQL for
several machines), heartbeats, retries and resume come from `sparknet.study`, and exactly the planned runs finish: a
worker takes only queued runs, and before taking one it queues again any planned run that no trial holds. Each run
is an MLflow child run of the study's parent run.

Token stores are prepared once, before the first run, for the largest share any point gives each source (a point's
weights change only the plan, not the stores; a source at weight 0 still needs its store for its held-out loss);
then every point's plan is checked against them (a source that cannot supply its share within `max_repeats` is a
one-line error naming the point), so nothing fails half-way through a study.

What is minimized comes from `sparknet.objective`: `wikitext-valid` (the default: bits per byte on the WikiText-2
validation split), `val` or `val/<source>`. Every run records every source's held-out loss and its realized tokens
per source, so one study can be read against any of them. A study remembers its design, seeds, proxy budget,
objective and recipe: a rerun with others is a one-line error naming the difference (`--seeds` may grow: the new
seeds' runs are queued).

The answer (`sparknet.ablate_report`), written once per study (whatever the number of workers) to `--out` (default
`experiments/<study>/`): README.md (the question, the command, the table sorted by the objective with the mean and
spread over seeds, what was found in plain sentences, the fitted model's verdict), results.csv (one row per run),
plots, and best.yaml: the fitted model's predicted mixture when its held-out rank correlation is trusted, else the
best measured one, at the mixture's full budget (`python -m sparknet.run experiments/<study>/best.yaml`; `--confirm`
trains it, once per study).
"""

from __future__ import annotations

import sys

from sparknet.ablate_reuse import ReuseAblation, check_reuse
from sparknet.ablate_transfer import transfer_main
from sparknet.ablation import (  # noqa: F401  (re-exported: the kind lives in sparknet.ablation)
    Ablation,
    base_weights,
    check_points,
    default_study_name,
    dry_run_text,
    prepare_stores,
    seeds_text,
)
from sparknet.config import load_config
from sparknet.designs import design_points
from sparknet.errors import SparknetError, cli_main
from sparknet.objective import WIKITEXT_VALID, Objective
from sparknet.study import parse_budget, study_parser, study_settings

DEFAULT_OBJECTIVE = WIKITEXT_VALID
DEFAULT_PROXY = "20M"


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = study_parser("ablate", __doc__, running="point", noun="run", proxy_default=DEFAULT_PROXY,
                      study_default="<mixture>-<design>", keeps="design, seeds, budget, objective and recipe",
                      confirm_what="best.yaml")
    ap.add_argument("mixture", nargs="?", help="mixture YAML, e.g. mixtures/quickstart.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (e.g. model.preset=cpu-small)")
    ap.add_argument("--design", default=None,
                    help="leave-one-out, single-source, grid:STEP (e.g. grid:0.25), random:N (seeded uniform Dirichlet draws), "
                         "prior:N[:C] (draws around the base mixture, concentration C; RegMix's sampling) "
                         "or a YAML file: points: [{name: .., weights: {source: w, ..}}, ..]")
    ap.add_argument("--objective", default=DEFAULT_OBJECTIVE,
                    help="what to minimize: wikitext-valid (WikiText-2 validation bits per byte; the default), val "
                         "(mean held-out loss over the sources) or val/<source>")
    ap.add_argument("--seeds", type=int, default=1,
                    help="repeats per point, to tell noise from effect (default 1; 3 or more let effects be tested)")
    ap.add_argument("--seed-vary", choices=("init", "data", "both"), default="both",
                    help="what differs between a point's repeats: the model's initialization (train.seed +k), the "
                         "data order (mixture.seed +k), or both (the default: data order moves results as much as "
                         "initialization, so a spread of init seeds alone understates the noise)")
    ap.add_argument("--stage", type=int, default=None, help="staged mixtures: ablate the weights of stage I")
    ap.add_argument("--design-seed", type=int, default=0, help="random:N, prior:N: the seed of the draws (default 0)")
    ap.add_argument("--dry-run", action="store_true", help="print the points and their plans; train nothing")
    ap.add_argument("--transfer", default=None, metavar="STUDY",
                    help="retrain STUDY's best.yaml, best measured point, base mixture and --transfer-points spread "
                         "points at --budget (or with a larger model: key=value overrides), as the study "
                         "<STUDY>-transfer-<budget>, and write whether the ranking holds (Spearman, decision "
                         "accuracy) into STUDY's README and transfer.csv (sparknet.ablate_transfer)")
    ap.add_argument("--budget", default=None,
                    help="--transfer: tokens per run, as a multiple of the study's proxy budget (5x) or a count (100M)")
    ap.add_argument("--transfer-points", type=int, default=None, metavar="K",
                    help="--transfer: how many more points spread over the measured ranking (default: about 6-8 runs "
                         "in all)")
    ap.add_argument("--reuse", default=None, metavar="STUDY",
                    help="a new study over one more or one fewer source than STUDY (same storage) starts with STUDY's "
                         "finished runs that still apply (sparknet.ablate_reuse)")
    args = ap.parse_intermixed_args(argv)
    if args.transfer is not None or args.budget is not None or args.transfer_points is not None:
        return transfer_main(args, list(sys.argv[1:] if argv is None else argv))
    if not args.mixture:
        raise SparknetError("missing MIXTURE.yaml (fix: python -m sparknet.ablate mixtures/quickstart.yaml "
                            "--design leave-one-out)")
    if args.design is None:
        raise SparknetError("--design: required (fix: --design leave-one-out, single-source, grid:0.25, random:16 or "
                            "a YAML file of weight vectors)")
    if args.seeds < 1:
        raise SparknetError(f"--seeds: must be >= 1, got {args.seeds} (fix: --seeds 3 gives each point a spread that can test an effect)")
    if args.design_seed < 0:
        raise SparknetError(f"--design-seed: must be >= 0, got {args.design_seed} (fix: --design-seed 0)")
    budget = parse_budget(args, "20M")
    base = load_config(args.mixture, args.overrides)  # bad mixture/overrides fail here, before anything starts
    names = tuple(s.name for s in base.mixture.sources)
    points = design_points(args.design, names, base_weights(base, args.stage), seed=args.design_seed)
    try:
        objective = Objective.parse(args.objective, names)
    except SparknetError as exc:
        raise SparknetError(f"--objective: {exc}") from None
    seeds = [base.train.seed + k for k in range(args.seeds)]
    abl = Ablation(mixture=args.mixture, design=args.design, points=points, names=names, stage=args.stage,
                   seeds=seeds, seed_vary=args.seed_vary, data_seed=base.mixture.seed,
                   base_overrides=list(args.overrides), objective=objective, design_seed=args.design_seed,
                   storage_given=args.storage is not None,
                   **study_settings(args, budget, base, default_study_name(base, args.design, args.stage)))
    if args.reuse is not None:  # the other study, checked before anything starts
        abl = ReuseAblation.of(abl, check_reuse(abl, args.reuse))
    plans = abl.plans  # every point's config and plan, before anything starts
    if args.dry_run:
        print(dry_run_text(abl, plans))
        if args.reuse is not None:
            print(abl.reuse.summary(abl.planned()))
        return 0
    # Before any run trains: WikiText-2 validation must be readable if it is the objective.
    try:
        objective.check(abl.point_config(0, seeds[0]))
    except SparknetError as exc:
        default = " (the default)" if args.objective == DEFAULT_OBJECTIVE else ""
        raise SparknetError(f"--objective {objective.name}{default}: {exc} (or: --objective val, the mean held-out "
                            f"loss, needs no WikiText-2)") from None
    if args.reuse is not None:
        print(abl.reuse.summary(abl.planned()), flush=True)
    return abl.run(confirm=args.confirm)


if __name__ == "__main__":
    sys.exit(main())
