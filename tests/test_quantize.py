"""Quantization stage: ORT's quantizers on dense and ESPACE-compressed models, atomic output, user errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import espace_export
from espace_export import quantize
from espace_export.errors import EspaceError
from espace_export.quantize import quantize_model

OPS = {"int8": "MatMulInteger", "int4": "MatMulNBits", "qdq-int8": "DequantizeLinear"}


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    from samples.make_models import sample_inputs

    return [sample_inputs("llama", 2, 16, seed=seed + i) for i in range(count)]


@pytest.fixture(scope="module")
def models(sample_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("quantize")
    dense = Path(sample_model("llama", "torchscript"))
    result = espace_export.compress(dense, ratio=0.5, min_rank=16, num_batches=4, seq_len=16, output=out / "c.onnx")
    return {"dense": dense, "espace": result.output}


@pytest.mark.filterwarnings("ignore:calibrating on random token ids")
@pytest.mark.parametrize("mode", ["int8", "int4", "qdq-int8"])
@pytest.mark.parametrize("which", ["dense", "espace"])
def test_quantized_models_run_in_ort_close_to_the_float_model(models, tmp_path, mode: str, which: str) -> None:
    source = models[which]
    holdout = _batches(2, seed=50)
    result = quantize_model(source, tmp_path / "q.onnx", mode, _batches(3, seed=10), holdout_batches=holdout)
    graph = onnx.load(str(result.output))
    ops = [node.op_type for node in graph.graph.node]
    assert OPS[mode] in ops
    assert result.bytes_quantized == result.output.stat().st_size < result.bytes_float
    float_session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    quant_session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    want = float_session.run(None, holdout[0])[0].astype(np.float64)
    got = quant_session.run(None, holdout[0])[0].astype(np.float64)
    relative = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert 0 < relative < 0.2  # quantized for real, and still the same model
    (fidelity,) = result.fidelity.values()  # measured on the held-out batches by pipeline.output_fidelity
    assert fidelity["relative_l2"] > 0 and fidelity["cosine_mean"] > 0.97
    if which == "espace":  # the pair's two GEMMs are both quantized
        weights = {t.name for t in graph.graph.initializer}
        assert not any(name.endswith(("espace_P", "espace_PtW")) for name in weights)


def test_a_failed_quantization_leaves_no_file(models, tmp_path, monkeypatch) -> None:
    target = tmp_path / "q.onnx"
    target.write_bytes(b"previous")

    def broken(source: Path, output: Path, **_: object) -> None:
        output.write_bytes(b"half")
        raise RuntimeError("quantizer crashed")

    monkeypatch.setitem(quantize._QUANTIZERS, "int8", broken)
    with pytest.raises(RuntimeError):
        quantize_model(models["dense"], target, "int8")
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


def test_user_errors(models, tmp_path) -> None:
    with pytest.raises(EspaceError, match="unknown quantization"):
        quantize_model(models["dense"], tmp_path / "q.onnx", "fp3")
    with pytest.raises(EspaceError, match="calibration"):
        quantize_model(models["dense"], tmp_path / "q.onnx", "qdq-int8")
    with pytest.raises(EspaceError, match="block size"):
        quantize_model(models["dense"], tmp_path / "q.onnx", "int4", block_size=24)
    with pytest.raises(EspaceError, match="not found"):
        quantize_model(tmp_path / "missing.onnx", tmp_path / "q.onnx", "int8")
    assert not (tmp_path / "q.onnx").exists()


def test_compress_quantize_option_writes_a_quantized_model_and_reports_it(tmp_path, capsys) -> None:
    import dataclasses
    import json

    import onnxruntime as ort

    from espace_export.options import OutputOptions
    from espace_export.quantize import QUANTIZE_MODES
    from tests._cli import run_cli
    from tests._models import tiny_decoder

    field = next(f for f in dataclasses.fields(OutputOptions) if f.name == "quantize")
    assert tuple(field.metadata["choices"]) == QUANTIZE_MODES
    source, output = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(tiny_decoder(blocks=2, hidden=64, inter=128), source)
    args = [str(source), "-o", str(output), "--rank-rule", "16", "--num-batches", "4", "--seq-len", "32", "-q"]
    assert run_cli([*args, "--quantize", "int8"], capsys)[0] == 0
    assert "MatMulInteger" in {node.op_type for node in onnx.load(output).graph.node}
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["quantization"]["mode"] == "int8"
    assert report["quantization"]["bytes_quantized"] < report["quantization"]["bytes_float"]
    ort.InferenceSession(str(output))
