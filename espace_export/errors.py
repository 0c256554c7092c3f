"""The one error type users see."""

from __future__ import annotations


class EspaceError(Exception):
    """A problem with the user's input or environment.

    The message names the problem and the fix, in one line; the CLI prints it
    as ``error: <message>`` and exits with status 2. Internal bugs raise other
    exception types and keep their tracebacks.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)
