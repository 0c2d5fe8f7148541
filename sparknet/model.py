"""The GPT-2 model the trainer runs, and its exact export to a standard Hugging Face GPT-2 checkpoint.

Why our own module instead of training `transformers.GPT2LMHeadModel` directly: it is ~100 lines we can
read, it computes the per-token loss in one fused cross-entropy (we need per-token losses for the
per-source metrics), it goes through `F.scaled_dot_product_attention` with `is_causal=True` (flash
attention on CUDA, no mask tensor), and it pads the vocabulary to a multiple of 64 so the 50,257-wide
output matmul runs on tensor-core-friendly shapes. The parameterization is exactly GPT-2's (pre-norm,
learned positions, tanh-GELU, tied embeddings, LayerNorm eps 1e-5), so `export_hf` writes weights that
`AutoModelForCausalLM.from_pretrained` loads and that give the same logits (tested).

The loss goes through `linear_cross_entropy`, which never materializes the logits as a tensor of their
own: see its docstring for what that saves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparknet.config import ModelConfig


@dataclass(frozen=True)
class GPTShape:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int  # the tokenizer's vocabulary: what an exported checkpoint has
    padded_vocab_size: int  # rows of the embedding while training (a multiple of 64 for the matmuls)

    @classmethod
    def from_config(cls, model: ModelConfig, vocab_size: int) -> GPTShape:
        n_layer, n_head, n_embd, n_positions = model.shape()
        pad = model.pad_vocab_multiple
        padded = -(-vocab_size // pad) * pad if pad > 1 else vocab_size
        return cls(n_layer, n_head, n_embd, n_positions, vocab_size, padded)

    def num_params(self, padded: bool = False) -> int:
        """Parameters of the exported model (tied embedding counted once, position embedding included)."""
        d, L = self.n_embd, self.n_layer
        per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        vocab = self.padded_vocab_size if padded else self.vocab_size
        return vocab * d + self.n_positions * d + L * per_block + 2 * d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (DESIGN.md): 6 N (N with the tied embedding, without positions)
        + 12 n_layer d_model seq_len for attention. 457 MFLOP/token for gpt2-70m at 1024."""
        n = self.num_params() - self.n_positions * self.n_embd
        return 6.0 * n + 12.0 * self.n_layer * self.n_embd * seq_len


def _chunk_rows(width: int, device: torch.device) -> int:
    """Rows of [rows, width] logits per chunk. CPU: ~4 MB of fp32, so the softmax passes after the matmul
    run in cache. GPU: big chunks (a few kernel launches per micro-batch), ~1 GB of fp32 temporaries."""
    budget = 2**20 if device.type == "cpu" else 2**28
    return max(16, budget // width)


class _LinearCrossEntropy(torch.autograd.Function):
    """nll[i] = logsumexp(z_i[:vocab]) - z_i[y_i] with z = h @ weight.T, and its gradient, in one buffer.

    The forward pass computes the logits chunk by chunk into one [N, rows of weight] buffer and turns each
    chunk, in place, into d nll / d z = softmax(z) - onehot(y) while it is still in cache (0 in the
    padding columns past `vocab`, which are never predicted); the backward pass is then just two matmuls
    with that buffer (scaled by the incoming per-token gradient, so any weighting of the tokens is exact).
    The matmuls run over the padded rows (50,304 for GPT-2: aligned, tensor-core-friendly shapes).
    Against logits -> F.cross_entropy this allocates one [N, vocab] tensor instead of four or five
    (logits, their fp32 copy under bf16, log-softmax, its gradient, the padded gradient of the slice) and
    makes about half the passes over them: the output layer with its cross-entropy went from 373 to 244 ms
    on cpu-small (16 x 256 tokens, vocab 4,096, one CPU thread), and at 24 x 1024 tokens with GPT-2's
    50,257 the backward's peak is ~10 GB lower (from the tensor sizes). Under autocast the matmuls run in
    the autocast dtype and the softmax in fp32, like F.cross_entropy(logits.float()).
    Rows whose label is -100 give 0 and no gradient. First derivatives only (once_differentiable).
    """

    @staticmethod
    def forward(ctx, h, weight, labels, vocab: int, keep_grad: bool):
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            hc = h.to(dtype)
            n, width = hc.shape[0], w.shape[0]
            rows = _chunk_rows(width, h.device)
            # With no backward to come (evaluation), one chunk-sized scratch buffer is enough.
            buf = torch.empty(n if keep_grad else min(n, rows), width, dtype=dtype, device=h.device)
            nll = torch.empty(n, dtype=torch.float32, device=h.device)
            valid = labels >= 0
            target = labels.clamp(min=0)
            for start in range(0, n, rows):
                end = min(n, start + rows)
                z = buf[start:end] if keep_grad else buf[: end - start]
                torch.mm(hc[start:end], w.t(), out=z)
                real = z[:, :vocab]  # the softmax is over the tokenizer's vocabulary only
                p = real if dtype == torch.float32 else real.float()
                y = target[start:end, None]
                z_y = p.gather(1, y).squeeze(1)
                m = p.amax(1, keepdim=True)
                p.sub_(m).exp_()
                s = p.sum(1, keepdim=True)
                nll[start:end] = (m + s.log()).squeeze(1) - z_y
                if keep_grad:
                    # softmax - onehot; an ignored row divides by inf and takes no -1, so it is all zeros
                    # (elementwise masks only: boolean indexing would cost a GPU->host sync per chunk).
                    ok = valid[start:end, None]
                    p.div_(s.masked_fill_(~ok, float("inf")))
                    p.scatter_add_(1, y, -ok.to(p.dtype))
                    if p is not real:
                        real.copy_(p)
                    z[:, vocab:].zero_()
            nll.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hc, weight, buf if keep_grad else None)
        ctx.dtype, ctx.h_dtype = dtype, h.dtype
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll):
        hc, weight, dz = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad_nll.to(torch.float32)[:, None]
        with torch.autocast(hc.device.type, enabled=False):
            grad_h = (torch.mm(dz, weight.to(dtype)).float() * g).to(ctx.h_dtype)
            grad_w = torch.mm(dz.t(), (hc.float() * g).to(dtype)).to(weight.dtype)  # padding rows: 0
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-row NLL [N] of `labels` [N] under the logits h [N, d] @ weight.T, softmax over their first `vocab`
    columns (`weight` may have padding rows past `vocab`; see _LinearCrossEntropy)."""
    keep_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, labels, vocab, keep_grad)


class Block(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.n_head = s.n_head
        self.ln_1 = nn.LayerNorm(s.n_embd, eps=1e-5)
        self.c_attn = nn.Linear(s.n_embd, 3 * s.n_embd)
        self.attn_proj = nn.Linear(s.n_embd, s.n_embd)
        self.ln_2 = nn.LayerNorm(s.n_embd, eps=1e-5)
        self.c_fc = nn.Linear(s.n_embd, 4 * s.n_embd)
        self.mlp_proj = nn.Linear(4 * s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # [B, T, T] bool, True = may attend (a scorer's shared-context rows)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.padded_vocab_size, shape.n_embd)
        self.wpe = nn.Embedding(shape.n_positions, shape.n_embd)
        self.h = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.n_embd, eps=1e-5)
        # The loss through `linear_cross_entropy` (eager) or logits -> F.cross_entropy (for torch.compile,
        # which fuses that chain itself); the trainer switches it. Both give the same values (tested).
        self.fused_loss = True

    def init_weights(self, seed: int) -> None:
        """GPT-2's initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        gen = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.shape.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln_" in name or name.startswith("ln_"):
                    p.fill_(1.0)
                else:
                    std = resid_std if name.endswith("proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states [B, T, n_embd] (after ln_f): what the output layer reads. A scorer that needs a
        few positions' logits projects only those (`head`), not all B x T x 50k. `position_ids` [B, T] and `mask`
        [B, T, T] (True = may attend; default causal) let one row hold a context and several continuations."""
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary of hidden states `h` [..., n_embd] (the tied output embedding)."""
        return F.linear(h, self.wte.weight)[..., : self.shape.vocab_size]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits [B, T, vocab]; with `labels` (ignore_index -100), the per-token NLL [B, T]
        instead, in fp32 (the logits are not kept, which saves B x T x 50k floats of memory)."""
        h = self.hidden(input_ids)
        if labels is None:
            # Tied output embedding. The matmul runs over the padded rows (fast shapes); the padding columns
            # are then dropped so the softmax is over the real vocabulary, exactly as in the exported model.
            return F.linear(h, self.wte.weight)[..., : self.shape.vocab_size]
        if not self.fused_loss:  # what torch.compile sees: Inductor fuses this chain itself
            logits = F.linear(h, self.wte.weight)[..., : self.shape.vocab_size]
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="none").view_as(labels)
        return linear_cross_entropy(h.flatten(0, 1), self.wte.weight, labels.flatten(),
                                    self.shape.vocab_size).view_as(labels)


def build_model(model_cfg: ModelConfig, vocab_size: int, seed: int) -> GPT:
    model = GPT(GPTShape.from_config(model_cfg, vocab_size))
    model.init_weights(seed)
    return model


# ---------------------------------------------------------------------------------------------
# Export: our names and nn.Linear layout -> transformers' GPT2LMHeadModel (Conv1D stores [in, out]).

_HF_LINEAR = {"c_attn": "attn.c_attn", "attn_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    s = model.shape
    sd = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["wte.weight"][: s.vocab_size],
           "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": sd["ln_f.bias"]}
    for i in range(s.n_layer):
        for ours, theirs in _HF_LINEAR.items():
            out[f"transformer.h.{i}.{theirs}.weight"] = sd[f"h.{i}.{ours}.weight"].t()
            out[f"transformer.h.{i}.{theirs}.bias"] = sd[f"h.{i}.{ours}.bias"]
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                out[f"transformer.h.{i}.{ln}.{p}"] = sd[f"h.{i}.{ln}.{p}"]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def hf_config(shape: GPTShape, eos_token_id: int | None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": shape.vocab_size, "n_positions": shape.n_positions, "n_ctx": shape.n_positions,
        "n_embd": shape.n_embd, "n_layer": shape.n_layer, "n_head": shape.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "tie_word_embeddings": True, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


def export_hf(model: GPT, out_dir: Path, tokenizer=None, eos_token_id: int | None = None) -> Path:
    """Write `out_dir` as a standard HF GPT-2 checkpoint (config.json + model.safetensors + tokenizer).

    The caller makes it atomic (writes into a temp dir and renames)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model)
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(model.shape, eos_token_id), indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_exported(model_dir: Path, model_cfg: ModelConfig) -> GPT:
    """Our model from an exported HF checkpoint (used to resume the weights-only final model)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    model = GPT(GPTShape.from_config(model_cfg, cfg["vocab_size"]))
    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    ours = model.state_dict()
    ours["wte.weight"][: cfg["vocab_size"]] = sd["transformer.wte.weight"]
    ours["wpe.weight"].copy_(sd["transformer.wpe.weight"])
    ours["ln_f.weight"].copy_(sd["transformer.ln_f.weight"])
    ours["ln_f.bias"].copy_(sd["transformer.ln_f.bias"])
    for i in range(model.shape.n_layer):
        for mine, theirs in _HF_LINEAR.items():
            ours[f"h.{i}.{mine}.weight"].copy_(sd[f"transformer.h.{i}.{theirs}.weight"].t())
            ours[f"h.{i}.{mine}.bias"].copy_(sd[f"transformer.h.{i}.{theirs}.bias"])
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                ours[f"h.{i}.{ln}.{p}"].copy_(sd[f"transformer.h.{i}.{ln}.{p}"])
    model.load_state_dict(ours)
    return model
