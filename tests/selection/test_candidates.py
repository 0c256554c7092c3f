"""The math of ESPACE's candidates, each checked against its theorem or definition."""

from __future__ import annotations

import numpy as np
import pytest

from espace_export.selection.candidates import (
    autocorrelation,
    candidate_matrix,
    eigen_decomposition,
    go_mse_matrix,
    normalized_autocorrelation,
    normalized_weight_autocorrelation,
    principal_components,
    projection_mse,
    weight_autocorrelation,
)


def correlated_activations(rows: int = 4000, K: int = 48, seed: int = 0) -> np.ndarray:
    """Activations with a decaying spectrum and a few outlier rows, like real transformer activations."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((K, K)) * np.geomspace(3.0, 0.01, K)[None, :]
    X = rng.standard_normal((rows, K)) @ mixing.T
    X[:10] *= 40.0
    return X


def test_principal_components_are_orthonormal() -> None:
    C = autocorrelation(correlated_activations())
    for L in (1, 7, 24, 48):
        P = principal_components(C, L)
        assert P.shape == (48, L)
        np.testing.assert_allclose(P.T @ P, np.eye(L), atol=1e-12)


def test_theorem_1_mse_equals_sum_of_dropped_eigenvalues() -> None:
    X = correlated_activations()
    C = autocorrelation(X)
    eigenvalues, _ = eigen_decomposition(C)
    for L in (4, 16, 40):
        P = principal_components(C, L)
        reconstructed = X @ P @ P.T
        measured = np.mean(np.sum((X - reconstructed) ** 2, axis=1))
        dropped = eigenvalues[L:].sum()
        assert measured == pytest.approx(dropped, rel=1e-6)
        assert projection_mse(C, P) == pytest.approx(dropped, rel=1e-6)


def test_theorem_1_principal_components_beat_any_other_projection() -> None:
    X = correlated_activations()
    C = autocorrelation(X)
    best = projection_mse(C, principal_components(C, 8))
    rng = np.random.default_rng(1)
    for _ in range(20):
        Q, _ = np.linalg.qr(rng.standard_normal((48, 8)))
        assert projection_mse(C, Q) >= best


def test_corollary_2_nmse_equals_sum_of_dropped_normalized_eigenvalues() -> None:
    X = correlated_activations()
    C_hat = normalized_autocorrelation(X)
    eigenvalues, _ = eigen_decomposition(C_hat)
    P = principal_components(C_hat, 12)
    errors = np.sum((X - X @ P @ P.T) ** 2, axis=1) / np.sum(X**2, axis=1)
    assert errors.mean() == pytest.approx(eigenvalues[12:].sum(), rel=1e-6)
    # NMSE-optimal P is no worse than MSE-optimal P on the normalized error, and differs from it.
    P_mse = principal_components(autocorrelation(X), 12)
    errors_mse = np.sum((X - X @ P_mse @ P_mse.T) ** 2, axis=1) / np.sum(X**2, axis=1)
    assert errors.mean() < errors_mse.mean()


def test_weight_autocorrelations_match_their_definitions_on_a_hand_case() -> None:
    W = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])  # K=2, N=3: columns w = (1,0), (0,3), (2,0)
    np.testing.assert_allclose(weight_autocorrelation(W), [[5 / 3, 0], [0, 3]])
    # mean of w wᵀ/‖w‖²: (1,0)->e1e1ᵀ, (0,3)->e2e2ᵀ, (2,0)->e1e1ᵀ
    np.testing.assert_allclose(normalized_weight_autocorrelation(W), [[2 / 3, 0], [0, 1 / 3]])


def test_go_mse_matrix_matches_its_definition() -> None:
    C_X = np.array([[2.0, 1.0], [1.0, 1.0]])
    C_W = np.array([[1.0, 0.0], [0.0, 3.0]])
    expected = C_X @ C_W + C_W @ C_X  # [[4, 4], [4, 6]]
    np.testing.assert_allclose(go_mse_matrix(C_X, C_W), [[4.0, 4.0], [4.0, 6.0]])
    np.testing.assert_allclose(go_mse_matrix(C_X, C_W), expected)


def test_go_mse_expectation_equals_product_form_for_independent_data() -> None:
    """E[xxᵀwwᵀ + wwᵀxxᵀ] over all (x, w) pairs equals C_X C_W + C_W C_X (appendix A.4)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 5))
    W = rng.standard_normal((5, 7))
    direct = np.zeros((5, 5))
    for x in X:
        for w in W.T:
            direct += np.outer(x, x) @ np.outer(w, w) + np.outer(w, w) @ np.outer(x, x)
    direct /= X.shape[0] * W.shape[1]
    np.testing.assert_allclose(go_mse_matrix(autocorrelation(X), weight_autocorrelation(W)), direct, rtol=1e-10)


def test_go_mse_ranks_by_magnitude() -> None:
    C, by_magnitude = candidate_matrix("go-mse", C_X=np.diag([1.0, 2.0]), C_X_normalized=np.eye(2), W=np.eye(2))
    assert by_magnitude
    values, _ = eigen_decomposition(np.diag([1.0, -5.0, 3.0]), by_magnitude=True)
    np.testing.assert_allclose(values, [-5.0, 3.0, 1.0])


@pytest.mark.parametrize("by_magnitude", [False, True])
def test_subset_eigen_solver_matches_full_decomposition(by_magnitude: bool) -> None:
    rng = np.random.default_rng(5)
    A = rng.standard_normal((200, 200))
    C = A + A.T  # indefinite
    full_values, full_vectors = eigen_decomposition(C, by_magnitude=by_magnitude)
    top_values, top_vectors = eigen_decomposition(C, by_magnitude=by_magnitude, top=20)
    np.testing.assert_allclose(top_values, full_values[:20], rtol=1e-10)
    np.testing.assert_allclose(top_vectors, full_vectors[:, :20], atol=1e-8)


def test_eigen_decomposition_is_deterministic_and_survives_singular_input() -> None:
    C = np.zeros((6, 6))
    C[0, 0] = 1.0  # rank one, singular
    values, vectors = eigen_decomposition(C)
    assert values[0] == pytest.approx(1.0)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(6), atol=1e-12)
    again = eigen_decomposition(C.copy())[1]
    assert np.array_equal(vectors, again)
    assert np.all(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(6)] > 0)


def test_unknown_or_underspecified_candidates_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown candidate"):
        candidate_matrix("pca", C_X=np.eye(2), C_X_normalized=np.eye(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gradients"):
        candidate_matrix("nl-mse", C_X=np.eye(2), C_X_normalized=np.eye(2))
