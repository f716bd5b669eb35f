"""No secret reaches a log at any level; ``serve``'s logging and secret options."""

from __future__ import annotations

import io
import logging

import pytest
from click.testing import CliRunner
from helpers import Host

from ovss_label.backend.server import MediaPolicy
from ovss_label.backend.server.media import MediaFetcher
from ovss_label.cli import cli
from ovss_label.logs import RedactingFilter, redact_text


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("HTTP Request: GET https://b.s3.amazonaws.com/a.jpg?X-Amz-Signature=s3cr3t&k=v", "s3cr3t"),
        ('"GET /a.png?sig=s3cr3t HTTP/1.1" 200', "s3cr3t"),
        ("[(b'Location', b'https://b.blob.core.windows.net/a?sv=1&sig=s3cr3t')]", "s3cr3t"),
        ("[(b'Host', b'ls'), (b'Authorization', b'Token s3cr3t0123')]", "s3cr3t"),
        ("{'authorization': 'Bearer eyJ.s3cr3t.sig', 'cookie': 'sessionid=s3cr3t'}", "s3cr3t"),
        ("Authorization: Basic czNjcjN0OnB3", "czNjcjN0"),
        ("set-cookie: csrftoken=s3cr3t; Path=/", "s3cr3t"),
        ("POST /webhook?token=s3cr3t", "s3cr3t"),
        ("https://user:s3cr3t@ls.example.com/data/upload/1/a.png", "s3cr3t"),
        ("refresh failed for Bearer s3cr3t.payload.sig", "s3cr3t"),
    ],
)
def test_redaction(line, secret):
    clean = redact_text(line)
    assert secret not in clean and "<redacted>" in clean


def test_ordinary_text_is_kept():
    for line in ("what? yes", "task 3: no prediction: HTTP 404", "a Token of thanks"):
        assert redact_text(line) == line


def test_library_debug_lines_reach_the_root_handler_redacted(monkeypatch):
    """A presigned redirect at DEBUG: httpcore prints the Location header with its signature.
    An unfiltered handler sees it (so the test can fail); the root handler's filter removes
    it, whichever library logger the record came from."""
    secret = "X-Amz-Signature=s3cr3t"
    host = Host("127.0.0.1", 0)
    root, seen, clean = logging.getLogger(), io.StringIO(), io.StringIO()
    raw_handler, filtered = logging.StreamHandler(seen), logging.StreamHandler(clean)
    filtered.addFilter(RedactingFilter())
    monkeypatch.setattr(root, "level", logging.DEBUG)
    # The raw handler first: a redacting handler another test left on the root (its filter
    # edits the record in place) must not clean the record before the raw one sees it.
    monkeypatch.setattr(root, "handlers", [raw_handler, *root.handlers, filtered])
    try:
        fetcher = MediaFetcher(MediaPolicy(allow_private=True))
        fetcher.download(f"{host.url}/to?url={host.url}/a.png?{secret}")
    finally:
        host.close()
    assert "s3cr3t" in seen.getvalue()  # the libraries do log it
    assert "httpcore" in clean.getvalue() or "receive_response_headers" in clean.getvalue()
    assert "s3cr3t" not in clean.getvalue()


def test_a_traceback_is_redacted_too():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("ovss-test-traceback")
    logger.addHandler(handler)
    try:
        raise ValueError("GET https://b/a.png?X-Amz-Signature=s3cr3t failed")
    except ValueError:
        logger.exception("download failed")
    finally:
        logger.removeHandler(handler)
    assert "download failed" in stream.getvalue() and "s3cr3t" not in stream.getvalue()


@pytest.fixture()
def served(monkeypatch):
    """Runs ``serve`` up to the point where uvicorn would start; returns its settings."""
    import uvicorn

    import ovss_label.backend.server as server

    captured = {}
    real_engine = server.Engine

    def engine(settings, *args):
        captured["settings"] = settings
        return real_engine(settings, *args)

    monkeypatch.setattr(server, "Engine", engine)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: captured.setdefault("run", k))
    monkeypatch.setattr(logging, "basicConfig", lambda **k: None)  # keep pytest's handlers
    return captured


def test_unknown_log_levels_are_refused(served, tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--tiny", "--log-level", "trace",
                                      "--data-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2 and "Invalid value for '--log-level'" in result.output
    assert "run" not in served


def test_uvicorn_logs_through_the_root_handlers(served, tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--tiny", "--log-level", "DEBUG",
                                      "--data-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert served["run"]["log_config"] is None and served["run"]["log_level"] == "debug"


def test_the_password_from_a_file_or_the_environment(served, tmp_path, monkeypatch, caplog):
    secret = tmp_path / "pass"
    secret.write_text("from-a-file\n")
    args = ["serve", "--tiny", "--data-dir", str(tmp_path), "--basic-auth-user", "ls"]
    result = CliRunner().invoke(cli, [*args, "--basic-auth-pass-file", str(secret)])
    assert result.exit_code == 0, result.output
    assert served["settings"].basic_password == "from-a-file"
    monkeypatch.setenv("BASIC_AUTH_PASS", "from-the-env")
    CliRunner().invoke(cli, args)
    assert served["settings"].basic_password == "from-the-env"
    assert "visible in the process list" not in caplog.text
    CliRunner().invoke(cli, [*args, "--basic-auth-pass", "on-the-command-line"])
    assert "--basic-auth-pass on the command line is visible" in caplog.text
    monkeypatch.delenv("BASIC_AUTH_PASS")
    missing = CliRunner().invoke(cli, args)
    assert missing.exit_code == 2 and "needs a password" in missing.output


def test_bad_network_settings_are_one_line(served, tmp_path, monkeypatch):
    monkeypatch.setenv("OVSS_ALLOWED_NETWORKS", "10.0.0.0/8,not-a-network")
    result = CliRunner().invoke(cli, ["serve", "--tiny", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "not-a-network" in result.output
    assert "Traceback" not in result.output
