"""`msa serve`: msa's memory behind the OpenAI chat API, so any OpenAI client, editor plugin or `llm` asks it
unchanged, plus what the chat shape cannot say (search, ingest).

FastAPI on uvicorn: the request shapes are pydantic models (a bad field is a 400 naming it), the routes are plain
functions, and uvicorn handles the HTTP, streaming and a graceful SIGTERM. Requests wait in this app's own
threads for the backend's model thread (one question at a time); the event loop only moves bytes.

    POST /v1/chat/completions   the last user message is the question; the answer in choices[0].message.content,
                                then its sources as `[n] path:lines` lines; sources, evidence, hops and timings
                                in the extra `msa` field; `stream: true` streams tokens as server-sent events
    GET  /v1/models, GET /health
    POST /v1/search {"query", "top_k"}           ranked documents, as `msa search --json`
    POST /v1/ingest {"paths": [...]} | {"name", "text"}   files or folders under --allow roots, or a text
Errors are OpenAI's shape, {"error": {"message", "type", "code"}}, with a 4xx status for the client's mistakes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import errors, settings
from ..qa.answer import source_line
from ..qa.ask import Options, TextStream
from .backend import Backend, Busy, Cancelled, Refused

MODEL_ID = "msa"   # what /v1/models lists; a request may name any model (there is one)


class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if isinstance(self.content, list):
            return "\n".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")   # temperature, top_p...: msa decodes greedily, so they are ignored
    model: str = MODEL_ID
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=settings.SERVE_MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=settings.SERVE_MAX_TOKENS)
    # msa's own (an OpenAI client sends them with extra_body), as `msa ask`'s options
    top_k: int = Field(settings.TOP_K, ge=1, le=settings.SERVE_MAX_TOP_K)
    hops: int = Field(settings.HOPS, ge=1, le=8)
    abstain: bool = True
    long: bool = False
    passages: bool = False

    def question(self) -> str:
        users = [m for m in self.messages if m.role == "user"]
        if not users or not users[-1].text().strip():
            raise errors.MsaError("the last user message (the question) is missing or empty", errors.USAGE)
        return users[-1].text()

    def options(self) -> Options:
        return Options(top_k=self.top_k, hops=self.hops, abstain=self.abstain, long=self.long,
                       max_tokens=self.max_completion_tokens or self.max_tokens or 200,
                       read="passages" if self.passages else "evidence")


class SearchRequest(BaseModel):
    query: str
    top_k: int = Field(10, ge=1, le=settings.SERVE_MAX_TOP_K)


class IngestRequest(BaseModel):
    paths: list[str] = []
    name: str | None = None
    text: str | None = None


class TooLarge(Exception):
    pass


def create_app(backend: Backend, api_key: str | None = None) -> FastAPI:
    pool = ThreadPoolExecutor(backend.queue + 2, thread_name_prefix="msa")   # the queue, a writer, a spare
    in_flight: set[threading.Event] = set()   # cancelled when the server stops

    @asynccontextmanager
    async def lifespan(app):
        yield
        for cancelled in list(in_flight):   # SIGTERM: what still runs stops at its next token
            cancelled.set()
        pool.shutdown(wait=True)

    app = FastAPI(title="msa", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body=settings.SERVE_MAX_BODY)
    add_error_handlers(app)

    async def in_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @app.get("/health")
    async def health():   # cheap: a load balancer may call it every second (status counts files, parsing all)
        documents = await in_thread(backend.documents)
        return {"status": "ok", "bank": str(backend.bank_path.absolute()), "documents": documents, "model": MODEL_ID}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "msa"}]}

    @app.post("/v1/search")
    async def search(body: SearchRequest):
        return {"object": "list", "data": await in_thread(backend.search, body.query, body.top_k)}

    @app.post("/v1/ingest")
    async def ingest(body: IngestRequest):
        if body.text is not None:
            report = await in_thread(backend.remember, body.name or "", body.text)
        else:
            report = await in_thread(backend.ingest, body.paths)
        return {**{k: v for k, v in vars(report).items() if k != "skipped"}, "skipped": dict(report.skipped),
                "summary": report.summary()}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        question, opts = body.question(), body.options()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        cancelled = threading.Event()
        slot = backend.admit()   # Busy (503) now, before a stream starts; ask gives it back when it ends
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()

        def answer():
            try:
                tok = backend.model.tokenizer
                stream = TextStream(tok, lambda s: loop.call_soon_threadsafe(tokens.put_nowait, s), opts.long) \
                    if body.stream else None
                return backend.ask(question, opts, stream, cancelled, slot)
            finally:
                slot.release()   # also when the answer never started
                in_flight.discard(cancelled)

        in_flight.add(cancelled)
        job = asyncio.ensure_future(in_thread(answer))
        if body.stream:
            return StreamingResponse(sse(job, tokens, cancelled, ident, created),
                                     media_type="text/event-stream")
        try:
            while not job.done():   # a client that hangs up stops its answer
                await asyncio.wait({job}, timeout=0.25)
                if not job.done() and await request.is_disconnected():
                    cancelled.set()
            a, engine = await job
        finally:
            cancelled.set()
        return completion(ident, created, a, engine)

    return app


def completion(ident: str, created: int, a, engine) -> dict:
    lines = [source_line(s) for s in a.sources()]
    content = a.text + ("\n\n" + "\n".join(lines) if lines else "")
    return {"id": ident, "object": "chat.completion", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.tokens,
                      "total_tokens": a.prompt_tokens + a.tokens},
            "msa": a.to_json(engine)}


async def sse(job: asyncio.Future, tokens: asyncio.Queue, cancelled: threading.Event, ident: str, created: int):
    """The answer as OpenAI's chat.completion.chunk events: the role, the text as it is written, the sources as a
    last piece of text, then an empty delta with finish_reason and the `msa` field, then [DONE]."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    # A stream the client left ends with the job's Cancelled: retrieved here, so asyncio logs no traceback of it.
    job.add_done_callback(lambda f: f.cancelled() or f.exception())
    getter = None
    try:
        yield chunk({"role": "assistant", "content": ""})
        while not (job.done() and tokens.empty()):
            getter = asyncio.ensure_future(tokens.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield chunk({"content": getter.result()})
            else:
                getter.cancel()
        try:
            a, engine = job.result()
        except Exception as e:   # the stream has begun: say it in the stream, as OpenAI does
            status, kind, message = error_of(e)
            yield f"data: {json.dumps({'error': {'message': message, 'type': kind, 'code': status}})}\n\n"
            return
        if a.abstained:
            yield chunk({"content": a.text})
        lines = [source_line(s) for s in a.sources()]
        if lines:   # as completion() ends its content
            yield chunk({"content": "\n\n" + "\n".join(lines)})
        yield chunk({}, "stop", msa=a.to_json(engine))
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()   # the client hung up (the task was cancelled) or the answer is done: stop either way
        if getter is not None:
            getter.cancel()


# --- guard and errors -------------------------------------------------------------------------------------------

class Guard:
    """Before any route: the API key (401 without it, on every path) and the request body's size (413)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await error_response(401, "invalid_api_key", "a valid API key is needed: send the header "
                                        "'Authorization: Bearer KEY'")(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await error_response(413, "request_too_large",
                                        f"the request body is over {self.max_body} bytes")(scope, receive, send)
        seen, started = 0, False

        async def limited():   # a chunked body has no length up front
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise TooLarge
            return message

        async def sending(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, limited, sending)
        except Exception as e:   # a bug: one line in the log and a JSON 500, never a traceback or a dead server
            if os.environ.get("MSA_DEBUG"):
                raise
            status, kind, message = error_of(e)
            if not started:
                await error_response(status, kind, message)(scope, receive, send)


def error_response(status: int, kind: str, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def error_of(e: Exception) -> tuple[int, str, str]:
    """(HTTP status, error type, one-line message) for an exception a route let through."""
    if isinstance(e, Busy):
        return 503, "server_busy", str(e)
    if isinstance(e, Refused):
        return 403, "permission_denied", str(e)
    if isinstance(e, errors.BankLocked):
        return 409, "bank_locked", str(e)
    if isinstance(e, errors.BankNotFound):
        return 404, "no_bank", str(e)
    if isinstance(e, TooLarge):
        return 413, "request_too_large", f"the request body is over {settings.SERVE_MAX_BODY} bytes"
    if isinstance(e, errors.MsaError) and e.code in (errors.USAGE, errors.NOTHING_INGESTED):
        return 400, "invalid_request_error", str(e)
    if isinstance(e, errors.MsaError):
        return 500, "server_error", str(e)
    if isinstance(e, Cancelled):
        return 499, "cancelled", "the request was cancelled"
    print(f"msa serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
    return 500, "internal_error", f"internal error: {type(e).__name__}: {e}"


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        return error_response(400, "invalid_request_error", f"{where or 'body'}: {first['msg']}")

    async def failed(request, e: Exception):
        status, kind, message = error_of(e)
        return error_response(status, kind, message, **({"Retry-After": "1"} if status == 503 else {}))

    for kind in (errors.MsaError, TooLarge, Cancelled):   # anything else: Guard's last resort
        app.add_exception_handler(kind, failed)

