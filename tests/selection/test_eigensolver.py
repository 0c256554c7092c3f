"""The randomized eigensolver against LAPACK: captured energy, selections, switches and devices."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from espace_export.selection.candidates import (
    RANDOMIZED_MIN_K,
    RandomizedSettings,
    autocorrelation,
    candidate_matrix,
    eigen_decomposition,
    eigen_solver,
    randomized_eigh,
    solver_settings,
    uses_randomized,
)
from espace_export.selection.factorizations import output_error, whitened_svd


def decaying(K: int, *, signed: bool = False, seed: int = 0, power: float = 1.0) -> np.ndarray:
    """A symmetric matrix with a slowly decaying spectrum λ_i ∝ i^(-power) (random signs if ``signed``)."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((K, K)))
    values = np.arange(1, K + 1, dtype=np.float64) ** -power
    if signed:
        values *= np.where(rng.random(K) < 0.5, -1.0, 1.0)
    return (U * values) @ U.T


def captured(C: np.ndarray, V: np.ndarray) -> float:
    """Σ_i |v_iᵀ C v_i|: the energy a set of orthonormal directions keeps (the candidates' objective)."""
    return float(np.abs(np.einsum("ki,ki->i", V, C @ V)).sum())


def lapack_top(C: np.ndarray, L: int, by_magnitude: bool = False) -> np.ndarray:
    return eigen_decomposition(C, by_magnitude=by_magnitude, top=L, solver="lapack")[1]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("L", [16, 48, 100])
def test_randomized_captures_the_exact_top_energy(precision: str, signed: bool, L: int) -> None:
    C = decaying(400, signed=signed)
    result = randomized_eigh(C, L, by_magnitude=signed, settings=RandomizedSettings(precision=precision))  # type: ignore[arg-type]
    exact = captured(C, lapack_top(C, L, signed))
    assert result.converged and result.deficit <= 1e-5
    assert captured(C, result.vectors) >= 0.9999 * exact
    assert captured(C, result.vectors) <= exact * (1 + 1e-12)  # Ky Fan: no L orthonormal vectors keep more
    np.testing.assert_allclose(result.vectors.T @ result.vectors, np.eye(L), atol=1e-10)
    # Ritz values are the energies the vectors keep, each within the a posteriori residual of an eigenvalue
    np.testing.assert_allclose(result.values, np.einsum("ki,ki->i", result.vectors, C @ result.vectors), atol=1e-12)
    assert result.residual < 1e-2


def test_a_clear_gap_gives_the_same_projector_as_lapack() -> None:
    rng = np.random.default_rng(3)
    U, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    values = np.concatenate([np.linspace(10, 5, 20), np.geomspace(0.5, 1e-4, 280)])
    values *= np.where(rng.random(300) < 0.5, -1.0, 1.0)
    C = (U * values) @ U.T
    exact = lapack_top(C, 20, by_magnitude=True)
    tight = randomized_eigh(C, 20, by_magnitude=True, settings=RandomizedSettings(tol=1e-14)).vectors
    np.testing.assert_allclose(tight @ tight.T, exact @ exact.T, atol=1e-8)
    # at the planner's default tolerance the subspace agrees to the energy's accuracy, and
    # eigen_decomposition's sign rule makes the two solvers agree vector by vector
    default = eigen_decomposition(C, by_magnitude=True, top=20, solver="randomized")[1]
    np.testing.assert_allclose(default @ default.T, exact @ exact.T, atol=1e-3)
    np.testing.assert_allclose(default, exact, atol=1e-3)


def test_stopping_rule_estimate_is_honest() -> None:
    C = decaying(400, power=0.7)  # slow decay: several iterations needed
    exact = captured(C, lapack_top(C, 64))
    loose = randomized_eigh(C, 64, settings=RandomizedSettings(tol=1e-3))
    tight = randomized_eigh(C, 64, settings=RandomizedSettings(tol=1e-8))
    assert loose.iterations < tight.iterations
    for result in (loose, tight):
        shortfall = 1 - captured(C, result.vectors) / exact
        assert shortfall <= 3 * result.deficit + 1e-12  # the estimate is not optimistic by more than 3×
    assert 1 - captured(C, tight.vectors) / exact < 1e-7


def test_rank_deficient_statistics_fewer_rows_than_width() -> None:
    X = np.random.default_rng(4).standard_normal((30, 200))
    C = autocorrelation(X)  # rank 30 < block
    result = randomized_eigh(C, 40)
    np.testing.assert_allclose(result.vectors.T @ result.vectors, np.eye(40), atol=1e-10)
    assert captured(C, result.vectors) == pytest.approx(float(np.trace(C)), rel=1e-10)


def test_auto_takes_lapack_for_narrow_or_wide_rank_and_randomized_for_small_rank_at_width() -> None:
    assert not uses_randomized(1024, 128, "auto")
    assert not uses_randomized(RANDOMIZED_MIN_K, RANDOMIZED_MIN_K // 4, "auto")
    assert uses_randomized(RANDOMIZED_MIN_K, RANDOMIZED_MIN_K // 8, "auto")
    assert uses_randomized(64, 8, "randomized") and not uses_randomized(64, 64, "randomized")
    assert not uses_randomized(8192, 16, "lapack")
    with pytest.raises(ValueError, match="unknown eigen solver"):
        uses_randomized(64, 8, "arpack")  # type: ignore[arg-type]
    C = decaying(128)
    # below the crossover auto is LAPACK, bit for bit
    np.testing.assert_array_equal(eigen_decomposition(C, top=16)[1], eigen_decomposition(C, top=16, solver="lapack")[1])


def test_the_solver_switch_reaches_every_decomposition_in_its_block() -> None:
    C = decaying(200, power=1.5)
    exact = eigen_decomposition(C, top=10)[1]
    assert solver_settings().solver == "auto"
    with eigen_solver("randomized", precision="float32") as settings:
        assert settings.solver == "randomized" and solver_settings().precision == "float32"
        inside = eigen_decomposition(C, top=10)[1]
        assert not np.array_equal(inside, exact)  # a different algorithm ran …
        assert captured(C, inside) >= 0.9999 * captured(C, exact)  # … keeping the same energy
        # a call names its own solver (in the block's single precision: LAPACK's ssyevr)
        np.testing.assert_allclose(eigen_decomposition(C, top=10, solver="lapack")[1], exact, atol=1e-4)
    assert solver_settings().solver == "auto"
    with pytest.raises(ValueError, match="unknown eigen solver"), eigen_solver("eig"):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize("signed", [False, True])
def test_single_precision_lapack_keeps_the_exact_top_energy(signed: bool) -> None:
    C = decaying(600, signed=signed)
    exact_values, exact = eigen_decomposition(C, by_magnitude=signed, top=150, solver="lapack")
    with eigen_solver("lapack", precision="float32"):
        values, vectors = eigen_decomposition(C, by_magnitude=signed, top=150)
    assert vectors.dtype == values.dtype == np.float64
    assert not np.array_equal(vectors, exact)  # ssyevr ran, not dsyevr …
    assert captured(C, vectors) >= 0.9999 * captured(C, exact)  # … keeping the same energy
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(150), atol=1e-5)
    np.testing.assert_allclose(values, exact_values, rtol=1e-4, atol=1e-6 * abs(exact_values[0]))


def test_whitened_svd_through_the_randomized_solver_matches_the_svd() -> None:
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3000, 96)) * np.geomspace(5, 0.05, 96)
    C_X = autocorrelation(X @ np.linalg.qr(rng.standard_normal((96, 96)))[0])
    W = rng.standard_normal((96, 64))
    exact = whitened_svd(W, C_X, 12)
    with eigen_solver("randomized"):
        fast = whitened_svd(W, C_X, 12)
    # the same objective value (the best rank-12 whitened fit) to the solver's energy tolerance
    assert output_error(W, fast, C_X) == pytest.approx(output_error(W, exact, C_X), rel=1e-4)
    assert output_error(W, fast, C_X) >= output_error(W, exact, C_X) * (1 - 1e-9)


def test_torch_code_path_on_cpu_matches_numpy() -> None:
    pytest.importorskip("torch")
    C = decaying(300, signed=True)
    on_numpy = randomized_eigh(C, 40, by_magnitude=True)
    on_torch = randomized_eigh(C, 40, by_magnitude=True, settings=RandomizedSettings(device="torch:cpu"))
    assert on_torch.converged
    assert captured(C, on_torch.vectors) >= 0.9999 * captured(C, lapack_top(C, 40, True))
    np.testing.assert_allclose(on_torch.values, on_numpy.values, rtol=1e-3)  # same steps, other rounding
    f32 = randomized_eigh(
        C, 40, by_magnitude=True, settings=RandomizedSettings(device="torch:cpu", precision="float32")
    )
    assert captured(C, f32.vectors) >= 0.9999 * captured(C, lapack_top(C, 40, True))
    values, vectors = eigen_decomposition(C, by_magnitude=True, top=40, solver="lapack", device="torch:cpu")
    np.testing.assert_allclose(vectors @ vectors.T, lapack_top(C, 40, True) @ lapack_top(C, 40, True).T, atol=1e-9)


def test_cuda_matches_lapack() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the torch code path is tested on the CPU (torch:cpu) instead")
    C = decaying(2048, signed=True)
    for precision in ("float64", "float32"):
        result = randomized_eigh(
            C, 256, by_magnitude=True, settings=RandomizedSettings(device="cuda", precision=precision)
        )  # type: ignore[arg-type]
        assert captured(C, result.vectors) >= 0.9999 * captured(C, lapack_top(C, 256, True))


@pytest.fixture(scope="module")
def real_statistics(sample_model):
    """A tiny sample decoder calibrated on token batches: its C_X per activation and one weight each."""
    from espace_export.io.data import input_specs, random_token_batches
    from espace_export.pipeline import calibrate_model
    from graph_passes import find_targets
    from graph_passes.find import weight_matrix

    model = onnx.load(sample_model("llama", "torchscript"))
    targets = find_targets(model)
    with pytest.warns(UserWarning):
        batches = random_token_batches(input_specs(model), 256, batch_size=2, seq_len=32, num_batches=4, seed=0)
    calibration = calibrate_model(model, targets, batches, methods=["mse", "nmse"])
    weights = {t.activation: weight_matrix(model, t).astype(np.float64) for t in targets}
    return calibration, weights


def test_real_statistics_energy_and_selection(real_statistics) -> None:
    calibration, weights = real_statistics
    checked = 0
    for activation, stats in calibration.stats.items():
        K = stats.C_X.shape[0]
        for method in ("mse", "nmse", "go-mse"):
            C, by_magnitude = candidate_matrix(
                method, C_X=stats.C_X, C_X_normalized=stats.C_X_normalized, W=weights[activation]
            )  # type: ignore[arg-type]
            for L in (K // 8, K // 4):
                fast = eigen_decomposition(C, by_magnitude=by_magnitude, top=L, solver="randomized")[1]
                exact = lapack_top(C, L, by_magnitude)
                assert captured(C, fast) >= 0.9999 * captured(C, exact), (activation, method, L)
                checked += 1
    assert checked >= 12
