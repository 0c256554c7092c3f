"""Two-factor approximations of one weight GEMM: ESPACE's projections and the SVD baselines.

Every method returns a :class:`Factorization` ``W ≈ A·B`` with A: K×L and B: L×N, so every method
produces the same two-MatMul graph ``(X·A)·B`` at the same parameter count L(K+N):

| method | A | B | minimises |
|---|---|---|---|
| ESPACE candidate (``mse`` … ``nl-mse-l2``) | P (orthonormal) | PᵀW | the candidate's objective (paper §3) |
| ``svd`` | U_L (orthonormal) | Σ_L V_Lᵀ = U_LᵀW | ‖W − AB‖_F (Eckart–Young): activation-blind |
| ``asvd`` | S⁻¹U_L | Σ_L V_Lᵀ | ‖S(W − AB)‖_F, S = diag(rms(x_k))^α, α = ½ (ASVD, Yuan et al. 2023) |
| ``whitened-svd`` | R⁻ᵀU_L | Σ_L V_Lᵀ | E‖x(W − AB)‖² exactly (SVD-LLM, Wang et al. 2024); C_X = RRᵀ |
| ``oblique`` | R⁻ᵀU_L | M·W, M = U_LᵀRᵀ | the same: an oblique projection AM (MA = I) that keeps W whole |

``oblique`` is whitened SVD written as a projection: with RᵀW = UΣVᵀ, U_LᵀRᵀW = Σ_L V_Lᵀ, so
A·(M·W) = R⁻ᵀU_L Σ_L V_Lᵀ exactly, and A·M is an oblique projector (MA = U_LᵀU_L = I). Like ESPACE's
P/PᵀW, its static factors are A and M and the second GEMM's weight is folded from the model's own W, so a
plan stores A and M only, and healing trains W whole through the static pair (``heal.attach_projections``
with ``(A, M)``). Out of the box it computes what whitened SVD computes; ``auto`` uses it in place of
whitened SVD (:data:`AUTO_METHODS`): the same score on every layer, and a result that can still be healed.

Truncated SVD is itself an orthonormal input projection (U_L U_Lᵀ W), so it fits
:func:`graph_passes.project` as is; ASVD and whitened SVD have a non-orthonormal A with B ≠ AᵀW, which
:func:`apply_factorizations` handles by rewriting with A and then storing B as the second factor.

Whitened SVD regulariser: C_X + λI with λ = 1e-6·trace(C_X)/K (relative to the mean activation energy,
so it is scale-free), raised tenfold until the Cholesky succeeds; it only matters for activations with
(near-)dead channels or fewer calibration rows than K, where the Cholesky of the plain C_X would fail."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from espace_export.selection.candidates import CANDIDATES, candidate_matrix, eigen_decomposition, uses_randomized

BASELINES = ("svd", "asvd", "whitened-svd")
OBLIQUE = ("oblique",)  # static (A, M) with B = M·W folded from the weight
METHODS = (*CANDIDATES, *BASELINES, *OBLIQUE)
PROJECTIONS = (*CANDIDATES, "svd")  # methods whose B is AᵀW (A orthonormal): B follows from A and the weight
AUTO_METHODS = (*CANDIDATES, *OBLIQUE)  # ``--method auto``: oblique scores as whitened SVD and still heals
WHITENING_REGULARISER = 1e-6


ASVD_ALPHA = 0.5


@dataclass(frozen=True)
class Factorization:
    """``W ≈ A·B``: A is K×L (the input projection), B is L×N (the folded weight).

    ``B`` is None in a factorisation read back from a plan file when it is ``AᵀW`` (the methods of
    :data:`PROJECTIONS`) or ``M·W`` (``oblique``, which carries ``M``, L×K): the rewrite folds it from the
    model's own weight, so plans stay small and the weight stays whole.
    """

    method: str
    A: np.ndarray
    B: np.ndarray | None
    M: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    def folded(self, W: np.ndarray) -> Factorization:
        """This factorisation with B, folded from the weight W when it was read back without it."""
        if self.B is not None:
            return self
        return Factorization(self.method, self.A, (self.A.T if self.M is None else self.M) @ W, self.M)

    def weight(self) -> np.ndarray:
        """The effective K×N weight A·B (what the pair computes, for validation)."""
        if self.B is None:
            raise ValueError(f"{self.method} factorisation read without B; fold AᵀW from the weight first")
        return self.A @ self.B


def espace_projection(P: np.ndarray, W: np.ndarray, method: str) -> Factorization:
    """ESPACE: A = P, B = PᵀW."""
    P = np.asarray(P, dtype=np.float64)
    return Factorization(method, P, P.T @ np.asarray(W, dtype=np.float64))


def truncated_svd(W: np.ndarray, L: int) -> Factorization:
    U, s, Vt = np.linalg.svd(np.asarray(W, dtype=np.float64), full_matrices=False)
    return Factorization("svd", U[:, :L], s[:L, None] * Vt[:L])


def _scaled_svd(method: str, W: np.ndarray, S: np.ndarray, S_inv: np.ndarray, L: int) -> Factorization:
    """Best rank-L fit of S·W, mapped back: A = S⁻¹U_L, B = Σ_L V_Lᵀ."""
    U, s, Vt = np.linalg.svd(S @ np.asarray(W, dtype=np.float64), full_matrices=False)
    return Factorization(method, S_inv @ U[:, :L], s[:L, None] * Vt[:L])


def activation_aware_svd(W: np.ndarray, C_X: np.ndarray, L: int, alpha: float = ASVD_ALPHA) -> Factorization:
    """ASVD: scale input channel k by rms(x_k)^α before the SVD (channels with large activations kept better)."""
    rms = np.sqrt(np.maximum(np.diag(C_X), 0.0))
    scale = np.power(np.maximum(rms, 1e-8 * max(float(rms.max()), 1e-30)), alpha)
    return _scaled_svd("asvd", W, np.diag(scale), np.diag(1.0 / scale), L)


def whitening(C_X: np.ndarray, *, inverse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(R, R⁻ᵀ)`` with ``C_X + λI = R Rᵀ`` (lower Cholesky; λ as in the module docstring)."""
    C = np.asarray(C_X, dtype=np.float64)
    K = C.shape[0]
    regulariser = WHITENING_REGULARISER * max(float(np.trace(C)) / K, 1e-30)
    while True:  # rank-deficient statistics (fewer rows than K) can defeat the first try: raise λ tenfold
        try:
            R = scipy.linalg.cholesky(C + regulariser * np.eye(K), lower=True)
            break
        except np.linalg.LinAlgError:
            regulariser *= 10
    return R, (scipy.linalg.solve_triangular(R.T, np.eye(K), lower=False) if inverse else None)  # type: ignore[return-value]


def whitened_svd(W: np.ndarray, C_X: np.ndarray, L: int) -> Factorization:
    """SVD-LLM-style: with C_X + λI = R Rᵀ (Cholesky), E‖x(W − AB)‖² = ‖Rᵀ(W − AB)‖_F², minimised by the
    truncated SVD of RᵀW (through the randomized eigensolver when it is in force for this size)."""
    if uses_randomized(np.shape(C_X)[0], L):
        return _whitened_svd_randomized(np.asarray(W, dtype=np.float64), whitening(C_X, inverse=False)[0], L)
    R, R_inv_T = whitening(C_X)
    return _scaled_svd("whitened-svd", W, R.T, R_inv_T, L)


def _whitened_svd_randomized(W: np.ndarray, R: np.ndarray, L: int) -> Factorization:
    """Whitened SVD through the eigensolver in force: the leading left singular vectors U_L of M = RᵀW are
    the top eigenvectors of the PSD K×K matrix MMᵀ, and then B = Σ_L V_Lᵀ = U_LᵀM, A = R⁻ᵀU_L (one
    triangular solve with L right-hand sides instead of R⁻ᵀ in full). Squaring M squares its condition
    number, which only matters for singular values below 1e-8 of the largest: far below any kept one."""
    M = R.T @ W
    U = eigen_decomposition(M @ M.T, top=L)[1]
    A = scipy.linalg.solve_triangular(R.T, U, lower=False)
    return Factorization("whitened-svd", A, U.T @ M)


def oblique_projection(W: np.ndarray, C_X: np.ndarray, L: int) -> Factorization:
    """Whitened SVD as a static oblique projection: A = R⁻ᵀU_L (K×L), M = U_LᵀRᵀ (L×K), B = M·W.

    ``M·A = I`` and ``A·(M·W)`` equals :func:`whitened_svd`'s ``A·B``; see the module docstring.
    """
    R, R_inv_T = whitening(C_X)
    W = np.asarray(W, dtype=np.float64)
    U = np.linalg.svd(R.T @ W, full_matrices=False)[0][:, :L]
    M = U.T @ R.T
    return Factorization("oblique", R_inv_T @ U, M @ W, M)


def factorize(
    method: str,
    W: np.ndarray,
    L: int,
    *,
    C_X: np.ndarray,
    C_X_normalized: np.ndarray | None = None,
    C_XG: np.ndarray | None = None,
    C_XG_normalized: np.ndarray | None = None,
    eigenvectors: np.ndarray | None = None,
) -> Factorization:
    """The rank-L factorization of ``W`` (K×N) by ``method`` (an ESPACE candidate or a baseline).

    ``eigenvectors`` (K×≥L, leading first) may be passed for an ESPACE candidate already decomposed
    (siblings share the weight-free ones).
    """
    if method == "svd":
        return truncated_svd(W, L)
    if method == "asvd":
        return activation_aware_svd(W, C_X, L)
    if method == "whitened-svd":
        return whitened_svd(W, C_X, L)
    if method == "oblique":
        return oblique_projection(W, C_X, L)
    if eigenvectors is None:
        C, by_magnitude = candidate_matrix(
            method,  # type: ignore[arg-type]
            C_X=C_X,
            C_X_normalized=C_X_normalized,
            W=W,
            C_XG=C_XG,
            C_XG_normalized=C_XG_normalized,
        )
        eigenvectors = eigen_decomposition(C, by_magnitude=by_magnitude, top=L)[1]
    return espace_projection(np.ascontiguousarray(eigenvectors[:, :L]), W, method)


def projected_output_error(
    C_X: np.ndarray, W: np.ndarray, P: np.ndarray, B: np.ndarray, *, CP: np.ndarray | None = None
) -> tuple[float, float]:
    """``(E‖x(W − P·B)‖², E‖xW‖²)`` on the statistics ``C_X`` for the pair ``(X·P)·B``: the two terms of
    :func:`output_error` for a projected layer, from float32 products (sums in float64) and without the
    second K×K×N product: with D = W − P·B, C·D = C·W − (C·P)·B. ``CP`` = C_X·P when the caller has it
    (siblings sharing one P). At 7B width this is the cost of scoring a layer under ``--max-memory``."""
    C = np.asarray(C_X, dtype=np.float32)
    W32 = np.asarray(W, dtype=np.float32)
    P32 = np.asarray(P, dtype=np.float32)
    B32 = np.asarray(B, dtype=np.float32)
    CW = C @ W32
    CD = CW - (C @ P32 if CP is None else CP) @ B32
    D = W32 - P32 @ B32
    energy = float(np.einsum("kn,kn->", W32, CW, dtype=np.float64))
    error = float(np.einsum("kn,kn->", D, CD, dtype=np.float64))
    return max(error, 0.0), energy


def output_error(W: np.ndarray, factorization: Factorization, C_X: np.ndarray) -> float:
    """``E‖x(W − AB)‖² / E‖xW‖²``: the relative output error on the calibration statistics."""
    D = np.asarray(W, dtype=np.float64) - factorization.weight()
    energy = float(np.sum(W * (C_X @ W)))
    return float(np.sum(D * (C_X @ D))) / energy if energy > 0 else 0.0
