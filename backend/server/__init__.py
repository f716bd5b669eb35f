"""The Label Studio ML backend: HTTP protocol, task media, webhook events."""

from .app import create_app
from .engine import Engine
from .settings import MediaPolicy, ServerSettings

__all__ = ["Engine", "MediaPolicy", "ServerSettings", "create_app"]
