"""The CI regression gate: compare a profile report against a baseline and fail on a slowdown.

Every gated metric is "lower is better": the GEMM and TTFT latency ratios (compressed/original,
which cancel most of the machine's speed), the ratio of each GEMM shape and, when asked, the
absolute medians. A metric *regresses* when ``current / baseline − 1 > max_regression``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from espace_export.errors import EspaceError

Status = Literal["ok", "regressed", "improved", "missing", "new"]
# Settings that must agree for two reports to be comparable.
_COMPARABLE = ("backend", "ttft_backend", "seq", "batch")


@dataclass(frozen=True)
class Comparison:
    metric: str
    baseline: float | None
    current: float | None
    status: Status

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
    """A profile report written by ``espace-export profile``, or an :class:`EspaceError` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise EspaceError(f"report not found: {path}", "pass the JSON written by `espace-export profile`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EspaceError(f"{path} is not JSON ({exc})", "pass the .json report, not the .md or .png") from None
    if not isinstance(report, dict) or report.get("kind") != "profile":
        raise EspaceError(
            f"{path} is not a profile report", "pass the JSON written by `espace-export profile` (not `compress`)"
        )
    return report


def gate_metrics(report: Mapping[str, Any], *, absolute: bool = False) -> dict[str, float]:
    """The gated metrics of one report, by name."""
    metrics: dict[str, float] = {}
    gemm = report.get("gemm")
    if gemm:
        metrics["gemm.ratio"] = float(gemm["ratio"])
        for row in gemm["groups"]:
            if row["L"] is not None:
                metrics[f"gemm[{row['label']}].ratio"] = float(row["ratio"])
        if absolute:
            metrics["gemm.compressed_total_ms"] = float(gemm["compressed_total_ms"])
            metrics["gemm.original_total_ms"] = float(gemm["original_total_ms"])
    ttft = report.get("ttft")
    if ttft:
        metrics["ttft.ratio"] = float(ttft["ratio"])
        if absolute:
            metrics["ttft.compressed_ms"] = float(ttft["compressed_ms"]["median"])
            metrics["ttft.original_ms"] = float(ttft["original_ms"]["median"])
    return metrics


def compare(
    current: Mapping[str, Any],
    baseline: Mapping[str, Any],
    *,
    max_regression: float = 0.05,
    absolute: bool = False,
    allow_mismatch: bool = False,
) -> GateResult:
    """Compare ``current`` against ``baseline``.

    A metric in the baseline but not in the current report is ``missing`` and fails the gate (a
    layer shape or a whole measurement vanished); a new metric is listed and passes.

    Raises:
        EspaceError: a negative ``max_regression``, or reports measured with other settings (backend,
            sequence, batch) unless ``allow_mismatch``.
    """
    if not max_regression >= 0:
        raise EspaceError(f"--max-regression must be at least 0, got {max_regression}", "try --max-regression 0.05")
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
    before = gate_metrics(baseline, absolute=absolute)
    after = gate_metrics(current, absolute=absolute)
    rows = []
    for metric, value in before.items():
        if metric not in after:
            rows.append(Comparison(metric, value, None, "missing"))
            continue
        row = Comparison(metric, value, after[metric], "ok")
        change = row.change
        if change is not None and change > max_regression:
            row = Comparison(metric, value, after[metric], "regressed")
        elif change is not None and change < -max_regression:
            row = Comparison(metric, value, after[metric], "improved")
        rows.append(row)
    rows += [Comparison(metric, None, value, "new") for metric, value in after.items() if metric not in before]
    return GateResult(tuple(rows), max_regression)


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _change(row: Comparison) -> str:
    return "-" if row.change is None else f"{row.change:+.1%}"


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
    return "\n".join(lines) + "\n"
