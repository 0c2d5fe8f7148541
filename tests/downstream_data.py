"""Small downstream task files a test generates, in the layout and formats of the shared offline copies
(`../shared/data/downstream/`, see its SOURCES.md): one folder per dataset, the same file names, the same fields.

The text is made of seeded random words, so the files are the same on every machine and need nothing beside the
clone. Each task gets `n` items (MMLU: `n` per subject over three subjects, plus a 5-item dev pool each).
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

WORDS = ("the a river stone light paper window garden music number house market winter summer green quiet "
         "bright small large old new red blue cat dog bird tree road city field water fire cloud "
         "runs walks sings reads holds opens closes finds makes takes gives brings keeps turns moves").split()
SUBJECTS = ("abstract_algebra", "anatomy", "world_religions")


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if gz:
        with gzip.GzipFile(str(path), "wb", mtime=0) as f:
            f.write(text.encode("utf-8"))
    else:
        path.write_text(text, encoding="utf-8")


def _arc_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        k = 5 if i % 7 == 3 else 3 if i % 7 == 5 else 4  # ARC has 3- and 5-choice items, and numeric keys
        labels = [str(j + 1) for j in range(k)] if i % 5 == 2 else [chr(65 + j) for j in range(k)]
        rows.append({"id": f"q{i}", "question": _sentence(rng, 8) + "?",
                     "choices": {"text": [_sentence(rng, rng.randint(1, 4)) for _ in range(k)], "label": labels},
                     "answerKey": labels[rng.randrange(k)]})
    return rows


def write_downstream(root: Path, n: int = 12, seed: int = 0) -> Path:
    """Write every task's files under `root` (created); returns `root`."""
    rng = random.Random(seed)
    root = Path(root)
    _write_jsonl(root / "hellaswag" / "validation.jsonl.gz", [
        {"ctx": _sentence(rng, 9) + ". " + rng.choice(WORDS), "activity_label": _sentence(rng, 2).title(),
         "endings": [_sentence(rng, rng.randint(3, 7)) + "." for _ in range(4)], "label": rng.randrange(4)}
        for _ in range(n)], gz=True)
    for name in ("arc_easy", "arc_challenge"):
        _write_jsonl(root / name / "test.jsonl", _arc_rows(rng, n))
        _write_jsonl(root / name / "validation.jsonl", _arc_rows(rng, n))
    _write_jsonl(root / "lambada_openai" / "lambada_test.jsonl",
                 [{"text": _sentence(rng, 12) + ".\n\n" + _sentence(rng, 6)} for _ in range(n)])
    _write_jsonl(root / "piqa" / "validation.jsonl", [
        {"goal": _sentence(rng, 6), "sol1": _sentence(rng, 5) + " ", "sol2": _sentence(rng, 5), "label": rng.randrange(2)}
        for _ in range(n)])
    wino = []
    for _ in range(n):
        before, a, b = _sentence(rng, 7), rng.choice(WORDS), rng.choice(WORDS)
        wino.append({"context_options": [f"{before} {a}", f"{before} {b}"], "continuation": _sentence(rng, 4) + ".",
                     "gold": rng.randrange(2)})
    _write_jsonl(root / "winogrande" / "dev_llmfoundry_format.jsonl", wino)
    _write_jsonl(root / "boolq" / "validation.jsonl", [
        {"question": _sentence(rng, 5), "passage": _sentence(rng, 3).title() + " -- " + _sentence(rng, 20),
         "idx": i, "label": rng.randrange(2)} for i in range(n)])
    for split in ("test", "validation"):
        _write_jsonl(root / "openbookqa" / f"{split}.jsonl", [
            {"id": f"{split}-{i}", "question_stem": _sentence(rng, 7),
             "choices": {"text": [_sentence(rng, 2) for _ in range(4)], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[rng.randrange(4)]} for i in range(n)])
    mmlu_test, mmlu_dev = [], []
    for subject in SUBJECTS:
        for rows, count in ((mmlu_test, n), (mmlu_dev, 5)):
            rows += [{"question": _sentence(rng, 8) + "?", "subject": subject,
                      "choices": [_sentence(rng, 2) for _ in range(4)], "answer": rng.randrange(4)}
                     for _ in range(count)]
    _write_jsonl(root / "mmlu" / "test.jsonl.gz", mmlu_test, gz=True)
    _write_jsonl(root / "mmlu" / "dev.jsonl", mmlu_dev)
    tqa = []
    for _ in range(n):
        mc1 = [_sentence(rng, 5) + "." for _ in range(4)]
        mc2 = [_sentence(rng, 5) + "." for _ in range(5)]
        true2 = rng.randint(1, 3)
        tqa.append({"question": _sentence(rng, 6) + "?",
                    "mc1_targets": {"choices": mc1, "labels": [1, 0, 0, 0]},
                    "mc2_targets": {"choices": mc2, "labels": [1] * true2 + [0] * (5 - true2)}})
    _write_jsonl(root / "truthfulqa" / "validation_multiple_choice.jsonl", tqa)
    return root
