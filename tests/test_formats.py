"""Readers for HTML, PDF and .gz, and the limits every reader shares."""

import gzip
import io

import pytest
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from msa_cli.corpus.readers import MAX_LINE_CHARS, UnreadableFile, read_file
from msa_cli.corpus.splitter import split


def words(s):
    return len(s.split())


def make_pdf(pages: list[list[str]], password: str | None = None, algorithm: str = "RC4-128") -> bytes:
    """A real PDF whose pages hold the given lines of text (Helvetica), optionally encrypted."""
    w = PdfWriter()
    font = w._add_object(DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                                           NameObject("/Subtype"): NameObject("/Type1"),
                                           NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for lines in pages:
        page = w.add_blank_page(612, 792)
        ops = "".join(f"({line}) Tj 0 -16 Td " for line in lines)
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 72 720 Td {ops}ET".encode("latin-1"))
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        page[NameObject("/Contents")] = w._add_object(stream)
    if password is not None:
        w.encrypt(user_password=password, owner_password="owner", algorithm=algorithm)
    out = io.BytesIO()
    w.write(out)
    return out.getvalue()


HTML = """<!DOCTYPE html>
<html><head><title>Page title</title>
<style>body { color: red }</style>
<script>var hidden = "script text";</script>
</head>
<body>
<nav><a href="/">Home</a> | <a href="/docs">Docs</a></nav>
<div class="sidebar">Sidebar links</div>
<h1>Visible heading</h1>
<p>First paragraph
spans two lines &amp; has an entity.</p>
<ul><li>item one</li><li>item two</li></ul>
<pre>code   keeps
  its spaces</pre>
<footer>Copyright footer</footer>
</body></html>
"""


def test_html_keeps_visible_text_only_and_cites_source_lines(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(HTML)
    text = read_file(path)
    assert text.text == ("Visible heading\n\nFirst paragraph spans two lines & has an entity.\n\n"
                         "item one\nitem two\n\ncode   keeps\n  its spaces")
    source = HTML.splitlines()
    for phrase in ("Visible heading", "First paragraph", "has an entity", "item two", "its spaces"):
        line = text.line_at(text.text.index(phrase))
        assert phrase.split()[-1] in source[line - 1], phrase


def test_html_main_content_wins_over_the_rest(tmp_path):
    path = tmp_path / "doc.htm"
    path.write_text('<body><div class="header">Site</div><div>Related pages</div>'
                    '<div role="main"><p>The content.</p><div><p>More content.</p></div></div>'
                    '<div>After main</div></body>')
    assert read_file(path).text == "The content.\n\nMore content."


def test_pdf_text_by_page_and_passages_never_span_pages(tmp_path):
    path = tmp_path / "book.pdf"
    path.write_bytes(make_pdf([["Alpha one.", "Alpha two."], ["Beta one.", "Beta two."], ["Gamma."]]))
    text = read_file(path)
    assert [text.page_at(text.text.index(w)) for w in ("Alpha", "Beta", "Gamma")] == [1, 2, 3]
    passages = split(text, words, max_tokens=100)
    assert [(p.page, p.text[:4]) for p in passages] == [(1, "Alph"), (2, "Beta"), (3, "Gamm")]


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-256"])
def test_pdf_encrypted_with_an_empty_password_is_read(tmp_path, algorithm):
    path = tmp_path / "locked-for-editing.pdf"
    path.write_bytes(make_pdf([["Readable text."]], password="", algorithm=algorithm))
    assert "Readable text." in read_file(path).text


@pytest.mark.parametrize("name, data, kind", [
    ("secret.pdf", make_pdf([["Hidden."]], password="hunter2"), "encrypted PDF"),
    ("truncated.pdf", make_pdf([["Some text."]])[:200], "damaged PDF"),
    ("garbage.pdf", b"%PDF-1.7\n" + bytes(range(256)) * 8, "damaged PDF"),
    ("blank.pdf", make_pdf([[]]), "PDF without text"),
    ("empty.txt", b"", "empty"),
    ("spaces.md", b"  \n\n\t\n", "empty"),
    ("minified.js", b"var a=1;" * (3 * 1024 * 1024 // 8), "long lines"),
    ("broken.txt.gz", b"\x1f\x8b\x08\x00garbage", "damaged .gz"),
])
def test_unreadable_files_say_why(tmp_path, name, data, kind):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UnreadableFile) as err:
        read_file(path)
    assert err.value.kind == kind
    assert "\n" not in str(err.value)


def test_gzip_is_read_by_its_inner_name(tmp_path):
    (tmp_path / "notes.md.gz").write_bytes(gzip.compress(b"# Notes\n\nGzipped markdown.\n"))
    (tmp_path / "page.html.gz").write_bytes(gzip.compress(b"<p>Gzipped <b>HTML</b>.</p>"))
    assert read_file(tmp_path / "notes.md.gz").text == "# Notes\n\nGzipped markdown.\n"
    assert read_file(tmp_path / "page.html.gz").text == "Gzipped HTML."


def test_a_long_line_below_the_limit_is_split_not_refused(tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_text("word " * (MAX_LINE_CHARS // 6))
    passages = split(read_file(path), words, max_tokens=300)
    assert len(passages) > 1 and all(p.line_start == p.line_end == 1 for p in passages)
