"""Logging without secrets: one filter on the root handlers redacts every record.

Presigned storage URLs carry their credentials in the query string (``X-Amz-Signature``,
``sig``, ``token``), Label Studio tokens travel in ``Authorization`` headers, and libraries
(httpx, httpcore, urllib3, the SDK) log URLs and headers at DEBUG. A filter on a *logger*
does not see records that other loggers propagate, so the filter sits on the root logger's
handlers, and uvicorn is started with its own logging config switched off so that its loggers
propagate there too: no library's record reaches a handler unredacted.

What is redacted, in the message, the formatted traceback and the stack:

- every query string (``?k=v...`` up to the next blank or quote);
- user info in URLs (``https://user:pass@host``);
- ``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie`` and ``X-Api-Key``
  values in any of the shapes libraries print (``Authorization: Token x``,
  ``'authorization': 'Bearer x'``, ``(b'Authorization', b'Token x')``);
- ``Token <t>``, ``Bearer <t>`` and ``Basic <t>`` credentials anywhere.
"""

from __future__ import annotations

import logging
import re

LEVELS = ("critical", "error", "warning", "info", "debug")
"""Accepted ``--log-level`` values (Python's levels; uvicorn's ``trace`` is not one)."""

REDACTED = "<redacted>"
_QUERY = re.compile(r"\?[^\s'\"<>=&?]+=[^\s'\"<>]*")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")
_HEADER = re.compile(
    r"(?i)(authorization|cookie|x-api-key)(['\"]?,?\s*[:=,]?\s*b?['\"]?\s*)([^'\"\n]+)"
)
_SCHEME_CREDENTIAL = re.compile(r"(?i)\b(token|bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}")


def redact_text(text: str) -> str:
    """``text`` with query strings, URL user info, auth headers and tokens replaced."""
    text = _QUERY.sub("?" + REDACTED, text)
    text = _USERINFO.sub(r"\1" + REDACTED + "@", text)
    text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    return _SCHEME_CREDENTIAL.sub(lambda m: m.group(1) + " " + REDACTED, text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message, traceback and stack with :func:`redact_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:  # records without secrets keep their args (formatters use them)
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def configure_logging(level: str) -> None:
    """Root logging at ``level`` (one of :data:`LEVELS`) with the redacting filter on every
    root handler."""
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
