"""``--calib-text DIR``: a folder's text files as they are and its HTML pages as their prose."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from espace_export.errors import EspaceError
from espace_export.io.text import folder_text, html_paragraphs
from tests._cli import run_cli

SPHINX = """<!DOCTYPE html><html><head><title>t</title><script>var words = "never text";</script></head><body>
<div class="sphinxsidebar" role="navigation"><p>The sidebar is the same on every page and is left out.</p></div>
<div class="body" role="main">
<h1>Spam and eggs<a class="headerlink" href="#s">¶</a></h1>
<p>The <code class="docutils literal"><span class="pre">spam()</span></code> function returns an <em>egg</em> &amp;
   a bill.</p>
<div class="highlight"><pre>print("code blocks are left out")</pre></div>
<table><tr><td><p>Table cells are left out.</p></td></tr></table>
<ul><li><p>A list item holding a paragraph.</p></li><li>A bare list item.</li></ul>
<dl><dt>class Parrot(plumage)</dt><dd><p>A parrot that is no more.</p></dd></dl>
<aside class="footnote"><p>A footnote is text.</p></aside>
</div><div class="sphinxsidebar"><p>Previous topic: the same on every page.</p></div><footer><p>Copyright lines are left out.</p></footer></body></html>"""

PLAIN = """<html><body><nav><p>Home · Docs · Blog</p></nav><header><p>Site banner</p></header>
<p>First paragraph of a page that marks no main content.</p><p>Second one, with a <br> line break.</p>
<aside><p>Aside text.</p></aside></body></html>"""


def test_html_pages_read_as_their_prose() -> None:
    assert html_paragraphs(SPHINX) == [
        "Spam and eggs",
        'The "spam()" function returns an *egg* & a bill.',
        "A list item holding a paragraph.",
        "A bare list item.",
        "class Parrot(plumage)",
        "A parrot that is no more.",
        "A footnote is text.",
    ]  # only the main content; code blocks, tables, header links, scripts and the footer out
    assert html_paragraphs(PLAIN) == [
        "First paragraph of a page that marks no main content.",
        "Second one, with a line break.",
    ]  # no main content marked: every paragraph outside navigation, banners and asides
    assert html_paragraphs(SPHINX, tags=("p", "dt")) == [
        'The "spam()" function returns an *egg* & a bill.',
        "A list item holding a paragraph.",
        "class Parrot(plumage)",
        "A parrot that is no more.",
        "A footnote is text.",
    ]


def test_a_folder_reads_its_text_and_html_files_in_path_order(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "guide").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.md").write_text("# Title\n\nMarkdown paragraph.\n", encoding="utf-8")
    (root / "a.txt").write_text("Plain text first.\n", encoding="utf-8")
    (root / "guide" / "page.html").write_text(PLAIN, encoding="utf-8")
    (root / "guide" / "script.py").write_text("print('not text')\n", encoding="utf-8")
    (root / ".git" / "notes.txt").write_text("hidden folders are skipped\n", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden files too\n", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("a linked folder is not followed\n", encoding="utf-8")
    os.symlink(outside, root / "linked")
    os.symlink(outside / "secret.txt", root / "linked.txt")

    assert folder_text(root).split("\n\n") == [
        "Plain text first.",
        "# Title",
        "Markdown paragraph.",
        "First paragraph of a page that marks no main content.",
        "Second one, with a line break.",
    ]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.py").write_text("x = 1\n")
    with pytest.raises(EspaceError, match="holds no .txt, .md, .rst, .html, .htm file"):
        folder_text(tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(EspaceError, match="hold no text"):
        folder_text(tmp_path / "empty")


def test_calibrating_on_a_folder_equals_calibrating_on_its_text(tmp_path: Path, capsys) -> None:
    """The batches read from a folder are those of one file holding its text; a folder with no text file is
    refused by compress and heal alike in one line, exit 2, nothing written."""
    pytest.importorskip("transformers", reason="text calibration needs transformers")
    import onnx

    from espace_export.io.data import InputSpec, read_text
    from tests._models import VOCAB, tiny_decoder
    from tests.io.test_text_calibration import word_level_tokenizer

    tok = word_level_tokenizer(tmp_path / "tok")
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(6):
        body = "".join(
            f"<p>{' '.join(f'w{(i * 7 + j) % (VOCAB - 1) + 1}' for j in range(5 + 9 * k))}</p>" for k in range(4)
        )
        (root / f"page{i}.html").write_text(f"<html><body><main>{body}</main></body></html>", encoding="utf-8")
    (root / "notes.txt").write_text(" ".join(f"w{j % (VOCAB - 1) + 1}" for j in range(300)), encoding="utf-8")
    flat = tmp_path / "flat.txt"
    flat.write_text(folder_text(root), encoding="utf-8")
    specs = [InputSpec("input_ids", np.dtype("int64"), ("batch", "seq")),
             InputSpec("attention_mask", np.dtype("int64"), ("batch", "seq"))]  # fmt: skip
    for rows in ("documents", "packed"):
        a = read_text(root, tok, specs, batch_size=4, seq_len=16, max_batches=6, rows=rows)
        b = read_text(flat, tok, specs, batch_size=4, seq_len=16, max_batches=6, rows=rows)
        assert len(a) == len(b) > 1
        for x, y in zip(a, b, strict=True):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])

    model = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(), model)
    code, _, err = run_cli([str(model), "--calib-text", str(root), "--tokenizer", str(tok), "--seq-len", "16",
                            "--num-batches", "4", "--rank", "16", "--fast", "-q"], capsys)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "m.espace.onnx").exists()
    empty = tmp_path / "nothing"
    empty.mkdir()
    for command in ([str(model), "--rank", "16"], ["heal", str(model), "--plan", str(tmp_path / "m.espace.onnx")]):
        out = tmp_path / "refused.onnx"
        code, _, err = run_cli([*command, "--calib-text", str(empty), "--tokenizer", str(tok), "-o", str(out), "-q"],
                               capsys)  # fmt: skip
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
        assert code == 2 and len(lines) == 1 and "holds no .txt" in lines[0], err
        assert not out.exists()
