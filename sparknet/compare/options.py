"""What one comparison was asked (`python -m sparknet.compare`'s flags as data), shared by the row sources, the
comparison and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sparknet.compare.baselines import DEFAULT_BASELINES
from sparknet.compare.runs import TRIALS_NONE


@dataclass
class CompareOptions:
    """What `python -m sparknet.compare` was asked; see `sparknet.compare.cli.main` for the flags."""

    lab: Path = Path("lab")
    tracking_uri: str = ""
    experiments: tuple[str, ...] = ()  # empty: every experiment but sparknet-compare
    run_ids: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    trials: str = TRIALS_NONE  # sweep/ablation trials: none, all, or the best of each study
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    protocols: tuple[str, ...] = ()  # empty: the default three plus any other the runs were scored under
    reported: bool = True
    evaluate: bool = False
    evaluate_only: str = ""  # with evaluate: "runs" or "baselines" to score only those ("": both)
    wikitext: str | None = None
    out: Path | None = None
    log: bool = True
    device: str | None = None
    batch_size: int = 8
    timeout_s: float = 10.0
