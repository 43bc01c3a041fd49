"""Memory Interleave's hop logic, over a fake router whose scores the test sets."""

from msa_cli.memory.search import Hit
from msa_cli.memory.bank import Document
from msa_cli.qa.interleave import Relevance, retrieve


def doc(i: int, text: str) -> Document:
    return Document(doc_id=i, source=f"/docs/{i}.txt", span={"page": None, "line_start": 1, "line_end": 2},
                    content_hash="", n_tokens=len(text.split()), text=text, segment="s", row=i, chunk_start=0,
                    chunk_count=1, key_start=0, key_count=1)


DOCS = {1: doc(1, "The journal is published by the American Psychological Association."),
        2: doc(2, "The American Psychological Association's first president was G. Stanley Hall."),
        3: doc(3, "Unrelated text about volcanoes."),
        4: doc(4, "More unrelated text about rivers.")}


def above(threshold: float):
    return lambda hit: hit.score >= threshold


def router(table: dict[str, dict[int, float]], calls: list[str]):
    """route(text, k): scores from the first table entry whose key occurs in the text."""
    def route(text: str, k: int) -> list[Hit]:
        calls.append(text)
        scores = next(v for key, v in table.items() if key in text)
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])[:k]
        return [Hit(DOCS[i], s) for i, s in ranked]
    return route


def test_a_later_hop_routes_on_the_text_just_read_and_adds_what_it_finds():
    calls: list[str] = []
    table = {"Stanley": {1: 9.0, 2: 1.0, 3: 0.0, 4: 0.0},          # the hop-1 read is in the routing text
             "Psychological Association.": {1: 9.0, 2: 5.0, 3: 0.5, 4: 0.1},
             "first president": {1: 4.0, 2: 0.5, 3: 0.2, 4: 0.1}}
    r = retrieve(router(table, calls), "Who was the first president of the journal's publisher?", k=1, max_hops=3,
                 relevant=above(2.0))
    assert [h.document.doc_id for h in r.hits] == [1, 2] and r.hop_of == [1, 2]
    assert calls[0] == "Who was the first president of the journal's publisher?"
    assert DOCS[1].text in calls[1] and calls[1].startswith(calls[0])
    assert DOCS[2].text in calls[2]
    # Hop 3 found nothing new above the threshold: it is recorded, and the hops stop.
    assert [h.selected for h in r.hops] == [[1], [2], []] and r.hops[2].best == 0.0
    assert not r.abstained


def test_hop_one_reads_the_k_best_but_later_hops_only_what_is_relevant():
    table = {"q": {1: 3.0, 2: 1.0, 3: 2.5, 4: 0.0}}
    r = retrieve(router(table, []), "q", k=2, max_hops=3, relevant=above(2.0))
    assert [h.document.doc_id for h in r.hits] == [1, 3]   # hop 2's best new document (2: 1.0) is below 2.0
    assert len(r.hops) == 2 and r.hops[1].best == 1.0


def test_nothing_relevant_abstains_and_the_budget_caps_the_hops():
    r = retrieve(router({"q": {1: 1.9, 2: 1.0}}, []), "q", k=5, max_hops=3, relevant=above(2.0))
    assert r.abstained and r.hits == [] and len(r.hops) == 1 and r.hops[0].best == 1.9
    calls: list[str] = []
    r = retrieve(router({"": {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.5}}, calls), "q", k=1, max_hops=2, relevant=above(2.0))
    assert [h.document.doc_id for h in r.hits] == [1, 2] and len(calls) == 2
    # A bank with nothing left to find ends the hops too.
    r = retrieve(router({"": {1: 5.0}}, []), "q", k=3, max_hops=3, relevant=above(0.0))
    assert [h.document.doc_id for h in r.hits] == [1] and r.hops[1].best is None


def test_without_abstention_hop_one_reads_the_best_documents_anyway():
    r = retrieve(router({"q": {1: 1.9, 2: 1.0}}, []), "q", k=5, max_hops=3, relevant=above(2.0), abstain=False)
    assert [h.document.doc_id for h in r.hits] == [1, 2] and len(r.hops) == 2


def test_a_document_is_relevant_by_bm25_or_by_a_calibrated_router():
    hit = lambda bm25, router: Hit(DOCS[1], 0.0, router=router, bm25=bm25)
    test = Relevance(bm25=4.0, router=0.5)
    assert test(hit(4.0, 0.0)) and test(hit(0.0, 0.5)) and not test(hit(3.9, 0.49))
    assert not Relevance(bm25=4.0)(hit(3.9, 0.99))   # an uncalibrated router's score says nothing


def test_a_later_hop_adds_at_most_half_of_k():
    table = {"q": {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0}}   # every document relevant
    r = retrieve(router(table, []), "q", k=2, max_hops=2, relevant=above(0.0))
    assert r.hop_of == [1, 1, 2] and [h.document.doc_id for h in r.hits] == [1, 2, 3]


def test_a_later_hop_routes_on_what_read_back_gives_of_the_document_just_read():
    calls: list[str] = []
    table = {"G. Stanley": {1: 9.0, 2: 1.0, 3: 0.0, 4: 0.0},
             "ASSOCIATION": {1: 9.0, 2: 5.0, 3: 0.5, 4: 0.1},
             "first president": {1: 4.0, 2: 0.5, 3: 0.2, 4: 0.1}}
    r = retrieve(router(table, calls), "Who was the first president of the journal's publisher?", k=1, max_hops=2,
                 relevant=above(2.0), read_back=lambda hit: hit.document.text.upper())
    assert [h.document.doc_id for h in r.hits] == [1, 2]
    assert calls[1] == calls[0] + "\n\n" + DOCS[1].text.upper()   # the question, then what read_back gave
