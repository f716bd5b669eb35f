"""Batch pre-annotation of a whole Label Studio project, written back through the SDK.

"Retrieve predictions" sends every selected task in one synchronous request with a 100 s
timeout, which a CPU backend cannot meet for more than a few images. This job instead walks the
project's tasks, predicts each with the server's own engine (same media rules, same
``model_version``), and posts each prediction as soon as it is ready. Tasks that already have a
prediction with this ``model_version`` are skipped, so an interrupted run resumes where it
stopped and a repeated run adds nothing. A task that failed for now (a timeout, a 5xx) gets no
prediction, so the next run tries it again; one that failed for good gets an empty prediction.
"""

from __future__ import annotations

import logging
from typing import Any

from ..jobs import JobReport, NoProgress, Progress
from .engine import Engine

log = logging.getLogger(__name__)


def _task_dict(task: Any) -> dict[str, Any]:
    if isinstance(task, dict):
        return task
    dumped: dict[str, Any] = task.model_dump() if hasattr(task, "model_dump") else dict(task)
    return dumped


def project_work(
    engine: Engine, client: Any, project_id: int
) -> tuple[Any, str | None, str, set[Any], list[dict[str, Any]]]:
    """What ``predict --project`` works on (here and on Ray): the project's parsed config, the
    head serving it (its active trained version, else None: its zero-shot method), that
    ``model_version``, the ids of tasks already carrying it, and every task as a dict."""
    project = client.projects.get(id=project_id)
    parsed, head = engine.served(str(project.label_config or ""), project_id)
    version = engine.model_version(parsed.method, head)
    done = {
        p.task
        for p in client.predictions.list(project=project_id)
        if getattr(p, "model_version", None) == version
    }
    tasks = [_task_dict(t) for t in client.tasks.list(project=project_id, fields="all")]
    return parsed, head, version, done, tasks


def predict_project(
    engine: Engine,
    client: Any,
    project_id: int,
    *,
    progress: Progress | None = None,
) -> JobReport:
    """The ``predict --project`` job (``jobs.py``): predicts every task of ``project_id``
    that lacks this model's prediction; its state is Label Studio's own predictions. The
    report counts ``done``, ``skipped`` (already predicted), ``retry`` (failed for now) and
    ``counts["empty"]`` (failed for good: an empty prediction was posted)."""
    progress = progress or NoProgress()
    parsed, head, version, done, tasks = project_work(engine, client, project_id)
    progress.total(len(tasks))
    report = JobReport(f"predict --project {project_id}", version)
    for task in tasks:
        if task.get("id") in done:
            report.skipped += 1
        else:
            prediction = engine.predict_task(task, parsed, head=head, project_id=project_id)
            if prediction is None:  # failed for now (engine.py): the next run tries again
                report.retry += 1
            else:
                report.count("empty", not prediction["result"])
                client.predictions.create(
                    task=task["id"],
                    result=prediction["result"],
                    score=prediction["score"],
                    model_version=prediction["model_version"],
                )
                report.done += 1
        progress.advance(f"task {task.get('id')}")
    return report
