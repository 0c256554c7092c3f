"""Model folders in, drop-in model folders out (optimum and onnxruntime-genai layouts)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from espace_export import EspaceError, compress
from espace_export.folders import check_output_folder, output_folder, report_path_for, resolve_model_folder
from espace_export.io.data import complete_feed, input_specs
from tests._graphs import VOCAB, decoder_feeds, kv_decoder, run


def _tokenizer(folder: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(folder)


def _optimum_folder(root: Path) -> Path:
    folder = root / "optimum"
    folder.mkdir()
    onnx.save(kv_decoder(), str(folder / "model.onnx"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": VOCAB}))
    (folder / "generation_config.json").write_text("{}")
    _tokenizer(folder)
    return folder


def _genai_folder(root: Path) -> Path:
    folder = root / "genai"
    folder.mkdir()
    onnx.save(kv_decoder(), str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    config = {"model": {"decoder": {"filename": "model.onnx", "session_options": {}}, "vocab_size": VOCAB}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    _tokenizer(folder)
    return folder


def test_optimum_folder_resolves_model_and_tokenizer(tmp_path: Path) -> None:
    folder = resolve_model_folder(_optimum_folder(tmp_path))
    assert folder.kind == "optimum" and folder.model.name == "model.onnx"
    assert folder.tokenizer_dir == folder.root
    assert {p.name for p in folder.sidecars} >= {"config.json", "tokenizer.json", "generation_config.json"}


def test_folder_output_is_a_drop_in_copy(tmp_path: Path) -> None:
    source = resolve_model_folder(_optimum_folder(tmp_path))
    out = tmp_path / "compressed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with output_folder(source, out) as model_path:
            result = compress(
                source.model, rank=64, include_heads=True, output=model_path, report_path=report_path_for(out),
                calib_text="builtin:pydoc", tokenizer=source.tokenizer_dir, seq_len=8, num_batches=2, batch_size=2,
                holdout=0.0, fast=True,
            )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted([source.model.name, *(p.name for p in source.sidecars)])
    assert result.report["layers_compressed"] == 5
    original, compressed = onnx.load(str(source.model)), onnx.load(str(out / "model.onnx"))
    feed = decoder_feeds(past=2)
    for a, b in zip(run(original, feed), run(compressed, feed), strict=True):
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a)


def test_genai_folder_keeps_its_config_and_data_file_consistent(tmp_path: Path) -> None:
    source = resolve_model_folder(_genai_folder(tmp_path))
    assert source.kind == "genai" and source.data_files == ("model.onnx.data",)
    assert "model.onnx.data" not in {p.name for p in source.sidecars}
    out = tmp_path / "genai-compressed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with output_folder(source, out) as model_path:
            compress(
                source.model, ratio=0.5, min_rank=4, output=model_path, report_path=report_path_for(out),
                seq_len=8, num_batches=2, batch_size=2, holdout=0.0,
            )  # fmt: skip
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    again = resolve_model_folder(out)
    assert again.data_files and all((out / name).is_file() for name in again.data_files)
    model = onnx.load(str(out / "model.onnx"))
    outputs = run(model, complete_feed({"input_ids": np.zeros((1, 4), np.int64)}, input_specs(model)))
    assert all(np.isfinite(o).all() for o in outputs)


def test_failed_run_leaves_no_folder(tmp_path: Path) -> None:
    source = resolve_model_folder(_optimum_folder(tmp_path))
    out = tmp_path / "never"
    with pytest.raises(RuntimeError), output_folder(source, out):
        raise RuntimeError("interrupted")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_folder_errors_are_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EspaceError, match="holds no .onnx model"):
        resolve_model_folder(empty)
    several = tmp_path / "several"
    several.mkdir()
    for name in ("encoder_model.onnx", "decoder_model_a.onnx"):
        onnx.save(kv_decoder(), str(several / name))
    with pytest.raises(EspaceError, match="several models"):
        resolve_model_folder(several)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "gone.onnx"}}}))
    with pytest.raises(EspaceError, match="gone.onnx"):
        resolve_model_folder(broken)
    source = resolve_model_folder(_optimum_folder(tmp_path))
    with pytest.raises(EspaceError, match="is the input folder"):
        check_output_folder(source.root, source)
    with pytest.raises(EspaceError, match="not empty"):
        check_output_folder(several, source)


def test_folder_command_writes_its_report_beside_the_folder(tmp_path: Path, capsys) -> None:
    from tests._cli import run_cli

    source = resolve_model_folder(_optimum_folder(tmp_path))
    out = tmp_path / "compressed"
    args = [str(source.root), "--ratio", "0.5", "--min-rank", "4", "--seq-len", "8", "--num-batches", "2"]
    code, stdout, err = run_cli([*args, "--batch-size", "2", "-o", str(out)], capsys)
    assert code == 0, err
    report_path = report_path_for(out)
    assert report_path == tmp_path / "compressed.report.json" and report_path.with_suffix(".md").is_file()
    assert f"wrote {out} and {report_path}" in stdout
    # the folder holds what the loaders expect, nothing more; the report names the model where it now lies
    assert sorted(p.name for p in out.iterdir()) == sorted([source.model.name, *(p.name for p in source.sidecars)])
    assert json.loads(report_path.read_text())["output"] == str(out / "model.onnx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".compressed")]  # no temporary folder left


def test_folder_report_inside_the_output_folder_is_refused(tmp_path: Path, capsys) -> None:
    from tests._cli import run_cli

    source = resolve_model_folder(_optimum_folder(tmp_path))
    out = tmp_path / "compressed"
    code, _, err = run_cli([str(source.root), "--rank", "8", "-o", str(out), "--report", str(out / "r.json")], capsys)
    assert code == 2 and "inside the output folder" in err and err.count("\n") == 1
    assert not out.exists()
