"""`msa serve` as its users drive it: a real server process on 127.0.0.1 (the tiny test model), the real `openai`
client, raw HTTP for what a client library hides (auth headers, error bodies, limits), a second process ingesting
with the CLI, many clients at once, a client hanging up mid-stream, and SIGTERM."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from conftest import msa

KEY = "test-key-0123"
QUESTION = "Where is the quokka found? quokka wallaby Rottnest"
ANIMALS = {"quokka": "The quokka is a small wallaby found on Rottnest Island near Perth.",
           "axolotl": "The axolotl is a salamander that keeps its gills and lives in lakes near Mexico City.",
           "pangolin": "The pangolin is covered in scales and eats ants and termites with a long tongue."}


class Server:
    """`msa serve ARGS` on a free port, started and stopped as a user would."""

    def __init__(self, env: dict, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "msa_cli.cli", "serve", "--port", "0", *args],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        for line in self.proc.stderr:   # the startup line names the port it took
            self.log.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise AssertionError("the server did not start: " + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def post(self, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def corpus(tiny_env, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(docs, a folder clients may ingest from, the bank of docs)."""
    root = tmp_path_factory.mktemp("serve")
    docs, allowed = root / "docs", root / "allowed"
    for folder in (docs, allowed):
        folder.mkdir()
    for name, fact in ANIMALS.items():
        (docs / f"{name}.md").write_text(f"# The {name}\n\n" + f"{fact}\n\n" * 2)
    for i in range(6):
        (docs / f"filler-{i}.md").write_text(f"Filler note {i} about nothing in particular.\n")
    r = msa(tiny_env, "ingest", str(docs), "--bank", str(root / "bank"), "-q")
    assert r.returncode == 0, r.stderr
    return docs, allowed, root / "bank"


@pytest.fixture(scope="module")
def server(tiny_env, corpus):
    docs, allowed, bank = corpus
    s = Server({**tiny_env, "MSA_API_KEY": KEY}, "--bank", str(bank), "--allow", str(allowed))
    yield s
    if s.proc.poll() is None:
        s.stop()


def ask(s: Server, **kw):
    return s.client().chat.completions.create(
        model="msa", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
        extra_body={"top_k": 9, **kw.pop("extra_body", {})}, **kw)


def test_the_openai_client_gets_an_answer_its_sources_and_msa_s_own_fields(server, corpus):
    out = ask(server)
    content = out.choices[0].message.content
    extra = out.model_extra["msa"]
    assert out.object == "chat.completion" and out.choices[0].finish_reason == "stop"
    assert extra["question"] == QUESTION and not extra["abstained"] and extra["hops"]
    sources = extra["sources"]
    assert sources and all(Path(s["path"]).parent == corpus[0] for s in sources)
    # The answer, then one `[n] path:lines` line per source, as `msa ask` prints them.
    answer, listed = content.split("\n\n", 1)
    assert answer == extra["answer"]
    assert [line.split()[0] for line in listed.splitlines()] == [f"[{s['n']}]" for s in sources]
    assert all(f"{s['path']}:{s['line_start']}" in listed for s in sources)
    assert 1 <= out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > len(QUESTION)


def test_a_stream_gives_the_same_answer_token_by_token_then_its_sources(server):
    whole = ask(server, extra_body={"long": True})
    chunks = list(ask(server, stream=True, extra_body={"long": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert len([c for c in chunks if c.choices[0].delta.content]) >= 2   # more than one piece
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["msa"]["sources"] == whole.model_extra["msa"]["sources"]


def test_models_health_and_content_parts(server):
    assert [m.id for m in server.client().models.list()] == ["msa"]
    health = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["status"] == "ok" and health["documents"] == 9
    parts = server.client().chat.completions.create(
        model="anything", max_tokens=4, extra_body={"top_k": 9},
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    assert parts.model_extra["msa"]["question"] == QUESTION


def test_every_request_needs_the_key_when_one_is_set(server):
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    for path in ("/health", "/v1/models"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_api_key"
    assert server.post("/v1/search", {"query": "quokka"}, key=None).status_code == 401


@pytest.mark.parametrize("body, status, says", [
    ({"model": "msa"}, 400, "messages"),
    ({"model": "msa", "messages": []}, 400, "messages"),
    ({"model": "msa", "messages": [{"role": "system", "content": "hi"}]}, 400, "question"),
    ({"model": "msa", "messages": [{"role": "user", "content": "q"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "msa", "messages": [{"role": "user", "content": "q"}], "top_k": 0}, 400, "top_k"),
    ({"model": "msa", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "over"),
])
def test_a_bad_request_is_a_4xx_with_a_json_error_and_the_server_lives_on(server, body, status, says):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["code"] == status and "Traceback" not in r.text
    bad_json = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    assert server.post("/v1/search", {"query": "quokka"}).status_code == 200
    assert not any("Traceback" in line for line in server.log)


def test_search_returns_ranked_documents_with_their_best_line(server, corpus):
    r = server.post("/v1/search", {"query": "quokka wallaby Rottnest", "top_k": 3})
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    for h in hits:
        assert Path(h["path"]).parent == corpus[0] and h["evidence"]["n"] == h["rank"]
        assert h["evidence"]["text"] in Path(h["path"]).read_text()


def test_ingest_reads_only_under_the_allowed_roots_links_and_dots_resolved(server, corpus, tmp_path):
    docs, allowed, _ = corpus
    (allowed / "bilby.md").write_text("The bilby is a desert marsupial with long ears.\n")
    outside = tmp_path / "secret.md"
    outside.write_text("The vault code is 4711.\n")
    (allowed / "link.md").symlink_to(outside)
    refused = [str(outside), str(allowed / ".." / ".." / "etc" / "passwd"), str(allowed / "link.md"), "/etc/passwd",
               "bilby.md", str(docs)]
    for path in refused:
        r = server.post("/v1/ingest", {"paths": [path]})
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["type"] == "permission_denied"
    r = server.post("/v1/ingest", {"paths": [str(allowed / "bilby.md")]})
    assert r.status_code == 200, r.text
    assert r.json()["ingested"] == 1 and r.json()["documents"] == 1
    # A folder under the root is walked, but a link in it that leads out is not followed.
    r = server.post("/v1/ingest", {"paths": [str(allowed)]})
    assert r.status_code == 200 and r.json()["skipped"] == {"unreadable": 1} and r.json()["unchanged"] == 1
    found = server.post("/v1/search", {"query": "bilby desert marsupial ears vault code", "top_k": 20}).json()["data"]
    assert str(allowed / "bilby.md") in {h["path"] for h in found}
    assert "4711" not in json.dumps(found) and "link.md" not in json.dumps(found)


def test_a_remembered_text_is_cited_by_its_name(server):
    r = server.post("/v1/ingest", {"name": "meeting-notes", "text": "The numbat eats termites at dawn.\n"})
    assert r.status_code == 200 and r.json()["documents"] == 1, r.text
    found = server.post("/v1/search", {"query": "numbat termites dawn", "top_k": 20}).json()["data"]
    assert "memory:meeting-notes" in {h["path"] for h in found}
    assert server.post("/v1/ingest", {"name": "", "text": "x"}).status_code == 400


def test_the_server_sees_what_a_cli_ingest_commits_meanwhile(server, corpus, tiny_env, tmp_path):
    before = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()["documents"]
    (tmp_path / "wombat.md").write_text("The wombat digs burrows and has cube-shaped droppings.\n")
    r = msa(tiny_env, "ingest", str(tmp_path / "wombat.md"), "--bank", str(corpus[2]), "-q")
    assert r.returncode == 0, r.stderr
    after = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()["documents"]
    assert after == before + 1


def test_many_clients_at_once_are_answered_or_told_to_retry(tiny_env, corpus):
    # One place in the queue: of clients arriving together, those finding it taken get a 503 at once.
    s = Server(tiny_env, "--bank", str(corpus[2]), "--queue", "1")
    try:
        # 150 tokens: a quarter of a second each for the tiny model, so the 8 overlap.
        body = {"model": "msa", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 150,
                "top_k": 9, "long": True}
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: s.post("/v1/chat/completions", body, key=None), range(8)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "server_busy"
            else:
                assert r.json()["choices"][0]["message"]["content"] == r.json()["msa"]["answer"]
        # A client that hangs up mid-stream gives its place back (a leaked place would refuse everyone after).
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        assert retried(lambda: s.post("/v1/chat/completions", {**body, "max_tokens": 4}, key=None)) == 200
        assert s.stop() == 0
        assert not any("Traceback" in line for line in s.log), "".join(s.log)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def retried(request, seconds: float = 60) -> int:
    """The status of `request()` once it is not a 503, retrying as Retry-After asks (a client's loop)."""
    deadline = time.monotonic() + seconds
    while True:
        r = request()
        if r.status_code != 503 or time.monotonic() > deadline:
            return r.status_code
        time.sleep(float(r.headers["Retry-After"]) / 10)


def test_sigterm_exits_0_and_a_port_in_use_is_one_line_exit_2(tiny_env, corpus, tmp_path):
    (tmp_path / "key").write_text("from-a-file\n")
    s = Server(tiny_env, "--bank", str(corpus[2]), "--api-key-file", str(tmp_path / "key"))
    assert httpx.get(s.url + "/health").status_code == 401
    assert httpx.get(s.url + "/health", headers={"Authorization": "Bearer from-a-file"}).status_code == 200
    assert s.stop() == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "msa_cli.cli", "serve", "--bank", str(corpus[2]), "--port",
                            str(port)], env=tiny_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("msa: error: cannot listen on")
    missing = subprocess.run([sys.executable, "-m", "msa_cli.cli", "serve", "--bank", str(corpus[2] / "none")],
                             env=tiny_env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3 and "no memory bank" in missing.stderr
    assert os.path.isdir(corpus[2])
