"""Progress bars that read the same with or without a terminal (rich, transient=False)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Progress:
    """A thin wrapper so the pipeline reads the same with or without rich progress bars."""

    def __init__(self, enabled: bool) -> None:
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=False,
            )

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Any]:
        if self._progress is None:
            yield lambda: None
            return
        task_id = self._progress.add_task(description, total=total)
        yield lambda: self._progress.advance(task_id)  # type: ignore[union-attr]

    def stepper(self) -> Any:
        """An ``on_step(phase, total)`` callback: one bar per phase, advanced on each call."""
        tasks: dict[str, Any] = {}

        def step(phase: str, total: int) -> None:
            if self._progress is None:
                return
            if phase not in tasks:
                tasks[phase] = self._progress.add_task(phase, total=total)
            self._progress.advance(tasks[phase])

        return step

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
