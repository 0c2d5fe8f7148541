"""Rendering the rows: the DataFrame (one record per row, every column), its display cells, compare.md, compare.csv,
perplexity.png, the compact terminal table and the notes block under it."""

from __future__ import annotations

import math
import shutil
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparknet.compare.downstream import downstream_text
from sparknet.compare.table import (
    GAP,
    KIND_BASELINE,
    KIND_REPORTED,
    KIND_RUN,
    NOT_GPT2,
    Row,
    bpb_protocols,
    sort_protocols,
    stride,
)
from sparknet.evaluate import EVAL_DTYPE, PROTOCOL_BLOG

if TYPE_CHECKING:
    import pandas as pd


def comparison_frame(rows: Sequence[Row], protocols: Sequence[str]) -> pd.DataFrame:
    """One DataFrame row per Row: kind, source, model, run_id, tokenizer, params_M, tokens, mixture, then the
    comparable numbers first: `<protocol> bpb` for every strided protocol, `<protocol> ppl`, `<protocol> loss`, then
    `val loss` (mean over sources), `val/<source>`, the columns row sources added (`Row.columns`, in the order first
    seen), eval dtype, commit, tokens/s, wall time h, note. Missing numbers are NaN."""
    import pandas as pd

    protocols = sort_protocols(protocols)
    sources = sorted({s for r in rows for s in r.val})
    extra = list(dict.fromkeys(c for r in rows for c in r.columns))
    records = []
    for r in rows:
        rec: dict[str, Any] = {"kind": r.kind, "source": r.source, "model": r.model, "run_id": r.run_id,
                               "tokenizer": r.tokenizer,
                               "params_M": r.params / 1e6 if r.params is not None else math.nan,
                               "tokens": r.tokens if r.tokens is not None else math.nan, "mixture": r.mixture}
        for p in bpb_protocols(protocols):
            rec[f"{p} bpb"] = r.wikitext.get(p, {}).get("bpb", math.nan)
        for k in ("ppl", "loss"):
            for p in protocols:
                rec[f"{p} {k}"] = r.wikitext.get(p, {}).get(k, math.nan)
        rec["val loss"] = r.val_mean if r.val_mean is not None else math.nan
        for s in sources:
            rec[f"val/{s}"] = r.val.get(s, math.nan)
        for c in extra:
            rec[c] = r.columns.get(c, math.nan)
        rec["eval dtype"] = ", ".join(sorted({d for p, d in r.dtypes.items() if d and p in r.wikitext}))
        rec["commit"] = r.commit
        rec["tokens/s"] = r.tokens_per_s if r.tokens_per_s is not None else math.nan
        rec["wall time h"] = r.wall_s / 3600 if r.wall_s is not None else math.nan
        rec["note"] = r.note()
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    frame["tokens"] = frame["tokens"].astype("Int64")  # a count: "16384" in the CSV, not "16384.0"
    # Which rows hold approximate published figures ("≈" in the markdown; the CSV keeps plain numbers), and whose
    # perplexities are in another tokenizer's tokens (kept apart in the plot, marked in the terminal table).
    frame.attrs["approximate"] = [r.approximate for r in rows]
    frame.attrs["other_tokenizer"] = [r.other_tokenizer for r in rows]
    frame.attrs["tuned"] = [r.tuned for r in rows]
    return frame


def _cell(column: str, value: Any, approximate: bool = False) -> str:
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\n", " ")
    import pandas as pd

    if pd.isna(value):  # NaN, None, or pandas' NA in the integer tokens column
        return GAP
    v = float(value)
    if column == "params_M":
        text = f"{v:.2f}"
    elif column in ("tokens", "tokens/s"):
        text = f"{v:,.0f}"
    elif column.endswith(" ppl"):
        text = f"{v:,.0f}" if v >= 1000 else f"{v:.2f}" if not approximate else f"{v:g}"
    elif column == "wall time h":
        text = f"{v:.3g}"
    elif column.startswith("past bigram/"):  # nats past the run's own bigram table; negative: not yet
        text = f"{v:+.3f}"
    else:  # losses, bits per byte
        text = f"{v:.4f}"
    return f"≈{text}" if approximate and column.endswith(" ppl") else text


def formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as display strings: "—" for a missing number, "≈" for approximate published figures."""
    approx = frame.attrs.get("approximate", [False] * len(frame))
    out = frame.copy().astype(object)
    for i in range(len(frame)):
        for c in frame.columns:
            out.iat[i, frame.columns.get_loc(c)] = _cell(c, frame.iat[i, frame.columns.get_loc(c)], approx[i])
    return out


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (written here: pandas' to_markdown needs the optional `tabulate`)."""
    text = formatted(frame)
    lines = ["| " + " | ".join(text.columns) + " |",
             "|" + "|".join("---:" if frame[c].dtype.kind in "fi" else "---" for c in frame.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in text.itertuples(index=False)]
    return "\n".join(lines)


def _notes_block(frame: pd.DataFrame, width: int) -> str:
    notes = []
    for i, n in enumerate(frame["note"]):
        if n:
            notes += textwrap.wrap(f"{i + 1}. {n}", width=width, initial_indent="  ", subsequent_indent="     ",
                                   break_on_hyphens=False)
    return ("\nnotes:\n" + "\n".join(notes)) if notes else ""


def to_text_wide(frame: pd.DataFrame, width: int = 120) -> str:
    """Every column (as in the CSV and markdown), notes listed under it instead of a very wide last column."""
    text = formatted(frame).drop(columns=["note"])
    text.insert(0, "#", [str(i + 1) for i in range(len(text))])
    return text.to_string(index=False) + _notes_block(frame, width)


def _short(protocol: str) -> str:
    return "blog" if protocol == PROTOCOL_BLOG else f"@{stride(protocol)}"


def _human_count(v: Any) -> str:
    import pandas as pd

    if v is None or pd.isna(v):
        return GAP
    v = float(v)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}"


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(1, width - 1)] + "…"


_KIND_HEADINGS = {KIND_RUN: "measured runs", KIND_BASELINE: "measured baselines (scored here, cached)",
                  KIND_REPORTED: "reported (published figures, not measured here)"}


def terminal_width() -> int:
    """The terminal's width, within [80, 200]; 120 when there is no terminal (a pipe, a log, a test)."""
    return max(80, min(200, shutil.get_terminal_size((120, 24)).columns))


def to_text(frame: pd.DataFrame, protocols: Sequence[str] | None = None, width: int | None = None) -> str:
    """The compact table for a terminal: model, tokens, mixture, bits per byte and perplexity per protocol (bits
    per byte first: it compares across tokenizers), mean validation loss; rows grouped by kind under a heading,
    numbered for the notes below. The mixture column takes what the width leaves (clipped with "…")."""
    width = width or terminal_width()
    protocols = sort_protocols(protocols or [c[:-4] for c in frame.columns if c.endswith(" ppl")])
    approx = frame.attrs.get("approximate", [False] * len(frame))
    other = frame.attrs.get("other_tokenizer", [False] * len(frame))
    tuned = frame.attrs.get("tuned", [False] * len(frame))
    numeric = [(f"bpb{_short(p)}", f"{p} bpb") for p in bpb_protocols(protocols)]
    numeric += [(f"ppl{_short(p)}" if _short(p).startswith("@") else f"ppl {_short(p)}", f"{p} ppl")
                for p in protocols]
    numeric.append(("val loss", "val loss"))
    cells = []
    published = [c for c in frame.columns if c.endswith(" reported %")]
    only_downstream = [frame["kind"].iat[i] == KIND_REPORTED and any(not _missing(frame[c].iat[i]) for c in published)
                       and all(_missing(frame[col].iat[i]) for _, col in numeric if col in frame)
                       for i in range(len(frame))]
    for i in range(len(frame)):
        values = []
        for _, col in numeric:
            text = _cell(col, frame[col].iat[i], approx[i]) if col in frame else GAP
            if col.endswith(" ppl") and other[i] and text != GAP:
                text += "*"  # counted in another tokenizer's tokens: see the legend
            if col == f"{PROTOCOL_BLOG} ppl" and tuned[i] and text != GAP:
                text += "†"  # selected on the split it scores: see the legend
            values.append(text)
        cells.append((str(i + 1), str(frame["model"].iat[i]), _human_count(frame["tokens"].iat[i]),
                      str(frame["mixture"].iat[i]) or GAP, values))
    w_num = [max(len(h), *(len(c[4][j]) for c in cells)) for j, (h, _) in enumerate(numeric)] if cells else []
    w_idx = max([1, *(len(c[0]) for c in cells)])
    w_model = min(36, max([5, *(len(c[1]) for c in cells)]))
    w_tokens = max([6, *(len(c[2]) for c in cells)])
    fixed = w_idx + w_model + w_tokens + sum(w_num) + 2 * (3 + len(numeric)) + 2
    w_mix = max(12, min(max([7, *(len(c[3]) for c in cells)]), width - fixed))

    def line(idx: str, model: str, tokens: str, mixture: str, values: Sequence[str]) -> str:
        parts = [idx.rjust(w_idx), _clip(model, w_model).ljust(w_model), tokens.rjust(w_tokens),
                 _clip(mixture, w_mix).ljust(w_mix)] + [v.rjust(w) for v, w in zip(values, w_num)]
        return "  ".join(parts).rstrip()

    out = [line("#", "model", "tokens", "mixture", [h for h, _ in numeric])]
    kind = None
    for i, c in enumerate(cells):
        if only_downstream[i]:  # a published downstream row: listed, with its number, in the block below
            continue
        if frame["kind"].iat[i] != kind:
            kind = frame["kind"].iat[i]
            out.append(f"-- {_KIND_HEADINGS.get(kind, kind)}")
        out.append(line(*c))
    legend = ["bpb = bits per byte (compares across tokenizers), ppl = perplexity, @N = hf-strided-N, blog = "
              "sparknet-blog; val loss = mean held-out loss over the run's sources (its own tokenizer and data)"]
    if any(other):
        legend.append(f"* not GPT-2's tokenizer: {NOT_GPT2}")
    if any(tuned):
        legend.append("† tuned: the model was selected on WikiText-2 validation, the split sparknet-blog scores")
    if any(approx):
        legend.append("≈ approximate published figure")
    legend.append(f"{GAP} no value: the notes say why; every column: --wide, compare.csv, compare.md")
    wrapped = [w for item in legend for w in textwrap.wrap(item, width=width, subsequent_indent="  ")]
    return "\n".join(out) + "\n" + "\n".join(wrapped) + downstream_text(frame, width) + _notes_block(frame, width)


def plot_layout(frame: pd.DataFrame, protocols: Sequence[str]) -> dict[str, Any]:
    """What perplexity.png draws, in order: panels (bits per byte first, one per strided protocol with any value;
    then perplexity per protocol) and the rows top to bottom, those whose perplexity is in another tokenizer's
    tokens after a separator, so that no bar of theirs stands among the GPT-2 rows."""
    protocols = sort_protocols(protocols)
    panels = [("bpb", p) for p in bpb_protocols(protocols)
              if f"{p} bpb" in frame and any(_finite(v) for v in frame[f"{p} bpb"])]
    panels += [("ppl", p) for p in protocols] or [("ppl", "(no protocol)")]
    other = frame.attrs.get("other_tokenizer", [False] * len(frame))
    same = [i for i in range(len(frame)) if not other[i]]
    apart = [i for i in range(len(frame)) if other[i]]
    return {"panels": panels, "rows": same + apart, "apart_from": len(same) if apart else None}


def perplexity_png(frame: pd.DataFrame, protocols: Sequence[str], path: Path) -> Path:
    """Horizontal bars, one panel per number (`plot_layout`): bits per byte on a linear axis from 0, then perplexity
    on one log axis starting at 1 (the best possible perplexity), so GPT-2's ~30 and an untrained model's ~50,000
    are both readable and bar lengths compare across panels. Rows with another tokenizer than GPT-2's sit below a
    line, hatched and labelled in the perplexity panels. Reported figures are hatched grey; a gap is written as
    text, never drawn as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = plot_layout(frame, protocols)
    order, apart = layout["rows"], layout["apart_from"]
    approx = frame.attrs.get("approximate", [False] * len(frame))
    other = frame.attrs.get("other_tokenizer", [False] * len(frame))
    labels = [f"{frame['model'].iat[i]} [{frame['kind'].iat[i]}]" + (" *" if other[i] else "") for i in order]
    colors = {KIND_RUN: "tab:blue", KIND_BASELINE: "tab:orange", KIND_REPORTED: "0.6"}
    ppl_values = [float(frame[f"{p} ppl"].iat[i]) for kind, p in layout["panels"] if kind == "ppl"
                  and f"{p} ppl" in frame for i in order if _finite(frame[f"{p} ppl"].iat[i])]
    bpb_values = [float(frame[f"{p} bpb"].iat[i]) for kind, p in layout["panels"] if kind == "bpb"
                  for i in order if _finite(frame[f"{p} bpb"].iat[i])]
    n = len(layout["panels"])
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n + 2.5, 1.4 + 0.42 * max(1, len(frame))), dpi=110, sharey=True,
                             squeeze=False)
    for ax, (kind, p) in zip(axes[0], layout["panels"]):
        column = f"{p} {kind}"
        for y, i in enumerate(order):
            v = frame[column].iat[i] if column in frame else math.nan
            row_kind = frame["kind"].iat[i]
            if _finite(v):
                v = float(v)
                hatch = "//" if row_kind == KIND_REPORTED else "xx" if kind == "ppl" and other[i] else None
                left = 1 if kind == "ppl" else 0
                ax.barh(y, v - left, left=left, color=colors.get(row_kind, "tab:blue"), hatch=hatch,
                        alpha=0.55 if kind == "ppl" and other[i] else 1.0, edgecolor="black", linewidth=0.5)
                ax.text(v, y, " " + _cell(column, v, approx[i]), va="center", fontsize=7)
            else:
                ax.text(1.1 if kind == "ppl" else 0.02, y, f"{GAP} no value", va="center", fontsize=7, color="0.45")
        if kind == "ppl":
            ax.set_xscale("log")
            ax.set_xlim(1, max(ppl_values, default=10.0) * 4)  # room for the value written after the longest bar
            ax.set_xlabel("perplexity (log scale, lower is better)", fontsize=8)
            ax.set_title(f"WikiText-2 {p}: perplexity", fontsize=9)
        else:
            ax.set_xlim(0, max(bpb_values, default=1.0) * 1.35)
            ax.set_xlabel("bits per byte (lower is better)", fontsize=8)
            ax.set_title(f"WikiText-2 {p}: bits per byte", fontsize=9)
        if apart is not None:
            ax.axhline(apart - 0.5, color="black", linewidth=1.2, linestyle="--")
            if kind == "ppl":
                ax.text(0.99, apart - 0.45, "below: not GPT-2's tokenizer,\nperplexity not comparable",
                        transform=ax.get_yaxis_transform(), ha="right", va="top", fontsize=6, color="0.3")
        ax.grid(axis="x", alpha=0.3, which="major")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("Compare bits per byte across tokenizers; perplexity only between rows with the same tokenizer"
                 + (f" (* {NOT_GPT2})" if apart is not None else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        return False


def markdown_report(frame: pd.DataFrame, *, runs: str, baselines: Sequence[str], trials_line: str,
                    cache: Path) -> str:
    """compare.md: what was compared (`runs`: the filters and the store), the table, and how to read it."""
    return (
        f"# WikiText-2 comparison ({time.strftime('%F %T')})\n\n"
        f"Runs: {runs}. Baselines: {', '.join(baselines) or 'none'}."
        + (f" {trials_line[0].upper()}{trials_line[1:]}." if trials_line else "") + "\n\n"
        f"{to_markdown(frame)}\n\n"
        f"- Comparable numbers first: `<protocol> bpb` = bits per byte over the protocol's text, which compares "
        f"across tokenizers; perplexity and loss compare only between rows with the same tokenizer (a row with "
        f"another tokenizer than GPT-2's says so in `note`).\n"
        f"- `kind`: *measured run* = a training run's logged metrics; *measured baseline* = scored here by "
        f"`sparknet.evaluate` (cached in `{cache}` by model, resolved commit, dtype, protocol and "
        f"text); *reported* = published figures, not measured here.\n"
        f"- Protocols: `sparknet-blog` = SparkNet's (validation, 2000 shuffled rows, 256 tokens, mean of batch "
        f"means; no bits per byte); `hf-strided-N` = Hugging Face's fixed-length perplexity over the test split at "
        f"stride N.\n"
        f"- `eval dtype`: what the numbers were computed in; the policy is {EVAL_DTYPE}.\n"
        f"- `val loss`: mean held-out loss over the run's own sources (in its own tokenizer).\n"
        f"- {GAP}: no value; the `note` column says why.\n")


def write_files(frame: pd.DataFrame, protocols: Sequence[str], out_dir: Path, markdown: str) -> dict[str, Path]:
    """compare.csv (full precision, NaN for gaps, every column), compare.md and perplexity.png in `out_dir`."""
    files = {"md": out_dir / "compare.md", "csv": out_dir / "compare.csv", "png": out_dir / "perplexity.png"}
    frame.to_csv(files["csv"], index=False)
    files["md"].write_text(markdown)
    perplexity_png(frame, protocols, files["png"])
    return files
