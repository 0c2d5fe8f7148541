"""Hugging Face causal LMs as sparknet scores them: a model's logits function, its tokenizer's encode, its context
length, and loading a hub id or a checkpoint folder (float32, eval mode) with one-line errors. Shared by WikiText-2
(`sparknet.evaluate`, `sparknet.compare`) and the downstream tasks (`sparknet.downstream`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparknet.errors import SparknetError
from sparknet.hub import hub_offline

if TYPE_CHECKING:
    import torch

LogitsFn = Callable[["torch.Tensor"], "torch.Tensor"]
TokenizeFn = Callable[[list[str]], list[list[int]]]

def hf_logits_fn(model: Any) -> LogitsFn:
    """`logits_fn` of a transformers causal LM (`model(ids).logits`, no KV cache). The model must be in eval
    mode: dropout would make every number random."""

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        if model.training:
            raise ValueError("the model is in training mode (dropout on); call model.eval() before evaluating")
        return model(input_ids=ids, use_cache=False).logits

    return logits_fn


def hf_tokenize(tokenizer: Any) -> TokenizeFn:
    """`tokenize` of a transformers tokenizer: no BOS/EOS added (GPT-2's adds none, as SparkNet had)."""

    def tokenize(texts: list[str]) -> list[list[int]]:
        # verbose=False: the joined test text is longer than model_max_length by design (it is windowed).
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    return tokenize


def hf_context(model: Any) -> int:
    """The context length of a transformers model (GPT-2's n_positions, else max_position_embeddings)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {type(model).__name__} from its config")


def load_hf_model(name_or_path: str, revision: str = "main", device: Any = "cpu",
                  dtype: Any = None) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) of a hub id or a local folder, e.g. "gpt2",
    "codelion/gpt-2-70m" or a sparknet checkpoint. HF_HUB_OFFLINE=1 is respected (only the HF cache is read);
    any failure to get it is a one-line SparknetError."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        rev = None if Path(name_or_path).exists() else revision
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=rev)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=rev, **kwargs)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = " (HF_HUB_OFFLINE is set: only the local HF cache was searched)" if hub_offline() else ""
        raise SparknetError(f"model {name_or_path!r} (revision {revision}): cannot load it ({reason}){where} "
                            f"(fix: a local checkpoint folder, or a hub id that is reachable or cached)") from None
    model.eval().to(device)
    return model, tokenizer
