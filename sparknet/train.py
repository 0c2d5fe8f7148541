"""The training loop: one plan, exactly `total_tokens`, read top to bottom.

    train(cfg, prepared, accelerator, run_dir, tracker) -> TrainResult

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

import json
import math
import os
import queue
import random
import shutil
import sys
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from sparknet.config import RunConfig, TrainConfig
from sparknet.data import IGNORE_INDEX, Loader
from sparknet.device import fit_micro_batch, is_oom, lookup_peak, oom_message
from sparknet.errors import RunFailed, SparknetError
from sparknet.model import GPT, build_model, export_hf
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
# Checkpoints: <run_dir>/checkpoints/step-00001234/ = an HF checkpoint (model.safetensors, config.json,
# tokenizer) + trainer.safetensors (exact padded weights, AdamW moments, RNG) + trainer_state.json.
# Written into a temp dir and renamed, so a kill leaves the previous checkpoint intact. No pickles.


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


_CPU = torch.device("cpu")


def agree_on_resume_point(step: int, checkpoint: str, run_dir: Path) -> None:
    """Every process must resume from the same checkpoint. Each reads `run_dir` on its own machine, and processes on
    nodes that do not share the lab's filesystem see different folders (rank 0 writes the checkpoints): a rank that
    starts at step 0 while the others resume would train on other data with other weights, silently. One all-gather
    of (step, checkpoint, host); a disagreement fails every process with the same one-line error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    import socket

    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (step, checkpoint or "no checkpoint", socket.gethostname()))
    if len({(s, c) for s, c, _ in seen}) > 1:
        which = "; ".join(f"rank {r} on {h}: {c}" for r, (_, c, h) in enumerate(seen))
        raise SparknetError(f"{run_dir}: the processes would resume from different points ({which}): nodes that do "
                            f"not share the lab's filesystem see different run folders (fix: put lab_dir on a "
                            f"filesystem every node mounts, or copy {run_dir} to every node before resuming)")


def save_checkpoint(root: Path, model: GPT, optimizer, state: dict, tokenizer_hf, keep: int,
                    device: torch.device = _CPU) -> Path:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(model, tmp, tokenizer_hf, eos_token_id=state.get("eos_token_id"))
    tensors = {f"model.{k.removeprefix('_orig_mod.')}": v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, val in st.items():
            tensors[f"optim.{idx}.{key}"] = (val if torch.is_tensor(val) else torch.tensor(val)).detach().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        # This process's own device only: a checkpoint written on an 8-GPU box must restore on a 1-GPU one.
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    save_file(tensors, str(tmp / "trainer.safetensors"))
    meta = dict(state, param_groups=opt["param_groups"], rng_python=random.getstate(),
                rng_numpy=[np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])])
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=str))
    _fsync_tree(tmp)
    if final.exists():  # the same step checkpointed again (e.g. the end of a resumed finished run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(root, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and
                   (p / "trainer_state.json").exists()), key=lambda p: p.name)


def load_checkpoint(path: Path, model: GPT, optimizer, device: torch.device = _CPU) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainer.safetensors"))
    meta = json.loads((path / "trainer_state.json").read_text())
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        saved = tensors["rng.cuda"]
        if saved.dim() == 2:  # older checkpoints hold every visible GPU's state: take the writer's first one
            saved = saved[0]
        torch.cuda.set_rng_state(saved, device)
    kind, pos, has_gauss, cached = meta["rng_numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return meta


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
# The loop.


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
    t = cfg.train
    tracker = tracker or NullTracker(run_dir)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (optimizer, norms) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    loader = prepared.loader(world)  # a SparknetError when the global batch does not split over `world`
    accum = loader.grad_accum_steps
    num_steps = loader.num_steps
    names = prepared.plan.source_names
    num_sources = len(names)

    model = build_model(cfg.model, prepared.tokenizer.vocab_size, t.seed).to(device)
    optimizer = build_optimizer(model, t, device)
    ckpt_root = run_dir / "checkpoints"
    state = {"step": 0, "tokens": 0, "tokens_per_source": [0] * num_sources, "seconds": 0.0,
             "recent_losses": [], "next_eval_tokens": cfg.eval.every_tokens,
             "plan_sha256": prepared.plan.fingerprint(), "eos_token_id": prepared.tokenizer.eot_id,
             "batch_tokens": t.batch_tokens, "world_size": world}
    existing = list_checkpoints(ckpt_root)
    # Before any collective that depends on the step (DDP's wrap, the compile warm-up): ranks that disagree would
    # otherwise wait in different collectives.
    agree_on_resume_point(int(existing[-1].name.split("-")[-1]) if existing else 0,
                          existing[-1].name if existing else "", run_dir)
    if existing:
        state = load_checkpoint(existing[-1], model, optimizer, device)
        if state["plan_sha256"] != prepared.plan.fingerprint():
            raise SparknetError(f"{existing[-1]}: checkpoint was written for a different data plan (fix: "
                                f"rerun with --fresh, or delete {run_dir})")
        if state.get("batch_tokens") != t.batch_tokens:
            # Step k's data and LR are functions of the global batch: resuming under another one would skip or
            # repeat data and bend the schedule. (Checkpoints from before it was recorded are refused too.)
            raise SparknetError(f"{existing[-1]}: checkpoint was written with train.batch_tokens="
                                f"{state.get('batch_tokens', 'unrecorded')}, this run has {t.batch_tokens} (fix: "
                                f"resume with the same train.batch_tokens, or rerun with --fresh)")
        if is_main:
            moved = f"; written by {state['world_size']} process(es), resumed on {world}" \
                if state.get("world_size", world) != world else ""
            print(f"resuming from {existing[-1].name}: {state['tokens']:,} of {prepared.plan.total_tokens:,} "
                  f"tokens done{moved}", flush=True)
        state["world_size"] = world
    # Only the model goes through accelerate (DDP wrapping, bf16 autocast): the optimizer stays a plain
    # AdamW, since we accumulate and scale ourselves and bf16 needs no grad scaler; accelerate's optimizer
    # wrapper cost ~0.5 ms a step in import-system lookups.
    model_ddp = accelerator.prepare(model)
    autocast = accelerator.autocast
    example = (torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long, device=device),
               torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long, device=device))
    fwd, compiled = _maybe_compile(model_ddp, model, t.compile, device, example, autocast) if state["step"] < num_steps \
        else (model_ddp, False)
    hf_tok = prepared.tokenizer.to_hf() if is_main else None
    flops_per_token = model.shape.flops_per_token(t.seq_len)
    peak = peak_flops(device, t.peak_flops)
    if is_main:
        print(f"model {cfg.model.preset}: {model.shape.num_params() / 1e6:.2f}M parameters, "
              f"{flops_per_token / 1e6:.0f} MFLOP/token; {num_steps:,} steps of {step_tokens(loader, 0):,} tokens on "
              f"{world} x {device.type}{' (compiled)' if compiled else ''}: {t.micro_batch_size} sequences x "
              f"{accum} micro-batches x {world} process(es)", flush=True)

    step, tokens = state["step"], state["tokens"]
    start_step = step  # the same on every rank (each read the same checkpoint: agree_on_resume_point above)
    # Tokens per source, counted on the device from the labels that took a loss (float64 is exact far
    # beyond any budget); read back only when logging, checkpointing and at the end.
    per_source_tokens = torch.tensor(state["tokens_per_source"], dtype=torch.float64, device=device)
    recent = deque(state["recent_losses"], maxlen=50)
    seconds_before = state["seconds"]
    session_start = time.time()
    paused = 0.0  # seconds spent evaluating/checkpointing, excluded from throughput
    last_ckpt_time, last_ckpt_tokens = time.time(), tokens
    # Interval statistics on the device: [loss_sum, tokens, per-source loss sums..., per-source tokens...].
    interval = torch.zeros(2 + 2 * num_sources, dtype=torch.float64, device=device)
    interval_start, interval_tokens, grad_norm = time.time(), 0, torch.zeros((), device=device)
    # What the last logging interval measured; restored on resume so a finished run reports it again.
    last = state.get("last") or {"loss": float("nan"), "tokens_per_s": 0.0, "mfu": None}
    # The previous step's loss, still on the device: (step, tokens before it, loss tensor). It is read
    # (one host sync) only after the next step has been queued, so the GPU never waits for the guard.
    pending: tuple[int, int, torch.Tensor] | None = None
    val_losses: dict[str, float] = {}
    samples: list[str] = []
    bar = None
    if is_main and progress:
        from tqdm import tqdm
        bar = tqdm(total=prepared.plan.total_tokens, initial=tokens, unit="tok", unit_scale=True,
                   dynamic_ncols=True, desc=cfg.name[:20], file=sys.stderr)

    def source_tokens() -> list[int]:
        return [round(v) for v in per_source_tokens.tolist()]

    def check_loss(checked_step: int, tokens_before: int, loss: torch.Tensor) -> None:
        """Divergence guard: a non-finite loss, or one far above its recent average, ends the run. No
        checkpoint is written before this check has passed, so the last one is the last good state."""
        step_loss = float(loss)
        if not math.isfinite(step_loss) or (len(recent) >= 10 and step_loss > t.diverge_factor * np.mean(recent)):
            why = "is not finite" if not math.isfinite(step_loss) else \
                f"is {step_loss / np.mean(recent):.1f}x its recent average {np.mean(recent):.3f}"
            good = list_checkpoints(ckpt_root)
            raise Diverged(f"diverged at step {checked_step} ({tokens_before:,} tokens): loss {step_loss:.4g} {why}; "
                           f"last good checkpoint: {good[-1] if good else 'none yet'} (fix: lower train.lr, raise "
                           f"train.warmup_fraction or lower train.grad_clip)")
        recent.append(step_loss)

    def evaluate_now() -> None:
        nonlocal paused, val_losses, samples
        t0 = time.time()
        if is_main:
            val_losses = source_val_loss(model, prepared, t.seq_len, cfg.eval.val_tokens, cfg.eval.batch_size,
                                         device, autocast)
            samples = greedy_samples(model, prepared.tokenizer, cfg.eval.sample_prompts, cfg.eval.sample_tokens,
                                     device, autocast)
            metrics = {f"val/loss/{k}": v for k, v in val_losses.items()}
            if val_losses:
                metrics["val/loss"] = float(np.mean(list(val_losses.values())))
            tracker.log_metrics(metrics | {"tokens": tokens}, step)
            with open(run_dir / "samples.txt", "a") as f:
                f.write(f"## step {step}, {tokens:,} tokens\n" + "\n".join(f"- {s!r}" for s in samples) + "\n")
        accelerator.wait_for_everyone()
        paused += time.time() - t0
        if on_eval is not None and is_main:
            on_eval(tokens, dict(val_losses))

    def checkpoint_now() -> Path | None:
        nonlocal paused, last_ckpt_time, last_ckpt_tokens
        t0 = time.time()
        path = None
        if is_main:
            snapshot = dict(state, step=step, tokens=tokens, tokens_per_source=source_tokens(),
                            seconds=seconds_before + (time.time() - session_start), recent_losses=list(recent),
                            last=last)
            path = save_checkpoint(ckpt_root, model, optimizer, snapshot, hf_tok, t.keep_checkpoints, device)
        accelerator.wait_for_everyone()
        paused += time.time() - t0
        last_ckpt_time, last_ckpt_tokens = time.time(), tokens
        return path

    batches = _batches(loader, step, rank, device) if step < num_steps else iter(())
    model_ddp.train()
    while step < num_steps:
        lr = lr_at(step, num_steps, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_step_tokens = step_tokens(loader, step)
        stats = torch.zeros(2 + 2 * num_sources, dtype=torch.float64, device=device)
        for micro in range(accum):
            _, _, input_ids, labels, source_ids = next(batches)
            # Synchronize gradients across processes only on the last micro-batch (accelerate's no_sync).
            sync = nullcontext() if micro == accum - 1 else accelerator.no_sync(model_ddp)
            with sync:
                with autocast():
                    nll = fwd(input_ids, labels)  # [B, T], 0 where labels are ignored
                if fault is not None:
                    nll = fault(step, nll)
                # Sum over this micro-batch / the whole step's tokens; x world because DDP averages.
                accelerator.backward(nll.sum() * (world / n_step_tokens))
            with torch.no_grad():
                row_loss = nll.detach().double().sum(dim=1)
                row_tokens = (labels != IGNORE_INDEX).sum(dim=1).double()
                src = source_ids.clamp(min=0)
                real = (source_ids >= 0).double()
                stats[0] += row_loss.sum()
                stats[1] += row_tokens.sum()
                stats[2:2 + num_sources].index_add_(0, src, row_loss * real)
                stats[2 + num_sources:].index_add_(0, src, row_tokens * real)
        grad_norm = accelerator.clip_grad_norm_(model_ddp.parameters(), t.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = accelerator.reduce(stats, reduction="sum")
        interval += stats
        per_source_tokens += stats[2 + num_sources:]
        interval_tokens += n_step_tokens
        if pending is not None:  # this step is queued: now the previous one's loss can be read
            check_loss(*pending)
        pending = (step, tokens, stats[0] / stats[1])
        step += 1
        tokens += n_step_tokens
        if bar is not None:
            bar.update(n_step_tokens)

        log_due = step % t.log_every_steps == 0 or step == num_steps
        eval_due = tokens >= state["next_eval_tokens"] and step < num_steps
        ckpt_due = bool(t.checkpoint_every_tokens) and tokens - last_ckpt_tokens >= t.checkpoint_every_tokens
        if t.checkpoint_minutes and log_due and not ckpt_due:
            # Time is each process's own: decided at logging steps, by the main process for everyone, so
            # that all processes enter the checkpoint's barrier together (disagreeing would deadlock DDP).
            ckpt_due = time.time() - last_ckpt_time >= 60 * t.checkpoint_minutes
            if world > 1:
                flag = torch.tensor(float(ckpt_due and is_main), device=device)
                ckpt_due = bool(accelerator.reduce(flag, reduction="sum") > 0)
        ckpt_due = ckpt_due and step < num_steps
        if log_due or eval_due or ckpt_due:  # (log_due includes the last step)
            check_loss(*pending)
            pending = None

        if log_due:
            iv = interval.cpu().numpy()
            elapsed = time.time() - interval_start - paused
            last["loss"] = float(iv[0] / iv[1])
            last["tokens_per_s"] = interval_tokens / max(elapsed, 1e-9)
            last["mfu"] = last["tokens_per_s"] * flops_per_token / (peak * world) if peak else None
            metrics = {"train/loss": last["loss"], "train/lr": lr, "train/grad_norm": float(grad_norm),
                       "perf/tokens_per_s": last["tokens_per_s"], "tokens": tokens}
            for i, name in enumerate(names):
                if iv[2 + num_sources + i]:
                    metrics[f"train/loss/{name}"] = float(iv[2 + i] / iv[2 + num_sources + i])
            if last["mfu"] is not None:
                metrics["perf/mfu"] = last["mfu"]
            if is_main:
                tracker.log_metrics(metrics, step)
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}", refresh=False)
            interval.zero_()
            interval_start, interval_tokens, paused = time.time(), 0, 0.0

        if eval_due:
            state["next_eval_tokens"] = (tokens // cfg.eval.every_tokens + 1) * cfg.eval.every_tokens
            evaluate_now()
        if ckpt_due:
            checkpoint_now()

    if bar is not None:
        bar.close()
    # The end: the final evaluation, then a checkpoint so that rerunning a finished run does no work.
    evaluate_now()
    # Whether the final checkpoint exists already (a finished run resumed) is decided from state every rank shares:
    # listing the folder here would race with the main process writing step-N and let one rank skip the collective.
    final_ckpt = ckpt_root / f"step-{step:08d}" if step == start_step else checkpoint_now()
    seconds = seconds_before + (time.time() - session_start)
    counted = dict(zip(names, source_tokens()))
    if is_main:
        # Counted from the batches actually trained on (labels that took a loss), not copied from the plan.
        expected = prepared.plan.tokens_per_source()
        if list(counted.values()) != expected.tolist():
            raise AssertionError(f"trained tokens per source {list(counted.values())} differ from the plan "
                                 f"{expected.tolist()}")
        tracker.log_metrics({f"tokens/{n}": v for n, v in counted.items()} | {"tokens": tokens}, step)
    return TrainResult(
        status="finished", steps=step, tokens=tokens, tokens_per_source=counted,
        train_loss=last["loss"], val_loss=val_losses, seconds=seconds, tokens_per_s=last["tokens_per_s"],
        mfu=last["mfu"], checkpoint=str(final_ckpt or ""), samples=samples)
