"""Fitting the device: the peak-memory estimate against measured memory, --dry-run's device report (this CPU, and a
simulated DGX Spark), a CUDA out-of-memory as a one-line error with the micro-batch that fits (simulated: a forward
that raises torch.OutOfMemoryError), and train.micro_batch_size=auto (the estimate's pick, probed down on OOM)."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sparknet.device as device
from sparknet.config import ModelConfig, config_from_dict, load_config
from sparknet.device import FIT_FRACTION, GiB, estimate_memory, fit_micro_batch, is_oom, largest_fitting
from sparknet.errors import SparknetError
from sparknet.model import GPT, GPTShape
from sparknet.run import main

ROOT = Path(__file__).resolve().parents[1]
CODELION = str(ROOT / "mixtures" / "codelion_502030.yaml")
GPT2_70M = GPTShape.from_config(ModelConfig(preset="gpt2-70m"), 50257)


# ---------------------------------------------------------------------------------------------
# The estimate.


def test_the_estimate_of_gpt2_70m_at_micro_batch_24_is_its_tensors():
    """CodeLion's step on a GPU (24 x 1024 tokens, bf16, the fused loss): each term from the tensor sizes."""
    e = estimate_memory(GPT2_70M, 1024, 24, bf16=True)
    n, p = 24 * 1024, GPT2_70M.num_params(padded=True)
    assert p == 64_085_504 + (50304 - 50257) * 512  # the exported 64.09M (with positions) plus the padding rows
    assert (e.weights, e.gradients, e.optimizer) == (4 * p, 4 * p, 8 * p)
    assert e.loss_buffer == n * 50304 * 2  # one bf16 [tokens x padded vocab] buffer: 2.30 GiB
    assert e.activations == n * (12 * (36 * 512 + 4 * 8 + 16) + 4 * 512 + 2 * 512 + 4)  # 36C bytes/token/layer
    assert e.workspace == 5336 * 50257 * 4  # the fused loss's fp32 chunk: 2**28 // 50304 rows
    assert e.total / GiB == pytest.approx(9.47, abs=0.01)
    # Compiled, Inductor keeps the logits and their gradient: two buffers, no fp32 chunk.
    c = estimate_memory(GPT2_70M, 1024, 24, bf16=True, compiled=True)
    assert c.loss_buffer == 2 * e.loss_buffer and c.total / GiB == pytest.approx(11.09, abs=0.01)
    # fp32 on the CPU: activations 64C bytes per token and layer, a 4-byte loss buffer.
    f = estimate_memory(GPT2_70M, 1024, 24, bf16=False)
    assert f.activations == n * (12 * (64 * 512 + 4 * 8 + 16) + 4 * 512 + 4 * 512 + 4)
    assert f.loss_buffer == n * 50304 * 4 and f.weight_copies == 0


def test_the_largest_fitting_micro_batch_divides_the_share_and_is_the_largest():
    for memory_gib, share in [(16, 120), (24, 120), (80, 120), (24, 15), (8, 60)]:
        memory = memory_gib * GiB
        fit = largest_fitting(GPT2_70M, 1024, share, memory, bf16=True)
        assert fit and share % fit == 0
        assert estimate_memory(GPT2_70M, 1024, fit, bf16=True).total <= FIT_FRACTION * memory
        bigger = [d for d in range(fit + 1, share + 1) if share % d == 0]
        assert all(estimate_memory(GPT2_70M, 1024, d, bf16=True).total > FIT_FRACTION * memory for d in bigger)
    assert largest_fitting(GPT2_70M, 1024, 120, 80 * GiB, bf16=True) == 120  # an H100 80GB: no accumulation
    assert largest_fitting(GPT2_70M, 1024, 120, 16 * GiB, bf16=True) == 30  # 40 would be 14.43 > 0.9 x 16 GiB
    assert largest_fitting(GPT2_70M, 1024, 120, 1 * GiB, bf16=True) is None


MEASURE = """
import json
from sparknet.memory import measure_step_memory
print(json.dumps([measure_step_memory(p, v, 128, mb) for p, v, mb in
                  [("cpu-small", 4096, 2), ("cpu-small", 4096, 8), ("cpu-tiny", 50257, 4)]]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak RSS is reset through Linux's /proc")
@pytest.mark.slow
def test_the_estimate_matches_the_measured_peak_on_the_cpu(subprocess_env):
    """Two optimizer steps of two micro-batches each (forward, backward, clipping, fused AdamW: so the gradients and
    AdamW's moments are alive through the second step's passes), in a fresh process, peak RSS growth against the
    estimate. Three cases: activations dominate (cpu-small, a 4,096 vocabulary) at 2 and 8 sequences, and the
    output layer dominates (cpu-tiny with GPT-2's vocabulary: its [tokens x 50,304] loss buffer is ~60%).

    Tolerance 15%, on the totals and on the growth from 2 to 8 sequences (which cancels anything fixed): an
    estimate off by 2x, or missing any one of its large terms, fails. Measured here: 37.2 / 72.6 / 166.8 MiB against
    estimates of 35.1 / 72.7 / 165.8 (ratios 1.06, 1.00, 1.01; growth 35.4 against 37.6)."""
    env = dict(subprocess_env, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors leave the RSS at once (see docstring)
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    small2, small8, tiny = json.loads(out.stdout.strip().splitlines()[-1])
    report = "; ".join(f"{r['preset']} vocab {r['vocab']} x{r['micro_batch']}: measured {r['measured_bytes'] / 2**20:.1f}"
                       f" MiB, estimate {r['estimate_bytes'] / 2**20:.1f}" for r in (small2, small8, tiny))
    for r in (small2, small8, tiny):
        assert 0.85 <= r["ratio"] <= 1.15, report
    growth = (small8["measured_bytes"] - small2["measured_bytes"]) / (small8["estimate_bytes"] - small2["estimate_bytes"])
    assert 0.85 <= growth <= 1.15, report
    assert tiny["estimate"]["loss_buffer"] > 0.5 * tiny["measured_bytes"], report  # the case does test that term


# ---------------------------------------------------------------------------------------------
# --dry-run: the device, the step's memory against it, and the time.

GB10 = SimpleNamespace(name="NVIDIA GB10", total_memory=128_526_278_656, major=12, minor=1)  # 119.7 GiB, unified


def test_dry_run_reports_this_cpu_its_memory_and_the_time(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "visible_gpu", lambda: None)
    monkeypatch.setattr(device, "cpu_threads", lambda world=1: 2)
    assert main([CODELION, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "device cpu: " in out and " thread(s), " in out and " GiB RAM (" in out
    fp32 = estimate_memory(GPT2_70M, 1024, 24, bf16=False)
    assert (f"memory per process at micro-batch 24 x 1024 tokens (fp32, fused loss), estimated: weights 0.24 + "
            f"gradients 0.24 + AdamW 0.48 + activations 9.11 + loss buffer 4.61 + workspace 0.19 = "
            f"{fp32.total / GiB:.2f} GiB of ") in out
    assert "eta on this CPU (an estimate at a measured CPU rate): ~118 days for 1,000,000,000 tokens at ~45 GFLOP/s" in out
    assert "the run would stop here: train.device=auto: no GPU here" in out  # said, not raised: it is a dry run


def test_dry_run_on_a_dgx_spark_gives_the_mfu_estimate(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: GB10)
    assert main([CODELION, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "device cuda: NVIDIA GB10, 119.7 GiB, compute capability 12.1" in out
    assert "memory per process at micro-batch 24 x 1024 tokens (bf16, compiled), estimated: " in out
    assert "= 11.09 GiB of 119.7 GiB: fits (the largest micro-batch that fits: 120" in out
    # 4.57e17 FLOPs / (100e12 x 0.4) = 11,424 s
    assert "eta (an estimate, not a measurement): DGX Spark GB10 at 40% MFU: ~3.2 h for 1,000,000,000 tokens" in out
    assert main([CODELION, "--dry-run", "train.micro_batch_size=auto"]) == 0
    out = capsys.readouterr().out
    assert "processes 1: each 120 sequences x 1 micro-batches" in out
    assert "micro-batch 120 x 1024 tokens (bf16, compiled; micro_batch_size=auto: the estimate's pick)" in out


# ---------------------------------------------------------------------------------------------
# Out of memory, and micro_batch_size=auto.


def test_is_oom_knows_the_shapes_an_allocation_failure_takes():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.30 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A device whose memory the estimate fits 2 of the tiny recipe's sequences into, and not 4."""
    shape = GPTShape.from_config(ModelConfig(preset="cpu-tiny", n_positions=64), 512)
    two, four = (estimate_memory(shape, 64, mb, bf16=False).total for mb in (2, 4))
    memory = int((two + four) / 2 / FIT_FRACTION)
    monkeypatch.setattr(device, "device_memory", lambda dev: ("a small fake GPU", memory))
    return memory


@pytest.fixture
def oom_above_two(monkeypatch):
    """The model's training forward runs out of memory above 2 sequences, as a too-large micro-batch does on CUDA."""
    forward = GPT.forward
    calls: list[int] = []

    def fwd(self, input_ids, labels=None):
        calls.append(input_ids.shape[0])
        if labels is not None and input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {input_ids.shape[0]} GiB")
        return forward(self, input_ids, labels)

    monkeypatch.setattr(GPT, "forward", fwd)
    return calls


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory, tiny_mixture):
    """The tiny recipe (cpu-tiny, 8 sequences of 64 a step) on one small source, prepared once for the runs below
    (each has its own name): the paragraphs of this README, real text in every clone that tokenizes in a second or
    two (the recipe's own sources read the whole standard library)."""
    d = tmp_path_factory.mktemp("fitlab")
    paragraphs = [p for p in (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
    with open(d / "readme.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    tiny_mixture(d, mixture={"val_tokens": 1024, "sources": [
        {"name": "readme", "kind": "local", "path": str(d / "readme.jsonl"), "weight": 1.0, "max_repeats": 4}]})
    return d


def tiny_argv(lab: Path, name: str, *overrides: str) -> list[str]:
    return [str(lab / "tiny.yaml"), f"lab_dir={lab}", f"name={name}", "mixture.total_tokens=4096",
            "tracking.enabled=false", "eval.wikitext=[]", "train.device=cpu", *overrides, "--quiet"]


def test_out_of_memory_in_training_is_one_line_with_the_micro_batch_that_fits(tiny_lab, fake_gpu, oom_above_two,
                                                                               capsys):
    """The tiny recipe at micro-batch 8 (a step is 8 sequences): the forward runs out of memory; the error names the
    largest divisor of 8 the estimate fits (2) and the accumulation that keeps the global batch (4)."""
    code = main(tiny_argv(tiny_lab, "oom"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: train.micro_batch_size: out of memory training 8 sequences x 64 "
                                        "tokens per process on a small fake GPU"), err
    assert ("(fix: train.micro_batch_size=2, the largest the estimate fits, or auto to probe at start; the global "
            "batch stays 8 sequences: accumulation 4 per process)") in err
    state = json.loads(next((tiny_lab / "runs").glob("oom-*/state.json")).read_text())
    assert state["status"] == "failed" and "micro_batch_size=2" in state["error"]


def test_the_suggestion_fits_below_the_size_that_failed(tiny_lab, monkeypatch):
    cfg = load_config(tiny_lab / "tiny.yaml", [f"lab_dir={tiny_lab}"])
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "device_memory", lambda dev: ("a roomy GPU", 64 * GiB))  # everything fits...
    msg = device.oom_message(cfg, 512, cpu, 1, 8)
    assert "so something else may hold memory: see nvidia-smi" in msg and "train.micro_batch_size=4," in msg
    monkeypatch.setattr(device, "device_memory", lambda dev: ("a tiny GPU", 2**20))  # ...or nothing does
    msg = device.oom_message(cfg, 512, cpu, 1, 8)
    assert "not even 1 sequence fits by the estimate (fix: a smaller model.preset or train.seq_len" in msg


def test_auto_probes_down_from_the_estimates_pick(tiny_lab, oom_above_two, capsys):
    """fit_micro_batch starts at the largest divisor the estimate fits (all 8 here) and on OOM tries the next smaller
    one, with the real probe (a forward+backward with gradients and AdamW's moments allocated), run on the CPU."""
    cfg = load_config(tiny_lab / "tiny.yaml", [f"lab_dir={tiny_lab}", "train.micro_batch_size=auto"])
    cpu = torch.device("cpu")
    accel = SimpleNamespace(device=cpu, num_processes=1, is_main_process=True, autocast=nullcontext)

    def probe(mb):
        return device._probe_step(cfg, 512, mb, cpu, nullcontext)

    assert fit_micro_batch(cfg, 512, accel, probe=probe) == 2
    assert oom_above_two == [8, 4, 2]
    out = capsys.readouterr().out
    assert "train.micro_batch_size=auto: 2 sequences per process (probed with a forward+backward; out of memory at " \
           "8, 4; estimate " in out and "accumulation 4" in out


def test_auto_trains_with_the_largest_micro_batch_that_fits(tiny_lab, fake_gpu, capsys):
    """End to end on the CPU: the estimate against the (fake) device picks 2, the run accumulates 4 of them and
    spends the budget exactly."""
    assert main(tiny_argv(tiny_lab, "auto", "train.micro_batch_size=auto")) == 0
    out = capsys.readouterr().out
    assert "train.micro_batch_size=auto: 2 sequences per process (by the estimate; not probed on the CPU" in out
    assert "2 sequences x 4 micro-batches x 1 process(es)" in out and "done: 4,096 tokens in 8 steps" in out


def test_micro_batch_size_auto_is_a_config_value(tmp_path):
    base = {"mixture": {"total_tokens": 4096, "sources": [{"name": "a", "kind": "pydocs", "weight": 1}]},
            "train": {"seq_len": 64, "batch_tokens": 512}}
    t = config_from_dict({**base, "train": {**base["train"], "micro_batch_size": "auto"}}).train
    assert t.micro_batch_size == "auto"
    with pytest.raises(SparknetError, match="train.micro_batch_size: auto is chosen when training starts"):
        t.grad_accum_steps(1)
    with pytest.raises(SparknetError, match="must be a whole number or 'auto', got 'biggest'"):
        config_from_dict({**base, "train": {**base["train"], "micro_batch_size": "biggest"}})
    assert config_from_dict({**base, "train": {**base["train"], "micro_batch_size": "4"}}).train.micro_batch_size == 4
