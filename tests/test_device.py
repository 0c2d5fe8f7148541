"""The accelerator side without an accelerator: the MFU peak table by full device name, the compiled training path
(torch.compile with Inductor on the CPU, and its switch from the fused loss to the plain one), no silent CPU fallback
(a GPU torch cannot use, a run far too long for the CPU: both simulated here), CUDA 13's ptxas for compute capability
12.x (fake toolkit folders), and what scripts/bootstrap.sh would install (fake nvidia-smi and uname)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sparknet.device as device
from sparknet.config import load_config
from sparknet.device import configure_ptxas, find_cuda13_ptxas, format_seconds, lookup_peak
from sparknet.errors import SparknetError
from sparknet.model import GPTShape
from sparknet.run import main, make_accelerator

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, peak, label", [
    ("NVIDIA H100 80GB HBM3", 989e12, "H100 SXM"),
    ("NVIDIA H100 PCIe", 756e12, "H100 PCIe"),
    ("NVIDIA H100 NVL", 835e12, "H100 NVL"),
    ("NVIDIA H200", 989e12, "H200 SXM"),
    ("NVIDIA H200 NVL", 835e12, "H200 NVL"),
    ("NVIDIA GH200 480GB", 989e12, "GH200"),
    ("NVIDIA GB10", 100e12, "DGX Spark GB10"),
    ("NVIDIA A100-SXM4-40GB", 312e12, "A100"),
    ("NVIDIA A100-SXM4-80GB", 312e12, "A100"),
    ("NVIDIA A100 80GB PCIe", 312e12, "A100"),
    ("NVIDIA A100-PCIE-40GB", 312e12, "A100"),
    ("NVIDIA GeForce RTX 4090", 165e12, "RTX 4090"),
    ("NVIDIA GeForce RTX 3090", 71e12, "RTX 3090"),
    ("NVIDIA GeForce RTX 5090", 209e12, "RTX 5090"),
    ("NVIDIA L40S", 362e12, "L40S"),
    ("NVIDIA L4", 121e12, "L4"),
])
def test_the_peak_table_tells_variants_of_one_chip_apart(name, peak, label):
    assert lookup_peak(name) == (peak, label)


def test_an_unknown_device_has_no_peak():
    assert lookup_peak("NVIDIA GeForce GT 1030") is None and lookup_peak("") is None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="Inductor needs a C compiler on the CPU (none on PATH)")
@pytest.mark.slow
def test_compiled_training_on_the_cpu_matches_eager(tmp_path, tiny_mixture, capsys):
    """train.compile=on runs Inductor on the CPU: the compiled path (the plain logits -> cross-entropy loss that
    Inductor fuses itself, instead of the hand-fused eager loss) trains and matches eager training."""
    from sparknet.config import load_config
    from sparknet.run import execute

    torch.set_num_threads(1)
    tiny_mixture(tmp_path, train={"log_every_steps": 1}, eval={"sample_tokens": 0, "sample_prompts": []})
    results = {}
    for mode in ("off", "on"):
        cfg = load_config(tmp_path / "tiny.yaml", [f"lab_dir={tmp_path}", f"name=compile-{mode}",
                                                   "mixture.total_tokens=4096", f"train.compile={mode}",
                                                   "tracking.enabled=false"])
        results[mode] = execute(cfg, progress=False).result
        out = capsys.readouterr().out
        assert ("(compiled)" in out) == (mode == "on"), out
    eager, compiled = results["off"], results["on"]
    assert compiled["steps"] == eager["steps"] == 8 and compiled["tokens"] == 4096
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=2e-3)
    for name, loss in eager["val_loss"].items():
        assert compiled["val_loss"][name] == pytest.approx(loss, abs=2e-3)


# ---------------------------------------------------------------------------------------------
# No silent CPU fallback.

# CodeLion's run (gpt2-70m, 1B tokens of GPT-2's vocabulary at 1024) on the tiny recipe's sources: the checks come
# before any data is prepared, so nothing here reads or tokenizes a byte.
BIG = ["model.preset=gpt2-70m", "model.n_positions=1024", "tokenizer.name=gpt2", "train.seq_len=1024",
       "train.batch_tokens=122880", "train.micro_batch_size=24", "mixture.total_tokens=1B", "tracking.enabled=false"]
BIG_FLOPS = GPTShape.from_config(load_config(ROOT / "mixtures" / "codelion_502030.yaml").model, 50257
                                 ).flops_per_token(1024) * 1e9  # 4.57e17


@pytest.fixture
def big(tmp_path, tiny_mixture, monkeypatch):
    """(argv of `python -m sparknet.run` for the 1B-token run, the lab folder); torch sees no CUDA (also on a GPU
    machine) and the CPU counts as 2 threads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_threads", lambda world=1: 2)
    tiny_mixture(tmp_path)
    lab = tmp_path / "lab"
    return [str(tmp_path / "tiny.yaml"), f"lab_dir={lab}", *BIG, "--quiet"], lab


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_a_gpu_that_torch_cannot_use_stops_the_run_before_any_work(big, monkeypatch, capsys):
    """nvidia-smi shows a GB10 but the installed torch is a CPU-only wheel: one line naming the build and the fix,
    exit 2, nothing prepared (and never a month of CPU training)."""
    argv, lab = big
    monkeypatch.setattr(device, "visible_gpu", lambda: "NVIDIA GB10 (nvidia-smi)")
    monkeypatch.setattr(torch.version, "cuda", None)
    err = one_line_error(capsys, main(argv))
    assert "train.device=auto: this machine has NVIDIA GB10 (nvidia-smi)" in err
    assert f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)" in err
    assert "CUDA 13 build" in err and "bash scripts/bootstrap.sh" in err and "train.device=cpu to insist" in err
    assert "would train on the CPU: ~118 days for 1,000,000,000 tokens of gpt2-70m" in err
    assert not (lab / "tokens").exists()  # refused before preparing


def test_a_cuda_build_that_cannot_start_is_named_too(big, monkeypatch, capsys):
    """A CUDA build on a box whose driver is older (or a DGX Spark with a pre-CUDA-13 build): the message says which
    CUDA the build wants."""
    argv, _ = big
    monkeypatch.setattr(device, "visible_gpu", lambda: "NVIDIA GB10 (nvidia-smi)")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    err = one_line_error(capsys, main(argv))
    assert f"torch {torch.__version__} (built for CUDA 12.8) cannot use it" in err and "CUDA 13 build" in err


def test_a_run_far_too_long_for_the_cpu_is_refused_with_its_estimate(big, monkeypatch, capsys):
    argv, lab = big
    monkeypatch.setattr(device, "visible_gpu", lambda: None)
    err = one_line_error(capsys, main(argv))
    # 4.57e17 FLOPs at 45 GFLOP/s (this machine's 2 threads) = 1.02e7 s, plus 8,139 steps x 10 ms
    assert BIG_FLOPS == pytest.approx(4.57e17, rel=1e-3) and format_seconds(BIG_FLOPS / 45e9) == "118 days"
    assert "no GPU here" in err and "~118 days for 1,000,000,000 tokens of gpt2-70m" in err
    assert "4.57e+17 FLOPs at ~45 GFLOP/s on 2 thread(s), a measured CPU rate" in err and "more than the 4 h" in err
    assert "train.device=cpu to insist" in err
    assert not (lab / "tokens").exists()


def test_train_device_cpu_insists(big, monkeypatch):
    """train.device=cpu: no probe, no estimate, no refusal (the accelerator is made at once)."""
    argv, _ = big
    monkeypatch.setattr(device, "visible_gpu", lambda: pytest.fail("probed the GPU although the CPU was asked for"))
    cfg = load_config(argv[0], [*argv[1:-1], "train.device=cpu"])
    assert make_accelerator(cfg).device.type == "cpu"


def test_the_quickstart_and_tiny_runs_are_never_refused(tmp_path, tiny_mixture, monkeypatch, capsys):
    """The quickstart (cpu-small, 1M tokens: ~4 min by the estimate, 3.1 min measured) and the tests' tiny runs train
    on the CPU; on a GPU box with a CPU-only torch they still do, after a one-line warning."""
    monkeypatch.setattr(device, "cpu_threads", lambda world=1: 1)  # the slowest CPU the estimate allows for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quick = load_config(ROOT / "mixtures" / "quickstart.yaml")
    tiny = load_config(tiny_mixture(tmp_path), [f"lab_dir={tmp_path}"])
    monkeypatch.setattr(device, "visible_gpu", lambda: None)
    assert device.check_cpu_fallback(quick) is None and device.check_cpu_fallback(tiny) is None
    monkeypatch.setattr(device, "visible_gpu", lambda: "NVIDIA H100 80GB HBM3 (nvidia-smi)")
    warning = device.check_cpu_fallback(quick)
    assert warning.startswith("warning: train.device=auto: this machine has NVIDIA H100") and "\n" not in warning
    assert "~4 min for 1,000,000 tokens of cpu-small" in warning  # 9.48e12 FLOPs / 45e9 + 245 steps x 10 ms = 213 s
    make_accelerator(tiny)  # prints the warning once and hands back the CPU
    err = capsys.readouterr().err
    assert err.count("warning: train.device=auto") == 1 and "this short run trains on the CPU" in err


# The CPU estimate's calibration (sparknet.device.CPU_FLOPS, measured 2026-12-06 on this project's 2-core EPYC):
# (preset and overrides on the quickstart's mixture, or None for the tests' tiny recipe; the median of the measured
# training tokens/s on 1 and 2 threads; the estimate's tokens/s).
CALIBRATED = [
    ("cpu-tiny", None, 28_000, 25_361),
    ("cpu-small", [], 4_200, 4_693),
    ("cpu-small, GPT-2 vocab", ["tokenizer.name=gpt2", "train.batch_tokens=2048", "train.micro_batch_size=8"], 806, 996.7),
    ("gpt2-70m", ["model.preset=gpt2-70m", "train.seq_len=128"], 217, 180.6),
    ("gpt2-70m, GPT-2 vocab", ["model.preset=gpt2-70m", "train.seq_len=128", "tokenizer.name=gpt2",
                               "train.batch_tokens=2048"], 98.5, 115.1),
]


@pytest.mark.parametrize("name, overrides, measured, estimate", CALIBRATED, ids=[c[0] for c in CALIBRATED])
def test_the_cpu_estimate_is_the_calibrated_one(tmp_path, tiny_mixture, name, overrides, measured, estimate):
    """The arithmetic, not a timing: FLOPs at 45 GFLOP/s for this machine's 2 threads, plus 10 ms per optimizer
    step; within 30% of what was measured for each size."""
    path = tiny_mixture(tmp_path) if overrides is None else ROOT / "mixtures" / "quickstart.yaml"
    cfg = load_config(path, overrides or [])
    seconds, flops = device.cpu_seconds(cfg, 2)
    steps = -(-cfg.mixture.total_tokens // cfg.train.batch_tokens)
    assert seconds == pytest.approx(flops / 45e9 + steps * 0.01, rel=1e-12)
    tokens_per_s = cfg.mixture.total_tokens / seconds
    assert tokens_per_s == pytest.approx(estimate, rel=1e-3)
    assert 0.7 < tokens_per_s / measured < 1.3


def test_the_cpu_estimate_of_the_issues_run_and_of_more_threads():
    """The issue's run (gpt2-70m, 262,144 tokens at 128, the quickstart's 4,096-token BPE) took ~29 min on this
    machine where the old rate (2 x 60 GFLOP/s) said ~9; now ~24 min. Beyond 2 threads the rate grows with them."""
    cfg = load_config(ROOT / "mixtures" / "quickstart.yaml",
                      ["model.preset=gpt2-70m", "train.seq_len=128", "mixture.total_tokens=262144"])
    seconds, flops = device.cpu_seconds(cfg, 2)
    assert flops == pytest.approx(6.527e13, rel=1e-3) and format_seconds(seconds) == "24 min"
    assert 0.7 < seconds / (29 * 60) < 1.3
    assert device.cpu_seconds(cfg, 1)[0] == seconds  # one thread: the same rate
    assert device.cpu_seconds(cfg, 8)[0] == pytest.approx(flops / (4 * 45e9) + 64 * 0.01)


def test_cuda_asked_for_without_cuda_names_the_build(monkeypatch):
    monkeypatch.setattr(device, "visible_gpu", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(ROOT / "mixtures" / "quickstart.yaml", ["train.device=cuda"])
    with pytest.raises(SparknetError) as exc:
        make_accelerator(cfg)
    msg = str(exc.value)
    assert msg.startswith("train.device: cuda was asked for but no CUDA device is usable") and "\n" not in msg
    assert f"torch {torch.__version__}" in msg and "bootstrap.sh" in msg


def test_the_gpu_probe_reads_nvidia_smi_and_survives_a_broken_driver(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA GB10'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert device.visible_gpu() == "NVIDIA GB10 (nvidia-smi)"
    fake.write_text("#!/bin/sh\necho 'Failed to initialize NVML: Driver/library version mismatch'\nexit 18\n")
    monkeypatch.setattr(device.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert device.visible_gpu() == ("an NVIDIA GPU (/dev/nvidia0; nvidia-smi: Failed to initialize NVML: "
                                    "Driver/library version mismatch)")
    monkeypatch.setattr(device.glob, "glob", lambda pattern: [])
    assert device.visible_gpu() is None  # nvidia-smi installed, no device: a CPU machine


# ---------------------------------------------------------------------------------------------
# CUDA 13's ptxas for compute capability 12.x (the DGX Spark's GB10 is sm_121).


def fake_cuda(root: Path, name: str, version: str | None = None, ptxas_release: str | None = None) -> Path:
    """A fake CUDA toolkit folder root/name with an executable bin/ptxas; `version` goes into version.json,
    `ptxas_release` is what its ptxas --version prints."""
    d = root / name
    (d / "bin").mkdir(parents=True)
    ptxas = d / "bin" / "ptxas"
    ptxas.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {ptxas_release}, V{ptxas_release}.1'\n"
                     if ptxas_release else "#!/bin/sh\nexit 1\n")
    ptxas.chmod(0o755)
    if version:
        (d / "version.json").write_text(f'{{"cuda": {{"name": "CUDA SDK", "version": "{version}"}}}}')
    return d


def test_ptxas_for_sm121_is_cuda_13s_and_set_before_compile(tmp_path, capsys):
    usr = tmp_path / "usr_local"
    fake_cuda(usr, "cuda-12.8")
    fake_cuda(usr, "cuda-13.0")
    fake_cuda(usr, "cuda-13.1")
    (usr / "cuda").symlink_to(usr / "cuda-12.8")  # the default toolkit is the old one
    env: dict[str, str] = {}
    line = configure_ptxas((12, 1), env, usr)
    assert env["TRITON_PTXAS_PATH"] == str(usr / "cuda-13.1" / "bin" / "ptxas")  # the newest CUDA 13
    assert line.startswith(f"sm_121: TRITON_PTXAS_PATH={usr}/cuda-13.1/bin/ptxas") and "\n" not in line
    # The user's own choice is kept, and GPUs Triton's ptxas knows are left alone.
    env = {"TRITON_PTXAS_PATH": "/mine/ptxas"}
    assert configure_ptxas((12, 1), env, usr) is None and env == {"TRITON_PTXAS_PATH": "/mine/ptxas"}
    for cap in [(9, 0), (8, 0), (10, 0)]:
        env = {}
        assert configure_ptxas(cap, env, usr) is None and env == {}
    env = {}  # sm_120 (RTX 50xx) takes CUDA 13's when there is one, and needs no warning when there is none
    assert configure_ptxas((12, 0), env, usr).startswith("sm_120: ") and env["TRITON_PTXAS_PATH"].endswith("13.1/bin/ptxas")


def test_ptxas_is_found_by_cuda_home_version_json_or_its_own_version(tmp_path):
    usr = tmp_path / "usr_local"
    usr.mkdir()
    # /usr/local/cuda as a plain folder: its version comes from version.json, else from ptxas --version.
    cuda = fake_cuda(usr, "cuda", version="12.9.1", ptxas_release="12.9")
    assert find_cuda13_ptxas({}, usr) is None
    (cuda / "version.json").unlink()
    (cuda / "bin" / "ptxas").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    assert find_cuda13_ptxas({}, usr) == cuda / "bin" / "ptxas"
    # $CUDA_HOME comes first when it is CUDA 13; a CUDA 12 one is passed over.
    home = fake_cuda(tmp_path / "opt", "toolkit", version="13.0.2")
    assert find_cuda13_ptxas({"CUDA_HOME": str(home)}, usr) == home / "bin" / "ptxas"
    old = fake_cuda(tmp_path / "opt", "old", version="12.4.0")
    assert find_cuda13_ptxas({"CUDA_HOME": str(old)}, usr) == cuda / "bin" / "ptxas"


def test_no_cuda_13_ptxas_is_a_warning_naming_the_fix(tmp_path):
    usr = tmp_path / "usr_local"
    fake_cuda(usr, "cuda-12.8")
    env: dict[str, str] = {}
    line = configure_ptxas((12, 1), env, usr)
    assert env == {} and line.startswith("warning: this GPU (sm_121) needs CUDA 13's ptxas")
    assert "install the CUDA 13 toolkit, or set TRITON_PTXAS_PATH" in line and "\n" not in line
    assert configure_ptxas((12, 0), env, usr) is None and env == {}


# ---------------------------------------------------------------------------------------------
# scripts/bootstrap.sh --plan: what it would do about torch, on machines simulated with fake nvidia-smi and uname.

NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *query-gpu=name*) echo "{name}" ;;
  *query-gpu=compute_cap*) echo "{cap}" ;;
  "") echo "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: {driver} |" ;;
esac
"""


def bootstrap_plan(tmp_path: Path, arch: str, gpu: tuple[str, str, str] | None, torch_probe: str) -> str:
    bin_dir = tmp_path / f"bin-{arch}-{gpu[0] if gpu else 'cpu'}".replace(" ", "_")
    bin_dir.mkdir(parents=True)
    (bin_dir / "uname").write_text(f"#!/bin/sh\necho {arch}\n")
    if gpu:
        (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI.format(name=gpu[0], cap=gpu[1], driver=gpu[2]))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    # The real PATH without any nvidia-smi of the machine running the tests (a GPU CI box), behind the fakes.
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()]
    env = dict(os.environ, PATH=os.pathsep.join([str(bin_dir), *path]), SPARKNET_TORCH_PROBE=torch_probe)
    env.pop("SPARKNET_TORCH_INDEX", None)
    env.pop("SPARKNET_TORCH", None)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh"), "--plan"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(any(Path("/dev").glob("nvidia[0-9]*")), reason="this machine has a GPU device node")
def test_bootstrap_installs_the_cuda_13_build_on_a_dgx_spark_and_keeps_a_good_one(tmp_path):
    gb10 = ("NVIDIA GB10", "12.1", "13.0")
    cu130 = "https://download.pytorch.org/whl/cu130"
    plan = bootstrap_plan(tmp_path, "aarch64", gb10, "2.13.0+cpu none 0")
    assert plan == (f"bootstrap plan: replace torch: torch==2.13.0 from {cu130}, a CUDA build for NVIDIA GB10 "
                    "(torch 2.13.0+cpu is a CPU-only build and this machine has NVIDIA GB10)")
    assert f"install torch: torch==2.13.0 from {cu130}" in bootstrap_plan(tmp_path / "a", "aarch64", gb10, "missing")
    # A CUDA 12 build does not know sm_121: replaced; a CUDA 13 one is kept.
    assert "needs CUDA 13" in bootstrap_plan(tmp_path / "b", "aarch64", gb10, "2.9.0+cu128 12.8 1")
    assert bootstrap_plan(tmp_path / "c", "aarch64", gb10, "2.9.0+cu130 13.0 1") == \
        "bootstrap plan: keep torch 2.9.0+cu130 (NVIDIA GB10; CUDA 13.0)"
    # x86_64 with a GPU: PyPI's torch (a CUDA build); an existing CUDA build is kept whatever its CUDA.
    h100 = ("NVIDIA H100 80GB HBM3", "9.0", "12.8")
    assert "replace torch: torch==2.13.0 from PyPI, a CUDA build for NVIDIA H100" in \
        bootstrap_plan(tmp_path / "d", "x86_64", h100, "2.13.0+cpu none 0")
    assert "keep torch 2.5.1+cu121" in bootstrap_plan(tmp_path / "e", "x86_64", h100, "2.5.1+cu121 12.1 1")
    # No GPU: as before, the pinned CPU wheel when torch is missing, and whatever torch is there is kept.
    assert bootstrap_plan(tmp_path / "f", "x86_64", None, "missing") == \
        "bootstrap plan: install torch: torch==2.13.0 from PyPI, the CPU build (no torch in .venv; no NVIDIA GPU)"
    assert bootstrap_plan(tmp_path / "g", "aarch64", None, "2.13.0+cpu none 0").startswith(
        "bootstrap plan: keep torch 2.13.0+cpu")
