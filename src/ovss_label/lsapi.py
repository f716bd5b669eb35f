"""Talking to a live Label Studio through the PyPI ``label-studio-sdk`` (legacy tokens and PATs).

The SDK client picks ``Token`` or ``Bearer`` and refreshes personal access tokens itself; this
module only builds it and turns its errors into one actionable line.
"""

from __future__ import annotations

from typing import Any

import httpx


class LabelStudioError(RuntimeError):
    """A call to Label Studio failed; the message says what to check."""


def make_client(url: str, api_key: str, *, httpx_client: httpx.Client | None = None) -> Any:
    """A ``label_studio_sdk.LabelStudio`` client for ``url`` (imported lazily: it is slow)."""
    from label_studio_sdk.client import LabelStudio

    if not url.startswith(("http://", "https://")):
        raise LabelStudioError(f"Label Studio URL must start with http:// or https://, got {url!r}")
    if not api_key:
        raise LabelStudioError("no API key: pass --api-key or set LABEL_STUDIO_API_KEY")
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, httpx_client=httpx_client)


def fetch_project_export(client: Any, project_id: int) -> tuple[list[dict[str, Any]], str]:
    """The project's JSON export (all tasks) and its labeling config."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        project = client.projects.get(id=project_id)
        tasks = client.projects.exports.as_json(project_id)
    except ApiError as err:
        raise LabelStudioError(_explain(err, project_id)) from err
    except httpx.HTTPError as err:
        raise LabelStudioError(f"cannot reach Label Studio: {err}") from err
    if not isinstance(tasks, list):
        raise LabelStudioError(f"project {project_id} export is not a task list")
    return tasks, str(project.label_config or "")


def attach_predictions(
    client: Any, project_id: int, tasks: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``tasks`` with each one's predictions as objects: Label Studio's JSON export lists only
    their ids (``"predictions": [12]``), so they are read from ``/api/predictions``."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        found = client.predictions.list(project=project_id)
    except ApiError as err:
        raise LabelStudioError(_explain(err, project_id)) from err
    except httpx.HTTPError as err:
        raise LabelStudioError(f"cannot reach Label Studio: {err}") from err
    by_task: dict[Any, list[dict[str, Any]]] = {}
    for prediction in found:
        record = prediction.model_dump() if hasattr(prediction, "model_dump") else dict(prediction)
        by_task.setdefault(record.get("task"), []).append(record)
    return [{**task, "predictions": by_task.get(task.get("id"), [])} for task in tasks]


UNCERTAINTY_SAMPLING = "Uncertainty sampling"
"""Label Studio's ``Project.sampling`` value that serves the least confident task first."""


def order_by_uncertainty(client: Any, project_id: int, model_version: str) -> None:
    """Makes Label Studio serve the project's tasks least confident first: ``sampling`` =
    "Uncertainty sampling" and the project's ``model_version`` = ``model_version``.

    Label Studio 1.23 (``projects/functions/next_task.py``) orders by ``predictions__score``
    only among predictions whose ``model_version`` equals the project's; connecting an ML
    backend sets the project's to the backend's *title*, which no prediction carries, so
    without this the order is random. The project's version must be one its predictions carry
    (Label Studio refuses any other), so this runs after predictions were stored. Side effect
    (Label Studio's): with a prediction version selected, it shows the stored predictions
    rather than asking the backend when a task opens.
    """
    from label_studio_sdk.core.api_error import ApiError

    try:
        client.projects.update(id=project_id, sampling=UNCERTAINTY_SAMPLING,
                               model_version=model_version)  # fmt: skip
    except ApiError as err:
        raise LabelStudioError(_explain(err, project_id)) from err
    except httpx.HTTPError as err:
        raise LabelStudioError(f"cannot reach Label Studio: {err}") from err


def _explain(err: Any, project_id: int) -> str:
    status = getattr(err, "status_code", None)
    if status == 401:
        return (
            "Label Studio refused the API key (401): use the key from Account & Settings; a"
            " personal access token that has expired must be renewed there"
        )
    if status == 403:
        return f"the API key's user may not read project {project_id} (403)"
    if status == 404:
        return f"project {project_id} not found (404): check --project and --url"
    return f"Label Studio answered {status}: {str(getattr(err, 'body', ''))[:200]}"
