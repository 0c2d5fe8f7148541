"""sparknet.sources: every source kind read offline, in a fixed order, with clear errors for bad input."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from sparknet.config import SourceConfig
from sparknet.errors import SparknetError
from sparknet.pydocs import module_docstrings
from sparknet.sources import (
    check_source,
    html_to_text,
    iter_documents,
    list_files,
    markdown_to_text,
    resolve_hf_commit,
    source_identity,
    split_front_matter,
)


def source(path, kind: str = "local", name: str = "src", **kw) -> SourceConfig:
    return SourceConfig(name=name, kind=kind, path=str(path), weight=1.0, **kw)


def docs(src: SourceConfig, start: int = 0) -> list[str]:
    return list(iter_documents(src, start=start))


def user_error(src: SourceConfig, start: int = 0) -> str:
    """The message of the SparknetError that reading `src` raises; checks it is one line."""
    with pytest.raises(SparknetError) as exc:
        docs(src, start)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------- local: jsonl / json / parquet


def test_jsonl_documents_in_order_and_every_resume_position(write_jsonl):
    texts = ["first doc", "second: ünïcödé ✓", "third\nwith a newline", "fourth"]
    src = source(write_jsonl("a.jsonl", texts))
    assert docs(src) == texts
    for start in range(len(texts) + 2):
        assert docs(src, start) == texts[start:]


def test_jsonl_null_text_keeps_its_position_and_blank_lines_are_not_items(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"text": "a", "id": 1}\n{"text": null}\n\n   \n{"id": 3, "text": "c"}\n', encoding="utf-8")
    src = source(p)
    assert docs(src) == ["a", "", "c"]
    assert docs(src, start=1) == ["", "c"]
    assert docs(src, start=2) == ["c"]
    assert docs(src, start=3) == []


def test_jsonl_gz(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for t in ["gz one", "gz two", "gz three"]:
            f.write(json.dumps({"text": t}) + "\n")
    assert docs(source(p)) == ["gz one", "gz two", "gz three"]
    assert docs(source(p), start=2) == ["gz three"]


def test_json_array_data_dict_and_single_object(tmp_path):
    d = tmp_path / "json"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([{"text": "x1"}, {"text": None}, {"text": "x3"}]), encoding="utf-8")
    (d / "b.json").write_text(json.dumps({"version": 2, "data": [{"text": "y1"}, {"text": "y2"}]}), encoding="utf-8")
    (d / "c.json").write_text(json.dumps({"text": "z"}), encoding="utf-8")
    assert docs(source(d)) == ["x1", "", "x3", "y1", "y2", "z"]
    assert docs(source(d), start=4) == ["y2", "z"]


def test_parquet_with_other_text_field_across_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [None if i % 7 == 3 else f"row {i}" for i in range(2500)]
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": list(range(2500)), "content": texts}), p, row_group_size=1000)
    src = source(p, text_field="content")
    got = docs(src)
    assert got == [t or "" for t in texts]
    assert got[3] == "" and got[2499] == "row 2499"
    assert docs(src, start=2498) == ["row 2498", "row 2499"]

    msg = user_error(source(p))  # text_field "text" is not a column
    assert str(p) in msg and "no column 'text' (have: id, content)" in msg and "fix" in msg
    msg = user_error(source(p, text_field="id"))  # a column, but not text
    assert str(p) in msg and "column 'id' is int64, not text" in msg and "fix" in msg


def test_txt_and_md_are_one_document_per_file_verbatim(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\nbeta\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\n**body** text", encoding="utf-8")
    (tmp_path / "c.markdown").write_text("gamma", encoding="utf-8")
    # kind local keeps markdown as is (kind blog strips it)
    assert docs(source(tmp_path)) == ["alpha\nbeta\n", "# Title\n\n**body** text", "gamma"]


def test_html_file_is_stripped(tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><head><title>Tab title</title><style>p { color: red }</style></head><body>"
        "<h1>Fish &amp; Chips</h1><script>var s = '<p>hidden</p>';</script>"
        "<p>Caf&eacute; &lt;b&gt; &#8212; 5&nbsp;&nbsp;km</p><noscript>enable js</noscript>"
        "<ul><li>one</li><li>two</li></ul><p>a   b\tc</p></body></html>", encoding="utf-8")
    assert docs(source(tmp_path / "page.html")) == ["Fish & Chips\n\nCafé <b> — 5 km\n\none\n\ntwo\n\na b c"]


def test_folder_glob_and_single_file_select_and_sort_files(tmp_path, write_jsonl):
    for name in ["b.jsonl", "a.jsonl", "10.jsonl", "2.jsonl", "sub/c.jsonl", ".hidden/h.jsonl", ".dot.jsonl"]:
        write_jsonl(f"d/{name}", [name])
    (tmp_path / "d" / "notes.csv").write_text("ignored in a folder", encoding="utf-8")
    d = tmp_path / "d"

    folder = list_files(source(d))
    assert folder == [str(d / n) for n in ["10.jsonl", "2.jsonl", "a.jsonl", "b.jsonl", "sub/c.jsonl"]]
    assert docs(source(d)) == ["10.jsonl", "2.jsonl", "a.jsonl", "b.jsonl", "sub/c.jsonl"]

    flat = list_files(source(d / "*.jsonl"))  # not recursive; dot files are not matched
    assert flat == [str(d / n) for n in ["10.jsonl", "2.jsonl", "a.jsonl", "b.jsonl"]]
    deep = list_files(source(str(d / "**" / "*.jsonl")))
    assert deep == folder
    assert list_files(source(d / "a.jsonl")) == [str(d / "a.jsonl")]
    assert docs(source(d / "sub" / "c.jsonl")) == ["sub/c.jsonl"]
    assert list_files(source(d)) == folder  # deterministic


# --------------------------------------------------------------------------------- blog


BLOG_POST = """---
title: "Hello: World"
date: 2024-01-01
tags: [a, b]
---
# Learn C#

Intro with a [link](https://example.com/a "title") and ![a cat](cat.png) an image.
Some **bold**, *italic*, __strong__, _em_ and `inline code` words; snake_case_name stays, 2*3*4 too.

## Code ##

```python
def double(x):
    return x * 2
```

> A quote.

***

[ref]: https://example.com/ref
{% include note.html %}
{{ page.date }}
#hashtag stays
"""

BLOG_POST_TEXT = (
    "Hello: World\n\n"
    "Learn C#\n\n"
    "Intro with a link and  an image.\n"
    "Some bold, italic, strong, em and inline code words; snake_case_name stays, 2*3*4 too.\n\n"
    "Code\n\n"
    "def double(x):\n    return x * 2\n\n"
    "A quote.\n\n"
    "#hashtag stays"
)


def test_blog_posts_markdown_html_txt_and_hidden_files(tmp_path):
    blog = tmp_path / "blog"
    (blog / "posts").mkdir(parents=True)
    (blog / ".drafts").mkdir()
    (blog / "posts" / "2024-01-hello.md").write_text(BLOG_POST, encoding="utf-8")
    (blog / "posts" / "2024-02-page.html").write_text(
        "<html><head><title>ignored</title></head><body><h2>Big &amp; Small</h2>"
        "<script>track()</script><p>Second&nbsp;post.</p></body></html>", encoding="utf-8")
    (blog / "posts" / "2024-03-note.txt").write_text("+++\ntitle = 'Toml Post'\n+++\nplain body\n", encoding="utf-8")
    (blog / "posts" / ".draft.md").write_text("secret draft", encoding="utf-8")
    (blog / ".drafts" / "x.md").write_text("secret folder", encoding="utf-8")
    (blog / "posts" / "image.png").write_bytes(b"\x89PNG")

    src = source(blog, kind="blog")
    assert [Path(f).name for f in list_files(src)] == ["2024-01-hello.md", "2024-02-page.html", "2024-03-note.txt"]
    got = docs(src)
    assert got == [BLOG_POST_TEXT, "Big & Small\n\nSecond post.", "Toml Post\n\nplain body"]
    assert not any("secret" in d for d in got)
    assert docs(src, start=2) == ["Toml Post\n\nplain body"]


def test_blog_empty_post_is_an_error(tmp_path):
    (tmp_path / "a.md").write_text("fine", encoding="utf-8")
    (tmp_path / "b.md").write_text("  \n\n", encoding="utf-8")
    msg = user_error(source(tmp_path, kind="blog"))
    assert str(tmp_path / "b.md") in msg and "post is empty" in msg and "fix" in msg


@pytest.mark.parametrize("md, text", [
    ("# Learn C#", "Learn C#"),
    ("## F# and C# ##", "F# and C#"),
    ("### Title\n\nParagraph", "Title\n\nParagraph"),
    ("#hashtag", "#hashtag"),
    ("see [the site](http://x.org) now", "see the site now"),
    ("![only an image](a.png)", ""),
    ("```\ncode   kept\n```\n\nafter", "code   kept\n\nafter"),
    ("> quoted\n\n---\n\nnext", "quoted\n\nnext"),
    ("a_b_c and x*y*z stay", "a_b_c and x*y*z stay"),
    ("<p>inline <b>html</b> &amp; md **bold**</p>", "inline html & md bold"),
])
def test_markdown_to_text(md, text):
    assert markdown_to_text(md) == text


def test_split_front_matter():
    assert split_front_matter('---\ntitle: "A: B"\ndate: 1\n---\nBody\n') == ("A: B", "Body\n")
    assert split_front_matter("\ufeff---\ntitle: 'Bom'\n---\nB") == ("Bom", "B")
    assert split_front_matter("---\r\ntitle: Crlf\r\n---\r\nB") == ("Crlf", "B")
    assert split_front_matter('+++\ntitle = "Toml"\n+++\nB') == ("Toml", "B")
    assert split_front_matter("---\nsubtitle: no\ndate: 1\n---\nB") == ("", "B")
    no_front = "Text first\n---\ntitle: x\n---\n"
    assert split_front_matter(no_front) == ("", no_front)


def test_html_to_text_blocks_entities_and_skipped_tags():
    assert html_to_text("<p>a</p><p>b</p>c<br>d<div>e &amp; f&nbsp;g</div>") == "a\n\nb\nc\nd\ne & f g"
    assert html_to_text("<svg><text>s</text></svg><template>t</template><style>x{}</style>ok") == "ok"
    assert html_to_text("plain &quot;text&quot; &#x263A;") == 'plain "text" ☺'


# --------------------------------------------------------------------------------- hf, on local data only


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (written by non-streaming load_dataset) inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


@pytest.fixture
def parquet_dataset(tmp_path) -> Path:
    """A hub-style dataset folder: data/<split>-00000-of-00001.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "pq_ds"
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a", "b", None, "d"], "id": [1, 2, 3, 4]}),
                   root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["t1", "t2"], "id": [5, 6]}), root / "data" / "test-00000-of-00001.parquet")
    return root


@pytest.fixture
def saved_datasets(tmp_path) -> tuple[Path, Path]:
    """(a save_to_disk Dataset folder, a save_to_disk DatasetDict folder)."""
    import datasets

    train = datasets.Dataset.from_dict({"text": ["x", None, "z"], "n": [1, 2, 3]})
    single, dd = tmp_path / "single", tmp_path / "dd"
    train.save_to_disk(str(single))
    datasets.DatasetDict({"train": train, "validation": datasets.Dataset.from_dict({"text": ["v"], "n": [0]})}
                         ).save_to_disk(str(dd))
    return single, dd


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_local_parquet_folder(parquet_dataset, hf_cache, streaming):
    src = source(parquet_dataset, kind="hf", streaming=streaming)
    assert docs(src) == ["a", "b", "", "d"]
    assert docs(src, start=2) == ["", "d"]
    assert docs(src, start=4) == []
    assert docs(src, start=9) == []
    test = source(parquet_dataset, kind="hf", split="test", streaming=streaming)
    assert docs(test) == ["t1", "t2"]
    assert docs(test, start=1) == ["t2"]


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_save_to_disk_folders(saved_datasets, streaming):
    single, dd = saved_datasets
    for folder in (single, dd):
        src = source(folder, kind="hf", streaming=streaming)
        assert docs(src) == ["x", "", "z"]
        assert docs(src, start=1) == ["", "z"]
        assert docs(src, start=3) == []  # resuming an exhausted source (was an IndexError when not streaming)
        assert docs(src, start=5) == []
    val = source(dd, kind="hf", split="validation", streaming=streaming)
    assert docs(val) == ["v"]
    assert docs(val, start=1) == []


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_wrong_text_field_names_the_columns(parquet_dataset, saved_datasets, hf_cache, streaming):
    for folder, columns in ((parquet_dataset, "text, id"), (saved_datasets[1], "text, n")):
        msg = user_error(source(folder, kind="hf", name="mine", text_field="body", streaming=streaming))
        assert "source 'mine'" in msg and str(folder) in msg
        assert f"no column 'body' (have: {columns})" in msg and "fix" in msg and "text_field" in msg


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_missing_split(parquet_dataset, saved_datasets, hf_cache, streaming):
    msg = user_error(source(parquet_dataset, kind="hf", name="mine", split="validation", streaming=streaming))
    assert "source 'mine'" in msg and str(parquet_dataset) in msg and "validation" in msg
    assert "train" in msg and "test" in msg  # the splits it does have
    assert "fix" in msg and "HF_HUB_OFFLINE" not in msg  # a local folder: the hub is not the problem

    msg = user_error(source(saved_datasets[1], kind="hf", name="mine", split="test", streaming=streaming))
    assert "source 'mine'" in msg and str(saved_datasets[1]) in msg
    assert "no split 'test' (have: train, validation)" in msg and "fix" in msg


def test_hf_unreachable_hub_fails_fast_with_a_fix():
    import datasets  # noqa: F401  (import time is not what this test measures)

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    src = source("codelion/finepdfs-1B", kind="hf", name="finepdfs")
    t0 = time.perf_counter()
    msg = user_error(src)
    assert time.perf_counter() - t0 < 10
    assert "source 'finepdfs'" in msg and "codelion/finepdfs-1B" in msg
    assert "cannot read the dataset" in msg and "fix" in msg and "HF_HUB_OFFLINE=1" in msg


def test_hf_identity_covers_local_files(saved_datasets):
    single, _ = saved_datasets
    src = source(single, kind="hf")
    ident = source_identity(src)
    assert ident["path"] == str(single) and ident["split"] == "train" and ident["text_field"] == "text"
    assert {Path(f[0]).name for f in ident["files"]} >= {"state.json", "data-00000-of-00001.arrow"}
    (single / "extra.txt").write_text("x", encoding="utf-8")
    assert source_identity(src) != ident


SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records each dataset_info call and answers `answer`."""

    calls: list[dict] = []
    answer: object = None

    def dataset_info(self, repo_id, *, revision=None, timeout=None):
        FakeHfApi.calls.append({"repo_id": repo_id, "revision": revision, "timeout": timeout})
        if isinstance(FakeHfApi.answer, Exception):
            raise FakeHfApi.answer
        return type("Info", (), {"sha": FakeHfApi.answer})()


@pytest.fixture
def fake_hub(monkeypatch) -> type[FakeHfApi]:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    return FakeHfApi


def test_resolve_hf_commit_asks_the_hub_for_the_revision_with_a_timeout(fake_hub):
    fake_hub.answer = SHA
    assert resolve_hf_commit(source("org/data", kind="hf", revision="main")) == SHA
    assert resolve_hf_commit(source("org/data", kind="hf", revision=None)) == SHA  # the default branch
    assert [c["revision"] for c in fake_hub.calls] == ["main", None]
    assert all(c["repo_id"] == "org/data" and 0 < c["timeout"] <= 10 for c in fake_hub.calls)


def test_resolve_hf_commit_pinned_sha_local_folder_and_other_kinds_need_no_hub(fake_hub, saved_datasets,
                                                                               write_jsonl):
    assert resolve_hf_commit(source("org/data", kind="hf", revision=SHA)) == SHA
    assert resolve_hf_commit(source(saved_datasets[0], kind="hf")) is None
    assert resolve_hf_commit(source(write_jsonl("d.jsonl", ["x"]))) is None
    assert fake_hub.calls == []


@pytest.mark.parametrize("answer", [ConnectionError("Name or service not known"), TimeoutError("timed out"),
                                    "not-a-sha", None])
def test_resolve_hf_commit_unresolvable_is_none_not_an_error(fake_hub, answer):
    fake_hub.answer = answer
    assert resolve_hf_commit(source("org/data", kind="hf")) is None
    assert len(fake_hub.calls) == 1


def test_resolve_hf_commit_offline_is_none_at_once():
    import huggingface_hub  # noqa: F401  (import time is not what this test measures)

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    t0 = time.perf_counter()
    assert resolve_hf_commit(source("codelion/finepdfs-1B", kind="hf")) is None
    assert time.perf_counter() - t0 < 5


def test_hf_revision_override_is_what_load_dataset_reads(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, *, name=None, split=None, revision=None, streaming=False):
        calls.append(revision)
        return datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    src = source("org/data", kind="hf", revision="main")
    assert docs(src, start=1) == ["b", "c"]
    assert list(iter_documents(src, start=1, revision=SHA)) == ["b", "c"]
    assert calls == ["main", SHA]


def test_hf_unreachable_pinned_commit_names_it_and_the_store_fix(monkeypatch):
    import datasets

    def load_dataset(path, **kw):
        raise FileNotFoundError(f"Revision '{kw['revision']}' does not exist for dataset {path}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # only the hint reads it: nothing here touches the network
    src = source("org/data", kind="hf", name="mine")
    with pytest.raises(SparknetError) as exc:
        list(iter_documents(src, revision=SHA))
    msg = str(exc.value)
    assert "\n" not in msg and "source 'mine'" in msg and "org/data" in msg
    assert f"revision 'main' at commit {SHA} recorded by its token store" in msg
    assert "fix" in msg and "<lab>/tokens/" in msg and "rebuild it from revision 'main'" in msg


# --------------------------------------------------------------------------------- pydocs


def pydocs(part: str, n: int, start: int = 0) -> list[str]:
    src = SourceConfig(name="py", kind="pydocs", part=part, weight=1.0)
    return list(itertools.islice(iter_documents(src, start=start), n))


def test_pydocs_docstrings_and_code_are_disjoint_views_of_the_stdlib():
    code = pydocs("code", 40)
    doc = pydocs("docstrings", 40)
    assert len(code) == len(doc) == 40
    assert sum(bool(c) for c in code) >= 35 and sum(bool(d) for d in doc) >= 15
    # item i of both parts is the same stdlib file: `docstrings` holds its docstrings, `code` the file without them,
    # so no validation document of one part sits inside a training document of the other.
    for c, d in zip(code, doc, strict=True):
        assert module_docstrings(c) == "" if c else True
        for paragraph in d.split("\n\n"):
            # whole docstrings are gone (a paragraph may still be quoted by some string in the code, rarely)
            assert len(paragraph) < 200 or paragraph not in c
    cut = sum(len(d) for d in doc)
    assert cut > 50_000  # the docstrings cut from the code are real text, not a few stubs
    code_like = [c for c in code if "def " in c]
    prose = [d for d in doc if d]
    assert len(code_like) >= 25
    defs_in_prose = [d for d in prose if any(line.startswith("def ") for line in d.splitlines())]
    assert len(defs_in_prose) <= len(prose) // 5
    # prose: mostly words
    words = " ".join(prose).split()
    assert sum(w.isalpha() for w in words) > 0.5 * len(words)
    assert pydocs("code", 3, start=5) == code[5:8]


def test_code_without_docstrings_cuts_exactly_the_docstrings():
    from sparknet.pydocs import code_without_docstrings

    src = ('''"""The module's docstring, long enough to count."""\n'''
           "import os  # a comment stays\n\n"
           "class A:\n"
           '''    """A class docstring with ünïcode."""\n\n'''
           "    def f(self):  # é before the docstring\n"
           '''        """A function docstring\n        over two lines."""\n'''
           "        return 1\n\n"
           '''def g(): "inline docstring"; return 2\n'''
           "def h():\n"
           '''    """Only a docstring: the body becomes pass."""\n'''
           '''x = "a string that is not a docstring"\n''')
    assert code_without_docstrings(src) == (
        "import os  # a comment stays\n\n"
        "class A:\n\n"
        "    def f(self):  # é before the docstring\n"
        "        return 1\n\n"
        "def g(): return 2\n"
        "def h():\n"
        "    pass\n"
        '''x = "a string that is not a docstring"\n''')
    assert code_without_docstrings("x = 1\n") == "x = 1\n"
    # Line breaks as ast counts them: a form feed (or \x85, \u2028) inside a line must not shift the cut.
    assert code_without_docstrings('x = 1  # a\x0cb\r\ndef f():\n    """A docstring."""\n    return 1\n') == \
        "x = 1  # a\x0cb\r\ndef f():\n    return 1\n"


def test_pydocs_readmes_are_package_descriptions():
    from sparknet.pydocs import distributions

    readmes = pydocs("readmes", 400)
    assert sum(len(r) > 200 for r in readmes) >= 5
    names = [n.lower() for n, _, _ in distributions()]
    assert len(readmes) == len(names)
    optuna_readme = readmes[names.index("optuna")]
    assert "Optuna" in optuna_readme and "hyperparameter" in optuna_readme.lower()
    # Only what sparknet needs to run: a developer tool installed beside it (pytest, ruff) would otherwise
    # change the quickstart's text, and sparknet's own README changes with every commit.
    assert {"torch", "transformers", "mlflow", "numpy", "packaging"} <= set(names)
    assert not {"pytest", "ruff", "pytest-randomly", "hypothesis", "sparknet"} & set(names)


def test_pydocs_identity_differs_per_part():
    import optuna

    idents = {part: source_identity(SourceConfig(name="py", kind="pydocs", part=part, weight=1.0))
              for part in ("docstrings", "readmes", "code")}
    assert len({json.dumps(i, sort_keys=True) for i in idents.values()}) == 3
    assert f"optuna=={optuna.__version__}" in idents["readmes"]["distributions"]
    assert idents["code"]["files"] == idents["docstrings"]["files"] > 100


# --------------------------------------------------------------------------------- bad input


def test_empty_file(tmp_path, write_jsonl):
    write_jsonl("a.jsonl", ["ok"])
    (tmp_path / "b.jsonl").write_bytes(b"")
    msg = user_error(source(tmp_path))
    assert str(tmp_path / "b.jsonl") in msg and "file is empty" in msg and "fix" in msg


def test_non_utf8_names_the_byte(tmp_path):
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("héllo".encode("latin-1"))
    msg = user_error(source(txt))
    assert str(txt) in msg and "byte 1 is not UTF-8" in msg and "fix" in msg

    jl = tmp_path / "latin1.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text":"h\xe9"}\n')
    msg = user_error(source(jl))
    assert str(jl) in msg and "line 2, byte 10" in msg and "not UTF-8" in msg and "fix" in msg


def test_missing_path_and_empty_glob(tmp_path):
    missing = tmp_path / "nope.jsonl"
    msg = user_error(source(missing, name="web"))
    assert str(missing) in msg and "does not exist" in msg and "fix" in msg and "mixture.sources.web.path" in msg

    pattern = str(tmp_path / "*.jsonl")
    msg = user_error(source(pattern, name="web"))
    assert pattern in msg and "no jsonl" in msg and "fix" in msg

    (tmp_path / "empty_dir").mkdir()
    msg = user_error(source(tmp_path / "empty_dir", kind="blog"))
    assert str(tmp_path / "empty_dir") in msg and "fix" in msg


def test_check_source_sizes_text_without_reading_it(tmp_path, write_jsonl):
    a = write_jsonl("d/a.jsonl", ["one", "two"])
    (tmp_path / "d" / "b.txt").write_text("three", encoding="utf-8")
    assert check_source(source(tmp_path / "d")) == (2, a.stat().st_size + 5)
    with gzip.open(tmp_path / "d" / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "four"}\n')
    assert check_source(source(tmp_path / "d")) is None  # compressed: bytes say nothing about the text
    assert check_source(SourceConfig(name="py", kind="pydocs", part="code", weight=1.0)) is None
    assert check_source(source("org/data", kind="hf")) is None  # a hub id: checked against the hub later


def test_check_source_names_what_is_wrong(tmp_path, write_jsonl):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("x,y\n", encoding="utf-8")
    with pytest.raises(SparknetError, match=r"source 'web': no jsonl/.* files match .*csv', it holds only .csv "
                                            r"files \(fix: check mixture.sources.web.path\)"):
        check_source(source(tmp_path / "csv", name="web"))
    (tmp_path / "none").mkdir()
    with pytest.raises(SparknetError, match="it is empty"):
        check_source(source(tmp_path / "none", kind="blog"))
    write_jsonl("e/a.jsonl", ["x"])
    (tmp_path / "e" / "b.jsonl").write_bytes(b"")
    with pytest.raises(SparknetError, match="b.jsonl: file is empty"):
        check_source(source(tmp_path / "e"))
    (tmp_path / "blog").mkdir()
    (tmp_path / "blog" / "p.md").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SparknetError, match="p.md: byte 3 is not UTF-8"):
        check_source(source(tmp_path / "blog", kind="blog"))
    # a dataset folder with a typo is a missing folder, not an unreachable hub
    with pytest.raises(SparknetError, match=r"source 'ds': dataset folder '/nowhere/my/dataset' does not exist"):
        check_source(source("/nowhere/my/dataset", kind="hf", name="ds"))


def test_overlong_jsonl_line(tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_bytes(b'{"text": "' + b"x" * 5000 + b'"}')  # one 5012-byte line, no newline
    msg = user_error(source(p, max_document_bytes=1000))
    assert str(p) in msg and "line 1 is longer than max_document_bytes=1000" in msg and "fix" in msg

    p2 = tmp_path / "long2.jsonl"
    p2.write_bytes(b'{"text": "short"}\n{"text": "' + b"y" * 5000 + b'"}\n')
    it = iter_documents(source(p2, max_document_bytes=1000))
    assert next(it) == "short"
    with pytest.raises(SparknetError, match="line 2 is longer than max_document_bytes=1000"):
        next(it)

    # a line of exactly max_document_bytes (plus its newline) is fine
    line = b'{"text": "' + b"z" * 988 + b'"}'
    assert len(line) == 1000
    p3 = tmp_path / "edge.jsonl"
    p3.write_bytes(line + b"\n" + line)
    assert docs(source(p3, max_document_bytes=1000)) == ["z" * 988] * 2
    assert "line 1 is longer" in user_error(source(p3, max_document_bytes=999))


def test_overlong_line_is_rejected_without_reading_it_into_memory(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "')
        for _ in range(50):
            f.write(b"x" * 100_000)  # 5 MB without a newline
    src = source(p, max_document_bytes=1000)
    tracemalloc.start()
    try:
        with pytest.raises(SparknetError, match="longer than max_document_bytes=1000"):
            docs(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"reading a 5 MB line with a 1000-byte limit allocated {peak} bytes"


def test_oversized_text_file(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("y" * 2000, encoding="utf-8")
    msg = user_error(source(p, max_document_bytes=1000))
    assert str(p) in msg and "2000 bytes is larger than max_document_bytes=1000" in msg and "fix" in msg


def test_invalid_json_line_names_the_line_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": oops}\n', encoding="utf-8")
    msg = user_error(source(p))
    assert str(p) in msg and "line 3: invalid JSON" in msg and "fix" in msg
    assert list(itertools.islice(iter_documents(source(p)), 1)) == ["a"]  # errors come in order, lazily


def test_invalid_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"text": "a"},\n{"text": ]', encoding="utf-8")
    msg = user_error(source(p))
    assert str(p) in msg and "invalid JSON at line 2" in msg and "fix" in msg


def test_missing_and_non_string_text_field(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "b", "id": 2}\n', encoding="utf-8")
    msg = user_error(source(p, name="web"))
    assert str(p) in msg and "line 2: no field 'text' (have: body, id)" in msg
    assert "fix" in msg and "mixture.sources.web.text_field" in msg

    p2 = tmp_path / "n.jsonl"
    p2.write_text('{"text": 5}\n', encoding="utf-8")
    msg = user_error(source(p2))
    assert str(p2) in msg and "line 1: field 'text' is int, not text" in msg and "fix" in msg

    p3 = tmp_path / "l.jsonl"
    p3.write_text('["not", "an object"]\n', encoding="utf-8")
    msg = user_error(source(p3))
    assert str(p3) in msg and "line 1: expected a JSON object, got list" in msg and "fix" in msg

    p4 = tmp_path / "r.json"
    p4.write_text('[{"text": "a"}, {"title": "b"}]', encoding="utf-8")
    msg = user_error(source(p4))
    assert str(p4) in msg and "record 1: no field 'text' (have: title)" in msg and "fix" in msg


def test_unsupported_extension_in_a_glob(tmp_path, write_jsonl):
    write_jsonl("g/a.jsonl", ["a"])
    (tmp_path / "g" / "b.csv").write_text("x,y\n", encoding="utf-8")
    msg = user_error(source(tmp_path / "g" / "*"))
    assert str(tmp_path / "g" / "b.csv") in msg and "unsupported file type" in msg and "fix" in msg and ".jsonl" in msg
    assert docs(source(tmp_path / "g")) == ["a"]  # in a folder, other files are simply not sources


def test_corrupt_gzip_and_parquet(tmp_path):
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b'{"text": "not compressed"}\n')
    msg = user_error(source(fake))
    assert str(fake) in msg and "cannot read line 1" in msg and "Not a gzipped file" in msg and "fix" in msg

    truncated = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(b"".join(b'{"text": "line %d %x"}\n' % (i, i * 2654435761 % 2**32) for i in range(2000)))
    truncated.write_bytes(data[: len(data) // 2])
    msg = user_error(source(truncated))
    assert str(truncated) in msg and "EOFError" in msg and "fix" in msg

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    msg = user_error(source(bad))
    assert str(bad) in msg and "not a readable parquet file" in msg and "fix" in msg


# --------------------------------------------------------------------------------- source_identity


def test_source_identity_tracks_files_not_weight_or_name(tmp_path, write_jsonl):
    p = write_jsonl("d/a.jsonl", ["one", "two"])
    base = source(tmp_path / "d")
    ident = source_identity(base)
    assert ident["kind"] == "local" and [f[0] for f in ident["files"]] == [str(p)]
    assert ident["files"][0][1] == p.stat().st_size

    renamed = SourceConfig(name="other", kind="local", path=str(tmp_path / "d"), weight=7.5)
    assert source_identity(renamed) == ident
    assert source_identity(source(tmp_path / "d", text_field="body")) != ident
    assert source_identity(source(tmp_path / "d", max_document_bytes=1000)) != ident

    write_jsonl("d/a.jsonl", ["one", "two", "three"])  # content and size change
    changed = source_identity(base)
    assert changed != ident and changed["files"][0][1] > ident["files"][0][1]

    st = p.stat()
    p.write_text(p.read_text(encoding="utf-8").replace("three", "THREE"), encoding="utf-8")  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert source_identity(base) != changed

    write_jsonl("d/b.jsonl", ["new file"])
    assert len(source_identity(base)["files"]) == 2


# --------------------------------------------------------------------------------- real text


def test_real_fineweb_edu_sample(shared_data):
    path = shared_data / "web_edu" / "fineweb_edu_sample.jsonl"
    src = source(path, name="web_edu")
    got = docs(src)
    assert len(got) == 150
    assert got[0].startswith("The Independent Jane\nFor all the love, romance and scandal in Jane Austen’s books")
    assert all(d.strip() for d in got)
    with open(path, encoding="utf-8") as f:
        assert got == [json.loads(line)["text"] for line in f]
    assert docs(src, start=149) == [got[149]]
    assert docs(source(shared_data / "web_edu")) == got  # the folder holds just this file
