"""``ovss-label predict --project``: pre-annotate a Label Studio project through the SDK."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import click

from ovss_label.commands.jobs import job_progress, print_report
from ovss_label.lsapi import LabelStudioError, make_client


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
) -> None:
    """Predicts the project's tasks with the server's engine and posts the predictions."""
    from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings
    from ovss_label.backend.server.batch import predict_project

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
        with job_progress(f"project {project}") as progress:
            try:
                report = predict_project(engine, client, project, progress=progress)
            except ValueError as exc:
                raise click.ClickException(f"project {project}: {exc}") from exc
            except Exception as exc:  # SDK and HTTP errors: one line, not a traceback
                raise click.ClickException(
                    f"project {project}: {type(exc).__name__}: {exc}"
                ) from exc
    empty = report.counts.get("empty", 0)
    print_report(report, done="predicted", notes=(
        f"project {project}: {report.done} predicted ({empty} empty), {report.skipped} already "
        f"had model version {report.model_version}",
    ))  # fmt: skip
