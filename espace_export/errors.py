"""The one error type users see."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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


@contextlib.contextmanager
def runtime_errors(what: str, fix: str) -> Iterator[None]:
    """Turn an ONNX Runtime failure on the user's model or data into a one-line :class:`EspaceError`.

    ONNX Runtime's exceptions share no base class beyond ``Exception``; they are told apart by module.
    Other exceptions (our own bugs) pass through unchanged.
    """
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        detail = " ".join(str(exc).split())
        detail = detail.split("Status Message:")[-1].strip() if "Status Message:" in detail else detail
        raise EspaceError(f"ONNX Runtime failed {what}: {detail[:240]}", fix) from None
