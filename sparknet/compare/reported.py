"""Figures others published (DESIGN.md, "Reference facts") as data, each with who published it and the protocol it
was measured under, and the table rows they make. Only what is written there: nothing derived from it, never
recomputed and never mixed with the measured rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sparknet.compare.table import KIND_REPORTED, Row
from sparknet.evaluate import PROTOCOL_BLOG


@dataclass(frozen=True)
class Reported:
    """One published row: per protocol (loss or None when only a perplexity was published, perplexity). Every
    published row here was measured with GPT-2's tokenizer."""

    model: str
    who: str
    figures: tuple[tuple[str, float | None, float], ...]
    params: float | None = None
    tokens: float | None = None
    mixture: str = ""
    wall_h: float | None = None
    approximate: bool = False
    note: str = ""


REPORTED: tuple[Reported, ...] = (
    Reported("GPT-2 (openai-community/gpt2)", "SparkNet", ((PROTOCOL_BLOG, 3.9407, 51.45),),
             note="SparkNet's published WikiText-2 table"),
    Reported("CodeLion gpt-2-70m", "SparkNet", ((PROTOCOL_BLOG, 5.0129, 150.35),), params=64.09e6, tokens=1e9,
             mixture="finepdfs 50% + dclm 30% + fineweb-edu 20%", wall_h=8.0,
             note="loss/ppl: SparkNet's published table; params, tokens, mixture and ~8 h on one A100: CodeLion's "
                  "model card"),
    Reported("SparkNet v1", "SparkNet", ((PROTOCOL_BLOG, 10.5697, 38937.0),),
             note="SparkNet's published WikiText-2 table"),
    Reported("GPT-2 small", "Hugging Face docs", (("hf-strided-512", None, 25.0), ("hf-strided-1024", None, 30.0)),
             approximate=True,
             note="approximate (≈) perplexities from the docs' 'Perplexity of fixed-length models'; no loss given"),
)


def reported_rows(protocols: Sequence[str]) -> list[Row]:
    """The published rows that have a figure under at least one of `protocols`."""
    rows = []
    for rep in REPORTED:
        figures = {p: (loss, ppl) for p, loss, ppl in rep.figures if p in protocols}
        if not figures:
            continue
        row = Row(KIND_REPORTED, f"reported ({rep.who})", rep.model, params=rep.params, tokens=rep.tokens,
                  mixture=rep.mixture, wall_s=rep.wall_h * 3600 if rep.wall_h is not None else None,
                  approximate=rep.approximate, notes=[rep.note] if rep.note else [], tokenizer="gpt2",
                  gpt2_tokenizer=True)
        for p, (loss, ppl) in figures.items():
            row.wikitext[p] = {"ppl": ppl} | ({"loss": loss} if loss is not None else {})
        rows.append(row)
    return rows
