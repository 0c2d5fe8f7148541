"""lm-evaluation-harness as the reference scorer (sparknet.downstream.harness): the harness, run on our items
through the configs we write, asks a model exactly our `Item.pairs`, scores them as its metrics say, and refuses
bad input before loading a model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from downstream_data import SUBJECTS, write_downstream

from sparknet.downstream import harness, tasks
from sparknet.errors import SparknetError

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "downstream"
SHOTS = {"mmlu": 5}
# The metric keys of each task's stock config (boolq, winogrande, truthfulqa and mmlu have acc only).
STOCK_METRICS = {"hellaswag": {"acc", "acc_norm"}, "arc_easy": {"acc", "acc_norm"}, "arc_challenge": {"acc", "acc_norm"},
                 "piqa": {"acc", "acc_norm"}, "openbookqa": {"acc", "acc_norm"}, "boolq": {"acc"},
                 "winogrande": {"acc"}, "truthfulqa_mc1": {"acc"}, "truthfulqa_mc2": {"acc"}, "mmlu": {"acc"},
                 "lambada_openai": {"acc", "perplexity"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 exported as a Hugging Face checkpoint, with biases and norms moved off their init so its
    log-likelihoods differ between choices."""
    from sparknet.config import ModelConfig
    from sparknet.model import build_model, export_hf
    from sparknet.tokenizer import TokenizerSpec, from_spec

    model = build_model(ModelConfig(preset="cpu-tiny", n_positions=256), 50257, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    tok = from_spec(TokenizerSpec("gpt2"))
    return export_hf(model.eval(), tmp_path_factory.mktemp("ckpt") / "final", tok.to_hf(), eos_token_id=tok.eot_id)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_downstream(tmp_path_factory.mktemp("downstream"), n=8)


@pytest.fixture(scope="module")
def scored(checkpoint, data_root, tmp_path_factory, one_torch_thread):
    """Every task's report items, written as harness configs and scored by the harness on the tiny checkpoint."""
    items = {name: tasks.load_items(name, "report", shots=SHOTS.get(name), root=data_root) for name in tasks.TASKS}
    include = harness.write_task_configs(items, tmp_path_factory.mktemp("harness"), data_root, SHOTS, role="report")
    results = harness.run_harness(checkpoint, list(items), include, shots=SHOTS, bootstrap_iters=100)
    return items, results, include


def test_the_harness_asks_exactly_our_pairs(scored):
    items, results, _ = scored
    assert set(results) == set(tasks.TASKS)
    for name, its in items.items():
        samples = results[name].samples
        assert [s.index for s in samples] == [it.index for it in its], name
        for it, s in zip(its, samples, strict=True):
            assert s.arguments == it.pairs, (name, it.index)
            assert len(s.loglikelihoods) == len(s.is_greedy) == len(it.pairs)
    # The few-shot prompt really is 5-shot, from each subject's own dev rows.
    mmlu = results["mmlu"].samples[0].arguments[0][0]
    assert mmlu.count("\nAnswer:") == 6 and mmlu.startswith("The following are multiple choice questions")
    assert {it.stratum for it in items["mmlu"]} == set(SUBJECTS)


def test_the_written_configs_are_the_stock_prompts_over_our_rows(scored, data_root):
    items, _, include = scored
    rows = tasks.read_rows(data_root / "arc_easy" / "test.jsonl")
    written = tasks.read_rows(include / "sparknet_arc_easy.jsonl")
    assert written == [rows[it.index] for it in items["arc_easy"]]  # exactly the raw rows, in item order
    arc = harness._read_yaml(include / "sparknet_arc_easy.yaml")
    assert arc["doc_to_text"] == "Question: {{question}}\nAnswer:" and arc["dataset_path"] == "json"
    assert arc["dataset_kwargs"]["cache_dir"] == str(include / harness.DATASETS_CACHE)
    assert (include / harness.DATASETS_CACHE).is_dir()  # the datasets cache is ours, not ~/.cache
    mmlu = harness._read_yaml(include / "sparknet_mmlu_world_religions.yaml")
    assert mmlu["description"] == "The following are multiple choice questions (with answers) about world religions.\n\n"
    assert mmlu["num_fewshot"] == 5 and mmlu["fewshot_split"] == "dev" and mmlu["fewshot_config"]["sampler"] == "first_n"
    dev = tasks.read_rows(include / "sparknet_mmlu_world_religions.dev.jsonl")
    pool = tasks.read_rows(data_root / "mmlu" / "dev.jsonl")
    assert dev == [r for r in pool if r["subject"] == "world_religions"]
    group = harness._read_yaml(include / "sparknet_mmlu.yaml")
    assert group["task"] == [f"sparknet_mmlu_{s}" for s in SUBJECTS]
    assert group["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]
    lambada = harness._read_yaml(include / "sparknet_lambada_openai.yaml")
    assert lambada["output_type"] == "loglikelihood"


def _norm_argmax(lls, choices) -> int:
    return int(np.argmax(np.array(lls) / np.array([len(c) for c in choices], dtype=float)))


def test_metrics_are_the_harness_formulas_over_the_returned_samples(scored):
    items, results, _ = scored
    for name, its in items.items():
        res = results[name]
        keys = {k for k in res.metrics if "/" not in k and not k.endswith("_stderr")}
        assert keys == STOCK_METRICS[name], name
        lls = [s.loglikelihoods for s in res.samples]
        assert all(ll <= 0 for row in lls for ll in row)
        for key, value in res.metrics.items():
            assert math.isfinite(value) and (value >= 0 if key.endswith("_stderr") else True), (name, key)
        if name == "lambada_openai":
            assert res.metrics["acc"] == pytest.approx(np.mean([s.is_greedy[0] for s in res.samples]))
            assert res.metrics["perplexity"] == pytest.approx(math.exp(-np.mean([row[0] for row in lls])))
            assert res.metrics["perplexity"] > 1
            continue
        assert len({round(ll, 6) for row in lls for ll in row}) > len(its)  # the logits are not flat
        if name == "truthfulqa_mc2":  # the normalized probability mass on the true answers
            mass = [np.exp(row)[np.array(it.labels) == 1].sum() / np.exp(row).sum() for row, it in zip(lls, its)]
            assert res.metrics["acc"] == pytest.approx(np.mean(mass))
            continue
        right = [int(np.argmax(row)) == it.gold for row, it in zip(lls, its, strict=True)]
        assert 0 <= res.metrics["acc"] <= 1
        assert res.metrics["acc"] == pytest.approx(np.mean(right)), name
        assert res.metrics["acc_stderr"] == pytest.approx(np.std(right, ddof=1) / math.sqrt(len(right)))
        if "acc_norm" in res.metrics:
            norm = [_norm_argmax(row, it.choices) == it.gold for row, it in zip(lls, its)]
            assert res.metrics["acc_norm"] == pytest.approx(np.mean(norm)), name
        if name == "mmlu":  # the group is the micro average; each subject its own mean
            for subject in SUBJECTS:
                mine = [r for r, it in zip(right, its) if it.stratum == subject]
                assert res.metrics[f"{subject}/acc"] == pytest.approx(np.mean(mine))


def test_a_loglikelihood_is_the_checkpoints_log_probability_of_the_continuation(scored, checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, results, _ = scored
    sample = results["lambada_openai"].samples[0]
    (context, continuation), = sample.arguments
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    n_context = len(tok(context)["input_ids"])
    ids = torch.tensor([tok(context + continuation)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, n_context:]
    want = logp[torch.arange(n_context - 1, ids.shape[1] - 1), targets]
    assert sample.loglikelihoods[0] == pytest.approx(want.sum().item(), abs=1e-4)
    assert sample.is_greedy[0] == bool((logp[n_context - 1:].argmax(-1) == targets).all())


# ------------------------------------------------------------------------------------------- bad input


def _no_harness(monkeypatch):
    """Fail the test if lm-eval gets as far as evaluating (a bad input must stop before a model loads)."""
    import lm_eval

    def refuse(*args, **kwargs):
        raise AssertionError("lm-eval was called")

    monkeypatch.setattr(lm_eval, "simple_evaluate", refuse)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "(fix:" in text
    return text


def test_a_missing_checkpoint_folder_is_a_one_line_error(tmp_path, monkeypatch):
    _no_harness(monkeypatch)
    with pytest.raises(SparknetError, match="checkpoint folder does not exist") as exc:
        harness.run_harness(tmp_path / "nowhere", ["piqa"], tmp_path, shots=SHOTS)
    assert "nowhere" in _one_line(exc)


def test_a_checkpoint_without_tokenizer_or_config_is_a_one_line_error(tmp_path, checkpoint, monkeypatch):
    _no_harness(monkeypatch)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(checkpoint / name, bare / name)
    with pytest.raises(SparknetError, match="no tokenizer files") as exc:
        harness.run_harness(bare, ["piqa"], tmp_path, shots=SHOTS)
    assert str(bare) in _one_line(exc)
    (bare / "config.json").unlink()
    with pytest.raises(SparknetError, match="not a Hugging Face checkpoint") as exc:
        harness.run_harness(bare, ["piqa"], tmp_path, shots=SHOTS)
    _one_line(exc)


def test_configs_not_written_or_written_for_other_shots_are_errors(tmp_path, checkpoint, data_root, monkeypatch):
    _no_harness(monkeypatch)
    with pytest.raises(SparknetError, match="no harness config for piqa") as exc:
        harness.run_harness(checkpoint, ["piqa"], tmp_path, shots=SHOTS)
    _one_line(exc)
    include = harness.write_task_configs({"mmlu": tasks.load_items("mmlu", shots=5, root=data_root)}, tmp_path,
                                         data_root, SHOTS)
    with pytest.raises(SparknetError, match="written for 5 shots, asked for 2") as exc:
        harness.run_harness(checkpoint, ["mmlu"], include, shots={"mmlu": 2})
    _one_line(exc)


def test_items_of_another_role_or_shot_count_are_errors(tmp_path, data_root):
    select = tasks.load_items("arc_easy", "select", root=data_root)
    with pytest.raises(SparknetError, match="does not rebuild") as exc:  # validation items, read as test rows
        harness.write_task_configs({"arc_easy": select}, tmp_path, data_root, role="report")
    _one_line(exc)
    harness.write_task_configs({"arc_easy": select}, tmp_path, data_root, role="select")  # the right role is fine
    mmlu = tasks.load_items("mmlu", "report", shots=5, root=data_root)
    with pytest.raises(SparknetError, match="does not rebuild"):
        harness.write_task_configs({"mmlu": mmlu}, tmp_path, data_root, {"mmlu": 3})
    with pytest.raises(SparknetError, match="only mmlu takes shots"):
        harness.write_task_configs({"piqa": tasks.load_items("piqa", root=data_root)}, tmp_path, data_root,
                                   {"piqa": 1})
    with pytest.raises(SparknetError, match="unknown downstream task"):
        harness.write_task_configs({"squad": select}, tmp_path, data_root)


# ------------------------------------------------------------------------------------------- the real sets


def _length_lm():
    """A stand-in for a model (an lm_eval LM): each continuation's log-likelihood is minus its length. Enough for
    the harness to build and log every request without running a network."""
    from lm_eval.api.model import LM

    class LengthLM(LM):
        def loglikelihood(self, requests):
            return [(-float(len(r.args[1])), False) for r in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

    return LengthLM()


def test_mmlu_without_shots_and_other_roles_ask_our_pairs(tmp_path, data_root):
    items = {"mmlu": tasks.load_items("mmlu", "select", shots=0, root=data_root),
             "hellaswag": tasks.load_items("hellaswag", "full", root=data_root),
             "openbookqa": tasks.load_items("openbookqa", "select", root=data_root)}  # the validation file
    include = harness.write_task_configs(items, tmp_path, data_root, {"mmlu": 0}, role="select")
    assert not list(tmp_path.glob("*.dev.jsonl"))  # no shots: no few-shot split
    results = harness.run_harness_lm(_length_lm(), list(items), include, shots={"mmlu": 0}, bootstrap_iters=0)
    for name, its in items.items():
        assert [s.arguments for s in results[name].samples] == [it.pairs for it in its], name
    assert results["mmlu"].samples[0].arguments[0][0].count("Answer:") == 1
    assert results["openbookqa"].metrics["acc"] == pytest.approx(np.mean(  # minus the length: the shortest wins
        [int(np.argmin([len(c) for c in it.continuations])) == it.gold for it in items["openbookqa"]]))


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real downstream sets not available: {REAL_DATA} is absent")
def test_on_the_real_sets_the_harness_asks_exactly_our_pairs(tmp_path):
    items = {name: tasks.load_items(name, "report", shots=SHOTS.get(name), root=REAL_DATA)[:20]
             for name in tasks.TASKS}
    include = harness.write_task_configs(items, tmp_path / "harness", REAL_DATA, SHOTS, role="report")
    results = harness.run_harness_lm(_length_lm(), list(items), include, shots=SHOTS, bootstrap_iters=0)
    for name, its in items.items():
        assert [s.index for s in results[name].samples] == [it.index for it in its]
        for it, s in zip(its, results[name].samples, strict=True):
            assert s.arguments == it.pairs, (name, it.index)


def test_our_scorer_gives_the_harness_figures_for_every_task_kind(scored, checkpoint, data_root):
    """The equality the issue asks for: on the same checkpoint and items, our batched scorer's acc, acc_norm,
    perplexity and mc2 equal the harness's own aggregates, and our correct-answer bpb equals the bpb of the
    harness's log-likelihoods, to 1e-4 (multiple choice, partial scoring, last word, few-shot, mc2)."""
    from sparknet.downstream.evaluation import evaluate_tasks
    from sparknet.downstream.score import bits_per_byte, hf_scoring_model
    from sparknet.hf_models import load_hf_model

    items, results, _ = scored
    ours = {r.task: r for r in evaluate_tasks(hf_scoring_model(*load_hf_model(str(checkpoint))), list(items),
                                              shots=SHOTS.get("mmlu"), root=data_root, max_batch_tokens=200)}
    for name, its in items.items():
        theirs = results[name]
        for metric in STOCK_METRICS[name]:
            assert ours[name].metrics[metric] == pytest.approx(theirs.metrics[metric], abs=1e-4), (name, metric)
        kind = tasks.TASKS[name].kind
        gold_bpb = []
        for it, s in zip(its, theirs.samples, strict=True):
            text = it.continuations[0] if kind == "partial" else it.continuations[it.gold]
            gold_bpb.append(bits_per_byte(s.loglikelihoods[it.gold], text))
        assert ours[name].metrics["bpb"] == pytest.approx(float(np.mean(gold_bpb)), abs=1e-4), name
        assert ours[name].n_items == len(its)
