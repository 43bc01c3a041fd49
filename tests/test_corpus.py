"""Readers, splitter and the sample corpus. Token counts come from simple stand-ins for a tokenizer."""

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from msa_cli.corpus.readers import UnreadableFile, make_text, read_file
from msa_cli.corpus.walk import walk
from msa_cli.corpus.splitter import split

SAMPLES = Path(__file__).resolve().parent.parent / "sample_corpora"


def words(s: str) -> int:
    return len(s.split())


def subwords(s: str) -> int:
    """Like a BPE tokenizer in scale: up to four word characters, or one punctuation mark, per token."""
    return len(re.findall(r"\w{1,4}|[^\w\s]", s))


def check_passages(text, passages, count_tokens, max_tokens):
    """Each passage is the exact slice its lines say, fits, is counted right, and together they cover all content."""
    cursor = 0
    line = 1  # the line at `cursor`
    for p in passages:
        start = text.text.find(p.text, cursor)
        assert start >= 0, "passage is not a slice of the text, in order"
        line += text.text.count("\n", cursor, start)
        assert p.line_start == line
        assert p.line_end == line + p.text.count("\n")
        assert p.path == text.path
        assert p.n_tokens == count_tokens(p.text) <= max_tokens
        assert p.text.strip(), "empty passage"
        cursor = start + len(p.text)
        line += p.text.count("\n")
    assert "".join("".join(p.text.split()) for p in passages) == "".join(text.text.split())


# --- splitter ---------------------------------------------------------------------------------------------------

def test_short_paragraphs_are_packed_whole():
    paragraphs = [" ".join(f"p{i}w{j}" for j in range(3 + i % 5)) for i in range(30)]
    text = make_text("notes.txt", "\n\n".join(paragraphs) + "\n")
    passages = split(text, words, max_tokens=20)
    check_passages(text, passages, words, 20)
    assert len(passages) > 1
    for p in passages:  # no paragraph is cut: each passage is a run of whole paragraphs
        assert all(part in paragraphs for part in p.text.split("\n\n"))


def test_long_paragraph_is_cut_at_sentence_ends():
    sentence = "The quick brown fox jumps over the lazy dog again."
    text = make_text("long.md", "Title\n\n" + " ".join([sentence] * 50) + "\n\nEnd.\n")
    passages = split(text, words, max_tokens=32)
    check_passages(text, passages, words, 32)
    for p in passages:
        assert p.text.endswith(".")


def test_long_line_without_sentence_ends_is_cut_at_whitespace():
    line = " ".join(f"word{i}" for i in range(5000))
    text = make_text("one-line.txt", line)
    passages = split(text, words, max_tokens=64)
    check_passages(text, passages, words, 64)
    for p in passages:  # whole words only
        assert all(re.fullmatch(r"word\d+", w) for w in p.text.split())
    assert min(p.n_tokens for p in passages[:-1]) >= 0.75 * 64, "pieces should be nearly full"


def test_long_code_block_is_cut_at_line_ends():
    body = "\n".join(f"    x{i} = compute({i}, y{i})" for i in range(200))
    text = make_text("big.py", f"def f():\n{body}\n\n\ndef g():\n    return 1\n")
    passages = split(text, subwords, max_tokens=100)
    check_passages(text, passages, subwords, 100)
    for p in passages:
        end = text.text.find(p.text) + len(p.text)
        assert end == len(text.text) or text.text[end] == "\n"


class Counted:
    """A tokenizer length that records how much text it was asked to count: the splitter's work, which must stay
    a small multiple of the text's length (the tokenizer is the slow part), however the text is shaped."""

    def __init__(self, count):
        self.count, self.chars, self.calls = count, 0, 0

    def __call__(self, s: str) -> int:
        self.chars += len(s)
        self.calls += 1
        return self.count(s)


def test_three_megabyte_line_without_whitespace_costs_a_few_passes_of_counting():
    text = make_text("minified.js", "ab1_" * 750_000)
    counted = Counted(subwords)
    passages = split(text, counted, max_tokens=320)
    check_passages(text, passages, subwords, 320)
    assert all(p.line_start == p.line_end == 1 for p in passages)
    assert counted.chars <= 2 * len(text.text), counted.chars / len(text.text)   # measured: 1.0
    assert counted.calls <= 2 * len(passages)


def test_megabyte_paragraph_costs_a_few_passes_of_counting():
    text = make_text("wall.txt", "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20_000)
    counted = Counted(words)
    passages = split(text, counted, max_tokens=320)
    check_passages(text, passages, words, 320)
    assert counted.chars <= 3 * len(text.text), counted.chars / len(text.text)   # measured: 2.0
    assert counted.calls <= 20_000 + 2 * len(passages)   # about once per sentence and once per passage


def test_passages_are_verified_when_joining_costs_more_than_estimated():
    # A tokenizer that spends 5 tokens on every blank line: packing by estimate would overflow.
    def costly_gaps(s):
        return words(s) + 5 * s.count("\n\n")

    text = make_text("gaps.txt", "\n\n".join("one two three four five six seven eight" for _ in range(10)))
    passages = split(text, costly_gaps, max_tokens=20)
    check_passages(text, passages, costly_gaps, 20)
    assert len(passages) == 10


def test_blank_text_gives_no_passages():
    assert split(make_text("empty.txt", ""), words) == []
    assert split(make_text("blank.txt", "  \n\n\t\n \n"), words) == []


def test_split_is_deterministic():
    text = make_text("a.rst", (SAMPLES / "python" / "howto" / "sorting.rst").read_text())
    assert split(text, subwords, 64) == split(text, subwords, 64)


def test_passages_carry_the_page_they_start_on():
    text = make_text("book.txt", "page one\n\npage one again\n\npage two\n")
    text = dataclasses.replace(text, pages=(0, text.text.index("page two")))
    assert [p.page for p in split(text, words, max_tokens=3)] == [1, 1, 2]
    assert {p.page for p in split(make_text("x.txt", "plain"), words)} == {None}


# --- readers ----------------------------------------------------------------------------------------------------

def test_crlf_and_lone_cr_keep_editor_line_numbers(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\nthree\rfour\r\n")
    text = read_file(path)
    assert text.text == "one\ntwo\n\nthree\nfour\n"
    passages = split(text, words, max_tokens=1)
    assert [(p.text, p.line_start, p.line_end) for p in passages] == [
        ("one", 1, 1), ("two", 2, 2), ("three", 4, 4), ("four", 5, 5)]


def test_citation_is_the_path_as_passed(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n")
    monkeypatch.chdir(tmp_path)
    assert read_file(Path("docs/a.md")).path == "docs/a.md"


def test_binary_content_with_a_text_extension_is_refused(tmp_path):
    nul = tmp_path / "image.txt"
    nul.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4)
    controls = tmp_path / "noise.txt"
    controls.write_bytes(bytes([1, 2, 3, 4, 5, 6, 14, 15, 16, 17]) * 100)
    for path in (nul, controls):
        with pytest.raises(UnreadableFile, match="binary"):
            read_file(path)


def test_invalid_utf8_text_falls_back_to_latin1(tmp_path):
    path = tmp_path / "old.txt"
    path.write_bytes("Café crème\nnaïve\n".encode("latin-1"))
    assert read_file(path).text == "Café crème\nnaïve\n"


def test_invalid_utf8_with_a_binary_body_is_refused(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"header line\n" * 1000 + b"\xff\xfe\0\0" * 1000)
    with pytest.raises(UnreadableFile, match="not valid UTF-8"):
        read_file(path)


def test_byte_order_marks_are_honoured(tmp_path):
    utf8 = tmp_path / "bom8.md"
    utf8.write_bytes(b"\xef\xbb\xbf# Title\n")
    utf16 = tmp_path / "bom16.txt"
    utf16.write_bytes("héllo\r\nworld\r\n".encode("utf-16"))
    assert read_file(utf8).text == "# Title\n"
    assert read_file(utf16).text == "héllo\nworld\n"


def test_unsupported_or_unreadable_files_are_refused(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(UnreadableFile, match="unsupported file type '.jpg'"):
        read_file(tmp_path / "photo.jpg")
    for path in (tmp_path / "folder.txt", tmp_path / "missing.txt"):
        with pytest.raises(UnreadableFile):
            read_file(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_is_refused(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    with pytest.raises(UnreadableFile, match="Permission denied"):
        read_file(path)


def test_files_without_extension_are_sniffed(tmp_path):
    (tmp_path / "README").write_text("Read me.\n")
    (tmp_path / "program").write_bytes(b"\x7fELF\x02\x01\x01\0\0\0")
    assert read_file(tmp_path / "README").text == "Read me.\n"
    with pytest.raises(UnreadableFile, match="binary"):
        read_file(tmp_path / "program")


# --- the sample corpus ------------------------------------------------------------------------------------------

def sample_files():
    return [p for p in walk(SAMPLES) if isinstance(p, Path)]


def test_sample_corpus_reads_and_splits_cleanly():
    paths = sample_files()
    names = {p.relative_to(SAMPLES).as_posix() for p in paths}
    assert {"reportlab/reportlab-userguide-excerpt.pdf", "sqlite/whentouse.html", "python/Lib/shlex.py"} <= names
    assert not names & {"SOURCES.md", "questions.jsonl", "LICENSE-PSF.txt"}, ".msaignore keeps these out"
    for path in paths:
        text = read_file(path)
        passages = split(text, subwords, 320)
        if path.suffix == ".html":  # cited by the HTML file's lines, not the extracted text's
            text = make_text(text.path, text.text)
            passages = [dataclasses.replace(p, line_start=text.line_at(text.text.find(p.text)),
                                            line_end=text.line_at(text.text.find(p.text) + len(p.text) - 1))
                        for p in passages]
        check_passages(text, passages, subwords, 320)


def _flat(s):
    return " ".join(s.split()).lower()


def test_sample_questions_point_at_their_answers():
    questions = [json.loads(line) for line in (SAMPLES / "questions.jsonl").read_text().splitlines()]
    assert len(questions) >= 15
    assert len({q["id"] for q in questions}) == len(questions)
    texts = {p.relative_to(SAMPLES).as_posix(): read_file(p) for p in sample_files()}
    assert len({q["gold_files"][0] for q in questions}) >= 7, "questions should spread over the files"
    for q in questions:
        assert q["question"].strip() and q["answers"]
        (gold,) = q["gold_files"]
        assert gold in texts, f"{q['id']}: no file {gold}"
        if "gold_pages" in q:   # the answer is on these pages of the PDF's text
            text = texts[gold]
            first, last = q["gold_pages"]
            bounds = list(text.pages) + [len(text.text)]
            stated = text.text[bounds[first - 1]:bounds[last]]
        else:                   # ... or on these lines of the file itself (for HTML, of its source)
            lines = (SAMPLES / gold).read_text().splitlines()
            first, last = q["gold_lines"]
            assert 1 <= first <= last <= len(lines)
            stated = "\n".join(lines[first - 1:last])
        # The main answer is stated there and in no other file.
        answer = _flat(q["answers"][0])
        assert answer in _flat(stated), f"{q['id']}: answer not where gold says"
        alone = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)")
        elsewhere = [name for name, t in texts.items() if name != gold and alone.search(_flat(t.text))]
        assert not elsewhere, f"{q['id']}: answer also in {elsewhere}"
