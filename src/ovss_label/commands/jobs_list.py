"""``ovss-label jobs``: the training jobs of a server's data directory (what ``GET /jobs``
returns), as a table."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

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
    """List training jobs, newest first: state, attempts, progress, the held-out mIoU of the
    candidate against the active version (or the zero-shot method), the reason; then each
    scored job's report chart."""
    from ovss_label.backend.learning.jobs import JobStore

    found = JobStore(server_database(data_dir)).list(project, limit)
    table = Table(title=f"training jobs in {escape(str(data_dir))}")
    columns = ("id", "project", "state", "attempts", "progress", "updated", "mIoU", "reason")
    for column in columns:
        table.add_column(column, justify="right" if column in ("id", "project") else "left")
    for job in found:
        progress = "" if job.progress is None else f"{100 * job.progress:.0f}%"
        updated = datetime.datetime.fromtimestamp(job.updated_at).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(job.id), str(job.project), job.state.value,
                      f"{job.attempts}/{job.max_attempts}", progress, updated,
                      _miou(job.result), escape(job.reason))  # fmt: skip
    console = Console()
    console.print(table if found else "no training jobs")
    reports = [(job.id, (job.result or {}).get("report")) for job in found]
    for job_id, report in reports if found else []:
        if isinstance(report, str):
            picture = (data_dir / report).with_suffix(".png")
            console.print(f"job {job_id}: {escape(str(picture))}", highlight=False)


def _miou(result: dict[str, Any] | None) -> str:
    """``candidate (vs active or zero-shot)`` held-out mIoU of a scored job; "" otherwise."""
    miou = (result or {}).get("miou")
    if not isinstance(miou, dict) or miou.get("candidate") is None:
        return ""
    text = f"{miou['candidate']:.3f}"
    for name in ("active", "zero_shot"):
        if miou.get(name) is not None:
            return f"{text} vs {name.replace('_', '-')} {miou[name]:.3f}"
    return text
