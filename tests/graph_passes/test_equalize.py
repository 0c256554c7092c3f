"""Equalizing projected pairs for quantization: exact invariance, balanced ranges, shared projections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import espace_export
from espace_export.quantize import equalize_pairs, projected_activation_ranges
from graph_passes.equalize import (
    folded_row_max,
    hadamard_rotation,
    pair_groups,
    rescale_pairs,
    rotate_pairs,
    smoothing_scales,
)
from graph_passes.find import ConstantTable, find_projected_pairs


def _batches(count: int, seed: int, arch: str = "llama") -> list[dict[str, np.ndarray]]:
    from samples.make_models import sample_inputs

    return [sample_inputs(arch, 2, 16, seed=seed + i) for i in range(count)]


# llama: Q/K/V (and gate/up) share one X·P; gpt2: Gemm nodes whose folded weight is stored transposed
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def compressed(request, sample_model, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("equalize")
    path = sample_model(request.param, "torchscript")
    result = espace_export.compress(path, ratio=0.5, min_rank=8, num_batches=4, seq_len=16, output=out / "c.onnx")
    return request.param, result.output


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_hadamard_rotation_is_orthogonal() -> None:
    for L in (16, 12):
        H = hadamard_rotation(L)
        np.testing.assert_allclose(H.T @ H, np.eye(L), atol=1e-12)
        if L == 16:
            assert np.allclose(np.abs(H), 1 / 4)  # every axis spread evenly over all


def test_smoothing_scales_balance_activation_and_weight() -> None:
    a, w = np.array([100.0, 1.0, 0.0, 4.0]), np.array([0.5, 2.0, 1.0, 4.0])
    d = smoothing_scales(a, w, 0.5)
    np.testing.assert_allclose((a / d)[[0, 1, 3]], (w * d)[[0, 1, 3]])  # α = ½: both ranges √(a·w)
    assert d[2] == 1.0  # a dead component is left alone
    np.testing.assert_allclose(smoothing_scales(a, w, 0.0)[[0, 1, 3]], 1 / w[[0, 1, 3]])
    with pytest.raises(ValueError):
        smoothing_scales(a, w, 1.5)


@pytest.mark.filterwarnings("ignore:calibrating on random token ids")
def test_equalized_pairs_compute_the_same_function_with_balanced_ranges(compressed) -> None:
    arch, path = compressed
    model = onnx.load(str(path))
    groups = pair_groups(model)
    if arch == "llama":
        assert any(len(g.folded) == 3 for g in groups)  # Q/K/V sharing one projection: all three rescaled
    else:
        nodes = {n.name: n for n in model.graph.node}
        assert any(nodes[pair.expand_node].op_type == "Gemm" for pair in find_projected_pairs(model))
    feed, calib = _batches(1, seed=40, arch=arch)[0], _batches(3, seed=10, arch=arch)
    want = _run(model, feed)
    before = projected_activation_ranges(model, calib)
    spread_before = [a.max() / max(a.min(), 1e-30) for a in before.values()]

    equalized = onnx.ModelProto()
    equalized.CopyFrom(model)
    equalize_pairs(equalized, calib, alpha=0.5)
    np.testing.assert_allclose(_run(equalized, feed), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    after = projected_activation_ranges(equalized, calib)
    for group in pair_groups(equalized):  # α = ½: max|XP_j| = max|B_j| = √(a_j·w_j) for every component
        np.testing.assert_allclose(after[group.project_node], folded_row_max(equalized, group), rtol=1e-4)
    assert [n.name for n in equalized.graph.node] == [n.name for n in model.graph.node]
    assert {t.name for t in equalized.graph.initializer} == {t.name for t in model.graph.initializer}

    rotated = onnx.ModelProto()
    rotated.CopyFrom(model)
    rotate_pairs(rotated)
    np.testing.assert_allclose(_run(rotated, feed), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    constants = ConstantTable(rotated.graph)
    for group in pair_groups(rotated):  # P stays orthonormal under a rotation
        P = constants.array(group.projection).astype(np.float64)
        np.testing.assert_allclose(P.T @ P, np.eye(group.L), atol=1e-5)
    spread_after = [a.max() / max(a.min(), 1e-30) for a in projected_activation_ranges(rotated, calib).values()]
    assert np.median(spread_after) < np.median(spread_before)  # energy spread over the components


@pytest.mark.filterwarnings("ignore:calibrating on random token ids")
def test_a_constant_read_elsewhere_is_copied_not_changed(compressed) -> None:
    arch, path = compressed
    model = onnx.load(str(path))
    group = pair_groups(model)[0]
    original = ConstantTable(model.graph).array(group.projection)
    model.graph.node.append(onnx.helper.make_node("Identity", [group.projection], ["p_copy"], name="reader"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("p_copy", onnx.TensorProto.FLOAT, None))
    rescale_pairs(model, {group.project_node: np.full(group.L, 2.0)})
    outputs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["p_copy"], _batches(1, seed=3, arch=arch)[0]
    )
    np.testing.assert_array_equal(outputs[0], original)
    project = next(n for n in model.graph.node if n.name == group.project_node)
    np.testing.assert_allclose(ConstantTable(model.graph).array(project.input[1]), original / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        rescale_pairs(model, {group.project_node: -np.ones(group.L)})
    with pytest.raises(ValueError, match="no projected pair"):
        rescale_pairs(model, {"missing": np.ones(group.L)})


def test_a_gemm_with_its_folded_weight_stored_transposed() -> None:
    from graph_passes.project import _tag

    rng = np.random.default_rng(0)
    K, L, N = 8, 4, 6
    P, B = np.linalg.qr(rng.standard_normal((K, L)))[0].astype(np.float32), rng.standard_normal((L, N))
    project = onnx.helper.make_node("MatMul", ["x", "P"], ["t"], name="project")
    expand = onnx.helper.make_node("Gemm", ["t", "Bt"], ["y"], name="expand", transB=1)
    _tag(project, "layer", "project")
    _tag(expand, "layer", "expand")
    graph = onnx.helper.make_graph(
        [project, expand], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, K])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, N])],
        [onnx.numpy_helper.from_array(P, "P"), onnx.numpy_helper.from_array(B.T.astype(np.float32).copy(), "Bt")],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    (group,) = pair_groups(model)
    assert group.folded == (("Bt", True),)
    np.testing.assert_allclose(folded_row_max(model, group), np.abs(B).max(axis=1), rtol=1e-6)
    feed = {"x": rng.standard_normal((3, K)).astype(np.float32)}
    want = _run(model, feed)
    d = np.array([1.0, 10.0, 0.1, 3.0])
    rescale_pairs(model, {"project": d})
    rotate_pairs(model)
    np.testing.assert_allclose(_run(model, feed), want, rtol=1e-5, atol=1e-5)
    stored = ConstantTable(model.graph).array("Bt")
    assert stored.shape == (N, L) and not np.allclose(stored, B.T, atol=1e-3)
