"""A file's passages as ingest stores them, and as router training reads them: the reader for its name, then the
splitter. One place, so that training learns from exactly the passages a bank would hold.
"""

import os
from collections.abc import Callable
from pathlib import Path

from .readers import UnreadableFile, parse
from .splitter import Passage, split


def file_passages(path: Path, data: bytes, count_tokens: Callable[[str], int], max_tokens: int) -> list[Passage]:
    """The passages of a file's bytes (read_bytes), cited by `path`. UnreadableFile says why there are none, also
    when the reader itself fails: a reader's bug or a hostile file must not stop the other files (with
    MSA_DEBUG set, the reader's exception goes through, for its traceback)."""
    try:
        return split(parse(path, data), count_tokens, max_tokens)
    except UnreadableFile:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        if os.environ.get("MSA_DEBUG"):
            raise
        message = str(e).strip().splitlines()
        detail = f"its reader failed ({type(e).__name__}{': ' + message[0] if message else ''})"
        raise UnreadableFile(path, "reader failed", detail) from e
