"""The one in-process runner of the ``espace-export`` command line used by the tests."""

from __future__ import annotations


def run_cli(args: list[str], capsys: object) -> tuple[int, str, str]:
    """``espace-export ARGS`` in-process: (exit status, stdout, stderr)."""
    from espace_export.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()  # type: ignore[attr-defined]
    return code, out, err
