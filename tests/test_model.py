"""The model: CodeLion's parameter count, FLOPs per token, and exact export to Hugging Face GPT-2."""

from __future__ import annotations

import pytest
import torch

from sparknet.config import ModelConfig
from sparknet.model import GPT, GPTShape, build_model, export_hf, load_exported


def test_gpt2_70m_has_codelions_parameter_count_and_flops():
    shape = GPTShape.from_config(ModelConfig(preset="gpt2-70m"), 50257)
    assert shape.padded_vocab_size == 50304  # a multiple of 64
    assert round(shape.num_params() / 1e6, 2) == 64.09  # DESIGN.md: 64.09M with the tied embedding
    with torch.device("meta"):
        model = GPT(shape)
    # The module itself (padded rows included) agrees with the formula.
    assert sum(p.numel() for p in model.parameters()) == shape.num_params(padded=True)
    assert round(shape.flops_per_token(1024) / 1e6) == 457  # DESIGN.md: ~457 MFLOP/token at 1024
    assert round(GPTShape.from_config(ModelConfig(preset="gpt2-124m"), 50257).num_params() / 1e6, 1) == 124.4


def test_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from sparknet.tokenizer import TokenizerSpec, from_spec

    model = build_model(ModelConfig(preset="cpu-tiny"), 50257, seed=3)
    # Perturb biases and norms (zero/one at init) so that every tensor's mapping is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    tok = from_spec(TokenizerSpec("gpt2"))
    export_hf(model, tmp_path / "ckpt", tok.to_hf(), eos_token_id=tok.eot_id)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert not list((tmp_path / "ckpt").glob("*.bin")) and not list((tmp_path / "ckpt").glob("*.pt"))  # no pickles

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.vocab_size == 50257
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is Rome.")])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], 50257)  # padding columns dropped
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (ours - theirs).abs().max()

    # The saved tokenizer is GPT-2's: same ids as ours.
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt")("Hello world")["input_ids"] == [15496, 995]

    # And back: the exported weights rebuild the same model.
    again = load_exported(tmp_path / "ckpt", ModelConfig(preset="cpu-tiny")).eval()
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


def test_loss_is_per_token_and_ignores_masked_positions():
    model = build_model(ModelConfig(preset="cpu-tiny"), 300, seed=0)
    ids = torch.randint(0, 300, (2, 16))
    labels = torch.randint(0, 300, (2, 16))
    labels[1, 8:] = -100
    nll = model(ids, labels)
    assert nll.shape == (2, 16) and (nll[1, 8:] == 0).all()
    logits = model(ids)
    ref = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    assert torch.allclose(nll[0], ref, atol=1e-5)
    # The softmax is over the real vocabulary only: padded rows never take probability mass.
    assert logits.shape[-1] == 300 and model.wte.weight.shape[0] == 320


def _reference_nll(h, weight, labels, vocab):
    logits = torch.nn.functional.linear(h, weight)[:, :vocab]
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")


def test_fused_linear_cross_entropy_equals_logits_then_cross_entropy():
    """Values and both gradients, under a non-uniform per-token weighting, with ignored rows, padded
    vocabulary rows (which get zero gradient) and several chunks (the CPU chunk is 2**20 // padded rows)."""
    from sparknet.model import _chunk_rows, linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    vocab, padded, d = 500, 512, 24
    n = 3 * _chunk_rows(padded, torch.device("cpu")) + 17
    h0 = torch.randn(n, d, generator=gen)
    w0 = torch.randn(padded, d, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::5] = -100
    weights = torch.rand(n, generator=gen)
    out = []
    for fn in (_reference_nll, linear_cross_entropy):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        nll = fn(h, w, labels, vocab)
        (nll * weights).sum().backward()
        out.append((nll.detach(), h.grad, w.grad))
    (ref_nll, ref_gh, ref_gw), (nll, gh, gw) = out
    assert nll.shape == (n,) and (nll[::5] == 0).all() and (nll[1::5] > 0).all()
    assert torch.allclose(nll, ref_nll, atol=2e-5, rtol=1e-5)
    assert torch.allclose(gh, ref_gh, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gw, ref_gw, atol=1e-5, rtol=1e-4)
    assert (gw[vocab:] == 0).all() and gw[:vocab].abs().sum() > 0
    with torch.no_grad():  # evaluation: same values, no [n, vocab] buffer kept for a backward
        assert torch.allclose(linear_cross_entropy(h0, w0, labels, vocab), ref_nll, atol=2e-5, rtol=1e-5)
    # First derivatives only: a second one raises instead of silently missing terms.
    h = h0.clone().requires_grad_()
    (gh,) = torch.autograd.grad(linear_cross_entropy(h, w0.clone().requires_grad_(), labels, vocab).sum(), h,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        gh.pow(2).sum().backward()


def test_fused_linear_cross_entropy_under_bf16_autocast():
    """bf16 matmuls, fp32 softmax and fp32 NLL (like F.cross_entropy(logits.float())); gradients agree to
    bf16 precision and come back in the parameters' fp32."""
    from sparknet.model import linear_cross_entropy

    gen = torch.Generator().manual_seed(1)
    h0, w0 = torch.randn(300, 32, generator=gen), torch.randn(128, 32, generator=gen) * 0.3
    labels = torch.randint(0, 100, (300,), generator=gen)
    out = []
    for fn in (_reference_nll, linear_cross_entropy):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = fn(h, w, labels, 100)
        nll.sum().backward()
        out.append((nll.detach(), h.grad, w.grad))
    (ref_nll, ref_gh, ref_gw), (nll, gh, gw) = out
    assert nll.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    assert torch.allclose(nll, ref_nll, atol=1e-5)  # same bf16 logits, same fp32 softmax
    assert (gh - ref_gh).abs().max() <= 0.02 * ref_gh.abs().max()
    assert (gw - ref_gw).abs().max() <= 0.02 * ref_gw.abs().max()


def test_model_training_step_is_the_same_with_the_fused_and_the_plain_loss():
    """The trainer uses the fused loss eagerly and the plain chain under torch.compile: one SGD step of
    each from the same weights lands on the same weights."""
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    results = []
    for fused in (True, False):
        model = build_model(ModelConfig(preset="cpu-tiny"), 300, seed=0)
        model.fused_loss = fused
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(ids, labels).sum() / (labels != -100).sum()
        loss.backward()
        opt.step()
        results.append((loss.item(), [p.detach().clone() for p in model.parameters()]))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)
