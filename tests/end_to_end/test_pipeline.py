"""End-to-end: compress sample transformers from every exporter and check the result numerically."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import espace_export
from espace_export.calibration.statistics import StatisticsSettings, collect_statistics, with_outputs
from espace_export.io.data import complete_feed, input_specs
from espace_export.runtime import ort_session
from espace_export.selection.candidates import eigen_decomposition
from graph_passes import find_projected_pairs, find_targets

ARCHS = ("llama", "llama-tied", "gpt2", "bert")
EXPORTERS = ("dynamo", "torchscript")


def run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in names})


def padded_inputs(arch: str, batch: int = 3, seq: int = 11) -> dict[str, np.ndarray]:
    from samples.make_models import sample_inputs

    return sample_inputs(arch, batch, seq)  # right-padded rows included


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_rewrite_reproduces_outputs(
    arch: str, exporter: str, sample_model: Callable[..., Path], tmp_path: Path
) -> None:
    source = sample_model(arch, exporter)
    result = espace_export.compress(
        source, output=tmp_path / "out.onnx", rank=10_000, num_batches=2, batch_size=2, seq_len=16
    )
    layers = result.report["layers"]
    assert layers and all(layer["L"] == layer["K"] for layer in layers)
    onnx.checker.check_model(str(result.output), full_check=True)
    feed = padded_inputs(arch)
    for got, want in zip(run(result.output, feed), run(source, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    # every block GEMM of the architecture was found and rewritten
    per_block = {"llama": 7, "llama-tied": 7, "gpt2": 4, "bert": 6}[arch]
    assert len(find_projected_pairs(onnx.load(str(result.output)))) == 2 * per_block


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_ratio_half_compresses_and_keeps_the_interface(
    exporter: str, sample_model: Callable[..., Path], tmp_path: Path
) -> None:
    source = sample_model("llama", exporter)
    result = espace_export.compress(source, ratio=0.5, min_rank=4, output=tmp_path / "half.onnx", num_batches=4)
    report = json.loads(result.report_path.read_text())
    for key in ("targeted_params_before", "targeted_params_after", "total_params_before", "total_params_after"):
        assert isinstance(report[key], int)
    assert report["targeted_compression"] >= 0.5
    assert report["total_params_after"] < report["total_params_before"]
    assert {"name", "K", "N", "L", "candidate"} <= set(report["layers"][0])
    fidelity = report["fidelity"]["outputs"]["logits"]
    assert 0.0 < fidelity["relative_l2"] < 1.5 and -1.0 <= fidelity["cosine_mean"] <= 1.0
    original, compressed = onnx.load(str(source)), onnx.load(str(result.output))
    assert [i.SerializeToString() for i in original.graph.input] == [
        i.SerializeToString() for i in compressed.graph.input
    ]
    assert [o.name for o in original.graph.output] == [o.name for o in compressed.graph.output]
    (logits,) = run(result.output, padded_inputs("llama", batch=2, seq=9))
    assert logits.shape == (2, 9, 256) and np.isfinite(logits).all()
    assert result.report_path.with_suffix(".md").read_text().startswith("# ESPACE compression report")


@pytest.mark.slow
def test_theorem_1_holds_on_calibrated_statistics(sample_model: Callable[..., Path]) -> None:
    """The calibrated MSE on the calibration data equals the sum of the dropped eigenvalues of C_X."""
    from samples.make_models import sample_inputs

    model = onnx.load(str(sample_model("llama", "torchscript")))
    targets = find_targets(model)
    batches = [sample_inputs("llama", 2, 16, seed=s) for s in range(3)]
    stats = collect_statistics(ort_session, model, targets, batches, StatisticsSettings(precision="float64"))
    specs = input_specs(model)
    name = targets[0].activation
    augmented = ort_session(with_outputs(model, [name], {name: onnx.TensorProto.FLOAT}))
    rows = []
    for batch in batches:
        feed = complete_feed(batch, specs)
        (x,) = augmented.run([name], feed)
        rows.append(x.reshape(-1, x.shape[-1])[feed["attention_mask"].reshape(-1).astype(bool)].astype(np.float64))
    X = np.concatenate(rows)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats[name].rows == X.shape[0] == real_tokens < 3 * 2 * 16  # padding left out
    values, vectors = eigen_decomposition(stats[name].C_X)
    for L in (8, 32):
        P = vectors[:, :L]
        mse = np.mean(np.sum((X - X @ P @ P.T) ** 2, axis=1))
        assert mse == pytest.approx(values[L:].sum(), rel=1e-6)


@pytest.mark.slow
def test_float32_products_keep_the_statistics_precise(sample_model: Callable[..., Path]) -> None:
    from samples.make_models import sample_inputs

    model = onnx.load(str(sample_model("llama", "torchscript")))
    targets = find_targets(model)
    batches = [sample_inputs("llama", 2, 32, seed=s) for s in range(2)]
    exact = collect_statistics(ort_session, model, targets, batches, StatisticsSettings(precision="float64"))
    fast = collect_statistics(ort_session, model, targets, batches, StatisticsSettings(precision="float32"))
    for name in exact:
        C64, C32 = exact[name].C_X, fast[name].C_X
        assert np.linalg.norm(C32 - C64) / np.linalg.norm(C64) < 1e-5
        P64 = eigen_decomposition(C64, top=16)[1]
        P32 = eigen_decomposition(C32, top=16)[1]
        # the 16-dimensional principal subspaces agree (cosines of principal angles ≈ 1)
        assert np.linalg.svd(P64.T @ P32, compute_uv=False).min() > 0.999


@pytest.mark.slow
def test_same_inputs_give_byte_identical_models(sample_model: Callable[..., Path], tmp_path: Path) -> None:
    source = sample_model("gpt2", "torchscript")
    first = espace_export.compress(source, output=tmp_path / "a.onnx", min_rank=4, num_batches=3)
    second = espace_export.compress(source, output=tmp_path / "b.onnx", min_rank=4, num_batches=3)
    assert first.output.read_bytes() == second.output.read_bytes()


def test_folded_values_beyond_float16_are_reported(tmp_path: Path) -> None:
    from onnx import numpy_helper

    from graph_passes.project import FoldedRangeWarning
    from tests._graphs import pattern_zoo

    model = pattern_zoo(dtype=np.float16)
    noise = np.random.default_rng(1).standard_normal((50, 16)) * 0.01
    # The forward pass stays finite (q = Σ 0.01 · 20000 ≈ 3200) while the fold overflows (Pᵀ𝟙 ≈ 4: ≈ 80000).
    for tensor in model.graph.initializer:
        if tensor.name == "Wq":  # large constant weights ...
            tensor.CopyFrom(
                numpy_helper.from_array(np.full(numpy_helper.to_array(tensor).shape, 20000, np.float16), "Wq")
            )
        if tensor.name == "E":  # ... and small activations along the all-ones direction
            tensor.CopyFrom(numpy_helper.from_array((0.01 * (1.0 + noise)).astype(np.float16), "E"))
    source = tmp_path / "fp16.onnx"
    onnx.save(model, source)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", ids=rng.integers(0, 50, (8, 5)), x2=rng.standard_normal((8, 16)).astype(np.float16))
    with pytest.warns(FoldedRangeWarning):
        result = espace_export.compress(
            source, output=tmp_path / "out.onnx", calib_data=tmp_path / "c.npz", rank=4, batch_size=2, fast=True
        )
    assert any("layers.0.attn.q_proj" in w and "float16" in w for w in result.report["warnings"])
    assert json.loads(result.report_path.read_text())["warnings"] == result.report["warnings"]


def test_overflowing_model_gives_a_clear_error(tmp_path: Path) -> None:
    from onnx import numpy_helper

    from espace_export.errors import EspaceError
    from tests._graphs import pattern_zoo

    model = pattern_zoo(dtype=np.float16)
    for tensor in model.graph.initializer:
        if tensor.name == "Wq":  # q = Σ_k x_k · 60000 overflows float16 in the original model itself
            tensor.CopyFrom(
                numpy_helper.from_array(np.full(numpy_helper.to_array(tensor).shape, 60000, np.float16), "Wq")
            )
        if tensor.name == "E":
            tensor.CopyFrom(numpy_helper.from_array(np.ones((50, 16), np.float16), "E"))
    source = tmp_path / "overflow.onnx"
    onnx.save(model, source)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", ids=rng.integers(0, 50, (8, 5)), x2=rng.standard_normal((8, 16)).astype(np.float16))
    with pytest.raises(EspaceError, match="inf/NaN during calibration"):
        espace_export.compress(
            source, output=tmp_path / "out.onnx", calib_data=tmp_path / "c.npz", rank=4, batch_size=2, fast=True
        )
    assert not (tmp_path / "out.onnx").exists()
