"""Evidence a user can check: the sentences an answer reads are ranked for the question, and every quoted
sentence is found verbatim at the lines (or page) it cites, in text files, HTML pages and PDFs. The answer ends
with its first sentence unless --long."""

from pathlib import Path

import pytest

from msa_cli.corpus.readers import read_file
from msa_cli.corpus.splitter import sentences, split
from msa_cli.memory.snapshot import Document
from msa_cli.qa.ask import TextStream, sentence_of
from msa_cli.qa.evidence import attribute, excerpts

ROOT = Path(__file__).resolve().parent.parent
WORDS = lambda s: len(s.split())  # noqa: E731 - a token counter for the splitter: words


def documents(path: Path, max_tokens: int = 60) -> list[Document]:
    """The file's passages as a bank would hold them (ids from 0)."""
    return [Document(i, str(path), {"page": p.page, "line_start": p.line_start, "line_end": p.line_end}, "",
                     p.n_tokens, p.text, "", i, 0, 0, 0, 0)
            for i, p in enumerate(split(read_file(path), WORDS, max_tokens))]


def lines_of(path: Path, start: int, end: int) -> str:
    """What the reader's text holds from line `start` to line `end` of the file (for a text file, those lines)."""
    text = read_file(path)
    stop = text.line_starts[end] if end < len(text.line_starts) else len(text.text)
    return text.text[text.line_starts[start - 1]:stop]


NOTES = """# Keeping bees

Bees need a dry hive. A hive faces south in most gardens,
so that the morning sun warms it early.

The queen lays up to two thousand eggs a day
in spring. Workers live about six weeks.

    smoker --fuel pine-needles --light
    open-hive --frame 3

Honey is taken in late summer, leaving enough for winter.
"""


def test_the_best_sentence_answers_and_every_quote_is_verbatim_at_its_lines(tmp_path):
    path = tmp_path / "bees.md"
    path.write_text(NOTES)
    docs = documents(path, max_tokens=25)
    assert len(docs) > 1   # the evidence spans passages
    found = excerpts("How many eggs does the queen lay?", docs, WORDS, budget=3, neighbours=1)
    best = max((e for x in found for e in x.read), key=lambda e: e.score)
    assert best.text.startswith("The queen lays up to two thousand eggs") and (best.line_start, best.line_end) == (6, 7)
    for x in found:
        for e in x.read:
            assert e.text in lines_of(path, e.line_start, e.line_end)
            assert e.text.strip() and e.page is None
        # What the reader reads is the chosen sentences with their neighbours, cited from first to last.
        assert all(e.text in x.text for e in x.read)
        assert x.span["line_start"] <= min(e.line_start for e in x.read)
    # A code block has no sentence ends: it stays whole, and is quoted at its own lines.
    code = excerpts("smoker fuel pine-needles", docs, WORDS, budget=1, neighbours=0)[0].read[0]
    assert code.text == "smoker --fuel pine-needles --light\n    open-hive --frame 3"
    assert (code.line_start, code.line_end) == (9, 10)


def test_the_lines_quoted_are_those_that_say_what_the_answer_says():
    path = ROOT / "sample_corpora" / "python" / "tutorial" / "venv.rst"
    question = "How do I create a virtual environment?"
    read = [e for x in excerpts(question, documents(path), WORDS, budget=3, neighbours=1) for e in x.read]
    quoted = attribute(question, "Run `python3 -m venv tutorial-env`.", read)
    assert quoted[0].text == "python3 -m venv tutorial-env" and quoted[0].line_start == 47
    assert sorted(e.text for e in quoted) == sorted(e.text for e in read)   # the same sentences, re-ranked


def test_ties_and_unknown_words_keep_the_retrieval_order(tmp_path):
    path = tmp_path / "bees.md"
    path.write_text(NOTES)
    docs = documents(path, max_tokens=25)
    found = excerpts("zzz qqq", list(reversed(docs)), WORDS, budget=1, neighbours=0)
    assert len(found) == 1 and found[0].document is docs[-1]   # the first document given: hop 1's best


def test_html_evidence_cites_the_pages_source_lines(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html><head><title>T</title><script>var x = 1;</script></head><body>\n"
                    "<h1>Lighthouses</h1>\n"
                    "<p>The first lighthouse of the coast was lit in 1823.\n"
                    "Its keeper rowed out <b>every</b> evening.</p>\n"
                    "<ul><li>Fuel: whale oil</li>\n"
                    "<li>Range: twelve miles</li></ul>\n"
                    "</body></html>\n")
    docs = documents(path)
    found = excerpts("When was the first lighthouse lit?", docs, WORDS, budget=2, neighbours=0)
    best = max((e for x in found for e in x.read), key=lambda e: e.score)
    assert best.text.startswith("The first lighthouse of the coast was lit in 1823.")
    assert best.line_start == 3
    for x in found:
        for e in x.read:
            assert e.text in lines_of(path, e.line_start, e.line_end)
    # The page changed since it was ingested: its passages are no longer where they were, so the document's own
    # lines are cited rather than wrong ones.
    path.write_text("<html><body><p>Something else entirely.</p></body></html>\n")
    moved = excerpts("When was the first lighthouse lit?", docs, WORDS, budget=1, neighbours=0)[0].read[0]
    assert (moved.line_start, moved.line_end) == (docs[0].span["line_start"], docs[0].span["line_end"])


def test_pdf_evidence_cites_its_page():
    path = ROOT / "sample_corpora" / "reportlab" / "reportlab-userguide-excerpt.pdf"
    docs = documents(path, max_tokens=200)
    found = excerpts("What is ReportLab?", docs, WORDS, budget=3, neighbours=0)
    pages = read_file(path)
    for x in found:
        for e in x.read:
            assert e.line_start is None and e.line_end is None and e.page == x.document.span["page"]
            start = pages.pages[e.page - 1]
            stop = pages.pages[e.page] if e.page < len(pages.pages) else len(pages.text)
            assert e.text in pages.text[start:stop]


def test_sentences_are_exact_slices_that_fit():
    text = read_file(ROOT / "sample_corpora" / "python" / "tutorial" / "venv.rst")
    units = sentences(text, WORDS, 20)
    assert units and all(text.text[s:e].strip() == text.text[s:e] and n <= 20 for s, e, n in units)
    assert [s for s, _, _ in units] == sorted(s for s, _, _ in units)


@pytest.mark.parametrize("answer, first", [
    ("Paris. It is the capital of France.", "Paris."),
    ("About 3.5 million people live there. More come.", "About 3.5 million people live there."),
    ("The U.S. Army built it in 1942. Later", "The U.S. Army built it in 1942."),
    ("python -m venv tutorial-env\nThen activate it.", "python -m venv tutorial-env"),
    ("No sentence end yet", "No sentence end yet"),
    ("Run this command:\n\n```\npython -m venv env.\n```\nThen activate it.",
     "Run this command:\n\n```\npython -m venv env.\n```"),
])
def test_an_answer_ends_with_its_first_sentence(answer, first):
    assert sentence_of(answer) == first


class Pieces:
    """A tokenizer whose tokens are the given strings."""
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_the_stream_shows_what_the_answer_keeps():
    pieces = [" Paris", ".", " It", " is", " big", "."]
    for long, shown in ((False, "Paris."), (True, "Paris. It is big.")):
        out = []
        stream = TextStream(Pieces(pieces), out.append, long)
        for i in range(len(pieces)):
            stream(i)
        assert "".join(out) == shown
