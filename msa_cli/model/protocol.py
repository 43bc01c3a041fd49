"""How memory documents and questions are written for the model: the text formats of MSA's protocol.

Which document format a model uses is its mode's choice (memory/mode.py); the bank records it.
"""

from __future__ import annotations

TEMPLATE_HEAD = "<|im_start|>user\n"   # MSA's template head, shared by every query (digest §1.7)
# A memory document as a plain model reads it: its own start token (the attention sink), text, end token.
PLAIN_DOCUMENT = "<|im_start|>{text}<|im_end|>"
# As an MSA checkpoint reads it (digest §3.1): its id at both ends, so the first and the last pooled chunk carry it
# and the model can name the document in its generative retrieval (`[id]`).
MSA_DOCUMENT = "<|im_start|>[{id}]. {text}[{id}]<|im_end|>"


def document_tokens(tokenizer, text: str, template: str = PLAIN_DOCUMENT, doc_id: int = 0) -> list[int]:
    """A memory document's tokens as stage 1 encodes them."""
    return tokenizer(template.format(id=doc_id, text=text), add_special_tokens=False).input_ids


def question_tokens(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(the template head's tokens, the question's): a question is read after the shared template head."""
    return (tokenizer(TEMPLATE_HEAD, add_special_tokens=False).input_ids,
            tokenizer(text, add_special_tokens=False).input_ids)
