"""``compress`` and its stages ``calibrate``, ``plan``, ``apply``: parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from espace_export.cli.app import app, emit
from espace_export.cli.groups import JsonOption, ModelArgument, QuietOption, command, progress_wanted

LIBRARY = ("data", "ranks", "selection")


def check_outputs(model: Path, settings: dict[str, Any], outputs: dict[str, Any], **inputs: Any) -> None:
    """A staged command's outputs against its inputs (model and its data files, data sources, tokenizer)."""
    from espace_export.io.data import is_builtin_text
    from espace_export.io.models import check_distinct_paths

    texts = [
        settings.get(k)
        for k in ("calib_text", "valid_text")
        if settings.get(k) is not None and not is_builtin_text(settings[k])
    ]
    sources = {"MODEL": model, "--calib-data": settings.get("calib_data"), "--valid-data": settings.get("valid_data"),
               "--calib-text": texts, "--tokenizer": settings.get("tokenizer"), **inputs}  # fmt: skip
    check_distinct_paths(sources, outputs)


@command(app, groups=(*LIBRARY, "output"))
def compress(
    model: ModelArgument, settings: dict[str, Any], quiet: QuietOption = False, json_out: JsonOption = False
) -> None:
    """Calibrate ESPACE projections and write a compressed ONNX model plus a report."""
    from espace_export.pipeline import compress as run

    progress = progress_wanted(quiet, json_out)
    if model.is_dir():  # an optimum or onnxruntime-genai folder in, a drop-in folder out
        from espace_export.folders import compress_into_folder, resolve_model_folder

        folder = resolve_model_folder(model)
        settings["tokenizer"] = settings.get("tokenizer") or folder.tokenizer_dir
        out_dir = settings.pop("output", None) or model.with_name(model.name + ".espace")
        report = settings.pop("report", None)  # default: OUTDIR.report.json, beside the folder
        result = compress_into_folder(
            folder,
            out_dir,
            report,
            lambda path, at: run(folder.model, **settings, output=path, report=at, progress=progress),
        )
        emit(result.report, quiet=quiet, json_out=json_out)
        if not (quiet or json_out):
            typer.echo(f"wrote {out_dir} and {result.report_path}")
        return
    result = run(model, **settings, progress=progress)
    emit(result.report, quiet=quiet, json_out=json_out)
    if not (quiet or json_out):
        typer.echo(f"wrote {result.output} and {result.report_path}")


@command(app, groups=LIBRARY)
def calibrate(
    model: ModelArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="Statistics file (.npz) to write.")],
    settings: dict[str, Any],
    quiet: QuietOption = False,
    json_out: JsonOption = False,
) -> None:
    """Stage 1: collect activation (and, for nl-mse, gradient) statistics of every layer not excluded."""
    from espace_export.calibration import distributed
    from espace_export.io.artifacts import save_calibration
    from espace_export.io.models import check_writable
    from espace_export.pipeline import calibrate as run

    check_writable(output)
    check_outputs(model, settings, {"-o": output})
    calibration = run(model, every_layer=True, **settings, progress=progress_wanted(quiet, json_out))
    if not distributed.is_main_rank():  # rank 0 writes the all-reduced statistics
        return
    save_calibration(calibration, output)
    summary = {"statistics": str(output), "activations": len(calibration.stats),
               "gradients": calibration.gradients is not None, **calibration.info}  # fmt: skip
    typer.echo(json.dumps(summary, indent=2) if json_out else f"wrote {output}")


@command(app, groups=(*LIBRARY, ("output", ["curve"])))
def plan(
    model: ModelArgument,
    statistics: Annotated[Path, typer.Option(help="Statistics from `espace-export calibrate`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Plan to write (.json; factors in .npz beside it).")],
    settings: dict[str, Any],
    quiet: QuietOption = False,
    json_out: JsonOption = False,
) -> None:
    """Stage 2: decide per layer (method, rank, selected) from saved statistics."""
    from espace_export.io.artifacts import save_plan
    from espace_export.io.models import check_writable
    from espace_export.io.reports import write_curve
    from espace_export.pipeline import plan as run
    from espace_export.selection.planner import plan_summary

    check_writable(output)
    curve = settings.pop("curve", None)
    from espace_export.io.models import curve_files, plan_files

    check_outputs(model, settings, {"-o": plan_files(output), "--curve": curve_files(curve) if curve else None},
                  **{"--statistics": statistics})  # fmt: skip
    chosen = run(model, statistics, **settings, progress=progress_wanted(quiet, json_out))
    from espace_export.calibration import distributed

    if not distributed.is_main_rank():  # under torchrun the ranks shared the trials; rank 0 writes the plan
        return
    save_plan(chosen, output)
    if curve is not None and chosen.curve:
        write_curve(chosen, curve)
    from espace_export.io.models import load_model
    from graph_passes import find_targets

    targets = find_targets(load_model(model, load_weights=False), include_heads=settings.get("include_heads", False))
    summary = {"plan": str(output), **plan_summary(chosen, targets)}
    typer.echo(json.dumps(summary, indent=2) if json_out else f"wrote {output}")


@command(app, groups=(*LIBRARY, ("output", ["output", "report", "external_data"])))
def apply(
    model: Annotated[Path, typer.Argument(help="The exported transformer (.onnx) the plan was made for.")],
    plan_file: Annotated[Path, typer.Option("--plan", help="Plan from `espace-export plan`.")],
    settings: dict[str, Any],
    quiet: QuietOption = False,
    json_out: JsonOption = False,
) -> None:
    """Stage 3: rewrite the model by a plan (rejected if made for other weights) and write it with a report."""
    from espace_export.io.models import plan_files
    from espace_export.pipeline import apply as run

    out = settings.get("output")
    if out is not None:
        from espace_export.io.models import model_files

        check_outputs(model, settings, {"-o": model_files(out)}, **{"--plan": plan_files(plan_file)})
    result = run(model, plan_file, **settings, progress=progress_wanted(quiet, json_out))
    emit(result.report, quiet=quiet, json_out=json_out)
    if not (quiet or json_out):
        typer.echo(f"wrote {result.output} and {result.report_path}")


@command(
    app, name="inspect", groups=(("ranks", ["rank_rule", "min_rank", "rank", "siblings", "include_heads", "exclude"]),)
)
def inspect_command(
    model: ModelArgument,
    settings: dict[str, Any],
    ratio: Annotated[
        list[float] | None,
        typer.Option("--ratio", "-r", help="Ratios to evaluate (repeatable) [default: 0.3 0.5 0.7]."),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Look before calibrating: targets, K×N, sibling groups, dense heads and why, compression per ratio."""
    from espace_export.inspection import DEFAULT_RATIOS, inspect_model, print_inspection

    result = inspect_model(model, ratios=tuple(ratio or DEFAULT_RATIOS), **settings)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_inspection(result)
