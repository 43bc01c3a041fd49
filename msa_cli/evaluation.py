"""`msa eval SET_DIR`: how often the router (and baselines over the same documents) find the gold documents of a
QA set, and (without --no-generate) how well the model answers from what each of them finds.

A set is the uniform layout of `shared/eval/tools/convert_eval.py` (corpus/eval_set.py reads it). The corpus is
ingested into a bank like any folder, so a file may become several passages; every system ranks *files*, each by
its best passage, and a gold document is found when its file is ranked. Every system sees the same passages.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import errors, settings
from .corpus.eval_set import EvalSet, load_set
from .engine import Engine
from .memory.bank import Document
from .memory.mode import mode_for
from .memory.search import Hit
from .model.embedder import Embedder
from .model.loading import load_model
from .parallel import launch as parallel
from .qa.ask import Options, answer_from, ask, reading_budget
from .qa.interleave import Retrieval
from .qa.scoring import contains_answer, exact_match, token_f1

DEPTH = 100          # ranks kept per question: MRR is MRR@100
CUTOFFS = (1, 5, 10)


def run(set_dir: Path, model: str | None, device: str | None, baselines: list[str], answers: Options | None,
        limit: int | None = None, skip: int = 0, bank: Path | None = None, router: str | None = None,
        progress: bool = False, log: Callable[[str], None] = lambda message: None) -> tuple[dict, EvalSet, dict]:
    """`msa eval` whole: read the set (checked before the model loads), bring its bank up to date (reindexed for
    `router` first, so the ingest encodes new files for it too), then `evaluate`. Under torchrun the bank is
    sharded over the ranks (parallel/launch.py), and rank 0 evaluates. `log` hears the ingest's
    summary and evaluate's lines. Returns the results per system, the set, and bank_summary."""
    s = load_set(set_dir, limit, skip)
    if answers and not all(q.get("answers") for q in s.questions):
        raise errors.MsaError(f"{set_dir}: answering needs every question's \"answers\" (or use --no-generate)",
                              errors.USAGE)
    m = load_model(model, device=device)
    path = bank or default_eval_bank(s)
    spec = mode_for(m).named_router(router) if router else None
    if spec:
        parallel.reindex(m, path, spec)
    report = parallel.ingest(m, path, [s.corpus], new_router=spec, progress=progress)
    engine = parallel.open_engine(m, path, new_router=spec)   # under torchrun: rank 0 goes on
    log(report.summary())
    results = evaluate(engine, s, list(dict.fromkeys(baselines)), answers, log)
    return results, s, bank_summary(engine)


def default_eval_bank(s: EvalSet) -> Path:
    """One bank per set folder under $MSA_HOME/eval, reused (and brought up to date) by later runs."""
    key = hashlib.sha256(str(s.corpus.resolve()).encode()).hexdigest()[:10]
    return settings.msa_home() / "eval" / f"{s.name}-{key}"


# --- systems: each ranks the bank's documents for a question ---------------------------------------------------

Ranker = Callable[[str], list[tuple[int, float]]]   # question -> [(document index, score)], best first


def msa_ranker(engine: Engine, docs: list[Document], fuse: bool = True) -> Ranker:
    index = {d.doc_id: i for i, d in enumerate(docs)}
    return lambda q: [(index[h.document.doc_id], h.score) for h in engine.route(q, DEPTH * 4, fuse=fuse)]


def bm25_ranker(engine: Engine, docs: list[Document]) -> Ranker:
    """BM25 as msa's own routing computes it: the bank's index (Bank.lexical), same documents, same words."""
    import torch

    index = engine.bank.lexical()   # rows in doc id order: docs' order, since docs are the bank's documents
    k = min(DEPTH * 4, len(docs))

    def rank(question: str) -> list[tuple[int, float]]:
        top = torch.topk(index.scores(question), k)
        return list(zip(top.indices.tolist(), top.values.tolist()))
    return rank


def dense_ranker(docs: list[Document]) -> Ranker:
    """all-MiniLM-L6-v2 over the same passages (model/embedder.py)."""
    import torch

    embedder = Embedder()
    matrix = embedder.embed([d.text for d in docs])

    def rank(question: str) -> list[tuple[int, float]]:
        scores = matrix @ embedder.embed([question])[0]
        top = torch.topk(scores, min(DEPTH * 4, len(docs)))
        return list(zip(top.indices.tolist(), top.values.tolist()))
    return rank


# --- metrics ----------------------------------------------------------------------------------------------------

def ranked_files(ranking: list[tuple[int, float]], docs: list[Document]) -> list[str]:
    """Document ranking -> file (doc_id stem) ranking, each file at its best passage's place."""
    files: list[str] = []
    for i, _ in ranking:
        stem = Path(docs[i].source).stem
        if stem not in files:
            files.append(stem)
            if len(files) == DEPTH:
                break
    return files


def metrics(rankings: list[list[str]], golds: list[list[str]]) -> dict:
    """recall@k: the share of a question's gold documents in its top k, averaged over questions; all-gold@k: the
    share of questions with every gold document in the top k; MRR of the first gold document (0 beyond DEPTH)."""
    out = {}
    for k in CUTOFFS:
        hits = [len(set(r[:k]) & set(g)) / len(g) for r, g in zip(rankings, golds)]
        out[f"recall@{k}"] = float(np.mean(hits))
        out[f"all-gold@{k}"] = float(np.mean([h == 1.0 for h in hits]))
    out["mrr"] = float(np.mean([next((1 / (i + 1) for i, f in enumerate(r) if f in g), 0.0)
                                for r, g in zip(rankings, golds)]))
    return out


def evaluate(engine: Engine, s: EvalSet, baselines: list[str], answers: Options | None = None,
             log: Callable[[str], None] = lambda message: None) -> dict:
    """Retrieval metrics per system; with `answers`, also answer metrics: "msa" answers as `msa ask` does, each
    retrieval baseline reads as many of its best documents as `msa ask` may read (same prompt, same generator),
    and baseline "full" reads the whole bank, as much as fits the model's window (a long-context model). `log`
    hears one line per finished system: a long run shows where it is."""
    docs = engine.bank.documents()
    stems = {Path(d.source).stem for d in docs}
    golds = [list(q["gold_docs"]) for q in s.questions]
    missing = sorted({g for gs in golds for g in gs} - stems)
    if missing:
        raise errors.MsaError(f"gold document {missing[0]} is not in the bank built from {s.corpus} "
                              f"({len(missing)} missing)", errors.USAGE)
    makers = {"msa": lambda: msa_ranker(engine, docs), "msa-learned": lambda: msa_ranker(engine, docs, fuse=False),
              "bm25": lambda: bm25_ranker(engine, docs), "dense": lambda: dense_ranker(docs)}
    # The default router fuses BM25 into a learned router's score: report the learned router alone beside it.
    fused = engine.router.spec.kind == "learned" and settings.FUSION_WEIGHT > 0
    results = {}
    for system in ["msa", *(["msa-learned"] if fused else []), *(b for b in baselines if b in makers)]:
        start = time.perf_counter()
        rank = makers[system]()
        setup = time.perf_counter() - start
        rankings, seconds = timed(rank, s)
        rankings = [ranked_files(r, docs) for r in rankings]
        results[system] = {**metrics(rankings, golds), "questions": len(s.questions),
                           "ms_per_question": round(1e3 * float(np.mean(seconds)), 1),
                           "ms_p95": round(1e3 * float(np.percentile(seconds, 95)), 1),
                           "index_seconds": round(setup, 2)}
        if answers and system == "msa":
            results[system] |= answer_metrics(s, lambda q: ask(engine, q, answers))
        elif answers and system != "msa-learned":
            results[system] |= answer_metrics(s, lambda q, rank=rank: rag(engine, docs, rank, q, answers))
        log(f"{system}: {len(s.questions)} questions in {time.perf_counter() - start:.0f} s")
    if answers and "full" in baselines:
        start, whole = time.perf_counter(), reading(full_context_order(docs))
        opts = replace(answers, read="passages")   # a long-context model reads the text as it is
        results["full"] = {"questions": len(s.questions),
                           **answer_metrics(s, lambda q: answer_from(engine, q, whole, opts, time.perf_counter()))}
        log(f"full: {len(s.questions)} questions in {time.perf_counter() - start:.0f} s")
    return results


def full_context_order(docs: list[Document]) -> list[Document]:
    """The bank's documents in a fixed pseudo-random order (a hash of file name and place): the window then holds
    a share of the memory that does not depend on how the corpus was assembled (an eval set lists its gold
    passages first), and a document keeps its place relative to the others as the bank grows."""
    def key(d: Document) -> str:
        return hashlib.sha256(f"{Path(d.source).name}:{d.span.get('line_start')}".encode()).hexdigest()
    return sorted(docs, key=key)


def rag(engine: Engine, docs: list[Document], rank: Ranker, question: str, opts: Options):
    """A retrieval baseline's answer: its best documents, as many as `msa ask` may read, through msa's generator,
    read whole, as a RAG stack reads its chunks (evidence selection is msa's)."""
    t0 = time.perf_counter()
    best = [(docs[i], score) for i, score in rank(question)[:reading_budget(opts)]]
    return answer_from(engine, question, reading([d for d, _ in best], [score for _, score in best]),
                       replace(opts, read="passages"), t0)


def reading(docs: list[Document], scores: list[float] | None = None) -> Retrieval:
    """A one-hop retrieval of these documents, in this order."""
    scores = scores or [0.0] * len(docs)
    return Retrieval([Hit(d, s) for d, s in zip(docs, scores)], [1] * len(docs))


def answer_metrics(s: EvalSet, answer) -> dict:
    """Answer every question: exact match, token F1 and contains-answer against its gold answers (an abstention
    scores 0), the share abstained, the shares whose prompt held a gold document and every gold document (what
    multi-hop questions need), latency per answer and to its first token, and when answers quote evidence, the
    share whose best evidence sentence holds a gold answer."""
    rows = []
    answered, seconds = timed(answer, s)
    for q, a in zip(s.questions, answered):
        text = "" if a.abstained else a.text
        read = {Path(src["path"]).stem for src in a.sources()}
        gold = set(q["gold_docs"])
        best = max(a.evidence, key=lambda e: e.score).text if a.evidence else ""
        rows.append((exact_match(text, q["answers"]), token_f1(text, q["answers"]),
                     contains_answer(text, q["answers"]), a.abstained, bool(read & gold), gold <= read,
                     contains_answer(best, q["answers"])))
    m = np.array(rows, dtype=float).mean(0)
    quoted = {"evidence_contains": float(m[6])} if any(a.evidence for a in answered) else {}
    first = [a.timings["first_token_ms"] for a in answered if "first_token_ms" in a.timings]
    return {"exact_match": float(m[0]), "f1": float(m[1]), "contains_answer": float(m[2]), "abstained": float(m[3]),
            "gold_read": float(m[4]), "all_gold_read": float(m[5]),
            "answer_ms_p50": round(1e3 * float(np.median(seconds)), 1),
            "answer_ms_p95": round(1e3 * float(np.percentile(seconds, 95)), 1),
            **({"first_token_ms_p50": round(float(np.median(first)), 1)} if first else {}), **quoted}


def timed(f: Callable, s: EvalSet) -> tuple[list, list[float]]:
    """f of every question of the set, and the seconds each took."""
    out, seconds = [], []
    for q in s.questions:
        t0 = time.perf_counter()
        out.append(f(q["question"]))
        seconds.append(time.perf_counter() - t0)
    return out, seconds


def bank_summary(engine: Engine) -> dict:
    st = engine.bank.stats()
    return {"documents": st["documents"], "tokens": st["tokens"], "router": engine.router.spec.id,
            "bank": os.fspath(engine.bank.path)}
