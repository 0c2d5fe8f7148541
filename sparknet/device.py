"""What the accelerator is and what it can do, so that a run fits the device it is on and never lands on the wrong one.

- The MFU peak table, matched on the full device name: the same chip comes in variants whose peaks differ by a
  third (an H100 SXM 989 TFLOP/s, PCIe 756, NVL 835). Figures are dense bf16 (no sparsity) from the vendors' data
  sheets; `train.peak_flops` overrides them.
- No silent CPU fallback: with `train.device=auto`, a GPU that torch cannot see (a CPU-only wheel on a GPU box, a
  driver mismatch, a DGX Spark with a non-CUDA-13 build) is an error naming the installed build and the fix, and a
  run that would take more than a few hours on the CPU is refused with the estimate (`check_cpu_fallback`).
- CUDA 13's ptxas for GPUs of compute capability 12.x (the DGX Spark's GB10 is sm_121, which Triton's bundled
  ptxas does not know): found and exported as TRITON_PTXAS_PATH before torch.compile runs (`configure_ptxas`).
- Memory: an estimate of a training step's peak from the model's shape (`estimate_memory`), the largest micro-batch
  that fits (`largest_fitting`), the one-line error a CUDA out-of-memory becomes (`oom_message`), and
  `train.micro_batch_size=auto` (`fit_micro_batch`: the estimate's pick, probed once with a forward+backward).
- Measuring a step's peak beside the estimate is sparknet.memory's (`python -m sparknet.memory ...`): it trains with
  sparknet.train's optimizer and compile step, and sparknet.train imports this module, so it lives above both.

Only the standard library (and sparknet.errors) is imported at module level; torch is imported where it is used.
This module imports no sparknet module that imports it (sparknet.train, sparknet.memory, sparknet.run are above it).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sparknet.errors import SparknetError

# (pattern on the device name, dense bf16 FLOP/s, label); the first match wins, so variants come before the family.
PEAK_TABLE: tuple[tuple[str, float, str], ...] = (
    (r"GH200", 989e12, "GH200"),
    (r"H200.*NVL", 835e12, "H200 NVL"),
    (r"H200", 989e12, "H200 SXM"),
    (r"H100.*NVL", 835e12, "H100 NVL"),
    (r"H100.*PCIe", 756e12, "H100 PCIe"),
    (r"H100", 989e12, "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"H800.*PCIe", 756e12, "H800 PCIe"),
    (r"H800", 989e12, "H800 SXM"),
    (r"B200", 2250e12, "B200"),
    (r"GB10\b", 100e12, "DGX Spark GB10"),  # NVIDIA publishes only sparse FP4; a bf16 matmul measured 92e12
    (r"A100", 312e12, "A100"),  # 40 GB and 80 GB, SXM and PCIe: the same tensor-core peak
    (r"A800", 312e12, "A800"),
    (r"L40S", 362e12, "L40S"),
    (r"L40\b", 181e12, "L40"),
    (r"\bL4\b", 121e12, "L4"),
    (r"A6000", 155e12, "RTX A6000"),
    (r"A10G?\b", 125e12, "A10"),
    (r"RTX 5090", 209e12, "RTX 5090"),
    (r"RTX 4090", 165e12, "RTX 4090"),
    (r"RTX 3090", 71e12, "RTX 3090"),
)


def lookup_peak(name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, label) of the device called `name`, or None for one not in the table."""
    for pattern, peak, label in PEAK_TABLE:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peak, label
    return None


def peak_by_label(label: str) -> float:
    """The peak of a table entry by its label (for estimates such as "at 40% MFU on an H100 SXM")."""
    return next(peak for _, peak, lab in PEAK_TABLE if lab == label)


# MFU for estimates of a run's time on a GPU: what a well-fed 70M GPT-2 step reaches (an estimate, not a measurement:
# no GPU figure of this trainer exists yet).
ESTIMATE_MFU = 0.4

GiB = 2**30


def format_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


def config_vocab(cfg) -> int:
    """The vocabulary a config trains with, without loading its tokenizer: GPT-2's 50,257, else
    `tokenizer.vocab_size` (exact for `bpe`, an assumption for a Hugging Face tokenizer)."""
    from sparknet.tokenizer import GPT2_VOCAB

    return GPT2_VOCAB if cfg.tokenizer.name == "gpt2" else cfg.tokenizer.vocab_size


def config_shape(cfg, vocab: int | None = None):
    from sparknet.model import GPTShape

    return GPTShape.from_config(cfg.model, config_vocab(cfg) if vocab is None else vocab)


# ---------------------------------------------------------------------------------------------
# No silent CPU fallback.

# The CPU's training speed, for the estimates of a run's time on the CPU (--dry-run's ETA, the refusal above
# CPU_LIMIT_S, the warning under CPU_SHORT_S): the run's FLOPs (6N + attention, as for MFU) at CPU_FLOPS, plus
# CPU_STEP_S per optimizer step (AdamW, the batch reader, Python's dispatch: most of a tiny model's step).
#
# Calibrated 2026-12-06 on this project's 2-core AMD EPYC (KVM) machine, beside the other work that always runs there
# (load 1-3): sparknet.train's median step period over 5-100 steps (the first left out), in tokens/s, on 1 torch
# thread / on 2 (torch's default here), against this estimate:
#   cpu-tiny   vocab    512, seq   64:  26.3k-30.0k / 7.6k-35.9k         estimate 25.4k
#   cpu-small  vocab  4,096, seq  256:  3.49k-3.54k / 2.98k-5.86k        estimate 4.69k  (the quickstart: 4.8k-6.1k)
#   cpu-small  vocab 50,257, seq  256:  665 / 947                        estimate 997
#   gpt2-70m   vocab  4,096, seq  128:  209-225 / 181-440                estimate 181    (the 262,144-token run
#                                                                                         took 29 min: 150; estimate 24)
#   gpt2-70m   vocab 50,257, seq  128:  98-99 / 90-151                   estimate 115
# Whole runs of `python -m sparknet.run` (2 threads, load ~1): cpu-small 81,920 tokens in 18 s (estimate 17 s);
# gpt2-70m at 128, 12,288 tokens in 36 s (estimate 68 s: a quiet machine lets the second thread work).
# The estimate is within ~30% of each row's median; single runs swing by 2x and more with the neighbours' load. The
# old rate, 60 GFLOP/s per thread (120 here), held only for one quiet thread: a second thread bought anything from
# -75% to +100% as the other work came and went (an OpenMP region waits for its descheduled thread), so the issue's
# run took 29 min where 120 GFLOP/s said 9. So the rate counts this machine's 2 threads as one and grows with threads
# beyond 2 (CPU_FLOPS / 2 per thread there: an assumption, not measured: on a many-core machine the estimate is
# rougher). Fixed, not measured per run: a 1024^3 fp32 matmul probe on this shared machine read between 2 and 41
# GFLOP/s within a minute, and a refusal must not depend on the neighbours' load.
CPU_FLOPS = 45e9
CPU_STEP_S = 0.01
# More than this on the CPU with train.device=auto is refused (the 70M model's 1B tokens: ~118 days here).
# The quickstart (cpu-small, 1M tokens: ~4 min) and the tests' tiny runs (seconds) are far below it.
CPU_LIMIT_S = 4 * 3600
# On a machine with a GPU that torch cannot use, a run this short still trains on the CPU (with a warning): the
# quickstart and the test suite keep working with a CPU wheel on a GPU box; anything longer stops.
CPU_SHORT_S = 10 * 60


def cpu_threads(world: int = 1) -> int:
    """Threads training would use on this CPU: torch's per process x processes, at most the cores."""
    import torch

    return max(1, min(torch.get_num_threads() * world, os.cpu_count() or 1))


def cpu_flops(threads: int) -> float:
    """The training FLOP/s of `threads` CPU threads, all processes together (see CPU_FLOPS)."""
    return CPU_FLOPS * max(1.0, threads / 2)


def cpu_seconds(cfg, threads: int, shape=None) -> tuple[float, float]:
    """(seconds, FLOPs) of training `cfg` on this CPU with `threads` threads: its FLOPs at `cpu_flops(threads)` plus
    CPU_STEP_S per optimizer step. `shape`: the model's (default: from the config, GPT-2's or the BPE's vocab)."""
    shape = shape or config_shape(cfg)
    tokens = cfg.mixture.total_tokens
    flops = shape.flops_per_token(cfg.train.seq_len) * tokens
    steps = -(-tokens // cfg.train.batch_tokens)
    return flops / cpu_flops(threads) + steps * CPU_STEP_S, flops


def visible_gpu() -> str | None:
    """An NVIDIA GPU the system shows, whatever torch thinks: nvidia-smi's names, else a /dev/nvidia<N> node (a driver
    whose user-space library does not match the kernel module makes nvidia-smi fail while the node is there)."""
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    smi = shutil.which("nvidia-smi")
    why = ""
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if out.returncode == 0 and names:
                return f"{', '.join(names)} (nvidia-smi)"
            why = next(iter((out.stderr or out.stdout).strip().splitlines()), f"exit {out.returncode}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = str(exc)
    if nodes:
        return f"an NVIDIA GPU ({nodes[0]}" + (f"; nvidia-smi: {why[:120]}" if why else "") + ")"
    return None


def torch_build() -> str:
    """The installed torch and the CUDA it was built for, e.g. 'torch 2.13.0+cpu, a CPU-only build'."""
    import torch

    cuda = torch.version.cuda
    return f"torch {torch.__version__}, {f'built for CUDA {cuda}' if cuda else 'a CPU-only build'}"


_CUDA_FIX = ("install a CUDA build of torch (on a DGX Spark a CUDA 13 build): `bash scripts/bootstrap.sh` does it")


def no_cuda_message() -> str:
    """Why torch has no CUDA here, for the errors below."""
    import torch

    if torch.version.cuda:  # a CUDA build that cannot start: the driver is older than the build, or no device node
        return (f"the installed torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use it "
                f"(torch.cuda.is_available() is False: a driver older than that CUDA, or a GPU the build does not "
                f"support)")
    return f"the installed torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"


def check_cpu_fallback(cfg, world: int = 1) -> str | None:
    """train.device=auto and torch has no CUDA: is training on this CPU what the user meant?

    A GPU on the machine (nvidia-smi, /dev/nvidia*) means no, unless the run is short (the quickstart, tests): a
    SparknetError naming the torch build and the fix, or for a short run a warning line to print. Without a GPU, a
    run estimated above CPU_LIMIT_S is refused with the estimate. `train.device=cpu` skips all of this."""
    threads = cpu_threads(world)
    seconds, flops = cpu_seconds(cfg, threads)
    est = (f"~{format_seconds(seconds)} for {cfg.mixture.total_tokens:,} tokens of {cfg.model.preset} ({flops:.3g} "
           f"FLOPs at ~{cpu_flops(threads) / 1e9:.0f} GFLOP/s on {threads} thread(s), a measured CPU rate)")
    gpu = visible_gpu()
    if gpu:
        what = f"this machine has {gpu} but {no_cuda_message()}"
        if seconds <= CPU_SHORT_S:
            return (f"warning: train.device=auto: {what}; this short run trains on the CPU ({est}) (fix: "
                    f"{_CUDA_FIX}; or train.device=cpu to say so)")
        raise SparknetError(f"train.device=auto: {what}, so this run would train on the CPU: {est} (fix: "
                            f"{_CUDA_FIX}; or train.device=cpu to insist on the CPU)")
    if seconds > CPU_LIMIT_S:
        raise SparknetError(f"train.device=auto: no GPU here ({torch_build()}), and on this CPU the run would take "
                            f"{est}, more than the {CPU_LIMIT_S / 3600:.0f} h a CPU run may take unasked (fix: train "
                            f"on a GPU machine, lower mixture.total_tokens or use a CPU-sized model.preset such as "
                            f"cpu-small; or train.device=cpu to insist)")
    return None


def cuda_missing_error() -> SparknetError:
    """train.device=cuda without a usable CUDA device."""
    gpu = visible_gpu()
    seen = f"this machine has {gpu} but {no_cuda_message()}" if gpu else f"{torch_build()}; no GPU is visible"
    return SparknetError(f"train.device: cuda was asked for but no CUDA device is usable: {seen} (fix: "
                         f"{_CUDA_FIX}; or train.device=auto or cpu)")


# ---------------------------------------------------------------------------------------------
# CUDA 13's ptxas for compute capability 12.x.


def cuda_version(root: Path) -> tuple[int, int] | None:
    """(major, minor) of the CUDA toolkit at `root`: its folder name (cuda-13.0, also behind a symlink such as
    /usr/local/cuda), else version.json / version.txt, else what its ptxas says."""
    real = root.resolve()
    m = re.fullmatch(r"cuda-(\d+)\.(\d+)", real.name)
    if m:
        return int(m[1]), int(m[2])
    try:
        v = json.loads((real / "version.json").read_text())["cuda"]["version"]
        major, minor = v.split(".")[:2]
        return int(major), int(minor)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        m = re.search(r"CUDA Version (\d+)\.(\d+)", (real / "version.txt").read_text())
        if m:
            return int(m[1]), int(m[2])
    except OSError:
        pass
    try:
        out = subprocess.run([str(real / "bin" / "ptxas"), "--version"], capture_output=True, text=True, timeout=20)
        m = re.search(r"release (\d+)\.(\d+)", out.stdout)
        return (int(m[1]), int(m[2])) if m else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def find_cuda13_ptxas(env: dict | None = None, usr_local: Path = Path("/usr/local")) -> Path | None:
    """A ptxas of CUDA 13 or later: $CUDA_HOME's, else /usr/local/cuda-13* (newest first), else /usr/local/cuda's."""
    env = os.environ if env is None else env
    roots = [Path(env["CUDA_HOME"])] if env.get("CUDA_HOME") else []
    versioned = [p for p in usr_local.glob("cuda-*") if re.fullmatch(r"cuda-\d+\.\d+", p.name)]
    roots += sorted(versioned, key=lambda p: tuple(int(x) for x in p.name[5:].split(".")), reverse=True)
    roots.append(usr_local / "cuda")
    for root in roots:
        ptxas = root / "bin" / "ptxas"
        if ptxas.is_file() and os.access(ptxas, os.X_OK) and (cuda_version(root) or (0, 0)) >= (13, 0):
            return ptxas
    return None


def configure_ptxas(capability: tuple[int, int], env: dict | None = None,
                    usr_local: Path = Path("/usr/local")) -> str | None:
    """Point Triton at CUDA 13's ptxas for a GPU of compute capability 12.x, unless TRITON_PTXAS_PATH is set already.

    Triton compiles through its own bundled ptxas, which does not know sm_121a (the DGX Spark's GB10), so
    torch.compile fails there (and the trainer falls back to eager, slower) unless TRITON_PTXAS_PATH names
    CUDA 13's. Triton reads the variable when it compiles, so setting it here, before the first torch.compile, is
    enough. Returns the line to print (what was set, or a warning that none was found); None when nothing applies."""
    env = os.environ if env is None else env
    if capability[0] != 12 or env.get("TRITON_PTXAS_PATH"):
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    ptxas = find_cuda13_ptxas(env, usr_local)
    if ptxas is None:
        if capability[1] == 0:  # sm_120 (RTX 50xx): Triton's bundled ptxas (CUDA 12.8 and later) knows it
            return None
        return (f"warning: this GPU ({sm}) needs CUDA 13's ptxas for torch.compile (Triton's bundled one does not "
                f"know {sm}a) and none was found in $CUDA_HOME, {usr_local}/cuda-13*, {usr_local}/cuda (fix: install "
                f"the CUDA 13 toolkit, or set TRITON_PTXAS_PATH; until then compilation falls back to eager)")
    env["TRITON_PTXAS_PATH"] = str(ptxas)
    return (f"{sm}: TRITON_PTXAS_PATH={ptxas} (CUDA 13's ptxas for torch.compile: Triton's bundled one does not know "
            f"{sm}a; set the variable yourself to choose another)")


# ---------------------------------------------------------------------------------------------
# Memory.

# A micro-batch "fits" when its estimate is at most this share of the device's memory: the CUDA caching allocator
# rounds and splits blocks (some memory is lost to fragmentation), and the CUDA context (a few hundred MiB) and
# cuBLAS's workspaces are outside what is estimated.
FIT_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one process's training step, by what holds them (see `estimate_memory`)."""

    micro_batch: int
    seq_len: int
    precision: str  # what the activations are held in: bf16 (CUDA autocast) or fp32
    weights: int
    gradients: int
    optimizer: int
    weight_copies: int
    activations: int
    loss_buffer: int
    workspace: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.weight_copies + self.activations
                + self.loss_buffer + self.workspace)

    def breakdown(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("AdamW", self.optimizer),
                 ("bf16 weight copies", self.weight_copies), ("activations", self.activations),
                 ("loss buffer", self.loss_buffer), ("workspace", self.workspace)]
        return " + ".join(f"{name} {b / GiB:.2f}" for name, b in parts if b) + f" = {self.total / GiB:.2f} GiB"


def estimate_memory(shape, seq_len: int, micro_batch: int, *, bf16: bool, compiled: bool = False) -> MemoryEstimate:
    """The peak memory of a training step of `shape` at `micro_batch` x `seq_len` tokens, as sparknet trains it.

    Counted from the tensors the step keeps, not fitted: P parameters (the padded vocabulary, positions included) in
    fp32, their fp32 gradients (alive through the forward pass under accumulation), AdamW's two fp32 moments; under
    bf16 autocast the bf16 copies of the block weights that the matmuls save. Activations, per token and layer, what
    autograd saves with SDPA (C = n_embd, H = n_head, s = 2 bytes in bf16, 4 in fp32): the fp32 residual stream into
    each LayerNorm (2 x 4C) and their mean/rstd (16), the LayerNorm outputs as the matmuls saw them (2 x sC), q/k/v
    (3sC: SDPA keeps views of the qkv projection), the attention output (sC, also attn_proj's input, a view) and its
    logsumexp (4H), the MLP's hidden state before and after GELU (2 x 4sC): 8C + 14sC + 4H + 16 bytes (bf16 36C,
    fp32 64C). Then ln_f's input and output and the per-token NLL. The fused output layer holds one [tokens x padded
    vocab] buffer of logits turned into their gradient (s bytes each); compiled, Inductor keeps the logits and
    computes their gradient, so two. Workspace is the larger of the forward's fp32 chunk of the fused loss (bf16
    only; sparknet.model._chunk_rows) and the output layer's backward temporaries ([tokens x C] products and the
    [vocab x C] weight gradient). Not counted: the CUDA context and allocator fragmentation (FIT_FRACTION), and on
    several processes DDP's gradient buckets (another 4 bytes per parameter: 0.24 GiB for gpt2-70m)."""
    from sparknet.model import _chunk_rows

    P = shape.num_params(padded=True)
    C, H, L, V = shape.n_embd, shape.n_head, shape.n_layer, shape.padded_vocab_size
    s = 2 if bf16 else 4
    N = micro_batch * seq_len
    per_token_layer = 8 * C + 14 * s * C + 4 * H + 16
    activations = N * L * per_token_layer + N * (4 * C + s * C + 4)
    loss_buffer = (2 if compiled else 1) * N * V * s
    weight_copies = L * (12 * C * C + 9 * C) * 2 if bf16 else 0
    import torch

    device = torch.device("cuda" if bf16 else "cpu")
    scratch = min(N, _chunk_rows(V, device)) * shape.vocab_size * 4 if bf16 and not compiled else 0
    # The output layer's backward (sparknet.model._LinearCrossEntropy.backward): fp32 [N, C] products for grad_h and
    # grad_w (plus their bf16 casts under autocast) and the [V, C] weight gradient (fp32; under bf16 also the bf16
    # matmul result and the bf16 copy of the weight).
    backward = N * C * 10 + V * C * 8 if bf16 else N * C * 8 + V * C * 4
    return MemoryEstimate(micro_batch, seq_len, "bf16" if bf16 else "fp32", weights=4 * P, gradients=4 * P,
                          optimizer=8 * P, weight_copies=weight_copies, activations=activations,
                          loss_buffer=loss_buffer, workspace=max(scratch, backward))


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_fitting(shape, seq_len: int, share: int, memory: int, *, bf16: bool, compiled: bool = False,
                    below: int | None = None) -> int | None:
    """The largest divisor of `share` (the sequences of a step on one process) whose estimate fits `memory`
    (FIT_FRACTION of it), optionally only those below `below`; None when not even one sequence fits."""
    for d in divisors_desc(share):
        if below is not None and d >= below:
            continue
        if estimate_memory(shape, seq_len, d, bf16=bf16, compiled=compiled).total <= FIT_FRACTION * memory:
            return d
    return None


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # cuda | cpu
    name: str
    memory: int  # bytes: the GPU's, or the machine's RAM
    available: int  # bytes free now (CPU: MemAvailable)
    capability: tuple[int, int] | None = None
    threads: int = 1
    note: str = ""  # why a run with this config would not train here as asked, if it would not

    def describe(self) -> str:
        if self.kind == "cuda":
            cap = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
            return f"device cuda: {self.name}, {self.memory / GiB:.1f} GiB{cap}"
        return (f"device cpu: {self.name}, {self.threads} thread(s), {self.memory / GiB:.1f} GiB RAM "
                f"({self.available / GiB:.1f} GiB available)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


def _ram() -> tuple[int, int]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        m = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return total, int(m[1]) * 1024 if m else total
    except OSError:
        return total, total


def describe_device(cfg, world: int = 1) -> DeviceInfo:
    """The device `cfg` would train on here (train.device), with its memory; `note` says why it would not."""
    import torch

    want = cfg.train.device
    if want != "cpu" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return DeviceInfo("cuda", p.name, int(p.total_memory), int(p.total_memory), (p.major, p.minor))
    total, available = _ram()
    note = ""
    if want == "cuda":
        note = str(cuda_missing_error())
    elif want == "auto":
        try:
            note = check_cpu_fallback(cfg, world) or ""
        except SparknetError as exc:
            note = f"the run would stop here: {exc}"
    return DeviceInfo("cpu", _cpu_name(), total, available, None, cpu_threads(world), note)


def step_kind(t, on_cuda: bool) -> tuple[bool, bool]:
    """(bf16, compiled) of a training step under TrainConfig `t` on CUDA or the CPU, as sparknet.train runs it."""
    return on_cuda and t.precision == "bf16", t.compile == "on" or (t.compile == "auto" and on_cuda)


def estimate_pick(cfg, shape, world: int, info: DeviceInfo) -> int | None:
    """The largest micro-batch the estimate fits on `info` (its memory; on the CPU the available RAM): what
    train.micro_batch_size=auto starts from."""
    t = cfg.train
    bf16, compiled = step_kind(t, info.kind == "cuda")
    memory = info.memory if info.kind == "cuda" else info.available
    return largest_fitting(shape, t.seq_len, t.sequences_per_step // world, memory, bf16=bf16, compiled=compiled)


def device_report(cfg, shape, world: int, info: DeviceInfo | None = None) -> list[str]:
    """--dry-run's lines on the device: what it is, the step's memory against it, and the time the run would take."""
    t = cfg.train
    info = info or describe_device(cfg, world)
    lines = [info.describe()]
    if info.note:
        lines.append(f"  {info.note}")
    on_cuda = info.kind == "cuda"
    bf16, compiled = step_kind(t, on_cuda)
    memory = info.memory if on_cuda else info.available
    fit = estimate_pick(cfg, shape, world, info)
    mb = resolved_micro_batch(t.micro_batch_size, fit)
    est = estimate_memory(shape, t.seq_len, mb, bf16=bf16, compiled=compiled)
    verdict = "fits" if est.total <= FIT_FRACTION * memory else "does NOT fit"
    best = f"the largest micro-batch that fits: {fit}" if fit else "not even 1 sequence fits"
    auto = "; micro_batch_size=auto: the estimate's pick" if t.micro_batch_size == "auto" else ""
    lines.append(f"memory per process at micro-batch {mb} x {t.seq_len} tokens ({est.precision}"
                 f"{', compiled' if compiled else ', fused loss'}{auto}), estimated: {est.breakdown()} of "
                 f"{memory / GiB:.1f} GiB{'' if on_cuda else ' available'}: {verdict} ({best}, at most "
                 f"{FIT_FRACTION:.0%} of the memory)")
    flops = shape.flops_per_token(t.seq_len) * cfg.mixture.total_tokens
    if on_cuda:
        found = (t.peak_flops, "train.peak_flops") if t.peak_flops else lookup_peak(info.name)
        if found:
            peak, label = found
            secs = flops / (peak * ESTIMATE_MFU * world)
            lines.append(f"eta (an estimate, not a measurement): {label} at {ESTIMATE_MFU:.0%} MFU: "
                         f"~{format_seconds(secs)} for {cfg.mixture.total_tokens:,} tokens"
                         + (f" on {world} GPUs" if world > 1 else ""))
        else:
            lines.append(f"eta: {info.name} is not in the peak table (set train.peak_flops for MFU and an estimate)")
    else:
        secs, _ = cpu_seconds(cfg, info.threads, shape)
        lines.append(f"eta on this CPU (an estimate at a measured CPU rate): ~{format_seconds(secs)} for "
                     f"{cfg.mixture.total_tokens:,} tokens at ~{cpu_flops(info.threads) / 1e9:.0f} GFLOP/s")
    return lines


def resolved_micro_batch(micro_batch_size, fit: int | None) -> int:
    """The config's micro-batch, or for `auto` the largest the estimate fits (1 when none does)."""
    return (fit or 1) if micro_batch_size == "auto" else int(micro_batch_size)


def is_oom(exc: BaseException) -> bool:
    """A device (or host) allocation failure: torch.OutOfMemoryError, or the RuntimeErrors cuBLAS and the CPU
    allocator raise for the same thing."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text
                                              or "can't allocate memory" in text)


def device_memory(device) -> tuple[str, int]:
    """(name, bytes) of a torch device: the GPU's memory, or the machine's available RAM."""
    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return p.name, int(p.total_memory)
    return f"the CPU ({_cpu_name()})", _ram()[1]


def oom_message(cfg, vocab: int, device, world: int, micro_batch: int) -> str:
    """The one-line error a CUDA out-of-memory in training becomes: the largest micro-batch the estimate fits,
    below the one that failed; the global batch stays the recipe's (accumulation absorbs the change)."""
    t = cfg.train
    shape = config_shape(cfg, vocab)
    name, memory = device_memory(device)
    bf16, compiled = step_kind(t, device.type == "cuda")
    share = t.sequences_per_step // world
    est = estimate_memory(shape, t.seq_len, micro_batch, bf16=bf16, compiled=compiled)
    fit = largest_fitting(shape, t.seq_len, share, memory, bf16=bf16, compiled=compiled, below=micro_batch)
    what = (f"train.micro_batch_size: out of memory training {micro_batch} sequences x {t.seq_len} tokens per "
            f"process on {name} ({memory / GiB:.1f} GiB; the estimate for it is {est.total / GiB:.1f} GiB")
    if est.total <= FIT_FRACTION * memory:
        what += ", so something else may hold memory: see nvidia-smi"
    if fit is None:
        return (f"{what}) and not even 1 sequence fits by the estimate (fix: a smaller model.preset or "
                f"train.seq_len, or a device with more memory)")
    accum = share // fit
    return (f"{what}) (fix: train.micro_batch_size={fit}, the largest the estimate fits, or auto to probe at start; "
            f"the global batch stays {t.sequences_per_step} sequences: accumulation {accum} per process)")


def fit_micro_batch(cfg, vocab: int, accelerator, probe=None) -> int:
    """train.micro_batch_size=auto: the largest divisor of this process's share of the global batch that fits.

    It starts from the estimate's largest fit and, on CUDA, probes it once: a forward+backward at that size with the
    gradients and AdamW's moments already allocated (as in every later step); on out-of-memory it tries the next
    smaller divisor. On the CPU nothing is probed (running out of RAM ends in the kernel's OOM killer, not an
    exception): the estimate against the available RAM decides. Several processes take the smallest pick of all,
    so that they run the same accumulation. `probe(micro_batch) -> bool` replaces the real probe (tests)."""
    import torch

    t = cfg.train
    device, world = accelerator.device, accelerator.num_processes
    shape = config_shape(cfg, vocab)
    share = t.sequences_per_step // world
    if t.sequences_per_step % world:
        t.grad_accum_steps(world)  # raises the one-line error that says which process counts work
    name, memory = device_memory(device)
    # Started from the estimate of the step as it will run (compiled on CUDA: two [tokens x vocab] buffers), probed
    # eagerly (the compiled step is not built yet; by the estimate it needs more than the eager one, not less).
    bf16, compiled = step_kind(t, device.type == "cuda")
    start = largest_fitting(shape, t.seq_len, share, memory, bf16=bf16, compiled=compiled) or 1
    if probe is None and device.type == "cuda":
        def probe(mb: int) -> bool:
            return _probe_step(cfg, vocab, mb, device, accelerator.autocast)
    chosen, probed = None, []
    for mb in [d for d in divisors_desc(share) if d <= start]:
        if probe is None or probe(mb):
            chosen = mb
            break
        probed.append(mb)
    if world > 1:
        pick = torch.tensor([chosen or 0], device=device)
        torch.distributed.all_reduce(pick, op=torch.distributed.ReduceOp.MIN)
        chosen = int(pick.item()) or None
    if not chosen:
        raise SparknetError(f"train.micro_batch_size=auto: not even 1 sequence of {t.seq_len} tokens fits on {name} "
                            f"({memory / GiB:.1f} GiB) (fix: a smaller model.preset or train.seq_len)")
    if accelerator.is_main_process:
        est = estimate_memory(shape, t.seq_len, chosen, bf16=bf16, compiled=compiled)
        how = "probed with a forward+backward" if probe is not None else "by the estimate; not probed on the CPU"
        tried = f"; out of memory at {', '.join(map(str, probed))}" if probed else ""
        print(f"train.micro_batch_size=auto: {chosen} sequences per process ({how}{tried}; estimate "
              f"{est.total / GiB:.1f} of {memory / GiB:.1f} GiB), accumulation {share // chosen}", flush=True)
    return chosen


def _probe_step(cfg, vocab: int, micro_batch: int, device, autocast) -> bool:
    """One forward+backward of a fresh model at `micro_batch` on `device`: False on out-of-memory. All it allocated
    is released before returning."""
    import gc

    import torch

    def attempt() -> None:
        from sparknet.model import build_model

        model = build_model(cfg.model, vocab, cfg.train.seed).to(device)
        num = sum(p.numel() for p in model.parameters())
        moments = torch.empty(2 * num, dtype=torch.float32, device=device)  # AdamW's, allocated at the first step
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # under accumulation the gradients live through the forward pass
        ids = torch.zeros(micro_batch, cfg.train.seq_len, dtype=torch.long, device=device)
        with autocast():
            nll = model(ids, ids)
        nll.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous failure surfaces here, inside the probe
        del moments

    try:
        attempt()
        ok = True
    except Exception as exc:  # noqa: BLE001 (re-raised unless it is an out-of-memory)
        if not is_oom(exc):
            raise
        ok = False
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the probe's blocks back, so the run's allocator starts clean
    return ok


def check_scoring_device(text: str, flag: str = "--device") -> None:
    """A `--device` for scoring (compare --evaluate, evaluate downstream) that exists here: cpu, a CUDA device this
    machine has, or MPS where it is available; else one line with the fix, before any model is loaded."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise SparknetError(f"{flag} {text!r}: not a device torch knows (fix: {flag} cpu or {flag} cuda, or leave it "
                            f"out)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SparknetError(f"{flag} {text!r}: sparknet scores on cpu, cuda or mps (fix: {flag} cpu)")
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= gpus):
        have = f"{gpus} CUDA device(s)" if torch.cuda.is_available() else f"no CUDA device (torch {torch.__version__})"
        raise SparknetError(f"{flag} {text!r}: this machine has {have} (fix: {flag} cpu, or leave it out to use a GPU "
                            f"when there is one)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SparknetError(f"{flag} {text!r}: MPS is not available here (fix: {flag} cpu)")
