"""Starting the two front ends: the model loaded once, the socket bound before anything is served (a port in use is
a one-line error, and `--port 0` takes a free port that the startup line names), then uvicorn or the MCP SDK."""

from __future__ import annotations

import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import errors
from ..memory.bank import Bank
from ..memory.shards import ways
from ..model.loading import load_model
from ..parallel.group import launched
from ..parallel.launch import open_engine
from .backend import Backend

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def open_backend(bank: Path, model: str | None, device: str | None, allow: list[Path], queue: int,
                 ingested_roots: bool = False) -> Backend:
    """The model loaded and a backend over `bank`; with `ingested_roots` and no --allow, ingest is allowed under
    every root the bank was ever ingested from (`msa mcp`'s default: an agent re-reads what its user ingested)."""
    missing = [str(p) for p in allow if not os.path.exists(p)]
    if missing:
        raise errors.MsaError(f"--allow {missing[0]}: no such file or folder", errors.USAGE)
    if ingested_roots and not allow and Bank.exists(bank):
        allow = [Path(r) for r in Bank.open(bank).info.get("roots", [])]
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="msa-model")   # loads the model, then answers with it
    loaded = model_thread.submit(load_model, model, device=device).result()
    sharded = None
    if launched() or ways(bank):
        # Rank 0 gets the engine over every shard; the other ranks serve theirs on this thread and then exit here
        # (open_engine's SystemExit comes out of result()). Without torchrun, open_engine says how to run it.
        sharded = model_thread.submit(open_engine, loaded, bank).result()
    return Backend(loaded, bank, allow, queue, model_thread, sharded)


def api_key(key_file: Path | None) -> str | None:
    """The key every HTTP request must send: --api-key-file's content, else MSA_API_KEY, else none."""
    if key_file is None:
        return os.environ.get("MSA_API_KEY") or None
    try:
        key = key_file.read_text().strip()
    except OSError as e:
        raise errors.MsaError(f"cannot read --api-key-file {key_file}: {e.strerror or e}", errors.USAGE) from None
    if not key:
        raise errors.MsaError(f"--api-key-file {key_file} is empty", errors.USAGE)
    return key


def listening_socket(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise errors.MsaError(f"cannot listen on {host}:{port}: {e.strerror or e}", errors.USAGE) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve_http(backend: Backend, host: str, port: int, key: str | None) -> None:
    """`msa serve`: until SIGTERM or Ctrl-C, which finish (or after 10 s cancel) what is in flight."""
    import uvicorn

    from .http_api import create_app

    if not backend.has_bank() and not backend.allow:
        raise errors.BankNotFound(f"no memory bank at {backend.bank_path}: make one with `msa ingest PATH`, or "
                                  f"start with --allow ROOT to ingest through POST /v1/ingest")
    if host not in LOOPBACK and not key:
        print(f"msa serve: warning: listening on {host} without an API key: anyone who reaches it reads your "
              f"memory (set MSA_API_KEY or --api-key-file)", file=sys.stderr)
    sock = listening_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"msa serve: http://{shown}:{sock.getsockname()[1]}/v1 (bank {backend.bank_path}; ingest under: "
          f"{', '.join(map(str, backend.allow)) or 'nothing'}; API key {'required' if key else 'off'})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(backend, key), log_level="warning", timeout_graceful_shutdown=10,
                            lifespan="on")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it found: this
    # one makes that a clean exit 0 (Ctrl-C still ends as an interrupt, 130).
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])


def serve_mcp(backend: Backend, transport: str, host: str, port: int) -> None:
    """`msa mcp`: over stdio (an agent starts it as a subprocess) or streamable HTTP, until the client closes it
    or SIGTERM (exit 0)."""
    from .mcp_server import create_server

    server = create_server(backend)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if transport == "stdio":
        server.run("stdio")
    else:
        print(f"msa mcp: http://{host}:{port}/mcp (bank {backend.bank_path})", file=sys.stderr, flush=True)
        server.run("streamable-http", host=host, port=port)
