"""The typed, frozen config tree of a run: mixture, tokenizer, model, train, prepare, eval, tracking.

Defaults are the CodeLion GPT-2 70M recipe (DESIGN.md). Every field carries its doc in `metadata["doc"]`; each
section's `validate` checks its values and fails with `ConfigError` naming the file (or the override), the key and a
fix. Reading YAML and overrides into this tree is `sparknet.config.load`'s job.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sparknet.errors import SparknetError


class ConfigError(SparknetError):
    def __init__(self, where: str, key: str, reason: str):
        super().__init__(f"{where}: {key or '<top level>'}: {reason}")


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

SourceKind = Literal["hf", "local", "blog", "pydocs"]
PydocsPart = Literal["docstrings", "readmes", "code"]


@dataclass(frozen=True)
class SourceConfig:
    """One source of documents in the mixture."""

    name: str = _f("", "Short unique name; used in reports, metrics and as a folder name.")
    kind: SourceKind = _f("hf", "hf: a Hugging Face dataset; local: files matching `path` (a glob or "
                          "folder of jsonl/json/parquet/txt/md/html); blog: a folder of posts, one "
                          "document each, front matter and markup stripped; pydocs: text of the "
                          "installed Python (stdlib docstrings, package READMEs or stdlib code).")
    weight: float | None = _f(None, "Share of the training tokens (weights are normalized). Omit "
                              "when `mixture.stages` gives the weights.")
    path: str = _f("", "hf: dataset id or local dataset folder; local/blog: glob or folder.")
    revision: str = _f("main", "hf: git revision of the dataset; pin a commit sha for exact reruns.")
    subset: str | None = _f(None, "hf: dataset configuration name, if it has several.")
    split: str = _f("train", "hf: split to read.")
    text_field: str = _f("text", "hf/local jsonl/json/parquet: the column that holds the text.")
    streaming: bool = _f(True, "hf: stream rows instead of downloading the whole dataset first.")
    part: PydocsPart = _f("docstrings", "pydocs: which text of the installed Python to read (code: the stdlib "
                          "without its docstrings, which are the docstrings part).")
    max_repeats: float = _f(1.0, "Most epochs the plan may take over this source's training "
                            "tokens; prepare fails before training if the share needs more.")
    max_document_bytes: int = _f(64 * 2**20, "A single document (or jsonl line) larger than this is "
                                 "an error rather than a silent memory blow-up.")
    allow_overlap: bool = _f(False, "This source may read files or a hub dataset (path, subset, split) that "
                             "another source also reads, on purpose. Without it prepare refuses the overlap: the "
                             "plan would undercount the repetition, and one source's validation documents would "
                             "train the other (which stays true when allowed).")

    def validate(self, at: _At) -> None:
        if not self.name:
            at.fail("name", "is required", "give the source a short name such as `dclm`")
        if not _SAFE_NAME.match(self.name) or "." in self.name:
            # No '.': overrides address a source as mixture.sources.NAME.field.
            at.fail("name", f"{self.name!r} is not a safe source name",
                    "use letters, digits, '_' or '-' (at most 64, not starting with '-'; no '.')")
        if self.weight is not None and (not math.isfinite(self.weight) or self.weight < 0):
            at.fail("weight", f"must be a finite number >= 0, got {self.weight}", "fix the weight")
        if self.kind in ("hf", "local", "blog") and not self.path:
            at.fail("path", f"is required for kind {self.kind!r}",
                    "set `path` (dataset id, glob or folder)")
        if not (self.max_repeats > 0 and math.isfinite(self.max_repeats)):
            at.fail("max_repeats", f"must be > 0, got {self.max_repeats}", "use e.g. 1.0 or 4")
        if self.max_document_bytes <= 0:
            at.fail("max_document_bytes", "must be > 0", "use e.g. 67108864")


@dataclass(frozen=True)
class StageConfig:
    """A curriculum stage: from `start_fraction` of training on, these weights hold."""

    start_fraction: float = _f(0.0, "Fraction of the training tokens at which the stage begins.")
    weights: dict[str, float] = _f({}, "Weight per source name; sources not listed get 0.")

    def validate(self, at: _At) -> None:
        if not 0.0 <= self.start_fraction < 1.0:
            at.fail("start_fraction", f"must be in [0, 1), got {self.start_fraction}",
                    "use a fraction such as 0.8")
        for name, w in self.weights.items():
            if not math.isfinite(w) or w < 0:
                at.fail(f"weights.{name}", f"must be a finite number >= 0, got {w}", "fix the weight")
        if not any(w > 0 for w in self.weights.values()):
            at.fail("weights", "are all zero or missing", "give at least one source a weight > 0")


@dataclass(frozen=True)
class MixtureConfig:
    """What the model is trained on, and exactly how much of each source."""

    total_tokens: int = _f(1_000_000_000, "Training tokens (predicted positions) in the whole run; "
                           "accepts 1B, 50M, 250k.", tokens=True)
    sources: tuple[SourceConfig, ...] = _f((), "The sources; at least one.")
    stages: tuple[StageConfig, ...] = _f((), "Optional curriculum: weights that change at given "
                                         "fractions of training; the first starts at 0.")
    val_tokens: int = _f(1_048_576, "Tokens per source held out for validation: whole documents drawn by a "
                         "hash of their text, spread over the source, never trained on (copies of them are "
                         "dropped from training); see README.", tokens=True)
    val_max_fraction: float = _f(0.1, "local/blog/pydocs: the most of a source's tokens its validation slice may "
                                 "take (whole documents), so a small source stays mostly training.")
    val_stream_rate: float = _f(0.01, "Streamed hf sources: the share of documents (by hash) eligible for "
                                "validation. The slice is the first of them in the stream until val_tokens, "
                                "spread over the first ~val_tokens / rate tokens.")
    seed: int = _f(1234, "Seed of the interleaving and of the sequence order within each source.")
    window_fraction: float = _f(0.01, "Every aligned window of this fraction of training holds "
                                "each source's share to within one sequence.")

    def validate(self, at: _At) -> None:
        if self.total_tokens <= 0:
            at.fail("total_tokens", f"must be > 0, got {self.total_tokens}", "use e.g. 1B or 50M")
        if self.val_tokens < 0:
            at.fail("val_tokens", f"must be >= 0, got {self.val_tokens}", "use e.g. 1M")
        for key in ("val_max_fraction", "val_stream_rate"):
            if not 0 < getattr(self, key) <= 0.5:
                at.fail(key, f"must be in (0, 0.5], got {getattr(self, key)}", "use e.g. 0.1 or 0.01")
        if self.seed < 0:  # numpy's seeding rejects negative seeds (a traceback in the loader)
            at.fail("seed", f"must be >= 0, got {self.seed}", "use e.g. 1234")
        if not 0.0 < self.window_fraction <= 1.0:
            at.fail("window_fraction", f"must be in (0, 1], got {self.window_fraction}", "use 0.01")
        if not self.sources:
            at.fail("sources", "the mixture has no sources", "list at least one under mixture.sources")
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            if name in names[:i]:
                at.fail(f"sources[{i}].name", f"duplicate source name {name!r}",
                        "give every source a different name")
        if self.stages:
            if any(s.weight is not None for s in self.sources):
                bad = next(i for i, s in enumerate(self.sources) if s.weight is not None)
                at.fail(f"sources[{bad}].weight", "weights are given both per source and by stages",
                        "keep weights in mixture.stages only")
            starts = [st.start_fraction for st in self.stages]
            if starts[0] != 0.0:
                at.fail("stages[0].start_fraction", f"must be 0, got {starts[0]}",
                        "start the first stage at 0.0")
            for i in range(1, len(starts)):
                if starts[i] <= starts[i - 1]:
                    at.fail(f"stages[{i}].start_fraction", "stages must start in increasing order",
                            "sort the stages by start_fraction")
            for i, st in enumerate(self.stages):
                for name in st.weights:
                    if name not in names:
                        at.fail(f"stages[{i}].weights.{name}", f"no source named {name!r}",
                                f"use one of {', '.join(names)}")
        else:
            for i, s in enumerate(self.sources):
                if s.weight is None:
                    at.fail(f"sources[{i}].weight", "is required (no stages given)",
                            "give every source a weight, e.g. 0.3")
            if not any((s.weight or 0) > 0 for s in self.sources):
                at.fail("sources", "all weights are zero", "give at least one source a weight > 0")

    def stage_list(self) -> list[tuple[float, dict[str, float]]]:
        """(start_fraction, weights by source name) per stage; one stage when none are configured."""
        names = [s.name for s in self.sources]
        if not self.stages:
            return [(0.0, {s.name: float(s.weight or 0.0) for s in self.sources})]
        return [(st.start_fraction, {n: float(st.weights.get(n, 0.0)) for n in names})
                for st in self.stages]


@dataclass(frozen=True)
class TokenizerConfig:
    """How text becomes token ids."""

    name: str = _f("gpt2", "gpt2: OpenAI's GPT-2 BPE, offline and exact; bpe: a byte-level BPE "
                   "trained on the mixture; anything else: a Hugging Face tokenizer id or folder.")
    revision: str = _f("main", "Revision of a Hugging Face tokenizer id.")
    vocab_size: int = _f(32_768, "bpe: vocabulary size to train (at most 65,535 for uint16 shards).")
    train_bytes_per_source: int = _f(32 * 2**20, "bpe: text read from each source to train on.")

    def validate(self, at: _At) -> None:
        if not self.name:
            at.fail("name", "is empty", "use gpt2, bpe, or a Hugging Face tokenizer id or folder")
        if not 256 < self.vocab_size <= 65_535:
            at.fail("vocab_size", f"must be in (256, 65535], got {self.vocab_size}", "use e.g. 32768")
        if self.train_bytes_per_source <= 0:
            at.fail("train_bytes_per_source", "must be > 0", "use e.g. 33554432")


# name -> (n_layer, n_head, n_embd, n_positions)
MODEL_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "gpt2-70m": (12, 8, 512, 1024),  # CodeLion's shape: 64.09M parameters with a 50,257 vocab
    "gpt2-124m": (12, 12, 768, 1024),  # GPT-2 small
    "cpu-small": (4, 4, 128, 256),  # a few M parameters: minutes on a laptop CPU
    "cpu-tiny": (2, 2, 64, 128),  # for tests: seconds on a CPU
}


@dataclass(frozen=True)
class ModelConfig:
    """The GPT-2 shape; explicit fields override the preset's."""

    preset: str = _f("gpt2-70m", f"One of {', '.join(MODEL_PRESETS)}.")
    n_layer: int | None = _f(None, "Transformer blocks (default: the preset's).")
    n_head: int | None = _f(None, "Attention heads (default: the preset's).")
    n_embd: int | None = _f(None, "Model width d_model (default: the preset's).")
    n_positions: int | None = _f(None, "Context length (default: the preset's).")
    pad_vocab_multiple: int = _f(64, "Pad the embedding rows to a multiple of this while training so "
                                 "the output matmul has tensor-core-friendly shapes (50,257 -> 50,304); "
                                 "the padding is never predicted and is dropped on export. 1 disables.")

    def validate(self, at: _At) -> None:
        if self.pad_vocab_multiple < 1:
            at.fail("pad_vocab_multiple", f"must be >= 1, got {self.pad_vocab_multiple}", "use 64, or 1 to disable")
        if self.preset not in MODEL_PRESETS:
            at.fail("preset", f"unknown preset {self.preset!r}", f"use one of {', '.join(MODEL_PRESETS)}")
        for key in ("n_layer", "n_head", "n_embd", "n_positions"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                at.fail(key, f"must be > 0, got {v}", "remove it to use the preset's value")
        if self.shape()[2] % self.shape()[1]:
            at.fail("n_embd", f"{self.shape()[2]} is not divisible by n_head {self.shape()[1]}",
                    "choose n_embd a multiple of n_head")

    def shape(self) -> tuple[int, int, int, int]:
        """(n_layer, n_head, n_embd, n_positions) after applying overrides to the preset."""
        base = MODEL_PRESETS.get(self.preset, MODEL_PRESETS["gpt2-70m"])
        vals = (self.n_layer, self.n_head, self.n_embd, self.n_positions)
        return tuple(v if v is not None else b for v, b in zip(vals, base))  # type: ignore[return-value]


@dataclass(frozen=True)
class TrainConfig:
    """The optimization recipe (CodeLion's by default)."""

    seq_len: int = _f(1024, "Tokens per training sequence (at most the model's context).")
    batch_tokens: int = _f(122_880, "Tokens per optimizer step, all processes together: the recipe's global "
                           "batch (CodeLion: 120 sequences x 1024). It, the schedule and step k's data are the "
                           "same on any number of processes; gradient accumulation is derived from it: "
                           "batch_tokens / (seq_len x micro_batch_size x processes). A multiple of seq_len.",
                           tokens=True)
    micro_batch_size: int | Literal["auto"] = _f(
        24, "Sequences per forward pass per process: memory, not the recipe (1 GPU: accumulation 5; 8 GPUs: it must "
        "divide 120 / 8 = 15, e.g. 15, 5 or 3). auto: the largest divisor of the process's share that fits the "
        "device, from the memory estimate, probed once at start on CUDA (sparknet.device.fit_micro_batch).")
    lr: float = _f(5e-4, "Peak learning rate.")
    min_lr: float = _f(5e-5, "Final learning rate of the decay.")
    schedule: Literal["cosine", "linear", "wsd"] = _f("cosine", "Decay shape after warmup.")
    warmup_fraction: float = _f(0.02, "Warmup as a fraction of the token budget.")
    decay_fraction: float = _f(0.2, "wsd: final fraction of the budget spent decaying.")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to biases, norms, embeddings).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    precision: Literal["bf16", "fp32"] = _f("bf16", "Mixed precision on CUDA; CPU runs use fp32.")
    seed: int = _f(1337, "Seed of the model initialization.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: CUDA when available, else the CPU, but never "
                                                 "by accident: a GPU that torch cannot use, or a run estimated at "
                                                 "more than 4 h on the CPU, stops with the fix; cpu insists.")
    compile: Literal["auto", "on", "off"] = _f("auto", "torch.compile the model (auto: on CUDA only; "
                                               "falls back to eager with a warning if compiling fails).")
    checkpoint_minutes: float = _f(30.0, "Write a resumable checkpoint this often, at the first logging "
                                   "step after the time is up (0: only by tokens and at the end).")
    checkpoint_every_tokens: int = _f(0, "Also checkpoint every this many tokens (0: off).", tokens=True)
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (the newest ones).")
    log_every_steps: int = _f(10, "Log training metrics every this many optimizer steps.")
    diverge_factor: float = _f(3.0, "Stop the run as diverged when the loss exceeds this multiple of "
                               "its recent average (non-finite losses always stop it).")
    peak_flops: float = _f(0.0, "Peak FLOP/s of the accelerator for MFU (0: look the GPU up in the "
                           "built-in table; bf16 dense figures).")
    dist_timeout_minutes: float = _f(60.0, "Several processes: how long a collective (a barrier, an all-reduce) "
                                     "may wait for a slow process before the job aborts (NCCL's default is 10). "
                                     "Data preparation happens before the process group exists, so it is not "
                                     "bounded by this; evaluation and checkpoints on the main process are.")

    def validate(self, at: _At) -> None:
        if self.checkpoint_minutes < 0 or self.checkpoint_every_tokens < 0:
            key = "checkpoint_minutes" if self.checkpoint_minutes < 0 else "checkpoint_every_tokens"
            at.fail(key, "must be >= 0", "use 0 to turn it off")
        if self.keep_checkpoints < 1:
            at.fail("keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}", "use e.g. 2")
        if self.log_every_steps < 1:
            at.fail("log_every_steps", f"must be >= 1, got {self.log_every_steps}", "use e.g. 10")
        if self.diverge_factor <= 1:
            at.fail("diverge_factor", f"must be > 1, got {self.diverge_factor}", "use e.g. 3")
        if not self.dist_timeout_minutes > 0:
            at.fail("dist_timeout_minutes", f"must be > 0, got {self.dist_timeout_minutes}", "use e.g. 60")
        if self.peak_flops < 0:
            at.fail("peak_flops", "must be >= 0", "use e.g. 989e12 for an H100, or 0 to look it up")
        if not 0 <= self.seed < 2**63:
            at.fail("seed", f"must be in [0, 2**63), got {self.seed}", "use e.g. 1337")
        for key in ("seq_len", "micro_batch_size", "batch_tokens"):
            if getattr(self, key) == "auto":  # micro_batch_size=auto: chosen when training starts
                continue
            if getattr(self, key) <= 0:
                at.fail(key, f"must be > 0, got {getattr(self, key)}", "use a positive integer")
        if self.batch_tokens % self.seq_len:
            at.fail("batch_tokens", f"{self.batch_tokens:,} is not a multiple of seq_len {self.seq_len}",
                    f"use a whole number of sequences, e.g. {max(1, round(self.batch_tokens / self.seq_len)) * self.seq_len}")
        if self.micro_batch_size != "auto" and self.sequences_per_step % self.micro_batch_size:
            at.fail("micro_batch_size", f"{self.micro_batch_size} does not divide the {self.sequences_per_step} "
                    f"sequences of a step (batch_tokens {self.batch_tokens:,} / seq_len {self.seq_len})",
                    f"use one of {_divisors_text(self.sequences_per_step)}")
        if self.schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            at.fail("decay_fraction", f"warmup_fraction {self.warmup_fraction} + decay_fraction "
                    f"{self.decay_fraction} exceed the whole run", "make the two sum to at most 1")
        if not self.lr > 0:
            at.fail("lr", f"must be > 0, got {self.lr}", "use e.g. 5e-4")
        if not 0 <= self.min_lr <= self.lr:
            at.fail("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}", "use e.g. lr / 10")
        for key in ("warmup_fraction", "decay_fraction"):
            if not 0 <= getattr(self, key) < 1:
                at.fail(key, f"must be in [0, 1), got {getattr(self, key)}", "use e.g. 0.02")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                at.fail(key, f"must be in [0, 1), got {getattr(self, key)}", "use e.g. 0.95")
        if self.weight_decay < 0 or self.grad_clip < 0:
            at.fail("weight_decay" if self.weight_decay < 0 else "grad_clip", "must be >= 0",
                    "use a non-negative value")

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step, all processes together."""
        return self.batch_tokens // self.seq_len

    def grad_accum_steps(self, num_processes: int = 1) -> int:
        """Micro-batches per optimizer step on each of `num_processes` processes (the recipe's global batch
        split over them); a SparknetError naming the numbers and the micro-batch sizes that work otherwise."""
        sps, mb, n = self.sequences_per_step, self.micro_batch_size, num_processes
        if sps % n:
            ok = [k for k in range(1, min(sps, 16) + 1) if sps % k == 0]
            raise SparknetError(f"train.batch_tokens: the global batch of {sps} sequences ({self.batch_tokens:,} "
                                f"tokens) cannot be split over {n} processes (fix: use a process count that "
                                f"divides {sps}, e.g. {', '.join(map(str, ok))}, or change train.batch_tokens)")
        if mb == "auto":  # resolved by the trainer (sparknet.device.fit_micro_batch) before anything splits a step
            raise SparknetError("train.micro_batch_size: auto is chosen when training starts, and this needs a number "
                                f"(fix: train.micro_batch_size= one of {_divisors_text(sps // n)})")
        if (sps // n) % mb:
            raise SparknetError(f"train.micro_batch_size: {mb} sequences x {n} process(es) do not divide the global "
                                f"batch of {sps} sequences ({self.batch_tokens:,} tokens / seq_len {self.seq_len}) "
                                f"(fix: train.micro_batch_size= one of {_divisors_text(sps // n)} for {n} "
                                f"process(es); the global batch stays the recipe's)")
        return sps // n // mb


def _divisors_text(n: int) -> str:
    """The divisors of n, the 6 smallest and 6 largest when there are more: found up to sqrt(n), so that a huge
    count (train.batch_tokens=1e12) is answered at once, not after walking every integer below it."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    divs = sorted(set(small + [n // d for d in small]))
    return ", ".join(map(str, divs if len(divs) <= 12 else divs[:6] + divs[-6:]))


@dataclass(frozen=True)
class PrepareConfig:
    """How the token store is built."""

    workers: int = _f(0, "Tokenizer processes; 0 means one per CPU core.")
    shard_tokens: int = _f(2**25, "Tokens per shard file (a shard ends at a document boundary).",
                           tokens=True)
    batch_documents: int = _f(256, "Documents sent to a worker at a time.")

    def validate(self, at: _At) -> None:
        if self.workers < 0:
            at.fail("workers", f"must be >= 0, got {self.workers}", "use 0 for one per core")
        if self.shard_tokens < 1024:
            at.fail("shard_tokens", f"must be >= 1024, got {self.shard_tokens}", "use e.g. 32M")
        if self.batch_documents <= 0:
            at.fail("batch_documents", "must be > 0", "use e.g. 256")


# The downstream task names (sparknet.downstream.tasks defines them; the config layer only names them, so it stays
# free of the task code). tests/test_downstream.py checks that the two lists agree.
DOWNSTREAM_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa",
                    "lambada_openai", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
DEFAULT_DOWNSTREAM = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "openbookqa", "lambada_openai",
                      "truthfulqa_mc2", "mmlu")
DEFAULT_PROMPTS = ("The meaning of life is", "In 1492, Columbus", "The derivative of x^2 is",
                   "def fibonacci(n):")


@dataclass(frozen=True)
class EvalConfig:
    """What is measured while training."""

    every_tokens: int = _f(50_000_000, "Per-source validation loss and samples every this many "
                           "training tokens (and always at the end).", tokens=True)
    val_tokens: int = _f(0, "Held-out tokens per source per evaluation (0: the whole slice).", tokens=True)
    batch_size: int = _f(16, "Sequences per validation forward pass.")
    sample_prompts: tuple[str, ...] = _f(DEFAULT_PROMPTS, "Fixed prompts for greedy samples.")
    sample_tokens: int = _f(32, "Tokens generated per sample (greedy).")
    wikitext: tuple[str, ...] = _f(("sparknet-blog", "hf-strided-512", "hf-strided-1024"),
                                   "WikiText-2 protocols scored on the final model (empty: none): "
                                   "sparknet-blog, hf-strided-<stride>.")
    wikitext_path: str = _f("", "A local WikiText-2 copy (folder with wiki.test.raw / wiki.valid.raw, or "
                            "jsonl/parquet); default: $SPARKNET_WIKITEXT, else the hub through datasets.")
    downstream: tuple[str, ...] = _f(DEFAULT_DOWNSTREAM, "Downstream tasks scored on the final model, as "
                                     "lm-evaluation-harness scores them (empty: none): " + ", ".join(DOWNSTREAM_TASKS)
                                     + ".")
    downstream_items: int | Literal["all"] = _f(500, "Items per downstream task at the end of a run: a seeded, "
                                                "stratified subset of its report items (the same for every run), "
                                                "or all.")
    downstream_shots: int = _f(5, "Few-shot examples for the tasks that take them (mmlu: from the dev pool of "
                               "the question's subject, at most 5).")
    downstream_path: str = _f("", "A local copy of the task files (laid out like shared/data/downstream); "
                              "default: $SPARKNET_DOWNSTREAM, else the hub through datasets.")

    def validate(self, at: _At) -> None:
        for i, name in enumerate(self.wikitext):
            if name != "sparknet-blog" and not re.fullmatch(r"hf-strided-[1-9]\d*", name):
                at.fail(f"wikitext[{i}]", f"unknown protocol {name!r}",
                        "use sparknet-blog or hf-strided-<stride>, e.g. hf-strided-512")
        for i, name in enumerate(self.downstream):
            if name not in DOWNSTREAM_TASKS:
                at.fail(f"downstream[{i}]", f"unknown task {name!r}", f"use one of {', '.join(DOWNSTREAM_TASKS)}")
        if self.downstream_items != "all" and self.downstream_items <= 0:
            at.fail("downstream_items", f"must be a positive number or all, got {self.downstream_items}",
                    "use e.g. 500, or all")
        if not 0 <= self.downstream_shots <= 5:
            at.fail("downstream_shots", f"{self.downstream_shots} shots: mmlu's pool has 5 per subject",
                    "use 0 to 5")
        if self.every_tokens <= 0:
            at.fail("every_tokens", f"must be > 0, got {self.every_tokens}", "use e.g. 50M")
        if self.val_tokens < 0 or self.batch_size <= 0 or self.sample_tokens < 0:
            key = "val_tokens" if self.val_tokens < 0 else "batch_size" if self.batch_size <= 0 else "sample_tokens"
            at.fail(key, "must be positive", "use the default")


@dataclass(frozen=True)
class TrackingConfig:
    """Where the run is recorded (MLflow)."""

    enabled: bool = _f(True, "Record the run in MLflow.")
    uri: str = _f("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                  "sqlite:///<lab_dir>/mlflow.db with artifacts under <lab_dir>/mlartifacts).")
    experiment: str = _f("", "MLflow experiment (default: the mixture's name).")
    log_model: bool = _f(False, "Upload the final Hugging Face checkpoint as an MLflow artifact "
                         "(it is always kept under <lab_dir>/runs/).")
    timeout_s: float = _f(10.0, "Give up on a tracking call after this long and keep training; "
                          "what could not be sent stays in the run's local metrics.jsonl.")

    def validate(self, at: _At) -> None:
        if self.experiment and not _SAFE_NAME.match(self.experiment):
            at.fail("experiment", f"{self.experiment!r} is not a safe name", "use letters, digits, '.', '_' or '-'")
        if self.timeout_s <= 0:
            at.fail("timeout_s", "must be > 0", "use e.g. 10")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; `load_config` builds it from a mixture YAML and overrides."""

    name: str = _f("", "Name of the mixture/run (default: the YAML file's stem).")
    lab_dir: str = _f("lab", "Where the lab keeps its state (token cache, stores, runs).")
    mixture: MixtureConfig = _f(MixtureConfig(), "The data mixture.")
    tokenizer: TokenizerConfig = _f(TokenizerConfig(), "The tokenizer.")
    model: ModelConfig = _f(ModelConfig(), "The model shape.")
    train: TrainConfig = _f(TrainConfig(), "The optimization recipe.")
    prepare: PrepareConfig = _f(PrepareConfig(), "Token store preparation.")
    eval: EvalConfig = _f(EvalConfig(), "Evaluation while training.")
    tracking: TrackingConfig = _f(TrackingConfig(), "Experiment tracking (MLflow).")

    def validate(self, at: _At) -> None:
        if not _SAFE_NAME.match(self.name):
            at.fail("name", f"{self.name!r} is not a safe path component",
                    "use letters, digits, '.', '_' or '-'")
        n_positions = self.model.shape()[3]
        if self.train.seq_len > n_positions:
            at.fail("train.seq_len", f"{self.train.seq_len} exceeds the model's context {n_positions}",
                    "lower train.seq_len or raise model.n_positions")
        num_sequences = -(-self.mixture.total_tokens // self.train.seq_len)
        for i, (start, _) in enumerate(self.mixture.stage_list()):
            if int(round(start * num_sequences)) >= num_sequences and i > 0:
                at.fail(f"mixture.stages[{i}].start_fraction",
                        f"the budget of {num_sequences} sequences leaves this stage empty",
                        "raise mixture.total_tokens or move the stage earlier")

    @property
    def lab_path(self) -> Path:
        return Path(self.lab_dir)

    def check_trainable(self, budget_key: str = "mixture.total_tokens") -> None:
        """Before training (not at load: `prepare` of a small budget needs no step): the budget holds at least one
        optimizer step. `budget_key` names the flag that set the budget (a study's --proxy-tokens)."""
        t, total = self.train, self.mixture.total_tokens
        if t.batch_tokens > total:
            raise SparknetError(f"train.batch_tokens: {t.batch_tokens:,} tokens per optimizer step exceed the "
                              f"whole budget ({budget_key} {total:,}): not one step would be taken (fix: lower "
                              f"train.batch_tokens to at most {total // t.seq_len * t.seq_len:,}, or raise {budget_key})")


class _At:
    """Where a value came from, for error messages: the YAML file or the override that set it."""

    def __init__(self, file: str, prefix: str, origins: dict[str, str]):
        self.file, self.prefix, self.origins = file, prefix, origins

    def key(self, sub: str) -> str:
        return f"{self.prefix}.{sub}" if self.prefix and sub else (self.prefix or sub)

    def child(self, sub: str) -> _At:
        return _At(self.file, self.key(sub), self.origins)

    def where(self, key: str) -> str:
        # An override names itself; otherwise the file is to blame.
        for k in (key, *_parents(key)):
            if k in self.origins:
                return self.origins[k]
        return self.file

    def fail(self, sub: str, reason: str, fix: str = "") -> typing.NoReturn:
        key = self.key(sub)
        raise ConfigError(self.where(key), key, f"{reason}" + (f" (fix: {fix})" if fix else ""))


def _parents(key: str) -> list[str]:
    parts = re.split(r"\.", key)
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


