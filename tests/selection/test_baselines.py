"""SVD baselines and the ESPACE candidates as factorizations W ≈ A·B; the two-factor rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from espace_export.calibration.gradients import sequence_statistic
from espace_export.projection.rewrite import apply_factorizations
from espace_export.selection.candidates import (
    CANDIDATES,
    autocorrelation,
    candidate_matrix,
    go_mse_matrix,
    nl_mse_matrix,
    principal_components,
    weight_autocorrelation,
)
from espace_export.selection.factorizations import (
    Factorization,
    activation_aware_svd,
    espace_projection,
    factorize,
    output_error,
    projected_output_error,
    truncated_svd,
    whitened_svd,
)


def _data(K: int = 32, N: int = 24, M: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((K, K)) * np.exp(-np.arange(K) / 4)
    X = rng.standard_normal((M, K)) @ mixing.T
    W = rng.standard_normal((K, N)) * np.exp(-np.arange(K) / 6)[::-1, None]
    return X, W


def _relative_output_error(X: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    Y = X @ W
    return float(np.sum((Y - X @ A @ B) ** 2) / np.sum(Y**2))


def test_nl_mse_candidate_matches_its_definition_on_a_hand_case() -> None:
    X = np.array([[1.0, 1.0], [0.0, 2.0]])  # XᵀX = [[1, 1], [1, 5]]
    G = np.array([[2.0, 0.0], [0.0, 1.0]])  # GᵀG = diag(4, 1)
    C_XG = sequence_statistic(X, G)  # (XᵀX GᵀG)/M², M = 2
    np.testing.assert_allclose(C_XG, np.array([[4.0, 1.0], [4.0, 5.0]]) / 4)
    C, by_magnitude = candidate_matrix("nl-mse", C_X=np.eye(2), C_XG=C_XG)
    np.testing.assert_allclose(C, np.array([[8.0, 5.0], [5.0, 10.0]]) / 4)  # XᵀXGᵀG + GᵀGXᵀX
    np.testing.assert_allclose(nl_mse_matrix(C_XG), C)
    assert by_magnitude


def test_go_mse_ordered_by_signed_eigenvalue_collapses_fidelity() -> None:
    X, W = _data()
    C = go_mse_matrix(autocorrelation(X), weight_autocorrelation(W))
    assert np.linalg.eigvalsh(C).min() < -1.0  # indefinite: large negative eigenvalues matter too
    errors = {}
    for by_magnitude in (True, False):
        P = principal_components(C, 8, by_magnitude=by_magnitude)
        errors[by_magnitude] = _relative_output_error(X, W, P, P.T @ W)
    assert errors[True] < 0.1
    assert errors[False] > 4 * errors[True]


def test_every_method_has_the_same_shape_and_whitened_svd_is_optimal() -> None:
    X, W = _data()
    C_X = autocorrelation(X)
    L = 8
    rng = np.random.default_rng(3)
    stats = {
        "C_X": C_X,
        "C_X_normalized": autocorrelation(X / np.linalg.norm(X, axis=1, keepdims=True)),
        "C_XG": sequence_statistic(X[:100], rng.standard_normal((100, 32))),
        "C_XG_normalized": np.eye(32),
    }
    errors = {}
    for method in (*CANDIDATES, "svd", "asvd", "whitened-svd"):
        f = factorize(method, W, L, **stats)
        assert f.A.shape == (32, L) and f.B.shape == (L, 24)
        errors[method] = output_error(W, f, C_X)
        assert errors[method] == pytest.approx(_relative_output_error(X, W, f.A, f.B), rel=1e-6)
    # whitened SVD minimises E‖x(W − AB)‖² over all rank-L pairs: nothing beats it on the same statistics
    assert errors["whitened-svd"] <= min(errors.values()) + 1e-9
    assert errors["svd"] > errors["whitened-svd"]


def test_truncated_svd_is_an_orthonormal_projection_and_asvd_scales_columns() -> None:
    X, W = _data()
    f = truncated_svd(W, 6)
    np.testing.assert_allclose(f.A.T @ f.A, np.eye(6), atol=1e-10)
    np.testing.assert_allclose(f.B, f.A.T @ W, atol=1e-10)  # = U_Lᵀ W: ESPACE's form with P = U_L
    asvd = activation_aware_svd(W, np.eye(32), 6)  # unit activation scale: plain SVD
    np.testing.assert_allclose(asvd.weight(), f.weight(), atol=1e-10)
    espace = espace_projection(f.A, W, "svd")
    np.testing.assert_allclose(espace.weight(), f.weight(), atol=1e-10)
    assert whitened_svd(W, np.eye(32), 6).weight() == pytest.approx(f.weight(), abs=1e-6)


def test_two_factor_rewrite_computes_A_times_B(sample_model) -> None:
    import onnxruntime as ort

    from espace_export.io.data import complete_feed, input_specs
    from graph_passes import find_projected_pairs, find_targets, weight_matrix

    path = sample_model("gpt2", "torchscript")  # Gemm layers: the stored-transposed case too
    model = onnx.load(path)
    targets = find_targets(model)[:4]
    rng = np.random.default_rng(0)
    chosen = []
    for target in targets:
        W = weight_matrix(model, target).astype(np.float64)
        C_X = autocorrelation(rng.standard_normal((200, target.K)) * rng.uniform(0.1, 3, target.K))
        chosen.append((target, whitened_svd(W, C_X, 16)))
    reference = onnx.load(path)
    from espace_export.selection.validation import WEIGHT_INPUT, node_view, with_weight_inputs

    switched = with_weight_inputs(reference, targets)
    feed = complete_feed({"input_ids": rng.integers(0, 256, (2, 9)).astype(np.int64)}, input_specs(model))
    weights = {WEIGHT_INPUT.format(i): node_view(t, f.weight()).astype(np.float32) for i, (t, f) in enumerate(chosen)}
    expected = ort.InferenceSession(switched.SerializeToString()).run(None, {**feed, **weights})[0]
    apply_factorizations(model, chosen)
    assert len(find_projected_pairs(model)) == 4
    got = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)


def test_whitened_svd_survives_rank_deficient_statistics() -> None:
    X, W = _data(M=10)  # 10 rows for K = 32: C_X is singular
    f = whitened_svd(W, autocorrelation(X), 8)
    assert np.isfinite(f.A).all() and np.isfinite(f.B).all()
    assert _relative_output_error(X, W, f.A, f.B) < 1e-3  # 10 rows span ≤ 10 directions: rank 8 nearly fits


@pytest.mark.parametrize("orthonormal", [True, False])
def test_projected_output_error_matches_the_float64_form(orthonormal: bool) -> None:
    """The streaming proxy's terms (float32 products, C·D from C·W − (C·P)·B) against output_error's float64
    ones, for an ESPACE pair and for any other P (an oblique A): the score only moves at float32 rounding."""
    X, W = _data(K=48, N=40)
    C_X = X.T @ X / len(X)
    P = principal_components(C_X, 12) if orthonormal else np.random.default_rng(3).standard_normal((48, 12))
    B = P.T @ W if orthonormal else np.linalg.lstsq(X @ P, X @ W, rcond=None)[0]
    error, energy = projected_output_error(C_X, W, P, B)
    assert energy == pytest.approx(float(np.sum(W * (C_X @ W))), rel=1e-5)
    assert error / energy == pytest.approx(output_error(W, Factorization("pair", P, B), C_X), rel=1e-4)
    assert error / energy == pytest.approx(_relative_output_error(X, W, P, B), rel=1e-4)
    assert projected_output_error(C_X, W, P, B, CP=C_X @ P) == pytest.approx((error, energy), rel=1e-4)
