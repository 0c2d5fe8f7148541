"""`--proxy-tokens auto` (ablate and sweep): the proxy budget measured instead of given, as the smallest at which
the base point gets past its bigram reference by the margin (the adequacy verdict's rule, `sparknet.adequacy`,
whose slices, references and margin it reads).

`probe`: the base point is trained once at a constant learning rate up to a cap, evaluated every cap / `PROBE_EVALS`
tokens, and stopped (the sweep's pruning mechanism: the evaluation hook raises) at the first evaluation where every
slice it reads is past its reference (of a run of that many tokens) by the margin; the crossing D is placed between
the last two evaluations (log-linear). A run of budget B does not spend its tokens at the peak learning rate, as the
probe did, but along its schedule (cosine to min_lr: ~0.55 of the peak on average): so the budget is the smallest B,
in whole optimizer steps, whose schedule's learning-rate area (the sum of its steps' rates) reaches the probe's area
at D (`area_budget`). Early in training, progress goes with that area (the "forward area" S1 of Tissue et al. 2024,
"Scaling law with learning rate annealing"); the decay at a run's end adds an annealing gain on top, so B errs on the
safe side. Measured on the tests' generated text: the probe crossed at ~33k tokens, runs with their own cosine
schedule between 49k and 64k, and B came out at ~60k.

What `probe` returns is stored with the study (`sparknet.study.resolve_auto_budget`) and told in its README by
`sparknet.adequacy.auto_text`; `dry_run_lines` says what a probe would do, for --dry-run.
"""

from __future__ import annotations

import math
import time
from typing import Any

from sparknet.adequacy import probe_reads, references_at
from sparknet.errors import SparknetError

PROBE_EVALS = 64  # evaluations over the cap (every cap / 64 tokens, at least one step)
PROBE_WARMUP_SHARE = 0.1  # the probe warms up as long as a run of a tenth of the cap does
DEFAULT_AUTO_CAP = "50M"


class BudgetFound(Exception):
    """Raised from the probe's evaluation hook to stop it (as a sweep's `TrialPruned` stops a trial): `execute` ends
    the run with the status it names."""

    run_status = "FINISHED"
    state_status = "stopped by --proxy-tokens auto"

    def __init__(self, tokens: int, why: str):
        super().__init__(why)
        self.tokens = tokens


def probe_every(cap: int, batch_tokens: int) -> int:
    """The probe's evaluation interval: cap / PROBE_EVALS in whole optimizer steps, at least one."""
    return max(1, cap // PROBE_EVALS // batch_tokens) * batch_tokens


def probe_config(base, cap: int, study_name: str):
    """The base point at the cap, at a constant learning rate after a short warmup (wsd without a decay: its loss at
    every evaluation is that of a run stopped there), evaluated every `probe_every` tokens, nothing scored but the
    held-out slices, in the study's MLflow experiment."""
    from sparknet.config import config_from_dict, to_dict

    d = to_dict(base)
    d["name"] = f"{study_name[:48]}-probe"
    d["mixture"]["total_tokens"] = int(cap)
    d["eval"].update(every_tokens=probe_every(cap, base.train.batch_tokens), wikitext=[], downstream=[])
    d["train"].update(schedule="wsd", decay_fraction=0.0,
                      warmup_fraction=float(base.train.warmup_fraction) * PROBE_WARMUP_SHARE)
    d["tracking"]["experiment"] = study_name
    return config_from_dict(d, f"--proxy-tokens auto (the probe of study {study_name})")


def _interpolate(prev: tuple[int, dict] | None, now: tuple[int, dict], margin: float) -> float:
    """Where past (ref - loss) reached the margin between two evaluations, log-linear in tokens, for the slice that
    reached it last."""
    t1, p1 = now
    if prev is None:
        return float(t1)
    t0, p0 = prev
    at = float(t0)
    for s, v1 in p1.items():
        v0 = p0.get(s, -math.inf)
        if v0 >= margin:
            continue
        f = 1.0 if not math.isfinite(v0) or v1 <= v0 else (margin - v0) / (v1 - v0)
        at = max(at, math.exp(math.log(t0) + min(max(f, 0.0), 1.0) * (math.log(t1) - math.log(t0))))
    return at


def _area(t, steps: int, upto: int | None = None) -> float:
    """The sum of the learning rates of the first `upto` (default all) of a run's `steps` optimizer steps."""
    from sparknet.train import lr_at

    return float(sum(lr_at(k, steps, t) for k in range(min(steps, upto if upto is not None else steps))))


def area_budget(run_train, probe_train, probe_steps: int, crossed_tokens: float) -> int:
    """The smallest budget (whole optimizer steps, in tokens) whose run, on its own schedule (`run_train`: the
    recipe's TrainConfig), sums as much learning rate as the probe (`probe_train`, `probe_steps` in all) did over its
    first `crossed_tokens`."""
    batch = run_train.batch_tokens
    d_steps = max(1, math.ceil(crossed_tokens / batch))
    whole = _area(probe_train, probe_steps, d_steps)
    frac = crossed_tokens / batch - (d_steps - 1)  # the part of the last step the crossing lies in
    target = _area(probe_train, probe_steps, d_steps - 1) + frac * (whole - _area(probe_train, probe_steps, d_steps - 1))
    lo, hi = d_steps, d_steps
    while _area(run_train, hi) < target:
        lo, hi = hi, hi * 2
    while lo < hi:  # the smallest whole number of steps whose schedule's area reaches the target
        mid = (lo + hi) // 2
        if _area(run_train, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi * batch


def probe(base, *, objective, cap: int, margin: float, study_name: str, time_cap_s: float | None = None,
          progress: bool = False) -> dict[str, Any]:
    """Train the base point once (`probe_config`) until every held-out slice the objective reads is past its bigram
    reference (of a run of that many tokens) by `margin`, or the cap (tokens, or `time_cap_s` of training); returns
    what `--proxy-tokens auto` stores with the study: the chosen budget (whole optimizer steps) and how it was found."""
    from sparknet.locks import RunBusy, prepare_lock
    from sparknet.prepare import check_budget, prepare
    from sparknet.run import execute

    cfg = probe_config(base, cap, study_name)
    batch = cfg.train.batch_tokens
    sources = probe_reads(objective)
    try:
        with prepare_lock(cfg.lab_path):
            prepared = prepare(cfg, progress=progress, write_report=False)
        check_budget(prepared)
    except SparknetError as exc:
        raise SparknetError(f"--proxy-tokens auto (probing up to --auto-cap {cap:,}): {exc}") from None
    curve: list[dict] = []
    state: dict[str, Any] = {"prev": None}
    started = time.time()

    def on_eval(tokens: int, val: dict[str, float]) -> None:
        refs = references_at(cfg, prepared, tokens, sources)
        past = {s: refs[s] - val[s] for s in sources if s in val and s in refs}
        curve.append({"tokens": int(tokens), "loss": {s: float(val[s]) for s in sources if s in val},
                      "ref": {s: float(refs[s]) for s in sources if s in refs}})
        worst = min(past.values()) if past else -math.inf
        print(f"  probe at {tokens:,} tokens: past bigram by " + ", ".join(f"{s} {v:+.3f}" for s, v in past.items())
              + f" (margin {margin:g})", flush=True)
        if past and len(past) == len(sources) and worst >= margin:
            state["at"] = _interpolate(state["prev"], (tokens, past), margin)
            raise BudgetFound(tokens, f"past its bigram reference by {worst:.3f} >= {margin:g} at {tokens:,} tokens")
        state["prev"] = (tokens, past)
        if time_cap_s is not None and time.time() - started >= time_cap_s and tokens < cap:
            raise BudgetFound(tokens, f"the time cap of {time_cap_s:.0f} s passed at {tokens:,} tokens")

    print(f"--proxy-tokens auto: training the base point up to {cap:,} tokens at a constant learning rate, evaluating "
          f"every {cfg.eval.every_tokens:,} tokens, until {', '.join(f'val/{s}' for s in sources)} "
          f"{'is' if len(sources) == 1 else 'are'} past the bigram reference by {margin:g} nats/token"
          + (f" (or {time_cap_s:.0f} s)" if time_cap_s else ""), flush=True)
    crossed, stopped = False, cap
    try:
        execute(cfg, fresh=True, progress=progress, on_eval=on_eval,
                extra_tags={"sparknet.study": study_name, "sparknet.kind": "probe"})
    except BudgetFound as found:
        stopped = found.tokens
        crossed = "at" in state
    except RunBusy as exc:
        raise SparknetError(f"--proxy-tokens auto: another process is probing this study's budget ({exc}) (fix: rerun "
                            f"when it has stored the budget, or give --proxy-tokens N)") from None
    seconds = time.time() - started
    at = float(state.get("at", stopped))
    if crossed:  # the run of that budget, on its own schedule, sums the learning rate the probe had at the crossing
        chosen = area_budget(base.train, cfg.train, -(-cap // batch), at)
    else:
        chosen = max(batch, -(-int(math.ceil(at)) // batch) * batch)
    info = {"cap": int(cap), "time_cap_s": time_cap_s, "margin": margin, "reads": sources, "chosen": int(chosen),
            "crossed": crossed, "crossed_at": int(round(at)), "stopped_at": int(stopped),
            "every": int(cfg.eval.every_tokens), "seconds": round(seconds, 1), "curve": curve}
    if crossed:
        print(f"--proxy-tokens auto: {chosen:,} tokens for every run (the base point got past its bigram reference by "
              f"{margin:g} at about {int(at):,} tokens of the probe's constant learning rate; a run of {chosen:,} "
              f"tokens sums as much learning rate on its own schedule (whole steps of {batch:,}); the probe stopped "
              f"at {stopped:,} tokens after {seconds:.0f} s)", flush=True)
    else:
        why = "the time cap" if stopped < cap else f"the cap of {cap:,} tokens"
        print(f"--proxy-tokens auto: the base point did not get past its bigram reference by {margin:g} before {why}: "
              f"using {chosen:,} tokens; the study will say it is not adequate (raise --auto-cap or use a larger "
              f"model)", flush=True)
    return info


def dry_run_lines(base, *, objective, cap: int, margin: float, study_name: str, time_cap_s: float | None) -> list[str]:
    """What `--proxy-tokens auto` would do, without training: the probe and its time at this machine's estimated
    speed (`sparknet.device`, as `sparknet.run --dry-run` estimates it), up to the cap."""
    from sparknet.device import config_shape, describe_device, device_report

    cfg = probe_config(base, cap, study_name)
    eta = [line for line in device_report(cfg, config_shape(cfg), 1, describe_device(cfg, 1))
           if line.startswith("eta")]
    sources = probe_reads(objective)
    return [f"--proxy-tokens auto: would train the base point once at a constant learning rate, evaluating every "
            f"{cfg.eval.every_tokens:,} tokens, until {', '.join(f'val/{s}' for s in sources)} "
            f"{'is' if len(sources) == 1 else 'are'} past the bigram reference by {margin:g} nats/token, or at the cap "
            f"of {cap:,} tokens" + (f" or {time_cap_s:.0f} s" if time_cap_s else "")
            + "; then every run trains at that budget (whole optimizer steps)",
            f"  at most (the cap): {eta[0] if eta else 'no estimate for this device'}"
            + " (less when it crosses earlier; plus its evaluations)",
            "  until it has run, the budget shown is the cap, the most auto can choose"]
