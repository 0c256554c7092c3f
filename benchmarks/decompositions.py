"""LAPACK vs the randomized eigensolver on the planner's decompositions (issue 12, item 2).

For each width K and rank L (K/4 and K/8 by default) it builds a symmetric K×K matrix with a decaying,
activation-like spectrum (a few outliers on a λ_i ∝ i^(-1) power law: the slow decay that makes subspace
methods work hardest), rotated by random Householder reflections, and times

* ``lapack``: :func:`espace_export.candidates.eigen_decomposition` with ``solver="lapack"`` (what the
  planner ran before: ``syevr`` on an index subset),
* ``randomized`` in float64 and in float32 (:func:`espace_export.candidates.randomized_eigh`),

and prints side by side the median wall time over ``--repeats`` runs, the speed-up over LAPACK, and the
captured energy Σ_{i≤L}|v_iᵀCv_i| of each result divided by LAPACK's (≥ 0.9999 is the acceptance bar).
``--indefinite`` gives half the eigenvalues a negative sign and ranks by |λ| (GO-MSE / NL-MSE).

    python benchmarks/decompositions.py                        # K = 1024, 4096, 11008 (11008 once)
    python benchmarks/decompositions.py --sizes 1024 4096 --repeats 3 --indefinite
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from espace_export.selection.candidates import RandomizedSettings, eigen_decomposition, randomized_eigh


def decaying_matrix(K: int, *, indefinite: bool, seed: int = 0) -> np.ndarray:
    """H₃H₂H₁·diag(λ)·H₁H₂H₃ with λ: 8 outliers ×30, then i^(-1); Householder reflections cost O(K²)."""
    rng = np.random.default_rng(seed)
    values = 1.0 / np.arange(1, K + 1)
    values[:8] *= 30.0
    if indefinite:
        values *= np.where(rng.random(K) < 0.5, -1.0, 1.0)
    C = np.diag(values)
    for _ in range(3):
        h = rng.standard_normal(K)
        h /= np.linalg.norm(h)
        Ch = C @ h
        C = C - 2 * np.outer(h, Ch) - 2 * np.outer(Ch, h) + 4 * float(h @ Ch) * np.outer(h, h)
    return (C + C.T) / 2


def captured(C: np.ndarray, V: np.ndarray) -> float:
    return float(np.abs(np.einsum("ki,ki->i", V, C @ V)).sum())


def timed(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(times), (max(times) - min(times)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 11008])
    parser.add_argument("--divisors", type=int, nargs="+", default=[4, 8], help="L = K / divisor")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (K ≥ 8192 runs once)")
    parser.add_argument("--indefinite", action="store_true", help="signed spectrum, ranked by |λ|")
    args = parser.parse_args()
    magnitude = args.indefinite
    print(f"spectrum: {'signed, by |λ|' if magnitude else 'PSD, by value'}; median of repeats (spread)")
    header = f"{'K':>6} {'L':>5} | {'lapack s':>14} | {'rand f64 s':>14} {'×':>5} {'energy':>9} {'it':>3} | {'rand f32 s':>14} {'×':>5} {'energy':>9} {'it':>3}"
    print(header)
    print("-" * len(header))
    for K in args.sizes:
        C = decaying_matrix(K, indefinite=magnitude)
        repeats = 1 if K >= 8192 else args.repeats
        for divisor in args.divisors:
            L = K // divisor

            def lapack(C: np.ndarray = C, L: int = L) -> np.ndarray:
                return eigen_decomposition(C, by_magnitude=magnitude, top=L, solver="lapack")[1]

            t_lapack, s_lapack, V = timed(lapack, repeats)
            exact = captured(C, V)
            cells = []
            for precision in ("float64", "float32"):
                iterations = []

                def run(
                    precision: str = precision, iterations: list[int] = iterations, C: np.ndarray = C, L: int = L
                ) -> np.ndarray:
                    result = randomized_eigh(
                        C, L, by_magnitude=magnitude, settings=RandomizedSettings(precision=precision)
                    )  # type: ignore[arg-type]
                    iterations.append(result.iterations)
                    return result.vectors

                t, spread, W = timed(run, repeats)
                cells.append(
                    f"{t:8.2f} ({spread:4.2f}) {t_lapack / t:5.2f} {captured(C, W) / exact:9.6f} {iterations[-1]:3d}"
                )
            print(f"{K:6d} {L:5d} | {t_lapack:8.2f} ({s_lapack:4.2f}) | {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
