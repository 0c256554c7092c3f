"""Deployment commands: ``build`` (sessions, TensorRT engines, Triton), ``profile`` (latency) and ``check`` (CI gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from espace_export.cli.app import app
from espace_export.deploy.build import BACKENDS, GRAPH_BACKENDS
from espace_export.deploy.profile import GEMM_DTYPES
from espace_export.deploy.serving import INSTANCE_KINDS
from espace_export.errors import EspaceError
from espace_export.runtime import OPTIMIZATION_LEVELS

Backend: Any = Literal[BACKENDS]  # typer offers a Literal's values as the choices
GraphBackend: Any = Literal[GRAPH_BACKENDS]
GemmDtype: Any = Literal[GEMM_DTYPES]
Optimization: Any = Literal[OPTIMIZATION_LEVELS]
Instance: Any = Literal[tuple(INSTANCE_KINDS)]


_ENGINE = "TensorRT engine"
_TRITON = "Triton"


@app.command()
def profile(
    original: Annotated[Path, typer.Argument(help="The model before compression (.onnx).")],
    compressed: Annotated[Path, typer.Argument(help="The model `espace-export compress` wrote from it.")],
    backend: Annotated[
        Backend,
        typer.Option(help="Where to time: ONNX Runtime, TensorRT, or FP16 GEMMs in PyTorch/cuBLAS."),
    ] = "ort-cpu",
    ttft_backend: Annotated[
        GraphBackend | None,
        typer.Option(
            help="Backend for TTFT (default: --backend; torch-cuda times GEMMs only).",
        ),
    ] = None,
    seq: Annotated[int, typer.Option(help="Prompt length: GEMMs run at M = batch × seq.")] = 512,
    batch: Annotated[int, typer.Option(help="Prompts per prefill (TTFT is defined at 1).")] = 1,
    warmup: Annotated[int, typer.Option(help="Untimed runs of each side first.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed runs of each side, interleaved.")] = 10,
    gemm: Annotated[bool, typer.Option("--gemm/--no-gemm", help="Time the GEMMs layer by layer.")] = True,
    ttft: Annotated[bool, typer.Option("--ttft/--no-ttft", help="Time the whole prefill.")] = True,
    gemm_dtype: Annotated[
        GemmDtype | None,
        typer.Option(help="GEMM operand dtype (default: float32 on ort-cpu, float16 on GPUs)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads (default: one per core).")] = None,
    optimization: Annotated[Optimization, typer.Option(help="ONNX Runtime graph optimisation level.")] = "all",
    fp16: Annotated[
        bool, typer.Option("--fp16/--no-fp16", help="FP16 kernels on tensorrt/ort-tensorrt.", rich_help_panel=_ENGINE)
    ] = True,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="JSON report (default: COMPRESSED.profile.json; .md and .png beside it)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON report to stdout.")] = False,
) -> None:
    """Time GEMMs and time-to-first-token of COMPRESSED against ORIGINAL, interleaved, on one backend."""
    from espace_export.deploy.build import BuildSettings
    from espace_export.deploy.profile import ProfileSettings, headline
    from espace_export.deploy.profile import profile as run_profile
    from espace_export.deploy.tensorrt import EngineOptions

    settings = ProfileSettings(
        backend=backend,
        ttft_backend=ttft_backend,
        seq=seq,
        batch=batch,
        warmup=warmup,
        repeats=repeats,
        gemm=gemm,
        ttft=ttft,
        gemm_dtype=gemm_dtype,
        build=BuildSettings(threads=threads, optimization=optimization, engine=EngineOptions(fp16=fp16)),
    )
    log = None if (quiet or json_out) else (lambda line: typer.echo(line, err=True))
    result = run_profile(original, compressed, settings, output=output, log=log)
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


@app.command()
def build(
    model: Annotated[Path, typer.Argument(help="The ONNX model to build (external data beside it is fine).")],
    backend: Annotated[GraphBackend, typer.Option(help="What to build for.")] = "ort-cpu",
    seq: Annotated[
        int, typer.Option(help="Typical prompt length: the profile's opt sequence, and the test run's.")
    ] = 512,
    max_seq: Annotated[
        int | None, typer.Option(help="Longest sequence the engine accepts (default: --seq).", rich_help_panel=_ENGINE)
    ] = None,
    batch: Annotated[int, typer.Option(help="Typical batch: the profile's opt batch.")] = 1,
    max_batch: Annotated[
        int | None, typer.Option(help="Largest batch the engine accepts (default: --batch).", rich_help_panel=_ENGINE)
    ] = None,
    min_shapes: Annotated[
        list[str] | None,
        typer.Option(help="Explicit profile minimum, e.g. input_ids:1x1 (repeatable).", rich_help_panel=_ENGINE),
    ] = None,
    opt_shapes: Annotated[
        list[str] | None, typer.Option(help="Explicit profile optimum, e.g. input_ids:1x512.", rich_help_panel=_ENGINE)
    ] = None,
    max_shapes: Annotated[
        list[str] | None, typer.Option(help="Explicit profile maximum, e.g. input_ids:1x2048.", rich_help_panel=_ENGINE)
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16", help="FP16 kernels.", rich_help_panel=_ENGINE)] = True,
    strongly_typed: Annotated[
        bool | None,
        typer.Option(
            "--strongly-typed/--no-strongly-typed",
            help="Network typing (default: from the model and TensorRT version).",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    workspace_gib: Annotated[
        float | None, typer.Option(help="Builder workspace limit in GiB.", rich_help_panel=_ENGINE)
    ] = None,
    builder_optimization_level: Annotated[
        int | None, typer.Option(help="TensorRT builder optimisation level 0-5.", rich_help_panel=_ENGINE)
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option(help="TensorRT timing cache file (read and updated).", rich_help_panel=_ENGINE)
    ] = None,
    save_engine: Annotated[
        Path | None,
        typer.Option(help="Write the TensorRT engine here (default: MODEL.plan).", rich_help_panel=_ENGINE),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="ONNX Runtime TensorRT provider engine cache (ort-tensorrt).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="TensorRT's verbose log.")] = False,
    triton_repo: Annotated[
        Path | None, typer.Option(help="Write a Triton model repository here.", rich_help_panel=_TRITON)
    ] = None,
    triton_name: Annotated[
        str | None, typer.Option(help="Model name in the repository (default: from MODEL).", rich_help_panel=_TRITON)
    ] = None,
    triton_version: Annotated[int, typer.Option(help="Version folder.", rich_help_panel=_TRITON)] = 1,
    max_batch_size: Annotated[
        int,
        typer.Option(
            help="Triton max_batch_size (0: no batching; dims carry the batch axis).", rich_help_panel=_TRITON
        ),
    ] = 0,
    triton_instance: Annotated[
        Instance | None,
        typer.Option(
            help="instance_group kind (default: cpu for ort-cpu, else gpu).",
            rich_help_panel=_TRITON,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing model in the repository.", rich_help_panel=_TRITON)
    ] = False,
) -> None:
    """Build MODEL for a backend (ONNX Runtime session or TensorRT engine), test-run it, write a Triton repo."""
    from espace_export.deploy.build import BuildSettings, build_model
    from espace_export.deploy.tensorrt import EngineOptions, profile_for_model

    profile_shapes = None
    if backend in ("tensorrt", "ort-tensorrt"):
        profile_shapes = profile_for_model(
            model,
            seq=seq,
            max_seq=max_seq,
            batch=batch,
            max_batch=max_batch,
            min_shapes=min_shapes,
            opt_shapes=opt_shapes,
            max_shapes=max_shapes,
        )
    elif min_shapes or opt_shapes or max_shapes or max_seq is not None or max_batch is not None:
        raise EspaceError("shape profiles apply to TensorRT", "add --backend tensorrt or ort-tensorrt")
    settings = BuildSettings(
        threads=threads,
        profile=profile_shapes,
        cache_dir=cache_dir,
        engine=EngineOptions(
            fp16=fp16,
            strongly_typed=strongly_typed,
            workspace_gib=workspace_gib,
            optimization_level=builder_optimization_level,
            timing_cache=timing_cache,
            verbose=verbose,
        ),
    )

    def show_plan(plan: Any) -> None:
        typer.echo(
            f"TensorRT {plan.trt_major}: {'strongly' if plan.strongly_typed else 'weakly'} typed, "
            f"flags [{', '.join(plan.builder_flags)}], precision {plan.precision}",
            err=True,
        )
        for note in plan.notes:
            typer.echo(f"note: {note}", err=True)

    result = build_model(
        model,
        backend,
        settings,
        seq=seq,
        batch=batch,
        save_engine=save_engine,
        triton_repo=triton_repo,
        triton_name=triton_name,
        triton_version=triton_version,
        max_batch_size=max_batch_size,
        triton_instance=triton_instance,
        overwrite=overwrite,
        on_plan=show_plan,
    )
    if result.profile is not None:
        for which, shapes in result.profile.as_strings().items():
            typer.echo(f"profile {which}: {shapes}")
    typer.echo(f"{result.backend} on {result.device}: first run at seq {seq} took {result.first_run_ms:.3g} ms")
    if result.engine is not None:
        typer.echo(f"wrote {result.engine}")
    if result.triton is not None:
        typer.echo(f"wrote Triton model {result.triton}")
