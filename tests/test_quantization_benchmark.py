"""benchmarks/quantization.py's healing text from HTML documentation: the prose kept, test paragraphs kept out."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import quantization

PAGE = """<html><body><div class="sphinxsidebar"><p>Navigation text outside the body is never read here.</p></div>
<div class="body" role="main">
<h1>Title<a class="headerlink" href="#t">¶</a></h1>
<p>The <code class="docutils literal"><span class="pre">spam()</span></code> function returns an <em>egg</em>
   for every call that it receives.</p>
<div class="highlight"><pre>print("code blocks are left out of the text")</pre></div>
<table><tr><td><p>Cells of a table are left out of the healing text as well.</p></td></tr></table>
<dl><dt>class <code>Parrot</code>(plumage, voice, name, owner, cage, perch, seed)</dt>
<dd><p>A parrot that is no more and has ceased to be, and the words of the test paragraph follow it.</p></dd></dl>
<p>Too short to keep.</p>
<p>The <code class="docutils literal"><span class="pre">spam()</span></code> function returns an <em>egg</em>
   for every call that it receives.</p>
</div></body></html>
"""


def test_docs_paragraphs_keep_body_prose_in_pydoc_style_and_drop_test_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "spam.html").write_text(PAGE, encoding="utf-8")
    (tmp_path / "glossary.html").write_text(PAGE.replace("spam", "ham"), encoding="utf-8")
    test = ["Bla: a parrot that is NO more, and has ceased to be — and so on."]  # 8 words in a row, punctuation aside

    kept, dropped = quantization.docs_paragraphs(tmp_path, test)

    assert dropped == 1  # the parrot (the same paragraph on the second page is a repeat, skipped before)
    assert kept == [
        'The "spam()" function returns an *egg* for every call that it receives.',
        'class "Parrot"(plumage, voice, name, owner, cage, perch, seed)',
        'The "ham()" function returns an *egg* for every call that it receives.',
    ]  # the library before the glossary (DOCS_PARTS' order), each paragraph once, short ones and code left out


def test_docs_text_refuses_a_missing_documentation_folder(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="apt-get install python3.11-doc"):
        quantization.write_train_text(tmp_path / "train.txt", "docs", docs_dir=tmp_path / "absent")
    assert not (tmp_path / "train.txt").exists()
