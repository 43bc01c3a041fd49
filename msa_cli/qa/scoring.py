"""Answer metrics against a question's gold answers, as SQuAD and the open-domain QA literature compute them:
both sides lower-cased, punctuation and the articles a/an/the removed, white space folded; the best gold answer
counts."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    return float(any(normalize(prediction) == normalize(g) for g in golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    def f1(gold: str) -> float:
        p, g = normalize(prediction).split(), normalize(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if not common:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)
    return max((f1(g) for g in golds), default=0.0)


def contains_answer(prediction: str, golds: list[str]) -> float:
    """A gold answer appears in the prediction (the fair measure for a model that answers in sentences)."""
    text = f" {normalize(prediction)} "
    return float(any(normalize(g) and f" {normalize(g)} " in text for g in golds))
