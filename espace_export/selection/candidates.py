"""ESPACE's candidate projection matrices (paper §3, appendix A), as pure numpy functions.

Row-major convention (ONNX): activations X are M×K (a row x per token), weights W are K×N (a column
w per output). Every candidate is "the top-L eigenvectors of a symmetric K×K matrix", accumulated in
float64.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

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
    """``(C + Cᵀ)/2`` in float64, allocating one K×K array — none when ``C`` is already an exactly symmetric
    float64 matrix, as unpacked statistics are (at K = 11008 each copy is 0.97 GB)."""
    C = np.asarray(C, dtype=np.float64)
    if np.array_equal(C, C.T):
        return C
    halved = C + C.T
    halved *= 0.5
    return halved


EigenSolver = Literal["auto", "lapack", "randomized"]
EIGEN_SOLVERS: tuple[EigenSolver, ...] = ("auto", "lapack", "randomized")
Precision = Literal["float64", "float32"]
EIG_PRECISIONS: tuple[Precision, ...] = ("float64", "float32")
# ``auto`` takes the randomized solver from this width on, when top ≤ K·RANDOMIZED_MAX_FRACTION. Measured by
# benchmarks/decompositions.py (one BLAS thread): at K = 2048-4096, top = K/8 it ran 1.3-1.6× faster than
# LAPACK in float64 (1.8-2.8× in float32), by |λ| as well as PSD; at top = K/4 LAPACK was faster in float64,
# and below K = 2048 LAPACK is fast enough and bit-reproducible.
RANDOMIZED_MIN_K = 2048
RANDOMIZED_MAX_FRACTION = 0.125


@dataclass(frozen=True)
class SolverSettings:
    """How :func:`eigen_decomposition` decomposes: ``solver`` (``auto`` | ``lapack`` | ``randomized``),
    ``device`` (``cpu``: numpy/LAPACK; a torch device such as ``cuda`` / ``cuda:1``: the same linear
    algebra in torch there; ``torch:cpu`` runs the torch code on the CPU, for tests)
    and ``precision``: ``float32`` runs the randomized iterations in float32 (the final Rayleigh–Ritz step is
    always float64, see :func:`randomized_eigh`) and LAPACK in single precision (``ssyevr``: half the time
    of ``dsyevr``; its vectors are orthonormal to ~1e-6, far finer than the fp16/fp32 the projections are
    stored in)."""

    solver: EigenSolver = "auto"
    device: str = "cpu"
    precision: Precision = "float64"


_DEFAULT_SETTINGS = SolverSettings()
_SETTINGS: contextvars.ContextVar[SolverSettings | None] = contextvars.ContextVar("eigen_solver", default=None)


@contextlib.contextmanager
def eigen_solver(
    solver: EigenSolver = "auto", *, device: str = "cpu", precision: Precision = "float64"
) -> Iterator[SolverSettings]:
    """Every :func:`eigen_decomposition` inside the block (planner, healing, baselines) uses these settings
    unless its call names its own: one switch for a whole run (the CLI's ``--eig-solver``)."""
    if solver not in EIGEN_SOLVERS:
        raise ValueError(f"unknown eigen solver {solver!r}; choose from {', '.join(EIGEN_SOLVERS)}")
    token = _SETTINGS.set(SolverSettings(solver, device, precision))
    try:
        yield solver_settings()
    finally:
        _SETTINGS.reset(token)


def solver_settings() -> SolverSettings:
    """The settings in force (see :func:`eigen_solver`)."""
    return _SETTINGS.get() or _DEFAULT_SETTINGS


def uses_randomized(K: int, top: int, solver: EigenSolver | None = None) -> bool:
    """Whether ``solver`` (default: the one in force) decomposes a K×K matrix for its ``top`` pairs
    with :func:`randomized_eigh`: always for ``randomized``, never for ``lapack``; ``auto`` from
    :data:`RANDOMIZED_MIN_K` on when ``top`` is at most :data:`RANDOMIZED_MAX_FRACTION` of K."""
    solver = solver or solver_settings().solver
    if solver not in EIGEN_SOLVERS:
        raise ValueError(f"unknown eigen solver {solver!r}; choose from {', '.join(EIGEN_SOLVERS)}")
    if solver == "auto":
        return K >= RANDOMIZED_MIN_K and top <= RANDOMIZED_MAX_FRACTION * K
    return solver == "randomized" and top < K


def eigen_decomposition(
    C: np.ndarray,
    *,
    by_magnitude: bool = False,
    top: int | None = None,
    solver: EigenSolver | None = None,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the symmetric ``C``, sorted descending (by ``|λ|`` if asked).

    ``top`` limits the result to the leading ``top`` pairs and, when that is at most half of K, computes
    only those (LAPACK ``syevr`` on an index subset: about half the time of a full decomposition; with
    ``by_magnitude`` both ends of the spectrum are computed, since the largest ``|λ|`` lie at either end).
    Each eigenvector's sign is fixed (largest-magnitude entry positive), so the same matrix always gives
    byte-identical projections. Never fails on singular or indefinite input: the matrix is symmetrised in
    float64 and, should LAPACK not converge, decomposed again with a tiny diagonal shift.

    ``solver`` / ``device`` default to the settings in force (:func:`eigen_solver`); when
    :func:`uses_randomized` says so, the leading pairs come from :func:`randomized_eigh` instead (same
    sort and sign rule; reproducible for one matrix, within its tolerance of LAPACK's). Without ``by_magnitude``
    the randomized path assumes ``C`` positive semi-definite (every by-value candidate is an autocorrelation).
    On a torch ``device`` the LAPACK path is ``torch.linalg.eigh`` there.
    """
    C = symmetrize(C)
    K = C.shape[0]
    top = K if top is None else max(1, min(top, K))
    settings = solver_settings()
    device = device or settings.device
    if uses_randomized(K, top, solver):
        iteration = RandomizedSettings(precision=settings.precision, device=device)
        result = randomized_eigh(C, top, by_magnitude=by_magnitude, settings=iteration)
        values, vectors = result.values, result.vectors
    elif device != "cpu":
        values, vectors = _torch_eigh(C, device)
    else:
        single = settings.precision == "float32"
        try:
            values, vectors = _eigh(C.astype(np.float32) if single else C, top, by_magnitude)
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            shift = 1e-12 * max(float(np.abs(np.diag(C)).max()), 1e-300)
            values, vectors = _eigh(C + shift * np.eye(K), top, by_magnitude)
            values = values - shift
        values, vectors = values.astype(np.float64), vectors.astype(np.float64)
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


def _torch_eigh(C: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    C_device = torch.as_tensor(C, dtype=torch.float64, device=device.removeprefix("torch:"))
    values, vectors = torch.linalg.eigh(C_device)
    return values.cpu().numpy(), vectors.cpu().numpy()


@dataclass(frozen=True)
class RandomizedEigen:
    """Leading eigenpairs from :func:`randomized_eigh` and the evidence for trusting them.

    ``residual``: max over the returned pairs of ‖C v − θ v‖ / max|θ| (0 for exact eigenpairs);
    ``energy_change``: the relative change of the captured energy Σ|θ| in the last iteration;
    ``deficit``: the estimated relative shortfall of the captured energy from the exact top-``top`` sum
    (the stopping rule, see :func:`randomized_eigh`); ``converged``: it fell below the tolerance before
    ``max_iter``.
    """

    values: np.ndarray
    vectors: np.ndarray
    iterations: int
    residual: float
    energy_change: float
    deficit: float
    converged: bool


@dataclass(frozen=True)
class RandomizedSettings:
    """How :func:`randomized_eigh` iterates: ``oversample`` extra block vectors (default max(16, top/4)),
    Chebyshev filter ``degree``, stopping ``tol`` on the estimated energy shortfall, ``lock_tol`` on the
    relative residual of a Ritz pair it locks, at most ``max_iter`` iterations, ``precision`` of the
    iterations, ``device`` (``cpu`` or a torch device) and the ``seed`` of the start block."""

    oversample: int | None = None
    degree: int = 4
    tol: float = 1e-5
    lock_tol: float = 1e-10
    max_iter: int = 30
    precision: Precision = "float64"
    device: str = "cpu"
    seed: int = 0


def randomized_eigh(
    C: np.ndarray, top: int, *, by_magnitude: bool = False, settings: RandomizedSettings = RandomizedSettings()
) -> RandomizedEigen:
    """The ``top`` eigenpairs of the symmetric K×K ``C`` with the largest ``|λ|``, by randomized subspace
    iteration with a Rayleigh–Ritz step every iteration (Halko, Martinsson & Tropp 2011, alg. 4.4/5.3;
    Saad, *Numerical Methods for Large Eigenvalue Problems*, §5.2).

    A block of b = top + oversample (default max(16, top/4)) Gaussian vectors (fixed ``seed``: one matrix,
    one answer) is orthonormalised and C projected on it (T = QᵀCQ, b×b); T's eigenpairs (θ, S) give the
    Ritz vectors QS, and the next block is a polynomial filter of C applied to them, orthonormalised.
    Plain subspace iteration (``degree=1``) multiplies by C once: each direction grows by |λ|, so the
    block converges to the largest-|λ| eigenvectors whatever their sign — both ends of an indefinite
    spectrum (GO-MSE, NL-MSE) come out of one run — the i-th at rate |λ_{b+1}/λ_i| per product. The
    default filter is the Chebyshev polynomial T_degree of C mapped so that the unwanted interval —
    [0, θ_b] for a PSD matrix, [−|θ_b|, |θ_b|] by magnitude, θ_b the block's smallest Ritz value — lands
    on [−1, 1], where T stays bounded by 1 while it grows like cosh(degree·acosh x) outside: the same
    number of products as ``degree`` power steps converges several times faster where λ_L ≈ λ_{b+1}
    (Zhou & Saad 2007, Chebyshev-filtered subspace iteration). Each product is K×K·K×b (BLAS-3, parallel,
    GPU-friendly), against LAPACK's memory-bound tridiagonal reduction of the whole matrix.

    Stopping rule (an a posteriori estimate): the captured energy E_k = Σ_{i≤top}|θ_i| — for a PSD C
    the Ky Fan sum, never above the exact one and rising towards it geometrically — changed by
    δ_k = |E_k − E_{k−1}|/E_k in iteration k; with the observed rate ρ = δ_k/δ_{k−1} the remaining
    shortfall is about δ_k·ρ/(1 − ρ) (taken as at least δ_k/4), and the iteration stops once that estimate is below ``tol``
    (default 1e-5, ten times inside the 1e-4 the planner needs; tests/selection/test_eigensolver.py checks the
    captured energy against LAPACK's on decaying spectra and on real statistics).

    ``precision="float32"``: the iterations run on a float32 copy of C (half the memory traffic and
    flops); a final Rayleigh–Ritz step in float64 on the original C then gives float64 Ritz values and
    orthonormal vectors for the float32-found subspace. ``device`` other than ``cpu``: the same steps in
    torch on that device (``cuda``), C copied there once.
    """
    C = np.asarray(C, dtype=np.float64)
    K = C.shape[0]
    if not 1 <= top <= K:
        raise ValueError(f"top={top} outside [1, {K}]")
    oversample = settings.oversample if settings.oversample is not None else max(16, math.ceil(0.25 * top))
    ops = _LinearAlgebra(settings.device)
    working = np.float32 if settings.precision == "float32" else np.float64
    C_iter = ops.array(C, working)
    start = np.random.default_rng(settings.seed).standard_normal((K, min(K, top + oversample)))
    # a tall Gaussian block is well conditioned (κ ≈ (√K + √b)/(√K − √b)): Cholesky-QR, not Householder's panels
    step = _rayleigh_ritz(ops, C_iter, ops.orthonormal_near(ops.array(start, working)), top, by_magnitude)
    iterations, change, deficit = 1, math.inf, math.inf
    while iterations < settings.max_iter and deficit > settings.tol:
        previous = step.energy
        step = _rayleigh_ritz(
            ops, C_iter, _next_block(ops, C_iter, step, top, by_magnitude, settings), top, by_magnitude
        )
        iterations += 1
        change, deficit = _energy_shortfall(step.energy, previous, change)
    converged = deficit <= settings.tol
    if settings.precision == "float32":  # float64 Ritz pairs for the subspace the float32 iterations found
        # the Ritz vectors are orthonormal to float32 rounding already: Cholesky-QR suffices
        Q = ops.orthonormal_near(ops.to_float64(step.Q @ step.S))
        step = _rayleigh_ritz(ops, ops.array(C, np.float64), Q, top, by_magnitude)
    vectors = step.Q @ step.S[:, :top]
    return RandomizedEigen(
        values=np.asarray(ops.numpy(step.theta[:top]), dtype=np.float64),
        vectors=np.asarray(ops.numpy(vectors), dtype=np.float64),
        iterations=iterations,
        residual=_relative_residual(ops, step, vectors, top),
        energy_change=float(change),
        deficit=float(deficit),
        converged=bool(converged),
    )


@dataclass(frozen=True)
class _RitzStep:
    """One Rayleigh–Ritz step on the orthonormal block Q: Y = C·Q, the Ritz values θ (largest first, by value
    or by magnitude) with their coordinates S (Ritz vectors Q·S), and the captured energy Σ_{i≤top}|θ_i|."""

    Q: Any
    Y: Any
    theta: Any
    S: Any
    energy: float


def _rayleigh_ritz(ops: _LinearAlgebra, C: Any, Q: Any, top: int, by_magnitude: bool) -> _RitzStep:
    """C projected on the block Q (T = QᵀCQ, symmetrised) and decomposed: the Ritz pairs of C in span(Q)."""
    Y = C @ Q
    T = Q.T @ Y
    theta, S = ops.eigh((T + T.T) / 2)
    order = ops.order(theta, by_magnitude)
    theta, S = theta[order], S[:, order]
    return _RitzStep(Q, Y, theta, S, ops.energy(theta[:top]))


def _next_block(
    ops: _LinearAlgebra, C: Any, step: _RitzStep, top: int, by_magnitude: bool, settings: RandomizedSettings
) -> Any:
    """The next orthonormal block: the leading Ritz pairs that have converged are locked (they pass through
    unchanged), and the Chebyshev filter runs on the rest with C deflated by them (so its degree is not
    capped by the outliers' |λ|)."""
    V, CV, theta = step.Q @ step.S, step.Y @ step.S, step.theta
    residuals = ops.numpy(ops.column_norms(CV - V * theta[None, :]))
    converged_pairs = residuals <= settings.lock_tol * abs(float(ops.numpy(theta[:1])[0]))
    locked = min(int(np.argmin(converged_pairs)) if not converged_pairs.all() else len(converged_pairs), top)
    filtered = _chebyshev_filter(
        ops, _deflated(C, V[:, :locked], theta[:locked]), V[:, locked:], CV[:, locked:],
        theta[locked:], by_magnitude, settings.degree,
    )  # fmt: skip
    if not locked:
        return ops.orthonormal_near(filtered)
    filtered = filtered - V[:, :locked] @ (V[:, :locked].T @ filtered)
    return ops.orthonormal_near(ops.concat(V[:, :locked], filtered))


def _energy_shortfall(energy: float, previous: float, previous_change: float) -> tuple[float, float]:
    """The relative change of the captured energy in this iteration, and the estimated shortfall still left
    (the stopping rule of :func:`randomized_eigh`: change·ρ/(1 − ρ), ρ the observed rate, at least change/4)."""
    change = abs(energy - previous) / max(abs(energy), 1e-300)
    rate = min(change / previous_change, 0.95) if math.isfinite(previous_change) and previous_change > 0 else 0.95
    return change, change * max(0.25, rate / (1.0 - rate))


def _relative_residual(ops: _LinearAlgebra, step: _RitzStep, vectors: Any, top: int) -> float:
    """max over the ``top`` returned pairs of ‖C v − θ v‖ / max|θ| (0 for exact eigenpairs)."""
    residual_block = step.Y @ step.S[:, :top] - vectors * step.theta[None, :top]
    scale = float(ops.numpy(abs(step.theta[:1]))[0]) or 1.0
    return float(ops.numpy(ops.column_norms(residual_block)).max()) / scale


def _deflated(C: Any, V: Any, theta: Any) -> Callable[[Any], Any]:
    """Z ↦ (C − VΘVᵀ)Z: C with the locked eigenpairs (V, Θ) moved to 0, inside the filter's damped interval."""
    if V.shape[1] == 0:
        return lambda Z: C @ Z
    return lambda Z: C @ Z - V @ (theta[:, None] * (V.T @ Z))


def _chebyshev_filter(
    ops: _LinearAlgebra, C: Callable[[Any], Any], V: Any, CV: Any, theta: Any, by_magnitude: bool, degree: int
) -> Any:
    """T_degree((C − c)/e)·V for the Ritz vectors V (and C·V, already computed) with [c − e, c + e] the
    unwanted part of the spectrum as the Ritz values θ estimate it; columns are rescaled at every step
    (the recurrence is linear per column), so nothing overflows in float32."""
    bound = abs(float(ops.numpy(theta[-1:])[0]))
    largest = float(ops.numpy(abs(theta[:1]))[0])
    if degree <= 1 or bound <= 1e-12 * largest:  # the block spans C's range: filtering cannot help
        return CV
    center, half_width = (0.0, bound) if by_magnitude else (bound / 2, bound / 2)
    # Rounding leaves every column a component ~eps along the top eigenvectors, which the filter amplifies
    # by T(x_max) relative to the column's own direction: cap the degree so that stays far below 1/eps.
    x_max = max((largest - center) / half_width, 1.0 + 1e-12)
    limit = math.acosh(1e4 if V.dtype in (np.float32, getattr(ops.torch, "float32", None)) else 1e18)
    degree = max(1, min(degree, int(limit / math.acosh(x_max))))
    previous, current = V, (CV - center * V) / half_width
    for _ in range(degree - 1):
        following = 2 * (C(current) - center * current) / half_width - previous
        scale = ops.column_norms(following)
        scale = scale + (scale == 0)
        previous, current = current / scale[None, :], following / scale[None, :]
    return current


class _LinearAlgebra:
    """The few dense operations :func:`randomized_eigh` needs, on numpy (``cpu``) or on a torch device."""

    def __init__(self, device: str) -> None:
        self.device = device.removeprefix("torch:")
        self.torch: Any = None
        if device != "cpu":
            import torch

            self.torch = torch

    def array(self, A: np.ndarray, dtype: type) -> Any:
        if self.torch is None:
            return np.ascontiguousarray(A, dtype=dtype)
        torch_dtype = self.torch.float32 if dtype is np.float32 else self.torch.float64
        return self.torch.as_tensor(np.asarray(A), device=self.device).to(torch_dtype)

    def to_float64(self, A: Any) -> Any:
        return A.astype(np.float64) if self.torch is None else A.to(self.torch.float64)

    def orthonormal(self, A: Any) -> Any:
        """Householder QR's Q (for the Gaussian start and the float64 hand-over)."""
        if self.torch is None:
            return np.linalg.qr(A)[0]
        return self.torch.linalg.qr(A, mode="reduced").Q

    def orthonormal_near(self, A: Any) -> Any:
        """Q of a well-conditioned block (C times Ritz vectors, each column scaled to unit norm; a tall Gaussian
        start; float32 Ritz vectors handed over to float64): Cholesky-QR twice, two BLAS-3 products and a triangular solve instead of
        Householder QR's many small panel steps; Householder QR where the Gram matrix is not definite
        (C of lower rank than the block)."""
        norms = self.column_norms(A)
        if not bool((norms > 0).all()):
            return self.orthonormal(A)
        A = A / norms[None, :]
        for _ in range(2):
            gram = A.T @ A
            if self.torch is None:
                try:
                    R = scipy.linalg.cholesky(gram, lower=False, check_finite=False)
                except np.linalg.LinAlgError:
                    return self.orthonormal(A)
                A = scipy.linalg.solve_triangular(R, A.T, trans="T", lower=False, check_finite=False).T
            else:
                R, info = self.torch.linalg.cholesky_ex(gram, upper=True)
                if int(info) != 0:
                    return self.orthonormal(A)
                A = self.torch.linalg.solve_triangular(R, A, upper=True, left=False)
        return A

    def eigh(self, T: Any) -> tuple[Any, Any]:
        if self.torch is None:
            return np.linalg.eigh(T)
        result = self.torch.linalg.eigh(T)
        return result.eigenvalues, result.eigenvectors

    def order(self, theta: Any, by_magnitude: bool) -> Any:
        key = abs(theta) if by_magnitude else theta
        if self.torch is None:
            return np.argsort(-key, kind="stable")
        return self.torch.argsort(-key, stable=True)

    def energy(self, theta: Any) -> float:
        return float(abs(theta).sum())

    def column_norms(self, A: Any) -> Any:
        return np.linalg.norm(A, axis=0) if self.torch is None else self.torch.linalg.norm(A, dim=0)

    def concat(self, A: Any, B: Any) -> Any:
        return np.concatenate([A, B], axis=1) if self.torch is None else self.torch.cat([A, B], dim=1)

    def numpy(self, A: Any) -> np.ndarray:
        return A if self.torch is None else A.detach().cpu().numpy()


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
