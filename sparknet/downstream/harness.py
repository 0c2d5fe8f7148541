"""EleutherAI's lm-evaluation-harness as the reference scorer (and, where wanted, the engine) for our downstream
items.

Our own scorer (`tasks` + `score`) asks a model for the (context, continuation) pairs that `tasks.Item.pairs`
writes out. This module lets the harness itself score exactly the same items, so that its requests and numbers can
be compared with ours, item by item:

* `write_task_configs` materializes the items of each task as a JSONL of their raw rows (in item order) and writes,
  beside it, a task YAML `sparknet_<task>` for lm-eval's `TaskManager(include_path=...)`. Every prompt field
  (`doc_to_text`, `doc_to_target`, `doc_to_choice`, delimiters, `metric_list`, description) is read from the stock
  config of the installed harness (`lm_eval/tasks/...`), not written again here; only what reads the data changes:
  `dataset_path: json` over the local JSONL, with the datasets cache inside the output folder (nothing goes to
  ~/.cache). What each YAML reproduces:
  - hellaswag: stock `hellaswag.yaml`, with a `process_docs` hook (in a small module written beside the YAMLs) that
    applies the harness's own `preprocess` to `activity_label + ": " + ctx`, since the local copy has `ctx`, not
    ctx_a/ctx_b (so the reference shares the local copy's caveat, `tasks.HELLASWAG_CAVEAT`);
  - arc_easy, arc_challenge, piqa, boolq, openbookqa, truthfulqa_mc1: the stock configs as they are;
  - winogrande: the stock multiple-input task (one context per option, one shared continuation), over the
    llm-foundry layout: `doc_to_text` is the gold index, `doc_to_choice` the context options, `doc_to_target` the
    continuation;
  - truthfulqa_mc2: the stock config, scored by the harness's own `process_results_mc2` (through the hook module);
  - lambada_openai: the stock `output_type: loglikelihood` task (perplexity, and acc = the last word is greedy);
  - mmlu: one stock-template task per subject present (`sparknet_mmlu_<subject>`, the stock description, few-shot
    examples by `first_n` from a per-subject dev JSONL taken from the pool file in file order), and a group
    `sparknet_mmlu` whose acc is weighted by size (the micro average over items, as the stock `mmlu` group).
  A manifest per task (`sparknet_<task>.items.json`) records where each item went, and its shots.
* `run_harness` runs `lm_eval.simple_evaluate` on a Hugging Face checkpoint over those configs and returns, per
  task, the harness's metrics and its per-item requests and log-likelihoods, back in item order
  (`run_harness_lm`: the same with any lm-eval model, e.g. one already loaded).

Why these choices: reading the prompt fields from the installed stock configs keeps the reference honest (a
harness upgrade that changes a prompt shows up as a request mismatch, not as a silently stale copy); materializing
exactly our items (rather than `limit=`) makes the harness score the same subset and halves we do; the JSON
builder needs no network and no dataset scripts. Each row is checked to rebuild its item, so items passed with the
wrong role, folder or shots fail loudly instead of scoring other questions. Only our folder is indexed (the stock
task folder takes ~15 s to scan). The hub path (`root=None`) uses `tasks.hub_rows`, which brings hub rows to the
local layout, so the same YAMLs serve both. A missing or incomplete checkpoint (no config/weights, no tokenizer) is
a one-line SparknetError before lm-eval loads anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparknet.downstream import tasks
from sparknet.downstream.tasks import Item
from sparknet.errors import SparknetError

PREFIX = "sparknet_"
MMLU_GROUP = PREFIX + "mmlu"
HOOKS_MODULE = "sparknet_harness_hooks"
DATASETS_CACHE = "hf-datasets-cache"

# Where each task's stock config lives under lm_eval/tasks/.
STOCK_CONFIGS = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "mmlu": "mmlu/default/_default_template_yaml",
    "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
    "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
}
# The stock keys that define prompts and scoring; everything else (dataset, splits, tags, decontamination) is ours.
_PROMPT_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
                "fewshot_delimiter", "fewshot_config", "description", "process_docs", "process_results",
                "metric_list", "metadata")
# The stock hooks replaced by ours, because the local rows differ from the hub's (or the function lives in the
# stock task folder, which our YAMLs are not in).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "hellaswag": {"process_docs": f"{HOOKS_MODULE}.hellaswag_docs"},
    "winogrande": {"doc_to_text": "gold", "doc_to_choice": "context_options", "doc_to_target": "continuation"},
    "truthfulqa_mc2": {"process_results": f"{HOOKS_MODULE}.process_results_mc2"},
}
_FUNCTION_KEYS = ("process_docs", "process_results")  # override values that are `!function` references

_HOOKS_SOURCE = '''"""The hooks the sparknet_* task configs beside this file name with !function. Written by
sparknet.downstream.harness (rewritten on every call: do not edit). Each delegates to the harness's own code."""


def _hellaswag_doc(row):
    from lm_eval.tasks.hellaswag.utils import preprocess

    # The stock query is preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()); the local copy
    # keeps that context joined, as `ctx`.
    return {"query": preprocess(row["activity_label"] + ": " + row["ctx"]),
            "choices": [preprocess(ending) for ending in row["endings"]],
            "gold": int(row["label"])}


def hellaswag_docs(dataset):
    return dataset.map(_hellaswag_doc)


def process_results_mc2(doc, results):
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2 as stock

    return stock(doc, results)
'''


@dataclass(frozen=True)
class HarnessSample:
    """One item as the harness scored it: its requests (context, continuation), and per request the log-likelihood
    and whether the continuation is the greedy one."""

    index: int                                   # the item's `index` (its row in the role's file)
    arguments: list[tuple[str, str]]
    loglikelihoods: list[float]
    is_greedy: list[bool]


@dataclass(frozen=True)
class HarnessTask:
    """The harness's result on one of our tasks: `metrics` ("acc", "acc_stderr", "acc_norm", "perplexity", ...;
    mmlu: the group's micro average, and "<subject>/acc" etc. per subject) and `samples` in item order."""

    task: str
    metrics: dict[str, float]
    samples: list[HarnessSample] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- stock configs


class _FunctionRef(str):
    """A `!function` reference, read from a stock YAML or written into ours."""


class _Loader(yaml.SafeLoader):
    """A safe loader that also reads `!function` tags (as `_FunctionRef`s, never importing anything)."""


class _Dumper(yaml.SafeDumper):
    """A safe dumper that writes `_FunctionRef`s as `!function` tags."""


_Loader.add_constructor("!function", lambda loader, node: _FunctionRef(loader.construct_scalar(node)))
_Dumper.add_representer(_FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval
    except ImportError:
        raise SparknetError("lm-eval is not installed (fix: pip install -e . in this checkout; pyproject.toml pins "
                            "lm-eval>=0.4.13,<0.5)") from None
    return Path(lm_eval.__file__).resolve().parent / "tasks"


def _read_yaml(path: Path) -> dict:
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader
    includes = cfg.pop("include", None) or []
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        merged.update(_read_yaml(path.parent / inc))
    return merged | cfg


def stock_config(name: str) -> dict:
    """The prompt and scoring keys of task `name`'s stock config in the installed harness."""
    path = _lm_eval_tasks_dir() / STOCK_CONFIGS[name]
    if not path.is_file():
        raise SparknetError(f"lm-eval: stock config {path} is missing (fix: install lm-eval>=0.4.13,<0.5 as "
                            f"pyproject.toml pins it)")
    cfg = {k: v for k, v in _read_yaml(path).items() if k in _PROMPT_KEYS}
    for key, value in _OVERRIDES.get(name, {}).items():
        cfg[key] = _FunctionRef(value) if key in _FUNCTION_KEYS else value
    stale = [k for k, v in cfg.items() if isinstance(v, _FunctionRef) and not v.startswith(HOOKS_MODULE + ".")]
    if stale:  # a harness version whose stock config calls a hook we do not reproduce over the local rows
        raise SparknetError(f"lm-eval: {path} uses hooks {', '.join(f'{k}={cfg[k]}' for k in stale)} that "
                            f"sparknet's harness configs do not reproduce (fix: install lm-eval>=0.4.13,<0.5 as "
                            f"pyproject.toml pins it)")
    return cfg


def _mmlu_description(subject: str) -> str:
    stock = _lm_eval_tasks_dir() / "mmlu" / "default" / f"mmlu_{subject}.yaml"
    if stock.is_file():
        description = _read_yaml(stock).get("description")
        if isinstance(description, str):
            return description
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


# ------------------------------------------------------------------------------------------- items -> rows


def item_rows(name: str, items: Sequence[Item], role: str, root: Path | None, shots: int = 0,
              pools: Mapping[str, Sequence[dict]] | None = None) -> list[dict]:
    """The raw rows `items` (of task `name`, loaded for `role` from `root`; `pools`: the few-shot rows by subject,
    `tasks.few_shot_pools`) were built from, in item order. Each row is checked to rebuild its item, so items of
    another role, folder or shot count are an error, not a silent mismatch."""
    spec = tasks.task_spec(name)
    key = tasks.file_key(spec, role)
    rows = tasks.role_rows(spec, key, root)
    where = root / spec.folder / spec.files[key] if root is not None else f"{spec.hub[0]} ({spec.hub[2][key]})"
    pools = pools or {}
    out = []
    for it in items:
        if it.task != name or not 0 <= it.index < len(rows):
            raise SparknetError(f"{where}: item {it.index} of {it.task} is not a row of {name}'s {role} file "
                                f"({len(rows)} rows) (fix: pass the items of {name} with the role they were loaded "
                                f"for)")
        row = rows[it.index]
        rebuilt = spec.build(row, it.index, pools.get(row.get("subject", ""), [])[:shots] if shots else [])
        if rebuilt.pairs != it.pairs:
            raise SparknetError(f"{where}: row {it.index} does not rebuild item {it.index} of {name} (fix: pass the "
                                f"role, data folder and shots the items were loaded with)")
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------- writing configs


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path.resolve()


def _write_yaml(path: Path, cfg: dict) -> None:
    header = "# written by sparknet.downstream.harness.write_task_configs; rewritten on every call\n"
    path.write_text(header + yaml.dump(cfg, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=1000),
                    encoding="utf-8")


def _task_cfg(task: str, stock: dict, data_files: dict[str, str], out_dir: Path, num_fewshot: int) -> dict:
    return {"task": task, "dataset_path": "json",
            "dataset_kwargs": {"data_files": data_files, "cache_dir": str((out_dir / DATASETS_CACHE).resolve())},
            "test_split": "test", **stock, "num_fewshot": num_fewshot}


def _shots_for(name: str, shots: Mapping[str, int] | None) -> int:
    spec = tasks.task_spec(name)
    n = spec.shots_default if not shots or name not in shots else int(shots[name])
    if n < 0:
        raise SparknetError(f"eval.downstream_shots: {n} shots for {name} (fix: 0 or more)")
    return n


def _manifest_path(include_path: Path, name: str) -> Path:
    return Path(include_path) / f"{PREFIX}{name}.items.json"


def write_task_configs(items_by_task: Mapping[str, Sequence[Item]], out_dir: Path, root: Path | None,
                       shots: Mapping[str, int] | None = None, *, role: str = "report") -> Path:
    """Write into `out_dir` (an include_path for lm-eval's TaskManager) a JSONL of each task's items' raw rows and a
    task YAML `sparknet_<task>` reading it (mmlu: one task per subject present and the group `sparknet_mmlu`).
    `root`: the data folder the items were loaded from (None: the hub); `role`: the role they were loaded for;
    `shots`: few-shot examples per task (mmlu; default the task's own). Beside them, `sparknet_<task>.items.json`
    records where each item went (harness task, position), in item order, for `run_harness`. Returns `out_dir`."""
    if not items_by_task:
        raise SparknetError("harness: no tasks to write (fix: give at least one task's items)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / DATASETS_CACHE, ignore_errors=True)  # rows are rewritten: never reuse a stale cache
    (out_dir / f"{HOOKS_MODULE}.py").write_text(_HOOKS_SOURCE, encoding="utf-8")
    for name, items in items_by_task.items():
        spec = tasks.task_spec(name)
        if not items:
            raise SparknetError(f"harness: no items for {name} (fix: drop {name} or give it items)")
        n_shots = _shots_for(name, shots)
        pools = tasks.few_shot_pools(spec, n_shots, root) if n_shots else {}
        rows = item_rows(name, items, role, root, n_shots, pools)
        stock = stock_config(name)
        if name != "mmlu":
            data = _write_jsonl(out_dir / f"{PREFIX}{name}.jsonl", rows)
            _write_yaml(out_dir / f"{PREFIX}{name}.yaml", _task_cfg(PREFIX + name, stock, {"test": str(data)},
                                                                      out_dir, n_shots))
            placed = [(PREFIX + name, pos) for pos in range(len(rows))]
        else:
            placed = _write_mmlu(out_dir, stock, rows, pools, n_shots)
        manifest = {"task": name, "role": role, "shots": n_shots,
                    "items": [[task, pos, it.index] for (task, pos), it in zip(placed, items, strict=True)]}
        _manifest_path(out_dir, name).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
    return out_dir


def _write_mmlu(out_dir: Path, stock: dict, rows: Sequence[dict], pools: Mapping[str, Sequence[dict]],
                n_shots: int) -> list[tuple[str, int]]:
    """One task per subject present, over that subject's rows (in item order) with its dev rows (`pools`, in file
    order) as the few-shot split, and the group; returns each row's (task, position) in order."""
    by_subject: dict[str, list[dict]] = {}
    placed = []
    for row in rows:
        subject_rows = by_subject.setdefault(row["subject"], [])
        placed.append((f"{MMLU_GROUP}_{row['subject']}", len(subject_rows)))
        subject_rows.append(row)
    subtasks = []
    for subject in sorted(by_subject):
        dev = list(pools.get(subject, []))
        if len(dev) < n_shots:
            raise SparknetError(f"eval.downstream_shots: {n_shots} shots for mmlu, but its pool has {len(dev)} "
                                f"items for {subject} (fix: at most {len(dev)})")
        task = f"{MMLU_GROUP}_{subject}"
        files = {"test": str(_write_jsonl(out_dir / f"{task}.jsonl", by_subject[subject]))}
        if dev:  # with shots: the subject's dev rows, of which the stock `first_n` sampler takes the first
            files["dev"] = str(_write_jsonl(out_dir / f"{task}.dev.jsonl", dev))
        cfg = _task_cfg(task, stock | {"description": _mmlu_description(subject)}, files, out_dir, n_shots)
        cfg["fewshot_config"] = {**(stock.get("fewshot_config") or {}), "sampler": "first_n"}
        if dev:
            cfg["fewshot_split"] = "dev"
        _write_yaml(out_dir / f"{task}.yaml", cfg)
        subtasks.append(task)
    _write_yaml(out_dir / f"{MMLU_GROUP}.yaml", {
        "group": MMLU_GROUP, "task": subtasks,
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1}})
    return placed


# ------------------------------------------------------------------------------------------- running


_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def check_checkpoint(model_dir: Path) -> Path:
    """A Hugging Face checkpoint folder the harness's `hf` model can load, or a one-line SparknetError."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise SparknetError(f"{model_dir}: checkpoint folder does not exist (fix: point it at a run's final/ folder "
                            f"or a checkpoints/step-N folder)")
    if not (model_dir / "config.json").is_file() or not any((model_dir / w).is_file() for w in _WEIGHT_FILES):
        raise SparknetError(f"{model_dir}: not a Hugging Face checkpoint (no config.json and model.safetensors) "
                            f"(fix: point it at a run's final/ folder, which sparknet exports in that format)")
    if not any(all((model_dir / f).is_file() for f in group) for group in _TOKENIZER_FILES):
        raise SparknetError(f"{model_dir}: checkpoint has no tokenizer files (tokenizer.json, or vocab.json and "
                            f"merges.txt) (fix: save the tokenizer into it, e.g. export_hf(model, dir, "
                            f"tokenizer.to_hf()), or use the run's final/ folder)")
    return model_dir.resolve()


def _harness_name(name: str) -> str:
    return MMLU_GROUP if name == "mmlu" else PREFIX + name


def _read_manifest(include_path: Path, name: str, shots: Mapping[str, int] | None) -> dict:
    """The items written for task `name` (see write_task_configs), checked to be there with the wanted shots."""
    tasks.task_spec(name)
    path = _manifest_path(include_path, name)
    config = include_path / f"{_harness_name(name)}.yaml"
    if not path.is_file() or not config.is_file():
        raise SparknetError(f"{config}: no harness config for {name} (fix: write_task_configs with {name}'s items "
                            f"into {include_path} first)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if shots is not None and manifest["shots"] != (want := _shots_for(name, shots)):
        raise SparknetError(f"{config}: written for {manifest['shots']} shots, asked for {want} (fix: "
                            f"write_task_configs again with shots={{{name!r}: {want}}})")
    return manifest


@contextlib.contextmanager
def _harness_call() -> Iterator[None]:
    """Around a harness call: HF_DATASETS_OFFLINE=1 (in the environment, and in `datasets`' constant if it was
    imported, since it reads the variable once, at import), and the caller's random states as they were
    (simple_evaluate seeds python's, numpy's and torch's generators globally; the CPU ones are restored)."""
    import random

    import numpy as np
    import torch

    before = os.environ.get("HF_DATASETS_OFFLINE")
    config = sys.modules.get("datasets.config")
    flag = getattr(config, "HF_DATASETS_OFFLINE", None)
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if config is not None:
        config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = before
        if config is not None:
            config.HF_DATASETS_OFFLINE = flag
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _metrics(entry: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"acc,none": .., "acc_stderr,none": ..} -> {"acc": .., "acc_stderr": ..}; "N/A" stderrs are left out."""
    out = {}
    for key, value in entry.items():
        metric, _, filt = key.partition(",")
        if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + metric] = float(value)
    return out


def _sample(logged: Mapping[str, Any], index: int) -> HarnessSample:
    resps = logged["filtered_resps"]
    return HarnessSample(index=index, arguments=[(str(a[0]), str(a[1])) for a in logged["arguments"]],
                         loglikelihoods=[float(r[0]) for r in resps], is_greedy=[bool(r[1]) for r in resps])


def run_harness(model_dir: Path, task_names: Sequence[str], include_path: Path, *, batch_size: int = 1,
                device: str = "cpu", shots: Mapping[str, int] | None = None,
                bootstrap_iters: int = 100_000) -> dict[str, HarnessTask]:
    """Score the tasks written by `write_task_configs` into `include_path` with lm-eval's `hf` model on the
    checkpoint `model_dir` (float32). `shots`: checked against what was written (None: as written).
    `bootstrap_iters`: the harness's own default; it only sets perplexity's stderr (acc's is closed-form). Returns
    our task name -> HarnessTask, with the samples in the items' order."""
    model_dir = check_checkpoint(model_dir)
    return run_harness_lm("hf", task_names, include_path, model_args={"pretrained": str(model_dir), "dtype":
                          "float32"}, batch_size=batch_size, device=device, shots=shots,
                          bootstrap_iters=bootstrap_iters)


def run_harness_lm(lm: Any, task_names: Sequence[str], include_path: Path, *, model_args: dict | None = None,
                   batch_size: int = 1, device: str = "cpu", shots: Mapping[str, int] | None = None,
                   bootstrap_iters: int = 100_000) -> dict[str, HarnessTask]:
    """`run_harness` with any model lm-eval takes: a registered name and its `model_args`, or an `lm_eval` LM
    object (a model already loaded, or a stub that only answers requests)."""
    if not task_names:
        raise SparknetError("harness: no tasks to run (fix: name at least one task)")
    include_path = Path(include_path).expanduser().resolve()
    manifests = {name: _read_manifest(include_path, name, shots) for name in task_names}
    with _harness_call():
        import lm_eval
        from lm_eval.tasks import TaskManager

        # Only our folder is indexed: scanning the stock task folder takes ~15 s, and our configs include none.
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        results = lm_eval.simple_evaluate(
            model=lm, model_args=model_args, tasks=[_harness_name(n) for n in task_names], task_manager=manager,
            log_samples=True, batch_size=batch_size, device=device, bootstrap_iters=bootstrap_iters)
    logged = {task: {s["doc_id"]: s for s in samples} for task, samples in results["samples"].items()}
    out: dict[str, HarnessTask] = {}
    for name in task_names:
        metrics = _metrics(results["results"][_harness_name(name)])
        if name == "mmlu":
            for task in sorted({task for task, _, _ in manifests[name]["items"]}):
                metrics |= _metrics(results["results"][task], prefix=task.removeprefix(MMLU_GROUP + "_") + "/")
        samples = [_sample(logged[task][pos], index) for task, pos, index in manifests[name]["items"]]
        out[name] = HarnessTask(name, metrics, samples)
    return out
