"""The kind of answer a question asks for: the sentence that answers a "when" question has a date in it, and
among routed sentences it outranks the one that only repeats the question's words."""

from msa_cli.memory.snapshot import Document
from msa_cli.qa.evidence import attribute, best_line, excerpts
from msa_cli.qa.expected import answer_test

WORDS = lambda s: len(s.split())  # noqa: E731 - a token counter for the splitter: words


def test_each_question_kind_finds_its_answers_kind():
    when = answer_test("when was the treaty of paris signed")
    assert when("It was signed on 3 September 1783.") and not when("The treaty of Paris was signed by envoys.")
    many = answer_test("How many moons does Mars have?")
    assert many("Mars has two moons.") and many("It has 2 moons.") and not many("Mars has moons.")
    who = answer_test("who wrote the treaty of paris")
    assert who("It was drafted by John Jay and Benjamin Franklin.")
    assert not who("The treaty of Paris was written in ink.")   # no name the question lacks
    assert answer_test("what is the capital of france") is None and answer_test("Wann war das?") is None


def test_a_dated_sentence_is_quoted_before_one_that_repeats_the_question():
    text = ("The Treaty of Paris was signed by the envoys of the treaty parties in Paris. "
            "The envoys met on 3 September 1783 at the Hotel d'York.")
    doc = Document(0, "/notes/paris.txt", {"page": None, "line_start": 1, "line_end": 1}, "", WORDS(text), text, "",
                   0, 0, 0, 0, 0)
    question = "when was the treaty of paris signed"
    assert best_line(question, doc, WORDS).text.startswith("The Treaty of Paris was signed")   # BM25 alone
    assert best_line(question, doc, WORDS, bonus=2.0).text.startswith("The envoys met on 3 September 1783")
    read = excerpts(question, [doc], WORDS, budget=2, neighbours=0)[0].read
    quoted = attribute(question, "It was signed in Paris.", read, bonus=2.0)
    assert quoted[0].text.startswith("The envoys met") and quoted[0].score > quoted[1].score
    assert attribute(question, "It was signed in Paris.", read)[0].text.startswith("The Treaty of Paris")
