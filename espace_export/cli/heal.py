"""``heal``: retrain a compressed model's weights through its static projections, from the ONNX alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from espace_export.cli.app import app
from espace_export.cli.compress import check_outputs
from espace_export.cli.groups import JsonOption, QuietOption, command, progress_wanted

DATA_FIELDS = [
    "calib_data",
    "calib_text",
    "tokenizer",
    "text_rows",
    "batch_size",
    "seq_len",
    "num_batches",
    "holdout",
    "seed",
]


@command(app, groups=(("data", DATA_FIELDS), "heal"))
def heal(
    model: Annotated[Path, typer.Argument(help="The original (dense) model the projections were made for (.onnx).")],
    plan_file: Annotated[
        Path,
        typer.Option("--plan", help="Plan (.json), projections (.npz) or the compressed model (.onnx) to heal."),
    ],
    settings: dict[str, Any],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Healed model \\[default: MODEL.healed.onnx].")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="JSON report \\[default: OUTPUT.report.json; .md twin too].")
    ] = None,
    quiet: QuietOption = False,
    json_out: JsonOption = False,
) -> None:
    """Heal: distil the original model into the compressed one (W trains whole, P static), write it and a report."""
    import json

    from espace_export.heal_onnx import HealOptions, heal_model
    from espace_export.io.models import model_files, plan_files, report_files
    from espace_export.options import DataOptions
    from espace_export.pipeline import default_report

    data = DataOptions(**{k: v for k, v in settings.items() if k in DATA_FIELDS})
    options = HealOptions(**{k: v for k, v in settings.items() if k not in DATA_FIELDS})
    output = output or model.with_name(model.stem + ".healed.onnx")
    report = report or default_report(output)
    plan_inputs = plan_files(plan_file) if plan_file.suffix == ".json" else model_files(plan_file)
    check_outputs(model, settings, {"-o": model_files(output), "--report": report_files(report),
                                    "--checkpoint-dir": options.checkpoint_dir}, **{"--plan": plan_inputs})  # fmt: skip
    result = heal_model(model, plan_file, output, data, options, report=report,
                        progress=progress_wanted(quiet, json_out))  # fmt: skip
    if json_out:
        typer.echo(json.dumps(result.report, indent=2))
    elif not quiet:
        typer.echo(_summary(result.report))
        typer.echo(f"wrote {output} and {report}")


def _summary(report: dict[str, Any]) -> str:
    from espace_export.heal_onnx import cache_overflow, overfit_gap

    line = f"healed {report['layers_healed']} layers in {report['steps']} steps ({report['seconds']:.0f} s), " \
           f"{report['loss']} loss {report['loss_first']:.4g} -> {report['loss_last']:.4g}"  # fmt: skip
    train = report["fidelity"].get("training_batches_after") or {}
    for name, before in report["fidelity"]["before"].items():
        after = report["fidelity"]["after"][name]
        line += f"\n{name}: held-out cosine {before['cosine_mean']:.4f} -> {after['cosine_mean']:.4f}"
        if name in train:
            line += f" (training batches {train[name]['cosine_mean']:.4f})"
    overfit = overfit_gap(report)
    if overfit:
        line += (f"\nthe healing text looks over-fitted (+{overfit[0]:.4f} cosine on it; or the held-out end of the text "
                 "is of another kind): more, or more varied, text heals better")  # fmt: skip
    overflow = cache_overflow(report)
    if overflow:
        line += "\n" + overflow
    return line
