"""Label Studio's ML-backend protocol over HTTP (FastAPI).

Routes (label_studio.md §1.1): ``GET /`` and ``GET /health``, ``POST /setup``, ``POST /predict``,
``POST /webhook``, ``GET /versions``. Why FastAPI + uvicorn: maintained, async routes that
answer ``/health`` and ``/webhook`` at once while predictions run in the engine's bounded
thread pool, request validation, and a test client; the upstream Flask 1.1 stack
(``label-studio-ml`` 1.0.9 on PyPI) is unmaintained.

Security: with basic-auth credentials configured, every route needs them, except that
``/webhook`` also accepts the shared webhook token as ``?token=`` (Label Studio's auto-created
webhook sends no credentials). Credentials are compared in constant time. Nothing here logs
headers, tokens or request bodies.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ovss_label import __version__

from .engine import Engine, parse_project
from .events import TRAINING_ACTIONS

log = logging.getLogger(__name__)


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
        body = await _json(request)
        method = engine.settings.method
        try:
            method = parse_project(str(body.get("schema") or ""), method).method
        except ValueError as exc:
            log.warning("setup: labeling config refused: %s", exc)
        return {"model_version": engine.model_version(method)}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        body = await _json(request)
        tasks = [t for t in body.get("tasks") or [] if isinstance(t, dict)]
        config = str(body.get("label_config") or "")
        params = body.get("params")
        context = (params.get("context") if isinstance(params, dict) else None) or body.get(
            "context"
        )
        results = await asyncio.to_thread(engine.predict, tasks, config, context)
        return {"results": results}

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        body = await _json(request)
        action = str(body.get("action", ""))
        if action not in TRAINING_ACTIONS:
            return JSONResponse({"status": "Unknown event"}, status_code=200)
        event_id = await asyncio.to_thread(engine.events.record, body)
        return JSONResponse({"status": "ok", "result": {"event": event_id}}, status_code=201)

    @app.get("/versions")
    async def versions() -> dict[str, Any]:
        return {"versions": [engine.model_version(m) for m in _methods(engine)]}

    return app


def _methods(engine: Engine) -> list[str]:
    from ovss_label.methods import METHODS

    return [engine.settings.method, *(m for m in METHODS if m != engine.settings.method)]


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
