"""`msa mcp`: msa's memory as an agent's long-term memory, over the Model Context Protocol (the official `mcp` SDK's
MCPServer, on stdio or streamable HTTP).

Tools: search (ranked passages with citations and text), ask (an answer from memory with its sources), ingest
(files or folders under the allowed roots), remember (a text the agent gives, under a name of its own), forget,
status. Resources: msa://document/{doc_id}, a cited passage's text. An error the agent can act on (a path outside
the roots, an empty question, a locked bank) comes back as the tool's error text, in one line.
"""

from __future__ import annotations

import functools

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError

from .. import errors, settings
from ..ingest import IngestReport
from ..qa.answer import cite
from ..qa.ask import Options
from .backend import Backend

INSTRUCTIONS = """\
A long-term memory of documents (files and folders ingested into an msa memory bank, and texts you asked it to
remember). Use `search` to find passages about something and read them yourself (fast, cites file and lines);
use `ask` for a short answer composed by msa's small local model from what it finds (slower, and weaker at
reasoning than you). Cite what you use as its `citation`. Use `remember` to keep a note, decision or fact for
later sessions under a name; `remember` with the same name replaces it. `ingest` (re)reads files or folders the
server is allowed to read; `forget` removes them or remembered names."""


def tool_errors(fn):
    """A user error from msa (MsaError) as the tool's own error text, not the SDK's "unexpected exception"."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors.MsaError as e:
            raise ToolError(str(e)) from None
    return wrapped


def report_json(report: IngestReport) -> dict:
    return {"summary": report.summary(), "ingested": report.ingested, "unchanged": report.unchanged,
            "removed": report.removed, "documents": report.documents, "tokens": report.tokens,
            "skipped": dict(report.skipped)}


def create_server(backend: Backend) -> MCPServer:
    server = MCPServer("msa", instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool()
    @tool_errors
    def search(query: str, top_k: int = 5) -> dict:
        """Find the passages in memory most relevant to `query` (a question or keywords), best first. Each result
        has its citation (file:lines or file:page), score, the passage's best line and its whole text (about 320
        tokens). Read them and cite what you use."""
        hits = backend.search(query, max(1, min(top_k, settings.SERVE_MAX_TOP_K)))
        for hit in hits:
            hit["citation"] = cite(hit["path"], hit)
            hit["text"] = backend.document(hit["doc_id"]).text
            hit["uri"] = f"msa://document/{hit['doc_id']}"
        return {"results": hits}

    @server.tool()
    @tool_errors
    def ask(question: str, top_k: int = settings.TOP_K, hops: int = settings.HOPS, max_tokens: int = 200) -> dict:
        """Answer `question` from memory with msa's local model, retrieving in up to `hops` rounds (each round
        searches again with what it just read, for questions whose evidence is scattered). Returns the answer
        (at most `max_tokens` tokens), whether memory held nothing relevant (`abstained`), and the numbered
        sources the answer's [n] refer to."""
        opts = Options(top_k=max(1, min(top_k, settings.SERVE_MAX_TOP_K)), hops=max(1, min(hops, 8)),
                       max_tokens=max(1, min(max_tokens, settings.SERVE_MAX_TOKENS)))
        answer, _ = backend.ask(question, opts)
        sources = [{"n": s["n"], "citation": cite(s["path"], s), "path": s["path"], "score": s["score"],
                    "uri": f"msa://document/{s['doc_id']}"} for s in answer.sources()]
        return {"answer": answer.text, "abstained": answer.abstained, "sources": sources,
                "evidence": [e.to_json() for e in answer.evidence]}

    @server.tool()
    @tool_errors
    def ingest(paths: list[str]) -> dict:
        """Read files or folders (absolute paths on the server, under its allowed roots) into memory: new and
        changed files are (re)read, unchanged ones skipped, files gone from a folder removed. Text, markdown,
        code, HTML and PDF are read. Can take minutes for large folders."""
        return report_json(backend.ingest(paths))

    @server.tool()
    @tool_errors
    def remember(name: str, text: str) -> dict:
        """Keep `text` in memory as the document `memory:NAME` (a note, a decision, a fact to recall in a later
        session); remembering the same name again replaces it. Search and ask cite it as memory:NAME:LINES."""
        return report_json(backend.remember(name, text))

    @server.tool()
    @tool_errors
    def forget(paths: list[str] | None = None, names: list[str] | None = None) -> dict:
        """Remove from memory the given files or folders (absolute paths, under the allowed roots) and the texts
        remembered under the given names."""
        sources, documents = backend.forget(paths or [], names or [])
        return {"sources": sources, "documents": documents}

    @server.tool()
    @tool_errors
    def status() -> dict:
        """What memory holds: files, documents, tokens, size on disk, model, router and the last ingest."""
        return backend.status()

    @server.resource("msa://document/{doc_id}", mime_type="text/plain")
    def document(doc_id: str) -> str:
        """A passage in memory, by the doc_id that search and ask give: its citation line, then its text."""
        try:
            d = backend.document(int(doc_id))
        except (ValueError, errors.MsaError) as e:
            raise ResourceError(f"no document {doc_id} in memory ({e})") from None
        return f"{cite(d.source, d.span)}\n\n{d.text}"

    return server
