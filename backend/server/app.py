"""Label Studio's ML-backend protocol over HTTP (FastAPI).

Routes (docs/label_studio.md §1.1): ``GET /``, ``GET /health``, ``POST /setup``, ``POST /predict``,
``POST /webhook``, ``GET /versions``, ``GET /jobs`` and a job's report (``GET /jobs/<id>/report``,
``/jobs/<id>/report.png``). Why FastAPI + uvicorn: maintained, async routes that
answer ``/health`` and ``/webhook`` at once while predictions run in the engine's bounded
executors, and a test client; the upstream Flask 1.1 stack (``label-studio-ml`` 1.0.9 on PyPI)
is unmaintained.

Malformed requests get a 4xx with a one-line ``detail``, never a 500: a body over the size
limit 413; a body that is not JSON, nests too deeply or is not an object 400; ``tasks`` that is
not a list, ``label_config`` that is not a string, a malformed TextArea context 400. A webhook
is stored verbatim before any field is read (``events.py``), so an odd field never loses it.

Security: with basic-auth credentials configured, every route needs them, except that
``/webhook`` also accepts the shared webhook token as ``?token=`` (Label Studio's auto-created
webhook sends no credentials). Credentials are compared in constant time. Nothing here logs
headers, tokens or request bodies.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from ovss_label import __version__

from .choice import project_id
from .engine import Engine
from .events import TRAINING_ACTIONS, event_ids

log = logging.getLogger(__name__)

REPORT_FILES = {"report": (".json", "application/json"), "report.png": (".png", "image/png")}
"""A job's report files under ``/jobs/<id>/``: suffix and media type."""


def _authorised(request: Request, engine: Engine) -> bool:
    s = engine.settings
    if not s.basic_user:
        return True
    token = request.query_params.get("token")
    if request.url.path == "/webhook" and s.webhook_token and token:
        return hmac.compare_digest(token.encode(), s.webhook_token.encode())
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    ok_user = hmac.compare_digest(user.encode(), s.basic_user.encode())
    ok_password = hmac.compare_digest(password.encode(), (s.basic_password or "").encode())
    return ok_user and ok_password


def create_app(engine: Engine) -> FastAPI:
    """The ASGI app serving ``engine``."""
    app = FastAPI(title="ovss-label", version=__version__)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        if not _authorised(request, engine):
            headers = {"WWW-Authenticate": 'Basic realm="ovss-label"'}
            return JSONResponse({"error": "unauthorised"}, status_code=401, headers=headers)
        return await call_next(request)

    @app.get("/")
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "ovss-label", "version": __version__}

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        """The ``model_version`` serving the project now (its active trained version's, else
        its config's method's): Label Studio re-predicts tasks without it."""
        body = await _json(request, engine, engine.control)
        schema, method = body.get("schema"), engine.settings.method
        loop = asyncio.get_running_loop()
        if isinstance(schema, str) and schema.strip():
            try:
                project = await loop.run_in_executor(engine.control, engine.projects.get, schema)
                method = project.method
            except ValueError as exc:
                log.warning("setup: labeling config refused: %s", exc)
        # Off the loop too: a weight file replaced since the last call is hashed again, and
        # the project's active version is read from SQLite.
        project = project_id(body.get("project"))
        version = await loop.run_in_executor(engine.control, _serving, engine, project, method)
        return {"model_version": version}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        body = await _json(request, engine, engine.control)
        tasks, config = body.get("tasks"), body.get("label_config", "")
        if not isinstance(tasks, list):
            raise HTTPException(400, "'tasks' must be a list of task objects")
        if not isinstance(config, str | None):
            raise HTTPException(400, "'label_config' must be a string (the labeling config XML)")
        params = body.get("params")
        context = (params.get("context") if isinstance(params, dict) else None) or body.get(
            "context"
        )
        try:
            results = await engine.predict(tasks, config or "", context, _project_of(body, tasks))
        except ValueError as exc:  # a malformed context: the request's fault
            raise HTTPException(400, str(exc)) from exc
        return {"results": results}

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        raw = await _read(request, engine)
        loop = asyncio.get_running_loop()
        status, answer = await loop.run_in_executor(engine.webhooks, _store_event, engine, raw)
        return JSONResponse(answer, status_code=status)

    @app.get("/versions")
    async def versions() -> dict[str, Any]:
        """Every method's ``model_version`` (the default method first) and full manifest, and
        each project's trained versions (newest first, the active one flagged)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(engine.control, _versions, engine)

    @app.get("/jobs")
    async def jobs(project: int | None = None, limit: int = 100) -> dict[str, Any]:
        """Training jobs, newest first (state, attempts, progress, result, reason)."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(
            engine.control, lambda: engine.jobs.list(project, max(1, min(limit, 1000)))
        )
        return {"jobs": [job.to_dict() for job in found]}

    @app.get("/jobs/{job_id}/{name}")
    async def job_report(job_id: int, name: str) -> FileResponse:
        """A job's report (``learning/report.py``): ``report`` (JSON) or ``report.png``."""
        path, media = await asyncio.get_running_loop().run_in_executor(
            engine.control, _report_file, engine, job_id, name
        )
        return FileResponse(path, media_type=media)

    return app


def _report_file(engine: Engine, job_id: int, name: str) -> tuple[Path, str]:
    """A job's report file ``name`` and its media type (the report's path is in the job's
    result, relative to the data directory, and must stay inside it); 404 with one line
    otherwise."""
    if name not in REPORT_FILES:
        raise HTTPException(404, f"a job has {' and '.join(REPORT_FILES)}, not {name!r}")
    suffix, media = REPORT_FILES[name]
    job = engine.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no training job {job_id}")
    relative = (job.result or {}).get("report")
    if not isinstance(relative, str):
        raise HTTPException(404, f"training job {job_id} has no report ({job.state.value})")
    root = engine.settings.data_dir.resolve()
    path = (root / relative).with_suffix(suffix).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise HTTPException(404, f"training job {job_id}: its report file is gone")
    return path, media


def _store_event(engine: Engine, raw: bytes) -> tuple[int, dict[str, Any]]:
    """(status, answer) for one webhook body; runs on the event store's own thread."""
    body = _parse(raw)
    action = body.get("action")
    if action not in TRAINING_ACTIONS:
        return 200, {"status": "Unknown event"}
    event_id = engine.events.record(raw.decode(json.detect_encoding(raw), "replace"), body)
    if engine.learning is not None:  # after the event is safe: two small SQLite writes
        project, _, annotations = event_ids(body)
        engine.learning.on_webhook(str(action), project, annotations)
    return 201, {"status": "ok", "result": {"event": event_id}}


def _serving(engine: Engine, project: int | None, config_method: str) -> str:
    """The ``model_version`` of the model serving ``project`` now (``Engine.choice``)."""
    return engine.model_version(*engine.choice(project, config_method))


def _project_of(body: dict[str, Any], tasks: list[Any]) -> int | None:
    """The project of a ``/predict``: the body's ``"<id>.<ts>"``, else the first task's
    ``project`` field; None when neither is an id (served as no project)."""
    found = project_id(body.get("project"))
    if found is None:
        ids = (project_id(task.get("project")) for task in tasks if isinstance(task, dict))
        found = next((i for i in ids if i is not None), None)
    return found


def _versions(engine: Engine) -> dict[str, Any]:
    """``versions`` and ``models`` (manifests) of every method, the default first (a method
    that cannot be planned has its reason instead of a manifest), and ``projects``: each
    project's trained versions, newest first, with their metrics and active flag."""
    versions, models = [], []
    for method in _methods(engine):
        try:
            manifest = engine.identity(method).manifest()
        except (OSError, ValueError) as exc:
            manifest = {"method": method, "model_version": engine.model_version(method),
                        "error": str(exc)}  # fmt: skip
        versions.append(manifest["model_version"])
        models.append(manifest)
    return {"versions": versions, "models": models, "projects": _project_versions(engine)}


def _project_versions(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """``{"<project id>": [version, ...]}``, newest first (``VersionStore.list``)."""
    projects: dict[str, list[dict[str, Any]]] = {}
    for version in engine.versions.list():
        projects.setdefault(str(version.project), []).append(version.to_dict())
    return projects


def _methods(engine: Engine) -> list[str]:
    from ovss_label.methods import METHODS

    return [engine.settings.method, *(m for m in METHODS if m != engine.settings.method)]


async def _read(request: Request, engine: Engine) -> bytes:
    """The body, at most ``max_request_mb`` (413 above)."""
    limit = engine.settings.max_request_mb << 20
    declared = request.headers.get("content-length", "")
    too_big = HTTPException(413, f"the request body is over {engine.settings.max_request_mb} MB")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def _json(request: Request, engine: Engine, pool: Executor) -> dict[str, Any]:
    """The body as a JSON object, parsed in ``pool`` (a 10 MB body must not hold the loop)."""
    raw = await _read(request, engine)
    return await asyncio.get_running_loop().run_in_executor(pool, _parse, raw)


def _parse(raw: bytes) -> dict[str, Any]:
    """A JSON object; HTTPException 400 with one line for anything else."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise HTTPException(400, "the JSON body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body
