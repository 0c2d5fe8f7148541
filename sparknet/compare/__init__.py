"""python -m sparknet.compare: one table of our runs, baseline models and published figures on WikiText-2.

Rows come in three kinds, kept apart in every output (the `kind` and `source` columns):

- `measured run`: a training run read back from MLflow (filter by --experiment, --run-id, --tag). Its WikiText-2
  numbers are the metrics the run logged (`wikitext/<protocol>/loss|ppl|bpb`); model size, tokens, realized
  mixture, per-source validation loss, tokens/s and wall time come from the same run. Sweep (and ablation) trials
  are proxy runs, not results: they stay out unless --include-trials (every trial) or --best-trials (one row per
  study, its best trial by the study's objective) brings them in. A model selected on WikiText-2 validation has
  its sparknet-blog figure (which scores that split) marked as tuned.
- `measured baseline`: a Hugging Face model (hub id, `ID@REVISION`, or a local folder) scored here by the same
  `sparknet.evaluate.evaluate_wikitext` the runs use. Results are cached in `<lab>/baselines/<key>.json`, the key
  holding the model, the commit its revision resolved to (never a moving name like "main"), the dtype, the
  protocol and the WikiText text's sha256, so GPT-2 is evaluated once per protocol, ever.
- `reported`: figures others published (`REPORTED`, from DESIGN.md), never recomputed and never mixed with the
  measured ones.

Comparable numbers first: bits per byte (every hf-strided protocol has it) compares across tokenizers, perplexity
only between rows with the same tokenizer, so the table and perplexity.png lead with bits per byte, and a row whose
tokenizer is not GPT-2's says that its perplexity does not compare with the GPT-2 rows. Every number is computed in
float32 (the dtype policy of `sparknet.evaluate`); a row says which dtype its numbers were computed in, and
`--evaluate` re-scores in float32 what a run scored otherwise.

Nothing is evaluated unless `--evaluate` is given: without it compare only reads (MLflow and the baseline cache)
and finishes in seconds, and what is missing is a gap marked "—" whose reason is in the `note` column. With
`--evaluate` it scores what is missing: uncached baselines, and runs without WikiText-2 results (their final
model, from the `sparknet.final_model` tag, when it is on this disk); the run's new metrics are logged back to
that run, so they too are computed once. An unreachable baseline (offline hub, unknown id) stays a gap.

First, a run that ended while its MLflow server was down gets what the server missed and its final status
(`sparknet.tracking.replay_lab`), so it is read as it really ended.

Outputs (`<lab>/compare/<timestamp>/` or --out): compare.md, compare.csv (full precision, NaN for gaps, every
column), perplexity.png, and, unless --no-log, a run in the MLflow experiment `sparknet-compare` holding the three.
The terminal gets a compact table (model, tokens, mixture, bits per byte and perplexity per protocol, mean
validation loss); --wide prints every column.

The package, one job a file: `table` (the Row), `reported` (published figures), `scoring` (a model on WikiText-2),
`runs` (rows of MLflow runs, trials), `baselines` (rows of baseline models, their cache), `rows` (the row sources),
`render` (frame, markdown, CSV, PNG, terminal), `options`, `comparison` (one comparison, start to end), `cli`.
This file only hands names on.
"""

from sparknet.compare.baselines import DEFAULT_BASELINES, cache_key
from sparknet.compare.cli import main
from sparknet.compare.comparison import COMPARE_EXPERIMENT, Comparison, compare
from sparknet.compare.options import CompareOptions
from sparknet.compare.render import comparison_frame, plot_layout, to_markdown, to_text
from sparknet.compare.reported import REPORTED, Reported
from sparknet.compare.rows import ROW_SOURCES, RowContext, RowSource, build_rows
from sparknet.compare.table import GAP, KIND_BASELINE, KIND_REPORTED, KIND_RUN, NOT_GPT2, Row

__all__ = [
    "COMPARE_EXPERIMENT", "DEFAULT_BASELINES", "GAP", "KIND_BASELINE", "KIND_REPORTED", "KIND_RUN", "NOT_GPT2",
    "REPORTED", "ROW_SOURCES", "CompareOptions", "Comparison", "Reported", "Row", "RowContext", "RowSource",
    "build_rows", "cache_key", "compare", "comparison_frame", "main", "plot_layout", "to_markdown", "to_text",
]
