"""The typer application the commands register on, and how a command prints a report."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from espace_export import __version__

app = typer.Typer(
    name="espace-export",
    help="Compress transformer ONNX models with ESPACE activation projections (NeurIPS 2024) and deploy them.\n\n"
    "Run `espace-export MODEL.onnx --ratio 0.5` (short for `espace-export compress ...`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"espace-export {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Compress transformer ONNX models with ESPACE."""


def emit(report: dict[str, Any], *, quiet: bool, json_out: bool) -> None:
    """The report as JSON on stdout, or as the summary table (nothing with ``quiet``); a fallback to the fast
    settings is said in one line on stderr in every mode."""
    from espace_export.io.reports import settings_note

    note = settings_note(report)
    if note:
        typer.echo(note, err=True)
    if json_out:
        import json

        typer.echo(json.dumps(report, indent=2))
    elif not quiet:
        from espace_export.io.reports import print_summary

        print_summary(report)
