"""Our batched scorer: the log-likelihood of each (context, continuation) pair, as lm-evaluation-harness computes it
for a causal model, in a fraction of its time.

What is the harness's and kept exactly (tests/test_downstream.py compares every log-likelihood with its HF model
wrapper, tests/test_downstream_harness.py every figure with the harness run whole):
- Tokens: trailing spaces of the context move to the continuation; the continuation's tokens are those of
  `encode(context + continuation)` after the first `len(encode(context))` (so a merge across the boundary is
  scored as the harness scores it); an empty context is the prefix token (BOS, else EOS) unless the
  continuation starts with it. Nothing special is added by the tokenizer.
- A pair longer than the model's context keeps its last `n_positions + 1` tokens; the input is all but the last.
- log-likelihood = the sum over the continuation's tokens of log_softmax(logits) in float32; greedy = every
  continuation token is the argmax.

What is ours, and why it is faster:
- The inputs of many requests share one row as a trie (`_rows`): a common prefix is computed once (an item's
  context for its choices, TruthfulQA's primer, MMLU's five examples for the questions of a subject; identical
  inputs, such as the contexts of one-token answers, are one path). Each token attends to its ancestors and sits at
  its depth's position, so it sees exactly what it would see alone.
- Rows are sorted by length and packed into batches by a token budget (the harness runs one request at a time by
  default), right-padded: a real position never attends to padding.
- Only the continuation's positions go through the output layer and the softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
EncodeFn = Callable[[list[str]], list[list[int]]]

# Float32 logits of one batch stay under this many elements (2**27: 512 MiB), whatever the vocabulary.
LOGITS_BUDGET_ELEMENTS = 2**27
# The continuation rows' logits are computed this many elements at a time (2**25: 128 MiB).
ROW_CHUNK_ELEMENTS = 2**25
# A shared-prefix row holds at most this many tokens (or the model's context, if longer): long enough that MMLU's
# five examples are computed once for a dozen questions, short enough that its dense mask and attention stay small.
MAX_ROW_TOKENS = 2048


@dataclass
class ScoringModel:
    """What the scorer needs of a model: its logits, its tokenizer and its limits. With `hidden_fn` and `head_fn`,
    only the continuation's positions go through the output layer (for a small model with GPT-2's 50k vocabulary
    that layer is most of the compute); `logits_fn` is then unused."""

    logits_fn: LogitsFn | None   # ids [B, T] -> logits [B, T, V'] (V' >= vocab_size), eval mode, float32
    encode: EncodeFn             # texts -> ids, nothing special added
    prefix_token_id: int         # the context of an empty context: BOS, else EOS
    n_positions: int
    vocab_size: int
    device: Any = "cpu"
    # (ids [B, T], position ids [B, T] or None, mask [B, T, T] bool or None: None means causal) -> hidden [B, T, H]
    hidden_fn: Callable[..., torch.Tensor] | None = None
    head_fn: Callable[[torch.Tensor], torch.Tensor] | None = None    # hidden [N, H] -> logits [N, V']
    tree_mask: bool = False      # hidden_fn takes position ids and a mask: requests share rows as a trie


def encode_pairs(pairs: Sequence[tuple[str, str]], encode: EncodeFn,
                 prefix_token_id: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each pair, split as the harness splits them."""
    moved = []
    for context, continuation in pairs:
        if context:
            cut = len(context) - len(context.rstrip())
            if cut:
                context, continuation = context[:-cut], context[-cut:] + continuation
        moved.append((context, continuation))
    nonempty = [i for i, (c, _) in enumerate(moved) if c]
    texts = [moved[i][0] for i in nonempty] + [moved[i][0] + moved[i][1] for i in nonempty]
    empty = [i for i, (c, _) in enumerate(moved) if not c]
    texts += [moved[i][1] for i in empty]
    unique = list(dict.fromkeys(texts))  # an item's choices share its context: each distinct text is encoded once
    at = {t: k for k, t in enumerate(unique)}
    encoded = encode(unique) if unique else []
    ids = [encoded[at[t]] for t in texts]
    n = len(nonempty)
    out: list[tuple[list[int], list[int]] | None] = [None] * len(pairs)
    for k, i in enumerate(nonempty):
        context_ids, whole = ids[k], ids[n + k]
        out[i] = (list(context_ids), list(whole[len(context_ids):]))
    for k, i in enumerate(empty):
        cont = list(ids[2 * n + k])
        out[i] = ([prefix_token_id], cont) if not cont or cont[0] != prefix_token_id else (cont[:1], cont[1:])
    return out  # type: ignore[return-value]


def _inputs(encoded: Sequence[tuple[list[int], list[int]]], n_positions: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """(model input, continuation ids) per pair: the last n_positions + 1 tokens, less the last one."""
    out = []
    for context_ids, cont_ids in encoded:
        if not cont_ids:
            raise ValueError("an empty continuation cannot be scored")
        if len(cont_ids) > n_positions:  # the harness refuses these too (its assert)
            raise ValueError(f"a continuation of {len(cont_ids)} tokens does not fit the model's {n_positions}")
        whole = (context_ids + cont_ids)[-(n_positions + 1):]  # the context is never empty: the whole holds the continuation
        out.append((tuple(whole[:-1]), cont_ids))
    return out


def default_batch_tokens(model: ScoringModel) -> int:
    """Padded tokens per forward pass: enough to keep the device busy, few enough that a batch holds inputs of
    similar length (they are sorted; a wide batch pads its short rows to its longest) and that full logits, where
    the model gives only those, stay under LOGITS_BUDGET_ELEMENTS."""
    want = 65536 if torch.device(model.device).type == "cuda" else 4096
    if model.hidden_fn is None:
        want = min(want, LOGITS_BUDGET_ELEMENTS // max(model.vocab_size, 1))
    return max(model.n_positions, want)


@dataclass
class _Row:
    """One model input: a trie of requests' inputs flattened so that every token comes after its parent (a shared
    prefix once: MMLU's five examples, an item's context before its choices). `parents[i]` is the row index of token
    i's parent (-1 at the root); a token attends to its ancestors and itself; its position is its depth. `preds[r]`
    lists, for request r, the row indices its continuation's tokens are predicted from."""

    tokens: list[int]
    positions: list[int]
    parents: list[int]
    preds: dict[int, list[int]]

    @property
    def branched(self) -> bool:
        """Not one chain: only a mask keeps the branches apart."""
        return any(p != i - 1 for i, p in enumerate(self.parents))


def _rows(requests: Sequence[tuple[tuple[int, ...], list[int]]], max_row_tokens: int, share: bool) -> list[_Row]:
    """The model inputs for `requests` ((input, continuation) each). Identical inputs always share one row; with
    `share` (the model takes a tree mask), requests in input order fill a row while the union of their inputs (a
    trie: common prefixes once) stays within `max_row_tokens`."""
    order = sorted(range(len(requests)), key=lambda r: requests[r][0])
    rows: list[_Row] = []
    row: _Row | None = None
    index: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent index, token) -> row index, within the row
    for r in order:
        inp, cont = requests[r]
        if row is not None and not share and tuple(row.tokens) != inp:
            row = None
        # How many new tokens this input adds to the current row (those past its longest prefix already there).
        path, parent = [], -1
        if row is not None:
            for tok in inp:
                nxt = index.get((parent, tok))
                if nxt is None:
                    break
                path.append(nxt)
                parent = nxt
            # A request that shares less than a quarter of its input with the row starts its own: side by side in one row, unrelated inputs
            # would save nothing and make every token's attention (a dense masked one) span both.
            if len(path) * 4 < len(inp) or len(row.tokens) + len(inp) - len(path) > max_row_tokens:
                row = None
        if row is None:
            row, index, path, parent = _Row([], [], [], {}), {}, [], -1
            rows.append(row)
        for tok in inp[len(path):]:
            row.tokens.append(tok)
            row.positions.append(len(path))
            row.parents.append(parent)
            parent = len(row.tokens) - 1
            index[(row.parents[-1], tok)] = parent
            path.append(parent)
        row.preds[r] = path[len(path) - len(cont):]
    return rows


def loglikelihoods(model: ScoringModel, encoded: Sequence[tuple[list[int], list[int]]],
                   max_batch_tokens: int | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether it is greedy) per encoded pair, in order."""
    requests = _inputs(encoded, model.n_positions)
    share = model.tree_mask and model.hidden_fn is not None
    row_tokens = max(model.n_positions, MAX_ROW_TOKENS)
    rows = sorted(_rows(requests, row_tokens, share), key=lambda row: (-len(row.tokens), row.tokens))
    budget = max_batch_tokens or default_batch_tokens(model)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    start = 0
    while start < len(rows):
        width = len(rows[start].tokens)  # the longest of the batch: sorted longest first
        batch = rows[start:start + max(1, budget // max(width, 1))]
        start += len(batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        for b, row in enumerate(batch):
            n = len(row.tokens)
            ids[b, :n], pos[b, :n] = (torch.tensor(v, dtype=torch.long) for v in (row.tokens, row.positions))
        # Every (batch row, position) a continuation token is predicted from, and the request it belongs to.
        where_b, where_t, targets, owner = [], [], [], []
        for b, row in enumerate(batch):
            for r, at in row.preds.items():
                where_b += [b] * len(at)
                where_t += at
                targets += requests[r][1]
                owner += [r] * len(at)
        with torch.no_grad():
            if model.hidden_fn is not None and model.head_fn is not None:
                if any(row.branched for row in batch):
                    picked = model.hidden_fn(ids.to(model.device), pos.to(model.device),
                                             _tree_mask(batch, width).to(model.device))[where_b, where_t]
                else:  # plain causal rows (right padding is never seen): the fast kernels
                    picked = model.hidden_fn(ids.to(model.device), None, None)[where_b, where_t]
                head = model.head_fn
            else:
                picked = model.logits_fn(ids.to(model.device))[where_b, where_t]  # type: ignore[misc]
                head = None
            target = torch.tensor(targets, dtype=torch.long, device=picked.device)
            token_ll = torch.empty(len(targets), dtype=torch.float32)
            token_greedy = torch.empty(len(targets), dtype=torch.bool)
            # Rows in chunks (a chunk's logits stay ~100 MB); log p(target) = logit - logsumexp, without writing
            # the whole log_softmax; greedy = the target is the argmax of the logits.
            step = max(1, ROW_CHUNK_ELEMENTS // max(model.vocab_size, 1))
            for a in range(0, len(targets), step):
                rows_h = picked[a:a + step]
                logits = (head(rows_h) if head is not None else rows_h)[:, : model.vocab_size].float()
                t = target[a:a + step, None]
                token_ll[a:a + step] = (logits.gather(1, t)[:, 0] - torch.logsumexp(logits, dim=-1)).cpu()
                token_greedy[a:a + step] = (logits.argmax(dim=-1) == t[:, 0]).cpu()
        at = 0
        while at < len(owner):
            r, n = owner[at], len(requests[owner[at]][1])
            # Summed in float32, in order, as the harness sums a continuation's token log-probabilities.
            results[r] = (float(token_ll[at:at + n].sum()), bool(token_greedy[at:at + n].all()))
            at += n
    return results  # type: ignore[return-value]


def _tree_mask(batch: Sequence[_Row], width: int) -> torch.Tensor:
    """[B, T, T] bool, True where token i may attend to j: j is i itself or one of its ancestors. Padding attends to
    itself only, so no row of the softmax is empty.

    A trie row is a few long chains (a context, then each choice), so the mask is built a chain at a time: the
    chain's tokens see what its first token's parent sees, plus the chain up to themselves."""
    mask = np.zeros((len(batch), width, width), dtype=bool)
    for b, row in enumerate(batch):
        m, parents = mask[b], np.asarray(row.parents)
        begins = (parents != np.arange(len(parents)) - 1) | (parents < 0)  # where a chain begins: a root or a branch
        starts = np.flatnonzero(begins)
        for s, e in zip(starts, [*starts[1:], len(parents)]):
            if parents[s] >= 0:
                m[s:e] = m[parents[s]]
            m[s:e, s:e] |= np.tri(e - s, dtype=bool)
        idx = np.arange(len(parents), width)
        m[idx, idx] = True
    return torch.from_numpy(mask)


def score_pairs(model: ScoringModel, pairs: Sequence[tuple[str, str]],
                max_batch_tokens: int | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context, continuation) pair of text."""
    return loglikelihoods(model, encode_pairs(pairs, model.encode, model.prefix_token_id), max_batch_tokens)


def bits_per_byte(loglikelihood: float, text: str) -> float:
    """The negative log-likelihood of `text` in bits per UTF-8 byte (the OLMES/Olmix correct-answer bpb)."""
    return -loglikelihood / math.log(2) / max(len(text.encode("utf-8")), 1)


def hf_scoring_model(model: Any, tokenizer: Any, device: Any = "cpu") -> ScoringModel:
    """A `ScoringModel` of a transformers causal LM and its tokenizer (an exported sparknet checkpoint, GPT-2)."""
    from sparknet.hf_models import hf_context, hf_logits_fn

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    # The softmax runs over every output of the model, as the harness runs it (its vocab_size, not the tokenizer's).
    scoring = ScoringModel(hf_logits_fn(model), encode, prefix, hf_context(model), model.config.vocab_size, device)
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if body is not None and body is not model and head is not None:  # GPT-2 and most causal LMs: backbone + head
        def hidden(ids, positions=None, mask=None):
            if mask is None:
                return body(input_ids=ids, use_cache=False).last_hidden_state
            additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            additive.masked_fill_(~mask, torch.finfo(torch.float32).min)
            return body(input_ids=ids, attention_mask=additive[:, None], position_ids=positions,
                        use_cache=False).last_hidden_state

        scoring.hidden_fn, scoring.head_fn = hidden, head
        # GPT-2 takes a 4D float mask with position ids (tested against separate inputs); other architectures get
        # one row per choice rather than a mask they may not honour.
        scoring.tree_mask = getattr(model.config, "model_type", "") == "gpt2"
    return scoring


def gpt_scoring_model(model: Any, tokenizer: Any, device: Any = "cpu") -> ScoringModel:
    """A `ScoringModel` of sparknet's own GPT (`sparknet.model.GPT`, eval mode) and the run's tokenizer, in float32."""
    return ScoringModel(None, tokenizer.encode_batch, tokenizer.eot_id, model.shape.n_positions, tokenizer.vocab_size,
                        device, hidden_fn=lambda ids, positions=None, mask=None: model.hidden(ids, positions, mask).float(),
                        head_fn=lambda h: model.head(h).float(), tree_mask=True)
