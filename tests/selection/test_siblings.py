"""Sibling sharing: Q/K/V (and gate/up) read one activation and can share one projection (``--siblings shared``)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import espace_export
from espace_export.errors import EspaceError
from espace_export.io.artifacts import load_plan, save_plan
from espace_export.selection.candidates import candidate_matrix, eigen_decomposition
from espace_export.selection.factorizations import whitened_svd
from espace_export.selection.planner import Factorizer, plan_summary
from graph_passes import find_targets
from graph_passes.find import find_projected_pairs, group_by_activation, weight_matrix


@pytest.fixture(scope="module")
def calibrated(sample_model):
    from espace_export.calibration.collect import calibrate_model
    from espace_export.io.data import input_specs, random_token_batches

    model = onnx.load(sample_model("llama", "torchscript"))
    targets = find_targets(model)
    with pytest.warns(UserWarning):
        batches = random_token_batches(input_specs(model), 256, batch_size=2, seq_len=16, num_batches=3, seed=0)
    calibration = calibrate_model(model, targets, batches, methods=["go-mse", "whitened-svd"])
    qkv = next(group for group in group_by_activation(targets).values() if len(group) == 3)
    return model, targets, calibration, [t.name for t in qkv]


def test_a_shared_unit_is_the_factorisation_of_the_fused_weight(calibrated) -> None:
    model, targets, calibration, qkv = calibrated
    by_name = {t.name: t for t in targets}
    L = 16
    factorizer = Factorizer(model, calibration, dict.fromkeys(qkv, L), targets)
    weights = [weight_matrix(model, by_name[n]).astype(np.float64) for n in qkv]
    fused_W = np.concatenate(weights, axis=1)
    C_X = calibration.stats[by_name[qkv[0]].activation].C_X

    go = factorizer.unit(qkv, "go-mse")
    A = go[qkv[0]].A
    assert all(np.array_equal(go[n].A, A) for n in qkv)  # one projection for the group
    np.testing.assert_allclose(A.T @ A, np.eye(L), atol=1e-10)
    C, by_magnitude = candidate_matrix("go-mse", C_X=C_X, W=fused_W)  # C_W of the fused K×ΣN weight
    expected = eigen_decomposition(C, by_magnitude=by_magnitude, top=L)[1][:, :L]
    np.testing.assert_allclose(np.abs(A.T @ expected), np.eye(L), atol=1e-8)  # same subspace, signs free
    for name, W in zip(qkv, weights, strict=True):
        np.testing.assert_allclose(go[name].B, A.T @ W, atol=1e-12)  # each keeps its own PᵀW
    alone = factorizer(qkv[0], "go-mse").A  # q's own GO-MSE projection sees only q's weight: different
    assert not np.allclose(np.abs(alone.T @ A), np.eye(L), atol=1e-3)

    ws = factorizer.unit(qkv, "whitened-svd")
    reference = whitened_svd(fused_W, C_X, L)
    np.testing.assert_allclose(
        np.concatenate([ws[n].weight() for n in qkv], axis=1), reference.weight(), rtol=1e-9, atol=1e-12
    )
    # weight-free candidates do not depend on W: shared and separate P coincide at the same rank
    np.testing.assert_array_equal(factorizer.unit(qkv, "mse")[qkv[1]].A, factorizer(qkv[1], "mse").A)


def test_shared_siblings_store_one_projection_per_group_and_count_it_once(sample_model, tmp_path) -> None:
    path = sample_model("llama", "torchscript")
    result = espace_export.compress(
        path, ratio=0.5, siblings="shared", method="go-mse", num_batches=4, seq_len=16,
        output=tmp_path / "m.onnx", plan_path=tmp_path / "plan.json",
    )  # fmt: skip
    report = result.report
    assert report["siblings"] == "shared"
    model = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(model)
    pairs = find_projected_pairs(model)
    reads = {node.name: node.input[0] for node in model.graph.node if node.input}
    by_activation: dict[str, set[str]] = {}
    for pair in pairs:
        by_activation.setdefault(reads[pair.project_node], set()).add(pair.project_node)
    assert all(len(nodes) == 1 for nodes in by_activation.values())  # one X·P per activation
    groups = [layers for layers in group_by_activation(find_targets(onnx.load(path))).values() if len(layers) > 1]
    assert len({pair.project_node for pair in pairs}) == len(by_activation) < len(pairs)

    # the rank of a group follows the ratio rule on its fused width, and the report counts P once
    layers = {entry["name"]: entry for entry in report["layers"]}
    params = 0
    for group in groups:
        K, N = group[0].K, sum(t.N for t in group)
        L = layers[group[0].name]["L"]
        assert all(layers[t.name]["L"] == L for t in group) and L * (K + N) <= 0.5 * K * N
        assert all(layers[t.name]["shares_projection_with"] == group[0].name for t in group)
        params += L * (K + N)
    singles = [e for e in report["layers"] if e["compressed"] and "shares_projection_with" not in e]
    params += sum(e["L"] * (e["K"] + e["N"]) for e in singles)
    assert report["targeted_params_after"] == params
    plan = load_plan(tmp_path / "plan.json")
    summary = plan_summary(plan, find_targets(onnx.load(path)))
    assert summary["targeted_compression_planned"] == pytest.approx(report["targeted_compression"], abs=1e-12)
    assert summary["shared_groups"] == len(groups)
    markdown = result.report_path.with_suffix(".md").read_text()
    assert f"shared: {len(groups)} groups read one projection each" in markdown


def test_shared_siblings_at_full_rank_rewrite_exactly(sample_model, tmp_path) -> None:
    path = sample_model("llama", "dynamo")
    result = espace_export.compress(
        path, rank=10_000, siblings="shared", num_batches=3, seq_len=16, output=tmp_path / "m.onnx"
    )
    for output in result.report["fidelity"]["outputs"].values():
        assert output["relative_l2"] < 1e-5


def test_shared_groups_are_selected_together_and_round_trip(sample_model, tmp_path) -> None:
    path = sample_model("llama", "torchscript")
    result = espace_export.compress(
        path, ratio=0.3, siblings="shared", method="best", select="proxy", num_batches=4, seq_len=16,
        output=tmp_path / "m.onnx", plan_path=tmp_path / "plan.json",
    )  # fmt: skip
    plan = load_plan(tmp_path / "plan.json")
    groups: dict[str, list] = {}
    for layer in plan.layers:
        if layer.group is not None:
            groups.setdefault(layer.group, []).append(layer)
    assert groups and all(len(members) >= 2 for members in groups.values())
    for leader, members in groups.items():
        assert members[0].name == leader
        assert len({(m.selected, m.order, m.method, m.L, m.harm) for m in members}) == 1
    curve_layers = {point["layer"] for point in plan.curve[1:]}
    assert not curve_layers & {m.name for ms in groups.values() for m in ms[1:]}  # a group is one step
    assert result.targeted_compression >= 0.3 - 1e-9

    reloaded = load_plan(save_plan(plan, tmp_path / "again.json"))
    assert reloaded.as_json() == plan.as_json()
    data = json.loads((tmp_path / "again.json").read_text())
    data["layers"][1]["group"] = "no such layer"
    (tmp_path / "again.json").write_text(json.dumps(data))
    with pytest.raises(EspaceError, match="malformed .*shares the P of 'no such layer'"):
        load_plan(tmp_path / "again.json")


def test_unknown_sibling_mode_is_a_user_error(sample_model, tmp_path) -> None:
    with pytest.raises(EspaceError, match="unknown sibling mode"):
        espace_export.compress(sample_model("llama", "torchscript"), siblings="fused", output=tmp_path / "m.onnx")


def test_raising_a_rank_step_by_step_decomposes_once_per_doubling(calibrated, monkeypatch) -> None:
    """``at_rank`` (``--fill``, ``--rebalance``): the factors equal a fresh factorizer's at the new rank, and a
    weight-free method's eigenvectors are recomputed with headroom, not at every step."""
    import espace_export.selection.planner as planner

    model, targets, calibration, qkv = calibrated
    fresh = Factorizer(model, calibration, dict.fromkeys(qkv, 16), targets).unit(qkv, "mse")
    calls: list[int | None] = []
    real = planner.eigen_decomposition

    def counted(C, **kwargs):
        calls.append(kwargs.get("top"))
        return real(C, **kwargs)

    monkeypatch.setattr(planner, "eigen_decomposition", counted)
    factorizer = Factorizer(model, calibration, dict.fromkeys(qkv, 8), targets)
    factorizer.unit(qkv, "mse")
    assert calls == [8]
    for L in range(9, 17):  # eight steps up: one decomposition for 2·9 = 18 pairs covers them all
        raised = factorizer.at_rank(qkv, "mse", L)
    assert calls == [8, 18]
    for name in qkv:
        np.testing.assert_allclose(raised[name].A, fresh[name].A, atol=1e-10)
        np.testing.assert_allclose(raised[name].B, fresh[name].B, atol=1e-10)
    factorizer.at_rank(qkv, "mse", 19)
    assert calls == [8, 18, 38]
