"""The model: CodeLion's parameter count, FLOPs per token, and exact export to Hugging Face GPT-2."""

from __future__ import annotations

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
