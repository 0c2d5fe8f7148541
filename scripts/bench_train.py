"""Training throughput: sparknet's trainer vs the Hugging Face `Trainer` vs a bare loop, on the same data.

One prepared dataset (a fresh temporary lab; `--lab` keeps one), one model shape, one batch
(micro x accum x seq_len), one AdamW recipe (lr, betas, weight decay, clip 1.0, cosine to min_lr); fp32 on
the CPU, bf16 autocast on CUDA. The budget is exactly (warmup + steps) optimizer steps of full sequences, so
every step has the same tokens. Three contenders run in this one process, `--repeats` times each, in a
rotating order; the median (or with `--stat best` the fastest) of the repeats is reported:

- sparknet: `sparknet.train.train` itself (NullTracker: the local metrics.jsonl is still written, as in
  every run; no progress bar; evaluation only at the mandatory end; checkpoints only at the end;
  `train.compile` from `--compile`). Its final evaluation and checkpoint come after the timed window.
- hf-trainer (the path SparkNet used): `transformers.Trainer` on `GPT2LMHeadModel` built from
  `sparknet.model.hf_config` (SDPA attention) and loaded with the very same initial weights, with
  TrainingArguments that match: same micro-batch, accumulation, lr, `cosine_with_min_lr` to the same min_lr,
  warmup steps, weight decay, betas, eps, max_grad_norm, max_steps, logging_steps, sequential sampler,
  no eval, no saving, report_to=[], no progress printing. Its own defaults otherwise (e.g. the optimizer
  is HF's default `adamw_torch_fused`, embeddings are decayed, warmup starts at lr 0). It gets the SAME
  rows in the same order: input_ids = our inputs, and `shift_labels` = our labels (transformers'
  `ForCausalLMLoss` takes them as given), so it predicts exactly the tokens sparknet predicts.
- bare: the floor. Our GPT, `sparknet.train.build_optimizer` (the same AdamW and parameter groups as
  sparknet), the same LR per step, and for each step: forward -> nll.sum() / step tokens -> backward per
  micro-batch, clip_grad_norm_, step, zero_grad; batches pre-materialized on the device; no host sync.
- hf-bare (diagnostic, `--hf-bare`): the bare loop driving GPT2LMHeadModel (same weights, same AdamW
  groups, HF's loss with num_items_in_batch): hf-trainer vs hf-bare is the HF Trainer's loop cost, bare vs
  hf-bare the model's.

Timing (time.perf_counter; on CUDA a torch.cuda.synchronize() at the two window edges only). The window
covers exactly `--steps` optimizer-step periods after `--warmup-steps` untimed steps:
- bare: from the end of the last warmup step to the end of the last step.
- hf-trainer: from `on_step_end` of the last warmup step to `on_step_end` of the last step (a
  TrainerCallback; the logging of that step falls just after it, inside the next period).
- sparknet: train() has no per-step callback, so its public `fault(step, nll)` hook (called after every
  micro-batch's forward; it returns nll unchanged, which changes nothing) stamps micro-batch 0 of each step.
  The window runs from that stamp at step warmup-1 to that stamp at the last step: also exactly `--steps`
  step periods, shifted by one forward. This is why `--warmup-steps` must be >= 2 (step 0 allocates the
  AdamW state; its backward and optimizer step must not be timed).
tokens/s = steps x micro x accum x seq_len / window seconds (input tokens; all of them are predicted).
Also shown: process CPU seconds in the window, and tokens/s at the median step period (robust to a few
steps slowed by other work on the machine).

Noise: on a small CPU shared with other work, two torch threads on two cores lose whole steps whenever
another process runs (an OpenMP region waits for its descheduled thread: steps of 3 s instead of 0.45 s
were seen); `--threads 1 --repeats 3 --stat best` gives stable numbers there.

Sanity: after training, each contender's model scores the last step's batch (no grad, fp32). sparknet and
bare give the same loss (the same computation); hf-bare nearly (GPT-2's Conv1D sums in another order);
hf-trainer's differs a little more, by its own recipe defaults (warmup from lr 0, decayed embeddings).

Run (from the repository root; CPU only, a few minutes):

    .venv/bin/python scripts/bench_train.py --steps 20 --repeats 3 --threads 1 --stat best --hf-bare
    .venv/bin/python scripts/bench_train.py --device cuda --preset gpt2-70m --seq-len 1024 --micro-batch 24 \\
        --compile on --skip-hf --steps 100 --warmup-steps 10

Vocabulary: `--vocab auto` is GPT-2's tokenizer (50,257, as the real mixtures) on CUDA and a 4,096-token
byte-level BPE trained on the mixture on the CPU, as the quickstart does: with GPT-2's vocab the
50k-wide output layer is ~85% of cpu-small's FLOPs and a step takes ~9 s on a 2-core CPU.

Exit code: 0 whatever the ratios (PASS / MISS is printed), 2 on a usage or data error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sparknet.errors import SparknetError, cli_main  # noqa: E402

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    from sparknet.config import RunConfig
    from sparknet.model import GPT
    from sparknet.prepare import Prepared

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
# (source name, path under --data, weight): three domains of real text; repeats are allowed (a benchmark
# does not care about epochs, and the GPU run draws a few million tokens from ~5M available).
DEFAULT_SOURCES = (
    ("web_edu", "web_edu/fineweb_edu_sample.jsonl", 0.3),
    ("academic", "academic/openstax_textbooks.jsonl", 0.4),
    ("web_general", "web_general", 0.3),
)
PYDOCS_SOURCES = (("docstrings", "docstrings", 0.4), ("readmes", "readmes", 0.3), ("code", "code", 0.3))
TARGET_RATIO_HF = 1.25  # sparknet tokens/s over the HF Trainer's
TARGET_OVERHEAD = 0.03  # bare tokens/s over sparknet's, minus 1
CONTENDERS = ("sparknet", "hf-trainer", "bare")
EXTRA = ("hf-bare",)  # diagnostic, on request: GPT2LMHeadModel in the bare loop


@dataclass
class Result:
    contender: str
    repeat: int
    tokens: int  # tokens in the timed window
    seconds: float  # the timed window
    cpu_seconds: float  # process CPU time in the window, all threads (spin-waiting ones included)
    step_seconds: list[float]  # each timed step period (meaningful where every step syncs: CPU)
    final_loss: float  # the trained model's mean NLL on the last step's batch
    threads: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Setup:
    """Everything the three contenders share."""

    cfg: RunConfig
    prepared: Prepared
    device: torch.device
    num_steps: int
    warmup: int
    step_tokens: int
    compile: bool
    # batches[step][micro] = (input_ids, labels), int64 numpy arrays [micro, seq_len], from the plan's loader
    batches: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)

    @property
    def timed_steps(self) -> int:
        return self.num_steps - self.warmup

    def autocast(self) -> AbstractContextManager:
        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sparknet.config import MODEL_PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="cpu-small", help="model shape (%(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (%(default)s)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps first, >= 2 (%(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (%(default)s)")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward pass (%(default)s)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (%(default)s)")
    p.add_argument("--vocab", choices=("auto", "gpt2", "bpe"), default="auto",
                   help="gpt2: GPT-2's 50,257 tokens; bpe: a BPE of --bpe-vocab-size trained on the mixture; "
                        "auto: gpt2 on cuda, bpe on cpu (%(default)s)")
    p.add_argument("--bpe-vocab-size", type=int, default=4096, help="--vocab bpe: vocabulary size (%(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="%(default)s")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile every contender's model (auto: on cuda only, as train.compile)")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="folder with web_edu/, academic/, web_general/ jsonl (default %(default)s), or "
                        "'pydocs' for the quickstart's text of the installed Python")
    p.add_argument("--lab", type=Path, default=None,
                   help="lab folder for the token stores (default: a temporary one, deleted at the end)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (%(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each contender, rotating order (%(default)s)")
    p.add_argument("--stat", choices=("median", "best"), default="median",
                   help="how the repeats are summarized (%(default)s); on a machine shared with other work, "
                        "'best' is the better estimate: interference only ever slows a run down")
    p.add_argument("--skip-hf", action="store_true", help="leave out the Hugging Face Trainer contender")
    p.add_argument("--hf-bare", action="store_true",
                   help="add the diagnostic contender hf-bare: GPT2LMHeadModel in the bare loop (splits "
                        "the HF Trainer's cost into model and loop)")
    p.add_argument("--only", choices=CONTENDERS + EXTRA, action="append", default=None,
                   help="run only this contender (repeatable)")
    p.add_argument("--malloc-no-mmap", action="store_true",
                   help="glibc only: serve every allocation from the heap and never trim it (mallopt), so the "
                        "big activation/logits buffers are reused instead of mmapped, page-faulted and zeroed "
                        "anew each step; same effect as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.warmup_steps < 2:
        p.error("--warmup-steps must be >= 2 (see the module docstring: how sparknet's window is stamped)")
    for key in ("steps", "seq_len", "micro_batch", "accum", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def build_config(args: argparse.Namespace, lab: Path) -> RunConfig:
    """The mixture: exactly (warmup + steps) full optimizer steps of real text."""
    from sparknet.config import config_from_dict

    if args.data == "pydocs":
        sources = [{"name": n, "kind": "pydocs", "part": part, "weight": w, "max_repeats": 1000}
                   for n, part, w in PYDOCS_SOURCES]
    else:
        data = Path(args.data)
        missing = [str(data / rel) for _, rel, _ in DEFAULT_SOURCES if not (data / rel).exists()]
        if missing:
            raise SparknetError(f"--data {data}: missing {', '.join(missing)} (fix: pass --data DIR holding "
                                f"web_edu/fineweb_edu_sample.jsonl, academic/openstax_textbooks.jsonl and "
                                f"web_general/*.jsonl, or --data pydocs)")
        sources = [{"name": n, "kind": "local", "path": str((data / rel).resolve()), "weight": w,
                    "max_repeats": 1000} for n, rel, w in DEFAULT_SOURCES]
    vocab = args.vocab if args.vocab != "auto" else ("gpt2" if args.device == "cuda" else "bpe")
    tokens_per_step = args.micro_batch * args.accum * args.seq_len
    total = (args.warmup_steps + args.steps) * tokens_per_step
    raw = {
        "name": "bench-train", "lab_dir": str(lab),
        "mixture": {"total_tokens": total, "val_tokens": 8192, "sources": sources},
        "tokenizer": {"name": vocab} | ({"vocab_size": args.bpe_vocab_size, "train_bytes_per_source": 2**20}
                                       if vocab == "bpe" else {}),
        "model": {"preset": args.preset},
        "train": {"seq_len": args.seq_len, "micro_batch_size": args.micro_batch, "batch_tokens": tokens_per_step,
                  "lr": args.lr, "min_lr": args.lr / 10, "device": args.device, "compile": args.compile,
                  "precision": "bf16", "checkpoint_minutes": 0, "checkpoint_every_tokens": 0,
                  "keep_checkpoints": 1},
        # Only the mandatory final evaluation (after the timed window), kept small: no samples.
        "eval": {"every_tokens": 10 * total, "val_tokens": 2048, "sample_tokens": 0, "sample_prompts": []},
        "prepare": {"shard_tokens": 2**20},
        "tracking": {"enabled": False},
    }
    return config_from_dict(raw, where="bench_train")


def make_setup(args: argparse.Namespace, lab: Path) -> Setup:
    import torch

    from sparknet.prepare import check_budget, prepare

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SparknetError("--device cuda: no CUDA GPU is visible to torch (fix: --device cpu, or install a "
                            "CUDA build of torch: bash scripts/bootstrap.sh on the GPU machine)")
    cfg = build_config(args, lab)
    t0 = time.perf_counter()
    prepared = prepare(cfg, progress=False, write_report=False)
    check_budget(prepared)
    loader = prepared.loader()
    steps = loader.num_steps
    if steps != args.warmup_steps + args.steps:  # the budget is whole steps by construction
        raise AssertionError(f"plan has {steps} steps, expected {args.warmup_steps + args.steps}")
    batches = [[(b.input_ids, b.labels) for b in (loader.batch(s, m) for m in range(args.accum))]
               for s in range(steps)]
    print(f"data: {prepared.plan.total_tokens:,} tokens ({steps} steps x {loader.sequences_per_step} x "
          f"{args.seq_len}) from {', '.join(prepared.plan.source_names)}; tokenizer {cfg.tokenizer.name} "
          f"(vocab {prepared.tokenizer.vocab_size:,}); prepared in {time.perf_counter() - t0:.1f} s")
    compiled = cfg.train.compile == "on" or (cfg.train.compile == "auto" and args.device == "cuda")
    return Setup(cfg, prepared, torch.device(args.device), steps, args.warmup_steps,
                 args.micro_batch * args.accum * args.seq_len, compiled, batches)


def set_threads(args: argparse.Namespace) -> int:
    """Pin torch's intra-op threads before every contender (a library may have changed them)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def malloc_no_mmap() -> None:
    """glibc mallopt: no mmap for big blocks (M_MMAP_MAX=0) and no trimming of the heap (M_TRIM_THRESHOLD).

    Above glibc's mmap threshold (at most 32 MiB) every tensor is a fresh mmap: each step then page-faults
    and zeroes the logits and activations again (on cpu-small: ~70k faults and ~0.17 s of kernel time per
    step). Applies to allocations made after the call."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SparknetError("--malloc-no-mmap: mallopt failed (glibc only)")


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def window(marks: dict[int, tuple[float, float]], first: int, last: int) -> tuple[float, float, list[float]]:
    """Wall and CPU seconds from mark `first` to mark `last`, and each step period (wall) in between."""
    seq = [marks[k] for k in range(first, last + 1)]
    return (seq[-1][0] - seq[0][0], seq[-1][1] - seq[0][1],
            [b[0] - a[0] for a, b in zip(seq, seq[1:])])


def last_batch_loss(setup: Setup, nll_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """Mean NLL of a trained model on the last step's batch, fp32, no grad: the same number for every contender."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in setup.batches[-1]:
            xt, yt = torch.from_numpy(x).to(setup.device), torch.from_numpy(y).to(setup.device)
            total += float(nll_sum(xt, yt))
            count += int((yt != -100).sum())
    return total / count


def initial_model(setup: Setup) -> GPT:
    from sparknet.model import build_model

    return build_model(setup.cfg.model, setup.prepared.tokenizer.vocab_size, setup.cfg.train.seed)


# ------------------------------------------------------------------------------------------- contenders


def run_sparknet(setup: Setup, tmp: Path, repeat: int, threads: int) -> Result:
    from sparknet.model import load_exported
    from sparknet.run import make_accelerator
    from sparknet.tracking import NullTracker
    from sparknet.train import train

    accelerator = make_accelerator(setup.cfg)
    run_dir = tmp / f"run-sparknet-{repeat}"  # fresh: an existing checkpoint there would be resumed
    run_dir.mkdir(parents=True)
    marks: dict[int, tuple[float, float]] = {}
    edges = (setup.warmup - 1, setup.num_steps - 1)

    def stamp(step: int, nll: torch.Tensor) -> torch.Tensor:
        if step not in marks:  # the first call of a step is its micro-batch 0, just after the forward
            if step in edges:
                setup.sync()
            marks[step] = now()
        return nll  # unchanged: the run is exactly a normal run

    result = train(setup.cfg, setup.prepared, accelerator, run_dir, NullTracker(run_dir), progress=False,
                   fault=stamp)
    # train() leaves its model and AdamW state registered in the process-global Accelerator
    # (accelerator._models/_optimizers); free them so repeats do not pile up memory.
    accelerator.free_memory()
    seconds, cpu, periods = window(marks, *edges)
    model = load_exported(Path(result.checkpoint), setup.cfg.model).to(setup.device).eval()
    loss = last_batch_loss(setup, lambda x, y: model(x, y).sum())
    return Result("sparknet", repeat, setup.timed_steps * setup.step_tokens, seconds, cpu, periods, loss, threads)


class _Rows:
    """The plan's sequences in plan order, one row per item, as the HF Trainer's train_dataset. `labels` is
    only there so the Trainer computes a loss; `shift_labels` (already shifted: our labels) is what
    `ForCausalLMLoss` uses, so HF predicts exactly the tokens sparknet predicts."""

    def __init__(self, setup: Setup):
        import numpy as np

        self.inputs = np.concatenate([x for step in setup.batches for x, _ in step])
        self.labels = np.concatenate([y for step in setup.batches for _, y in step])

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import torch

        x, y = torch.from_numpy(self.inputs[i]), torch.from_numpy(self.labels[i])
        return {"input_ids": x, "labels": x, "shift_labels": y}


def hf_model(setup: Setup) -> GPT2LMHeadModel:
    """GPT2LMHeadModel of our shape (SDPA attention) holding exactly our initial weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sparknet.model import hf_config, hf_state_dict

    init = initial_model(setup)
    config = GPT2Config(**hf_config(init.shape, setup.prepared.tokenizer.eot_id), attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    keys = model.load_state_dict(hf_state_dict(init), strict=False)
    if keys.unexpected_keys or set(keys.missing_keys) - {"lm_head.weight"}:  # lm_head is tied to wte
        raise AssertionError(f"HF model does not take our weights: {keys}")
    return model


def hf_nll_sum(model: GPT2LMHeadModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    import torch.nn.functional as F

    def nll_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")

    return nll_sum


def run_hf(setup: Setup, tmp: Path, repeat: int, threads: int) -> Result:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    t = setup.cfg.train
    model = hf_model(setup)
    marks: dict[int, tuple[float, float]] = {}
    edges = (setup.warmup, setup.num_steps)  # global_step after the last warmup step, after the last step

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in edges:
                setup.sync()
            marks[state.global_step] = now()

    on_cuda = setup.device.type == "cuda"
    targs = TrainingArguments(
        output_dir=str(tmp / f"hf-{repeat}"), max_steps=setup.num_steps,
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum_steps(1),
        learning_rate=t.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": t.min_lr},
        warmup_steps=round(t.warmup_fraction * setup.num_steps), weight_decay=t.weight_decay,
        adam_beta1=t.beta1, adam_beta2=t.beta2, adam_epsilon=1e-8, max_grad_norm=t.grad_clip,
        logging_steps=t.log_every_steps, eval_strategy="no", save_strategy="no", report_to=[],
        disable_tqdm=True, train_sampling_strategy="sequential", remove_unused_columns=False,
        use_cpu=not on_cuda, bf16=on_cuda, torch_compile=setup.compile, dataloader_pin_memory=on_cuda,
        dataloader_num_workers=0, seed=t.seed)
    trainer = Trainer(model=model, args=targs, train_dataset=_Rows(setup), callbacks=[Stamp()])
    trainer.remove_callback(PrinterCallback)  # sparknet prints nothing per step either (progress=False)
    trainer.train()
    seconds, cpu, periods = window(marks, *edges)
    loss = last_batch_loss(setup, hf_nll_sum(trainer.model.eval()))
    return Result("hf-trainer", repeat, setup.timed_steps * setup.step_tokens, seconds, cpu, periods, loss, threads)


def run_bare(setup: Setup, tmp: Path, repeat: int, threads: int, hf: bool = False) -> Result:
    """The floor: a plain loop over pre-materialized device batches. With `hf`, the same loop drives
    GPT2LMHeadModel instead of our GPT, which separates the model's cost from the HF Trainer's loop."""
    import torch

    from sparknet.train import build_optimizer, lr_at

    t = setup.cfg.train
    if hf:
        model = hf_model(setup).to(setup.device).train()
        # build_optimizer's rule (decay only matmul weights, not embeddings) on HF's parameter names.
        decay = [p.dim() >= 2 and not any(k in n for k in ("wte", "wpe")) for n, p in model.named_parameters()]
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": [p for p, d in zip(params, decay) if d], "weight_decay": t.weight_decay},
             {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=setup.device.type == "cuda")
    else:
        model = initial_model(setup).to(setup.device).train()
        optimizer = build_optimizer(model, t, setup.device)
    if setup.compile and not hf:  # as sparknet.train does: compiled, the loss is the plain chain Inductor fuses
        model.fused_loss = False
    fwd = torch.compile(model) if setup.compile else model
    batches = [[(torch.from_numpy(x).to(setup.device), torch.from_numpy(y).to(setup.device)) for x, y in step]
               for step in setup.batches]
    setup.sync()
    marks: dict[int, tuple[float, float]] = {}
    edges = (setup.warmup - 1, setup.num_steps - 1)
    for step, micro_batches in enumerate(batches):
        lr = lr_at(step, setup.num_steps, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for x, y in micro_batches:
            with setup.autocast():
                if hf:  # HF's loss: sum over the step's tokens / num_items_in_batch, as the Trainer asks for it
                    loss = fwd(input_ids=x, labels=x, shift_labels=y, num_items_in_batch=setup.step_tokens).loss
                else:
                    loss = fwd(x, y).sum() / setup.step_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in edges:
            setup.sync()
        marks[step] = now()
    seconds, cpu, periods = window(marks, *edges)
    model.eval()
    loss = last_batch_loss(setup, hf_nll_sum(model) if hf else (lambda x, y: model(x, y).sum()))
    return Result("hf-bare" if hf else "bare", repeat, setup.timed_steps * setup.step_tokens, seconds, cpu,
                  periods, loss, threads)


def run_hf_bare(setup: Setup, tmp: Path, repeat: int, threads: int) -> Result:
    return run_bare(setup, tmp, repeat, threads, hf=True)


RUNNERS: dict[str, Callable[[Setup, Path, int, int], Result]] = {
    "sparknet": run_sparknet, "hf-trainer": run_hf, "bare": run_bare, "hf-bare": run_hf_bare}


# ------------------------------------------------------------------------------------------- report


def summarize(results: list[Result], stat: str) -> dict[str, dict[str, float]]:
    """Per contender: the median run, or the fastest (`best`), and the median step of the runs."""
    out: dict[str, dict[str, float]] = {}
    for name in CONTENDERS + EXTRA:
        rs = [r for r in results if r.contender == name]
        if not rs:
            continue
        pick = (lambda xs: max(xs)) if stat == "best" else statistics.median
        pick_low = (lambda xs: min(xs)) if stat == "best" else statistics.median
        out[name] = {"tokens_per_s": pick([r.tokens_per_s for r in rs]),
                     "seconds": pick_low([r.seconds for r in rs]),
                     "cpu_seconds": pick_low([r.cpu_seconds for r in rs]),
                     "median_step_tokens_per_s": pick(
                         [r.tokens / len(r.step_seconds) / statistics.median(r.step_seconds) for r in rs]),
                     "final_loss": statistics.median(r.final_loss for r in rs), "runs": len(rs)}
    return out


def rotations(names: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """Each repeat runs every contender once, starting one later each time, so no one always goes first."""
    for r in range(repeats):
        for i in range(len(names)):
            yield r, names[(i + r) % len(names)]


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Offline, quiet, and no tokenizer threads competing with the training threads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    from sparknet.model import GPTShape
    from sparknet.train import peak_flops

    hf_logging.set_verbosity_error()
    wanted = CONTENDERS + (EXTRA if args.hf_bare else ())
    names = [n for n in CONTENDERS + EXTRA if (n in args.only if args.only else n in wanted)
             and not (args.skip_hf and n == "hf-trainer")]
    if not names:
        raise SparknetError("no contender left to run (fix: drop --skip-hf or widen --only)")
    threads = set_threads(args)
    if args.malloc_no_mmap:
        malloc_no_mmap()
    if args.device == "cuda" and torch.cuda.is_available():
        # sparknet's train() turns TF32 on process-wide; set it up front so every contender runs alike.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp_name:
        tmp = Path(tmp_name)
        setup = make_setup(args, args.lab or tmp / "lab")
        t = setup.cfg.train
        shape = GPTShape.from_config(setup.cfg.model, setup.prepared.tokenizer.vocab_size)
        flops_per_token = shape.flops_per_token(t.seq_len)
        peak = peak_flops(setup.device, 0.0)
        device_name = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else \
            f"{platform.processor() or platform.machine()} cpu, {threads} torch threads"
        print(f"model {args.preset}: {shape.num_params() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} "
              f"MFLOP/token; batch {t.micro_batch_size} x {t.grad_accum_steps(1)} x {t.seq_len} = "
              f"{setup.step_tokens:,} tokens/step; {setup.warmup} warmup + {setup.timed_steps} timed steps; "
              f"{'bf16 autocast' if setup.device.type == 'cuda' else 'fp32'}, compile "
              f"{'on' if setup.compile else 'off'}{'; glibc malloc without mmap' if args.malloc_no_mmap else ''}; "
              f"device {device_name}; load average {os.getloadavg()[0]:.2f}")

        results: list[Result] = []
        for repeat, name in rotations(names, args.repeats):
            set_threads(args)
            t0 = time.perf_counter()
            res = RUNNERS[name](setup, tmp, repeat, torch.get_num_threads())
            results.append(res)
            print(f"repeat {repeat + 1} {name:<10}: {res.tokens_per_s:>10,.0f} tokens/s over {res.seconds:.2f} s "
                  f"(whole run incl. setup {time.perf_counter() - t0:.1f} s); loss {res.final_loss:.4f}", flush=True)
            if setup.compile:  # each run compiles a fresh model: keep dynamo under its recompile limit
                torch._dynamo.reset()
            gc.collect()
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()

    summary = summarize(results, args.stat)
    print()
    mfu_head = f" {'MFU':>6}" if peak else ""
    print(f"{'contender':<12} {'tokens/s':>10} {'seconds':>8} {'cpu s':>7} {'median step tok/s':>18}{mfu_head} "
          f"{'final loss':>10}")
    for name, s in summary.items():
        mfu = ""
        if peak:  # a known GPU: MFU = tokens/s x training FLOPs per token / its dense bf16 peak
            s["mfu"] = s["tokens_per_s"] * flops_per_token / peak
            mfu = f" {s['mfu']:>6.1%}"
        print(f"{name:<12} {s['tokens_per_s']:>10,.0f} {s['seconds']:>8.2f} {s['cpu_seconds']:>7.2f} "
              f"{s['median_step_tokens_per_s']:>18,.0f}{mfu} {s['final_loss']:>10.4f}")
    print(f"({args.stat} of {args.repeats} run(s) each; cpu s = process CPU time in the window, all threads; final "
          f"loss = the trained model's mean NLL on the last step's batch, a check that they trained alike)")
    ratios: dict[str, float] = {}
    if "sparknet" in summary and "hf-trainer" in summary:
        ratios["sparknet_over_hf"] = summary["sparknet"]["tokens_per_s"] / summary["hf-trainer"]["tokens_per_s"]
        ok = ratios["sparknet_over_hf"] >= TARGET_RATIO_HF
        print(f"sparknet / HF Trainer tokens/s: {ratios['sparknet_over_hf']:.3f}x (target >= {TARGET_RATIO_HF:g}x) "
              f"{'PASS' if ok else 'MISS'}")
    if "sparknet" in summary and "bare" in summary:
        ratios["overhead_vs_bare"] = summary["bare"]["tokens_per_s"] / summary["sparknet"]["tokens_per_s"] - 1
        ok = ratios["overhead_vs_bare"] <= TARGET_OVERHEAD
        print(f"sparknet overhead over the bare loop: {ratios['overhead_vs_bare']:+.2%} (target <= "
              f"{TARGET_OVERHEAD:.0%}) {'PASS' if ok else 'MISS'}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on this machine makes the numbers noisy)")

    if args.json:
        out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "device": device_name, "torch": torch.__version__, "flops_per_token": flops_per_token,
               "peak_flops": peak, "step_tokens": setup.step_tokens, "timed_steps": setup.timed_steps,
               "summary": summary, "ratios": ratios,
               "runs": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results]}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
