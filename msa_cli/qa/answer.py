"""Turn routed documents into a prompt, and documents into citations."""

from __future__ import annotations

import os

from ..memory.bank import Document

SYSTEM = ("You answer questions using only the numbered sources given. Cite the sources you use as [1], [2]. "
          "If the sources do not contain the answer, say that you do not know.")


def citation(doc: Document) -> str:
    return cite(doc.source, doc.span)


def cite(source: str, span: dict) -> str:
    """`path:page` for paged formats, `path:start-end` (lines) otherwise."""
    path = shown_path(source)
    if span.get("page") is not None:
        return f"{path}:{span['page']}"
    if span.get("line_start") is not None:
        start, end = span["line_start"], span["line_end"]
        return f"{path}:{start}" if start == end else f"{path}:{start}-{end}"
    return path


def source_line(source: dict) -> str:
    """A source of an answer (Answer.sources) as the text output lists it: `[n] path:lines  (score, hop h)`."""
    hop = f", hop {source['hop']}" if source["hop"] > 1 else ""
    return f"[{source['n']}] {cite(source['path'], source)}  ({source['score']:.2f}{hop})"


QUOTED = 2   # evidence sentences the text output quotes under each source, best first


def quote_lines(source: dict, evidence: list[dict]) -> list[str]:
    """A source's best evidence sentences (Evidence.to_json) as the text output quotes them under it:
    `    45-46: text`, whitespace collapsed (--json keeps the text verbatim)."""
    out = []
    for e in [e for e in evidence if e["n"] == source["n"]][:QUOTED]:
        if e["page"] is not None:
            where = f"p. {e['page']}"
        else:
            start, end = e["line_start"], e["line_end"]
            where = f"{start}" if start == end else f"{start}-{end}"
        out.append(f"    {where}: {' '.join(e['text'].split())}")
    return out


def shown_path(source: str) -> str:
    """A document's source (an absolute path) as people read it: relative to the working directory when it lies
    below it, as ripgrep and compilers show paths; JSON output keeps the absolute path."""
    cwd = os.getcwd()
    return os.path.relpath(source, cwd) if source.startswith(cwd.rstrip(os.sep) + os.sep) else source


def text_prompt(tokenizer, question: str, sources: list[tuple[str, str]]) -> list[int]:
    """The chat prompt for the original-text path: numbered sources ((citation, text) each), then the question."""
    shown = "\n\n".join(f"[{n}] {where}\n{text}" for n, (where, text) in enumerate(sources, 1))
    user = f"Sources:\n\n{shown}\n\nQuestion: {question}" if sources else f"Question: {question}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def memory_prompt(tokenizer, question: str) -> list[int]:
    """The local tokens of MSA's pooled-memory path: the question after the cached template head
    ("<|im_start|>user\\n"), then the template tail and the assistant's turn."""
    return tokenizer(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
