"""The training loop computes exactly what it computed when these digests were recorded: a tiny run on the CPU, its
final weights, AdamW state and every logged loss hashed and compared with pinned sha256 digests. A refactor of
sparknet.train that changes no computation keeps them byte-identical; one that reorders a sum, skips an evaluation
or moves the RNG does not. The same run interrupted after a checkpoint and resumed ends with the same digests.

The digests hold for one torch build on one CPU instruction set: they were recorded on 2026-12-06 with torch
2.13.0+cpu on x86_64 (an AMD EPYC, torch's CPU capability AVX2), one thread. Elsewhere (another torch version,
another machine, another ISA whose kernels sum in another order) the test skips, saying why. It also skips when
the batches the loader yields differ from those recorded (a change in the tokenizer library, the token store or
the mixture plan): those have their own tests, and this one pins the loop, given its data.

The data are generated here (a fixed pseudo-random generator over fixed syllables, two sources in two styles), so
they depend neither on the installed Python's text nor on any file of the checkout."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import pytest
import torch

# Recorded on 2026-12-06 from this test's own run (_digests) on the code before train.py's refactor.
RECORDED_ON = {"torch": "2.13.0+cpu", "machine": "x86_64", "isa": "AVX2"}
DIGESTS = {
    "batches": "05d7138d0c00e21ba063082350880908a9d528bb50f2086eeb98e811419758e5",
    "weights": "9c248f54a2c331c586b70ab7269e41bcb7f879a65f8b1575767b0174be7dbeda",
    "optimizer": "2e232afc104dd4abbcea0faa12f23a67a2cb46776ea33e236ae78be2a8a637e2",
    "losses": "b57e394c5a7359f75ba2132de6014606e69ab552738b422656334250dc990ddb",
}

# 7,000 tokens = 110 sequences of 64 (the last one 24 tokens): 14 steps of 8 sequences, the last step 6 sequences,
# 2 micro-batches of 4 each (accumulation), logged every 2 steps, evaluated every 3,000 tokens (steps 6 and 12 and the
# end), checkpointed every 2,048 tokens (steps 4, 8, 12 and the end): every branch of the loop runs.
OVERRIDES = ["mixture.total_tokens=7000", "train.compile=off", "train.device=cpu", "train.micro_batch_size=4",
             "train.log_every_steps=2", "train.checkpoint_every_tokens=2048", "train.keep_checkpoints=2",
             "train.warmup_fraction=0.1", "eval.every_tokens=3000", "eval.val_tokens=512", "tracking.enabled=false"]


def _text(seed: int, syllables: list[str], docs: int, code: bool) -> list[str]:
    """`docs` documents from a 32-bit linear congruential generator: the same on every machine and Python."""
    state = seed

    def draw(n: int) -> int:
        nonlocal state
        state = (1664525 * state + 1013904223) % 2**32
        return (state >> 8) % n

    def word() -> str:
        return "".join(syllables[draw(len(syllables))] for _ in range(1 + draw(3)))

    out = []
    for _ in range(docs):
        if code:
            lines = [f"{word()} = {word()}({word()}, {draw(100)}) + {word()}" for _ in range(3 + draw(6))]
            out.append("def " + word() + "():\n    " + "\n    ".join(lines) + "\n")
        else:
            sentences = [" ".join(word() for _ in range(4 + draw(9))).capitalize() + "." for _ in range(3 + draw(5))]
            out.append(" ".join(sentences))
    return out


@pytest.fixture(scope="module")
def golden_lab(tmp_path_factory, tiny_mixture):
    d = tmp_path_factory.mktemp("golden")
    prose = _text(7, ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "ri", "su", "an", "el"], 400, False)
    code = _text(11, ["x", "get", "set", "val", "idx", "buf", "len", "map", "_", "run"], 400, True)
    for name, texts in (("prose", prose), ("code", code)):
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tiny_mixture(d, mixture={"val_tokens": 1024, "sources": [
        {"name": "prose", "kind": "local", "path": str(d / "prose.jsonl"), "weight": 0.6, "max_repeats": 4},
        {"name": "code", "kind": "local", "path": str(d / "code.jsonl"), "weight": 0.4, "max_repeats": 4}]})
    return d


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a matmul's summation order may depend on the thread count
    yield
    torch.set_num_threads(before)


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in sorted name order: name, dtype, shape, then the raw bytes (as safetensors holds
    them)."""
    def chunks():
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            yield f"{name}|{t.dtype}|{list(t.shape)}|".encode()
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return _sha(chunks())


def _train(lab: Path, run_dir: Path, fault=None):
    from sparknet.config import load_config
    from sparknet.prepare import prepare
    from sparknet.run import make_accelerator
    from sparknet.train import train

    cfg = load_config(lab / "tiny.yaml", [f"lab_dir={lab}", *OVERRIDES])
    run_dir.mkdir(parents=True, exist_ok=True)  # as sparknet.run makes it
    prepared = prepare(cfg, progress=False, write_report=False)
    return prepared, train(cfg, prepared, make_accelerator(cfg), run_dir, progress=False, fault=fault)


def _digests(prepared, result, run_dir: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    loader = prepared.loader(1)

    def batches():
        for step in range(loader.num_steps):
            for micro in range(loader.grad_accum_steps):
                b = loader.batch(step, micro, 0)
                yield from (a.tobytes() for a in (b.input_ids, b.labels, b.source_ids))

    # The final checkpoint's weights and AdamW state (its rng.* entries are the process's global generators, which
    # depend on what ran in the process before the run: not pinned).
    tensors = load_file(str(Path(result.checkpoint) / "trainer.safetensors"))
    # Every logged value but the clock's (time, tokens/s, MFU), the last one per step (a resumed run logs some
    # steps twice), and what the result reports.
    logged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        logged.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k not in ("step", "time") and not k.startswith("perf/")})
    reported = {"steps": result.steps, "tokens": result.tokens, "tokens_per_source": result.tokens_per_source,
                "train_loss": result.train_loss, "val_loss": result.val_loss, "samples": result.samples,
                "logged": {str(k): logged[k] for k in sorted(logged)}}
    return {
        "batches": _sha(batches()),
        "weights": _tensor_digest({k: v for k, v in tensors.items() if k.startswith("model.")}),
        "optimizer": _tensor_digest({k: v for k, v in tensors.items() if k.startswith("optim.")}),
        "losses": _sha([json.dumps(reported, sort_keys=True).encode()]),
    }


def _skip_elsewhere() -> None:
    here = {"torch": torch.__version__, "machine": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()}
    if here != RECORDED_ON:
        pytest.skip(f"the digests were recorded with {RECORDED_ON}; this is {here}")


def _check(got: dict[str, str]) -> None:
    if got["batches"] != DIGESTS["batches"]:
        pytest.skip(f"the loader's batches differ from those the digests were recorded on ({got['batches']}): the "
                    f"tokenizer, token store or plan changed, not necessarily the loop")
    assert got == DIGESTS


def test_a_tiny_run_ends_with_the_recorded_weights_and_losses(golden_lab, tmp_path, one_thread):
    _skip_elsewhere()
    prepared, result = _train(golden_lab, tmp_path / "run")
    assert result.steps == 14 and result.tokens == 7000
    _check(_digests(prepared, result, tmp_path / "run"))


class _Interrupt(Exception):
    pass


def test_the_same_run_interrupted_and_resumed_ends_identically(golden_lab, tmp_path, one_thread):
    """Stopped in step 10 (after the checkpoint of step 8, which ends a logging interval), then trained again in
    the same folder: it resumes from step 8 and ends with the uninterrupted run's digests."""
    _skip_elsewhere()
    run_dir = tmp_path / "run"

    def fault(step, nll):
        if step == 10:
            raise _Interrupt
        return nll

    with pytest.raises(_Interrupt):
        _train(golden_lab, run_dir, fault)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000008"]
    prepared, result = _train(golden_lab, run_dir)
    _check(_digests(prepared, result, run_dir))
