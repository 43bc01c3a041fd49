"""An eval set on disk: the uniform layout of `shared/eval/tools/convert_eval.py`, `corpus/<doc_id>.txt` (one
document per file) and `questions.jsonl` ({"id", "question", "answers", "gold_docs": [doc_id, ...]}).

Input data, read by `msa eval` (evaluation.py) and by router training alike, so it lives beside the other readers
rather than with either of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import errors


@dataclass
class EvalSet:
    name: str
    corpus: Path
    questions: list[dict]


def load_set(directory: Path, limit: int | None = None, skip: int = 0) -> EvalSet:
    corpus, questions = directory / "corpus", directory / "questions.jsonl"
    if not corpus.is_dir() or not questions.is_file():
        raise errors.MsaError(f"{directory} is not an eval set: it needs corpus/ and questions.jsonl "
                              f"(the layout of convert_eval.py)", errors.USAGE)
    rows = []
    with open(questions, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    row["question"], row["gold_docs"]
                except (ValueError, KeyError, TypeError):
                    raise errors.MsaError(f"{questions}:{n}: not a question with gold_docs", errors.USAGE) from None
                rows.append(row)
    rows = rows[skip:skip + limit if limit is not None else None]
    if not rows:
        raise errors.MsaError(f"{questions}: no questions in the selected range", errors.USAGE)
    return EvalSet(directory.resolve().name, corpus, rows)
