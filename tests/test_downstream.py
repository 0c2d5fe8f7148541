"""Downstream tasks: items and roles, our scorer against lm-evaluation-harness's model wrapper, metrics that catch
planted faults, the end of a run, and bad input. The full-harness comparison (its task configs, its metrics) is
tests/test_downstream_harness.py."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from downstream_data import write_downstream
from tinylab import SHARED_DATA

from sparknet.config.schema import DEFAULT_DOWNSTREAM, DOWNSTREAM_TASKS
from sparknet.downstream.metrics import score_items
from sparknet.downstream.score import ScoringModel, encode_pairs, score_pairs
from sparknet.downstream.tasks import TASKS, check_data, hellaswag_preprocess, load_items, subset
from sparknet.errors import SparknetError

REAL = SHARED_DATA / "downstream"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_downstream(tmp_path_factory.mktemp("downstream") / "data", n=24)


@pytest.fixture(scope="module")
def gpt2():
    from sparknet.tokenizer import TokenizerSpec, from_spec

    return from_spec(TokenizerSpec("gpt2"))


def test_the_config_names_every_task_and_no_other():
    assert set(DOWNSTREAM_TASKS) == set(TASKS) and set(DEFAULT_DOWNSTREAM) <= set(TASKS)


# ------------------------------------------------------------------------------------------- items and roles


@pytest.mark.parametrize("name", sorted(TASKS))
def test_selection_and_report_items_are_disjoint_and_fixed(data, name):
    report, select, full = (load_items(name, role, root=data) for role in ("report", "select", "full"))
    if TASKS[name].halves:
        assert {i.index for i in report}.isdisjoint({i.index for i in select})
        assert sorted(i.index for i in report + select) == [i.index for i in full]
        assert abs(len(report) - len(select)) <= len({i.stratum for i in full})  # half of each stratum
    else:  # two files: select on validation, report (and full) on test
        assert [i.pairs for i in report] == [i.pairs for i in full] != [i.pairs for i in select]
    again = load_items(name, "report", root=data)
    assert [i.pairs for i in again] == [i.pairs for i in report]


def test_subsets_are_stratified_nested_in_order_and_the_same_every_time(data):
    items = load_items("mmlu", "full", root=data, shots=0)  # 3 subjects x 24
    six = subset(items, 6)
    assert [it.stratum for it in six].count("anatomy") == 2 and len({it.stratum for it in six}) == 3
    assert [it.index for it in six] == sorted(it.index for it in six)
    assert [it.index for it in subset(items, 6)] == [it.index for it in six]
    assert {it.index for it in six} <= {it.index for it in subset(items, 30)}  # the smallest hashes of each stratum
    assert subset(items, 10_000) == items


def test_prompts_of_real_items(gpt2):
    if not REAL.is_dir():
        pytest.skip(f"no offline task copies at {REAL}")
    hs = load_items("hellaswag", "full", root=REAL)[0]
    assert hs.pairs[3] == ("Roof shingle removal: A man is sitting on a roof. he", " starts pulling up roofing on a roof.")
    arc = next(it for it in load_items("arc_easy", "full", root=REAL) if len(it.choices) == 5)
    assert len(arc.pairs) == 5 and arc.contexts[0].startswith("Question: ") and arc.contexts[0].endswith("\nAnswer:")
    mmlu = load_items("mmlu", "full", root=REAL, shots=5)[0]
    ctx = mmlu.contexts[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert ctx.count("\nAnswer:") == 6 and mmlu.continuations == (" A", " B", " C", " D")
    lam = load_items("lambada_openai", "full", root=REAL)[0]
    assert lam.continuations == (" signs",) and not lam.contexts[0].endswith(" ")
    assert hellaswag_preprocess("a [title] b  [step] c") == "a.  b  c".replace("  ", " ", 1)


# ------------------------------------------------------------------------------------------- the scorer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt2):
    from sparknet.config import ModelConfig
    from sparknet.model import build_model, export_hf

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="cpu-tiny", n_positions=128), 50257, seed=3)
    with torch.no_grad():  # sharper than at init, so the choices' log-likelihoods differ
        for p in model.parameters():
            p.mul_(3.0)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    export_hf(model, path, gpt2.to_hf(), eos_token_id=gpt2.eot_id)
    return path


@pytest.fixture(scope="module")
def harness_lm(checkpoint):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(checkpoint), dtype="float32", batch_size=1, device="cpu")


@pytest.fixture(scope="module")
def ours(checkpoint):
    from sparknet.downstream.score import hf_scoring_model
    from sparknet.evaluate import load_hf_model

    return hf_scoring_model(*load_hf_model(str(checkpoint)))


@pytest.mark.parametrize("name", ["hellaswag", "winogrande", "lambada_openai", "mmlu", "truthfulqa_mc2", "boolq"])
def test_loglikelihoods_equal_the_harness_model_wrapper(data, harness_lm, ours, name):
    """Every kind (multiple choice, partial scoring, last word, few-shot with left truncation past the 128-token
    context, mc2): the same log-likelihood and greedy flag for every pair as lm-eval's HFLM."""
    from lm_eval.api.instance import Instance

    items = load_items(name, "report", 4 if name == "truthfulqa_mc2" else 8, root=data)
    pairs = [p for it in items for p in it.pairs]
    theirs = harness_lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], disable_tqdm=True)
    mine = score_pairs(ours, pairs, max_batch_tokens=300)  # several batches, several lengths in one batch
    assert max(abs(a[0] - b[0]) for a, b in zip(mine, theirs)) < 1e-4
    assert [a[1] for a in mine] == [b[1] for b in theirs]


def test_pairs_split_as_the_harness_splits_them(gpt2):
    enc = gpt2.encode_batch
    # A trailing space moves to the continuation; an empty context is the prefix token.
    assert encode_pairs([("Question: x\nAnswer: ", "yes")], enc, 0) == [(enc(["Question: x\nAnswer:"])[0],
                                                                       enc([" yes"])[0])]
    assert encode_pairs([("", "hello")], enc, 50256) == [([50256], enc(["hello"])[0])]


# ------------------------------------------------------------------------------------------- planted faults


class _Memorizer:
    """A model that has learned the gold answers by heart: the next token's counts after each whole prefix of
    context + gold continuation; anything else is unlikely."""

    def __init__(self, texts: list[str], encode, vocab: int):
        self.vocab = vocab
        self.table: dict[tuple[int, ...], dict[int, float]] = {}
        for ids in encode(texts):
            for t in range(1, len(ids)):
                self.table.setdefault(tuple(ids[:t]), {}).setdefault(ids[t], 0.0)
                self.table[tuple(ids[:t])][ids[t]] += 1

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.full((*ids.shape, self.vocab), -30.0)
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            for t in range(len(row)):
                for nxt, c in self.table.get(tuple(row[:t + 1]), {}).items():
                    out[b, t, nxt] = math.log(c)
        return out


def test_swapped_gold_labels_and_scrambled_answers_are_caught(data, gpt2):
    items = load_items("arc_easy", "full", root=data) + load_items("arc_easy", "select", root=data)
    items = [it for it in items if len(it.choices) == 4]
    gold_texts = [it.contexts[0] + it.continuations[it.gold] for it in items]
    model = ScoringModel(_Memorizer(gold_texts, gpt2.encode_batch, 50257), gpt2.encode_batch, 50256, 256, 50257)

    def scores(its):
        return score_items("arc_easy", "multiple_choice", its, score_pairs(model, [p for it in its for p in it.pairs]))

    right = scores(items)
    assert right.metrics["acc"] >= 0.9  # it knows the answers
    swapped = scores([replace(it, gold=(it.gold + 1) % 4) for it in items])
    # A choice cannot be both the gold one and the next: the accuracy falls to at most what the model got wrong.
    assert swapped.metrics["acc"] <= 1 - right.metrics["acc"] + 1e-9
    rng = random.Random(0)

    def scrambled(it):
        words = it.continuations[it.gold].split()
        rng.shuffle(words)
        conts = list(it.continuations)
        conts[it.gold] = " " + " ".join(reversed(words)) + " zq"
        return replace(it, continuations=tuple(conts))

    worse = scores([scrambled(it) for it in items])
    assert worse.metrics["bpb"] > right.metrics["bpb"] + 1.0


def test_metrics_of_known_loglikelihoods():
    from sparknet.downstream.metrics import item_scores
    from sparknet.downstream.tasks import Item

    it = Item("t", 0, ("Q:",), (" a", " bbbb"), ("a", "bbbb"), 1)
    s = item_scores(it, "multiple_choice", [(-1.0, False), (-2.0, False)])
    assert s["acc"] == 0.0 and s["acc_norm"] == 1.0  # -1/1 < -2/4
    assert s["bpb"] == pytest.approx(2.0 / math.log(2) / 5)
    mc2 = Item("t", 0, ("Q:",), (" x", " y", " z"), ("x", "y", "z"), 0, labels=(1, 1, 0))
    p = item_scores(mc2, "mc2", [(math.log(0.2), False), (math.log(0.2), False), (math.log(0.6), False)])
    assert p["acc"] == pytest.approx(0.4)
    lam = score_items("lambada_openai", "last_word", [Item("l", i, ("c",), (" w",), ("w",), 0) for i in range(2)],
                      [(-1.0, True), (-3.0, False)])
    assert lam.metrics["acc"] == 0.5 and lam.metrics["perplexity"] == pytest.approx(math.exp(2.0))
    assert lam.stderr["acc"] == pytest.approx(0.5)  # sample sd (n - 1) / sqrt(n), the harness's


# ------------------------------------------------------------------------------------------- bad input


def _copy(data: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(data, tmp_path / "copy"))


def test_bad_task_data_is_one_line_with_the_fix(data, tmp_path):
    with pytest.raises(SparknetError, match=r"unknown downstream task 'helaswag'.*fix: one of hellaswag"):
        check_data(["helaswag"], data)
    copy = _copy(data, tmp_path)
    (copy / "piqa" / "validation.jsonl").unlink()
    with pytest.raises(SparknetError, match=r"piqa/validation.jsonl: downstream task file for piqa is missing"):
        check_data(["piqa"], copy)
    (copy / "boolq" / "validation.jsonl").write_text('{"question": "q"}\n{"broken\n')
    with pytest.raises(SparknetError, match=r"validation.jsonl:2: not a JSON line"):
        load_items("boolq", root=copy)
    (copy / "boolq" / "validation.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(SparknetError, match=r"item 0 of boolq is malformed \(KeyError"):
        load_items("boolq", root=copy)
    with pytest.raises(SparknetError, match=r"6 shots for mmlu, but its pool has 5 items per subject"):
        check_data(["mmlu"], data, shots=6)
    with pytest.raises(SparknetError, match=r"does not exist"):
        check_data(["piqa"], tmp_path / "nowhere")
    # Offline without a copy: a warning (the run trains, the tasks are skipped at its end), not an error.
    assert "will not be scored" in check_data(["piqa"], None)


# ------------------------------------------------------------------------------------------- the end of a run


def test_a_run_ends_with_downstream_figures_in_mlflow_and_its_folder(tmp_path, data, tiny_mixture):
    import mlflow

    from sparknet.config import load_config
    from sparknet.run import execute

    torch.set_num_threads(1)
    tiny_mixture(tmp_path, mixture={"total_tokens": 16384, "val_tokens": 2048})
    cfg = load_config(tmp_path / "tiny.yaml", [f"lab_dir={tmp_path / 'lab'}", "eval.downstream=[arc_easy,lambada_openai]",
                                               "eval.downstream_items=10", f"eval.downstream_path={data}"])
    out = execute(cfg, progress=False)
    figures = json.loads((out.run_dir / "downstream.json").read_text())
    assert [f["task"] for f in figures] == ["arc_easy", "lambada_openai"]
    assert figures[0]["n_items"] == 10 and figures[0]["n_available"] == 24 and figures[0]["role"] == "report"
    assert 0 < figures[0]["metrics"]["bpb"] < 20 and 0 <= figures[0]["metrics"]["acc"] <= 1
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'lab' / 'mlflow.db'}")
    logged = client.get_run(out.mlflow_run_id).data.metrics
    assert logged["downstream/arc_easy/bpb"] == pytest.approx(figures[0]["metrics"]["bpb"])
    assert "downstream/lambada_openai/perplexity" in logged and "downstream/arc_easy/acc_stderr" in logged
    assert "10 of 24 (report)" in (out.run_dir / "downstream.md").read_text()
    # compare: the run's task columns (bpb first, with standard errors) and the published rows beside, never in
    # one cell with a measured figure.
    from sparknet.compare import KIND_REPORTED, KIND_RUN, CompareOptions, compare
    from sparknet.compare.render import to_text

    table = compare(CompareOptions(lab=tmp_path / "lab", baselines=(), log=False, out=tmp_path / "cmp"),
                    log=lambda *a: None).frame
    text = to_text(table)
    assert "downstream tasks, report items: correct-answer bits per byte" in text
    assert f"{figures[0]['metrics']['bpb']:.3f}" in text and "reported, accuracy %: CodeLion gpt-2-70m: mmlu 24.11" in text
    assert "seeded 10-item subsets" in text
    run = table[table["kind"] == KIND_RUN].iloc[0]
    assert run["arc_easy bpb"] == pytest.approx(figures[0]["metrics"]["bpb"])
    assert run["arc_easy bpb ±"] == pytest.approx(figures[0]["stderr"]["bpb"])
    cols = list(table.columns)
    assert cols.index("arc_easy bpb") < cols.index("arc_easy acc_norm") < cols.index("arc_easy acc")
    card = table[(table["kind"] == KIND_REPORTED) & (table["model"] == "CodeLion gpt-2-70m")
                 & table["hellaswag reported %"].notna()].iloc[0]
    assert card["hellaswag reported %"] == 27.03 and card["mmlu reported %"] == 24.11
    assert math.isnan(run["hellaswag reported %"]) and math.isnan(card.get("arc_easy bpb", math.nan))


# ------------------------------------------------------------------------------------------- objectives and effects


def test_downstream_objectives_name_their_metric_and_items():
    from sparknet.objective import Objective

    mean = Objective.parse("downstream", ["a", "b"])
    one = Objective.parse("downstream/piqa", ["a", "b"])
    assert (mean.metric, one.metric) == ("downstream-select/bpb", "downstream-select/piqa/bpb")
    assert Objective.parse(one.name, ["a", "b"]) == one and mean.unit == "bits/byte"
    assert mean.tuned_on == "downstream select items" and mean.intermediate_metric == "val/loss"
    assert one.value({"downstream-select/piqa/bpb": 1.25}) == 1.25
    with pytest.raises(SparknetError, match=r"objective 'downstream/pika'.*unknown downstream task 'pika'"):
        Objective.parse("downstream/pika", ["a"])


def test_effects_table_of_a_leave_one_out_and_of_a_random_design():
    import pandas as pd

    from sparknet.ablate_effects import effects

    class Abl:
        names = ("web", "code")
        design = "leave-one-out"

    runs = pd.DataFrame([
        {"mixture": "base", "weight.web": 0.5, "weight.code": 0.5, "val/loss/web": 3.0, "val/loss/code": 2.0,
         "downstream/piqa/bpb": 1.00},
        {"mixture": "base", "weight.web": 0.5, "weight.code": 0.5, "val/loss/web": 3.2, "val/loss/code": 2.0,
         "downstream/piqa/bpb": 1.10},
        {"mixture": "without web", "weight.web": 0.0, "weight.code": 1.0, "val/loss/web": 4.0, "val/loss/code": 1.8,
         "downstream/piqa/bpb": 1.30},
        {"mixture": "without web", "weight.web": 0.0, "weight.code": 1.0, "val/loss/web": 4.2, "val/loss/code": 1.8,
         "downstream/piqa/bpb": 1.50},
    ])
    got = {(r["source"], r["metric"]): r for r in effects(Abl, runs)}
    web_piqa = got[("web", "piqa bpb")]
    assert web_piqa["effect"] == pytest.approx(1.05 - 1.40)  # web helps piqa: negative
    assert web_piqa["stderr"] == pytest.approx(math.sqrt(0.005 / 2 + 0.02 / 2))
    assert got[("web", "val/web")]["effect"] == pytest.approx(-1.0)
    assert math.isnan(got[("code", "piqa bpb")]["effect"])  # no run without code

    Abl.design = "random:4"
    rng = random.Random(1)
    rows = []
    for _ in range(12):
        w = rng.random()
        rows.append({"mixture": "p", "weight.web": w, "weight.code": 1 - w, "val/loss/web": 4 - 2 * w,
                     "val/loss/code": 2 + w, "downstream/piqa/bpb": 1.5 - 0.5 * w + rng.gauss(0, 0.01)})
    got = {(r["source"], r["metric"]): r for r in effects(Abl, pd.DataFrame(rows))}
    assert got[("web", "val/web")]["effect"] == pytest.approx(-0.2)  # per +0.1 weight
    assert got[("web", "piqa bpb")]["effect"] == pytest.approx(-0.05, abs=0.005)
    assert 0 < got[("web", "piqa bpb")]["stderr"] < 0.005
    assert got[("code", "piqa bpb")]["effect"] == pytest.approx(0.05, abs=0.005)  # code takes web's share


def test_shared_context_rows_score_as_separate_inputs_for_our_model_and_the_exported_one(data, checkpoint, gpt2):
    """Choices of one item share one input row (the context once, each continuation a masked segment): the same
    log-likelihoods as one input per choice, for sparknet's own GPT (the end of a run) and the exported checkpoint."""
    from dataclasses import replace as dc_replace

    from sparknet.config import ModelConfig
    from sparknet.downstream.score import gpt_scoring_model, hf_scoring_model
    from sparknet.hf_models import load_hf_model
    from sparknet.model import load_exported

    pairs = [p for name in ("hellaswag", "truthfulqa_mc2", "mmlu", "winogrande")
             for it in load_items(name, "report", 4, root=data) for p in it.pairs]
    hf = hf_scoring_model(*load_hf_model(str(checkpoint)))
    ours = gpt_scoring_model(load_exported(checkpoint, ModelConfig(preset="cpu-tiny", n_positions=128)).eval(), gpt2)
    assert hf.tree_mask and ours.tree_mask
    separate = score_pairs(dc_replace(hf, tree_mask=False), pairs)
    for model in (hf, ours):
        got = score_pairs(model, pairs, max_batch_tokens=400)
        assert max(abs(a[0] - b[0]) for a, b in zip(got, separate)) < 1e-4
        assert [a[1] for a in got] == [b[1] for b in separate]


def test_rows_hold_a_shared_prefix_once_with_positions_by_depth_within_their_cap():
    from sparknet.downstream.score import _rows

    few_shot = (7, 8, 9, 10)  # the examples every question of a subject opens with
    requests = [(few_shot + (1, 2), [3]), (few_shot + (1, 2), [4]), (few_shot + (5,), [6]), ((11, 12), [13, 14])]
    rows = _rows(requests, max_row_tokens=8, share=True)
    first = next(row for row in rows if 0 in row.preds)
    assert first.tokens == [7, 8, 9, 10, 1, 2, 5] and first.positions == [0, 1, 2, 3, 4, 5, 4]
    assert first.parents == [-1, 0, 1, 2, 3, 4, 3] and first.branched
    assert first.preds[0] == first.preds[1] == [5] and first.preds[2] == [6]  # one input, two one-token answers
    other = next(row for row in rows if 3 in row.preds)
    assert other is not first and other.tokens == [11, 12] and other.preds[3] == [0, 1]  # over the cap: a new row
    assert [len(r.tokens) for r in _rows(requests, max_row_tokens=8, share=False)] == [6, 5, 2]  # no sharing


def test_items_whose_answer_outruns_the_context_are_left_out_and_counted(data, ours):
    """A short-context model meets answers longer than its context (a 256-token model with a 512-token BPE on PIQA's
    long solutions): the harness refuses those, so the item is left out whole, counted, and said; the rest score as
    they would alone. With nothing left, the error names the task and the fix."""
    from sparknet.downstream.evaluation import evaluate_tasks, load_task_items, result_line, table

    (task,) = load_task_items(["piqa"], role="full", root=data)
    # Every third item's solutions get longer (the generated ones are all 5 words).
    task.items = [replace(it, continuations=tuple(c + " then set it aside to cool" for c in it.continuations))
                  if i % 3 == 0 else it for i, it in enumerate(task.items)]
    longest = [max(len(cont) for _, cont in encode_pairs(it.pairs, ours.encode, ours.prefix_token_id))
               for it in task.items]
    k = min(longest)  # a context as long as the shortest item's longest answer
    short = replace(ours, n_positions=k)
    too_long = [it for it, n in zip(task.items, longest) if n > k]
    assert 0 < len(too_long) < len(task.items)
    (r,) = evaluate_tasks(short, ["piqa"], loaded=[task], root=data)
    assert (r.n_too_long, r.n_items, r.context) == (len(too_long), len(task.items) - len(too_long), k)
    kept = [it for it in task.items if it not in too_long]
    alone = score_items("piqa", "multiple_choice", kept, score_pairs(short, [p for it in kept for p in it.pairs]))
    assert r.metrics == pytest.approx(alone.metrics, abs=1e-9)
    assert f"{len(too_long)} more left out: an answer longer than the model's {k}-token context" in result_line(r)
    assert f"{len(too_long)} left out (too long)" in table([r])
    with pytest.raises(SparknetError, match=r"every piqa item .* longer than the model's 1-token context .*fix: drop"):
        evaluate_tasks(replace(ours, n_positions=1), ["piqa"], loaded=[task], root=data)
