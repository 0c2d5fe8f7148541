"""Reading a config: YAML (strict: duplicate keys refused) + `key.sub=value` overrides -> dict -> the typed,
validated tree of `sparknet.config.schema`; back to plain dicts; the per-field docs; the shared command line.

    cfg = load_config("mixtures/codelion_502030.yaml", ["train.lr=3e-4", "mixture.total_tokens=50M"])

Relative paths inside a YAML file (local sources, blog folders) are resolved against the folder that
holds the YAML file, so a spec means the same thing whatever the working directory.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sparknet.config.schema import ConfigError, RunConfig, _At
from sparknet.errors import SparknetError

_TOKEN_SUFFIX = {"k": 10**3, "K": 10**3, "M": 10**6, "m": 10**6, "B": 10**9, "b": 10**9, "G": 10**9}


def parse_tokens(value: Any) -> int:
    """'1B' -> 1_000_000_000, '50M', '250k', '1_000', 1e9 -> int; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a token count")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"{value} is not a whole number of tokens")
    if isinstance(value, str):
        s = value.strip().replace("_", "").replace(",", "")
        mult = 1
        if s and s[-1] in _TOKEN_SUFFIX:
            mult, s = _TOKEN_SUFFIX[s[-1]], s[:-1]
        # Decimal, not float: 2.01 * 1000 is 2009.9999999999998 in binary floating point.
        try:
            x = decimal.Decimal(s) * mult
        except decimal.DecimalException:  # not a number, or an exponent past the context
            raise ValueError(f"{value!r} is not a token count such as 50M") from None
        if not x.is_finite() or x != x.to_integral_value():
            raise ValueError(f"{value!r} is not a whole number of tokens")
        if abs(x) >= 10**18:  # also keeps int() off exponents such as 1e999999999
            raise ValueError(f"{value!r} is far too many tokens")
        return int(x)
    raise ValueError(f"expected a token count such as 50M, got {type(value).__name__}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `int | 'auto'`, `float | None`
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, at: _At, key: str, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # `int | Literal["auto"]`: a listed word is taken as it is, anything else must be the number.
        words = [w for a in inner if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if words and isinstance(value, str) and value.strip() in words:
            return value.strip()
        if words and isinstance(value, str) and not re.fullmatch(r"[+-]?\d[\d_]*", value.strip()):
            at.fail(key, f"must be a whole number or {' / '.join(map(repr, words))}, got {value!r}",
                    f"write an integer such as 8, or {words[0]}")
        return _coerce(inner[0], value, at, key, meta)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (train.compile=off) as a boolean
        if value not in args:
            at.fail(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}", "use one of those")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            at.fail(key, f"must be a mapping, got {type(value).__name__}", "write `key: value` lines indented under it")
        return _build(tp, value, at.child(key))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            at.fail(key, f"must be a list, got {type(value).__name__}", "write a YAML list, one `- item` per line")
        return tuple(_coerce(args[0], v, at, f"{key}[{i}]", meta) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            at.fail(key, f"must be a mapping, got {type(value).__name__}", "write `key: value` lines indented under it")
        return {str(k): _coerce(args[1], v, at, f"{key}.{k}", meta) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        at.fail(key, f"must be true or false, got {value!r}", "write true or false")
    if tp is int:
        try:
            if meta.get("tokens"):
                return parse_tokens(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and re.fullmatch(r"[+-]?\d[\d_]*", value.strip()):
                return int(value.replace("_", ""))
        except ValueError as exc:
            at.fail(key, str(exc), "use a whole number such as 50M or 1_000_000")
        at.fail(key, f"must be a whole number, got {value!r}", "write an integer such as 8")
    if tp is float:
        x = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            x = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                x = float(value)
            except ValueError:
                pass
        if x is None:
            at.fail(key, f"must be a number, got {value!r}", "write a number such as 3e-4")
        # No field means anything by nan or inf; nan would slip past every `<` check in validate.
        if not math.isfinite(x):
            at.fail(key, f"must be a finite number, got {value!r}", "use an ordinary number")
        return x
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        at.fail(key, f"must be a string, got {value!r}", "quote it: \"...\"")
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not user error


# Keys that existed once and now mean something else: say what replaced them, not just "unknown key".
_REPLACED = {
    ("TrainConfig", "grad_accum_steps"): (
        "is derived now, so the recipe does not change with the number of GPUs",
        "set train.batch_tokens, the tokens per optimizer step of all processes together (the old recipe's "
        "micro_batch_size x grad_accum_steps x seq_len x processes); accumulation follows from it"),
}


def _build(cls: type, data: dict, at: _At) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if (cls.__name__, key) in _REPLACED:
            at.fail(str(key), *_REPLACED[(cls.__name__, key)])
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            at.fail(str(key), "unknown key",
                    f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}")
    kwargs = {}
    for name, fld in known.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], at, name, dict(fld.metadata))
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(at)
    return obj


def _resolve_paths(raw: dict, base: Path) -> None:
    mixture = raw.get("mixture")
    sources = mixture.get("sources") if isinstance(mixture, dict) else None
    # A wrong shape (`mixture: [..]`, `mixture.sources=3`) is left for `_build` to report.
    for src in sources if isinstance(sources, list) else []:
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            kind = src.get("kind", "hf")
            p = os.path.expandvars(os.path.expanduser(src["path"]))
            looks_local = kind in ("local", "blog") or p.startswith((".", "/", "~"))
            if looks_local and not os.path.isabs(p):
                p = str((base / p).resolve())
            src["path"] = p


def _apply_override(raw: dict, text: str, origins: dict[str, str]) -> None:
    label = f"override {text!r}"
    if "=" not in text:
        raise ConfigError(label, "", "expected key.sub=value (fix: e.g. train.lr=3e-4)")
    key, _, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(label, key, "malformed key (fix: write it as key.sub=value, e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node: Any = raw
    path_so_far: list[str] = []
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            # Address list items by index or by their `name` (mixture.sources.dclm.weight=0.4).
            idx = next((j for j, it in enumerate(node) if isinstance(it, dict) and it.get("name") == part),
                       None)
            if idx is None and part.isdigit() and int(part) < len(node):
                idx = int(part)
            if idx is None:
                names = [it.get("name") for it in node if isinstance(it, dict)]
                raise ConfigError(label, ".".join(parts[: i + 1]),
                                  f"no list item named {part!r} (fix: use one of {', '.join(map(str, names))})")
            node = node[idx]
            path_so_far.append(f"[{idx}]")
        else:
            if not isinstance(node, dict):
                raise ConfigError(label, ".".join(parts[: i + 1]), "is not a section (fix: set it as a whole, "
                                  "or check the key with --help-config)")
            node = node.setdefault(part, {})
            path_so_far.append(part)
    if not isinstance(node, dict):
        raise ConfigError(label, key, "cannot set a field on a non-section (fix: check the key with --help-config)")
    node[parts[-1]] = value
    canonical = ".".join(path_so_far + [parts[-1]]).replace(".[", "[")
    origins[canonical] = label


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first set on line {first_line}; YAML would "
                         f"silently keep only the last one)")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # an unhashable key: let SafeLoader report it as it always did
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(str(key), line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str = "") -> Any:
    """A YAML file as plain data; a ConfigError naming the file and line for unreadable text, invalid YAML or
    a key given twice."""
    file = str(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise ConfigError(file, what, "is not UTF-8 text (fix: save it as UTF-8)") from None
    except _DuplicateKey as exc:
        raise ConfigError(file, what, f"{exc} (fix: keep one of them)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(file, what, f"{line}invalid YAML ({getattr(exc, 'problem', exc)}) (fix: correct that "
                          f"line; mixtures/quickstart.yaml shows the shape)") from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a mixture YAML, apply `key.sub=value` overrides, and return the validated tree."""
    file = str(path)
    p = Path(path)
    if p.is_dir():
        raise ConfigError(file, "", "is a folder, not a mixture file (fix: pass one of its YAML files, such as "
                          "mixtures/quickstart.yaml)")
    if not p.is_file():
        raise ConfigError(file, "", "file not found (fix: pass a path such as mixtures/quickstart.yaml)")
    raw = read_yaml(p)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(file, "", f"must be a mapping of sections, got {type(raw).__name__} (fix: top-level keys "
                          f"such as mixture:, train:, model:; see mixtures/quickstart.yaml)")
    raw.setdefault("name", p.stem)
    origins: dict[str, str] = {}
    for text in overrides:
        _apply_override(raw, text, origins)
    if "mixture" not in raw:  # the defaults hold no sources: nothing to train on
        what = "is empty" if set(raw) <= {"name"} else "has no `mixture:` section"
        raise ConfigError(file, "mixture", f"the spec {what} (fix: add a `mixture:` section with `sources:`, each "
                          f"with a name, kind and weight; see mixtures/quickstart.yaml)")
    _resolve_paths(raw, p.resolve().parent)
    return _build(RunConfig, raw, _At(file, "", origins))


def config_from_dict(raw: dict, where: str = "<dict>") -> RunConfig:
    """Build a config from a plain dict (tests, sweeps); paths are taken as given."""
    raw = dict(raw)
    raw.setdefault("name", "run")
    return _build(RunConfig, raw, _At(where, "", {}))


def to_dict(cfg: Any) -> Any:
    """The tree as plain dicts/lists (for YAML dumps, manifests and MLflow params)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def field_docs(cls: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """Flattened `key -> doc` of every field, for `--help-config` and the README."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
        if dataclasses.is_dataclass(inner):
            out.update(field_docs(inner, key + ("[]." if inner is not tp else ".")))
        else:
            out[key] = f"{f.metadata.get('doc', '')} [{_type_name(tp)}]"
    return out


def config_help() -> str:
    """Every config key with its doc, one per line: what `--help-config` prints."""
    return "\n".join(f"{key:<36} {doc}" for key, doc in field_docs().items())


def mixture_cli(prog: str, description: str, override_example: str):
    """The argument parser every `python -m sparknet.X MIXTURE.yaml [key=value ...]` command starts from:
    the mixture, the overrides and --help-config. The command adds its own flags, then calls
    `config_from_cli`."""
    from sparknet.errors import ArgumentParser

    ap = ArgumentParser(prog=prog, description=description)
    ap.add_argument("mixture", nargs="?", help="mixture YAML, e.g. mixtures/quickstart.yaml")
    ap.add_argument("overrides", nargs="*", help=f"key.sub=value overrides, e.g. {override_example}")
    ap.add_argument("--help-config", action="store_true", help="list every config key with its doc")
    return ap


def config_from_cli(ap, argv: list[str] | None):
    """(args, config) from a `mixture_cli` parser; config is None when --help-config printed the keys."""
    # Overrides may come anywhere, also after flags (`run X.yaml --quiet train.lr=3e-4`): argparse's plain
    # parse stops collecting positionals at the first flag, the intermixed parse does not.
    args = ap.parse_intermixed_args(argv)
    if args.help_config:
        print(config_help())
        return args, None
    if not args.mixture:
        raise SparknetError(f"missing MIXTURE.yaml (fix: {ap.prog} mixtures/quickstart.yaml)")
    return args, load_config(args.mixture, args.overrides)
