"""The ``espace-export`` command line: parses, calls the library, prints. Nothing else.

``espace-export model.onnx --ratio 0.5`` is short for ``espace-export compress model.onnx --ratio 0.5``.
Commands live by stage: :mod:`espace_export.cli.compress` (compress, calibrate, plan, apply) and
:mod:`espace_export.cli.deploy` (build, profile, check); their options come from the option groups of
:mod:`espace_export.cli.groups`.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import typer

from espace_export.cli import compress as _compress_commands  # noqa: F401 — registers the commands
from espace_export.cli import deploy as _deploy_commands  # noqa: F401
from espace_export.cli import heal as _heal_commands  # noqa: F401
from espace_export.cli.app import app
from espace_export.errors import EspaceError

try:  # typer vendors its own click (typer._click) in recent releases; older ones use click itself
    from typer._click import exceptions as click_errors  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef,unused-ignore]


def _format_warning(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
    return f"warning: {message}\n"


def _terminate_like_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary outputs are removed and earlier outputs stay intact."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _quiet_onnxruntime() -> None:
    """ONNX Runtime logs its own errors to stderr; the CLI reports them once, as one line."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps EspaceError to one line on stderr and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {
        command.name or (command.callback.__name__ if command.callback else "") for command in app.registered_commands
    }
    if args and not args[0].startswith("-") and args[0] not in commands:
        args.insert(0, "compress")
    warnings.formatwarning = _format_warning  # type: ignore[assignment]
    _quiet_onnxruntime()
    _terminate_like_interrupt()
    try:
        # not standalone: a usage error is one line like any other bad input (click would print a panel)
        code = app(args=args, prog_name="espace-export", standalone_mode=False)
    except EspaceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except click_errors.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "espace-export"
        typer.echo(f"error: {' '.join(exc.format_message().split())} — see {command} --help", err=True)
        raise SystemExit(exc.exit_code) from None
    except click_errors.ClickException as exc:  # a bad file argument and the like: also one line
        typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:  # Ctrl-C (or SIGTERM, above): the outputs were left as they were
        typer.echo("Aborted!", err=True)
        raise SystemExit(1) from None
    finally:  # under torchrun: leave the process group before exit (a rank exiting inside it could abort)
        from espace_export.calibration import distributed

        distributed.finish()
    raise SystemExit(code if isinstance(code, int) else 0)  # typer.Exit(1): check's "regressed"; as click does


if __name__ == "__main__":  # pragma: no cover
    main()
