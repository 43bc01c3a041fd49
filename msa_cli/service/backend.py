"""One model over one memory bank, for many clients at once: what `msa serve` (HTTP) and `msa mcp` share.

- The model answers one question at a time, on one thread; requests wait for it in a bounded queue, and one that
  finds the queue full is refused at once (Busy), which a front end turns into a 503 rather than an unbounded
  backlog.
- Reads go to a snapshot of the bank (memory/snapshot.py), reopened when its manifest has changed, so the service
  sees what a CLI `msa ingest` committed and a write in progress never blocks a read.
- One writer at a time (an ingest, a remembered text, a forget) in this process; the bank's own lock refuses a
  second process's writer (BankLocked).
- A sharded bank (under torchrun, parallel/launch.py) is served as it was when the server started, by one engine
  over every rank's shard, and not written: its shards are written by a sharded `msa ingest`, then the server is
  restarted.
- Paths to ingest must lie under the allowed roots once links and `..` are resolved, so a client cannot make
  the server read /etc/passwd or ~/.ssh.
Calls block: the front ends make them from worker threads, and the model's work waits for the model's thread.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .. import errors, settings
from ..engine import Engine
from ..ingest import IngestReport, confined, forget, ingest, remember
from ..memory.bank import Bank, Document
from ..memory.format import MANIFEST
from ..model.loading import Model
from ..qa.ask import Answer, Options, ask
from ..qa.lookup import search_results


class Busy(errors.MsaError):
    """The queue is full: try again later (HTTP 503)."""


class Refused(errors.MsaError):
    """A path outside the allowed roots, or ingest not allowed at all (HTTP 403)."""
    code = errors.USAGE


class Cancelled(Exception):
    """The client went away: its answer stops at the next token and frees its slot."""


class Backend:
    """model_thread: the one thread the model answers on (so one question at a time), best the thread that loaded
    it: the same answers ran 10-20% slower on another thread than the one that loaded the model (BENCHMARKS.md,
    "Serving"); run.open_backend loads it there."""

    def __init__(self, model: Model, bank: Path, allow: list[Path], queue: int = settings.SERVE_QUEUE,
                 model_thread: ThreadPoolExecutor | None = None, sharded: Engine | None = None):
        self.model, self.bank_path = model, Path(bank)
        self.sharded = sharded   # the engine over a sharded bank, or None for one bank on disk
        self.allow = [Path(os.path.realpath(r)) for r in allow]
        self._slots = threading.BoundedSemaphore(queue)   # requests admitted: answering or waiting for the model
        self.queue = queue
        self._model_thread = model_thread or ThreadPoolExecutor(1, thread_name_prefix="msa-model")
        self._writer = threading.Lock()                    # one writer of this process at a time
        self._reader_lock = threading.Lock()
        self._reader: tuple[tuple, Engine] | None = None   # (the manifest's identity, an engine on that snapshot)

    # --- admission ------------------------------------------------------------------------------------------

    def admit(self) -> "Slot":
        """A place in the queue for one request, or Busy at once when all `queue` places are taken."""
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the server is busy ({self.queue} requests in progress or waiting): try again shortly")
        return Slot(self._slots)

    # --- reading --------------------------------------------------------------------------------------------

    def has_bank(self) -> bool:
        return self.sharded is not None or Bank.exists(self.bank_path)

    def reader(self) -> Engine:
        """An engine on the bank's latest committed snapshot (reopened only when the manifest changed)."""
        if self.sharded is not None:
            return self.sharded
        try:
            st = os.stat(self.bank_path / MANIFEST)
        except FileNotFoundError:
            raise errors.BankNotFound(f"no memory bank at {self.bank_path} yet: ingest something first") from None
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._reader_lock:
            if self._reader is None or self._reader[0] != identity:
                self._reader = (identity, Engine.open(self.model, self.bank_path))
            return self._reader[1]

    def ask(self, question: str, opts: Options, on_token: Callable[[int], None] | None = None,
            cancelled: threading.Event | None = None, slot: "Slot | None" = None) -> tuple[Answer, Engine]:
        """One answer (ask.ask), after waiting for the model; `cancelled` set stops it with Cancelled. `slot`: the
        place in the queue the caller took already (HTTP takes it before a stream starts), given back here."""
        def seen(token: int) -> None:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled
            if on_token:
                on_token(token)

        def answer() -> tuple[Answer, Engine]:
            if cancelled is not None and cancelled.is_set():   # the client left while waiting
                raise Cancelled
            engine = self.reader()
            return ask(engine, question, opts, seen), engine

        with slot or self.admit():
            return self._model_thread.submit(answer).result()

    def search(self, query: str, k: int) -> list[dict]:
        """The k best documents for `query`, as `msa search --json` prints them."""
        if not query.strip():
            raise errors.MsaError("the query is empty", errors.USAGE)
        with self.admit():
            return self._model_thread.submit(lambda: search_results(self.reader(), query, k)).result()

    def documents(self) -> int:
        """How many documents the latest snapshot holds (0 before the first ingest)."""
        return self.reader().bank.num_documents if self.has_bank() else 0

    def document(self, doc_id: int) -> Document:
        return self.reader().bank.document(doc_id)

    def status(self) -> dict:
        """What `msa status --json` prints, or only the bank's path when there is none yet."""
        if not self.has_bank():
            return {"bank": str(self.bank_path.absolute()), "documents": 0, "exists": False}
        return {**self.reader().bank.status(), "exists": True}

    # --- writing ---------------------------------------------------------------------------------------------

    @contextmanager
    def writer(self) -> Iterator[Engine]:
        """An engine of its own for one write (its bank takes the lock; readers keep their snapshot)."""
        if self.sharded is not None:
            raise Refused(f"this server answers from the sharded bank {self.bank_path}, which it does not write: "
                          f"ingest or forget with `torchrun ... -m msa_cli`, then restart the server")
        if not self._writer.acquire(blocking=False):
            raise errors.BankLocked("another ingest or forget through this server is running: try again when "
                                    "it is done")
        try:
            yield Engine.open(self.model, self.bank_path, create=True)
        finally:
            self._writer.release()

    def ingest(self, paths: list[str]) -> IngestReport:
        """Ingest files or folders under the allowed roots (ingest.ingest, pruning what is gone from folders)."""
        roots = [self.allowed(p) for p in paths]
        if not roots:
            raise errors.MsaError("no paths to ingest", errors.USAGE)
        with self.writer() as engine:
            return ingest(engine, roots, confine=self.allow)

    def remember(self, name: str, text: str) -> IngestReport:
        with self.writer() as engine:
            return remember(engine, name, text)

    def forget(self, paths: list[str] = (), names: list[str] = ()) -> tuple[int, int]:
        """Forget files or folders (under the allowed roots) and remembered texts: (sources, documents)."""
        targets = [self.allowed(p, must_exist=False) for p in paths]
        if not self.has_bank():
            return 0, 0
        with self.writer():
            return forget(Bank.open(self.bank_path), targets, list(names))

    def allowed(self, path: str, must_exist: bool = True) -> Path:
        """`path` as the CLI would name it (absolute, `..` gone, links kept: the bank's sources are such paths) if,
        with every link resolved, it lies under an allowed root; Refused otherwise. `path` must be absolute: the
        server's working directory is no client's."""
        if not self.allow:
            raise Refused("ingest is not allowed on this server: start it with --allow ROOT")
        if not os.path.isabs(path):
            raise Refused(f"{path}: give an absolute path on the server")
        if not confined(path, self.allow):
            raise Refused(f"{path} is outside the allowed roots ({', '.join(map(str, self.allow))})")
        if must_exist and not os.path.exists(path):
            raise errors.MsaError(f"no such file or folder: {path}", errors.USAGE)
        return Path(os.path.abspath(path))


class Slot:
    """One place in the queue, given back once however many times it is released."""

    def __init__(self, slots: threading.BoundedSemaphore):
        self._slots, self._held = slots, True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._slots.release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
