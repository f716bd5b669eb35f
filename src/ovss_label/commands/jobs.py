"""How every job looks on a terminal: one progress bar while it runs, one report when it ends.

Jobs (``backend/jobs.py``) report progress to a ``Progress`` and return a ``JobReport``;
this module draws both with rich on stderr (stdout stays for data), so ``predict``,
``predict --project`` and ``tune`` look alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # the backend imports torch: loaded only when a command needs it
    from ovss_label.backend.jobs import JobReport


class RichProgress:
    """A job's ``Progress`` drawn as one rich bar; the description shows the last item."""

    def __init__(self, bar: Progress, description: str) -> None:
        self.bar, self.description = bar, description
        self.task = bar.add_task(description, total=None)

    def total(self, count: int | None) -> None:
        self.bar.update(self.task, total=count)

    def advance(self, item: str = "") -> None:
        self.bar.update(self.task, advance=1, description=escape(item) or self.description)

    def finish(self) -> None:
        """The last item may have failed: the report says so, the bar says done."""
        self.bar.update(self.task, description="done")


@contextmanager
def job_progress(description: str) -> Iterator[RichProgress]:
    """A progress bar on stderr for the duration of a job."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True)) as bar:
        progress = RichProgress(bar, description)
        yield progress
        progress.finish()


def print_report(
    report: JobReport,
    *,
    done: str = "done",
    failure: str = "failed",
    notes: tuple[str, ...] = (),
) -> None:
    """The report as one table, the model version, outputs, ``notes``, then one line per
    failure (the only place a failure is reported). ``done`` names what ``report.done``
    counts; ``failure`` what a failed item is called (``predict`` skips unreadable files)."""
    console = Console(stderr=True, highlight=False)
    table = Table(title=escape(report.job))
    columns = {done: report.done, **report.counts, "done before": report.skipped,
               "failed for now": report.retry, failure: len(report.failed)}  # fmt: skip
    shown = {k: v for k, v in columns.items() if v or k in (done, failure)}
    for name in shown:
        table.add_column(name, justify="right")
    table.add_row(*(str(v) for v in shown.values()))
    console.print(table)
    # soft_wrap: a version or a path is never broken across lines (copy-paste works).
    if report.model_version:
        console.print(f"model_version {escape(report.model_version)}", soft_wrap=True)
    for name, path in report.outputs.items():
        console.print(f"{name}: {escape(str(path))}", soft_wrap=True)
    for note in notes:
        console.print(note, soft_wrap=True)
    if report.retry:
        console.print(f"{report.retry} failed for now: run again to retry them")
    for item, reason in report.failed:
        console.print(f"[yellow]{failure}[/] {escape(item)}: {escape(reason)}", soft_wrap=True)
