"""Visible text of an HTML page: no scripts, styles or navigation, with the source line of every piece of text.

Where the page marks its main content (`<main>` or `role="main"`, as Sphinx and most site generators do), only that
is kept. Otherwise the body is kept minus elements that are navigation by tag (`nav`, `header`, `footer`, `aside`),
by ARIA role or by a conventional class name (`menu`, `sidebar`, `breadcrumb`...). Block elements end a line or a
paragraph, so the splitter sees the page's paragraphs; whitespace is collapsed except inside `<pre>`.
"""

import re
from html.parser import HTMLParser

# Never text: their content is code, styling or metadata.
_INVISIBLE = frozenset({"script", "style", "noscript", "template", "svg", "math", "head", "iframe", "object",
                        "canvas", "select", "button"})
_NAVIGATION = frozenset({"nav", "header", "footer", "aside", "form"})
_NAV_ROLES = frozenset({"navigation", "banner", "contentinfo", "search", "complementary", "menu", "menubar"})
_NAV_CLASSES = frozenset({"nav", "navbar", "navigation", "menu", "mainmenu", "submenu", "sidebar", "breadcrumb",
                          "breadcrumbs", "footer", "header", "related", "nosearch", "toc", "skip-link",
                          "headerlink"})
# Elements without an end tag: they never open a region to skip.
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                   "wbr"})
_PARAGRAPH = frozenset({"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
                        "blockquote", "table", "ul", "ol", "dl", "figure", "figcaption", "details", "summary",
                        "hr", "body"})
_LINE = frozenset({"br", "li", "tr", "dt", "dd", "caption"})
_SPACES = re.compile(r"\s+")


def visible_text(html: str) -> tuple[str, list[tuple[int, int]]]:
    """(text, marks): the page's visible text, and (offset in text, 1-based source line) for each piece of it,
    in order, so a span of the text can be cited by the lines of the HTML file it came from."""
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    return parser.result()


def _is_navigation(tag: str, attrs: dict) -> bool:
    if tag in _NAVIGATION or "hidden" in attrs or attrs.get("aria-hidden") == "true":
        return True
    if (attrs.get("role") or "").lower() in _NAV_ROLES:
        return True
    classes = (attrs.get("class") or "").lower().split()
    return any(c in _NAV_CLASSES or c.endswith(("sidebar", "menu")) for c in classes)


class _Extractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.skip: tuple[str, int] | None = None   # (tag that opened the skipped region, its nesting depth)
        self.pre = 0
        self.main_depth = 0            # > 0 inside the main content element
        self.main_tag: str | None = None
        # Two outputs: all visible text, and the text inside main content; the latter wins if there is any.
        self.out = {False: _Output(), True: _Output()}

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            return self.handle_startendtag(tag, attrs)
        attrs = dict(attrs)
        if self.skip:
            if tag == self.skip[0]:
                self.skip = (tag, self.skip[1] + 1)
            return
        if tag in _INVISIBLE or _is_navigation(tag, attrs):
            self.skip = (tag, 1)
            return
        if self.main_tag is None and (tag == "main" or attrs.get("role") == "main"):
            self.main_tag, self.main_depth = tag, 1
        elif self.main_depth and tag == self.main_tag:
            self.main_depth += 1
        if tag == "pre":
            self.pre += 1
        self.brk(tag)

    def handle_startendtag(self, tag, attrs):
        if not self.skip:
            self.brk(tag)

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[0]:
                depth = self.skip[1] - 1
                self.skip = (tag, depth) if depth else None
            return
        self.brk(tag)
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag == self.main_tag and self.main_depth:
            self.main_depth -= 1

    def handle_data(self, data):
        if self.skip:
            return
        line = self.getpos()[0]
        for out in self.targets():
            out.add(data, line, keep_spaces=self.pre > 0)

    def brk(self, tag: str):
        kind = 2 if tag in _PARAGRAPH else 1 if tag in _LINE else 0
        if kind:
            for out in self.targets():
                out.newlines = max(out.newlines, kind)

    def targets(self):
        return (self.out[False], self.out[True]) if self.main_depth else (self.out[False],)

    def result(self) -> tuple[str, list[tuple[int, int]]]:
        out = self.out[True] if self.out[True].parts else self.out[False]
        return "".join(out.parts), out.marks


class _Output:
    """Text being assembled, with pending line breaks and the source-line marks."""

    def __init__(self):
        self.parts: list[str] = []
        self.marks: list[tuple[int, int]] = []
        self.size = 0
        self.newlines = 0      # breaks owed before the next text: 0, 1 (line) or 2 (paragraph)
        self.space = False     # a collapsed space is owed before the next text

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
