"""`msa ask` as scripts use it, on a tiny model: the JSON schema, the stdin pipe contract, abstention's exit code,
cited spans that hold the cited text, and one-line errors."""

import json
from pathlib import Path

import pytest

from conftest import msa
from msa_cli.memory.bank import Bank

ANIMALS = {"quokka": "The quokka is a small wallaby found on Rottnest Island near Perth.",
           "axolotl": "The axolotl is a salamander that keeps its gills and lives in lakes near Mexico City.",
           "pangolin": "The pangolin is covered in scales and eats ants and termites with a long tongue."}


@pytest.fixture(scope="module")
def bank(tiny_env, tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    for name, fact in ANIMALS.items():
        (docs / f"{name}.md").write_text(f"# The {name}\n\n" + f"{fact}\n\n" * 2)
    for i in range(6):
        (docs / f"filler-{i}.md").write_text(f"Filler note {i} about nothing in particular.\n")
    path = tmp_path_factory.mktemp("bank") / "bank"
    r = msa(tiny_env, "ingest", str(docs), "--bank", str(path))
    assert r.returncode == 0, r.stderr
    return path


def test_json_answer_has_the_documented_schema_and_its_sources_hold_the_cited_text(tiny_env, bank):
    # The tiny model's router is random: -k 9 reads the whole bank (as much of it as fits the tiny context).
    r = msa(tiny_env, "ask", "Where is the quokka found? quokka wallaby Rottnest", "--bank", str(bank), "--json",
            "--max-tokens", "8", "-k", "9")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)   # stdout is exactly one JSON object
    assert {"question", "answer", "abstained", "sources", "evidence", "hops", "model", "router", "timings",
            "tokens"} <= set(out)
    assert out["abstained"] is False and out["model"] == "tiny-test" and 1 <= out["tokens"] <= 8
    assert {"route_ms", "first_token_ms", "generate_ms", "total_ms"} <= set(out["timings"])
    assert out["hops"][0]["routing_text"] == out["question"] and out["hops"][0]["selected"]
    sources = out["sources"]
    assert sources and [s["n"] for s in sources] == list(range(1, len(sources) + 1))
    text = {d.doc_id: d.text for d in Bank.open(bank).documents()}
    for s in sources:
        assert set(s) == {"n", "path", "page", "line_start", "line_end", "doc_id", "score", "hop"}
        assert s["hop"] == 1 and s["page"] is None
        cited = Path(s["path"]).read_text().splitlines()[s["line_start"] - 1:s["line_end"]]
        assert text[s["doc_id"]].split() == " ".join(cited).split()   # the cited lines hold the document read
    # The sentences read, each quoted verbatim from the lines it cites, in a source it names.
    assert out["evidence"] and {e["n"] for e in out["evidence"]} <= {s["n"] for s in sources}
    for e in out["evidence"]:
        assert set(e) == {"n", "path", "page", "line_start", "line_end", "text", "score"}
        assert e["path"] == sources[e["n"] - 1]["path"] and e["page"] is None
        assert e["text"] in "\n".join(Path(e["path"]).read_text().splitlines()[e["line_start"] - 1:e["line_end"]])


def test_text_output_quotes_the_evidence_under_its_source_and_passages_reads_whole(tiny_env, bank):
    question = "Where is the quokka found? quokka wallaby Rottnest"
    r = msa(tiny_env, "ask", question, "--bank", str(bank), "--max-tokens", "4", "-k", "9")
    assert r.returncode == 0, r.stderr
    quotes = [line for line in r.stdout.splitlines() if line.startswith("    ")]
    # (The tiny model's tokenizer counts many tokens to a word: the sentence is quoted in pieces.)
    assert any(line.startswith("    3: The quokka is a small wallaby found") for line in quotes)
    whole = json.loads(msa(tiny_env, "ask", question, "--bank", str(bank), "--json", "--max-tokens", "4", "-k", "9",
                           "--passages").stdout)
    assert whole["evidence"] == [] and whole["sources"]


def test_questions_from_stdin_give_one_json_line_each_and_nothing_else(tiny_env, bank):
    questions = "quokka Rottnest wallaby?\n\n   \naxolotl salamander gills Mexico?\n"
    r = msa(tiny_env, "ask", "-", "--bank", str(bank), "--json", "--max-tokens", "4", "-k", "9", input=questions)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2   # blank lines are skipped
    answers = [json.loads(line) for line in lines]
    assert [a["question"] for a in answers] == ["quokka Rottnest wallaby?", "axolotl salamander gills Mexico?"]

    plain = msa(tiny_env, "ask", "-", "--bank", str(bank), "--max-tokens", "4", "-k", "9", input=questions)
    assert plain.returncode == 0, plain.stderr
    assert len(plain.stdout.strip().split("\n\n")) == 2   # one paragraph per answer


def test_nothing_relevant_abstains_with_exit_7(tiny_env, bank):
    r = msa(tiny_env, "ask", "Who painted the ceiling of the Sistine Chapel?", "--bank", str(bank))
    assert r.returncode == 7
    assert r.stdout.strip() == "Nothing in memory is relevant to this question, so I cannot answer it from memory."
    assert r.stderr.count("\n") == 1 and "--no-abstain" in r.stderr
    out = json.loads(msa(tiny_env, "ask", "Sistine Chapel ceiling?", "--bank", str(bank), "--json").stdout)
    assert out["abstained"] is True and out["sources"] == [] and out["tokens"] == 0
    # --no-abstain reads the closest documents anyway.
    r = msa(tiny_env, "ask", "Sistine Chapel ceiling?", "--bank", str(bank), "--no-abstain", "--max-tokens", "2",
            "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["sources"]
    # Like grep: a batch succeeds when any question was answered, and exits 7 only when none was.
    both = msa(tiny_env, "ask", "-", "--bank", str(bank), "--json", "--max-tokens", "2", "-k", "9",
               input="Sistine Chapel ceiling?\npangolin scales termites tongue?\n")
    assert both.returncode == 0 and [json.loads(x)["abstained"] for x in both.stdout.splitlines()] == [True, False]
    none = msa(tiny_env, "ask", "-", "--bank", str(bank), "--json", input="Sistine Chapel?\nMona Lisa?\n")
    assert none.returncode == 7 and len(none.stdout.splitlines()) == 2


def test_ask_errors_are_one_line_with_documented_codes(tiny_env, bank, tmp_path):
    r = msa(tiny_env, "ask", "anything", "--bank", str(tmp_path / "none"))
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "msa ingest" in r.stderr and r.stdout == ""
    r = msa(tiny_env, "ask", "  ", "--bank", str(bank))
    assert r.returncode == 2 and "empty" in r.stderr and r.stdout == ""
    r = msa(tiny_env, "ask", "quokka", "--bank", str(bank), "--model", str(tmp_path / "missing"))
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and r.stdout == ""
    r = msa(tiny_env, "ask", "quokka", "--bank", str(bank), "--context", "both")
    assert r.returncode == 2 and "--context" in r.stderr
