"""Visible text of an HTML page: no scripts, styles or navigation, with the source line of every piece of text.

The page is parsed into a tree by libxml2 (through lxml), which closes elements the way browsers do where HTML5
lets their end tags be omitted (`<li>`, `<p>`, `<td>`...). Where the page marks its main content (`<main>` or
`role="main"`, as Sphinx and most site generators do), only that is kept. Otherwise the body is kept minus elements
that are navigation by tag (`nav`, `header`, `footer`, `aside`), by ARIA role or by a conventional class name
(`menu`, `sidebar`, `breadcrumb`...), and hidden ones. Block elements end a line or a paragraph, so the splitter
sees the page's paragraphs; whitespace is collapsed except inside `<pre>`.
"""

import re

import lxml.etree

# Never text: their content is code, styling or metadata.
_INVISIBLE = frozenset({"script", "style", "noscript", "template", "svg", "math", "head", "iframe", "object",
                        "canvas", "select", "button"})
_NAVIGATION = frozenset({"nav", "header", "footer", "aside", "form"})
_NAV_ROLES = frozenset({"navigation", "banner", "contentinfo", "search", "complementary", "menu", "menubar"})
_NAV_CLASSES = frozenset({"nav", "navbar", "navigation", "menu", "mainmenu", "submenu", "sidebar", "breadcrumb",
                          "breadcrumbs", "footer", "header", "related", "nosearch", "toc", "skip-link",
                          "headerlink"})
_PARAGRAPH = frozenset({"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
                        "blockquote", "table", "ul", "ol", "dl", "figure", "figcaption", "details", "summary",
                        "hr", "body"})
_LINE = frozenset({"br", "li", "tr", "dt", "dd", "caption"})
_CELL = frozenset({"td", "th"})   # cells of a row are apart by a space, or their words would run together
_SPACES = re.compile(r"\s+")
# libxml2 drops all that follows `</html>`; browsers read it into the body (HTML5's "after after body" mode).
_HTML_END = re.compile(r"</html\s*>", re.IGNORECASE)
# libxml2 keeps line numbers in 16 bits: an element from this line on reports this line, whatever its own.
_LINE_CAP = 65535


class DamagedHTML(ValueError):
    """libxml2 could not parse the page to its end (nesting too deep...): its text would be cut short."""


def visible_text(html: str) -> tuple[str, list[tuple[int, int]]]:
    """(text, marks): the page's visible text, and (offset in text, 1-based source line) for each piece of it,
    in order, so a span of the text can be cited by the lines of the HTML file it came from."""
    root = _parse(html)
    if root is None:
        return "", []
    main = _main_content(root)
    if main is not None:
        out = _extract(main)
        if out.parts:
            return out.result()
    return _extract(root).result()


def _parse(html: str):
    """The page's root element, or None for a page without elements (blank, or only comments and a doctype)."""
    # Line numbers must be an editor's: libxml2 does not count a lone "\r" (old Mac files) as a line break.
    # A NUL is never text: libxml2 would turn it into U+FFFD.
    html = html.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
    html = _HTML_END.sub(lambda end: "\n" * end[0].count("\n"), html)   # its newlines stay, for line numbers
    # Bytes with the encoding named: lxml refuses a str that declares an encoding (`<?xml ... encoding=...?>`),
    # and the text is already decoded, so a `<meta charset>` must not decode it again.
    # huge_tree: nesting deeper than 256 levels (libxml2 2.13 and later still stop at 2048).
    parser = lxml.etree.HTMLParser(encoding="utf-8", huge_tree=True)
    try:
        root = lxml.etree.fromstring(html.encode("utf-8", "replace"), parser)
    except lxml.etree.LxmlError as exc:
        raise DamagedHTML(str(exc).partition("\n")[0] or type(exc).__name__) from None
    # The parser recovers from any malformed markup, except what makes it stop: then the rest of the page is lost.
    fatal = [e for e in parser.error_log if e.level == lxml.etree.ErrorLevels.FATAL]
    if fatal:   # libxml2's advice to "use XML_PARSE_HUGE" is for programmers: huge_tree is that already
        message = fatal[0].message.partition(" use XML_PARSE_HUGE")[0].rstrip(",")
        raise DamagedHTML(f"parsing stopped at line {fatal[0].line}: {message}")
    return root


def _main_content(root):
    """The first `<main>` or `role="main"` element that is itself shown, or None."""
    for main in root.xpath('//main | //*[@role="main"]'):
        if not any(_is_skipped(e) for e in (main, *main.iterancestors())):
            return main
    return None


def _is_skipped(element) -> bool:
    """Whether an element's content is left out: invisible, hidden or navigation."""
    if element.tag in _INVISIBLE or element.tag in _NAVIGATION:
        return True
    if element.get("hidden") is not None or element.get("aria-hidden") == "true":
        return True
    if (element.get("role") or "").lower() in _NAV_ROLES:
        return True
    classes = (element.get("class") or "").lower().split()
    return any(c in _NAV_CLASSES or c.endswith(("sidebar", "menu")) for c in classes)


def _extract(top) -> "_Output":
    """The visible text under `top`, walking its tree in document order without recursion (pages nest deeply).

    The source line of each text is a running count: set to an element's `sourceline` (the line where its start
    tag ends, so where its text begins), then advanced by the newlines of each text, shown or skipped."""
    out = _Output()
    line = 1
    # (node, inside <pre>, shown, whether its end tag is next) as in its parent; popped in document order.
    todo = [(top, False, True, False)]
    while todo:
        node, pre, shown, at_end = todo.pop()
        if at_end:   # after a node comes its tail: text of the parent that follows the node's end tag
            if shown:
                out.brk(node.tag)
            if node is not top:
                line = _text(out, node.tail, line, pre, shown)
            continue
        line = _resync(line, node.sourceline)
        todo.append((node, pre, shown, True))
        if not isinstance(node.tag, str):
            # A comment or processing instruction (CDATA too, in HTML): never text. Its sourceline is the line
            # where it ends, so its own newlines are counted already.
            continue
        inner_pre, inner_shown = pre or node.tag == "pre", shown and not _is_skipped(node)
        if inner_shown:
            out.brk(node.tag)
        line = _text(out, node.text, line, inner_pre, inner_shown)
        todo.extend((child, inner_pre, inner_shown, False) for child in reversed(node))
    return out


def _resync(line: int, sourceline: int | None) -> int:
    if sourceline is None:           # elements the parser implied (no tag in the source) have no line
        return line
    if sourceline >= _LINE_CAP:      # "this line or later": the running count knows better
        return max(line, sourceline)
    return sourceline


def _text(out: "_Output", text: str | None, line: int, pre: bool, shown: bool) -> int:
    """Add a text node if shown; the line after it either way."""
    if not text:
        return line
    if shown:
        out.add(text, line, keep_spaces=pre)
    return line + text.count("\n")


class _Output:
    """Text being assembled, with pending line breaks and the source-line marks."""

    def __init__(self):
        self.parts: list[str] = []
        self.marks: list[tuple[int, int]] = []
        self.size = 0
        self.newlines = 0      # breaks owed before the next text: 0, 1 (line) or 2 (paragraph)
        self.space = False     # a collapsed space is owed before the next text

    def brk(self, tag):
        kind = 2 if tag in _PARAGRAPH else 1 if tag in _LINE else 0
        self.newlines = max(self.newlines, kind)
        self.space = self.space or tag in _CELL

    def add(self, data: str, line: int, keep_spaces: bool):
        for i, piece in enumerate(data.split("\n")):
            if i and keep_spaces:
                self.newlines = max(self.newlines, 1)
            elif i:
                self.space = True
            if not keep_spaces:
                stripped = _SPACES.sub(" ", piece)
                if stripped[:1] == " ":
                    self.space = True
                piece = stripped.strip()
                trailing = stripped.endswith(" ") and bool(piece)
            else:
                trailing = False
            if piece:
                self.emit(piece, line + i)
            if trailing:
                self.space = True

    def emit(self, piece: str, line: int):
        if self.parts:
            if self.newlines:
                self.write("\n" * self.newlines)
            elif self.space:
                self.write(" ")
        self.newlines, self.space = 0, False
        self.marks.append((self.size, line))
        self.write(piece)

    def write(self, s: str):
        self.parts.append(s)
        self.size += len(s)

    def result(self) -> tuple[str, list[tuple[int, int]]]:
        return "".join(self.parts), self.marks
