"""The `msa` command line. Thin: parse, call the engine, print. Stdout carries answers and JSON only;
progress, warnings and errors go to stderr. Exit codes are in errors.py and the README."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from . import errors, settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A local language model with a memory far larger than its context window.")

BankOption = typer.Option(None, "--bank", help="Memory bank directory [env: MSA_BANK; default: ~/.msa/bank].")
ModelOption = typer.Option(None, "--model", help="Model: 'default', a .gguf file or a local HF directory [env: MSA_MODEL].")


def say(message: str) -> None:
    print(message, file=sys.stderr)


def open_engine(bank: Optional[Path], model: Optional[str], create: bool = False):
    from .engine import Engine
    from .model.loading import load_model

    path = bank or settings.default_bank()
    if not create and not (path / "manifest.json").is_file():
        raise errors.BankNotFound(f"no memory bank at {path}: make one with `msa ingest PATH`")
    return Engine.open(load_model(model), path, create=create)


@app.command()
def ingest(paths: list[Path] = typer.Argument(..., help="Files or folders to read into memory."),
           bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption,
           quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")):
    """Read files and folders into the memory bank (unchanged files are skipped)."""
    from .ingest import ingest as run_ingest

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise errors.MsaError(f"no such file or folder: {missing[0]}", errors.USAGE)
    engine = open_engine(bank, model, create=True)
    start = time.perf_counter()
    report = run_ingest(engine, paths, quiet=quiet)
    for w in report.warnings:
        say(f"msa: warning: {w}")
    seconds = time.perf_counter() - start
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(report.skipped.items())) or "none"
    if not quiet:
        say(f"ingested {report.ingested} files ({report.documents} documents, {report.tokens} tokens) in "
            f"{seconds:.1f}s; unchanged {report.unchanged}; skipped: {skipped}")
    if report.ingested == 0 and report.unchanged == 0:
        raise errors.MsaError("nothing was ingested", errors.NOTHING_INGESTED)


@app.command()
def search(query: str, bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption,
           top_k: int = typer.Option(10, "--top-k", "-k", min=1),
           as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")):
    """Routing only: the documents the router picks for QUERY, with scores."""
    from .qa.answer import citation

    engine = open_engine(bank, model)
    for rank, hit in enumerate(engine.route(query, top_k), 1):
        d = hit.document
        if as_json:
            print(json.dumps({"rank": rank, "doc_id": d.doc_id, "path": d.source, **d.span,
                              "score": round(hit.score, 4)}))
        else:
            print(f"{rank:>3}. {hit.score:.3f}  {citation(d)}")


@app.command()
def ask(question: str = typer.Argument(..., help="The question."),
        bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption,
        top_k: int = typer.Option(settings.TOP_K, "--top-k", "-k", min=1, help="Documents to read."),
        max_tokens: int = typer.Option(200, "--max-tokens", min=1),
        context: str = typer.Option("text", "--context",
                                    help="'text': read the selected documents' original text (default); "
                                         "'pooled': attend to their pooled K/V only (MSA stage 3; needs a "
                                         "model trained for it)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Answer QUESTION from memory, citing the files it came from."""
    from .qa.answer import citation, memory_prompt, text_prompt

    if not question.strip():
        raise errors.MsaError("the question is empty", errors.USAGE)
    if context not in ("text", "pooled"):
        raise errors.MsaError(f"--context must be 'text' or 'pooled', not {context!r}", errors.USAGE)
    engine = open_engine(bank, model)
    tok = engine.model.tokenizer
    t0 = time.perf_counter()
    hits = engine.route(question, top_k)
    t1 = time.perf_counter()
    stream = not as_json and sys.stdout.isatty()   # a terminal sees the answer as it is written
    generated: list[int] = []
    shown = 0

    def on_token(token: int) -> None:
        nonlocal shown
        generated.append(token)
        if not stream:
            return
        text = tok.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)

    docs = [h.document for h in hits]
    if context == "text":
        out = engine.generate(text_prompt(tok, question, docs), max_tokens, on_token)
    else:
        out = engine.generate_over_memory(memory_prompt(tok, question), hits, max_tokens, on_token)
    answer = tok.decode(out, skip_special_tokens=True).strip()
    t2 = time.perf_counter()
    sources = [{"n": n, "path": h.document.source, **h.document.span, "doc_id": h.document.doc_id,
                "score": round(h.score, 4)} for n, h in enumerate(hits, 1)]
    if as_json:
        print(json.dumps({"question": question, "answer": answer, "sources": sources,
                          "model": engine.model.identity["name"], "router": engine.router.spec.describe(),
                          "context": context,
                          "timings": {"route_ms": round((t1 - t0) * 1e3, 1), "generate_ms": round((t2 - t1) * 1e3, 1),
                                      "total_ms": round((t2 - t0) * 1e3, 1)},
                          "tokens": len(out)}))
        return
    if not stream:
        print(answer)
    print("\n" if stream else "")
    print()
    for n, h in enumerate(hits, 1):
        print(f"[{n}] {citation(h.document)}  ({h.score:.3f})")


@app.command()
def status(bank: Optional[Path] = BankOption, as_json: bool = typer.Option(False, "--json")):
    """What the memory bank holds."""
    from .memory.bank import Bank

    path = bank or settings.default_bank()
    b = Bank.open(path)
    stats = b.stats()
    s = b.settings
    info = {"bank": str(path), "files": len({d.source for d in b.documents()}), **stats,
            "model": s["model"], "router": s["router"]}
    if as_json:
        print(json.dumps(info))
        return
    print(f"bank      {path}")
    print(f"files     {info['files']}    documents {stats['documents']}    tokens {stats['tokens']}")
    print(f"on disk   " + "  ".join(f"{k} {v / 1e6:.1f} MB" for k, v in stats["bytes_on_disk"].items()))
    print(f"model     {s['model']['name']} ({s['model']['weights_sha256'][:12]})")
    print(f"router    {s['router']['kind']} {s['router']['id']}")


def main() -> None:
    """Entry point: one line on stderr and a documented exit code for every failure, never a traceback."""
    try:
        app(standalone_mode=False)
    except errors.MsaError as e:
        say(f"msa: error: {e}")
        sys.exit(e.code)
    except KeyboardInterrupt:
        say("msa: interrupted")
        sys.exit(errors.INTERRUPTED)
    except Exception as e:  # click's usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(errors.INTERRUPTED)
        if os.environ.get("MSA_DEBUG"):
            raise
        say(f"msa: internal error: {type(e).__name__}: {e} (MSA_DEBUG=1 shows the traceback)")
        sys.exit(errors.INTERNAL)


if __name__ == "__main__":
    main()
