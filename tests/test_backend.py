"""The service backend both front ends share (msa_cli/service/backend.py), in this process on the tiny model: the
bounded queue, cancellation at the next token, snapshots that follow commits, one writer, and the allowed roots."""

import threading

import pytest

from msa_cli import errors
from msa_cli.engine import Engine
from msa_cli.ingest import ingest
from msa_cli.qa.ask import Options
from msa_cli.service.backend import Backend, Busy, Cancelled, Refused

OPTS = Options(top_k=9, max_tokens=40, long=True, abstain=False)   # the tiny model always reads and writes


@pytest.fixture
def backend(tiny_model, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("quokka", "axolotl", "pangolin"):
        (docs / f"{name}.md").write_text(f"# The {name}\n\nThe {name} is an animal with a long name.\n")
    ingest(Engine.open(tiny_model, tmp_path / "bank", create=True), [docs])
    return Backend(tiny_model, tmp_path / "bank", [docs], queue=2)


def test_the_queue_refuses_at_once_when_full_and_each_place_is_given_back_once(backend):
    first, second = backend.admit(), backend.admit()
    with pytest.raises(Busy, match="busy"):
        backend.admit()
    first.release()
    first.release()   # a second release gives back nothing more
    third = backend.admit()
    with pytest.raises(Busy):
        backend.admit()
    second.release()
    third.release()
    assert backend.ask("the quokka", OPTS)[0].sources()   # both places free again


def test_a_cancelled_answer_stops_at_its_next_token_and_frees_its_place(backend):
    cancelled, seen = threading.Event(), []

    def on_token(token):
        seen.append(token)
        cancelled.set()   # the client hung up after the first token

    with pytest.raises(Cancelled):
        backend.ask("the quokka", OPTS, on_token, cancelled, backend.admit())
    assert len(seen) == 1
    assert [backend.admit(), backend.admit()]   # the place and the model are free


def test_a_reader_follows_commits_and_a_second_writer_is_refused(backend, tmp_path):
    reader = backend.reader()
    assert backend.reader() is reader   # nothing changed: the same snapshot
    backend.remember("note", "The numbat eats termites.")
    assert backend.reader() is not reader and backend.status()["documents"] == 4
    with backend.writer():
        with pytest.raises(errors.BankLocked):
            backend.remember("other", "More.")
        assert backend.search("numbat termites", 5)   # a write in progress never blocks a read


def test_paths_are_checked_after_links_and_dots_are_resolved(backend, tmp_path):
    docs = tmp_path / "docs"
    (docs / "inside.md").write_text("Inside.\n")
    (docs / "escape").symlink_to(tmp_path)
    assert backend.allowed(str(docs / "inside.md")) == docs / "inside.md"
    for path in (str(docs / ".." / "bank"), str(docs / "escape" / "bank"), "docs/inside.md", "/etc/passwd"):
        with pytest.raises(Refused):
            backend.allowed(path)
    with pytest.raises(Refused, match="not allowed"):
        Backend(backend.model, backend.bank_path, []).allowed(str(docs))
