"""graph_passes: every pattern is found with the right K, N and grouping; the rewrite is the projected math."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graph_passes import Projection, find_projected_pairs, find_targets, group_by_activation, project, weight_matrix
from graph_passes.find import parameter_count
from tests._graphs import HIDDEN, VOCAB, WIDE, pattern_zoo, run, zoo_feed


def random_orthonormal(K: int, L: int, seed: int) -> np.ndarray:
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((K, L)))
    return Q


def test_every_pattern_is_found_with_k_n_and_role() -> None:
    model = pattern_zoo()
    found = {t.name: t for t in find_targets(model, include_heads=True)}
    expected = {
        "layers.0.attn.q_proj": ("matmul", HIDDEN, WIDE, "block"),
        "layers.0.attn.k_proj": ("matmul", HIDDEN, WIDE, "block"),
        "MatMul_6": ("matmul", WIDE, HIDDEN, "block"),  # unnamed node: named <op>_<index>
        "lm_head": ("matmul_transposed", HIDDEN, VOCAB, "head"),
        "fc1": ("gemm", HIDDEN, WIDE, "block"),
        "fc2": ("gemm", WIDE, HIDDEN, "block"),
    }
    assert {name: (t.pattern, t.K, t.N, t.role) for name, t in found.items()} == expected
    assert found["lm_head"].weight == "E"  # the tied table itself
    assert all(t.node for t in found.values())  # the unnamed node was given a name
    for target in found.values():
        assert weight_matrix(model, target).shape == (target.K, target.N)


def test_heads_are_excluded_by_default_and_siblings_grouped() -> None:
    targets = find_targets(pattern_zoo())
    assert "lm_head" not in {t.name for t in targets}
    groups = group_by_activation(targets)
    assert [t.name for t in groups["emb"]] == ["layers.0.attn.q_proj", "layers.0.attn.k_proj"]
    assert len(groups) == 4


def test_gemm_weight_views_follow_transb() -> None:
    model = pattern_zoo()
    targets = {t.name: t for t in find_targets(model)}
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(weight_matrix(model, targets["fc1"]), stored["B1"].T)
    np.testing.assert_array_equal(weight_matrix(model, targets["fc2"]), stored["B2"])


def projected_reference(model: onnx.ModelProto, projections: list[Projection]) -> onnx.ModelProto:
    """The projected math written independently: each weight W replaced by the dense P Pᵀ W."""
    reference = copy.deepcopy(model)
    for projection in projections:
        target = projection.target
        W = weight_matrix(model, target).astype(np.float64)
        dense = (projection.P @ projection.P.T @ W).astype(np.float32)
        stored = dense.T if target.stored_transposed else dense
        if target.pattern == "matmul_transposed":  # untie: the Gather keeps E, the head gets its own weight
            node = next(n for n in reference.graph.node if n.name == target.node)
            node.input[1] = "head_dense"
            reference.graph.initializer.append(numpy_helper.from_array(dense, "head_dense"))
            continue
        for tensor in reference.graph.initializer:
            if tensor.name == target.weight:
                tensor.CopyFrom(numpy_helper.from_array(stored, target.weight))
        for node in reference.graph.node:
            if node.op_type == "Constant" and node.output[0] == target.weight:
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(stored, target.weight))
    return reference


@pytest.mark.parametrize("L", [4, 8])
def test_rewrite_equals_projected_math(L: int) -> None:
    model = pattern_zoo()
    targets = find_targets(model, include_heads=True)
    projections = [Projection(t, random_orthonormal(t.K, L, seed=i)) for i, t in enumerate(targets)]
    reference = projected_reference(model, projections)
    rewritten = project(copy.deepcopy(model), projections)
    onnx.checker.check_model(rewritten, full_check=True)
    feed = zoo_feed()
    for got, want in zip(run(rewritten, feed), run(reference, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    pairs = {p.name: p for p in find_projected_pairs(rewritten)}
    assert {name: (p.K, p.L, p.N) for name, p in pairs.items()} == {t.name: (t.K, L, t.N) for t in targets}


def test_full_rank_rewrite_reproduces_the_original() -> None:
    model = pattern_zoo()
    targets = find_targets(model, include_heads=True)
    projections = [Projection(t, random_orthonormal(t.K, t.K, seed=i)) for i, t in enumerate(targets)]
    rewritten = project(copy.deepcopy(model), projections)
    feed = zoo_feed()
    for got, want in zip(run(rewritten, feed), run(model, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rewrite_keeps_interface_and_stores_factors_not_the_product() -> None:
    model = pattern_zoo()
    targets = find_targets(model, include_heads=True)
    projections = [Projection(t, random_orthonormal(t.K, 4, seed=i)) for i, t in enumerate(targets)]
    rewritten = project(copy.deepcopy(model), projections)
    assert [i.SerializeToString() for i in rewritten.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in rewritten.graph.output] == [
        o.SerializeToString() for o in model.graph.output
    ]
    shapes = {t.name: tuple(t.dims) for t in rewritten.graph.initializer}
    # No K×N product anywhere: old weights are gone except the tied table the Gather still reads.
    assert "Wq" not in shapes and "Wk" not in shapes and "B1" not in shapes and "B2" not in shapes
    assert shapes["E"] == (VOCAB, HIDDEN)
    assert not any(n.op_type == "Constant" or n.name == "tie_transpose" for n in rewritten.graph.node)
    assert shapes["fc1.espace_PtW"] == (WIDE, 4)  # transB=1 keeps the N×L orientation
    assert shapes["fc2.espace_PtW"] == (4, HIDDEN)
    expected_params = parameter_count(model) - sum(t.K * t.N for t in targets if t.pattern != "matmul_transposed")
    expected_params += sum(4 * t.N for t in targets) + sum(4 * t.K for t in targets)
    assert parameter_count(rewritten) == expected_params


def test_siblings_with_identical_projection_share_one_matmul() -> None:
    model = pattern_zoo()
    targets = {t.name: t for t in find_targets(model)}
    P = random_orthonormal(HIDDEN, 4, seed=0)
    shared = [Projection(targets["layers.0.attn.q_proj"], P), Projection(targets["layers.0.attn.k_proj"], P)]
    rewritten = project(copy.deepcopy(model), shared)
    projecting = [n for n in rewritten.graph.node if n.name.endswith("espace_project")]
    assert len(projecting) == 1
    pairs = find_projected_pairs(rewritten)
    assert {p.name for p in pairs} == {"layers.0.attn.q_proj", "layers.0.attn.k_proj"}
    assert len({p.project_node for p in pairs}) == 1


def test_float16_model_keeps_its_dtype() -> None:
    model = pattern_zoo(dtype=np.float16)
    targets = find_targets(model)
    assert {t.dtype for t in targets} == {"float16"}
    rewritten = project(
        copy.deepcopy(model), [Projection(t, random_orthonormal(t.K, t.K, i)) for i, t in enumerate(targets)]
    )
    new = [t for t in rewritten.graph.initializer if "espace" in t.name]
    assert new and all(t.data_type == onnx.TensorProto.FLOAT16 for t in new)
    feed = zoo_feed(dtype=np.float16)
    for got, want in zip(run(rewritten, feed), run(model, feed), strict=True):
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-2, atol=2e-2)


def test_find_reads_without_changing_weights() -> None:
    model = pattern_zoo()
    before = model.SerializeToString()
    find_targets(model, include_heads=True)
    after = onnx.ModelProto()
    after.ParseFromString(before)
    assert [t.SerializeToString() for t in model.graph.initializer] == [
        t.SerializeToString() for t in after.graph.initializer
    ]


def test_bfloat16_weights_fold_in_float64_and_store_as_bfloat16() -> None:
    """ONNX Runtime's CPU provider cannot run bf16 MatMul, so this checks the stored factors numerically."""
    import ml_dtypes

    model = pattern_zoo()
    for tensor in model.graph.initializer:
        if tensor.name in ("Wq", "Wk"):
            tensor.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(ml_dtypes.bfloat16), tensor.name)
            )
    targets = {t.name: t for t in find_targets(model)}
    q = targets["layers.0.attn.q_proj"]
    assert q.dtype == "bfloat16"
    P = random_orthonormal(q.K, 8, seed=0)
    W = weight_matrix(model, q).astype(np.float64)
    rewritten = project(copy.deepcopy(model), [Projection(q, P)])
    stored = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert stored["layers.0.attn.q_proj.espace_P"].dtype == ml_dtypes.bfloat16
    folded = stored["layers.0.attn.q_proj.espace_PtW"].astype(np.float64)
    np.testing.assert_allclose(folded, P.T @ W, rtol=1e-2, atol=1e-2)  # bf16 has 8 bits of mantissa


def test_values_beyond_float16_range_warn() -> None:
    from graph_passes.project import FoldedRangeWarning

    model = pattern_zoo(dtype=np.float16)
    for tensor in model.graph.initializer:
        if tensor.name == "Wq":
            tensor.CopyFrom(numpy_helper.from_array(np.full((HIDDEN, WIDE), 30000, dtype=np.float16), "Wq"))
    q = next(t for t in find_targets(model) if t.name == "layers.0.attn.q_proj")
    P = np.zeros((HIDDEN, 1))
    P[:, 0] = 1 / np.sqrt(HIDDEN)  # sums the column: 16·30000/4 = 120000 > 65504
    with pytest.warns(FoldedRangeWarning, match="beyond float16 range"):
        project(copy.deepcopy(model), [Projection(q, P)])
