"""``ovss-label predict --project``: pre-annotate a Label Studio project through the SDK."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ovss_label.commands.jobs import job_progress, print_report
from ovss_label.lsapi import LabelStudioError, make_client, order_by_uncertainty

if TYPE_CHECKING:  # the backend imports torch: loaded only when a command needs it
    from ovss_label.backend.jobs import JobReport
    from ovss_label.backend.scale import RayOptions


def run_project(
    project: int,
    url: str | None,
    api_key: str | None,
    *,
    method: str,
    tiny: bool,
    device: str,
    head: str | None = None,
    data_dir: Path | None = None,
    ray: RayOptions | None = None,
    uncertainty: bool = False,
) -> None:
    """Predicts the project's tasks with the server's engine and posts the predictions
    (``ray``: on Ray, ``backend/scale/ray_project.py``); ``uncertainty``: then makes Label
    Studio serve the least confident task first (``lsapi.order_by_uncertainty``)."""
    from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings

    if not url:
        raise click.UsageError("--project needs --url (or LABEL_STUDIO_URL)")
    try:
        client = make_client(url, api_key or "")
    except LabelStudioError as exc:
        raise click.UsageError(str(exc)) from exc
    media = replace(MediaPolicy.from_env(), ls_url=url, ls_token=api_key)
    # The server's data directory, when given, brings the project's active trained version.
    with tempfile.TemporaryDirectory() as scratch:
        settings = ServerSettings(method=method, tiny=tiny, device=device, fmbseg_head=head,
                                  data_dir=data_dir or Path(scratch), workers=1,
                                  media=media)  # fmt: skip
        engine = Engine(settings)
        try:
            report = _predict(engine, client, project, ray)
        except ValueError as exc:
            raise click.ClickException(f"project {project}: {exc}") from exc
        except Exception as exc:  # SDK, HTTP and Ray errors: one line, not a traceback
            raise click.ClickException(f"project {project}: {type(exc).__name__}: {exc}") from exc
    empty = report.counts.get("empty", 0)
    notes = [f"project {project}: {report.done} predicted ({empty} empty), {report.skipped} "
             f"already had model version {report.model_version}"]  # fmt: skip
    if uncertainty:
        try:
            order_by_uncertainty(client, project, report.model_version)
        except LabelStudioError as exc:
            raise click.ClickException(f"project {project}: {exc}") from exc
        notes.append(f"Label Studio now serves the tasks {report.model_version} is least sure of "
                     "first (uncertainty sampling)")  # fmt: skip
    print_report(report, done="predicted", notes=tuple(notes))


def _predict(engine: Any, client: Any, project: int, ray: RayOptions | None) -> JobReport:
    """The job, under a progress bar; on Ray, with Ray's own progress."""
    if ray is not None:
        from ovss_label.backend.scale.ray_project import predict_project_ray

        return predict_project_ray(engine, client, project, options=ray)
    from ovss_label.backend.server.batch import predict_project

    with job_progress(f"project {project}") as progress:
        return predict_project(engine, client, project, progress=progress)
