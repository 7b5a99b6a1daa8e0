"""Rich progress bars for long work (training, sampling, evaluation)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass
class Bar:
    progress: Progress
    task: TaskID

    def advance(self, n: float = 1, loss: float | None = None) -> None:
        status = {} if loss is None else {"status": f"loss {loss:.4f}"}
        self.progress.update(self.task, advance=n, **status)


@contextmanager
def progress_bar(description: str, total: float, status: str = "") -> Iterator[Bar]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, status=status)
        yield Bar(progress, task)
