"""ESPACE's candidate projection matrices (paper §3, appendix A), as pure numpy functions.

Row-major convention (ONNX): activations X are M×K (a row x per token), weights W are K×N (a column
w per output). Every candidate is "the top-L eigenvectors of a symmetric K×K matrix", accumulated in
float64.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.linalg

CandidateName = Literal["mse", "nmse", "go-mse", "go-mse-l2", "nl-mse", "nl-mse-l2"]
CANDIDATES: tuple[CandidateName, ...] = ("mse", "nmse", "go-mse", "go-mse-l2", "nl-mse", "nl-mse-l2")
# Candidates computable from activation statistics and the weight alone (no backward pass).
FORWARD_CANDIDATES: tuple[CandidateName, ...] = ("mse", "nmse", "go-mse", "go-mse-l2")
# Candidates that need the L2-normalised activation statistics.
NORMALIZED_CANDIDATES: tuple[CandidateName, ...] = ("nmse", "go-mse-l2", "nl-mse-l2")


def autocorrelation(X: np.ndarray) -> np.ndarray:
    """``C_X = E[x xᵀ] = XᵀX / M`` over the rows of ``X`` (eq. 4)."""
    X = np.asarray(X, dtype=np.float64).reshape(-1, np.shape(X)[-1])
    return X.T @ X / X.shape[0]


def l2_normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows are dropped (they carry no direction)."""
    X = np.asarray(X, dtype=np.float64).reshape(-1, np.shape(X)[-1])
    norms = np.linalg.norm(X, axis=1)
    keep = norms > 0
    return X[keep] / norms[keep, None]


def normalized_autocorrelation(X: np.ndarray) -> np.ndarray:
    """``Ĉ_X = E[x xᵀ / ‖x‖²]`` (Corollary 2)."""
    return autocorrelation(l2_normalize_rows(X))


def weight_autocorrelation(W: np.ndarray) -> np.ndarray:
    """``C_W = W Wᵀ / N`` for W of shape K×N (appendix A.4)."""
    W = np.asarray(W, dtype=np.float64)
    return W @ W.T / W.shape[1]


def normalized_weight_autocorrelation(W: np.ndarray) -> np.ndarray:
    """``Ĉ_W``: the mean over columns w of ``w wᵀ / ‖w‖²``."""
    return autocorrelation(l2_normalize_rows(np.asarray(W, dtype=np.float64).T))


def go_mse_matrix(C_X: np.ndarray, C_W: np.ndarray) -> np.ndarray:
    """``C_X C_W + C_W C_X``: minimises the GO-MSE bound (Theorem 4). Symmetric, not PSD."""
    product = C_X @ C_W
    return product + product.T


def nl_mse_matrix(C_XG: np.ndarray) -> np.ndarray:
    """``E[XᵀX GᵀG + GᵀG XᵀX] / M²`` given the accumulated ``E[XᵀX GᵀG]/M²`` (Theorem 4, NL-MSE)."""
    return C_XG + C_XG.T


def symmetrize(C: np.ndarray) -> np.ndarray:
    C = np.asarray(C, dtype=np.float64)
    return (C + C.T) / 2


def eigen_decomposition(
    C: np.ndarray, *, by_magnitude: bool = False, top: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the symmetric ``C``, sorted descending (by ``|λ|`` if asked).

    ``top`` limits the result to the leading ``top`` pairs and, when that is at most half of K, computes
    only those (LAPACK ``syevr`` on an index subset: about half the time of a full decomposition; with
    ``by_magnitude`` both ends of the spectrum are computed, since the largest ``|λ|`` lie at either end).
    Each eigenvector's sign is fixed (largest-magnitude entry positive), so the same matrix always gives
    byte-identical projections. Never fails on singular or indefinite input: the matrix is symmetrised in
    float64 and, should LAPACK not converge, decomposed again with a tiny diagonal shift.
    """
    C = symmetrize(C)
    K = C.shape[0]
    top = K if top is None else max(1, min(top, K))
    try:
        values, vectors = _eigh(C, top, by_magnitude)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        shift = 1e-12 * max(float(np.abs(np.diag(C)).max()), 1e-300)
        values, vectors = _eigh(C + shift * np.eye(K), top, by_magnitude)
        values = values - shift
    order = np.argsort(-np.abs(values) if by_magnitude else -values, kind="stable")[:top]
    values, vectors = values[order], vectors[:, order]
    pivots = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[pivots, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return values, vectors * signs


def _eigh(C: np.ndarray, top: int, both_ends: bool) -> tuple[np.ndarray, np.ndarray]:
    K = C.shape[0]
    if 2 * top > K or (both_ends and 4 * top > K):
        return scipy.linalg.eigh(C, driver="evd")
    values, vectors = scipy.linalg.eigh(C, subset_by_index=[K - top, K - 1], driver="evr")
    if both_ends:
        low_values, low_vectors = scipy.linalg.eigh(C, subset_by_index=[0, top - 1], driver="evr")
        values = np.concatenate([low_values, values])
        vectors = np.concatenate([low_vectors, vectors], axis=1)
    return values, vectors


def principal_components(C: np.ndarray, L: int, *, by_magnitude: bool = False) -> np.ndarray:
    """``P = [v_1 | … | v_L]``: the L principal eigenvectors of ``C`` (K×L, orthonormal columns)."""
    if not 1 <= L <= C.shape[0]:
        raise ValueError(f"rank L={L} outside [1, {C.shape[0]}]")
    _, vectors = eigen_decomposition(C, by_magnitude=by_magnitude, top=L)
    return np.ascontiguousarray(vectors)


def projection_mse(C_X: np.ndarray, P: np.ndarray) -> float:
    """``E‖x − PPᵀx‖² = trace(C_X) − trace(Pᵀ C_X P)`` (appendix A.1)."""
    C_X = np.asarray(C_X, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    return float(np.trace(C_X) - np.sum((C_X @ P) * P))


def candidate_matrix(
    name: CandidateName,
    *,
    C_X: np.ndarray,
    C_X_normalized: np.ndarray | None = None,
    W: np.ndarray | None = None,
    C_XG: np.ndarray | None = None,
    C_XG_normalized: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """The K×K matrix whose top eigenvectors give candidate ``name``, and whether to rank by ``|λ|``."""
    if name == "mse":
        return C_X, False
    if name == "nmse":
        if C_X_normalized is None:
            raise ValueError("nmse needs the L2-normalised activation statistics")
        return C_X_normalized, False
    if name in ("go-mse", "go-mse-l2"):
        if W is None:
            raise ValueError(f"{name} needs the layer weight")
        if name == "go-mse":
            return go_mse_matrix(C_X, weight_autocorrelation(W)), True
        if C_X_normalized is None:
            raise ValueError("go-mse-l2 needs the L2-normalised activation statistics")
        return go_mse_matrix(C_X_normalized, normalized_weight_autocorrelation(W)), True
    if name in ("nl-mse", "nl-mse-l2"):
        C_XG_used = C_XG if name == "nl-mse" else C_XG_normalized
        if C_XG_used is None:
            raise ValueError(f"{name} needs activation gradients (a backward pass during calibration)")
        return nl_mse_matrix(C_XG_used), True
    raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")
