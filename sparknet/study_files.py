"""What a study writes into its folder (`--out`, default experiments/<study>/), each file atomically (a reader, or
the worker that reads best.yaml back for --confirm, sees the old file or the whole new one): text, tables as CSV and
markdown, figures."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from sparknet import atomic


def write_text(path: Path, text: str) -> Path:
    atomic.write_text(path, text)
    return path


def write_csv(path: Path, df) -> Path:
    """A pandas frame as CSV (no index)."""
    return write_text(path, df.to_csv(index=False))


def save_figure(fig, path: Path, **savefig: Any) -> Path:
    """A matplotlib figure as PNG (savefig's keywords: dpi, ...)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    atomic.write_bytes(path, buf.getvalue())
    return path


def markdown_table(df, formats: dict[str, str] | None = None) -> str:
    """A pandas frame as a markdown table: floats to 4 significant digits unless `formats` says otherwise."""
    formats = formats or {}

    def cell(col: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return format(v, formats.get(col, ".4g"))
        if isinstance(v, int) and not isinstance(v, bool) and col in formats:
            return format(v, formats[col])
        return str(v).replace("|", "/")

    cols = list(map(str, df.columns))
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    return head + "".join("\n| " + " | ".join(cell(c, v) for c, v in zip(cols, row)) + " |"
                          for row in df.itertuples(index=False))
