"""Calibration text: the whole token stream cut into windows, and tokenizer folders that ship code refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests._cli import run_cli
from tests._models import VOCAB, tiny_decoder

pytest.importorskip("transformers", reason="text calibration needs transformers")


def word_level_tokenizer(directory: Path) -> Path:
    """A real HuggingFace fast tokenizer (word level, the tiny decoder's vocabulary), saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)
    return directory


@pytest.mark.parametrize("config_name", ["tokenizer_config.json", "config.json"])
def test_tokenizer_with_custom_code_is_refused(
    tmp_path: Path, config_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(), model)
    tok = word_level_tokenizer(tmp_path / "tok")
    marker = tmp_path / "foreign-code-ran"
    (tok / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config_path = tok / config_name
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    config_path.write_text(json.dumps(config))
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"w{i % (VOCAB - 1) + 1}" for i in range(4000)))

    code, _, err = run_cli(
        [str(model), "--calib-text", str(text), "--tokenizer", str(tok), "--rank", "16", "--fast", "-q"], capsys
    )

    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and "custom Python code" in lines[0], err
    assert not marker.exists()
    assert not (tmp_path / "m.espace.onnx").exists()


def test_standard_tokenizer_still_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(), model)
    tok = word_level_tokenizer(tmp_path / "tok")
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i + j) % (VOCAB - 1) + 1}" for j in range(200)) for i in range(40)))
    code, _, err = run_cli(
        [str(model), "--calib-text", str(text), "--tokenizer", str(tok), "--seq-len", "16", "--num-batches", "4",
         "--rank", "16", "--fast", "-q"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "m.espace.onnx").exists()


@pytest.mark.parametrize("layout", ["one document per line", "paragraphs"])
def test_text_is_cut_into_full_windows_from_the_whole_stream(tmp_path: Path, layout: str) -> None:
    from espace_export.io.data import InputSpec, read_text

    tok = word_level_tokenizer(tmp_path / "tok")
    words = [f"w{i % (VOCAB - 1) + 1}" for i in range(6000)]
    documents = [" ".join(words[i : i + 30]) for i in range(0, len(words), 30)]
    text = tmp_path / "corpus.txt"
    text.write_text(("\n" if layout == "one document per line" else "\n\n").join(documents))
    specs = [
        InputSpec("input_ids", np.dtype("int64"), ("batch", "seq")),
        InputSpec("attention_mask", np.dtype("int64"), ("batch", "seq")),
    ]

    batches = read_text(text, tok, specs, batch_size=4, seq_len=64, max_batches=10)

    assert len(batches) == 10
    ids = np.concatenate([b["input_ids"] for b in batches])
    assert ids.shape == (40, 64) and (np.concatenate([b["attention_mask"] for b in batches]) == 1).all()
    # consecutive windows continue the stream: word ids cycle 1..VOCAB-1
    stream = ids.reshape(-1)
    assert np.all((np.diff(stream) == 1) | (stream[1:] == 1))


def test_short_text_gives_one_padded_window(tmp_path: Path) -> None:
    from espace_export.io.data import InputSpec, read_text

    tok = word_level_tokenizer(tmp_path / "tok")
    text = tmp_path / "short.txt"
    text.write_text("w1 w2 w3")
    specs = [
        InputSpec("input_ids", np.dtype("int64"), ("batch", "seq")),
        InputSpec("attention_mask", np.dtype("int64"), ("batch", "seq")),
    ]
    (batch,) = read_text(text, tok, specs, batch_size=4, seq_len=8, max_batches=2)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize(("seq", "separator"), [("seq", "\n\n"), (12, "\n\n"), ("seq", "\n")])
def test_document_rows_keep_each_paragraph_whole_in_its_own_row(tmp_path: Path, seq: str | int, separator: str) -> None:
    """``rows="documents"``: one row per paragraph (a long one continued in further rows), the words in order,
    nothing of the text lost; rows padded (mask 0) to their batch's longest, or to --seq-len when the graph's
    sequence dimension is fixed. A text without blank lines is one document per line."""
    from espace_export.io.data import InputSpec, read_text

    tok = word_level_tokenizer(tmp_path / "tok")
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 30, size=40)]
    paragraphs = [[(7 * p + j) % (VOCAB - 1) + 1 for j in range(n)] for p, n in enumerate(lengths)]
    text = tmp_path / "corpus.txt"
    text.write_text(separator.join(" ".join(f"w{i}" for i in words) for words in paragraphs))
    specs = [InputSpec("input_ids", np.dtype("int64"), ("batch", seq)),
             InputSpec("attention_mask", np.dtype("int64"), ("batch", seq))]  # fmt: skip

    batches = read_text(text, tok, specs, batch_size=4, seq_len=12, max_batches=1000, rows="documents")

    rows = [ids[m == 1].tolist() for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
    expected = [words[at : at + 12] for words in paragraphs for at in range(0, len(words), 12)]
    assert sorted(rows) == sorted(expected)  # every paragraph, split at 12 tokens, one row each
    for b in batches:
        mask = b["attention_mask"]
        assert (mask[:, 0] == 1).all() and (np.diff(mask, axis=1) <= 0).all()  # right-padded
        assert mask.shape[1] == 12 if seq == 12 else mask.shape[1] == mask.sum(axis=1).max()
    if seq == "seq":  # rows of like length share a batch: little padding
        assert sum(b["attention_mask"].sum() for b in batches) / sum(b["attention_mask"].size for b in batches) > 0.8


def test_builtin_texts_are_english_prose_read_without_importing() -> None:
    import sys

    from espace_export.io.data import BUILTIN_TEXTS, builtin_text, stdlib_text

    assert "antigravity" not in sys.modules  # the stdlib text parses sources: nothing is imported or run
    pydoc, stdlib, both = (builtin_text(name) for name in BUILTIN_TEXTS)
    assert "antigravity" not in sys.modules
    assert len(pydoc) > 400_000 and len(stdlib) > 1_000_000 and both == pydoc + "\n\n" + stdlib
    words = stdlib.split()
    assert sum(w.lower() in {"the", "a", "of", "to", "is"} for w in words) / len(words) > 0.05
    assert stdlib == stdlib_text.__wrapped__()  # read again: a fixed order, runs are reproducible


def test_unknown_builtin_text_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(), model)
    code, _, err = run_cli([str(model), "--calib-text", "builtin:wiki", "--tokenizer", str(tmp_path), "-q"], capsys)
    assert code == 2 and "builtin:stdlib" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_builtin_stdlib_without_sources_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sysconfig

    from espace_export.errors import EspaceError
    from espace_export.io.data import InputSpec, read_text, stdlib_text

    stdlib_text.cache_clear()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})  # a Python shipped as .pyc only
    (tmp_path / "os.pyc").write_bytes(b"\0")
    try:
        with pytest.raises(EspaceError, match="builtin:stdlib found no text") as raised:
            read_text("builtin:stdlib", word_level_tokenizer(tmp_path / "tok"),
                      [InputSpec("input_ids", np.dtype("int64"), ("b", "s"))], batch_size=1, seq_len=8, max_batches=1)  # fmt: skip
        assert "builtin:pydoc" in raised.value.fix
    finally:
        stdlib_text.cache_clear()


def test_text_rows_auto_packs_for_a_causal_lm_and_keeps_documents_for_an_encoder(tmp_path: Path) -> None:
    """``--text-rows auto``: windows cut from the stream for a graph whose first output is ``logits`` (a
    causal LM), one row per paragraph for any other (an embedding model); explicit choices win."""
    from espace_export.io.data import load_batches, resolve_text_rows
    from espace_export.options import DataOptions

    tok = word_level_tokenizer(tmp_path / "tok")
    lengths = [3, 9, 5, 11, 2, 7, 4, 10]
    paragraphs = [" ".join(f"w{(p * 5 + j) % (VOCAB - 1) + 1}" for j in range(n)) for p, n in enumerate(lengths)]
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(paragraphs))
    decoder = tiny_decoder()
    encoder = tiny_decoder()
    encoder.graph.output[0].name = encoder.graph.node[-1].output[0] = "last_hidden_state"

    def rows(model, **kw):  # type: ignore[no-untyped-def]
        kw = {"text_rows": "auto", **kw}
        data = DataOptions(calib_text=str(text), tokenizer=tok, batch_size=4, seq_len=12, holdout=0.0, **kw)
        return load_batches(model, data).calibration

    assert resolve_text_rows(decoder, "auto") == "packed" and resolve_text_rows(encoder, "auto") == "documents"
    packed = rows(decoder)
    assert all(b["attention_mask"].all() for b in packed[:-1])  # full windows from the stream
    documents = rows(encoder)
    real = sorted(int(n) for b in documents for n in b["attention_mask"].sum(axis=1))
    assert real == sorted(lengths)  # one row per paragraph
    assert [b["input_ids"].tolist() for b in rows(encoder, text_rows="packed")] == [
        b["input_ids"].tolist() for b in packed
    ]
