"""Scoring a Hugging Face model (a run's final checkpoint or a baseline) on WikiText-2 by the code the runs use, in
float32, and telling whether its tokenizer is GPT-2's. Measured runs and baselines both score through `score`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sparknet.errors import SparknetError
from sparknet.evaluate import EVAL_DTYPE, EvalResult

# What a model that loads but cannot be scored raises (ids outside its vocabulary, CUDA out of memory, a file
# cut short): a gap with the reason in the table, like an unreachable model, not a crash of the whole comparison.
EVAL_ERRORS = (SparknetError, ValueError, RuntimeError, OSError)


def reason(exc: Exception) -> str:
    """One line for the table's note on why a score failed."""
    return str(exc) if isinstance(exc, SparknetError) else " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def score(model: Any, tokenizer: Any, protocols: Sequence[str], wikitext: str | None, device: str,
          batch_size: int) -> list[EvalResult]:
    """A loaded Hugging Face model (`sparknet.evaluate.load_hf_model`, float32) on WikiText-2, by the code the runs
    use."""
    from sparknet.evaluate import evaluate_wikitext, hf_context, hf_logits_fn, hf_tokenize

    return evaluate_wikitext(hf_logits_fn(model), hf_tokenize(tokenizer), len(tokenizer), hf_context(model),
                             list(protocols), local=wikitext, device=device, batch_size=batch_size, dtype=EVAL_DTYPE)


def load_fp32(name_or_path: str, revision: str, device: str) -> tuple[Any, Any]:
    import torch

    from sparknet.evaluate import load_hf_model

    return load_hf_model(name_or_path, revision=revision, device=device, dtype=torch.float32)


# Texts whose GPT-2 ids are known (tiktoken's GPT-2 BPE, offline): a tokenizer that gives the same ids on them and
# has GPT-2's 50,257 entries is GPT-2's.
_GPT2_PROBES = (" = Valkyria Chronicles III = \n", "Hello world", " naïve café: 1,200 m — “quoted” ½ ∑x² \t end",
                "don't we'll they're 12345 @-@ <unk>")


def is_gpt2_tokenizer(tokenizer: Any) -> bool:
    """Whether a transformers tokenizer encodes like GPT-2's BPE (so its perplexities compare with GPT-2's)."""
    from sparknet.evaluate import hf_tokenize
    from sparknet.tokenizer import GPT2_VOCAB, TiktokenGPT2

    try:
        return len(tokenizer) == GPT2_VOCAB and hf_tokenize(tokenizer)(list(_GPT2_PROBES)) == \
            TiktokenGPT2().encode_batch(list(_GPT2_PROBES))
    except Exception:  # a tokenizer that cannot even encode the probes is not GPT-2's
        return False
