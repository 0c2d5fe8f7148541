"""sparknet.objective: names and their errors, values from per-source losses and run results, and WikiText-2
validation bits per byte of a final model against the exact figure of a model that knows nothing (uniform logits:
log2(V) bits per token)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sparknet.errors import SparknetError
from sparknet.objective import Objective

SOURCES = ["docs", "code"]


@pytest.mark.parametrize("text, name, metric, kind", [
    ("val", "val", "val/loss", "val"),
    ("val/loss", "val", "val/loss", "val"),
    ("val/code", "val/code", "val/loss/code", "source"),
    ("val/loss/code", "val/code", "val/loss/code", "source"),
    (" wikitext-valid ", "wikitext-valid", "wikitext-valid/bpb", "wikitext-valid"),
])
def test_names_metrics_and_aliases(text, name, metric, kind):
    o = Objective.parse(text, SOURCES)
    assert (o.name, o.metric, o.kind) == (name, metric, kind)
    assert Objective.parse(o.name, SOURCES) == o  # the canonical name parses back to the same objective
    assert o.unit == ("bits/byte" if kind == "wikitext-valid" else "nats/token")
    assert o.intermediate_metric == ("val/loss" if kind == "wikitext-valid" else metric)
    assert o.tuned_on == ("wikitext-2-validation" if kind == "wikitext-valid" else "")


@pytest.mark.parametrize("text, message", [
    ("val/web", "objective 'val/web': the mixture has no source 'web' (fix: use val, val/<source> (docs, code), "
                "wikitext-valid, downstream or downstream/<task>)"),
    ("val/loss/web", "the mixture has no source 'web'"),
    ("wikitext-test", "objective 'wikitext-test': unknown (fix: use val, val/<source> (docs, code), wikitext-valid, "
                      "downstream or downstream/<task>)"),
    ("", "unknown"),
])
def test_unknown_names_are_one_line_errors(text, message):
    with pytest.raises(SparknetError) as e:
        Objective.parse(text, SOURCES)
    assert message in str(e.value) and "\n" not in str(e.value)


class _Slice:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _prepared(val_tokens: dict[str, int]):
    from types import SimpleNamespace

    return SimpleNamespace(stores={k: SimpleNamespace(val=lambda n=n: _Slice(n)) for k, n in val_tokens.items()})


def _cfg(seq_len: int, eval_val_tokens: int):
    from types import SimpleNamespace

    return SimpleNamespace(train=SimpleNamespace(seq_len=seq_len), eval=SimpleNamespace(val_tokens=eval_val_tokens))


@pytest.mark.parametrize("objective, slices, eval_cap, message", [
    ("val/code", {"docs": 10, "code": 65}, 0, None),  # exactly one window of 64 + 1: a loss exists
    ("val/code", {"docs": 10, "code": 64}, 0, "source 'code' has 64 held-out tokens, fewer than one window of "
                                              "train.seq_len + 1 = 65"),
    ("val/docs", {"docs": 1000, "code": 0}, 0, None),  # code's slice is not read by val/docs
    ("val", {"docs": 1000, "code": 0}, 0, "objective val: source 'code' has 0 held-out tokens"),
    ("val", {"docs": 1000, "code": 1000}, 63, "source 'docs' has 1,000 held-out tokens, 64 of them read "
                                              "(eval.val_tokens 63)"),
    ("val", {"docs": 1000, "code": 1000}, 64, None),
    ("wikitext-valid", {"docs": 0, "code": 0}, 0, None),  # scored on WikiText-2, not on the slices
    ("wikitext-valid+pruned", {"docs": 1000, "code": 3}, 0, "source 'code' has 3 held-out tokens"),  # a sweep prunes
])
def test_held_out_slices_too_short_for_the_objective_fail_before_training(objective, slices, eval_cap, message):
    name, _, pruned = objective.partition("+")
    o = Objective.parse(name, SOURCES)
    if message is None:
        o.check_prepared(_prepared(slices), _cfg(64, eval_cap), pruned=bool(pruned))
        return
    with pytest.raises(SparknetError) as e:
        o.check_prepared(_prepared(slices), _cfg(64, eval_cap), pruned=bool(pruned))
    assert message in str(e.value) and "(fix: raise mixture.val_tokens" in str(e.value) and "\n" not in str(e.value)


def test_values_from_losses_and_results():
    losses = {"docs": 2.0, "code": 5.0}
    val, code, wiki = (Objective.parse(t, SOURCES) for t in ("val", "val/code", "wikitext-valid"))
    assert val.value(losses) == 3.5 and val.intermediate(losses) == 3.5  # each source counted once
    assert code.value(losses) == 5.0 and code.intermediate(losses) == 5.0
    assert val.value({"val_loss": losses, "tokens": 8192}) == 3.5  # a run's result dict
    assert wiki.intermediate(losses) == 3.5  # pruning on the mean held-out loss
    assert wiki.value(losses, wikitext_valid_bpb=1.25) == 1.25
    assert wiki.value({"val_loss": losses, "wikitext_valid_bpb": 1.5}) == 1.5
    with pytest.raises(SparknetError, match="not scored on WikiText-2 validation"):
        wiki.value(losses)
    with pytest.raises(SparknetError, match="val/loss: no held-out loss for source 'code'.*mixture.val_tokens"):
        val.value({"docs": 2.0})


def write_valid(folder: Path) -> Path:
    rows = ["", " = Valley = \n", "", " The valley is a wide river valley , north of the city .\n",
            " Its song was first recorded in 1994 – a café tune , « naïve » and short .\n", "",
            " = = History = = \n", "", " The team built the bridge in its first season .\n"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wiki.valid.raw").write_text("\n".join(rows), encoding="utf-8")
    # Never read: the test split is for reporting only (and this one would not even parse).
    (folder / "wiki.test.raw").write_text("one\ntwo\nthree\n", encoding="utf-8")
    return folder


@pytest.fixture
def uniform_run(tmp_path):
    """A finished run whose final model has all-zero weights: equal logits for every id of the GPT-2 vocabulary."""
    import torch

    from sparknet.config import config_from_dict
    from sparknet.model import build_model, export_hf
    from sparknet.run import RunOutcome

    wiki = write_valid(tmp_path / "wikitext")
    cfg = config_from_dict({
        "mixture": {"sources": [{"name": n, "kind": "pydocs", "weight": 1.0} for n in SOURCES]},
        "tokenizer": {"name": "gpt2"}, "model": {"preset": "cpu-tiny", "n_positions": 32},
        "train": {"seq_len": 32, "batch_tokens": 256, "micro_batch_size": 8, "device": "cpu"},
        "eval": {"wikitext_path": str(wiki), "batch_size": 4}, "lab_dir": str(tmp_path / "lab")})
    model = build_model(cfg.model, 50257, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    export_hf(model, tmp_path / "run" / "final")
    return RunOutcome(tmp_path / "run", {"val_loss": {"docs": 2.0, "code": 4.0}}, None), cfg


def test_wikitext_valid_bits_per_byte_of_a_uniform_model_is_exact(uniform_run):
    from sparknet.evaluate import load_wikitext
    from sparknet.tokenizer import TiktokenGPT2

    outcome, cfg = uniform_run
    objective = Objective.parse("wikitext-valid", SOURCES)
    objective.check(cfg)  # the validation split is there
    metrics = objective.measure(outcome, cfg)
    text = "\n\n".join(load_wikitext("validation", cfg.eval.wikitext_path))
    ids = TiktokenGPT2().encode_batch([text])[0]
    num_bytes = len(text.encode("utf-8"))
    assert num_bytes > len(text)  # non-ASCII text: bytes, not characters
    # Every scored token costs ln(50257) nats, so bits per byte = log2(V) x tokens of the text / its bytes.
    assert metrics["wikitext-valid/bpb"] == pytest.approx(math.log2(50257) * len(ids) / num_bytes, rel=1e-6)
    assert metrics["wikitext-valid/loss"] == pytest.approx(math.log(50257), rel=1e-6)
    windows = -(-len(ids) // 32)
    assert metrics["wikitext-valid/tokens"] == len(ids) - windows  # a window's first token has no context
    assert metrics["val/loss"] == 3.0 and metrics["val/loss/code"] == 4.0
    assert objective.final(outcome, cfg) == metrics["wikitext-valid/bpb"]
    assert objective.value(outcome.result, wikitext_valid_bpb=metrics["wikitext-valid/bpb"]) == objective.final(
        outcome, cfg)
    data = objective.data(cfg)
    assert data["rows"] == 9 and not data["canonical"] and data["source"].endswith("wiki.valid.raw")
    # The held-out objectives need nothing beyond the run's own result.
    assert Objective.parse("val/docs", SOURCES).final(outcome, cfg) == 2.0


def test_wikitext_valid_without_the_validation_split_is_a_one_line_error(tmp_path, monkeypatch):
    from sparknet.config import config_from_dict

    monkeypatch.delenv("SPARKNET_WIKITEXT", raising=False)
    (tmp_path / "only-test").mkdir()
    (tmp_path / "only-test" / "wiki.test.raw").write_text("\n = T = \n\n")
    cfg = config_from_dict({"mixture": {"sources": [{"name": "docs", "kind": "pydocs", "weight": 1.0}]},
                            "eval": {"wikitext_path": str(tmp_path / "only-test")}})
    with pytest.raises(SparknetError) as e:
        Objective.parse("wikitext-valid", ["docs"]).check(cfg)
    assert "no WikiText-2 validation file in it" in str(e.value) and "\n" not in str(e.value)
    Objective.parse("val", ["docs"]).check(cfg)  # nothing to load for the held-out slices
