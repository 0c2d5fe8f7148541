"""The training loop: one plan, exactly `total_tokens`, read top to bottom.

    train(cfg, prepared, accelerator, run_dir, tracker) -> TrainResult

`_train` is the loop as it runs, top to bottom: set up (data, model, AdamW, the checkpoint to resume from), then per
optimizer step the step itself, then logging, evaluation and checkpointing when due, and at the end the final
evaluation and checkpoint. Each part is a function of its own, in that order in this file.

What it does per optimizer step: set the LR from the schedule (a pure function of the step), run this
process's micro-batches of the step (gradients synchronized across processes only on the last one), clip,
step AdamW, all-reduce the step's loss statistics, stop if the previous step diverged (its loss is read
once this step is queued, so the GPU is never idle for the check), then log / evaluate / checkpoint
when due (each first checks the pending loss: no checkpoint ever holds an unchecked step). Everything
a resumed run needs is the plan position (the step): batches and LR are functions of it, the rest
(weights, AdamW moments, RNG) is in the checkpoint.

The recipe is global: `train.batch_tokens` per optimizer step, all processes together. Each process's
accumulation is derived (batch_tokens / (seq_len x micro_batch_size x processes)), so step k reads the same
sequences, has the same LR and the same number of steps on 1 or 8 processes, and a run may resume on another
process count (the checkpoint records the global batch; a changed one is refused). The loss of a step is the
mean NLL over the step's predicted tokens across all processes and micro-batches, so the 1- and 2-process
runs of one config agree up to float summation order (tested).
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparknet.checkpoint import agree_on_resume_point, list_checkpoints, load_checkpoint, save_checkpoint
from sparknet.config import RunConfig, TrainConfig
from sparknet.data import IGNORE_INDEX, Loader
from sparknet.device import fit_micro_batch, is_oom, lookup_peak, oom_message
from sparknet.errors import RunFailed, SparknetError
from sparknet.model import GPT, build_model
from sparknet.prepare import Prepared
from sparknet.tracking import NullTracker


def peak_flops(device: torch.device, override: float) -> float | None:
    """Dense bf16 peak of `device` for MFU: `train.peak_flops`, else the table of sparknet.device by the GPU's
    full name (None on the CPU or an unknown GPU: MFU is then not reported)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    found = lookup_peak(torch.cuda.get_device_name(device))
    return found[0] if found else None


def lr_at(step: int, num_steps: int, t: TrainConfig) -> float:
    """The LR of optimizer step `step`. Warmup and decay are fractions of the run, so the schedule keeps
    its shape at any budget (a 50M-token sweep trial and the 1B-token run look alike)."""
    warmup = round(t.warmup_fraction * num_steps)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    if t.schedule == "wsd":  # constant, then a linear decay over the last decay_fraction
        decay_start = num_steps - max(1, round(t.decay_fraction * num_steps))
        if step < decay_start:
            return t.lr
        progress = (step - decay_start + 1) / (num_steps - decay_start)
        return t.lr + (t.min_lr - t.lr) * progress
    progress = (step - warmup + 1) / max(1, num_steps - warmup)
    if t.schedule == "linear":
        return t.lr + (t.min_lr - t.lr) * progress
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def step_tokens(loader: Loader, step: int) -> int:
    """Predicted tokens in optimizer step `step`, all processes together (the last step may be short)."""
    plan, sps = loader.plan, loader.sequences_per_step
    first, end = step * sps, min((step + 1) * sps, plan.num_sequences)
    cut = plan.seq_len - plan.last_len if end == plan.num_sequences else 0
    return (end - first) * plan.seq_len - cut


@dataclass
class TrainResult:
    status: str  # finished | diverged
    steps: int
    tokens: int
    tokens_per_source: dict[str, int]
    train_loss: float  # mean over the last logging interval
    val_loss: dict[str, float]
    seconds: float  # training wall time (all sessions of a resumed run)
    tokens_per_s: float
    mfu: float | None
    checkpoint: str = ""
    final_model: str = ""
    samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Diverged(RunFailed):
    pass


# ---------------------------------------------------------------------------------------------
# Evaluation while training: per-source held-out loss and greedy samples (main process only).


@torch.no_grad()
def source_val_loss(model: GPT, prepared: Prepared, seq_len: int, max_tokens: int, batch_size: int,
                    device: torch.device, autocast) -> dict[str, float]:
    """Token-weighted mean NLL on each source's held-out slice, in non-overlapping seq_len windows."""
    model.eval()
    out = {}
    for name in prepared.plan.source_names:
        val = prepared.stores[name].val()
        n = len(val) if not max_tokens else min(len(val), max_tokens + 1)
        ids = np.asarray(val.read(0, n), dtype=np.int64)
        num_windows = (len(ids) - 1) // seq_len
        if num_windows == 0:
            continue
        windows = ids[: num_windows * seq_len + 1]
        x = np.lib.stride_tricks.sliding_window_view(windows, seq_len + 1)[::seq_len]
        total, count = 0.0, 0
        for i in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.array(x[i:i + batch_size])).to(device)  # a copy: the view is read-only
            with autocast():
                nll = model(chunk[:, :-1], chunk[:, 1:])
            total += float(nll.sum())
            count += nll.numel()
        out[name] = total / count
    model.train()
    return out


@torch.no_grad()
def greedy_samples(model: GPT, tokenizer, prompts: tuple[str, ...], num_tokens: int, device: torch.device,
                   autocast) -> list[str]:
    model.eval()
    out = []
    ctx = model.shape.n_positions
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
        for _ in range(num_tokens):
            with autocast():
                logits = model(ids[:, -ctx:])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out.append(prompt + tokenizer.decode(ids[0, -num_tokens:].tolist()) if num_tokens else prompt)
    model.train()
    return out


# ---------------------------------------------------------------------------------------------
# The loop. `_train` is the whole of it, top to bottom; the functions after it come in the order it calls them:
# set-up (_set_up, _resume, _start), one optimizer step (_step, _micro_batches), what the step ends with (_due,
# _check_pending, _log, _evaluate, _checkpoint), the end (_finish). What one step hands the next lives in a `_Run`.


def _batches(loader: Loader, start_step: int, rank: int, device: torch.device):
    """(step, micro, input_ids, labels, source_ids) from a background thread: reading the memmapped
    shards and pinning host memory overlaps with the GPU's work; copies are non-blocking."""
    q: queue.Queue = queue.Queue(maxsize=2 * loader.grad_accum_steps)
    pin = device.type == "cuda"
    stop = threading.Event()

    def produce():
        try:
            for step in range(start_step, loader.num_steps):
                for micro in range(loader.grad_accum_steps):
                    b = loader.batch(step, micro, rank)
                    ts = [torch.from_numpy(a) for a in (b.input_ids, b.labels, b.source_ids)]
                    if pin:
                        ts = [t.pin_memory() for t in ts]
                    while not stop.is_set():
                        try:
                            q.put((step, micro, *ts), timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as exc:  # surface reader errors in the training thread
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="sparknet-batches")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            step, micro, *ts = item
            yield (step, micro, *(t.to(device, non_blocking=pin) for t in ts))
            if step == loader.num_steps - 1 and micro == loader.grad_accum_steps - 1:
                return
    finally:
        stop.set()


def _maybe_compile(model, gpt: GPT, mode: str, device: torch.device, example: tuple[torch.Tensor, torch.Tensor],
                   autocast):
    """torch.compile when asked (auto: on CUDA), with a warm-up step so that a compiler failure (as on
    the DGX Spark's GB10 without a CUDA 13 ptxas) falls back to eager here, not mid-run. `model` is what
    runs (maybe DDP-wrapped), `gpt` the module inside it."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return model, False
    # Compiled, the loss is logits -> F.cross_entropy, which Inductor fuses itself; the hand-fused
    # linear_cross_entropy (an autograd.Function with in-place chunks) is the eager path.
    gpt.fused_loss = False
    compiled = torch.compile(model)
    try:
        with autocast():
            compiled(*example).sum().backward()
        model.zero_grad(set_to_none=True)
        return compiled, True
    except Exception as exc:
        if is_oom(exc):  # the micro-batch does not fit: train() says which does, eager would not fit either
            raise
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        print(f"warning: torch.compile failed ({type(exc).__name__}: {first}); training in eager mode "
              f"(on a DGX Spark set TRITON_PTXAS_PATH to CUDA 13's ptxas)", file=sys.stderr, flush=True)
        torch._dynamo.reset()
        gpt.fused_loss = True
        model.zero_grad(set_to_none=True)
        return model, False


def build_optimizer(model: GPT, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay only the matmul weights: biases, LayerNorms and the (tied) embedding are left alone.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("wte", "wpe"))]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith(("wte", "wpe")))]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW on CUDA and on the CPU (one kernel over all parameters: 8.0 -> 1.3 ms a step for cpu-small).
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))


def train(cfg: RunConfig, prepared: Prepared, accelerator, run_dir: Path, tracker: NullTracker | None = None,
          *, on_eval=None, progress: bool = True, fault=None) -> TrainResult:
    """`_train`, fitted to the device: `train.micro_batch_size=auto` is resolved first (the largest micro-batch that
    fits, probed once; sparknet.device.fit_micro_batch), and running out of memory becomes a one-line error naming
    the largest micro-batch the memory estimate fits (the global batch stays the recipe's)."""
    if cfg.train.micro_batch_size == "auto":
        mb = fit_micro_batch(cfg, prepared.tokenizer.vocab_size, accelerator)
        cfg = replace(cfg, train=replace(cfg.train, micro_batch_size=mb))
        prepared = replace(prepared, config=cfg)  # its loader splits the steps by this micro-batch
    try:
        return _train(cfg, prepared, accelerator, run_dir, tracker, on_eval=on_eval, progress=progress, fault=fault)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_oom(exc):
            raise
        message = oom_message(cfg, prepared.tokenizer.vocab_size, accelerator.device, accelerator.num_processes,
                              cfg.train.micro_batch_size)
    # Raised outside the except clause: the out-of-memory's traceback (and the tensors its frames hold) is gone.
    raise SparknetError(message)


def _train(cfg: RunConfig, prepared: Prepared, accelerator, run_dir: Path, tracker: NullTracker | None = None,
           *, on_eval=None, progress: bool = True, fault=None) -> TrainResult:
    """Train from the plan (resuming from the newest checkpoint in `run_dir`), evaluate, checkpoint.

    on_eval(tokens, val_losses) is called after each evaluation (the sweep reports and prunes there).
    fault(step, loss_tensor) -> loss_tensor lets tests inject a NaN; None in real runs."""
    run = _set_up(cfg, prepared, accelerator, run_dir, tracker or NullTracker(run_dir), on_eval)
    _start(run, progress)
    # Step k's batches are a pure function of k: a resumed run reads on from its checkpoint's step.
    batches = _batches(run.loader, run.step, run.rank, run.device) if run.step < run.num_steps else iter(())
    run.model_ddp.train()
    while run.step < run.num_steps:
        _step(run, batches, fault)
        log_due, eval_due, ckpt_due = _due(run)
        if log_due or eval_due or ckpt_due:  # (log_due includes the last step)
            _check_pending(run)  # nothing is logged, evaluated or checkpointed past an unchecked loss
        if log_due:
            _log(run)
        if eval_due:
            # Due at multiples of eval.every_tokens, kept in the checkpointed state: a resumed run evaluates where the
            # uninterrupted one would.
            run.state["next_eval_tokens"] = (run.tokens // cfg.eval.every_tokens + 1) * cfg.eval.every_tokens
            _evaluate(run)
        if ckpt_due:
            _checkpoint(run)
    return _finish(run)


@dataclass(eq=False)
class _Run:
    """One process's run: what the set-up built, and what the loop carries from one step to the next."""

    cfg: RunConfig
    prepared: Prepared
    accelerator: Any
    run_dir: Path
    tracker: NullTracker
    on_eval: Callable[[int, dict[str, float]], None] | None
    device: torch.device
    rank: int
    world: int
    is_main: bool
    loader: Loader
    model: GPT
    optimizer: torch.optim.AdamW
    # Everything a resumed run needs beside the weights, AdamW and the RNG: a fresh run's, or its checkpoint's.
    state: dict
    # Set by _start: the model as the micro-batches run it (accelerate's wrap: DDP; maybe compiled), and for logging.
    model_ddp: Any = None
    fwd: Any = None
    autocast: Any = None
    hf_tok: Any = None  # the tokenizer each checkpoint exports (main process only)
    flops_per_token: float = 0.0
    peak: float | None = None  # the device's dense bf16 FLOP/s for MFU (None: not reported)
    bar: Any = None
    # The counters (_start sets them from the state).
    step: int = 0
    tokens: int = 0
    start_step: int = 0  # the same on every rank (each read the same checkpoint: agree_on_resume_point)
    per_source_tokens: torch.Tensor | None = None
    recent: deque = field(default_factory=deque)  # the divergence guard's recent step losses
    seconds_before: float = 0.0  # training seconds of the sessions before this one
    session_start: float = 0.0
    paused: float = 0.0  # seconds spent evaluating/checkpointing, excluded from throughput
    last_ckpt_time: float = 0.0
    last_ckpt_tokens: int = 0
    interval: torch.Tensor | None = None
    interval_start: float = 0.0
    interval_tokens: int = 0
    lr: float = 0.0  # the last step's
    grad_norm: torch.Tensor | None = None  # the last step's, on the device
    last: dict = field(default_factory=dict)  # what the last logging interval measured
    pending: tuple[int, int, torch.Tensor] | None = None  # (step, tokens before it, loss): not yet checked
    val_losses: dict[str, float] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    @property
    def t(self) -> TrainConfig:
        return self.cfg.train

    @property
    def num_steps(self) -> int:
        return self.loader.num_steps

    @property
    def names(self) -> list[str]:
        return self.prepared.plan.source_names

    @property
    def num_sources(self) -> int:
        return len(self.prepared.plan.source_names)

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def source_tokens(self) -> list[int]:
        return [round(v) for v in self.per_source_tokens.tolist()]


def _set_up(cfg: RunConfig, prepared: Prepared, accelerator, run_dir: Path, tracker: NullTracker,
            on_eval) -> _Run:
    """The data, the model and AdamW, restored from the newest checkpoint in `run_dir` if there is one."""
    t = cfg.train
    device, world = accelerator.device, accelerator.num_processes
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (optimizer, norms) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    loader = prepared.loader(world)  # a SparknetError when the global batch does not split over `world`
    model = build_model(cfg.model, prepared.tokenizer.vocab_size, t.seed).to(device)
    optimizer = build_optimizer(model, t, device)
    state = {"step": 0, "tokens": 0, "tokens_per_source": [0] * len(prepared.plan.source_names), "seconds": 0.0,
             "recent_losses": [], "next_eval_tokens": cfg.eval.every_tokens,
             "plan_sha256": prepared.plan.fingerprint(), "eos_token_id": prepared.tokenizer.eot_id,
             "batch_tokens": t.batch_tokens, "world_size": world}
    run = _Run(cfg, prepared, accelerator, run_dir, tracker, on_eval, device, accelerator.process_index, world,
               accelerator.is_main_process, loader, model, optimizer, state)
    _resume(run)
    return run


def _resume(run: _Run) -> None:
    """Load the newest checkpoint, if any, into the model, AdamW, the RNG and `run.state`. It must have been written
    for this data plan and this global batch: step k's data and LR are functions of both."""
    existing = list_checkpoints(run.ckpt_root)
    # Before any collective that depends on the step (DDP's wrap, the compile warm-up): ranks that disagree would
    # otherwise wait in different collectives.
    agree_on_resume_point(int(existing[-1].name.split("-")[-1]) if existing else 0,
                          existing[-1].name if existing else "", run.run_dir)
    if not existing:
        return
    state = load_checkpoint(existing[-1], run.model, run.optimizer, run.device)
    if state["plan_sha256"] != run.prepared.plan.fingerprint():
        raise SparknetError(f"{existing[-1]}: checkpoint was written for a different data plan (fix: "
                            f"rerun with --fresh, or delete {run.run_dir})")
    if state.get("batch_tokens") != run.t.batch_tokens:
        # Step k's data and LR are functions of the global batch: resuming under another one would skip or
        # repeat data and bend the schedule. (Checkpoints from before it was recorded are refused too.)
        raise SparknetError(f"{existing[-1]}: checkpoint was written with train.batch_tokens="
                            f"{state.get('batch_tokens', 'unrecorded')}, this run has {run.t.batch_tokens} (fix: "
                            f"resume with the same train.batch_tokens, or rerun with --fresh)")
    if run.is_main:
        moved = f"; written by {state['world_size']} process(es), resumed on {run.world}" \
            if state.get("world_size", run.world) != run.world else ""
        print(f"resuming from {existing[-1].name}: {state['tokens']:,} of {run.prepared.plan.total_tokens:,} "
              f"tokens done{moved}", flush=True)
    state["world_size"] = run.world
    run.state = state


def _start(run: _Run, progress: bool) -> None:
    """Wrap the model for the device (and compile it when asked), say what trains, and set the counters."""
    t, device = run.t, run.device
    # Only the model goes through accelerate (DDP wrapping, bf16 autocast): the optimizer stays a plain
    # AdamW, since we accumulate and scale ourselves and bf16 needs no grad scaler; accelerate's optimizer
    # wrapper cost ~0.5 ms a step in import-system lookups.
    run.model_ddp = run.accelerator.prepare(run.model)
    run.autocast = run.accelerator.autocast
    example = (torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long, device=device),
               torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long, device=device))
    run.fwd, compiled = _maybe_compile(run.model_ddp, run.model, t.compile, device, example, run.autocast) \
        if run.state["step"] < run.num_steps else (run.model_ddp, False)
    run.hf_tok = run.prepared.tokenizer.to_hf() if run.is_main else None
    run.flops_per_token = run.model.shape.flops_per_token(t.seq_len)
    run.peak = peak_flops(device, t.peak_flops)
    if run.is_main:
        print(f"model {run.cfg.model.preset}: {run.model.shape.num_params() / 1e6:.2f}M parameters, "
              f"{run.flops_per_token / 1e6:.0f} MFLOP/token; {run.num_steps:,} steps of "
              f"{step_tokens(run.loader, 0):,} tokens on {run.world} x {device.type}"
              f"{' (compiled)' if compiled else ''}: {t.micro_batch_size} sequences x "
              f"{run.loader.grad_accum_steps} micro-batches x {run.world} process(es)", flush=True)
    _start_counters(run, progress)


def _start_counters(run: _Run, progress: bool) -> None:
    state = run.state
    run.step = run.start_step = state["step"]
    run.tokens = state["tokens"]
    # Tokens per source, counted on the device from the labels that took a loss (float64 is exact far
    # beyond any budget); read back only when logging, checkpointing and at the end.
    run.per_source_tokens = torch.tensor(state["tokens_per_source"], dtype=torch.float64, device=run.device)
    run.recent = deque(state["recent_losses"], maxlen=50)
    run.seconds_before = state["seconds"]
    run.session_start = time.time()
    run.last_ckpt_time, run.last_ckpt_tokens = time.time(), run.tokens
    # Interval statistics on the device: [loss_sum, tokens, per-source loss sums..., per-source tokens...].
    run.interval = torch.zeros(2 + 2 * run.num_sources, dtype=torch.float64, device=run.device)
    run.interval_start, run.interval_tokens = time.time(), 0
    run.grad_norm = torch.zeros((), device=run.device)
    # What the last logging interval measured; restored on resume so a finished run reports it again.
    run.last = state.get("last") or {"loss": float("nan"), "tokens_per_s": 0.0, "mfu": None}
    if run.is_main and progress:
        from tqdm import tqdm
        run.bar = tqdm(total=run.prepared.plan.total_tokens, initial=run.tokens, unit="tok", unit_scale=True,
                       dynamic_ncols=True, desc=run.cfg.name[:20], file=sys.stderr)


def _step(run: _Run, batches, fault) -> None:
    """One optimizer step: the LR of the schedule (a pure function of the step), this process's micro-batches,
    clipping, AdamW; the step's statistics summed over the processes; the previous step's loss checked."""
    t, k = run.t, run.num_sources
    run.lr = lr_at(run.step, run.num_steps, t)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    n_step_tokens = step_tokens(run.loader, run.step)
    stats = _micro_batches(run, batches, n_step_tokens, fault)
    run.grad_norm = run.accelerator.clip_grad_norm_(run.model_ddp.parameters(), t.grad_clip or float("inf"))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    stats = run.accelerator.reduce(stats, reduction="sum")
    run.interval += stats
    run.per_source_tokens += stats[2 + k:]
    run.interval_tokens += n_step_tokens
    # The previous step's loss is still on the device. It is read (one host sync) only now that this step is
    # queued, so the GPU never waits for the guard.
    if run.pending is not None:
        _check_pending(run)
    run.pending = (run.step, run.tokens, stats[0] / stats[1])
    run.step += 1
    run.tokens += n_step_tokens
    if run.bar is not None:
        run.bar.update(n_step_tokens)


def _micro_batches(run: _Run, batches, n_step_tokens: int, fault) -> torch.Tensor:
    """Forward and backward of this process's micro-batches of the step. Returns its loss statistics, on the
    device: [loss sum, tokens, per-source loss sums..., per-source tokens...] (float64)."""
    accum, k = run.loader.grad_accum_steps, run.num_sources
    stats = torch.zeros(2 + 2 * k, dtype=torch.float64, device=run.device)
    for micro in range(accum):
        _, _, input_ids, labels, source_ids = next(batches)
        # Synchronize gradients across processes only on the last micro-batch (accelerate's no_sync).
        sync = nullcontext() if micro == accum - 1 else run.accelerator.no_sync(run.model_ddp)
        with sync:
            with run.autocast():
                nll = run.fwd(input_ids, labels)  # [B, T], 0 where labels are ignored
            if fault is not None:
                nll = fault(run.step, nll)
            # Sum over this micro-batch / the whole step's tokens; x world because DDP averages.
            run.accelerator.backward(nll.sum() * (run.world / n_step_tokens))
        with torch.no_grad():
            row_loss = nll.detach().double().sum(dim=1)
            row_tokens = (labels != IGNORE_INDEX).sum(dim=1).double()
            src = source_ids.clamp(min=0)
            real = (source_ids >= 0).double()
            stats[0] += row_loss.sum()
            stats[1] += row_tokens.sum()
            stats[2:2 + k].index_add_(0, src, row_loss * real)
            stats[2 + k:].index_add_(0, src, row_tokens * real)
    return stats


def _due(run: _Run) -> tuple[bool, bool, bool]:
    """(log, evaluate, checkpoint): what the step just done ends with."""
    t, step, num_steps = run.t, run.step, run.num_steps
    log_due = step % t.log_every_steps == 0 or step == num_steps
    eval_due = run.tokens >= run.state["next_eval_tokens"] and step < num_steps
    ckpt_due = bool(t.checkpoint_every_tokens) and run.tokens - run.last_ckpt_tokens >= t.checkpoint_every_tokens
    if t.checkpoint_minutes and log_due and not ckpt_due:
        # Time is each process's own: decided at logging steps, by the main process for everyone, so
        # that all processes enter the checkpoint's barrier together (disagreeing would deadlock DDP).
        ckpt_due = time.time() - run.last_ckpt_time >= 60 * t.checkpoint_minutes
        if run.world > 1:
            flag = torch.tensor(float(ckpt_due and run.is_main), device=run.device)
            ckpt_due = bool(run.accelerator.reduce(flag, reduction="sum") > 0)
    return log_due, eval_due, ckpt_due and step < num_steps  # the end has its own checkpoint (_finish)


def _check_pending(run: _Run) -> None:
    """Divergence guard, on the pending step's loss: a non-finite loss, or one far above its recent average, ends
    the run. No checkpoint is written before this check has passed, so the last one is the last good state."""
    checked_step, tokens_before, loss = run.pending
    run.pending = None
    recent, step_loss = run.recent, float(loss)
    if not math.isfinite(step_loss) or (len(recent) >= 10 and step_loss > run.t.diverge_factor * np.mean(recent)):
        why = "is not finite" if not math.isfinite(step_loss) else \
            f"is {step_loss / np.mean(recent):.1f}x its recent average {np.mean(recent):.3f}"
        good = list_checkpoints(run.ckpt_root)
        raise Diverged(f"diverged at step {checked_step} ({tokens_before:,} tokens): loss {step_loss:.4g} {why}; "
                       f"last good checkpoint: {good[-1] if good else 'none yet'} (fix: lower train.lr, raise "
                       f"train.warmup_fraction or lower train.grad_clip)")
    recent.append(step_loss)


def _log(run: _Run) -> None:
    """The logging interval's figures: train loss (all, per source), LR, gradient norm, tokens/s and MFU (the time
    spent evaluating and checkpointing left out)."""
    iv, k, last = run.interval.cpu().numpy(), run.num_sources, run.last
    elapsed = time.time() - run.interval_start - run.paused
    last["loss"] = float(iv[0] / iv[1])
    last["tokens_per_s"] = run.interval_tokens / max(elapsed, 1e-9)
    last["mfu"] = last["tokens_per_s"] * run.flops_per_token / (run.peak * run.world) if run.peak else None
    metrics = {"train/loss": last["loss"], "train/lr": run.lr, "train/grad_norm": float(run.grad_norm),
               "perf/tokens_per_s": last["tokens_per_s"], "tokens": run.tokens}
    for i, name in enumerate(run.names):
        if iv[2 + k + i]:
            metrics[f"train/loss/{name}"] = float(iv[2 + i] / iv[2 + k + i])
    if last["mfu"] is not None:
        metrics["perf/mfu"] = last["mfu"]
    if run.is_main:
        run.tracker.log_metrics(metrics, run.step)
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}", refresh=False)
    run.interval.zero_()
    run.interval_start, run.interval_tokens, run.paused = time.time(), 0, 0.0


def _evaluate(run: _Run) -> None:
    """Held-out loss per source and greedy samples, on the main process; then `on_eval` (the sweep's pruning)."""
    t0 = time.time()
    cfg, t = run.cfg, run.t
    if run.is_main:
        run.val_losses = source_val_loss(run.model, run.prepared, t.seq_len, cfg.eval.val_tokens,
                                         cfg.eval.batch_size, run.device, run.autocast)
        run.samples = greedy_samples(run.model, run.prepared.tokenizer, cfg.eval.sample_prompts,
                                     cfg.eval.sample_tokens, run.device, run.autocast)
        metrics = {f"val/loss/{k}": v for k, v in run.val_losses.items()}
        if run.val_losses:
            metrics["val/loss"] = float(np.mean(list(run.val_losses.values())))
        run.tracker.log_metrics(metrics | {"tokens": run.tokens}, run.step)
        with open(run.run_dir / "samples.txt", "a") as f:
            f.write(f"## step {run.step}, {run.tokens:,} tokens\n" + "\n".join(f"- {s!r}" for s in run.samples)
                    + "\n")
    run.accelerator.wait_for_everyone()
    run.paused += time.time() - t0
    if run.on_eval is not None and run.is_main:
        run.on_eval(run.tokens, dict(run.val_losses))


def _checkpoint(run: _Run) -> Path | None:
    """Save the step (main process; the others wait at the barrier). Returns its folder on the main process."""
    t0 = time.time()
    path = None
    if run.is_main:
        snapshot = dict(run.state, step=run.step, tokens=run.tokens, tokens_per_source=run.source_tokens(),
                        seconds=run.seconds_before + (time.time() - run.session_start),
                        recent_losses=list(run.recent), last=run.last)
        path = save_checkpoint(run.ckpt_root, run.model, run.optimizer, snapshot, run.hf_tok, run.t.keep_checkpoints,
                               run.device)
    run.accelerator.wait_for_everyone()
    run.paused += time.time() - t0
    run.last_ckpt_time, run.last_ckpt_tokens = time.time(), run.tokens
    return path


def _finish(run: _Run) -> TrainResult:
    """The end: the final evaluation, then a checkpoint so that rerunning a finished run does no work; the tokens
    per source, counted from the batches actually trained on (labels that took a loss), must be the plan's."""
    if run.bar is not None:
        run.bar.close()
    _evaluate(run)
    # Whether the final checkpoint exists already (a finished run resumed) is decided from state every rank shares:
    # listing the folder here would race with the main process writing step-N and let one rank skip the collective.
    final_ckpt = run.ckpt_root / f"step-{run.step:08d}" if run.step == run.start_step else _checkpoint(run)
    seconds = run.seconds_before + (time.time() - run.session_start)
    counted = dict(zip(run.names, run.source_tokens()))
    if run.is_main:
        expected = run.prepared.plan.tokens_per_source()
        if list(counted.values()) != expected.tolist():
            raise AssertionError(f"trained tokens per source {list(counted.values())} differ from the plan "
                                 f"{expected.tolist()}")
        run.tracker.log_metrics({f"tokens/{n}": v for n, v in counted.items()} | {"tokens": run.tokens}, run.step)
    last = run.last
    return TrainResult(
        status="finished", steps=run.step, tokens=run.tokens, tokens_per_source=counted,
        train_loss=last["loss"], val_loss=run.val_losses, seconds=seconds, tokens_per_s=last["tokens_per_s"],
        mfu=last["mfu"], checkpoint=str(final_ckpt or ""), samples=run.samples)
