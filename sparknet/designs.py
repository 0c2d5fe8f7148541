"""Mixture designs: which weight vectors an ablation trains, each a list of labelled weight vectors on the simplex.

- `leave-one-out`: the base mixture, then each source removed and the others renormalized;
- `single-source`: each source alone;
- `grid:STEP`: every vector of the simplex lattice with that step (0.25 over 3 sources: 15 points), counted before
  it is built;
- `random:N`: N seeded Dirichlet(1) draws, uniform over the simplex;
- `prior:N` or `prior:N:C`: N seeded draws around the base mixture, as RegMix samples its small runs around the
  token distribution: Dirichlet(C * m * base) over the m sources the base uses (a source at weight 0 stays at 0). C is
  the concentration (default 1; C = 1 with a uniform base is `random:N`; larger C stays closer to the base);
- a YAML file: `points: [{name: ..., weights: {source: w, ...}}, ...]` (weights summing to 1).

Counts are checked before anything is built: at most MAX_POINTS points (a 10-source grid:0.1 is 92,378 points and is
refused in microseconds, by its binomial count). A weight below `min_share` (MIN_SHARE: 1%; a proxy run cannot
measure a source it barely sees) is dropped from a random draw (the rest renormalized), and rejected with a message
from a grid step or a design file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from sparknet.errors import SparknetError


@dataclass(frozen=True)
class Point:
    name: str
    weights: tuple[float, ...]  # per source, in the mixture's source order; sums to 1


def _normalized(w: np.ndarray) -> tuple[float, ...]:
    return tuple(float(x) for x in w / w.sum())


def _label(names: tuple[str, ...], w: tuple[float, ...]) -> str:
    return " ".join(f"{n}{round(x * 100)}" for n, x in zip(names, w) if x > 0)


MAX_POINTS = 10_000  # a design's points are training runs: more is a typo, not a study
MIN_SHARE = 0.01


def design_points(design: str, names: tuple[str, ...], base: tuple[float, ...], *, seed: int = 0,
                  where: str = "--design", min_share: float = MIN_SHARE) -> list[Point]:
    """The points of `design` over sources `names` with base weights `base`; SparknetError for a bad design."""
    n = len(names)
    b = np.asarray(base, dtype=np.float64)
    if n < 2:
        raise SparknetError(f"{where}: the mixture has one source; a mixture ablation needs at least two "
                            f"(fix: add sources to the mixture)")
    if design == "leave-one-out":
        pts = [Point("base", _normalized(b))]
        for i, name in enumerate(names):
            if b[i] <= 0:
                continue  # removing a source the base does not use changes nothing
            w = b.copy()
            w[i] = 0.0
            if w.sum() <= 0:
                raise SparknetError(f"{where}: leave-one-out: removing {name} leaves no source with weight "
                                    f"(fix: give at least two sources a weight)")
            pts.append(Point(f"without {name}", _normalized(w)))
        return pts
    if design == "single-source":
        return [Point(f"only {name}", tuple(float(i == j) for j in range(n))) for i, name in enumerate(names)]
    if design.startswith("grid:"):
        text = design.split(":", 1)[1]
        try:
            step = Fraction(text).limit_denominator(10_000)
        except (ValueError, ZeroDivisionError):
            raise SparknetError(f"{where}: {design!r}: the step is not a number (fix: e.g. grid:0.25)") from None
        if not 0 < step <= 1:
            raise SparknetError(f"{where}: {design!r}: the step must be in (0, 1], got {text} (fix: e.g. grid:0.25)")
        k = 1 / step
        if k.denominator != 1 or abs(float(step) - float(Fraction(text))) > 1e-9:
            raise SparknetError(f"{where}: {design!r}: the step {text} does not divide 1 (fix: a step such as 0.5, "
                                f"0.25, 0.2 or 0.1)")
        k = int(k)
        count = math.comb(k + n - 1, n - 1)
        if count > MAX_POINTS:
            raise SparknetError(f"{where}: {design!r}: {count:,} points over {n} sources (fix: a coarser step)")
        if float(step) < min_share - 1e-12:
            raise SparknetError(f"{where}: {design!r}: the step {text} puts weights below the minimum share "
                                f"{min_share:g} (fix: a step of at least {min_share:g}, e.g. grid:0.05)")
        pts = [Point(_label(names, w), w) for w in (tuple(c / k for c in combo) for combo in _compositions(k, n))]
        return sorted(pts, key=lambda p: tuple(-x for x in p.weights))
    if design.startswith(("random:", "prior:")):
        kind, _, rest = design.partition(":")
        text, _, conc = rest.partition(":")
        if not text.isdigit() or int(text) < 1 or (kind == "random" and conc):
            raise SparknetError(f"{where}: {design!r}: expected {kind}:N with N >= 1"
                                + (" and an optional concentration, prior:N:C" if kind == "prior" else "")
                                + f" (fix: e.g. {kind}:32)")
        if int(text) > MAX_POINTS:
            raise SparknetError(f"{where}: {design!r}: more than {MAX_POINTS:,} points, each a training run (fix: "
                                f"{kind}:32 to {kind}:256 is a night's study)")
        alpha = np.ones(n)
        if kind == "prior":
            try:
                c = float(conc) if conc else 1.0
            except ValueError:
                c = math.nan
            if not math.isfinite(c) or c <= 0:
                raise SparknetError(f"{where}: {design!r}: the concentration must be a number > 0, got {conc!r} "
                                    f"(fix: e.g. prior:32:4; larger stays closer to the base mixture)")
            used = b > 0
            alpha = np.where(used, c * used.sum() * b / b[used].sum(), 0.0)
        rng = np.random.default_rng([seed, 0x6D6978])  # "mix": the design's own stream
        draws = np.zeros((int(text), n))
        draws[:, alpha > 0] = rng.dirichlet(alpha[alpha > 0], size=int(text))
        pts = []
        for i, w in enumerate(draws):
            w = np.where(w < min_share, 0.0, w)  # a share too small to measure: dropped, the rest renormalized
            if w.sum() <= 0:
                w = draws[i] == draws[i].max()
            pts.append(Point(f"{kind} {i}", _normalized(np.asarray(w, dtype=float))))
        return pts
    path = Path(design)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return _points_from_file(path, names, min_share)
    raise SparknetError(f"{where}: unknown design {design!r} (fix: leave-one-out, single-source, grid:STEP, "
                        f"random:N, prior:N[:C], or a YAML file of weight vectors)")


def _compositions(total: int, parts: int):
    """Every way to write `total` as `parts` non-negative integers, in lexicographic order: only the grid's points
    are visited (a walk over every (total + 1) ** parts tuple takes minutes for 10 sources)."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _points_from_file(path: Path, names: tuple[str, ...], min_share: float = MIN_SHARE) -> list[Point]:
    from sparknet.config import read_yaml

    if not path.is_file():
        raise SparknetError(f"{path}: design file not found (fix: pass an existing YAML file)")
    raw = read_yaml(path)
    items = raw.get("points") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise SparknetError(f"{path}: points: expected a non-empty list of {{name, weights}} (fix: see "
                            f"experiments/README.md)")
    pts = []
    for i, item in enumerate(items):
        at = f"{path}: points[{i}]"
        weights = item.get("weights") if isinstance(item, dict) and "weights" in item else item
        if isinstance(item, dict) and "name" in item and "weights" not in item:
            weights = None  # {name: ...} alone: the short form {source: weight} has no `name`
        if not isinstance(weights, dict) or not weights:
            raise SparknetError(f"{at}: has no weights (fix: give it weights: {{source: weight, ...}} over "
                                f"{', '.join(names)})")
        for key, v in weights.items():
            if key not in names:
                raise SparknetError(f"{at}.weights.{key}: no source named {key!r} (fix: use one of "
                                    f"{', '.join(names)})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SparknetError(f"{at}.weights.{key}: must be a number >= 0, got {v!r} (fix: e.g. 0.25)")
        w = np.array([float(weights.get(n, 0.0)) for n in names])
        if abs(w.sum() - 1.0) > 1e-6:
            raise SparknetError(f"{at}.weights: sum to {w.sum():g}, not 1 (fix: make them sum to 1; sources not "
                                f"listed count as 0)")
        small = [n for n, x in zip(names, w / w.sum()) if 0 < x < min_share]
        if small:
            raise SparknetError(f"{at}.weights.{small[0]}: {float(w[names.index(small[0])]):g} is below the minimum "
                                f"share {min_share:g}, too little for a proxy run to measure (fix: 0 to leave it out, "
                                f"or at least {min_share:g})")
        name = str(item.get("name")) if isinstance(item, dict) and item.get("name") else _label(names, tuple(w))
        point = Point(name, _normalized(w))
        twin = next((j for j, p in enumerate(pts) if np.allclose(p.weights, point.weights, atol=1e-9)), None)
        if twin is not None:  # the same mixture twice would count as two points of the fit; seeds repeat a point
            raise SparknetError(f"{at}.weights: the same mixture as points[{twin}] (fix: list each mixture once; "
                                f"--seeds K repeats every point with K model seeds)")
        if any(p.name == name for p in pts):
            raise SparknetError(f"{at}.name: {name!r} is used twice (fix: give each point its own name)")
        pts.append(point)
    return pts
