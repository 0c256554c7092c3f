"""Compression reports: JSON for machines, Markdown and a rich table for people, the selection curve as PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from espace_export.io.artifacts import Plan
from espace_export.io.models import atomic_output


def _summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("targeted params", f"{report['targeted_params_before']:,} → {report['targeted_params_after']:,}"),
        (
            "targeted compression",
            f"{report['targeted_compression']:.3f}"
            + (f" (asked {report['ratio_requested']})" if report.get("ratio_requested") is not None else ""),
        ),
        ("all params", f"{report['total_params_before']:,} → {report['total_params_after']:,}"),
        ("total compression", f"{report['total_compression']:.3f}"),
        ("layers", f"{report['layers_compressed']} compressed, {report['layers_dense']} dense"),
        ("calibration", f"{report['calibration']['source']}, {report['calibration']['batches']} batches"),
    ]
    wins = report.get("selection", {}).get("wins")
    if wins:
        ranked = sorted(wins.items(), key=lambda item: -item[1])
        rows.append(("methods chosen", ", ".join(f"{method} {count}" for method, count in ranked)))
    if report.get("siblings") == "shared":
        groups = {layer["shares_projection_with"] for layer in report["layers"] if "shares_projection_with" in layer}
        rows.append(("siblings", f"shared: {len(groups)} groups read one projection each"))
    for name, fid in report.get("fidelity", {}).get("outputs", {}).items():
        rows.append(
            (
                f"fidelity '{name}'",
                f"rel. L2 {fid['relative_l2']:.4f}, cosine mean {fid['cosine_mean']:.4f} min {fid['cosine_min']:.4f}",
            )
        )
    return rows


def print_summary(report: dict[str, Any], console: Any = None, *, max_layers: int = 40) -> None:
    """Print the layer table and the summary with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=False)
    layers = Table(title="ESPACE layers", show_lines=False, header_style="bold")
    layers.add_column("layer", overflow="fold", ratio=1)
    for column in ("K", "N", "L", "candidate", "compression", "rel. MSE"):
        layers.add_column(column, justify="left" if column == "candidate" else "right", no_wrap=True)
    shown = report["layers"][:max_layers]
    for layer in shown:
        layers.add_row(
            layer["name"],
            str(layer["K"]),
            str(layer["N"]),
            str(layer["L"] if layer["L"] is not None else "dense"),
            layer["candidate"] or "-",
            f"{layer['compression']:.3f}",
            f"{layer['mse_relative']:.4f}" if layer["mse_relative"] is not None else "-",
        )
    if len(report["layers"]) > max_layers:
        layers.add_row(f"… {len(report['layers']) - max_layers} more (see the JSON report)", "", "", "", "", "", "")
    console.print(layers)
    summary = Table(title="Summary", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    for key, value in _summary_rows(report):
        summary.add_row(key, value)
    console.print(summary)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# ESPACE compression report: `{report['model']}`", "", f"Output: `{report['output']}`", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _summary_rows(report)]
    lines += [
        "",
        "| layer | K | N | L | candidate | compression | rel. MSE |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for layer in report["layers"]:
        mse = f"{layer['mse_relative']:.4f}" if layer["mse_relative"] is not None else "-"
        lines.append(
            f"| `{layer['name']}` | {layer['K']} | {layer['N']} | {layer['L'] if layer['L'] is not None else 'dense'} "
            f"| {layer['candidate'] or '-'} | {layer['compression']:.3f} | {mse} |"
        )
    return "\n".join(lines) + "\n"


def write_curve(plan: Plan, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The progressive curve as JSON and as a PNG (matplotlib, Agg) with the inflection point marked."""
    path = Path(path)
    json_path = path.with_suffix(".json")
    png_path = path.with_suffix(".png")
    with atomic_output(json_path) as tmp:
        tmp.write_text(
            json.dumps(
                {"score": plan.score_kind, "knee": plan.knee, "ratio": plan.ratio, "curve": plan.curve}, indent=2
            )
            + "\n"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * p["compression"] for p in plan.curve]
    y = [p["loss"] for p in plan.curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y, marker="o", markersize=3, label="progressive application")
    if plan.knee is not None:
        ax.plot([x[plan.knee]], [y[plan.knee]], "r*", markersize=14, label="inflection point")
    ax.axvline(100 * plan.ratio, color="gray", linestyle="--", linewidth=1, label=f"target {plan.ratio:.0%}")
    ax.set_xlabel("targeted compression (%)")
    ax.set_ylabel(plan.score_kind)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return json_path, png_path


def write_report_files(
    report: Mapping[str, Any],
    json_path: Path,
    markdown: Callable[[Mapping[str, Any]], str],
    chart: Callable[[Mapping[str, Any], Path], None] | None = None,
) -> dict[str, Path]:
    """A report as JSON, its Markdown twin (``.md``) and optionally a PNG chart (``.png``), each written
    atomically: the one writer of compression and profile reports."""
    paths = {"json": json_path, "markdown": json_path.with_suffix(".md")}
    with atomic_output(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_output(paths["markdown"]) as tmp:
        tmp.write_text(markdown(report))
    if chart is not None:
        paths["chart"] = json_path.with_suffix(".png")
        with atomic_output(paths["chart"]) as tmp:
            chart(report, tmp)
    return paths


def write_report(report: dict[str, Any], path: Path) -> None:
    """The compression report: JSON and its Markdown twin."""
    write_report_files(report, path, to_markdown)  # type: ignore[arg-type]
