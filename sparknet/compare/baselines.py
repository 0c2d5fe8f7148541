"""Measured baselines: Hugging Face models (a hub id, `ID@REVISION`, or a local folder) scored on WikiText-2 by the
code the runs use, and their cache, `<lab>/baselines/<key>.json`: the key holds the model, the commit its revision
resolved to (never a moving name like "main"), the dtype, the protocol and the WikiText text's sha256, so GPT-2 is
evaluated once per protocol, ever. An unreachable baseline (offline hub, unknown id) stays a gap."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparknet.atomic import write_json
from sparknet.compare import scoring
from sparknet.compare.table import KIND_BASELINE, MEASURED, Row, metrics_of, protocol_split
from sparknet.errors import SparknetError
from sparknet.evaluate import EVAL_DTYPE, WIKITEXT_ENV, WIKITEXT_SHA256
from sparknet.hub import hub_offline, hub_unreachable, offline

DEFAULT_BASELINES = ("openai-community/gpt2", "codelion/gpt-2-70m")
CACHE_VERSION = 2  # bump when a change in evaluate.py changes the numbers: old entries are then ignored


def missing_folder(model: str) -> bool:
    """`model` is meant as a local folder (a path; a hub id is "owner/name") and there is none."""
    return not Path(model).expanduser().exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1)


def split_baseline(spec: str) -> tuple[str, str]:
    """"ID", "ID@REVISION" or a local path -> (model, revision)."""
    if Path(spec).expanduser().exists() or "@" not in spec:
        return spec, "main"
    model, revision = spec.rsplit("@", 1)
    return model, revision or "main"


def folder_sha256(path: Path) -> str:
    """Content hash of a local model folder (its top-level files), so an edited or retrained folder at the same
    path gets new cache entries and a moved one keeps its old ones."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def baseline_identity(model: str) -> str:
    """What names a baseline in the cache: the hub id, or `local-sha256:<content>` for a folder."""
    path = Path(model).expanduser()
    return f"local-sha256:{folder_sha256(path)}" if path.is_dir() else model


def cache_key(identity: str, commit: str, dtype: str, protocol: str, data_sha256: str) -> str:
    """The cache file's name: everything that changes the number. `commit` is the hub commit the revision resolved
    to ("" for a local folder, whose identity is its content), never a branch name: "main" moves."""
    blob = json.dumps([CACHE_VERSION, identity, commit, dtype, protocol, data_sha256])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_RESULT_KEYS = ("protocol", "loss_nats", "perplexity")


def read_cache_entry(path: Path) -> dict:
    """One cache file, checked: a damaged one is a one-line error naming it (written atomically, a file is never
    half-written by compare, so damage came from elsewhere; it is not deleted for the user)."""
    fix = f"(fix: delete it, rm {path}, and score that baseline again with --evaluate)"
    try:
        entry = json.loads(path.read_text())
    except OSError as exc:
        raise SparknetError(f"{path}: cannot read this baseline cache entry ({exc.strerror or exc}) {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SparknetError(f"{path}: not a JSON baseline cache entry {fix}") from None
    result = entry.get("result") if isinstance(entry, dict) else None
    if not isinstance(result, dict) or any(not isinstance(result.get(k), (str, int, float)) for k in _RESULT_KEYS):
        raise SparknetError(f"{path}: a baseline cache entry without its result {fix}")
    return entry


def hf_cache_commit(model: str, revision: str) -> str:
    """The commit `revision` pointed at when the model was last downloaded into the local HF cache ("" if never):
    what a load with HF_HUB_OFFLINE=1 would read."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model, repo_type="model") / "refs" / revision
        sha = ref.read_text().strip() if ref.is_file() else ""
    except (ImportError, OSError, ValueError):
        return ""
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else ""


def resolve_commit(model: str, revision: str, hub_down: str) -> tuple[str, str]:
    """(commit, where it came from) for a hub model's revision: the revision itself when it is a commit sha, else
    the hub's answer (one call, when it is reachable), else the local HF cache's ref; ("", why not) otherwise."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision, "pinned"
    if not hub_down and not hub_offline():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(model, revision=revision, timeout=10).sha or ""
            if sha:
                return sha, "hub"
        except Exception:  # an unknown id or revision: the load says why, if it is asked for
            pass
    sha = hf_cache_commit(model, revision)
    if sha:
        return sha, "HF cache"
    why = hub_down or ("HF_HUB_OFFLINE is set" if hub_offline() else "the hub did not say")
    return "", f"{revision} could not be resolved to a commit ({why}) and is not in the local HF cache"


class BaselineCache:
    """`<lab>/baselines/<key>.json`, one file per (model, commit, dtype, protocol, text)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, identity: str, commit: str, protocol: str, data_sha256: str) -> Path:
        return self.folder / f"{cache_key(identity, commit, EVAL_DTYPE, protocol, data_sha256)}.json"

    def get(self, identity: str, commit: str, protocol: str, data_sha256: str) -> dict | None:
        path = self.path(identity, commit, protocol, data_sha256)
        return read_cache_entry(path) if path.is_file() else None

    def latest(self, identity: str, revision: str, protocol: str, data_sha256: str) -> dict | None:
        """The newest entry scored for `revision` (by name), for when the name cannot be resolved to a commit now
        (offline, and not in the HF cache): what it meant then, said so in the note."""
        found = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            entry = read_cache_entry(path)
            if (entry.get("identity"), entry.get("revision"), entry.get("dtype"), entry.get("protocol"),
                    entry.get("data_sha256"), entry.get("version")) == (identity, revision, EVAL_DTYPE, protocol,
                                                                         data_sha256, CACHE_VERSION):
                found.append(entry)
        return max(found, key=lambda e: float(e.get("created_ts", 0))) if found else None

    def put(self, entry: dict) -> Path:
        path = self.path(entry["identity"], entry["commit"], entry["protocol"], entry["data_sha256"])
        write_json(path, entry | {"version": CACHE_VERSION, "dtype": EVAL_DTYPE})
        return path


class WikitextShas:
    """sha256 of each split's rows (part of a baseline's cache key), computed once per compare.

    A local copy (--wikitext or $SPARKNET_WIKITEXT) is read and hashed: a trimmed or different copy gets its own
    cache entries. Without one, the text is the hub's, whose hash is the canonical one, so no download is needed
    just to look the cache up."""

    def __init__(self, local: str | None):
        self.local = local or os.environ.get(WIKITEXT_ENV) or None
        self.shas: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def get(self, split: str) -> str:
        from sparknet.evaluate import load_wikitext, rows_sha256

        if split not in self.shas:
            self.shas[split] = WIKITEXT_SHA256[split]
            if self.local is not None:
                try:
                    self.shas[split] = rows_sha256(load_wikitext(split, self.local))
                except SparknetError as exc:  # shown as the baseline's gap reason if it has to be evaluated
                    self.errors[split] = str(exc)
        return self.shas[split]


def _tokenizer_label(info: dict | None) -> tuple[str, bool | None]:
    if not info:
        return "", None
    if info.get("gpt2"):
        return "gpt2", True
    name = str(info.get("name") or "")
    return f"{Path(name).name if Path(name).is_absolute() else name} ({int(info.get('vocab_size', 0)):,})", False


def baseline_row(spec: str, protocols: Sequence[str], *, lab: Path, evaluate: bool, wikitext: str | None,
                 shas: WikitextShas, device: str | None, batch_size: int, log: Any = print) -> Row:
    """The row of one baseline: cached results, plus (with `evaluate`) the missing protocols scored and cached."""
    model, revision = split_baseline(spec)
    row = Row(KIND_BASELINE, MEASURED, spec)
    local = Path(model).expanduser().exists()
    if missing_folder(model):  # say so, rather than blame the hub for a typo in a path
        row.notes.append(f"no such model folder: {model}")
        return row
    try:
        identity = baseline_identity(model)
    except OSError as exc:
        row.notes.append(f"cannot read {model} ({exc.strerror or exc})")
        return row
    cache = BaselineCache(lab / "baselines")
    down = "" if local or hub_offline() else hub_unreachable()
    commit, how = ("", "local") if local else resolve_commit(model, revision, down)
    row.commit = commit
    missing = []
    for p in protocols:
        data_sha = shas.get(protocol_split(p))
        entry = cache.get(identity, commit, p, data_sha) if commit or local else None
        if entry is None and not commit and not local:
            entry = cache.latest(identity, revision, p, data_sha)
            if entry is not None:
                row.commit = str(entry.get("commit", ""))
                row.caveats.setdefault(f"commit {row.commit[:12]}, what {revision} was when scored on "
                                       f"{entry.get('created', '?')} ({how})", []).append(p)
        if entry is None:
            missing.append(p)
            continue
        row.wikitext[p] = metrics_of(entry["result"])
        row.dtypes[p] = str(entry.get("dtype", ""))
        row.add_caveats([entry["result"]])
        row.params = entry.get("params", row.params)
        row.tokenizer, row.gpt2_tokenizer = _tokenizer_label(entry.get("tokenizer"))
    if not missing:
        return row
    if not evaluate:
        row.notes.append(f"{', '.join(missing)}: not evaluated yet (fix: --evaluate; computed once, then cached "
                         f"in {cache.folder})")
        return row
    data_errors = {shas.errors[s] for s in {protocol_split(p) for p in missing} if s in shas.errors}
    if data_errors:
        row.notes.append(f"{', '.join(missing)}: not evaluated ({'; '.join(sorted(data_errors))})")
        return row

    device = device or scoring.default_device()
    log(f"evaluating baseline {spec} on {', '.join(missing)} (once: cached in {cache.folder}) ...")
    try:
        with offline(bool(down)):
            # By its name (so the HF cache learns where the name points, for offline lookups later); the cache key
            # takes the commit that was loaded, whatever the name resolved to a moment ago.
            hf_model, tokenizer = scoring.load_fp32(model, revision, device)
    except SparknetError as exc:
        prefix = "cannot load it" if local else f"not reachable ({down})" if down \
            else "not reachable offline" if hub_offline() else "not reachable"
        row.notes.append(f"{', '.join(missing)}: {prefix}: {exc}")
        return row
    # num_parameters() counts each tensor once, so GPT-2's tied input/output embedding counts once (124.44M).
    params = int(hf_model.num_parameters())
    row.params = float(params)
    tok_info = {"name": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
                "gpt2": scoring.is_gpt2_tokenizer(tokenizer)}
    row.tokenizer, row.gpt2_tokenizer = _tokenizer_label(tok_info)
    try:
        results = scoring.score(hf_model, tokenizer, missing, wikitext, device, batch_size)
    except scoring.EVAL_ERRORS as exc:
        row.notes.append(f"{', '.join(missing)}: not evaluated ({scoring.reason(exc)})")
        return row
    loaded = "" if local else str(getattr(hf_model.config, "_commit_hash", "") or commit)
    row.commit = loaded
    for r in results:
        cache.put({"model": model, "revision": revision, "commit": loaded, "identity": identity,
                   "protocol": r.protocol, "data_sha256": r.details.get("data_sha256") or shas.get(r.split),
                   "params": params, "tokenizer": tok_info, "device": device, "created": time.strftime("%F %T"),
                   "created_ts": time.time(),
                   "result": r.to_dict()})
        row.wikitext[r.protocol] = metrics_of(r)
        row.dtypes[r.protocol] = EVAL_DTYPE
    row.add_caveats(results)
    return row
