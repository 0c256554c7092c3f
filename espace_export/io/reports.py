"""Compression reports: JSON for machines, Markdown and a rich table for people, the selection curve as PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from espace_export.io.artifacts import Plan
from espace_export.io.models import atomic_output, atomic_output_set, strict_json


def settings_line(settings: dict[str, Any], *, note: bool = True) -> str:
    """``recommended (auto, validate)``, ``fast (mse, none): why`` — the preset of a run and what it chose."""
    line = f"{settings['preset']} ({settings['method']}, {settings['select']})"
    return line + (f": {settings['note']}" if note and settings.get("note") else "")


def settings_note(report: dict[str, Any]) -> str | None:
    """One line when the run fell back to the fast settings without being asked (the terminal prints it)."""
    settings = report.get("settings") or {}
    return f"note: {settings_line(settings)}" if settings.get("note") else None


def _summary_rows(report: dict[str, Any], *, notes: bool = True) -> list[tuple[str, str]]:
    settings = report.get("settings")
    rows = [("settings", settings_line(settings, note=notes))] if settings else []
    rows += [
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
    for key, title, verb in (("filled", "filled to the ratio", "raised"), ("rebalanced", "ranks rebalanced", "moved")):
        moved = report.get("selection", {}).get(key)
        if moved:
            prefix = len(common_prefix([layer["name"] for layer in report["layers"]]))
            steps = ", ".join(f"{name[prefix:]} {old}→{new}" for name, (old, new) in list(moved.items())[:4])
            more = f" and {len(moved) - 4} more" if len(moved) > 4 else ""
            rows.append((title, f"ranks {verb} on {len(moved)} unit{'s' * (len(moved) > 1)}: {steps}{more}"))
    for name, fid in report.get("fidelity", {}).get("outputs", {}).items():
        rows.append(
            (
                f"fidelity '{name}'",
                f"rel. L2 {fid['relative_l2']:.4f}, cosine mean {fid['cosine_mean']:.4f} min {fid['cosine_min']:.4f}",
            )
        )
    return rows


_NAME_SEPARATORS = "./"


def common_prefix(names: Sequence[str]) -> str:
    """The longest prefix shared by every name that ends at a ``.`` or ``/`` and leaves each name a last
    component (``model.layers.0.q_proj``, ``model.layers.1.up_proj`` → ``model.layers.``)."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(list(names))
    cut = max(prefix.rfind(sep) for sep in _NAME_SEPARATORS) + 1
    return prefix[:cut]


def short_names(names: Sequence[str]) -> tuple[str, list[str]]:
    """``(prefix, names without it)``: what the terminal shows; the JSON and Markdown reports keep full names."""
    prefix = common_prefix(names)
    return prefix, [name[len(prefix) :] for name in names]


def elide_middle(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters by replacing its middle with ``…`` (both ends say the most)."""
    if len(name) <= width:
        return name
    if width < 3:
        return name[:width]
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


def layer_table(
    title: str,
    names: Sequence[str],
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[str]],
    *,
    width: int = 80,
) -> Any:
    """A rich table of one row per layer that fits ``width`` columns.

    Names lose their common prefix (said once, in the caption) and are never folded over two lines: the
    name column gets what the other columns leave, and a name still longer than that loses its middle.
    ``columns`` are ``(header, justify)`` of the columns after the name, one string per row each.
    """
    from rich import box
    from rich.table import Table

    prefix, shown = short_names(names)
    fixed = [max([len(header)] + [len(row[i]) for row in rows]) for i, (header, _) in enumerate(columns)]
    room = width - sum(fixed) - 2 * len(columns) - 2  # one space either side of each column, edges unpadded
    room = max(room, len("layer"), 12)
    shown = [elide_middle(name, room) for name in shown]
    caption = f"layer names under {prefix}" if prefix else None
    table = Table(
        title=title, caption=caption, box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=True
    )
    table.add_column("layer", no_wrap=True, overflow="ellipsis", max_width=room)
    for (header, justify), size in zip(columns, fixed, strict=True):
        table.add_column(header, justify=justify, no_wrap=True, min_width=size)  # type: ignore[arg-type]
    for name, row in zip(shown, rows, strict=True):
        table.add_row(name, *row)
    return table


def print_summary(report: dict[str, Any], console: Any = None, *, max_layers: int = 40) -> None:
    """Print the layer table and the summary with rich (80 columns suffice: see :func:`layer_table`)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=False)
    shown = report["layers"][:max_layers]
    columns = [("K", "right"), ("N", "right"), ("L", "right"), ("method", "left"), ("compr.", "right"),
               ("out. err.", "right")]  # fmt: skip
    rows = [
        (
            str(layer["K"]),
            str(layer["N"]),
            str(layer["L"] if layer["L"] is not None else "dense"),
            layer["candidate"] or "-",
            f"{layer['compression']:.3f}",
            _relative_error(layer),
        )
        for layer in shown
    ]
    layers = layer_table("ESPACE layers", [layer["name"] for layer in shown], columns, rows, width=console.width)
    if len(report["layers"]) > max_layers:
        layers.add_row(f"… {len(report['layers']) - max_layers} more (JSON report)", "", "", "", "", "", "")
    console.print(layers)
    summary = Table(title="Summary", show_header=False)
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column()
    for key, value in _summary_rows(report, notes=False):  # a fallback's note: one line of its own (emit)
        summary.add_row(key, value)
    console.print(summary)


def _relative_error(layer: dict[str, Any]) -> str:
    """The layer's relative output error ``E‖x(W − AB)‖² / E‖xW‖²`` on the calibration data, any method
    ("-" for dense layers, and in reports of the bounded-memory path, which record only ``mse_relative``)."""
    value = layer.get("output_error_relative")
    return f"{value:.4f}" if value is not None else "-"


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# ESPACE compression report: `{report['model']}`", "", f"Output: `{report['output']}`", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _summary_rows(report)]
    lines += [
        "",
        "| layer | K | N | L | candidate | compression | rel. MSE | rel. output error |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for layer in report["layers"]:
        mse = f"{layer['mse_relative']:.4f}" if layer["mse_relative"] is not None else "-"
        lines.append(
            f"| `{layer['name']}` | {layer['K']} | {layer['N']} | {layer['L'] if layer['L'] is not None else 'dense'} "
            f"| {layer['candidate'] or '-'} | {layer['compression']:.3f} | {mse} | {_relative_error(layer)} |"
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
    """A report as strict JSON (NaN written as null with a note), its Markdown twin (``.md``) and optionally a
    PNG chart (``.png``), committed as one set with the JSON last: the one writer of compression and profile
    reports."""
    paths = {"json": json_path, "markdown": json_path.with_suffix(".md")}
    if chart is not None:
        paths["chart"] = json_path.with_suffix(".png")
    with atomic_output_set(list(paths.values())) as temporaries:
        temporaries[0].write_text(strict_json(report) + "\n")
        temporaries[1].write_text(markdown(report))
        if chart is not None:
            chart(report, temporaries[2])
    return paths


def write_report(report: dict[str, Any], path: Path) -> None:
    """The compression report: JSON and its Markdown twin."""
    write_report_files(report, path, to_markdown)  # type: ignore[arg-type]


def stage_report(report: dict[str, Any], json_path: Path, markdown_path: Path) -> None:
    """The compression report's JSON and Markdown written to the temporaries of an output set that
    commits them with the model (:func:`espace_export.pipeline.model_output_set`)."""
    json_path.write_text(strict_json(report) + "\n")
    markdown_path.write_text(to_markdown(report))
