"""Config: defaults are the CodeLion recipe; every bad input is one line naming file, key and fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparknet.config import ConfigError, field_docs, load_config, parse_tokens
from sparknet.errors import SparknetError

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "mixture": {
        "total_tokens": "10M",
        "sources": [
            {"name": "a", "kind": "hf", "path": "org/a", "weight": 0.5},
            {"name": "b", "kind": "hf", "path": "org/b", "weight": 0.5},
        ],
    }
}


def write(tmp_path: Path, data, name: str = "mix.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, list(overrides))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_the_codelion_recipe():
    cfg = load_config(REPO / "mixtures" / "codelion_502030.yaml")
    m, t = cfg.mixture, cfg.train
    assert m.total_tokens == 1_000_000_000
    assert [(s.name, s.path, s.weight, s.split, s.text_field) for s in m.sources] == [
        ("finepdfs", "codelion/finepdfs-1B", 0.5, "train", "text"),
        ("dclm", "codelion/dclm-baseline-1B", 0.3, "train", "text"),
        ("fineweb_edu", "codelion/fineweb-edu-1B", 0.2, "train", "text"),
    ]
    assert (t.lr, t.min_lr, t.schedule, t.warmup_fraction, t.grad_clip) == (5e-4, 5e-5, "cosine", 0.02, 1.0)
    assert t.batch_tokens == 120 * 1024 and t.micro_batch_size == 24 and t.grad_accum_steps(1) == 5
    assert cfg.model.shape() == (12, 8, 512, 1024)
    assert cfg.tokenizer.name == "gpt2"
    assert cfg.name == "codelion_502030"


@pytest.mark.parametrize("path", sorted((REPO / "mixtures").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_mixture_loads(path):
    cfg = load_config(path)
    assert cfg.mixture.sources


def test_overrides_by_name_index_and_token_suffix(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["train.lr=3e-4", "mixture.sources.b.weight=0.25", "mixture.sources.0.split=validation",
                          "mixture.total_tokens=1.5M", "model.preset=cpu-tiny", "train.seq_len=128"])
    assert cfg.train.lr == 3e-4  # YAML reads 3e-4 as a string; the float field still takes it
    assert cfg.mixture.sources[1].weight == 0.25
    assert cfg.mixture.sources[0].split == "validation"
    assert cfg.mixture.total_tokens == 1_500_000


@pytest.mark.parametrize("text,value", [("1B", 10**9), ("50M", 50 * 10**6), ("250k", 250_000),
                                        ("1_000_000", 10**6), (1e9, 10**9), (4096, 4096)])
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.parametrize("text,value", [("2.01k", 2010), ("4.07M", 4_070_000), ("1.5k", 1500)])
def test_parse_tokens_decimal_fractions_are_exact(text, value):
    # float arithmetic made 2.01 * 1000 = 2009.9999999999998 and rejected it as "not whole"
    assert parse_tokens(text) == value


@pytest.mark.parametrize("text", ["1e999999999", "inf", "nan", "k", ""])
def test_parse_tokens_rejects_absurd_values(text):
    with pytest.raises(ValueError):
        parse_tokens(text)


def test_relative_local_paths_resolve_against_the_yaml_folder(tmp_path):
    data = {"mixture": {"sources": [{"name": "x", "kind": "local", "path": "data/*.jsonl", "weight": 1}]}}
    cfg = load_config(write(tmp_path, data))
    assert cfg.mixture.sources[0].path == str(tmp_path.resolve() / "data" / "*.jsonl")


# One test per failure class, each checking the file, the key and the reason.


def test_unknown_top_level_and_nested_keys(tmp_path):
    msg = error_of(write(tmp_path, {**BASE, "trian": {"lr": 1}}))
    assert "mix.yaml" in msg and "trian: unknown key" in msg and "train" in msg
    bad = {"mixture": {**BASE["mixture"], "sources": [{**BASE["mixture"]["sources"][0], "wieght": 1}]}}
    msg = error_of(write(tmp_path, bad))
    assert "mixture.sources[0].wieght: unknown key" in msg and "weight" in msg


def test_wrong_types(tmp_path):
    msg = error_of(write(tmp_path, {**BASE, "train": {"lr": "fast"}}))
    assert "train.lr: must be a number, got 'fast'" in msg
    msg = error_of(write(tmp_path, {**BASE, "train": {"micro_batch_size": 2.5}}))
    assert "train.micro_batch_size: must be a whole number" in msg
    msg = error_of(write(tmp_path, {**BASE, "mixture": {**BASE["mixture"], "total_tokens": "lots"}}))
    assert "mixture.total_tokens" in msg and "fix:" in msg
    msg = error_of(write(tmp_path, {**BASE, "mixture": {**BASE["mixture"], "sources": {"a": 1}}}))
    assert "mixture.sources: must be a list" in msg
    msg = error_of(write(tmp_path, {**BASE, "train": {"schedule": "exp"}}))
    assert "train.schedule: must be one of 'cosine', 'linear', 'wsd'" in msg


def test_wrong_section_shapes_are_one_line_errors(tmp_path):
    # these used to crash in path resolution (AttributeError / TypeError) before validation
    assert "mixture: must be a mapping, got list" in error_of(write(tmp_path, "mixture: [1]\n"))
    assert "mixture: must be a mapping, got str" in error_of(write(tmp_path, "mixture: foo\n"))
    assert "mixture: must be a mapping, got NoneType" in error_of(write(tmp_path, "mixture: null\n"))
    msg = error_of(write(tmp_path, BASE), ["mixture.sources=3"])
    assert msg.startswith("override 'mixture.sources=3'") and "must be a list" in msg
    assert "train: must be a mapping" in error_of(write(tmp_path, BASE), ["train=3"])


def test_non_finite_floats_and_negative_seed(tmp_path):
    p = write(tmp_path, BASE)
    assert "train.weight_decay: must be a finite number" in error_of(p, ["train.weight_decay=.nan"])
    assert "train.lr: must be a finite number" in error_of(p, ["train.lr=.inf"])
    # a negative seed used to pass here and crash numpy's seeding in the loader
    assert "mixture.seed: must be >= 0" in error_of(p, ["mixture.seed=-1"])


def test_negative_weight(tmp_path):
    data = {"mixture": {"sources": [{"name": "a", "kind": "hf", "path": "x", "weight": -0.1}]}}
    msg = error_of(write(tmp_path, data))
    assert "mixture.sources[0].weight: must be a finite number >= 0, got -0.1" in msg and "fix:" in msg


def test_all_zero_weights(tmp_path):
    srcs = [{"name": n, "kind": "hf", "path": n, "weight": 0} for n in "ab"]
    assert "all weights are zero" in error_of(write(tmp_path, {"mixture": {"sources": srcs}}))
    stages = [{"start_fraction": 0.0, "weights": {"a": 0}}]
    srcs = [{"name": "a", "kind": "hf", "path": "a"}]
    assert "stages[0].weights: are all zero" in error_of(write(tmp_path, {"mixture": {"sources": srcs, "stages": stages}}))


def test_duplicate_source_names(tmp_path):
    srcs = [{"name": "a", "kind": "hf", "path": n, "weight": 1} for n in "xy"]
    msg = error_of(write(tmp_path, {"mixture": {"sources": srcs}}))
    assert "mixture.sources[1].name: duplicate source name 'a'" in msg


# "fineweb.edu": overrides address sources as mixture.sources.NAME.field, so a dotted name could not be overridden.
@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 65, "sp ace", "fineweb.edu"])
def test_names_that_are_not_safe_path_components(tmp_path, name):
    srcs = [{"name": name, "kind": "hf", "path": "x", "weight": 1}]
    msg = error_of(write(tmp_path, {"mixture": {"sources": srcs}}))
    assert "mixture.sources[0].name" in msg


def test_budgets_that_cannot_be_met(tmp_path):
    p = write(tmp_path, BASE)
    assert "mixture.total_tokens: must be > 0" in error_of(p, ["mixture.total_tokens=0"])
    assert "train.seq_len: 4096 exceeds the model's context 1024" in error_of(p, ["train.seq_len=4096", "train.micro_batch_size=6"])
    stages = [{"start_fraction": 0.0, "weights": {"a": 1}}, {"start_fraction": 0.9999, "weights": {"b": 1}}]
    srcs = [{"name": n, "kind": "hf", "path": n} for n in "ab"]
    data = {"mixture": {"total_tokens": 4096, "sources": srcs, "stages": stages},
            "train": {"seq_len": 1024, "batch_tokens": 4096, "micro_batch_size": 4}}
    assert "stages[1].start_fraction" in error_of(write(tmp_path, data))
    # A global batch bigger than the whole budget: not one step. Said at once, with the largest batch that fits,
    # also for a count so large that listing its divisors by walking every integer below it would hang.
    with pytest.raises(SparknetError) as exc:
        load_config(write(tmp_path, BASE), ["train.batch_tokens=1e12", "train.micro_batch_size=10"]).check_trainable()
    big = str(exc.value)
    assert "train.batch_tokens: 1,000,000,000,000 tokens per optimizer step exceed the whole budget" in big
    assert "fix: lower train.batch_tokens to at most" in big and "\n" not in big


def test_starved_source_is_a_budget_error(tmp_path):
    from sparknet.config import load_config as load
    from sparknet.mixture import build_plan

    srcs = [{"name": "big", "kind": "hf", "path": "x", "weight": 0.999},
            {"name": "tiny", "kind": "hf", "path": "y", "weight": 0.001}]
    cfg = load(write(tmp_path, {"mixture": {"total_tokens": 10 * 1024, "sources": srcs}, "train": {"batch_tokens": 2048, "micro_batch_size": 2}}))
    with pytest.raises(SparknetError, match=r"mixture.total_tokens: .* give source\(s\) tiny no sequence"):
        build_plan(cfg.mixture, 1024)


def test_stage_errors(tmp_path):
    srcs = [{"name": n, "kind": "hf", "path": n} for n in "ab"]

    def stage_err(stages, sources=srcs):
        return error_of(write(tmp_path, {"mixture": {"sources": sources, "stages": stages}}))

    assert "stages[0].start_fraction: must be 0" in stage_err([{"start_fraction": 0.2, "weights": {"a": 1}}])
    assert "increasing order" in stage_err([{"start_fraction": 0.0, "weights": {"a": 1}},
                                            {"start_fraction": 0.0, "weights": {"b": 1}}])
    assert "stages[0].weights.c: no source named 'c'" in stage_err([{"start_fraction": 0.0, "weights": {"c": 1}}])
    with_weight = [{**srcs[0], "weight": 1}, srcs[1]]
    assert "both per source and by stages" in stage_err([{"start_fraction": 0.0, "weights": {"a": 1}}], with_weight)


def test_override_errors_name_the_override(tmp_path):
    p = write(tmp_path, BASE)
    msg = error_of(p, ["train.lrr=1"])
    assert msg.startswith("override 'train.lrr=1': train.lrr: unknown key")
    assert "override 'mixture.sources.z.weight=1'" in error_of(p, ["mixture.sources.z.weight=1"])
    assert "expected key.sub=value" in error_of(p, ["train.lr"])
    assert error_of(p, ["mixture.sources.a.weight=-2"]).startswith("override 'mixture.sources.a.weight=-2'")


def test_file_level_errors(tmp_path):
    assert "file not found" in error_of(tmp_path / "nope.yaml")
    assert "invalid YAML" in error_of(write(tmp_path, "mixture: [unclosed"))
    assert "must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    (tmp_path / "latin.yaml").write_bytes(b"name: caf\xe9\n")
    assert "not UTF-8" in error_of(tmp_path / "latin.yaml")


def test_every_field_is_documented():
    docs = field_docs()
    assert "mixture.sources[].weight" in docs and "train.lr" in docs
    assert all(len(d.split("[")[0].strip()) > 5 for d in docs.values()), "a field lacks its doc"


def test_cli_prints_one_line_and_exits_2(tmp_path):
    p = write(tmp_path, {**BASE, "train": {"lr": -1}})
    proc = subprocess.run([sys.executable, "-m", "sparknet.prepare", str(p)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "train.lr: must be > 0" in proc.stderr


# --- the recipe is global: accumulation is derived from train.batch_tokens for any number of processes


def test_accumulation_is_derived_from_the_global_batch_for_any_process_count():
    t = load_config(REPO / "mixtures" / "codelion_502030.yaml").train
    assert t.sequences_per_step == 120
    assert [t.grad_accum_steps(n) for n in (1, 5)] == [5, 1]
    t8 = load_config(REPO / "mixtures" / "codelion_502030.yaml", ["train.micro_batch_size=15"]).train
    assert t8.grad_accum_steps(8) == 1 and t8.grad_accum_steps(1) == 8  # 8 x 15 = 120 sequences either way
    with pytest.raises(SparknetError) as exc:
        t.grad_accum_steps(8)  # 24 x 8 = 192 does not divide 120: a one-line error with the sizes that work
    msg = str(exc.value)
    assert "train.micro_batch_size: 24 sequences x 8 process(es)" in msg and "one of 1, 3, 5, 15" in msg
    with pytest.raises(SparknetError, match=r"cannot be split over 7 processes .*1, 2, 3, 4, 5, 6, 8"):
        t.grad_accum_steps(7)


def test_batch_tokens_must_be_whole_sequences_the_micro_batch_divides(tmp_path):
    msg = error_of(write(tmp_path, {**BASE, "train": {"batch_tokens": 1000, "seq_len": 256}}))
    assert "train.batch_tokens: 1,000 is not a multiple of seq_len 256" in msg and "1024" in msg
    msg = error_of(write(tmp_path, {**BASE, "train": {"batch_tokens": 4096, "seq_len": 256, "micro_batch_size": 5}}))
    assert "train.micro_batch_size: 5 does not divide the 16 sequences" in msg and "1, 2, 4, 8, 16" in msg
    assert load_config(write(tmp_path, BASE), ["train.batch_tokens=60k", "train.seq_len=1000", "train.micro_batch_size=20"]).train.batch_tokens == 60000


def test_the_old_accumulation_key_says_what_replaced_it(tmp_path):
    msg = error_of(write(tmp_path, {**BASE, "train": {"grad_accum_steps": 5}}))
    assert "train.grad_accum_steps: is derived now" in msg and "set train.batch_tokens" in msg


# --- config edges


@pytest.mark.parametrize("text,what", [("", "the spec is empty"), ("# nothing here\n", "the spec is empty"),
                                       ("train:\n  lr: 1e-3\n", "the spec has no `mixture:` section")])
def test_an_empty_spec_or_one_without_a_mixture_is_a_one_line_error(tmp_path, text, what):
    path = write(tmp_path, text)
    msg = error_of(path)
    assert msg.startswith(f"{path}: mixture: {what}") and "mixtures/quickstart.yaml" in msg


def test_a_key_given_twice_is_an_error_naming_the_key_and_lines(tmp_path):
    text = "mixture:\n  total_tokens: 1M\n  sources:\n    - {name: a, kind: hf, path: org/a, weight: 1}\n" \
           "train:\n  lr: 1e-3\n  warmup_fraction: 0.1\n  lr: 3e-4\n"
    msg = error_of(write(tmp_path, text))
    assert "line 8: duplicate key 'lr' (first set on line 6" in msg and "keep one of them" in msg
    # The same key in two different mappings is fine (every source has a name).
    ok = "mixture:\n  sources:\n    - {name: a, kind: hf, path: org/a, weight: 1}\n" \
         "    - {name: b, kind: hf, path: org/b, weight: 1}\n"
    assert [s.name for s in load_config(write(tmp_path, ok, "ok.yaml")).mixture.sources] == ["a", "b"]


def test_wsd_warmup_and_decay_may_not_exceed_the_run(tmp_path):
    msg = error_of(write(tmp_path, {**BASE, "train": {"schedule": "wsd", "warmup_fraction": 0.5,
                                                      "decay_fraction": 0.6}}))
    assert "train.decay_fraction: warmup_fraction 0.5 + decay_fraction 0.6 exceed the whole run" in msg
    assert load_config(write(tmp_path, {**BASE, "train": {"schedule": "wsd", "warmup_fraction": 0.4,
                                                          "decay_fraction": 0.6}})).train.decay_fraction == 0.6


def test_overrides_also_work_after_flags(tmp_path, capsys):
    from sparknet.run import main

    path = write(tmp_path, BASE)
    assert main([str(path), "--dry-run", "train.lr=3e-4", "--processes", "5", "mixture.total_tokens=1M"]) == 0
    out = capsys.readouterr().out
    assert "to 0.0003" in out and "1,000,000 tokens" in out
    assert "processes 5: each 24 sequences x 1 micro-batches" in out


def test_on_and_off_are_words_not_yaml_booleans(tmp_path):
    path = write(tmp_path, {**BASE, "train": {"compile": "on"}})
    assert load_config(path, ["train.compile=off"]).train.compile == "off"  # YAML 1.1 reads off as False
    assert load_config(write(tmp_path, "mixture:\n  sources: [{name: a, kind: hf, path: o/a, weight: 1}]\n"
                                       "train:\n  compile: on\n", "bare.yaml")).train.compile == "on"
