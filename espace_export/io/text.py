"""Calibration and healing text from a folder: plain-text files as they are, HTML pages as their prose.

``--calib-text DIR`` reads every ``.txt``, ``.md``, ``.rst``, ``.html`` and ``.htm`` file under ``DIR``
(hidden files and folders skipped, symbolic links not followed, in sorted path order), so a project's own
documentation — a Sphinx or MkDocs build, a folder of notes — is calibration and healing text as it stands.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path

from espace_export.errors import EspaceError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
HTML_SUFFIXES = (".html", ".htm")
# the elements whose text is a paragraph; the benchmark's pydoc-style text keeps ("p", "dt") alone
PARAGRAPH_TAGS = ("p", "dt", "dd", "li", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "figcaption")
# never text: code, tables, navigation and page furniture (an <aside> too, outside the main content: inside it,
# Sphinx's footnotes)
_SKIPPED = frozenset({"pre", "table", "script", "style", "nav", "header", "footer", "noscript", "svg", "form",
                      "button", "select", "textarea", "template"})  # fmt: skip
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                   "wbr"})  # fmt: skip


class HtmlProse(HTMLParser):
    """The paragraphs of an HTML page in plain text: inline code between double quotes, emphasis between stars
    (pydoc's style), code blocks, tables, navigation, header links and scripts left out. Where the page marks
    its main content (``<main>``, ``<article>``, ``role="main"``, Sphinx's ``div.body``) only that is read
    (sidebars, menus and previous/next links are the same on every page); :attr:`paragraphs` after
    :meth:`close`."""

    def __init__(self, tags: Sequence[str] = PARAGRAPH_TAGS) -> None:
        super().__init__(convert_charrefs=True)
        self.tags = frozenset(tags)
        self._main: list[str] = []
        self._other: list[str] = []
        self._parts: list[str] | None = None
        self._open: list[str] = []  # the paragraph elements open, innermost last
        self._skip = 0
        self._main_depth = 0  # open elements since the main content began (0: outside it)

    @property
    def paragraphs(self) -> list[str]:
        return list(self._main or self._other)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            return
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        if self._main_depth:
            self._main_depth += 1
        elif tag in ("main", "article") or values.get("role") == "main" or (tag == "div" and "body" in classes):
            self._main_depth = 1
        aside = tag == "aside" and not self._main_depth
        if self._skip or tag in _SKIPPED or aside or "headerlink" in classes:
            self._skip += 1
            return
        if tag in self.tags:
            self._flush()  # a paragraph inside another (a <p> in an <li>): the outer one's text so far stands alone
            self._open.append(tag)
            self._parts = []
        elif self._parts is not None and tag == "code":
            self._parts.append('"')
        elif self._parts is not None and tag == "em":
            self._parts.append("*")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if self._skip:
            self._skip -= 1
        elif tag in self.tags and tag in self._open:
            self._flush()
            while self._open and self._open.pop() != tag:
                pass
            self._parts = [] if self._open else None  # the rest of an outer paragraph goes on
        elif self._parts is not None and tag == "code":
            self._parts.append('"')
        elif self._parts is not None and tag == "em":
            self._parts.append("*")
        if self._main_depth:
            self._main_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._parts is not None and not self._skip:
            self._parts.append(data)

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        if self._parts is None:
            return
        text = " ".join("".join(self._parts).split())
        self._parts = []
        if text:
            (self._main if self._main_depth else self._other).append(text)


def html_paragraphs(markup: str, tags: Sequence[str] = PARAGRAPH_TAGS) -> list[str]:
    """The prose paragraphs of one HTML page (:class:`HtmlProse`)."""
    parser = HtmlProse(tags)
    parser.feed(markup)
    parser.close()
    return parser.paragraphs


def text_files(root: Path) -> Iterator[Path]:
    """The text and HTML files under ``root`` in sorted path order: hidden names skipped, links not followed."""
    suffixes = TEXT_SUFFIXES + HTML_SUFFIXES
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if not name.startswith(".") and name.lower().endswith(suffixes) and not path.is_symlink():
                yield path


def folder_text(root: Path) -> str:
    """Every text file's text and every HTML page's paragraphs under ``root``, blank-line separated (a
    paragraph per document for ``--text-rows documents``).

    Raises:
        EspaceError: a folder holding no such file, or none with any text.
    """
    documents: list[str] = []
    found = 0
    for path in text_files(root):
        found += 1
        content = path.read_text(encoding="utf-8", errors="replace")
        if path.name.lower().endswith(HTML_SUFFIXES):
            documents.extend(html_paragraphs(content))
        elif content.strip():
            documents.append(content.strip())
    kinds = ", ".join(TEXT_SUFFIXES + HTML_SUFFIXES)
    if not found:
        raise EspaceError(f"calibration text folder {root} holds no {kinds} file",
                          "point --calib-text at a text file or a folder of them")  # fmt: skip
    if not documents:
        raise EspaceError(f"the {found} text files under {root} hold no text", "give it some representative text")
    return "\n\n".join(documents)
