"""The noise-aware gate on synthetic rounds whose truth is known: the bootstrap interval covers the planted
change, stays put when a shared runner slows a third of the rounds, and profiling stops adding rounds
once the interval is tight."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import numpy as np
import pytest

from espace_export.deploy.gate import GATE_QUANTILE, compare, ratio_interval
from espace_export.deploy.profile import ProfileSettings, interleave_until_tight, ratio_spread


def rounds(
    ms: float, n: int, rng: np.random.Generator, *, jitter: float = 0.01, hit: float = 0.0, slice_ms: float = 8.0
) -> list[float]:
    """``n`` round times around ``ms``: small multiplicative jitter, and with probability ``hit`` another
    process's time slice added (the noise of an oversubscribed runner, which only ever adds time)."""
    times = ms * (1 + jitter * rng.standard_normal(n))
    times += slice_ms * (rng.random(n) < hit) * rng.random(n)
    return [float(t) for t in times]


def report(original: list[float], compressed: list[float]) -> dict:
    """A profile report with a TTFT measurement made of these rounds (what ``profile_ttft`` writes)."""

    def summary(values: list[float]) -> dict:
        return {"median": float(np.median(values)), "samples": values}

    return {
        "kind": "profile",
        "backend": "ort-cpu",
        "ttft_backend": "ort-cpu",
        "seq": 64,
        "batch": 1,
        "ttft": {
            "ratio": float(np.median(compressed) / np.median(original)),
            "original_ms": summary(original),
            "compressed_ms": summary(compressed),
        },
    }


def ttft_row(current: dict, baseline: dict, **options: object):  # type: ignore[no-untyped-def]
    result = compare(current, baseline, **options)  # type: ignore[arg-type]
    return next(row for row in result.rows if row.metric == "ttft.ratio")


@pytest.mark.parametrize("hit", [0.0, 0.35, 0.6])
def test_a_planted_slowdown_is_found_and_an_unchanged_model_passes_under_load(hit: float) -> None:
    rng = np.random.default_rng(7)
    n = 600
    baseline = report(rounds(2.0, n, rng, hit=hit), rounds(1.2, n, rng, hit=hit))
    unchanged = report(rounds(2.0, n, rng, hit=hit), rounds(1.2, n, rng, hit=hit))
    planted = report(rounds(2.0, n, rng, hit=hit), rounds(1.2 * 1.10, n, rng, hit=hit))
    same = ttft_row(unchanged, baseline)
    slower = ttft_row(planted, baseline)
    assert same.status == "ok" and same.interval is not None
    assert same.interval[0] < 0 < same.interval[1]
    assert slower.status == "regressed", slower
    assert slower.interval is not None and slower.interval[0] < 0.10 < slower.interval[1]


def test_the_median_would_flake_where_the_low_quantile_holds() -> None:
    """60 % of rounds hit by other work: the median lands among the hit rounds and moves by tens of
    percent between two measurements of the same models; the gated quantile does not."""
    rng = np.random.default_rng(3)
    runs = [report(rounds(2.0, 400, rng, hit=0.6), rounds(1.2, 400, rng, hit=0.6)) for _ in range(6)]
    medians = [r["ttft"]["ratio"] for r in runs]
    gated = [
        np.quantile(r["ttft"]["compressed_ms"]["samples"], GATE_QUANTILE)
        / np.quantile(r["ttft"]["original_ms"]["samples"], GATE_QUANTILE)
        for r in runs
    ]
    assert np.std(medians) / np.mean(medians) > 0.05
    assert np.std(gated) / np.mean(gated) < 0.02
    assert np.mean(gated) == pytest.approx(0.6, rel=0.03)


def test_the_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(11)
    covered = 0
    trials = 60
    for _ in range(trials):
        original, compressed = rounds(2.0, 200, rng, jitter=0.03), rounds(1.5, 200, rng, jitter=0.03)
        low, high = ratio_interval(original, compressed, replicates=1000, seed=int(rng.integers(1 << 30)))
        covered += low <= 0.75 <= high
    assert covered >= 0.85 * trials


def test_verdicts_are_reproducible_and_point_comparisons_remain_for_short_reports() -> None:
    rng = np.random.default_rng(5)
    base = report(rounds(2.0, 100, rng), rounds(1.2, 100, rng))
    current = report(rounds(2.0, 100, rng), rounds(1.26, 100, rng))
    assert ttft_row(current, base) == ttft_row(current, base)
    short = copy.deepcopy(current)
    short["ttft"]["original_ms"]["samples"] = short["ttft"]["original_ms"]["samples"][:3]
    short["ttft"]["compressed_ms"]["samples"] = short["ttft"]["compressed_ms"]["samples"][:3]
    row = ttft_row(short, base)
    assert row.interval is None and row.current == short["ttft"]["ratio"]  # the stated ratio, compared as is
    point = ttft_row(current, base, confidence=None)
    assert point.interval is None and point.status == "ok"  # +5 % of medians is within a 5 % allowance


def test_a_change_past_the_allowance_within_the_noise_is_uncertain_not_failed() -> None:
    rng = np.random.default_rng(9)
    original, compressed = rounds(2.0, 12, rng, jitter=0.08), rounds(1.2, 12, rng, jitter=0.08)
    base = report(original, compressed)
    current = report(original, [1.08 * t for t in compressed])  # +8 %, seen through 12 noisy rounds
    row = ttft_row(current, base)
    assert row.change == pytest.approx(0.08)
    assert row.interval is not None and row.interval[0] < 0.05 < row.change  # type: ignore[operator]
    assert row.status == "uncertain"
    assert compare(current, base).passed


def fake_benches(original_ms: float, compressed_ms: float, jitter: float, seed: int) -> list[Callable[[], float]]:
    rng = np.random.default_rng(seed)
    return [
        lambda: original_ms / 1e3 * (1 + jitter * rng.standard_normal()),
        lambda: compressed_ms / 1e3 * (1 + jitter * rng.standard_normal()),
    ]


def test_profile_adds_rounds_until_the_interval_is_tight() -> None:
    settings = ProfileSettings(warmup=0, repeats=10, target_interval=0.01, max_repeats=5000)
    times = interleave_until_tight(fake_benches(2.0, 1.0, 0.05, seed=1), settings)
    assert 10 < len(times[0]) < 5000 and len(times[0]) == len(times[1])
    spread = ratio_spread(times[0], times[1])
    low, high = spread["ratio_interval"]
    assert (high - low) / 2 / spread["ratio_quantile"] <= 0.0105
    assert spread["rounds"] == len(times[0])
    capped = replace_settings(settings, max_repeats=40)
    assert len(interleave_until_tight(fake_benches(2.0, 1.0, 0.5, seed=2), capped)[0]) == 40
    fixed = replace_settings(settings, target_interval=None)
    assert len(interleave_until_tight(fake_benches(2.0, 1.0, 0.5, seed=3), fixed)[0]) == 10


def replace_settings(settings: ProfileSettings, **changes: object) -> ProfileSettings:
    from dataclasses import replace

    return replace(settings, **changes)  # type: ignore[arg-type]


def test_rounds_keep_alternating_across_blocks() -> None:
    order: list[str] = []
    benches = [
        lambda: order.append("A") or 0.001 * (1 + len(order) % 3),
        lambda: order.append("B") or 0.002 * (1 + len(order) % 5),
    ]
    settings = ProfileSettings(warmup=0, repeats=5, target_interval=1e-9, max_repeats=12)
    interleave_until_tight(benches, settings)  # type: ignore[arg-type]
    pairs = ["".join(order[i : i + 2]) for i in range(0, len(order), 2)]
    assert pairs == list(itertools.islice(itertools.cycle(["AB", "BA"]), 12))


@pytest.mark.parametrize("target", [0, -0.1, 1.5, float("nan")])
def test_target_interval_must_be_a_fraction(target: float) -> None:
    from espace_export.deploy.profile import check_rounds
    from espace_export.errors import EspaceError

    with pytest.raises(EspaceError, match="target-interval"):
        check_rounds(ProfileSettings(target_interval=target))
    with pytest.raises(EspaceError, match="max-repeats"):
        check_rounds(ProfileSettings(repeats=10, max_repeats=5))


# ---------------------------------------------------------------------------------------------- side by side


def with_reference(current: dict, reference: list[float]) -> dict:
    """``current`` as profiled with ``--reference``: the accepted model's rounds beside the candidate's."""
    out = copy.deepcopy(current)
    out["ttft"]["reference_ms"] = {"median": 1.0, "samples": reference}  # the gate reads the rounds only
    return out


def drifting(ms: float, n: int, rng: np.random.Generator, drift: float) -> list[float]:
    """Rounds whose speed drifts by ``drift`` over the run (the shared cache filling up with other jobs)."""
    return [t * (1 + drift * i / n) for i, t in enumerate(rounds(ms, n, rng))]


@pytest.mark.parametrize("drift", [-0.08, 0.0, 0.08])
def test_side_by_side_decides_ttft_and_cancels_drift_between_runs(drift: float) -> None:
    """The run after the baseline sees the compressed model ``drift`` slower relative to the original (cache
    contention hits the two differently): cross-run, that reads as a regression or hides one; timed beside
    the accepted model in the same rounds, the unchanged model passes and a planted +10 % fails."""
    rng = np.random.default_rng(13)
    n = 600
    baseline = report(rounds(2.0, n, rng), rounds(1.2, n, rng))
    original = rounds(2.0, n, rng)
    accepted = [t * (1 + drift) for t in drifting(1.2, n, rng, 0.0)]
    unchanged = with_reference(report(original, [t * (1 + drift) for t in rounds(1.2, n, rng)]), accepted)
    planted = with_reference(report(original, [t * (1 + drift) * 1.10 for t in rounds(1.2, n, rng)]), accepted)
    same, slower = compare(unchanged, baseline), compare(planted, baseline)
    assert same.passed and not slower.passed
    rows = {row.metric: row for row in slower.rows}
    assert rows["ttft.vs_reference"].status == "regressed"
    assert rows["ttft.vs_reference"].interval[0] < 0.10 < rows["ttft.vs_reference"].interval[1]  # type: ignore[index]
    assert rows["ttft.ratio"].status in ("drift", "ok")  # shown, never gated once the reference decides
    if drift > 0:  # cross-run alone, the unchanged model would have failed
        assert not compare(report(original, unchanged["ttft"]["compressed_ms"]["samples"]), baseline).passed


def test_side_by_side_rounds_must_pair_with_the_compressed_ones() -> None:
    from espace_export.errors import EspaceError

    rng = np.random.default_rng(2)
    current = report(rounds(2.0, 50, rng), rounds(1.2, 50, rng))
    for samples in (rounds(1.2, 49, rng), [1.0, "x"] + rounds(1.2, 48, rng), [-1.0] * 50):
        with pytest.raises(EspaceError):
            compare(with_reference(current, samples), current)  # type: ignore[arg-type]


def test_three_benches_rotate_without_self_repeats_and_balance_predecessors() -> None:
    order: list[str] = []
    benches = [lambda name=name: order.append(name) or 0.001 for name in "ABC"]
    interleave_until_tight(benches, ProfileSettings(warmup=0, repeats=60))  # type: ignore[arg-type]
    sequence = "".join(order)
    pairs = [sequence[i : i + 2] for i in range(len(sequence) - 1)]
    assert not [p for p in pairs if p[0] == p[1]], "a bench ran right after itself"
    follows = {p: pairs.count(p) for p in ("AB", "AC", "BC", "CB")}
    assert follows["AB"] == follows["AC"] and follows["BC"] == follows["CB"], follows
    assert [sequence[i : i + 3] for i in range(0, 18, 3)] == ["ABC", "BCA", "CAB", "ACB", "CBA", "BAC"]


def test_profile_times_the_reference_in_the_same_rounds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real profile with ``reference``: the accepted model's rounds sit beside the candidate's, the gate
    judges the candidate against them, and a reference the prompt cannot feed is refused before timing."""
    import onnx

    from espace_export.deploy.build import BuildSettings
    from espace_export.deploy.gate import SIDE_BY_SIDE, load_report
    from espace_export.deploy.profile import profile
    from espace_export.errors import EspaceError
    from tests._models import compress_tiny, tiny_decoder

    original, accepted = tmp_path / "tiny.onnx", tmp_path / "tiny.espace.onnx"
    onnx.save(tiny_decoder(), str(original))
    onnx.save(compress_tiny(tiny_decoder()), str(accepted))
    settings = ProfileSettings(seq=8, warmup=1, repeats=12, build=BuildSettings(threads=1))
    base = load_report(profile(original, accepted, settings, output=tmp_path / "base.json").paths["json"])
    report = load_report(
        profile(original, accepted, settings, output=tmp_path / "now.json", reference=accepted).paths["json"]
    )
    assert report["reference"] == str(accepted)
    assert len(report["ttft"]["reference_ms"]["samples"]) == len(report["ttft"]["compressed_ms"]["samples"]) == 12
    assert report["ttft"]["vs_reference"]["rounds"] == 12
    rows = {row.metric: row for row in compare(report, base).rows}
    assert SIDE_BY_SIDE in rows and rows[SIDE_BY_SIDE].baseline == 1.0 and rows[SIDE_BY_SIDE].interval is not None
    other = tmp_path / "other.onnx"
    model = tiny_decoder()
    model.graph.input[0].name = "ids"
    for node in model.graph.node:
        node.input[:] = ["ids" if name == tiny_decoder().graph.input[0].name else name for name in node.input]
    onnx.save(model, str(other))
    with pytest.raises(EspaceError, match="--reference has other inputs"):
        profile(original, accepted, settings, output=tmp_path / "x.json", reference=other)
    with pytest.raises(EspaceError, match="--reference is timed in the TTFT rounds"):
        profile(
            original, accepted, replace_settings(settings, ttft=False), output=tmp_path / "x.json", reference=accepted
        )
    with pytest.raises(EspaceError, match="--reference needs at least 5 rounds"):  # check would refuse the report
        profile(
            original, accepted, replace_settings(settings, repeats=3), output=tmp_path / "x.json", reference=accepted
        )
    assert not list(tmp_path.glob("x.*"))


def with_gemm(current: dict, original: list[float], compressed: list[float]) -> dict:
    """``current`` with one compressed GEMM shape timed in these rounds (what ``profile_gemms`` writes)."""
    out = copy.deepcopy(current)
    ratio = float(np.median(compressed) / np.median(original))
    group = {
        "count": 1, "L": 64, "label": "256→256 (L=64)", "ratio": ratio,
        "original_ms": {"median": float(np.median(original)), "samples": original},
        "compressed_ms": {"median": float(np.median(compressed)), "samples": compressed},
    }  # fmt: skip
    out["gemm"] = {"groups": [group], "ratio": ratio, "original_total_ms": 1.0, "compressed_total_ms": ratio}
    return out


def test_with_a_reference_cross_run_gemm_drift_is_shown_not_failed() -> None:
    """Under load the GEMM shapes of an unchanged model drifted +6 % between two runs: without a reference
    that fails the gate; with one, the side-by-side prefill decides and the GEMM row says ``drift``."""
    rng = np.random.default_rng(21)
    n = 400
    baseline = with_gemm(report(rounds(2.0, n, rng), rounds(1.2, n, rng)), rounds(1.0, n, rng), rounds(0.6, n, rng))
    drifted = with_gemm(
        report(rounds(2.0, n, rng), rounds(1.2, n, rng)), rounds(1.0, n, rng), rounds(0.6 * 1.08, n, rng)
    )
    assert not compare(drifted, baseline).passed
    side = with_reference(drifted, rounds(1.2, n, rng))
    result = compare(side, baseline)
    rows = {row.metric: row.status for row in result.rows}
    assert result.passed and rows["gemm[256→256 (L=64)].ratio"] == "drift" and rows["gemm.ratio"] == "drift"
    vanished = copy.deepcopy(side)
    del vanished["gemm"]
    assert not compare(vanished, baseline).passed  # a vanished measurement still fails
