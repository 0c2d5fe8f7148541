"""Checkpoints: saved atomically (a folder renamed into place, fsynced), the newest kept, loaded onto any device,
and the resume point agreed by every process before it is used. A checkpoint is a standard Hugging Face GPT-2 export
plus the trainer's state (AdamW, step, RNG, the data position), so any checkpoint also loads as a model.

Layout: <run_dir>/checkpoints/step-00001234/ = an HF checkpoint (model.safetensors, config.json, tokenizer) +
trainer.safetensors (exact padded weights, AdamW moments, RNG) + trainer_state.json. Written into a temp dir and
renamed, so a kill leaves the previous checkpoint intact. No pickles.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from sparknet.errors import SparknetError
from sparknet.model import GPT, export_hf


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
