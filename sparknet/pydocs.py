"""Text that every Python installation carries, for the `pydocs` source kind: the standard library's docstrings,
its code with the docstrings cut out (so the two parts never overlap), and the READMEs of the packages sparknet
needs to run. No download, nothing synthetic: the quickstart and the tests train on it."""

from __future__ import annotations

import ast
import functools
import inspect
import io
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """The standard library's own .py files (no site-packages, no tests), sorted. Cached: a run asks for them
    several times (the store key counts them) and the walk takes seconds; skipped folders are pruned, not walked."""
    root = stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip"}
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith("config-")]
        out.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    return tuple(sorted(out))


def distributions() -> tuple[tuple[str, str, object], ...]:
    """The distributions whose READMEs the `readmes` part reads (name, version, dist), by name: those sparknet
    needs to run (its declared dependencies and theirs, markers evaluated, extras left out, sparknet itself
    left out), or every installed one when sparknet is not installed as a distribution (a bare source tree).

    Why not every installed one: then a developer tool (pytest-randomly, ruff) installed beside sparknet would
    change the quickstart's text, and with it every number of a worked example; sparknet's own README changes
    with every commit. Cached per sys.path (what they are found on): reading every METADATA file takes about a
    second, and one prepare asks several times (the store key lists them, every pass over `readmes` reads them)."""
    return _distributions_on(tuple(sys.path))


def _runtime_closure(dists: dict) -> set[str] | None:
    """The normalized names of sparknet's runtime dependencies, transitively (None: sparknet is not installed)."""
    from packaging.requirements import InvalidRequirement, Requirement

    if "sparknet" not in dists:
        return None
    seen: set[str] = set()
    todo = ["sparknet"]
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for line in dists[name][2].requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_normalized(req.name))
    return seen - {"sparknet"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


@functools.lru_cache(maxsize=2)
def _distributions_on(path: tuple[str, ...]) -> tuple[tuple[str, str, object], ...]:
    from importlib import metadata

    seen = {}
    for dist in metadata.distributions(path=list(path)):
        name = (dist.metadata.get("Name") or "").strip()
        if name and _normalized(name) not in seen:
            seen[_normalized(name)] = (name, dist.version, dist)
    keep = _runtime_closure(seen)
    return tuple(seen[k] for k in sorted(seen) if keep is None or k in keep)


def module_docstrings(source: str, tree: ast.AST | None = None) -> str:
    """The module, class and function docstrings of a Python source file, in order (`tree`: its parse, if made)."""
    tree = tree or ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and len(doc.split()) >= 4:  # skip one-word stubs like "Return x."
                docs.append(inspect.cleandoc(doc))
    return "\n\n".join(docs)


def _docstring_nodes(tree: ast.AST) -> Iterator[tuple[ast.Constant, bool]]:
    """The string constants `ast.get_docstring` reads (the first statement of a module, class or function body),
    each with whether it is its body's only statement."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                yield first.value, len(node.body) == 1 and not isinstance(node, ast.Module)


def code_without_docstrings(source: str, tree: ast.AST | None = None) -> str:
    """A Python source file with its module, class and function docstrings cut out (comments and code kept).

    Why: the `docstrings` part is those docstrings, so with them left in, every validation document of
    `docstrings` would sit inside a training document of `code` in a mixture of both: a leak that no exact
    duplicate check finds. Lines a docstring filled are dropped, so no hole stands where it was; a body that was
    only a docstring gets `pass`, so the file stays valid Python. `tree`: its parse, if made."""
    tree = tree or ast.parse(source)
    # Lines as ast counts them (\n, \r\n, \r only): str.splitlines would also split on \x0c, \x85, \u2028, ...
    lines = io.StringIO(source, newline="").readlines()
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def at(lineno: int, col: int) -> int:  # ast columns are UTF-8 byte offsets within the line
        return offsets[lineno - 1] + len(lines[lineno - 1].encode("utf-8")[:col].decode("utf-8", "replace"))

    spans = []
    for n, alone in _docstring_nodes(tree):
        begin, end = at(n.lineno, n.col_offset), at(n.end_lineno, n.end_col_offset)  # type: ignore[arg-type]
        line_begin, line_end = offsets[n.lineno - 1], offsets[n.end_lineno]  # type: ignore[index]
        if alone:
            spans.append((begin, end, "pass"))
        elif not source[line_begin:begin].strip() and not source[end:line_end].strip():
            spans.append((line_begin, line_end, ""))  # the docstring fills its lines: cut them whole
        else:  # shares its line: `def f(): "doc"; return 1` -> `def f(): return 1`
            after = re.match(r"[ \t]*;[ \t]*", source[end:line_end])
            spans.append((begin, end + (after.end() if after else 0), ""))
    kept, pos = [], 0
    for begin, end, instead in sorted(spans):
        kept.append(source[pos:begin] + instead)
        pos = end
    kept.append(source[pos:])
    return "".join(kept)


def iter_pydocs(part: str) -> Iterator[str]:
    """The documents of one part (`docstrings`, `readmes`, `code`), in a fixed order; a file that cannot be parsed
    is an empty document, so positions stay stable."""
    if part == "readmes":
        for _name, _version, dist in distributions():
            meta = dist.metadata  # type: ignore[attr-defined]
            body = meta.get_payload() if hasattr(meta, "get_payload") else None
            body = body or meta.get("Description") or ""
            yield body.strip() if isinstance(body, str) else ""
        return
    for f in stdlib_files():
        try:
            st = os.stat(f)
            docstrings, code = _parts_of(f, st.st_size, st.st_mtime_ns)
            yield docstrings if part == "docstrings" else code
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            yield ""  # a few stdlib files are deliberately broken (test data); keep positions stable


@functools.lru_cache(maxsize=4096)
def _parts_of(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """A stdlib file's (docstrings, code without them). Cached per file (size and mtime in the key): parsing the
    stdlib takes ~15 s on a slow core, and one prepare reads each part up to four times (validation selection,
    tokenizer training, the store); ~30 MB held (the stdlib's text)."""
    text = Path(path).read_text(encoding="utf-8")
    tree = ast.parse(text)
    return module_docstrings(text, tree), code_without_docstrings(text, tree)
