"""The CI gate: a planted regression fails it, an unchanged report passes it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import onnx
import pytest

from espace_export.deploy.build import BuildSettings
from espace_export.deploy.gate import compare, gate_metrics, load_report, to_markdown
from espace_export.deploy.profile import ProfileSettings, profile
from espace_export.errors import EspaceError
from tests._cli import run_cli
from tests._models import compress_tiny, tiny_decoder


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real profile report of the tiny model (measured once for the module)."""
    directory = tmp_path_factory.mktemp("gate")
    original = tiny_decoder()
    paths = directory / "tiny.onnx", directory / "tiny.espace.onnx"
    onnx.save(original, str(paths[0]))
    onnx.save(compress_tiny(original), str(paths[1]))
    settings = ProfileSettings(seq=8, warmup=0, repeats=2, build=BuildSettings(threads=1))
    return profile(*paths, settings, output=directory / "base.json").paths["json"]


def write(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(report))
    return path


def planted(report: dict[str, Any], factor: float = 1.10) -> dict[str, Any]:
    slower = copy.deepcopy(report)
    slower["ttft"]["ratio"] *= factor
    return slower


def test_unchanged_report_passes_and_planted_ten_percent_regression_fails(
    baseline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["check", str(baseline), "--baseline", str(baseline), "--max-regression", "0.05"], capsys)
    assert code == 0 and "passed" in out
    current = write(planted(load_report(baseline)), tmp_path / "current.json")
    code, out, _ = run_cli(["check", str(current), "--baseline", str(baseline), "--max-regression", "0.05"], capsys)
    assert code == 1
    assert "FAILED: 1 metric(s) regressed" in out
    regressed = [line for line in out.splitlines() if "regressed" in line and "ttft.ratio" in line]
    assert len(regressed) == 1 and "+10.0%" in regressed[0]


def test_a_regression_within_the_allowance_passes(baseline: Path) -> None:
    report = load_report(baseline)
    assert compare(planted(report, 1.04), report, max_regression=0.05).passed
    assert not compare(planted(report, 1.06), report, max_regression=0.05).passed


def test_every_gemm_shape_is_gated_and_a_vanished_one_fails(baseline: Path) -> None:
    report = load_report(baseline)
    metrics = gate_metrics(report)
    compressed_shapes = [row for row in report["gemm"]["groups"] if row["L"] is not None]
    assert {f"gemm[{row['label']}].ratio" for row in compressed_shapes} <= set(metrics)
    assert {"gemm.ratio", "ttft.ratio"} <= set(metrics)
    slower_shape = copy.deepcopy(report)
    slower_shape["gemm"]["groups"][0]["ratio"] *= 1.5
    result = compare(slower_shape, report)
    assert [row.metric for row in result.failures] == [f"gemm[{report['gemm']['groups'][0]['label']}].ratio"]
    fewer = copy.deepcopy(report)
    del fewer["ttft"]
    result = compare(fewer, report)
    assert [(row.metric, row.status) for row in result.failures] == [("ttft.ratio", "missing")]
    assert compare(report, fewer).passed  # a new metric is listed, not failed
    assert any(row.status == "new" for row in compare(report, fewer).rows)


def test_absolute_medians_are_gated_only_when_asked(baseline: Path) -> None:
    report = load_report(baseline)
    slower_machine = copy.deepcopy(report)
    slower_machine["ttft"]["compressed_ms"]["median"] *= 2
    assert compare(slower_machine, report).passed
    result = compare(slower_machine, report, absolute=True)
    assert [row.metric for row in result.failures] == ["ttft.compressed_ms"]


def test_improvements_are_marked_and_the_markdown_table_lists_rows(baseline: Path) -> None:
    report = load_report(baseline)
    result = compare(planted(report, 0.5), report)
    assert result.passed
    assert next(r for r in result.rows if r.metric == "ttft.ratio").status == "improved"
    markdown = to_markdown(compare(planted(report), report))
    assert "**failed**" in markdown and "| ttft.ratio |" in markdown and "+10.0%" in markdown


def test_reports_measured_differently_are_refused_unless_allowed(baseline: Path) -> None:
    report = load_report(baseline)
    other = copy.deepcopy(report)
    other["seq"] = 4096
    with pytest.raises(EspaceError, match="measured differently"):
        compare(other, report)
    assert compare(other, report, allow_mismatch=True).passed
    with pytest.raises(EspaceError, match="max-regression"):
        compare(report, report, max_regression=-0.1)


def test_load_report_rejects_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compress_report = write({"tool": "espace-export", "layers": []}, tmp_path / "model.report.json")
    with pytest.raises(EspaceError, match="not a profile report"):
        load_report(compress_report)
    code, _, err = run_cli(["check", str(tmp_path / "none.json"), "--baseline", str(compress_report)], capsys)
    assert code == 2 and err.startswith("error: report not found")


def test_summary_file_collects_the_markdown(baseline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    run_cli(["check", str(baseline), "--baseline", str(baseline), "--summary", str(summary)], capsys)
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "ESPACE latency gate: passed" in text
