"""Downstream tasks (HellaSwag, ARC, PIQA, WinoGrande, BoolQ, OpenBookQA, LAMBADA, MMLU, TruthfulQA), scored as
EleutherAI's lm-evaluation-harness scores them: `tasks` (items and prompts), `score` (our batched scorer),
`metrics` (acc, acc_norm, bpb, perplexity, mc2, with standard errors), `harness` (lm-eval itself, the reference)."""
