"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

The one way sparknet replaces a file that another process (or a later run after a crash) may read: write a
temporary file beside it, then rename it over the target (rename is atomic within one filesystem).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace `path` with `data` atomically. `durable`: fsync the file and the folder too, so the new content
    survives a power loss (token stores and manifests; a JSON status file does not need it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def write_text(path: Path, text: str, *, durable: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: Path, data: Any, *, indent: int | None = 1, durable: bool = False) -> None:
    """`data` as JSON (values JSON does not know, such as paths, written as their str())."""
    write_text(path, json.dumps(data, indent=indent, default=str), durable=durable)
