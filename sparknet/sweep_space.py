"""The search space of a sweep (`sparknet.sweep`): the space file read and checked whole before any trial runs, and a
trial's parameters turned into config keys.

    space = load_space("experiments/default_space.yaml", mixture, overrides)   # every error: file, key, fix
    params = suggest(trial, space)                                            # the trial draws its values
    cfg = config_for(mixture, overrides, params, extra)                       # the trial's run config

A dimension is `{low, high, log, type}` or `{choices: [..]}`; every bound and every choice goes through the
config's own checks, and the mixture's own values (trial 0, the baseline) must lie inside what is searched. The
pseudo-key `train.min_lr_ratio` searches min_lr / lr; a searched `train.lr` keeps the recipe's ratio.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparknet.config import ConfigError, RunConfig, load_config, read_yaml, to_dict
from sparknet.errors import SparknetError

_SPACE_KEYS = {"objective", "eval_points", "params", "sampler", "pruner"}
_DIM_FIELDS = ("low", "high", "log", "type", "choices")
MIN_LR_RATIO = "train.min_lr_ratio"  # a pseudo-key of the space: min_lr = ratio x lr; never written as a config key


# ---------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Dim:
    key: str  # a config key (train.lr, mixture.sources.dclm.weight) or train.min_lr_ratio
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()

    def spec(self) -> dict[str, Any]:
        """The dimension as the space file says it (what a study stores and compares)."""
        if self.choices:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "type": "int" if self.integer else "float"}


@dataclass(frozen=True)
class Space:
    path: str
    dims: tuple[Dim, ...]
    objective: str = "val"  # the space file's default; --objective wins
    eval_points: int = 5
    sampler: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What makes two spaces the same question: the dimensions and the pruning points."""
        return {"params": {d.key: d.spec() for d in self.dims}, "eval_points": self.eval_points}


def _field_type(key: str) -> Any:
    """The Python type of config key `key` (int, float, bool, str, a Literal), or None when it names no field
    (the config's own check then says so). List items are addressed by name: mixture.sources.<name>.weight."""
    if key == MIN_LR_RATIO:
        return float
    cls: Any = RunConfig
    parts = key.split(".")
    i = 0
    while i < len(parts):
        hints = typing.get_type_hints(cls)
        if parts[i] not in hints:
            return None
        tp = hints[parts[i]]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            if not hasattr(inner, "__dataclass_fields__"):
                return None
            cls, i = inner, i + 2  # skip the item's name
            continue
        if hasattr(tp, "__dataclass_fields__"):
            cls, i = tp, i + 1
            continue
        return tp if i == len(parts) - 1 else None
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same_value(a: Any, b: Any) -> bool:
    """Equal as config values: 16 == 16.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def load_space(path: str | Path, mixture: str | Path, base_overrides: list[str]) -> Space:
    """Read and check a space file; every error names the file and the key, before any trial runs."""
    from sparknet.run import config_hash

    where = str(path)

    def fail(key: str, reason: str, fix: str) -> typing.NoReturn:
        raise SparknetError(f"{where}: {key}: {reason} (fix: {fix})")

    if not Path(path).is_file():
        raise SparknetError(f"{where}: no such space file (fix: pass --space experiments/default_space.yaml "
                            f"or write one like it)")
    raw = read_yaml(Path(path))  # a ConfigError naming the file and line for bad YAML or a key given twice
    if not isinstance(raw, dict):
        fail("<top level>", "must be a mapping", "see experiments/default_space.yaml")
    for key in raw:
        if key not in _SPACE_KEYS:
            fail(str(key), "unknown key", f"use one of {', '.join(sorted(_SPACE_KEYS))}")
    objective = raw.get("objective", "val")
    if not isinstance(objective, str):
        fail("objective", f"must be a name, got {objective!r}", "use val, val/<source> or wikitext-valid")
    eval_points = raw.get("eval_points", 5)
    if not isinstance(eval_points, int) or isinstance(eval_points, bool) or not 1 <= eval_points <= 100:
        fail("eval_points", f"must be an integer in [1, 100], got {eval_points!r}", "use e.g. 5")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        fail("params", "must map config keys to ranges", "e.g. train.lr: {low: 1e-4, high: 3e-3, log: true}")
    base = config_for(mixture, base_overrides, {})
    base_values = _values_of(base, [str(k) for k in params])
    dims = []
    for key, spec in params.items():
        key = str(key)
        at = f"params.{key}"
        if not isinstance(spec, dict):
            fail(at, "must be a mapping", "use {low: .., high: ..} or {choices: [..]}")
        unknown = [k for k in spec if k not in _DIM_FIELDS]
        if unknown:
            fail(at, f"unknown field {unknown[0]!r}", f"use {', '.join(_DIM_FIELDS)} (a grid: choices: [..])")
        if key == "mixture.total_tokens":
            fail(at, "is the proxy budget of every trial", "use --proxy-tokens, or search something else")
        if key == "train.min_lr" and "train.lr" in params:
            fail(at, "searched together with train.lr, trials would break min_lr <= lr",
                 f"search {MIN_LR_RATIO} (min_lr = ratio x lr) instead")
        ftype = _field_type(key)
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) != {"choices"}:
                fail(at, f"choices cannot be combined with {sorted(set(spec) - {'choices'})[0]}",
                     "give either choices or low/high")
            if not isinstance(choices, list) or len(choices) < 2:
                fail(at, "choices must be a list of at least two values", "e.g. choices: [98304, 122880, 245760]")
            for c in choices:
                if not isinstance(c, (str, bool, int, float)) or (isinstance(c, float) and not math.isfinite(c)):
                    fail(at, f"choice {c!r} is not a number, string or boolean", "list plain values")
            if len({json.dumps(c) for c in choices}) < len(choices):
                fail(at, "a choice is listed twice", "list each value once")
            dim = Dim(key, choices=tuple(choices))
            probes = list(choices)  # every value, not only the first: any of them may be drawn
        else:
            low, high = spec.get("low"), spec.get("high")
            if not (_is_number(low) and _is_number(high)):
                fail(at, f"needs numeric low and high, got low={low!r} high={high!r}", "e.g. {low: 1e-4, high: 3e-3}")
            if low >= high:
                fail(at, f"low {low:g} must be below high {high:g}", "swap or widen the range")
            log = spec.get("log", False)
            if not isinstance(log, bool):  # YAML's "false" (quoted) is a string, and bool("false") is True
                fail(at, f"log must be true or false, got {log!r}", "write log: true or log: false, unquoted")
            if log and low <= 0:
                fail(at, f"a log range needs low > 0, got {low:g}", "use a positive low, e.g. 1e-5")
            kind = spec.get("type", "float")
            if kind not in ("int", "float"):
                fail(at, f"type {kind!r} is not int or float", "use type: int or type: float")
            integer = kind == "int"
            if integer and not (float(low).is_integer() and float(high).is_integer()):
                fail(at, f"type int needs whole-number bounds, got low={low!r} high={high!r}",
                     "use whole numbers, or type: float")
            if ftype is int and not integer:
                fail(at, "is a whole number in the config, but this range would draw fractions",
                     "add type: int, or use choices")
            if ftype is not None and ftype not in (int, float):
                fail(at, f"is not a number in the config ({getattr(ftype, '__name__', ftype)})", "use choices: [..]")
            if integer:
                low, high = int(low), int(high)
            dim = Dim(key, float(low) if not integer else low, float(high) if not integer else high, log, integer)
            probes = [low, high]
        # Each value must be one the config accepts: reuse the config's own checks and messages.
        hashes = set()
        for value in probes:
            try:
                cfg = config_for(mixture, base_overrides, {key: value})
            except ConfigError as exc:
                fail(at, f"value {value!r} is rejected by the config: {exc}", "change the range")
            hashes.add(config_hash(cfg))
        if key != MIN_LR_RATIO and len(hashes) < 2:
            # Left out of the run's identity: where the run lives, how the batch is split, what is logged.
            fail(at, "does not change what is trained (it is operational, not part of the recipe)",
                 "search a recipe key, e.g. train.batch_tokens for the global batch")
        # Trial 0 is the mixture's own config: its values must be ones the study can hold.
        v = base_values[key]
        if dim.choices and not any(_same_value(v, c) for c in dim.choices):
            fail(at, f"the mixture's own value {v!r} (trial 0, the baseline) is not among the choices "
                 f"{list(dim.choices)}", f"add {v!r} to the choices")
        if not dim.choices and not (_is_number(v) and dim.low <= v <= dim.high):
            fail(at, f"the mixture's own value {v!r} (trial 0, the baseline) is outside [{dim.low:g}, {dim.high:g}]",
                 "widen the range to include it, or change the mixture")
        if dim.integer and not float(v).is_integer():
            fail(at, f"the mixture's own value {v!r} (trial 0, the baseline) is not a whole number", "use type: float")
        dims.append(dim)
    sampler, pruner = raw.get("sampler", {}) or {}, raw.get("pruner", {}) or {}
    for name, section, allowed in (("sampler", sampler, {"seed", "n_startup_trials"}),
                                   ("pruner", pruner, {"n_startup_trials", "n_warmup_steps"})):
        if not isinstance(section, dict) or set(section) - allowed:
            fail(name, f"allowed fields are {', '.join(sorted(allowed))}", "see experiments/default_space.yaml")
        for k, v in section.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(f"{name}.{k}", f"must be a non-negative integer, got {v!r}", "use e.g. 3")
    return Space(str(path), tuple(dims), objective, eval_points, dict(sampler), dict(pruner))


def trial_overrides(mixture: str | Path, base_overrides: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """The config keys a trial sets on top of the mixture and the user's overrides: its params, with the
    pseudo-key train.min_lr_ratio turned into train.min_lr, and train.min_lr following a searched train.lr (the
    recipe's final/peak ratio is kept: CodeLion 5e-5 / 5e-4 = 0.1)."""
    out = {k: v for k, v in params.items() if k != MIN_LR_RATIO}
    ratio = params.get(MIN_LR_RATIO)
    if ratio is None and "train.lr" not in params:
        return out
    base = load_config(mixture, list(base_overrides)).train
    lr = float(params.get("train.lr", base.lr))
    if ratio is None:
        if "train.min_lr" in params or lr == base.lr:  # the recipe's own min_lr stands as it is (no rounding)
            return out
        ratio = base.min_lr / base.lr
    out["train.min_lr"] = float(ratio) * lr
    return out


def overrides_args(mapping: dict[str, Any]) -> list[str]:
    """`key=value` arguments that set each key of `mapping` (as `sparknet.run MIXTURE key=value ...` reads them)."""
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """The user's `key=value` overrides as a mapping, values read as the config reads them (YAML scalars)."""
    out: dict[str, Any] = {}
    for text in overrides:
        key, _, value = text.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def config_for(mixture: str | Path, base_overrides: list[str], params: dict[str, Any],
                extra: list[str] = ()) -> RunConfig:
    """The run config of a trial: mixture + user overrides + the sweep's settings + the trial's params."""
    return load_config(mixture, [*base_overrides, *extra,
                                 *overrides_args(trial_overrides(mixture, base_overrides, params))])


_SHAPE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.n_positions")  # ModelConfig.shape()'s order


def _values_of(cfg: RunConfig, keys: list[str]) -> dict[str, Any]:
    d = to_dict(cfg)
    out = {}
    for key in keys:
        if key == MIN_LR_RATIO:
            out[key] = cfg.train.min_lr / cfg.train.lr
            continue
        node: Any = d
        for part in key.split("."):
            if isinstance(node, list):
                node = next((x for x in node if isinstance(x, dict) and x.get("name") == part), None)
            elif isinstance(node, dict):
                node = node.get(part)
            else:
                node = None
        if node is None and key in _SHAPE_KEYS:  # unset: the preset's value is what the mixture trains
            node = cfg.model.shape()[_SHAPE_KEYS.index(key)]
        out[key] = node
    return out


def baseline_params(cfg: RunConfig, space: Space) -> dict[str, Any]:
    """The mixture's own values of the searched keys: the first trial."""
    return _values_of(cfg, [d.key for d in space.dims])


def suggest(trial, space: Space) -> dict[str, Any]:
    out = {}
    for d in space.dims:
        if d.choices:
            out[d.key] = trial.suggest_categorical(d.key, list(d.choices))
        elif d.integer:
            out[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), log=d.log)
        else:
            out[d.key] = trial.suggest_float(d.key, d.low, d.high, log=d.log)
    return out


def pretty(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

