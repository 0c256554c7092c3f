"""The CI regression gate: compare a profile report against a baseline and fail on a slowdown.

Every gated metric is "lower is better": the GEMM and TTFT latency ratios (compressed/original,
which cancel most of the machine's speed), the ratio of each GEMM shape and, when asked, the
absolute medians.

**Noise.** A profile report keeps every round's time of both sides (rounds are interleaved, so round
*i* of the original and of the compressed model are a pair). The gate bootstraps each metric from those
rounds: it resamples the rounds with replacement (pairs kept together; each GEMM shape on its own, since
shapes were timed at different moments) and recomputes the gated ratio from the rounds: the ratio of
a low quantile (:data:`GATE_QUANTILE`, the fastest tenth) of each side's times, for the GEMM total summed
over the shapes with their counts (:func:`_quantile_ratio` says why not the median). When both reports
have rounds, that is the value compared (the stated ratio of medians is kept for the eye). Resampling
both reports independently gives replicates of the change ``current / baseline − 1``, whose 2.5th and
97.5th percentiles are its 95 % interval (:func:`change_interval`). A metric *regresses* only when the
whole interval lies above ``max_regression`` — its slowdown exceeds the allowance beyond the measured
noise; it *improves* when the
whole interval lies below ``−max_regression``; a point change past the allowance whose interval still
reaches it is *uncertain* (listed, not failed: profile with more rounds or ``target_interval``). Reports
with fewer than :data:`MIN_ROUNDS` rounds per side fall back to the point comparison ``change >
max_regression``. The percentile bootstrap is deliberately simple: it treats rounds as exchangeable, which
interleaving makes close to true, and it cannot see noise that stays constant within one run (the load
of the machine while that run lasted): measure the baseline with more rounds than the candidates, and
keep ``max_regression`` above that run-to-run drift (benchmarks/gate_noise.py measures it).

**Side by side.** That drift is why a report profiled with ``reference`` (the accepted compressed model,
timed in the same interleaved rounds as the candidate) is judged on :func:`side_by_side` instead: the
change is ``Q(candidate) / Q(reference) − 1`` of one run, with its paired bootstrap interval, and the
cross-run ratio rows (``ttft.ratio``, ``gemm.ratio``, each ``gemm[shape].ratio``) are kept for the eye
(status ``drift`` when they moved past the allowance: under a load average of 18 the GEMM shapes of an
unchanged model drifted by +6 % between runs). A vanished metric still fails (``missing``), and so do
the absolute medians of ``absolute``.
The status rule is the same (:func:`_status`): regressed when the interval's low end is above the
allowance, uncertain (not failed) when only the point is, ok otherwise.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from espace_export.errors import EspaceError
from espace_export.io.models import check_distinct_paths, read_json

Status = Literal["ok", "regressed", "improved", "uncertain", "missing", "new", "drift"]
# Fewer rounds than this per side: no interval, the point change decides.
MIN_ROUNDS = 5
# The gated statistic of a side's rounds (see _quantile_ratio for why not the median).
GATE_QUANTILE = 0.1
REPLICATES = 2000
# A Sampler turns a random generator and a replicate count into replicates of one metric (same units).
Sampler = Callable[[np.random.Generator, int], np.ndarray]
# Settings that must agree for two reports to be comparable.
_COMPARABLE = ("backend", "ttft_backend", "seq", "batch")


@dataclass(frozen=True)
class Comparison:
    metric: str
    baseline: float | None
    current: float | None
    status: Status
    interval: tuple[float, float] | None = None  # 95 % interval of ``change`` (None: point comparison)

    @property
    def change(self) -> float | None:
        """Relative change ``current / baseline − 1`` (positive = slower)."""
        if self.baseline is None or self.current is None or self.baseline == 0:
            return None
        return self.current / self.baseline - 1.0


@dataclass(frozen=True)
class GateResult:
    rows: tuple[Comparison, ...]
    max_regression: float

    @property
    def failures(self) -> list[Comparison]:
        return [row for row in self.rows if row.status in ("regressed", "missing")]

    @property
    def passed(self) -> bool:
        return not self.failures


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A profile report written by ``espace-export profile``, or an :class:`EspaceError` saying why not.

    Strict JSON only (no NaN/Infinity), UTF-8, nesting and size within reason; the gated fields are
    checked by :func:`gate_metrics`."""
    path = Path(path)
    if not path.is_file():
        raise EspaceError(f"report not found: {path}", "pass the JSON written by `espace-export profile`")
    fix = "pass the .json written by `espace-export profile` (not the .md or .png), or profile again"
    report = read_json(path, "report", fix)
    if not isinstance(report, dict) or report.get("kind") != "profile":
        raise EspaceError(
            f"{path} is not a profile report", "pass the JSON written by `espace-export profile` (not `compress`)"
        )
    report.setdefault("_source", str(path))
    return report


def _source(report: Mapping[str, Any]) -> str:
    return str(report.get("_source", "the report"))


def _malformed(report: Mapping[str, Any], what: str) -> EspaceError:
    return EspaceError(
        f"{_source(report)}: {what}",
        "the report is damaged or was edited: profile again with `espace-export profile` (this is not a regression)",
    )


def _positive(report: Mapping[str, Any], value: object, where: str) -> float:
    """A measured time or ratio: a finite number above 0, or an :class:`EspaceError` naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = "null" if value is None else repr(value)[:40]
        raise _malformed(report, f"{where} is {shown}, not a number")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise _malformed(report, f"{where} is {number!r}; a measured value must be finite and above 0")
    return number


def _field(report: Mapping[str, Any], container: object, key: str, where: str) -> Any:
    if not isinstance(container, Mapping) or key not in container:
        raise _malformed(report, f"{where} is missing")
    return container[key]


def _samples(report: Mapping[str, Any], summary: object, where: str) -> np.ndarray | None:
    """A side's per-round times (None when the report has none: an older report)."""
    if not isinstance(summary, Mapping) or "samples" not in summary:
        return None
    values = summary["samples"]
    if not isinstance(values, list) or len(values) > 1_000_000:
        raise _malformed(report, f"{where}.samples is not a list of times")
    return np.array([_positive(report, v, f"{where}.samples[{i}]") for i, v in enumerate(values)], dtype=np.float64)


def gate_metrics(report: Mapping[str, Any], *, absolute: bool = False) -> dict[str, float]:
    """The gated metrics of one report, by name.

    Raises:
        EspaceError: a gated field is missing, null, not a number, NaN, infinite, zero or negative.
    """
    return {name: value for name, (value, _) in _metrics(report, absolute=absolute).items()}


@dataclass(frozen=True)
class Robust:
    """A metric recomputed from a report's rounds: its value and a bootstrap sampler of it."""

    point: float
    sample: Sampler


def _robust_ratio(pairs: Sequence[tuple[int, np.ndarray, np.ndarray]], quantile: float) -> Robust:
    identity = [np.arange(len(original))[None, :] for _, original, _ in pairs]
    return Robust(float(_quantile_ratio(pairs, identity, quantile)[0]), _ratio_sampler(pairs, quantile))


def _metrics(
    report: Mapping[str, Any], *, absolute: bool, quantile: float = 0.1
) -> dict[str, tuple[float, Robust | None]]:
    """Each gated metric: its stated value, and its robust form from the rounds (None without enough)."""
    metrics: dict[str, tuple[float, Robust | None]] = {}
    gemm = report.get("gemm")
    if gemm:
        groups = _field(report, gemm, "groups", "gemm.groups")
        if not isinstance(groups, list):
            raise _malformed(report, "gemm.groups is not a list")
        pairs: list[tuple[int, np.ndarray, np.ndarray] | None] = []
        for index, row in enumerate(groups):
            where = f"gemm.groups[{index}]"
            if not isinstance(row, Mapping):
                raise _malformed(report, f"{where} is not an object")
            count = _field(report, row, "count", f"{where}.count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise _malformed(report, f"{where}.count is {count!r}, not a positive integer")
            original = _samples(report, row.get("original_ms"), f"{where}.original_ms")
            compressed = _samples(report, row.get("compressed_ms"), f"{where}.compressed_ms")
            if original is not None and compressed is not None and len(original) == len(compressed) >= MIN_ROUNDS:
                pairs.append((count, original, compressed))
            else:
                pairs.append(None)
            if _field(report, row, "L", f"{where}.L") is not None:
                label = _field(report, row, "label", f"{where}.label")
                ratio = _positive(report, _field(report, row, "ratio", f"{where}.ratio"), f"{where}.ratio")
                robust = _robust_ratio([pairs[-1]], quantile) if pairs[-1] is not None else None
                metrics[f"gemm[{label}].ratio"] = (ratio, robust)
        ratio = _positive(report, _field(report, gemm, "ratio", "gemm.ratio"), "gemm.ratio")
        complete = all(p is not None for p in pairs) and bool(pairs)
        metrics["gemm.ratio"] = (ratio, _robust_ratio(pairs, quantile) if complete else None)  # type: ignore[arg-type]
        if absolute:
            for side in ("compressed", "original"):
                key = f"{side}_total_ms"
                value = _positive(report, _field(report, gemm, key, f"gemm.{key}"), f"gemm.{key}")
                metrics[f"gemm.{key}"] = (value, None)
    ttft = report.get("ttft")
    if ttft:
        ratio = _positive(report, _field(report, ttft, "ratio", "ttft.ratio"), "ttft.ratio")
        original = _samples(report, _field(report, ttft, "original_ms", "ttft.original_ms"), "ttft.original_ms")
        compressed = _samples(report, _field(report, ttft, "compressed_ms", "ttft.compressed_ms"), "ttft.compressed_ms")
        usable = original is not None and compressed is not None
        usable = usable and len(original) == len(compressed) >= MIN_ROUNDS  # type: ignore[arg-type]
        robust = _robust_ratio([(1, original, compressed)], quantile) if usable else None  # type: ignore[list-item]
        metrics["ttft.ratio"] = (ratio, robust)
        if absolute:
            for side in ("compressed", "original"):
                summary = _field(report, ttft, f"{side}_ms", f"ttft.{side}_ms")
                median = _positive(
                    report, _field(report, summary, "median", f"ttft.{side}_ms.median"), f"ttft.{side}_ms.median"
                )
                samples = _samples(report, summary, f"ttft.{side}_ms")
                robust = (
                    Robust(float(np.quantile(samples, quantile)), _quantile_sampler(samples, quantile))
                    if samples is not None and len(samples) >= MIN_ROUNDS
                    else None
                )  # type: ignore[arg-type]
                metrics[f"ttft.{side}_ms"] = (median, robust)
    return metrics


def _quantile_ratio(
    pairs: Sequence[tuple[int, np.ndarray, np.ndarray]], indices: Sequence[np.ndarray], quantile: float
) -> np.ndarray:
    """The gated ratio for each row of round indices: ``Σ count·Q(compressed) / Σ count·Q(original)``
    over the pairs (GEMM shapes, or the prefill alone), Q the ``quantile`` of the rounds.

    A low quantile, not the median, because the noise of a shared runner only ever adds time: another
    process takes the core for a time slice and the round in between is many times slower. On the
    2-core runner of the issue more than half of the rounds of a 2 ms prefill were hit so (the median
    landed on them, and so did the median of the per-round ratios); the fastest tenth stayed put."""
    top = np.zeros(len(indices[0]))
    bottom = np.zeros(len(indices[0]))
    for (count, original, compressed), index in zip(pairs, indices, strict=True):
        top += count * np.quantile(compressed[index], quantile, axis=1)
        bottom += count * np.quantile(original[index], quantile, axis=1)
    return top / bottom


def _ratio_sampler(pairs: Sequence[tuple[int, np.ndarray, np.ndarray]], quantile: float) -> Sampler:
    """Bootstrap replicates of :func:`_quantile_ratio`: each pair's rounds resampled with replacement,
    original and compressed of one round together (interleaved, they saw the same drift), each pair
    independently of the others."""

    def sample(rng: np.random.Generator, replicates: int) -> np.ndarray:
        indices = [rng.integers(0, len(original), size=(replicates, len(original))) for _, original, _ in pairs]
        return _quantile_ratio(pairs, indices, quantile)

    return sample


def _quantile_sampler(samples: np.ndarray, quantile: float) -> Sampler:
    def sample(rng: np.random.Generator, replicates: int) -> np.ndarray:
        indices = rng.integers(0, len(samples), size=(replicates, len(samples)))
        return np.quantile(samples[indices], quantile, axis=1)

    return sample


def ratio_interval(
    original: Sequence[float],
    compressed: Sequence[float],
    *,
    quantile: float = GATE_QUANTILE,
    confidence: float = 0.95,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of the gated ratio ``Q(compressed) / Q(original)`` of one report's rounds."""
    pair = (1, np.asarray(original, dtype=np.float64), np.asarray(compressed, dtype=np.float64))
    draws = _ratio_sampler([pair], quantile)(np.random.default_rng(seed), replicates)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def change_interval(
    current: Robust, baseline: Robust, *, confidence: float = 0.95, replicates: int = REPLICATES, seed: int = 0
) -> tuple[float, float]:
    """The ``confidence`` percentile-bootstrap interval of ``current / baseline − 1``, both reports
    resampled independently."""
    rng = np.random.default_rng(seed)
    changes = current.sample(rng, replicates) / baseline.sample(rng, replicates) - 1.0
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(changes, [tail, 100 - tail])
    return float(low), float(high)


def check_max_regression(max_regression: float) -> float:
    """``--max-regression`` is a fraction in [0, 1]: 0.05 is 5 %. Anything else is refused with a hint."""
    if isinstance(max_regression, bool) or not isinstance(max_regression, (int, float)):
        raise EspaceError(f"--max-regression must be a number, got {max_regression!r}", "try --max-regression 0.05")
    if not math.isfinite(max_regression) or max_regression < 0:
        raise EspaceError(f"--max-regression must be at least 0, got {max_regression}", "try --max-regression 0.05")
    if max_regression > 1:
        raise EspaceError(
            f"--max-regression {max_regression:g} would allow a {max_regression:.0%} slowdown",
            f"give a fraction: --max-regression {max_regression / 100:g} for {max_regression:g} %",
        )
    return float(max_regression)


def compare(
    current: Mapping[str, Any],
    baseline: Mapping[str, Any],
    *,
    max_regression: float = 0.05,
    absolute: bool = False,
    allow_mismatch: bool = False,
    confidence: float | None = 0.95,
    replicates: int = REPLICATES,
    quantile: float = GATE_QUANTILE,
) -> GateResult:
    """Compare ``current`` against ``baseline``.

    A metric in the baseline but not in the current report is ``missing`` and fails the gate (a
    layer shape or a whole measurement vanished); a new metric is listed and passes. With
    ``confidence`` (default 95 %) and enough rounds in both reports, a metric regresses only when its
    whole bootstrap interval lies beyond ``max_regression`` (see the module docstring); ``None`` (or
    reports without rounds) compares the point values.

    Raises:
        EspaceError: ``max_regression`` outside [0, 1], a malformed report (null, NaN, negative or
            missing measurements), or reports measured with other settings (backend, sequence, batch)
            unless ``allow_mismatch``.
    """
    max_regression = check_max_regression(max_regression)
    if confidence is not None and not 0 < confidence < 1:
        raise EspaceError(f"the confidence must lie in (0, 1), got {confidence}", "try 0.95")
    mismatched = [
        f"{key} {baseline.get(key)!r} → {current.get(key)!r}"
        for key in _COMPARABLE
        if baseline.get(key) != current.get(key)
    ]
    if mismatched and not allow_mismatch:
        raise EspaceError(
            f"the reports were measured differently ({'; '.join(mismatched)})",
            "profile both with the same settings, or pass --allow-mismatch",
        )
    if not 0 <= quantile <= 1:
        raise EspaceError(f"the gate quantile must lie in [0, 1], got {quantile}", "try 0.1")
    before = _metrics(baseline, absolute=absolute, quantile=quantile)
    after = _metrics(current, absolute=absolute, quantile=quantile)
    rows = []
    for metric, (value, base_robust) in before.items():
        if metric not in after:
            rows.append(Comparison(metric, value, None, "missing"))
            continue
        now, now_robust = after[metric]
        interval = None
        if confidence is not None and base_robust is not None and now_robust is not None:
            seed = int.from_bytes(hashlib.sha1(metric.encode()).digest()[:4], "little")  # reproducible verdicts
            value, now = base_robust.point, now_robust.point
            interval = change_interval(now_robust, base_robust, confidence=confidence, replicates=replicates, seed=seed)
        row = Comparison(metric, value, now, "ok", interval)
        rows.append(Comparison(metric, value, now, _status(row, max_regression), interval))
    rows += [Comparison(metric, None, value, "new") for metric, (value, _) in after.items() if metric not in before]
    side = side_by_side(current, quantile=quantile, confidence=confidence or 0.95, replicates=replicates)
    if side is not None:  # the same-run comparison decides; the cross-run ratios are shown, not gated
        rows = [_as_drift(row) if row.metric.endswith(".ratio") else row for row in rows]
        rows.append(Comparison(side.metric, side.baseline, side.current, _status(side, max_regression), side.interval))
    return GateResult(tuple(rows), max_regression)


SIDE_BY_SIDE = "ttft.vs_reference"


def side_by_side(
    report: Mapping[str, Any],
    *,
    quantile: float = GATE_QUANTILE,
    confidence: float = 0.95,
    replicates: int = REPLICATES,
) -> Comparison | None:
    """The prefill of the report's COMPRESSED against its ``--reference`` (the accepted model), timed in
    the same interleaved rounds: ``Q(compressed) / Q(reference) − 1`` with its paired bootstrap interval.
    None when the report has no reference rounds.

    Raises:
        EspaceError: reference rounds that are not a list of positive numbers, or fewer than
            :data:`MIN_ROUNDS` of them, or not one per compressed round.
    """
    ttft = report.get("ttft")
    if not isinstance(ttft, Mapping) or ttft.get("reference_ms") is None:
        return None
    reference = _samples(report, ttft.get("reference_ms"), "ttft.reference_ms")
    compressed = _samples(report, ttft.get("compressed_ms"), "ttft.compressed_ms")
    if reference is None or compressed is None or not len(reference) == len(compressed) >= MIN_ROUNDS:
        raise _malformed(report, f"ttft.reference_ms needs one round per compressed round (at least {MIN_ROUNDS})")
    robust = _robust_ratio([(1, reference, compressed)], quantile)
    seed = int.from_bytes(hashlib.sha1(SIDE_BY_SIDE.encode()).digest()[:4], "little")
    draws = robust.sample(np.random.default_rng(seed), replicates) - 1.0
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Comparison(SIDE_BY_SIDE, 1.0, robust.point, "ok", (float(low), float(high)))


def _as_drift(row: Comparison) -> Comparison:
    """A cross-run ratio (TTFT, GEMM total, each GEMM shape) superseded by the side-by-side TTFT: a change
    past the allowance is shown as ``drift`` (the runner's load moved between the two runs), never failed.
    The whole prefill timed beside the accepted model already contains every GEMM; the GEMM rows stay
    for the eye (which shape moved), gated only in reports profiled without ``reference``."""
    if row.status in ("regressed", "uncertain", "improved"):
        return Comparison(row.metric, row.baseline, row.current, "drift", row.interval)
    return row


def _status(row: Comparison, max_regression: float) -> Status:
    change = row.change
    if change is None:
        return "ok"
    low, high = row.interval if row.interval is not None else (change, change)
    if low > max_regression:
        return "regressed"
    if high < -max_regression:
        return "improved"
    if change > max_regression:
        return "uncertain"
    return "ok"


def summary_path(
    value: str | os.PathLike[str] | None, *, reports: Sequence[str | os.PathLike[str]] = ()
) -> Path | None:
    """Where ``--summary`` appends the Markdown table, checked before the gate runs.

    An empty value (``--summary "$GITHUB_STEP_SUMMARY"`` with the variable unset) means no summary.

    Raises:
        EspaceError: a directory, a missing parent directory, or one of the ``reports`` themselves.
    """
    if value is None or str(value).strip() in ("", "."):
        return None
    path = Path(value)
    if path.is_dir():
        raise EspaceError(f"--summary {path} is a directory", 'pass a file, e.g. --summary "$GITHUB_STEP_SUMMARY"')
    if not path.parent.is_dir():
        raise EspaceError(
            f"--summary: directory {path.parent} does not exist", f"create it first (mkdir -p {path.parent})"
        )
    check_distinct_paths({f"report {i + 1}": r for i, r in enumerate(reports)}, {"--summary": path})
    return path


def append_summary(result: GateResult, path: Path | None) -> None:
    """Append the Markdown table to ``path`` (CI summaries collect several steps); nothing for None."""
    if path is None:
        return
    try:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(to_markdown(result))
    except OSError as exc:
        raise EspaceError(f"cannot write --summary {path}: {exc.strerror}", "check the path and free space") from None


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _change(row: Comparison) -> str:
    if row.change is None:
        return "-"
    if row.interval is None:
        return f"{row.change:+.1%}"
    return f"{row.change:+.1%} [{row.interval[0]:+.1%}, {row.interval[1]:+.1%}]"


def table_rows(result: GateResult, *, only_failures: bool = False) -> list[tuple[str, str, str, str, str]]:
    rows = result.failures if only_failures else list(result.rows)
    return [(r.metric, _value(r.baseline), _value(r.current), _change(r), r.status) for r in rows]


def to_markdown(result: GateResult) -> str:
    """A Markdown table for a CI job summary (for example ``$GITHUB_STEP_SUMMARY``)."""
    verdict = (
        "passed"
        if result.passed
        else f"**failed**: {len(result.failures)} metric(s) worse than +{result.max_regression:.0%}"
    )
    lines = [
        f"### ESPACE latency gate: {verdict}",
        "",
        "| metric | baseline | current | change | status |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {m} | {b} | {c} | {d} | {s} |" for m, b, c, d, s in table_rows(result)]
    uncertain = [r.metric for r in result.rows if r.status == "uncertain"]
    if uncertain:
        lines += [
            "",
            f"{len(uncertain)} metric(s) changed past the allowance within the measured noise "
            "(not failed): profile with more rounds to decide.",
        ]
    drifted = [r.metric for r in result.rows if r.status == "drift"]
    if drifted:
        lines += [
            "",
            f"{len(drifted)} cross-run ratio(s) moved past the allowance between the two runs (drift, not gated): "
            f"{SIDE_BY_SIDE}, timed beside the accepted model in one run, decides.",
        ]
    return "\n".join(lines) + "\n"
