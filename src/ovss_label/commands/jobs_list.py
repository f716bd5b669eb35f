"""``ovss-label jobs``: the training jobs of a server's data directory (what ``GET /jobs``
returns), as a table."""

from __future__ import annotations

import datetime
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ovss_label.commands.options import data_dir_option, server_database


@click.command("jobs")
@click.option("--project", type=int, help="Only this Label Studio project's jobs.")
@data_dir_option
@click.option("--limit", default=50, show_default=True, help="Newest jobs shown.")
def jobs(project: int | None, data_dir: Path, limit: int) -> None:
    """List training jobs: state, attempts, progress, reason, newest first."""
    from ovss_label.backend.learning.jobs import JobStore

    found = JobStore(server_database(data_dir)).list(project, limit)
    table = Table(title=f"training jobs in {escape(str(data_dir))}")
    for column in ("id", "project", "state", "attempts", "progress", "updated", "reason"):
        table.add_column(column, justify="right" if column in ("id", "project") else "left")
    for job in found:
        progress = "" if job.progress is None else f"{100 * job.progress:.0f}%"
        updated = datetime.datetime.fromtimestamp(job.updated_at).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(job.id), str(job.project), job.state.value,
                      f"{job.attempts}/{job.max_attempts}", progress, updated,
                      escape(job.reason))  # fmt: skip
    Console().print(table if found else "no training jobs")
