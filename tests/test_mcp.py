"""`msa mcp` as an agent uses it: the official `mcp` SDK's client starts `msa mcp` over stdio (the tiny test model)
and calls its tools and reads its resources, as a coding agent's MCP configuration would."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from conftest import msa

FACTS = {"quokka": "The quokka is a small wallaby found on Rottnest Island near Perth.",
         "axolotl": "The axolotl is a salamander that keeps its gills and lives in lakes near Mexico City."}


@pytest.fixture(scope="module")
def agent_bank(tiny_env, tmp_path_factory) -> tuple[Path, Path]:
    """(the ingested folder, its bank)."""
    root = tmp_path_factory.mktemp("mcp")
    docs = root / "docs"
    docs.mkdir()
    for name, fact in FACTS.items():
        (docs / f"{name}.md").write_text(f"# The {name}\n\n{fact}\n")
    r = msa(tiny_env, "ingest", str(docs), "--bank", str(root / "bank"), "-q")
    assert r.returncode == 0, r.stderr
    return docs, root / "bank"


def session(env: dict, *args: str, steps):
    """Run `steps(client)` against `msa mcp ARGS` started by the SDK's stdio client."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "msa_cli.cli", "mcp", *args], env=env)

    async def main():
        async with Client(params, read_timeout_seconds=120) as client:
            return await steps(client)

    return anyio.run(main)


def result(call) -> dict:
    assert not call.is_error, call.content
    return call.structured_content if call.structured_content is not None else json.loads(call.content[0].text)


def test_an_agent_lists_the_tools_searches_asks_and_reads_a_passage(tiny_env, agent_bank):
    docs, bank = agent_bank

    async def steps(client):
        tools = {t.name: t for t in (await client.list_tools()).tools}
        found = result(await client.call_tool("search", {"query": "quokka wallaby Rottnest", "top_k": 2}))
        answer = result(await client.call_tool("ask", {"question": "Where is the quokka found? quokka wallaby",
                                                       "top_k": 3, "max_tokens": 8}))
        passage = await client.read_resource(found["results"][0]["uri"])
        status = result(await client.call_tool("status", {}))
        return tools, found, answer, passage, status

    tools, found, answer, passage, status = session(tiny_env, "--bank", str(bank), steps=steps)
    assert set(tools) == {"search", "ask", "ingest", "remember", "forget", "status"}
    assert all(len(t.description) > 80 for t in tools.values())   # written for an agent to choose well
    hits = found["results"]
    assert len(hits) == 2 and {Path(h["path"]).parent for h in hits} == {docs}
    for h in hits:
        assert h["citation"].startswith(h["path"] + ":") and h["text"] in Path(h["path"]).read_text()
    assert answer["sources"] and not answer["abstained"] and isinstance(answer["answer"], str)
    assert passage.contents[0].text == f"{hits[0]['citation']}\n\n{hits[0]['text']}"
    assert status["documents"] == 2 and status["exists"]


def test_an_agent_remembers_recalls_and_forgets_a_note(tiny_env, agent_bank):
    _, bank = agent_bank
    note = "The deploy key of the staging cluster rotates every ninety days."

    async def steps(client):
        stored = result(await client.call_tool("remember", {"name": "ops/deploy-key", "text": note}))
        again = result(await client.call_tool("remember", {"name": "ops/deploy-key", "text": note}))
        hits = result(await client.call_tool("search", {"query": "deploy key staging rotates", "top_k": 5}))
        gone = result(await client.call_tool("forget", {"names": ["ops/deploy-key"]}))
        after = result(await client.call_tool("search", {"query": "deploy key staging rotates", "top_k": 5}))
        return stored, again, hits, gone, after

    stored, again, hits, gone, after = session(tiny_env, "--bank", str(bank), steps=steps)
    assert stored["documents"] == 1 and again["unchanged"] == 1   # the same text under the same name: kept once
    cited = [h for h in hits["results"] if h["path"] == "memory:ops/deploy-key"]
    assert cited and cited[0]["text"] == note and cited[0]["citation"] == "memory:ops/deploy-key:1"
    assert gone == {"sources": 1, "documents": 1}
    assert "memory:ops/deploy-key" not in {h["path"] for h in after["results"]}


def test_ingest_is_refused_outside_the_roots_and_allowed_under_the_bank_s_own(tiny_env, agent_bank, tmp_path):
    docs, bank = agent_bank
    (docs / "bilby.md").write_text("# The bilby\n\nThe bilby is a desert marsupial with long ears.\n")
    (tmp_path / "secret.md").write_text("The vault code is 4711.\n")
    (docs / "link.md").symlink_to(tmp_path / "secret.md")

    async def steps(client):
        refused = [await client.call_tool("ingest", {"paths": [p]}) for p in
                   ("/etc/passwd", str(docs / ".." / ".." / "etc"), str(docs / "link.md"), str(tmp_path))]
        ok = result(await client.call_tool("ingest", {"paths": [str(docs / "bilby.md")]}))
        empty = await client.call_tool("ask", {"question": "   "})
        return refused, ok, empty

    # No --allow: the roots the bank was ingested from (docs/).
    refused, ok, empty = session(tiny_env, "--bank", str(bank), steps=steps)
    for call in refused:
        assert call.is_error and "outside the allowed roots" in call.content[0].text
    assert ok["ingested"] == 1
    assert empty.is_error and empty.content[0].text == "Error executing tool ask: the question is empty"
    (docs / "link.md").unlink()


def test_the_same_tools_over_streamable_http(tiny_env, agent_bank):
    with socket.socket() as probe:   # a free port for the server to take
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "msa_cli.cli", "mcp", "--bank", str(agent_bank[1]), "--transport",
                             "http", "--port", str(port)], env=tiny_env, stderr=subprocess.PIPE, text=True)
    try:
        assert "msa mcp: http://127.0.0.1:" in proc.stderr.readline()

        async def main():
            for _ in range(600):   # the startup line comes just before uvicorn listens
                try:
                    async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                        return [t.name for t in (await client.list_tools()).tools], result(
                            await client.call_tool("status", {}))
                except Exception:   # noqa: BLE001 - not listening yet
                    await anyio.sleep(0.1)
            raise AssertionError("msa mcp --transport http never answered")

        tools, status = anyio.run(main)
        assert "search" in tools and status["documents"] >= 2
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
