"""The downstream tasks: where each one's items come from, and the prompt and choices lm-evaluation-harness gives
each item.

A task's items become `Item`s: the (context, continuation) pairs the harness asks a model to score, the gold
answer, and the choice strings its `acc_norm` divides by. The prompts are those of lm-eval 0.4.x's stock task
configs (`lm_eval/tasks/<task>/*.yaml`), written out here so that a proxy run can score them without building the
harness's task objects; `tests/test_downstream_equality.py` checks every pair against the harness's own requests.

Data: a folder in the layout of the offline copies (`../shared/data/downstream/`, described by its SOURCES.md):
`eval.downstream_path`, else the SPARKNET_DOWNSTREAM environment variable, else the Hugging Face hub through
`datasets` (the harness's stock dataset ids; rows are brought to the local layout).

Items and roles. Selection (a sweep or an ablation choosing by a task) and reporting use disjoint items: a task
with a validation and a test file selects on validation and reports on test (ARC, OpenBookQA); a task with one
file splits it into two fixed halves by a salted hash of each item's position (`select`, `report`), within each
stratum (the gold label; MMLU: the subject). `full` is every item, as the harness and the model cards count them.
A subset of `n` items is the `n` items of a role with the smallest hashes, allocated over the strata in
proportion (largest remainders), so every run of every study sees the same items.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparknet.errors import SparknetError

DOWNSTREAM_ENV = "SPARKNET_DOWNSTREAM"
ROLES = ("report", "select", "full")
SUBSET_SALT = "sparknet-downstream-1"  # changing it changes every subset and half: part of every result's key


HELLASWAG_CAVEAT = ("HellaSwag from the local preprocessed copy (klosax/hellaswag_text_data): brackets already "
                    "stripped, ctx_b not capitalized, so prompts can differ from the harness's hub version in "
                    "capitals and rare whitespace; the difference was not measured (hub unreachable)")

# The six example exchanges TruthfulQA's multiple-choice prompt opens with (the QA prompt of its paper, as the
# harness's truthfulqa_mc1.yaml writes it).
_TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


@dataclass(frozen=True)
class Item:
    """One scored question. `pairs` are what the model scores, in choice order."""

    task: str
    index: int                       # the row's position in its file (its role's file)
    contexts: tuple[str, ...]        # one, or one per choice (partial scoring)
    continuations: tuple[str, ...]   # one per choice, or one shared (partial scoring)
    choices: tuple[str, ...]         # the harness's choice strings: acc_norm divides by their lengths
    gold: int                        # index of the right choice (mc2: of the first true answer)
    labels: tuple[int, ...] = ()     # mc2: 1 for each true answer
    stratum: str = ""                # what subsets and halves stratify by: the gold label (MMLU: the subject)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        if len(self.contexts) > 1:
            return [(c, self.continuations[0]) for c in self.contexts]
        return [(self.contexts[0], c) for c in self.continuations]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # multiple_choice: one context, a continuation per choice; partial: a context per choice, one shared
    # continuation; last_word: the last word as continuation (acc = greedy); mc2: several true answers.
    kind: str
    folder: str
    files: dict[str, str]            # role ("report", "select" or "halves") -> file in the folder
    hub: tuple[str, str | None, dict[str, str]]  # (dataset id, config, role -> split), for online use
    build: Callable[[dict, int, Sequence[dict]], Item]
    shots_default: int = 0
    caveat: str = ""

    @property
    def halves(self) -> bool:
        return "halves" in self.files


# ------------------------------------------------------------------------------------------- prompts per task


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up: strip, " [title]" -> ". ", drop [bracketed] tags, one pass of "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _mc(task: str, index: int, context: str, choices: Sequence[str], gold: int, stratum: str = "") -> Item:
    choices = tuple(choices)
    return Item(task, index, (context,), tuple(" " + c for c in choices), choices, gold,
                stratum=stratum or str(gold))


def _hellaswag(row: dict, i: int, _pool) -> Item:
    query = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx"])
    return _mc("hellaswag", i, query, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _arc(name: str):
    def build(row: dict, i: int, _pool) -> Item:
        labels = list(row["choices"]["label"])
        return _mc(name, i, f"Question: {row['question']}\nAnswer:", row["choices"]["text"],
                   labels.index(row["answerKey"]))
    return build


def _piqa(row: dict, i: int, _pool) -> Item:
    return _mc("piqa", i, f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _winogrande(row: dict, i: int, _pool) -> Item:
    options = tuple(row["context_options"])
    gold = int(row["gold"])
    return Item("winogrande", i, options, (" " + row["continuation"],), options, gold, stratum=str(gold))


def _boolq(row: dict, i: int, _pool) -> Item:
    return _mc("boolq", i, f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"],
               int(row["label"]))


def _openbookqa(row: dict, i: int, _pool) -> Item:
    labels = list(row["choices"]["label"])
    return _mc("openbookqa", i, row["question_stem"], row["choices"]["text"], labels.index(row["answerKey"].lstrip()))


def _lambada(row: dict, i: int, _pool) -> Item:
    words = row["text"].split(" ")
    last = words[-1]
    return Item("lambada_openai", i, (" ".join(words[:-1]),), (" " + last,), (last,), 0, stratum="")


def mmlu_question(row: dict) -> str:
    c = row["choices"]
    return f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _mmlu(row: dict, i: int, shots: Sequence[dict]) -> Item:
    subject = row["subject"]
    described = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = "".join(f"{mmlu_question(s)} {'ABCD'[int(s['answer'])]}\n\n" for s in shots)
    return _mc("mmlu", i, described + examples + mmlu_question(row), ["A", "B", "C", "D"], int(row["answer"]),
               stratum=subject)


def _truthfulqa(name: str, targets: str):
    def build(row: dict, i: int, _pool) -> Item:
        context = f"{_TRUTHFULQA_PRIMER}\n\nQ: {row['question']}\nA:"
        t = row[targets]
        labels = tuple(int(x) for x in t["labels"])
        item = _mc(name, i, context, t["choices"], labels.index(1), stratum="")
        return item if targets == "mc1_targets" else Item(**{**item.__dict__, "labels": labels})
    return build


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("hellaswag", "multiple_choice", "hellaswag", {"halves": "validation.jsonl.gz"},
             ("Rowan/hellaswag", None, {"halves": "validation"}), _hellaswag, caveat=HELLASWAG_CAVEAT),
    TaskSpec("arc_easy", "multiple_choice", "arc_easy", {"report": "test.jsonl", "select": "validation.jsonl"},
             ("allenai/ai2_arc", "ARC-Easy", {"report": "test", "select": "validation"}), _arc("arc_easy")),
    TaskSpec("arc_challenge", "multiple_choice", "arc_challenge",
             {"report": "test.jsonl", "select": "validation.jsonl"},
             ("allenai/ai2_arc", "ARC-Challenge", {"report": "test", "select": "validation"}),
             _arc("arc_challenge")),
    TaskSpec("piqa", "multiple_choice", "piqa", {"halves": "validation.jsonl"},
             ("baber/piqa", None, {"halves": "validation"}), _piqa),
    TaskSpec("winogrande", "partial", "winogrande", {"halves": "dev_llmfoundry_format.jsonl"},
             ("allenai/winogrande", "winogrande_xl", {"halves": "validation"}), _winogrande),
    TaskSpec("boolq", "multiple_choice", "boolq", {"halves": "validation.jsonl"},
             ("aps/super_glue", "boolq", {"halves": "validation"}), _boolq),
    TaskSpec("openbookqa", "multiple_choice", "openbookqa", {"report": "test.jsonl", "select": "validation.jsonl"},
             ("allenai/openbookqa", "main", {"report": "test", "select": "validation"}), _openbookqa),
    TaskSpec("lambada_openai", "last_word", "lambada_openai", {"halves": "lambada_test.jsonl"},
             ("EleutherAI/lambada_openai", "default", {"halves": "test"}), _lambada),
    TaskSpec("mmlu", "multiple_choice", "mmlu", {"halves": "test.jsonl.gz", "pool": "dev.jsonl"},
             ("cais/mmlu", "all", {"halves": "test", "pool": "dev"}), _mmlu, shots_default=5),
    TaskSpec("truthfulqa_mc1", "multiple_choice", "truthfulqa", {"halves": "validation_multiple_choice.jsonl"},
             ("truthfulqa/truthful_qa", "multiple_choice", {"halves": "validation"}),
             _truthfulqa("truthfulqa_mc1", "mc1_targets")),
    TaskSpec("truthfulqa_mc2", "mc2", "truthfulqa", {"halves": "validation_multiple_choice.jsonl"},
             ("truthfulqa/truthful_qa", "multiple_choice", {"halves": "validation"}),
             _truthfulqa("truthfulqa_mc2", "mc2_targets")),
)}


def task_spec(name: str, field: str = "eval.downstream") -> TaskSpec:
    if name not in TASKS:
        raise SparknetError(f"{field}: unknown downstream task {name!r} (fix: one of {', '.join(TASKS)})")
    return TASKS[name]


# ------------------------------------------------------------------------------------------- data


def data_dir(configured: str | os.PathLike[str] | None = None, field: str = "eval.downstream_path") -> Path | None:
    """The local task folder (the argument, else SPARKNET_DOWNSTREAM), or None for the hub."""
    where = configured or os.environ.get(DOWNSTREAM_ENV)
    if not where:
        return None
    path = Path(where).expanduser()
    if not path.is_dir():
        src = field if configured else DOWNSTREAM_ENV
        raise SparknetError(f"{src}: downstream task folder {str(path)!r} does not exist (fix: point it at a folder "
                            f"laid out like shared/data/downstream, with one folder per dataset)")
    return path


def resolve_data(configured: str | os.PathLike[str] | None = None, field: str = "eval.downstream_path") -> Path | None:
    """`data_dir`, refusing the hub when it is offline (one line with the fix, no retries)."""
    from sparknet.hub import hub_offline

    root = data_dir(configured, field)
    if root is None and hub_offline():
        raise SparknetError(f"no local copy of the downstream tasks and the hub is offline (fix: set {DOWNSTREAM_ENV}"
                            f"=DIR or eval.downstream_path to a folder laid out like shared/data/downstream, or go "
                            f"online; eval.downstream=[] scores none)")
    return root


def check_data(names: Sequence[str], configured: str | os.PathLike[str] | None = None, shots: int = 0) -> str:
    """Before any model is loaded: every task known, every file of a local copy present, the few-shot pool large
    enough. Errors are one line with the fix; returns a warning ("" if none) when the tasks will be skipped (no
    local copy, hub offline)."""
    for name in names:
        task_spec(name)
    try:
        root = resolve_data(configured)
    except SparknetError as exc:
        if data_dir(configured) is None:  # offline without a copy: skipped at the end, as WikiText-2 is
            return f"downstream tasks will not be scored: {exc}"
        raise
    if root is None:
        return ""
    for name in names:
        spec = TASKS[name]
        for role, file in spec.files.items():
            if role == "pool" and not shots:
                continue
            path = root / spec.folder / file
            if not path.is_file():
                raise SparknetError(f"{path}: downstream task file for {name} is missing (fix: copy the {spec.folder} "
                                    f"folder there, or drop {name} from eval.downstream)")
        if shots and "pool" in spec.files:
            few_shot_pools(spec, shots, root)
    return ""


def few_shot_pools(spec: TaskSpec, shots: int, root: Path | None) -> dict[str, list[dict]]:
    """The task's few-shot pool by subject (MMLU: its dev rows), checked to hold `shots` examples in each."""
    if "pool" not in spec.files:
        raise SparknetError(f"eval.downstream_shots: {spec.name} has no few-shot pool (fix: 0 shots for {spec.name}; "
                            f"only mmlu takes shots)")
    pools: dict[str, list[dict]] = {}
    for row in role_rows(spec, "pool", root):
        pools.setdefault(row.get("subject", ""), []).append(row)
    smallest = min(len(p) for p in pools.values())
    if shots > smallest:
        raise SparknetError(f"eval.downstream_shots: {shots} shots for {spec.name}, but its pool has {smallest} items "
                            f"per subject (fix: at most {smallest})")
    return pools


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl or .jsonl.gz file; a malformed line is a one-line error naming it."""
    if not path.is_file():
        raise SparknetError(f"{path}: downstream task file is missing (fix: copy the dataset folder there, or set "
                            f"{DOWNSTREAM_ENV} to a folder that has it)")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SparknetError(f"{path}:{n}: not a JSON line ({exc.msg}) (fix: restore the file from its "
                                        f"source; SOURCES.md gives its sha256)") from None
                if not isinstance(row, dict):
                    raise SparknetError(f"{path}:{n}: a JSON line must be an object (fix: restore the file)")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SparknetError(f"{path}: cannot read it ({exc}) (fix: restore the file from its source)") from None
    if not rows:
        raise SparknetError(f"{path}: no items (fix: restore the file from its source)")
    return rows


def hub_rows(spec: TaskSpec, role_file: str) -> list[dict]:
    """Rows of the harness's stock hub dataset, in the local layout (online, or from the datasets cache)."""
    from sparknet.hub import hub_offline

    dataset, config, splits = spec.hub
    try:
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset(dataset, config, split=splits[role_file])]
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
        raise SparknetError(f"downstream task {spec.name}: cannot load {dataset} from the hub ({reason}){offline} "
                            f"(fix: set {DOWNSTREAM_ENV}=DIR or eval.downstream_path to a local copy laid out like "
                            f"shared/data/downstream, or go online once)") from None
    if spec.name == "hellaswag":  # the harness builds its query from ctx_a and a capitalized ctx_b
        rows = [{**r, "ctx": r["ctx_a"] + " " + r["ctx_b"].capitalize()} for r in rows]
    elif spec.name == "winogrande":
        out = []
        for r in rows:
            cut = r["sentence"].index("_")
            out.append({"context_options": [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]],
                        "continuation": r["sentence"][cut + 1:].strip(), "gold": int(r["answer"]) - 1})
        rows = out
    return rows


def file_key(spec: TaskSpec, role: str) -> str:
    """Which of the task's files a role reads (`spec.files` key): the one file split into halves, or for two-file
    tasks the test file (report, and `full`: the split the harness and the model cards report) or the validation
    file (select)."""
    if role not in ROLES:
        raise SparknetError(f"downstream role {role!r} is not one of {', '.join(ROLES)} (fix: use one of them)")
    if spec.halves:
        return "halves"
    return "report" if role == "full" else role


def role_rows(spec: TaskSpec, which: str, root: Path | None) -> list[dict]:
    """The rows of the task's file `which` (a `spec.files` key) from `root`, or from the hub when `root` is None."""
    if root is None:
        return hub_rows(spec, which)
    return read_rows(root / spec.folder / spec.files[which])


def _order_key(task: str, index: int) -> bytes:
    return hashlib.blake2b(f"{task}:{index}".encode(), digest_size=8, key=SUBSET_SALT.encode()).digest()


def _strata(items: Iterable[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        out[it.stratum].append(it)
    for group in out.values():
        group.sort(key=lambda it: _order_key(it.task, it.index))
    return dict(sorted(out.items()))


def _half(items: list[Item], role: str) -> list[Item]:
    """A fixed half of each stratum: `select` takes the first floor(n/2) items by hash, `report` the rest."""
    out = []
    for group in _strata(items).values():
        cut = len(group) // 2
        out += group[:cut] if role == "select" else group[cut:]
    return sorted(out, key=lambda it: it.index)


def subset(items: list[Item], n: int | None) -> list[Item]:
    """`n` items spread over the strata in proportion (largest remainders), the smallest hashes of each; all if
    `n` is None or at least their number. Kept in file order."""
    if n is None or n >= len(items):
        return items
    groups = _strata(items)
    quotas = {k: n * len(g) / len(items) for k, g in groups.items()}
    take = {k: int(q) for k, q in quotas.items()}
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - take[k]), k))[: n - sum(take.values())]:
        take[k] += 1
    chosen = [it for k, g in groups.items() for it in g[: take[k]]]
    return sorted(chosen, key=lambda it: it.index)


def load_items(name: str, role: str = "report", n_items: int | None = None, shots: int | None = None,
               root: Path | None = None) -> list[Item]:
    """The items of task `name` for `role` ("report", "select" or "full"), at most `n_items` of them (a seeded,
    stratified subset), from the folder `root` (None: the hub). `shots`: few-shot examples (MMLU: from the dev
    pool of the item's subject; default the task's own)."""
    spec = task_spec(name)
    key = file_key(spec, role)
    shots = spec.shots_default if shots is None else shots
    pools = few_shot_pools(spec, shots, root) if shots else {}
    items = []
    for i, row in enumerate(role_rows(spec, key, root)):
        try:
            pool = pools.get(row.get("subject", ""), [])[:shots] if shots else []
            items.append(spec.build(row, i, pool))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            where = root / spec.folder if root else spec.hub[0]
            raise SparknetError(f"{where}: item {i} of {name} is malformed ({type(exc).__name__}: {exc}) (fix: restore "
                                f"the file from its source; SOURCES.md gives the expected fields)") from None
    if spec.halves and role != "full":
        items = _half(items, role)
    return subset(items, n_items)
