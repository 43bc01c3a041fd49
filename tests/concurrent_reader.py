"""A second process for test_concurrency.py: runs `msa search`, `msa status` and `msa ask` against a bank in a loop
while another process writes it, until STOP_FILE exists. Every command must succeed, and every answer must come
from one snapshot: in one answer, no file is cited by two versions of itself (their passages would repeat spans)
and no document is listed twice. Prints one JSON line: the operations run and the problems seen.

Usage: python concurrent_reader.py BANK MODEL_DIR STOP_FILE
"""

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

from msa_cli.cli import app


def problems_in(hits: list[dict]) -> list[str]:
    seen, spans, out = set(), {}, []
    for h in hits:
        if h["doc_id"] in seen:
            out.append(f"document {h['doc_id']} listed twice")
        seen.add(h["doc_id"])
        span = (h["page"], h["line_start"], h["line_end"])
        if span in spans.setdefault(h["path"], set()):
            out.append(f"{h['path']} cited twice for lines {span}: two versions of one file in one answer")
        spans[h["path"]].add(span)
    return out


def main(bank: str, model: str, stop_file: str) -> None:
    runner = CliRunner()
    common = ["--bank", bank, "--model", model]
    done = {"search": 0, "status": 0, "ask": 0}
    problems: list[str] = []
    while not Path(stop_file).exists():
        for command, args in (("search", ["search", "version of note", "--json", "-k", "100", *common]),
                              ("status", ["status", "--json", "--bank", bank]),
                              ("ask", ["ask", "what does the note say", "--json", "--no-abstain",
                                       "--max-tokens", "2", *common])):
            result = runner.invoke(app, args)
            if result.exit_code != 0 or result.exception:
                problems.append(f"{command} exited {result.exit_code}: {result.exception!r} {result.output[-300:]}")
                continue
            lines = [json.loads(line) for line in result.stdout.splitlines()]
            if command == "search":
                problems += problems_in(lines)
            elif command == "ask":
                problems += problems_in(lines[0]["sources"])
            else:
                status = lines[0]
                if status["documents"] < 0 or status["files"] > status["documents"]:
                    problems.append(f"status is inconsistent: {status}")
            done[command] += 1
    print(json.dumps({"done": done, "problems": problems[:20]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
