"""Measuring a training step's peak memory beside sparknet.device's estimate of it.

    python -m sparknet.memory --preset gpt2-70m --seq-len 1024 --micro 24 --device cuda [--compile]

trains a few optimizer steps exactly as sparknet.train does (its AdamW, its torch.compile with the eager fallback)
and prints, as JSON, the peak bytes they took (CUDA: max_memory_allocated; CPU: the growth of the peak resident set)
beside `sparknet.device.estimate_memory`. The test suite checks the estimate with it on the CPU, scripts/bench_gpu.sh
on a GPU.

Its own module, above both sparknet.device and sparknet.train (it needs the trainer's optimizer and compile step,
and the trainer needs the device's memory estimate for `micro_batch_size=auto` and its out-of-memory message):
imports go one way, device <- train <- memory, and nothing imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

from sparknet.device import _cpu_name, configure_ptxas, estimate_memory


def _rss_kib(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m[1]) if m else 0


def measure_step_memory(preset: str, vocab: int, seq_len: int, micro_batch: int, device: str = "cpu",
                        compile: bool = False, steps: int = 2, accum: int = 2, n_positions: int | None = None) -> dict:
    """Train `steps` optimizer steps of `accum` micro-batches (as sparknet's loop does: autocast bf16 on CUDA, the
    fused loss unless compiled, fused AdamW, clipping) and return the peak bytes they took beside the estimate.

    CUDA: torch.cuda.max_memory_allocated after the model is built (the allocator's own count: weights included,
    context excluded). CPU: the growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the
    resident set before the model existed; run it in a fresh process, with MALLOC_MMAP_THRESHOLD_ fixed so that
    glibc returns freed tensors to the system at once (otherwise its heap keeps them and the peak RSS overstates
    the live peak)."""
    import time

    import torch

    from sparknet.config import ModelConfig, TrainConfig
    from sparknet.model import GPTShape, build_model
    from sparknet.train import _maybe_compile, build_optimizer

    dev = torch.device(device)
    model_cfg = ModelConfig(preset=preset, n_positions=n_positions)
    shape = GPTShape.from_config(model_cfg, vocab)
    on_cuda = dev.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=gen) for _ in range(accum)]
    batches = [b.to(dev) for b in batches]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else (lambda: torch.autocast(
        "cpu", enabled=False))

    def run(model, fwd, optimizer, batches, steps: int) -> None:
        for _ in range(steps):
            for b in batches:
                with autocast():
                    nll = fwd(b[:, :-1], b[:, 1:])
                (nll.sum() / (len(batches) * b.numel())).backward()
                del nll
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if not on_cuda:
        # One step at one short sequence first, then freed: the process's fixed costs of a first step (kernel code
        # paged in, oneDNN's JIT, the thread pool, ~80 MB here) are not the step's memory and go into the baseline.
        warm = build_model(model_cfg, vocab, 1337)
        run(warm, warm, build_optimizer(warm, TrainConfig(), dev), [batches[0][:1, :9]], 2)
        del warm
    if on_cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _rss_kib("VmRSS") * 1024
    model = build_model(model_cfg, vocab, 1337).to(dev)
    optimizer = build_optimizer(model, TrainConfig(), dev)
    if compile and on_cuda:
        note = configure_ptxas(torch.cuda.get_device_capability(dev))  # as make_accelerator does for a run
        if note:
            print(note, file=sys.stderr)
    fwd, compiled = (_maybe_compile(model, model, "on", dev, (batches[0][:, :-1], batches[0][:, 1:]), autocast)
                     if compile else (model, False))
    t0 = time.perf_counter()
    run(model, fwd, optimizer, batches, steps)
    if on_cuda:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    seconds = time.perf_counter() - t0
    est = estimate_memory(shape, seq_len, micro_batch, bf16=on_cuda, compiled=compiled)
    return {"preset": preset, "vocab": vocab, "seq_len": seq_len, "micro_batch": micro_batch, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if on_cuda else _cpu_name(), "compiled": compiled,
            "accum": accum, "steps": steps, "seconds": seconds, "measured_bytes": int(peak),
            "estimate_bytes": est.total, "ratio": peak / est.total, "estimate": dataclasses.asdict(est)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sparknet.memory",
                                 description="train a few steps and print measured vs estimated peak memory as JSON")
    ap.add_argument("--preset", default="gpt2-70m")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--n-positions", type=int, default=None)
    ap.add_argument("--micro", type=int, default=24)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    args = ap.parse_args(argv)
    r = measure_step_memory(args.preset, args.vocab, args.seq_len, args.micro, args.device, args.compile,
                            args.steps, args.accum, args.n_positions)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
