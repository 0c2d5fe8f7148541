"""One line of the comparison table before it is rendered: the `Row` every row source fills, its kinds, the protocol
order, and how a WikiText-2 score (an `EvalResult` or its dict) becomes a row's numbers and caveats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparknet.evaluate import EVAL_DTYPE, PROTOCOL_BLOG, STRIDED_PREFIX, EvalResult

KIND_RUN, KIND_BASELINE, KIND_REPORTED = "measured run", "measured baseline", "reported"
MEASURED = "measured"
GAP = "—"
WIKITEXT_VALIDATION = "wikitext-2-validation"  # the split sparknet-blog scores
NOT_GPT2 = "perplexity not comparable with GPT-2 rows; compare bits per byte"


@dataclass
class Row:
    """One line of the table before it becomes a DataFrame row; `notes` say why a value is missing."""

    kind: str
    source: str
    model: str
    run_id: str = ""
    params: float | None = None
    tokens: float | None = None
    mixture: str = ""
    tokenizer: str = ""  # "gpt2", "bpe-4096", a hub id; "" when not known
    gpt2_tokenizer: bool | None = None  # None: not known (a baseline not scored yet)
    wikitext: dict[str, dict[str, float]] = field(default_factory=dict)  # protocol -> loss/ppl/bpb
    dtypes: dict[str, str] = field(default_factory=dict)  # protocol -> the dtype its number was computed in
    commit: str = ""  # a baseline's resolved hub commit
    val: dict[str, float] = field(default_factory=dict)  # source -> held-out loss
    val_mean: float | None = None  # the mean over sources: what a sweep minimizes
    tokens_per_s: float | None = None
    wall_s: float | None = None
    notes: list[str] = field(default_factory=list)
    caveats: dict[str, list[str]] = field(default_factory=dict)  # caveat -> the protocols it applies to
    approximate: bool = False  # reported figures given as "≈"
    tuned_on: str = ""  # the evaluation split this model was selected on (its figures there are not a test)
    # Further numbers a row source adds (column name -> value), placed after the validation losses in the order
    # first seen: how a new kind of column plugs in without a change to the frame.
    columns: dict[str, float] = field(default_factory=dict)

    def add_caveats(self, results: Sequence[EvalResult | dict]) -> None:
        for protocol, text in result_caveats(results):
            if protocol not in self.caveats.setdefault(text, []):
                self.caveats[text].append(protocol)

    @property
    def other_tokenizer(self) -> bool:
        """Its perplexities are counted in another tokenizer's tokens than the GPT-2 rows'."""
        return self.gpt2_tokenizer is False

    def note(self) -> str:
        """Gap reasons first, then the tokenizer, then each caveat once with the protocols it concerns, then a dtype
        other than the policy's."""
        parts = list(self.notes)
        if self.other_tokenizer and self.wikitext:
            parts.append(f"tokenizer {self.tokenizer}: {NOT_GPT2}")
        # Sorted, so a row reads the same whichever scoring found a caveat first ("commit", "context", "scored").
        parts += [f"{', '.join(sort_protocols(ps))}: {text}" for text, ps in sorted(self.caveats.items())]
        off: dict[str, list[str]] = {}
        for p, dtype in self.dtypes.items():
            if dtype and dtype != EVAL_DTYPE and p in self.wikitext:
                off.setdefault(dtype, []).append(p)
        parts += [f"{', '.join(sort_protocols(ps))}: scored in {dtype}, not {EVAL_DTYPE} as the rest of the table "
                  f"(fix: --evaluate re-scores it in {EVAL_DTYPE})" for dtype, ps in off.items()]
        if self.tuned:
            parts.append(f"{PROTOCOL_BLOG}: tuned, the model was selected on WikiText-2 validation, the split this "
                         f"protocol scores (report the test-split hf-strided figures)")
        return "; ".join(parts)

    @property
    def tuned(self) -> bool:
        """Its sparknet-blog figure is not a test: the model was selected on the split that protocol scores."""
        return self.tuned_on == WIKITEXT_VALIDATION and PROTOCOL_BLOG in self.wikitext


def protocol_split(protocol: str) -> str:
    return "validation" if protocol == PROTOCOL_BLOG else "test"


def stride(protocol: str) -> int:
    return int(protocol[len(STRIDED_PREFIX):]) if protocol.startswith(STRIDED_PREFIX) else 0


def sort_protocols(protocols: Sequence[str]) -> list[str]:
    """sparknet-blog first, then the strided protocols by stride; duplicates dropped."""
    return sorted(dict.fromkeys(protocols), key=lambda p: (p != PROTOCOL_BLOG, stride(p)))


def bpb_protocols(protocols: Sequence[str]) -> list[str]:
    """The protocols with bits per byte (every strided one; sparknet-blog's loss is a mean of batch means over
    rows cut at 256 tokens, not a per-byte figure of any text), in table order."""
    return [p for p in sort_protocols(protocols) if p.startswith(STRIDED_PREFIX)]


def metrics_of(result: EvalResult | dict) -> dict[str, float]:
    """A score's numbers as a row holds them: loss, ppl and (when the protocol has it) bpb."""
    r = result.to_dict() if isinstance(result, EvalResult) else result
    out = {"loss": r["loss_nats"], "ppl": r["perplexity"]}
    if r.get("bits_per_byte") is not None:
        out["bpb"] = r["bits_per_byte"]
    return out


def result_caveats(results: Sequence[EvalResult | dict]) -> list[tuple[str, str]]:
    """(protocol, caveat) a reader must know to read a number correctly: the model's context was shorter than the
    protocol's length (a strided protocol then runs at the context: its numbers equal the smaller stride's; the
    blog protocol cuts rows shorter), or a score computed on a WikiText-2 copy that is not the canonical text (a
    trimmed copy is not comparable with the rest)."""
    out = []
    for result in results:
        r = result.to_dict() if isinstance(result, EvalResult) else result
        d = r.get("details") or {}
        if d.get("stride_clamped"):
            context = d.get("context_tokens") or d.get("stride_tokens")
            out.append((r["protocol"], f"context clamped to the model's {context} tokens, below the protocol's"))
        if d.get("max_tokens_clamped"):
            out.append((r["protocol"], f"context clamped to the model's {d.get('max_tokens')} tokens, below the "
                                       f"protocol's"))
        if d.get("data_canonical") is False:
            where = str(d.get("data_source", ""))
            out.append((r["protocol"], "scored on a non-canonical WikiText-2 copy"
                        + (f" in {Path(where).parent}" if where and not where.startswith("hub:") else "")))
    return out
