"""Deployment commands: ``build`` (sessions, TensorRT engines, Triton), ``profile`` (latency) and ``check`` (CI gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from espace_export.cli.app import app
from espace_export.cli.groups import command
from espace_export.deploy.options import BuildOptions, ProfileOptions, TritonOptions, from_settings


@command(app, groups=(ProfileOptions,))
def profile(
    original: Annotated[Path, typer.Argument(help="The model before compression (.onnx).")],
    compressed: Annotated[Path, typer.Argument(help="The model `espace-export compress` wrote from it.")],
    settings: dict[str, Any],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="JSON report (default: COMPRESSED.profile.json; .md and .png beside it)."),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="The accepted compressed model (the one the CI baseline measured): timed in the same rounds, "
            "so `check` judges COMPRESSED against it side by side."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON report to stdout.")] = False,
) -> None:
    """Time GEMMs and time-to-first-token of COMPRESSED against ORIGINAL, interleaved, on one backend."""
    from espace_export.deploy.profile import headline
    from espace_export.deploy.profile import profile as run_profile

    log = None if (quiet or json_out) else (lambda line: typer.echo(line, err=True))
    result = run_profile(
        original, compressed, ProfileOptions(**settings).settings(), output=output, log=log, reference=reference
    )
    if json_out:
        import json

        typer.echo(json.dumps(result.report, indent=2))
        return
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ESPACE latency ({result.report['backend']}, M = {result.report['M']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in headline(result.report):
        table.add_row(name, value)
    console = Console()
    console.print(table)
    for note in result.report["notes"]:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {', '.join(str(p) for p in result.paths.values())}")


CHECK_HELP = (
    "CI gate: exit 1 with a table of what regressed beyond --max-regression, 0 otherwise, 2 for unusable input."
    "\n\n"
    "Each metric's 95 % bootstrap interval (lo, hi) of its change decides: regressed (exit 1) when lo is above "
    "--max-regression; uncertain (listed, exit 0) when the change is past it but lo is not (profile with a tighter "
    "--target-interval to decide); improved when hi is below minus the allowance; ok otherwise."
    "\n\n"
    "TTFT: profile CURRENT with --reference ACCEPTED.onnx (the model the baseline measured) and the verdict is "
    "ttft.vs_reference, both timed in the same interleaved rounds, which cancels the runner's drift (a cross-run "
    "ratio drifts by 6 % and more on a shared runner); the cross-run ratios (ttft, GEMM total and shapes) are then "
    "shown as drift, not gated."
)


@app.command(help=CHECK_HELP)
def check(
    current: Annotated[Path, typer.Argument(help="The profile report to judge (JSON from `espace-export profile`).")],
    baseline: Annotated[Path, typer.Option(help="The accepted profile report to compare against.")],
    max_regression: Annotated[
        float, typer.Option(help="Largest allowed relative worsening of a metric (0.05 = 5%).")
    ] = 0.05,
    absolute: Annotated[
        bool, typer.Option("--absolute", help="Also gate the absolute medians (same machine only).")
    ] = False,
    allow_mismatch: Annotated[
        bool, typer.Option("--allow-mismatch", help="Compare reports measured with other backend/seq/batch.")
    ] = False,
    summary: Annotated[
        Path | None, typer.Option(help="Also write the table as Markdown here (e.g. $GITHUB_STEP_SUMMARY).")
    ] = None,
) -> None:
    """CI gate: exit 1 with a table of what regressed beyond --max-regression, 0 otherwise (see CHECK_HELP)."""
    from rich.console import Console
    from rich.table import Table

    from espace_export.deploy.gate import append_summary, compare, load_report, summary_path, table_rows

    summary = summary_path(summary, reports=(current, baseline))  # checked before the gate runs
    result = compare(
        load_report(current),
        load_report(baseline),
        max_regression=max_regression,
        absolute=absolute,
        allow_mismatch=allow_mismatch,
    )
    verdict = "passed" if result.passed else f"FAILED: {len(result.failures)} metric(s) regressed"
    table = Table(title=f"ESPACE latency gate (max regression {max_regression:.1%}): {verdict}")
    for column in ("metric", "baseline", "current", "change", "status"):
        table.add_column(column, justify="left" if column in ("metric", "status") else "right")
    styles = {"regressed": "bold red", "missing": "bold red", "improved": "green", "uncertain": "yellow"}
    for row in table_rows(result):
        table.add_row(*row, style=styles.get(row[-1]))
    Console().print(table)
    append_summary(result, summary)  # appended: CI summaries collect several steps
    if not result.passed:
        raise typer.Exit(1)


@command(app, groups=(BuildOptions, TritonOptions))
def build(
    model: Annotated[Path, typer.Argument(help="The ONNX model to build (external data beside it is fine).")],
    settings: dict[str, Any],
) -> None:
    """Build MODEL for a backend (ONNX Runtime session or TensorRT engine), test-run it, write a Triton repo."""
    from espace_export.deploy.build import build_model

    options = from_settings(BuildOptions, settings)
    triton = from_settings(TritonOptions, settings)

    def show_plan(plan: Any) -> None:
        typer.echo(
            f"TensorRT {plan.trt_major}: {'strongly' if plan.strongly_typed else 'weakly'} typed, "
            f"flags [{', '.join(plan.builder_flags)}], precision {plan.precision}",
            err=True,
        )
        for note in plan.notes:
            typer.echo(f"note: {note}", err=True)

    result = build_model(model, options.backend, options.settings(model), seq=options.seq, batch=options.batch,
                         save_engine=options.save_engine, triton=triton, on_plan=show_plan)  # fmt: skip
    if result.profile is not None:
        for which, shapes in result.profile.as_strings().items():
            typer.echo(f"profile {which}: {shapes}")
    typer.echo(f"{result.backend} on {result.device}: first run at seq {options.seq} took {result.first_run_ms:.3g} ms")
    if result.engine is not None:
        typer.echo(f"wrote {result.engine}")
    if result.triton is not None:
        typer.echo(f"wrote Triton model {result.triton}")
