"""Read documents from a source, in a fixed order, one string per document.

`iter_documents(src, start)` yields the raw items of a source from position `start` on. An item that
holds no text is yielded as "" so that positions stay stable: the token store records how many items
it consumed and resumes exactly there. `source_identity(src)` is what makes two sources "the same" for
the content-addressed store (it ignores the weight and the name). `resolve_hf_commit(src)` is the commit a
hub dataset's `revision` points at now; the store records it and passes it back as `revision=` so that
it is only ever extended from the commit it was created from.

`doc_hash(text)` is a document's identity for the validation split and for deduplication: a salted
64-bit hash of its whitespace-normalized text. Before anything is tokenized, `check_source(src)` says
whether a local source holds text at all, `check_overlaps(sources)` refuses two sources that read the
same files or dataset, and `check_hub_source(src)` whether a hub dataset can be streamed from here.

Kinds:
- hf:     a Hugging Face dataset (hub id with `revision`, or a local dataset folder), streamed.
- local:  files matching a glob or under a folder: jsonl(.gz)/json/parquet (one document per record,
          `text_field`), txt/md (one per file), html (one per file, markup stripped).
- blog:   a folder of posts (md/html/txt), one document per post, front matter and markup stripped.
- pydocs: text that any Python installation carries: stdlib docstrings, installed packages' READMEs,
          or stdlib source code with its docstrings cut out (so no part holds another's text). Three clearly
          different domains, present without any download.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import html
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from sparknet import pydocs
from sparknet.config import SourceConfig
from sparknet.errors import SparknetError
from sparknet.hub import hub_unreachable

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt", ".md", ".markdown", ".html", ".htm")
BLOG_SUFFIXES = (".md", ".markdown", ".html", ".htm", ".txt")


def iter_documents(src: SourceConfig, start: int = 0, *, revision: str | None = None) -> Iterator[str]:
    """Documents of `src` from item `start` on ("" for items without text).

    `revision` (hf hub datasets only) reads that revision instead of `src.revision`: the token store
    passes the commit it was created from, so an extension never reads a newer version.
    """
    if src.kind == "hf":
        yield from _iter_hf(src, start, revision)
    elif src.kind == "local":
        yield from _skip(_iter_local(src), start)
    elif src.kind == "blog":
        yield from _skip(_iter_blog(src), start)
    elif src.kind == "pydocs":
        yield from _skip(pydocs.iter_pydocs(src.part), start)
    else:  # validated by config; kept for safety
        raise SparknetError(f"source {src.name!r}: unknown kind {src.kind!r} (fix: hf, local, blog or pydocs)")


def source_identity(src: SourceConfig) -> dict:
    """What the source's content depends on; the store key hashes this (not the name or weight)."""
    ident: dict = {"kind": src.kind}
    if src.kind == "hf":
        ident.update(path=src.path, revision=src.revision, subset=src.subset, split=src.split,
                     text_field=src.text_field)
        if Path(src.path).exists():
            ident["files"] = _file_stats(sorted(str(p) for p in Path(src.path).rglob("*") if p.is_file()))
    elif src.kind in ("local", "blog"):
        files = list_files(src)
        ident.update(text_field=src.text_field, files=_file_stats(files))
    elif src.kind == "pydocs":
        ident.update(part=src.part, python=sys.version.split()[0], stdlib=pydocs.stdlib_dir())
        if src.part == "readmes":
            ident["distributions"] = [f"{n}=={v}" for n, v, _ in pydocs.distributions()]
        else:
            ident["files"] = len(pydocs.stdlib_files())
            if src.part == "code":
                ident["docstrings"] = "cut"  # stores made while `code` kept them hold other text
    ident["max_document_bytes"] = src.max_document_bytes
    return ident


# --------------------------------------------------------------------------------- document identity

# Fixed, not the mixture seed: the held-out documents of a source must not change with the run's seed (a
# sweep over seeds would otherwise validate each trial on text another trial trained on), and the stores
# stay shared. Changing it changes every validation slice, so it is part of each store's key.
VAL_SALT = "sparknet-val-1"
HASH_SPACE = 2**64


def normalize_text(text: str) -> str:
    """The text that identifies a document: whitespace runs collapsed to one space, ends stripped, so a
    copy that was re-wrapped or re-indented is still the same document."""
    return " ".join(text.split())


def doc_hash(text: str, salt: str = VAL_SALT) -> int:
    """A document's salted 64-bit hash in [0, 2**64), of its normalized text.

    Uniform over documents, so "hash below a threshold" is a seeded random sample spread over the whole
    source, decided by each document alone (no pass over the source, the same on every machine); and two
    copies of a text always land on the same side of the split. 64 bits: with a million held-out documents
    and a billion training documents, the chance of any false duplicate is ~5e-5.
    """
    data = normalize_text(text).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=salt.encode()).digest(), "big")


def _skip(it: Iterator[str], start: int) -> Iterator[str]:
    for i, doc in enumerate(it):
        if i >= start:
            yield doc


def _file_stats(files: list[str]) -> list[list]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


# --------------------------------------------------------------------------------- Hugging Face


_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
HUB_TIMEOUT_S = 10.0


def resolve_hf_commit(src: SourceConfig) -> str | None:
    """The commit sha that `src.revision` of a hub dataset points at now; None where there is none.

    None for local folders and other kinds, and when the hub cannot answer (offline, no network, no
    access): the caller then reads at `src.revision` as configured, and reading reports the real
    problem with a fix. Never raises for those, and waits at most ~HUB_TIMEOUT_S.
    """
    if src.kind != "hf" or Path(src.path).exists():
        return None
    if src.revision and _COMMIT_SHA.fullmatch(src.revision):
        return src.revision  # already pinned: nothing to ask the hub
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(src.path, revision=src.revision, timeout=HUB_TIMEOUT_S).sha
    except Exception:  # offline mode, network, auth, unknown id or revision: all "cannot resolve"
        return None
    return sha if isinstance(sha, str) and _COMMIT_SHA.fullmatch(sha) else None


def _iter_hf(src: SourceConfig, start: int, revision: str | None = None) -> Iterator[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise SparknetError("source kind 'hf' needs the `datasets` package (fix: pip install datasets)") from None
    local = Path(src.path)
    pinned = revision is not None and revision != src.revision and not local.exists()
    where = (f"source {src.name!r} (hf {src.path!r}, split {src.split!r}, revision {src.revision!r}"
             + (f" at commit {revision} recorded by its token store)" if pinned else ")"))
    try:
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))  # a `save_to_disk` folder
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise SparknetError(f"{where}: no split {src.split!r} (have: {', '.join(ds)}) "
                                        f"(fix: set mixture.sources.{src.name}.split to one of them)")
                ds = ds[src.split]
            if src.streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(src.path, name=src.subset, split=src.split,
                                       revision=None if local.exists() else revision or src.revision,
                                       streaming=src.streaming)
        if start:
            # Dataset.skip(len(ds)) raises IndexError: resuming an exhausted source must yield nothing.
            if isinstance(ds, datasets.Dataset) and start >= len(ds):
                return
            ds = ds.skip(start)
        rows = iter(ds)
        first = True
        for row in rows:
            if first:
                if src.text_field not in row:
                    raise SparknetError(f"{where}: no column {src.text_field!r} (have: {', '.join(row)}) "
                                        f"(fix: set mixture.sources.{src.name}.text_field)")
                first = False
            text = row[src.text_field]
            yield text if isinstance(text, str) else ""
    except SparknetError:
        raise
    except Exception as exc:  # network, auth, missing dataset: all user-fixable
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        if local.exists():  # a local folder: the hub has nothing to do with it
            hint = (f"check mixture.sources.{src.name}.split/subset against the folder's files "
                    f"(e.g. data/{src.split}-00000-of-00001.parquet)")
        elif offline:
            hint = ("the hub is offline (HF_HUB_OFFLINE=1): download it once online, or point `path` at a "
                    "local copy / use kind: local")
        elif pinned:  # e.g. a force-push removed the commit: the store cannot be extended from it
            hint = (f"check your network and HF_TOKEN; if the hub no longer has commit {revision}, delete "
                    f"this source's folder under <lab>/tokens/ to rebuild it from revision {src.revision!r}")
        else:
            hint = "check the dataset id, revision and split, your network and HF_TOKEN, or use kind: local"
        raise SparknetError(f"{where}: cannot read the dataset: {type(exc).__name__}: {msg} (fix: {hint})") from None


# --------------------------------------------------------------------------------- local files


def list_files(src: SourceConfig) -> list[str]:
    """Files of a local/blog source in a fixed order; an error if there are none."""
    suffixes = BLOG_SUFFIXES if src.kind == "blog" else LOCAL_SUFFIXES
    p = src.path
    if os.path.isdir(p):
        files = [str(f) for f in Path(p).rglob("*") if f.is_file() and f.name.lower().endswith(suffixes)
                 and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    elif any(ch in p for ch in "*?["):
        files = [f for f in glob.glob(p, recursive=True) if os.path.isfile(f)]
    elif os.path.isfile(p):
        files = [p]
    else:
        raise SparknetError(f"source {src.name!r}: path {p!r} does not exist "
                            f"(fix: set mixture.sources.{src.name}.path to a file, folder or glob)")
    files = sorted(files)
    if not files:
        held = ""
        if os.path.isdir(p):  # say what is there instead: a folder of .csv is a different fix than an empty one
            other = sorted({f.suffix.lower() or f.name for f in Path(p).rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)})
            held = f", it holds only {', '.join(other[:5])} files" if other else ", it is empty"
        raise SparknetError(f"source {src.name!r}: no {'/'.join(s.lstrip('.') for s in suffixes)} files "
                            f"match {p!r}{held} (fix: check mixture.sources.{src.name}.path)")
    for f in files:
        if not f.lower().endswith(suffixes):
            raise SparknetError(f"{f}: unsupported file type for source {src.name!r} "
                                f"(fix: use one of {', '.join(suffixes)})")
    return files


def _iter_local(src: SourceConfig) -> Iterator[str]:
    for f in list_files(src):
        low = f.lower()
        if os.path.getsize(f) == 0:
            raise SparknetError(f"{f}: file is empty (fix: remove it or narrow mixture.sources.{src.name}.path)")
        if low.endswith((".jsonl", ".jsonl.gz")):
            yield from _iter_jsonl(f, src)
        elif low.endswith(".json"):
            yield from _iter_json(f, src)
        elif low.endswith(".parquet"):
            yield from _iter_parquet(f, src)
        elif low.endswith((".html", ".htm")):
            yield html_to_text(_read_text(f, src))
        else:
            yield _read_text(f, src)


def _read_text(f: str, src: SourceConfig) -> str:
    size = os.path.getsize(f)
    if size > src.max_document_bytes:
        raise SparknetError(f"{f}: {size} bytes is larger than max_document_bytes={src.max_document_bytes} "
                            f"(fix: split the file or raise mixture.sources.{src.name}.max_document_bytes)")
    data = Path(f).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SparknetError(f"{f}: byte {exc.start} is not UTF-8 text (fix: convert the file to UTF-8)") from None


def _iter_jsonl(f: str, src: SourceConfig) -> Iterator[str]:
    opener = gzip.open if f.lower().endswith(".gz") else open
    limit = src.max_document_bytes
    with opener(f, "rb") as fh:
        lineno = 0
        while True:
            # Bounded read: a "line" with no newline for gigabytes fails here, not in the allocator.
            try:
                line = fh.readline(limit + 1)
            except (OSError, EOFError, zlib.error) as exc:  # a .gz that is not gzip, truncated or corrupt
                raise SparknetError(f"{f}: cannot read line {lineno + 1} ({type(exc).__name__}: {exc}) "
                                    f"(fix: re-create the file; a .jsonl.gz must be complete gzip data)") from None
            if not line:
                break
            lineno += 1
            if len(line) > limit and not line.endswith(b"\n"):
                raise SparknetError(f"{f}: line {lineno} is longer than max_document_bytes={limit} "
                                    f"(fix: split the record or raise mixture.sources.{src.name}.max_document_bytes)")
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SparknetError(f"{f}: line {lineno}, byte {exc.start}: not UTF-8 text "
                                    f"(fix: convert the file to UTF-8)") from None
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SparknetError(f"{f}: line {lineno}: invalid JSON ({exc.msg}) "
                                    f"(fix: one JSON object per line)") from None
            yield _text_of(rec, f, f"line {lineno}", src)


def _iter_json(f: str, src: SourceConfig) -> Iterator[str]:
    try:
        data = json.loads(_read_text(f, src))
    except json.JSONDecodeError as exc:
        raise SparknetError(f"{f}: invalid JSON at line {exc.lineno} ({exc.msg}) "
                            f"(fix: make it a JSON array of objects, or use one object per line in a .jsonl)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    records = data if isinstance(data, list) else [data]
    for i, rec in enumerate(records):
        yield _text_of(rec, f, f"record {i}", src)


def _iter_parquet(f: str, src: SourceConfig) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as exc:
        raise SparknetError(f"{f}: not a readable parquet file ({type(exc).__name__}: {exc}) "
                            f"(fix: re-create the file, or remove it from mixture.sources.{src.name}.path)") from None
    if src.text_field not in pf.schema_arrow.names:
        raise SparknetError(f"{f}: no column {src.text_field!r} (have: {', '.join(pf.schema_arrow.names)}) "
                            f"(fix: set mixture.sources.{src.name}.text_field)")
    # A non-text column would otherwise read as nothing but empty documents, silently.
    ftype = pf.schema_arrow.field(src.text_field).type
    value_type = ftype.value_type if pa.types.is_dictionary(ftype) else ftype
    if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
            or getattr(pa.types, "is_string_view", lambda _t: False)(value_type)):
        raise SparknetError(f"{f}: column {src.text_field!r} is {ftype}, not text "
                            f"(fix: point mixture.sources.{src.name}.text_field at a string column)")
    for batch in pf.iter_batches(batch_size=1024, columns=[src.text_field]):
        for text in batch.column(0).to_pylist():
            yield text if isinstance(text, str) else ""


def _text_of(rec: object, f: str, where: str, src: SourceConfig) -> str:
    if not isinstance(rec, dict):
        raise SparknetError(f"{f}: {where}: expected a JSON object, got {type(rec).__name__} "
                            f"(fix: write each record as {{\"{src.text_field}\": \"...\"}})")
    if src.text_field not in rec:
        raise SparknetError(f"{f}: {where}: no field {src.text_field!r} (have: {', '.join(rec)}) "
                            f"(fix: set mixture.sources.{src.name}.text_field)")
    text = rec[src.text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise SparknetError(f"{f}: {where}: field {src.text_field!r} is {type(text).__name__}, not text "
                            f"(fix: store the text as a string, or point mixture.sources.{src.name}.text_field "
                            f"at the text field)")
    return text


# --------------------------------------------------------------------------------- blog posts

_FRONT_MATTER = re.compile(r"\A(?:\ufeff)?(---|\+\+\+)[ \t]*\r?\n(.*?)\r?\n\1[ \t]*(?:\r?\n|\Z)", re.S)


def _iter_blog(src: SourceConfig) -> Iterator[str]:
    for f in list_files(src):
        raw = _read_text(f, src)
        if not raw.strip():
            raise SparknetError(f"{f}: post is empty (fix: remove it from the blog folder)")
        title, body = split_front_matter(raw)
        text = html_to_text(body) if f.lower().endswith((".html", ".htm")) else markdown_to_text(body)
        yield f"{title}\n\n{text}" if title else text


def split_front_matter(text: str) -> tuple[str, str]:
    """(title, body) of a post with optional YAML (---) or TOML (+++) front matter."""
    m = _FRONT_MATTER.match(text)
    if not m:
        return "", text
    title = ""
    for line in m.group(2).splitlines():
        km = re.match(r"""^\s*title\s*[:=]\s*["']?(.*?)["']?\s*$""", line)
        if km:
            title = km.group(1)
            break
    return title, text[m.end():]


_MD_RULES = [
    (re.compile(r"^[ \t]*(```|~~~).*$", re.M), ""),  # code fences: keep the code, drop the fence
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),  # images
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links -> their text
    (re.compile(r"^[ \t]*\[[^\]]+\]:[ \t]*\S+.*$", re.M), ""),  # reference definitions
    (re.compile(r"^[ \t]{0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$", re.M), r"\1"),  # ATX headings
    (re.compile(r"^[ \t]{0,3}>[ \t]?", re.M), ""),  # blockquote markers
    (re.compile(r"^[ \t]{0,3}([-*_])([ \t]*\1){2,}[ \t]*$", re.M), ""),  # horizontal rules
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # bold
    (re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])"), r"\1"),  # italic *x*
    (re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)"), r"\1"),  # italic _x_
    (re.compile(r"`([^`\n]+)`"), r"\1"),  # inline code
    (re.compile(r"\{%.*?%\}|\{\{.*?\}\}", re.S), ""),  # Jekyll/Hugo template tags
]


def markdown_to_text(md: str) -> str:
    """Plain prose from Markdown: markup removed, text of links and code kept."""
    text = html_to_text(md) if re.search(r"<(p|div|span|br|a|img|table|h\d)\b", md, re.I) else md
    for pattern, repl in _MD_RULES:
        text = pattern.sub(repl, text)
    return _squeeze_blank_lines(text)


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    _BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
              "section", "article", "header", "footer", "blockquote", "pre", "hr", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skip_depth += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page or fragment (scripts/styles dropped, entities decoded)."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    text = "\n".join(re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    return _squeeze_blank_lines(text)


def _squeeze_blank_lines(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --------------------------------------------------------------------------------- checks before tokenizing


def is_hub(src: SourceConfig) -> bool:
    """A source streamed from the Hugging Face hub (not a local dataset folder)."""
    return src.kind == "hf" and not Path(src.path).exists()


def check_source(src: SourceConfig) -> tuple[int, int] | None:
    """Check, without tokenizing, that a local or blog source holds text: (number of files, bytes).

    Errors name the source, the file and the fix: a path that does not exist, a glob matching nothing, a
    folder without supported files, an empty file, an empty or unreadable blog post. None for kinds whose
    size is not cheap to know (hub datasets, pydocs) and for compressed files (.jsonl.gz, .parquet), whose
    bytes say nothing about their text. For the uncompressed ones, bytes bound the text from above (a
    JSON record's text is never longer than its line).
    """
    if src.kind == "hf":
        p = src.path
        if not Path(p).exists() and (p.startswith(("/", ".", "~")) or p.count("/") > 1):
            # A hub id is "owner/name": this was meant as a folder; say so rather than blame the hub for a typo.
            raise SparknetError(f"source {src.name!r}: dataset folder {p!r} does not exist (fix: set "
                                f"mixture.sources.{src.name}.path to a dataset folder or a hub id such as owner/name)")
        return None
    if src.kind not in ("local", "blog"):
        return None
    files = list_files(src)
    sizes = [os.path.getsize(f) for f in files]
    for f, size in zip(files, sizes):
        if size == 0:
            raise SparknetError(f"{f}: file is empty (fix: remove it or narrow mixture.sources.{src.name}.path)")
    if src.kind == "blog":
        for _ in _iter_blog(src):  # posts are few and small: read them all now (empty, not UTF-8, too big)
            pass
    if any(f.lower().endswith((".gz", ".parquet")) for f in files):
        return None
    return len(files), sum(sizes)


def _data_keys(src: SourceConfig) -> dict[tuple, str]:
    """What a source reads, as comparable keys -> a readable name of each."""
    if src.kind in ("local", "blog"):
        return {("file", os.path.realpath(f)): f for f in list_files(src)}
    if src.kind == "hf":
        if Path(src.path).exists():
            root = Path(src.path)
            files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]
            return {("file", os.path.realpath(f)): str(f) for f in files}
        # Any revision: two commits of one dataset share most of their rows.
        return {("hf", src.path.lower(), src.subset, src.split):
                f"hf {src.path}" + (f" subset {src.subset}" if src.subset else "") + f" split {src.split}"}
    # pydocs: the parts are different documents (`code` is the stdlib with its docstrings cut out, `docstrings` those)
    return {("pydocs", src.part): f"pydocs {src.part}"}


def check_overlaps(sources: tuple[SourceConfig, ...] | list[SourceConfig]) -> None:
    """Two sources reading the same files or dataset are an error, unless one of them sets `allow_overlap`.

    Why: the plan counts each source's repetition separately, so a file read by two sources is trained
    1.7x while the report says 1.0x; and one source's validation documents are the other's training
    documents. Checked before anything is tokenized.
    """
    keys = [_data_keys(s) for s in sources]
    for j, b in enumerate(sources):
        for i in range(j):
            a = sources[i]
            common = keys[i].keys() & keys[j].keys()
            if not common or a.allow_overlap or b.allow_overlap:
                continue
            example = keys[i][min(common)]
            what = f"{len(common)} of its files, e.g. {example}" if len(common) > 1 else example
            raise SparknetError(
                f"mixture.sources.{b.name}: reads the same data as source {a.name!r} ({what}): it would be trained "
                f"on more often than max_repeats allows, and each source's validation documents would train the "
                f"other (fix: point the two sources at different files or datasets, or set "
                f"mixture.sources.{b.name}.allow_overlap: true if the repetition is intended)")


HUB_HINT = ("streaming needs the network: prepare once online (the token store is then reused), or point "
            "the source at a local copy (kind: local / a dataset folder)")


def check_hub_source(src: SourceConfig, timeout_s: float = 3.0) -> None:
    """Fail now, in seconds, when a hub source cannot be streamed from here: offline, unreachable, or no
    such dataset or revision. Nothing to check for local folders and other kinds."""
    if not is_hub(src):
        return
    where = f"source {src.name!r} (hf {src.path!r}, split {src.split!r}, revision {src.revision!r})"
    down = hub_unreachable(timeout_s)
    if down:
        raise SparknetError(f"{where}: the hub is not reachable ({down}) (fix: {HUB_HINT})")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        # The probe's timeout again: a firewall may accept the connection and then drop what is sent on it.
        HfApi().dataset_info(src.path, revision=src.revision, timeout=timeout_s)
    except GatedRepoError:
        raise SparknetError(f"{where}: the dataset is gated (fix: accept its terms on the hub and set HF_TOKEN)"
                            ) from None
    except RepositoryNotFoundError:
        raise SparknetError(f"{where}: no such dataset on the hub, or it is private (fix: check "
                            f"mixture.sources.{src.name}.path, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SparknetError(f"{where}: the dataset has no revision {src.revision!r} (fix: check "
                            f"mixture.sources.{src.name}.revision)") from None
    except Exception as exc:  # timeouts, HTTP errors: the hub did not say yes
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SparknetError(f"{where}: the hub did not answer ({type(exc).__name__}: {msg}) (fix: check your "
                            f"network and HF_TOKEN; {HUB_HINT})") from None
