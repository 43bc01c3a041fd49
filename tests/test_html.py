"""The HTML reader: visible text from a real parse tree (omitted end tags, as browsers read them), cited by the
HTML file's own lines."""

import pytest

from msa_cli.corpus.html import visible_text
from msa_cli.corpus.readers import UnreadableFile, read_file


def read_html(tmp_path, source: str, name: str = "page.html"):
    path = tmp_path / name
    path.write_bytes(source.encode("utf-8"))
    return read_file(path)


def cited_line(text, phrase: str) -> int:
    return text.line_at(text.text.index(phrase))


# --- omitted end tags ---------------------------------------------------------------------------------------------

def test_menu_items_without_end_tags_do_not_swallow_the_main_content(tmp_path):
    text = read_html(tmp_path, '<ul>\n<li class="menu">Home\n<li class="menu">About\n</ul>\n'
                               '<main>\n<p>The main text\nof the page.</p>\n</main>\n')
    assert text.text == "The main text of the page."
    assert cited_line(text, "The main text") == 6
    assert cited_line(text, "of the page") == 7


def test_a_navigation_paragraph_without_end_tag_ends_at_the_next_block(tmp_path):
    text = read_html(tmp_path, '<body>\n<p class="nav">Skip to content\n<div>\n<p>Body</p>\n</div>\n</body>\n')
    assert text.text == "Body"
    assert cited_line(text, "Body") == 4


@pytest.mark.parametrize("source, expected", [
    ("<p>One<p>Two<p>Three", "One\n\nTwo\n\nThree"),
    ("<ul><li>one<li>two</ul><p>after", "one\ntwo\n\nafter"),
    ("<ol><li><p>deep<li>next</ol>", "deep\n\nnext"),
    ("<table><tr><td>a<td>b<tr><td>c<td>d</table>", "a b\nc d"),
    ("<table><caption>Cap<tr><th>Name<th>Value<tr><td>x<td>1</table>", "Cap\nName Value\nx 1"),
    ("<dl><dt>term<dd>meaning<dt>other<dd>more</dl>", "term\nmeaning\nother\nmore"),
    ("<p>Hashes:\n<li>first<li>second", "Hashes:\n\nfirst\nsecond"),   # <li> closes an open <p>, as in browsers
    ("<select><option>hidden<option>too</select><p>shown", "shown"),
])
def test_omitted_end_tags_close_as_browsers_close_them(source, expected):
    assert visible_text(source)[0] == expected


def test_text_after_the_html_end_tag_is_kept(tmp_path):
    # libxml2 would drop it; browsers (and HTML5) read it into the body.
    text = read_html(tmp_path, "<html><body><p>In the body.</p>\n</body></html>\n<p>After the end.</p>\n")
    assert text.text == "In the body.\n\nAfter the end."
    assert cited_line(text, "After the end") == 3


# --- citations: the HTML file's lines ------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html>
<head>
<title>Not shown</title>
<script>
var a = 1;
var b = 2;
</script>
</head>
<body>
<!-- a comment
over two lines -->
<h1>Heading on line 13</h1>
<p
  class="intro"
>Text after a tag over three lines, on 16,
continued on 17 &amp; with an entity.
<b>Bold on 18</b> then <i>italic</i>
tail on 19.</p>
<style>
p { color: red }
</style>
<table>
<tr><td>cell on 24<td>next cell
<tr><td>row on 25
</table>
<p>Last, on 27
"""


def test_each_text_is_cited_by_its_exact_source_line(tmp_path):
    text = read_html(tmp_path, PAGE)
    for phrase, line in [("Heading on line 13", 13), ("Text after a tag", 16), ("continued on 17 & with", 17),
                         ("Bold on 18", 18), ("italic", 18), ("tail on 19", 19), ("cell on 24", 24),
                         ("next cell", 24), ("row on 25", 25), ("Last, on 27", 27)]:
        assert cited_line(text, phrase) == line, phrase
    assert "Not shown" not in text.text and "var a" not in text.text and "color" not in text.text


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_windows_and_old_mac_line_breaks_count_as_an_editor_counts_them(tmp_path, newline):
    text = read_html(tmp_path, newline.join(["<p>one</p>", "<p>two", "lines</p>", "<p>four</p>"]))
    assert text.text == "one\n\ntwo lines\n\nfour"
    assert [cited_line(text, w) for w in ("one", "two", "lines", "four")] == [1, 2, 3, 4]


def test_lines_past_libxml2s_16_bit_line_numbers_are_still_right(tmp_path):
    source = "".join(f"<p>line {n}</p>\n" for n in range(1, 70_001))
    text = read_html(tmp_path, source)
    for n in (1, 65_534, 65_535, 65_536, 70_000):
        assert cited_line(text, f"line {n}\n" if n < 70_000 else f"line {n}") == n


def test_pre_keeps_its_line_breaks_and_spaces(tmp_path):
    text = read_html(tmp_path, "<p>Before</p>\n<pre>def f():\n    return 1<br>after br\n\n  end</pre>\n<p>x   y</p>")
    assert text.text == "Before\n\ndef f():\n    return 1\nafter br\n  end\n\nx y"
    assert [cited_line(text, s) for s in ("def f", "return 1", "after br", "  end", "x y")] == [2, 3, 3, 5, 6]


# --- pages without text, and pages that are not quite HTML -----------------------------------------------------------

@pytest.mark.parametrize("source", [
    '<nav><a href="/">Home</a></nav><div class="sidebar">Links</div><footer>(c)</footer>',
    "<script>document.write('hi')</script>",
    "<!-- only a comment -->",
    "<!DOCTYPE html>\n<html><head><title>Title only</title></head><body></body></html>",
])
def test_html_without_visible_text_is_warned_about_not_counted_empty(tmp_path, source):
    with pytest.raises(UnreadableFile) as err:
        read_html(tmp_path, source)
    assert err.value.kind == "HTML without text" and err.value.warn
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source", ["", "  \n\t\n"])
def test_a_blank_html_file_is_quietly_empty(tmp_path, source):
    with pytest.raises(UnreadableFile) as err:
        read_html(tmp_path, source)
    assert err.value.kind == "empty" and not err.value.warn


def test_deep_nesting_is_read_whole_or_refused_never_cut_short(tmp_path):
    assert visible_text("<div>" * 1000 + "deep" + "</div>" * 1000 + "<p>after")[0] == "deep\n\nafter"
    # libxml2 2.14 (lxml 6) stops at 2048 levels, older ones read any depth.
    try:
        text = read_html(tmp_path, "<div>" * 50_000 + "too deep" + "</div>" * 50_000 + "<p>after")
    except UnreadableFile as err:
        assert err.kind == "damaged HTML" and err.warn
        assert "damaged HTML (parsing stopped at line 1: Excessive depth in document: 20" in str(err)
        assert "XML_PARSE_HUGE" not in str(err)
    else:
        assert text.text == "too deep\n\nafter"


@pytest.mark.parametrize("source, expected", [
    ('<?xml version="1.0" encoding="utf-8"?>\n<html><body><p>Caf\u00e9</p></body></html>', "Caf\u00e9"),
    ('<meta charset="iso-8859-1"><p>\u00e9t\u00e9</p>', "\u00e9t\u00e9"),   # the text is decoded already
    ("<p>a &amp; b&nbsp;c &lt;tag&gt; &#233;</p>", "a & b c <tag> \u00e9"),
    ("<p>a\0b</p>", "ab"),
    ("<p>kept <![CDATA[ dropped ]]> kept too</p>", "kept kept too"),   # CDATA is a comment in HTML
    ("plain text, no tags", "plain text, no tags"),
])
def test_declarations_entities_nul_and_cdata(source, expected):
    assert visible_text(source)[0] == expected


def test_hidden_and_aria_hidden_and_role_navigation_are_dropped():
    source = ('<div hidden>h</div><div aria-hidden="true">a</div><div role="Navigation">n</div>'
              '<div class="top-menu">m</div><p>shown</p>')
    assert visible_text(source)[0] == "shown"


def test_main_inside_navigation_is_not_the_main_content():
    source = '<nav><div role="main">menu main</div></nav><p>page text</p><main hidden>hidden main</main>'
    assert visible_text(source)[0] == "page text"
