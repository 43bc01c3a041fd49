"""Routing only, for a reader rather than the model: the documents for a query, each with its best line, as
`msa search --json`, `POST /v1/search` and the MCP `search` tool give them."""

from __future__ import annotations

from .. import settings
from ..engine import Engine
from .ask import counter
from .evidence import best_line


def search_results(engine: Engine, query: str, k: int) -> list[dict]:
    """The k best documents for `query`: rank, doc_id, path, page or lines, score and its best line (`evidence`,
    numbered as the rank)."""
    count = counter(engine.model.tokenizer)
    out = []
    for rank, hit in enumerate(engine.route(query, k), 1):
        d = hit.document
        line = best_line(query, d, count, settings.ANSWER_TYPE_BONUS).to_json()
        out.append({"rank": rank, "doc_id": d.doc_id, "path": d.source, **d.span, "score": round(hit.score, 4),
                    "evidence": {**line, "n": rank}})
    return out
