"""The Fisher harm score: first-order loss changes against finite differences, zero for exact rewrites,
monotone in the rank, and the ``fisher`` selection of make_plan."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from espace_export.selection.factorizations import Factorization, factorize


@pytest.fixture(scope="module")
def llama(sample_model):
    from espace_export.io.data import input_specs, random_token_batches
    from graph_passes import find_targets

    model = onnx.load(sample_model("llama", "torchscript"))
    targets = [t for t in find_targets(model) if t.role == "block"]
    with pytest.warns(UserWarning):
        batches = random_token_batches(input_specs(model), 256, batch_size=2, seq_len=16, num_batches=3, seed=0)
    return model, targets, batches


@pytest.fixture(scope="module")
def llama_samples(llama):
    from espace_export.harm import FisherSettings, collect_fisher_samples

    model, targets, batches = llama
    return collect_fisher_samples(model, targets, batches, FisherSettings(loss="next-token"))


@pytest.fixture(scope="module")
def llama_sampled(llama):
    from espace_export.harm import collect_fisher_samples

    model, targets, batches = llama
    samples = collect_fisher_samples(model, targets, batches)
    assert samples.loss == "sampled"
    return samples


def _weight(model: onnx.ModelProto, target) -> np.ndarray:
    from graph_passes.find import weight_matrix

    return weight_matrix(model, target).astype(np.float64)


def _with_weight(model: onnx.ModelProto, target, W: np.ndarray) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    stored = W.T if target.stored_transposed else W
    for index, initializer in enumerate(changed.graph.initializer):
        if initializer.name == target.weight:
            changed.graph.initializer[index].CopyFrom(
                onnx.numpy_helper.from_array(stored.astype(np.float32), target.weight)
            )
            return changed
    raise AssertionError(f"{target.weight} not an initializer")


def _objective(model: onnx.ModelProto, batch: dict[str, np.ndarray], seed: int, labels=None) -> float:
    import torch

    from espace_export.calibration.gradients import output_loss, resolve_loss
    from espace_export.calibration.onnx_torch import TorchGraph
    from espace_export.io.data import complete_feed, input_specs

    feed = complete_feed(batch, input_specs(model))
    with torch.no_grad():
        output = next(iter(TorchGraph(model).run(feed).values()))
        if labels is not None:  # the sampled-label loss, labels drawn once from the unperturbed model
            return float(-torch.log_softmax(output.double(), -1).gather(-1, labels[..., None]).sum())
        if resolve_loss(model, "auto") == "next-token":
            return float(output_loss("next-token", output.double(), feed, seed))
        # the probe as output_loss draws it (float32), the sum in float64 so the difference is not rounding
        probe = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
        return float((probe.double() * output.double()).sum())


def test_first_order_change_matches_finite_differences(llama, llama_samples) -> None:
    from espace_export.harm import first_order_changes

    model, targets, batches = llama
    rng = np.random.default_rng(0)
    for target in (targets[0], targets[-1]):
        W = _weight(model, target)
        D = rng.standard_normal(W.shape) * 0.02 * np.abs(W).mean()
        predicted = first_order_changes(llama_samples, {target.name: D})
        assert predicted.shape == (llama_samples.sequences,) == (6,)
        # central difference of the first batch's objective (its 2 sequences) cancels the second order
        plus = _objective(_with_weight(model, target, W + D), batches[0], 0)
        minus = _objective(_with_weight(model, target, W - D), batches[0], 0)
        assert (plus - minus) / 2 == pytest.approx(predicted[:2].sum(), rel=0.03)


def test_sampled_label_loss_first_order(llama, llama_sampled) -> None:
    import torch

    from espace_export.calibration.onnx_torch import TorchGraph
    from espace_export.harm import first_order_changes, sampled_labels
    from espace_export.io.data import complete_feed, input_specs

    model, targets, batches = llama
    with torch.no_grad():
        logits = next(iter(TorchGraph(model).run(complete_feed(batches[0], input_specs(model))).values()))
    labels = sampled_labels(logits, 0)
    target = targets[2]
    W = _weight(model, target)
    D = np.random.default_rng(3).standard_normal(W.shape) * 0.02 * np.abs(W).mean()
    plus = _objective(_with_weight(model, target, W + D), batches[0], 0, labels)
    minus = _objective(_with_weight(model, target, W - D), batches[0], 0, labels)
    assert (plus - minus) / 2 == pytest.approx(first_order_changes(llama_sampled, {target.name: D})[:2].sum(), rel=0.03)


def test_harm_is_zero_for_an_exact_rewrite_positive_and_monotone_in_rank(llama, llama_samples) -> None:
    from espace_export.harm import fisher_harm
    from espace_export.selection.candidates import autocorrelation

    model, targets, _ = llama
    for target in targets[:3]:
        W = _weight(model, target)
        X = llama_samples.X[target.activation].astype(np.float64)
        C_X = autocorrelation(X)
        exact = fisher_harm(llama_samples, {target.name: W}, {target.name: factorize("mse", W, target.K, C_X=C_X)})
        assert exact < 1e-12
        harms = [
            fisher_harm(llama_samples, {target.name: W}, {target.name: factorize("mse", W, L, C_X=C_X)})
            for L in (target.K // 8, target.K // 4, target.K // 2, 3 * target.K // 4)
        ]
        assert all(h > 0 for h in harms)
        assert harms == sorted(harms, reverse=True), harms


def test_siblings_add_inside_the_square(llama, llama_samples) -> None:
    from espace_export.harm import first_order_changes, fisher_harm

    model, targets, _ = llama
    by_activation: dict[str, list] = {}
    for t in targets:
        by_activation.setdefault(t.activation, []).append(t)
    siblings = next(group for group in by_activation.values() if len(group) > 1)[:2]
    rng = np.random.default_rng(1)
    weights = {t.name: _weight(model, t) for t in siblings}
    factors = {}
    for t in siblings:
        A = np.linalg.qr(rng.standard_normal((t.K, 4)))[0]
        factors[t.name] = Factorization("svd", A, A.T @ weights[t.name])
    deltas = {n: f.weight() - weights[n] for n, f in factors.items()}
    together = first_order_changes(llama_samples, deltas)
    apart = sum(first_order_changes(llama_samples, {n: d}) for n, d in deltas.items())
    np.testing.assert_allclose(together, apart, rtol=1e-6)
    expected = 0.5 * float(np.sum(together**2)) / llama_samples.tokens
    assert fisher_harm(llama_samples, weights, factors) == pytest.approx(expected, rel=1e-9)


def test_encoder_probe_samples(sample_model) -> None:
    from espace_export.harm import FisherSettings, collect_fisher_samples, first_order_changes
    from espace_export.io.data import input_specs, random_token_batches
    from graph_passes import find_targets

    model = onnx.load(sample_model("bert", "torchscript"))
    targets = [t for t in find_targets(model) if t.role == "block"]
    with pytest.warns(UserWarning):
        batches = random_token_batches(input_specs(model), 256, batch_size=2, seq_len=12, num_batches=1, seed=0)
    assert (
        collect_fisher_samples(model, targets[:1], batches, FisherSettings(max_tokens=1)).loss == "cosine"
    )  # the default
    samples = collect_fisher_samples(model, targets, batches, FisherSettings(loss="probe", max_tokens=1))
    assert samples.loss == "probe" and samples.sequences == 2 and samples.tokens == 24
    target = targets[1]
    W = _weight(model, target)
    D = np.random.default_rng(2).standard_normal(W.shape) * 0.02 * np.abs(W).mean()
    plus = _objective(_with_weight(model, target, W + D), batches[0], 0)
    minus = _objective(_with_weight(model, target, W - D), batches[0], 0)
    assert (plus - minus) / 2 == pytest.approx(first_order_changes(samples, {target.name: D}).sum(), rel=0.03)


def _pooled_encoder() -> onnx.ModelProto:
    """Embedding → per-token GEMM → tanh → the first token of each sequence → pooler GEMM (one row per sequence)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    weights = {"emb": rng.standard_normal((20, 8)), "W1": rng.standard_normal((8, 8)) / 3,
               "W2": rng.standard_normal((8, 6)) / 3, "zero": np.array(0)}  # fmt: skip
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="/embed/Gather"),
        helper.make_node("MatMul", ["h", "W1"], ["t"], name="/layer.0/dense/MatMul"),
        helper.make_node("Tanh", ["t"], ["a"], name="/layer.0/Tanh"),
        helper.make_node("Gather", ["a", "zero"], ["cls"], name="/pool/Gather", axis=1),
        helper.make_node("MatMul", ["cls", "W2"], ["sentence_embedding"], name="/pooler/dense/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "pooled", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 6])],
        [numpy_helper.from_array(v.astype(np.int64 if k == "zero" else np.float32), k) for k, v in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_layer_reading_one_row_per_sequence_is_scored_per_sequence() -> None:
    """A pooler (one row per sequence, not one per token) beside a per-token layer: each row counts for its
    own sequence, and the first-order change matches finite differences for both."""
    from espace_export.harm import FisherSettings, collect_fisher_samples, first_order_changes
    from graph_passes import find_targets

    model = _pooled_encoder()
    targets = find_targets(model, include_heads=True)
    assert len(targets) == 2
    batch = {"input_ids": np.random.default_rng(0).integers(0, 20, (3, 7)).astype(np.int64)}
    samples = collect_fisher_samples(model, targets, [batch], FisherSettings(loss="probe"))
    assert samples.sequences == 3 and samples.tokens == 21 and samples.per_sequence
    pooler = next(t for t in targets if t.name.startswith("pooler"))
    np.testing.assert_array_equal(samples.sequence_of[pooler.activation], [0, 1, 2])
    for target in targets:
        W = _weight(model, target)
        D = np.random.default_rng(2).standard_normal(W.shape) * 0.01 * np.abs(W).mean()
        plus = _objective(_with_weight(model, target, W + D), batch, 0)
        minus = _objective(_with_weight(model, target, W - D), batch, 0)
        changes = first_order_changes(samples, {target.name: D})
        assert changes.shape == (3,) and (plus - minus) / 2 == pytest.approx(changes.sum(), rel=0.02)


def test_cosine_probe_is_the_gauss_newton_of_one_minus_cos() -> None:
    """E_z[⟨r, Δy⟩²] over the probe's draws equals Σ_rows ‖Δy⊥‖²/‖y₀‖², which is 2 Σ_rows (1 − cos(y₀ + Δy, y₀))
    to second order; a change along a row counts for nothing."""
    import torch

    from espace_export.harm import cosine_probe_loss

    rng = np.random.default_rng(0)
    y0 = torch.from_numpy(rng.standard_normal((1, 5, 16)) * np.array([1, 10, 0.1, 3, 30])[None, :, None])
    dy = torch.from_numpy(rng.standard_normal((1, 5, 16)))
    y = y0.clone().requires_grad_(True)
    draws = []
    for seed in range(4000):
        (probe,) = torch.autograd.grad(cosine_probe_loss(y, {}, seed), y)
        draws.append(float((probe * dy).sum()) ** 2)
    unit = y0 / y0.norm(dim=-1, keepdim=True)
    across = dy - (dy * unit).sum(-1, keepdim=True) * unit
    expected = float((across.norm(dim=-1) ** 2 / y0.norm(dim=-1) ** 2).sum())
    assert np.mean(draws) == pytest.approx(expected, rel=0.06)
    eps = 1e-4
    moved = y0 + eps * dy
    one_minus_cos = 1 - (moved * y0).sum(-1) / (moved.norm(dim=-1) * y0.norm(dim=-1))
    assert 2 * float(one_minus_cos.sum()) / eps**2 == pytest.approx(expected, rel=1e-3)
    (along,) = torch.autograd.grad(cosine_probe_loss(y, {}, 7), y)
    assert abs(float((along * y0).sum())) < 1e-9 * float(y0.norm())


def test_make_plan_fisher_selection(llama, llama_samples) -> None:
    from espace_export.calibration.collect import calibrate_model
    from espace_export.errors import EspaceError
    from espace_export.options import RankOptions
    from espace_export.pipeline import decide_layers
    from espace_export.selection.planner import PlanInputs, PlanSettings, make_plan

    model, targets, batches = llama
    calibration = calibrate_model(model, targets, batches, methods=["mse", "go-mse"])
    decisions = decide_layers(targets, RankOptions(ratio=0.5, rank_rule="1", min_rank=4, siblings="separate"), "mse")
    ranks = {d.target.name: d.L for d in decisions}
    inputs = PlanInputs(model, targets, ranks, calibration)
    settings = PlanSettings(0.3, ("mse", "go-mse", "svd"), select="fisher")
    with pytest.raises(EspaceError, match="fisher"):
        make_plan(inputs, settings)
    plan = make_plan(inputs, settings, fisher=llama_samples)
    assert plan.select == "fisher" and "Fisher" in plan.score_kind
    scored = [layer for layer in plan.layers if layer.scores]
    # each unit's method: the one with the least calibrated output error; its harm: that method's Fisher score
    proxy = make_plan(inputs, PlanSettings(0.3, ("mse", "go-mse", "svd"), select="proxy"))
    assert scored and all(layer.method == proxy.layer(layer.name).method for layer in scored)
    assert all(layer.harm == layer.scores[layer.method] > 0 for layer in scored)
    assert any(layer.method != min(layer.scores, key=layer.scores.get) for layer in scored) or len(scored) < 4
    ordered = sorted((layer for layer in scored if layer.order is not None), key=lambda layer: layer.order)
    assert [layer.harm for layer in ordered] == sorted(layer.harm for layer in ordered)
    assert plan.factors and set(plan.factors) == {layer.name for layer in plan.layers if layer.selected}


@pytest.mark.parametrize("select", ["proxy", "fisher"])
def test_rebalance_moves_rank_steps_only_where_the_summed_score_falls(llama, llama_samples, select: str) -> None:
    """``rebalance``: the plan keeps the ratio, the moved units' factors are refitted at their new ranks, and
    the units' scores (each recomputed here from the written factors) sum lower than with the ranks the
    selection chose — every move is paid for by a larger fall than the rises it causes."""
    from espace_export.calibration.collect import calibrate_model
    from espace_export.options import RankOptions
    from espace_export.pipeline import decide_layers
    from espace_export.selection.planner import Factorizer, PlanInputs, PlanSettings, _score, make_plan, plan_summary

    model, targets, batches = llama
    calibration = calibrate_model(model, targets, batches, methods=["mse"])
    decisions = decide_layers(targets, RankOptions(ratio=0.5, rank_rule="4", min_rank=4, siblings="separate"), "mse")
    ranks = {d.target.name: d.L for d in decisions}
    inputs = PlanInputs(model, targets, ranks, calibration)
    fisher = llama_samples if select == "fisher" else None
    plain = make_plan(inputs, PlanSettings(0.3, ("mse",), select=select), fisher=fisher)
    moved = make_plan(inputs, PlanSettings(0.3, ("mse",), select=select, fill="4", rebalance=True, min_rank=4),
                      fisher=fisher)  # fmt: skip
    steps = moved.info["rebalanced"]
    assert any(new > old for old, new in steps.values())  # the excess over the ratio at least is spent
    assert plan_summary(moved, targets)["targeted_compression_planned"] >= 0.3 - 1e-12
    assert {layer.name for layer in moved.selected_layers()} == {layer.name for layer in plain.selected_layers()}
    factorizer = Factorizer(model, calibration, {n: L for n, L in ranks.items() if L is not None}, targets)

    def summed(plan) -> float:  # type: ignore[no-untyped-def]
        total = 0.0
        for layer in plan.selected_layers():
            assert plan.factors[layer.name].A.shape[1] == layer.L
            total += _score([layer.name], {layer.name: plan.factors[layer.name]}, factorizer, select, fisher)
        return total

    assert summed(moved) < summed(plain)
    for name, (_, new) in steps.items():
        assert new == moved.layer(name).L
        assert moved.layer(name).harm == pytest.approx(
            _score([name], {name: moved.factors[name]}, factorizer, select, fisher), rel=1e-9
        )
