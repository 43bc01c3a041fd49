"""What kind of answer a question expects, as question answering systems have matched it since TREC: a "when"
question is answered by a sentence with a date in it, a "how many" question by one with a number, a "who"
question by one that names someone the question does not. Among the sentences read, the one that only repeats
the question's words outranks the one that answers it by BM25; this tells them apart when `msa ask` quotes its
evidence and `msa search` its best lines (BENCHMARKS.md, "Evidence"). English questions only: any other
question expects nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DATE = re.compile(rf"\b(1[0-9]{{3}}|20[0-9]{{2}})\b|\b({_MONTHS})\b")
_NUMBER = re.compile(r"\b\d[\d,.]*\b|\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|dozen|"
                     r"hundred|thousand|million|billion)\b", re.IGNORECASE)
_NAME = re.compile(r"(?<=\w )[A-Z][a-z]+")   # a capitalised word inside a sentence, not its first


def answer_test(question: str) -> Callable[[str], bool] | None:
    """A test of whether a sentence holds the kind of answer the question asks for; None when it asks for no
    kind this knows."""
    q = question.strip().lower()
    if re.match(r"(what year|which year|what date)\b", q) or re.search(r"\bwhen\b", q):
        return lambda text: bool(_DATE.search(text))
    if re.search(r"\bhow (many|much|long|old|far|tall|big)\b", q):
        return lambda text: bool(_NUMBER.search(text))
    if re.match(r"(who|whom|whose)\b", q):
        asked = set(q.split())
        return lambda text: any(w.lower() not in asked for w in _NAME.findall(text))
    return None
