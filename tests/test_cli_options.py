"""Shared click options (``commands/options.py``): one --url/--api-key and one --tiny for every
command, and a --tiny that reaches the command through click's context, never ``os.environ``."""

from __future__ import annotations

import json
import os

import click
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import half_and_half
from PIL import Image

from ovss_label.cli import cli
from ovss_label.commands.options import tiny_option


@click.group()
@tiny_option
def group(tiny: bool) -> None:
    """A group like ``ovss-label``."""


@group.command()
@tiny_option
def command(tiny: bool) -> None:
    click.echo(f"tiny={tiny}")


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["command"], None, False),
        (["--tiny", "command"], None, True),
        (["command", "--tiny"], None, True),
        (["command"], "1", True),
        (["command"], "0", False),
    ],
)
def test_tiny_follows_the_group_the_command_and_the_variable(args, env, expected, monkeypatch):
    if env is not None:
        monkeypatch.setenv("OVSS_TINY", env)
    result = CliRunner().invoke(group, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"tiny={expected}"
    assert os.environ.get("OVSS_TINY") == env  # read, never written


def test_commands_share_the_label_studio_and_tiny_options():
    commands = cli.commands
    for name in ("predict", "export", "tune"):
        options = {p.name: p for p in commands[name].params}
        assert options["url"].envvar == "LABEL_STUDIO_URL", name
        assert options["api_key"].envvar == "LABEL_STUDIO_API_KEY", name
    for name in ("predict", "serve", "tune"):
        tiny = next(p for p in commands[name].params if p.name == "tiny")
        assert tiny.envvar == "OVSS_TINY" and tiny.callback is not None, name


@pytest.mark.parametrize("where", ["group", "command"])
def test_predict_uses_tiny_models_without_touching_the_environment(where, tmp_path, monkeypatch):
    import ovss_label.backend.predict as job

    monkeypatch.setattr(job, "propose", half_and_half)  # the tiny models load; no model time
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "tasks.json"
    args = ["predict", str(tmp_path / "a.png"), "--labels", "cat, dog", "-o", str(out),
            "--document-root", str(tmp_path), "--background", "none"]  # fmt: skip
    args = ["--tiny", *args] if where == "group" else [*args, "--tiny"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    version = json.loads(out.read_text())[0]["predictions"][0]["model_version"]
    assert job.uses_tiny_models(version), version
    assert "OVSS_TINY" not in os.environ


def test_the_group_flag_reaches_predict_project_and_tune(monkeypatch, tmp_path):
    import ovss_label.backend.tune as tune_job
    import ovss_label.commands.predict_project as predict_project

    seen = {}
    monkeypatch.setattr(
        predict_project, "run_project", lambda *a, **k: seen.setdefault("project", k["tiny"])
    )

    def no_models(layers, *, tiny):
        seen["tune"] = tiny
        raise FileNotFoundError("no models in this test")

    monkeypatch.setattr(tune_job, "load_models", no_models)
    args = ["--tiny", "predict", "--project", "3", "--url", "http://ls", "--api-key", "k"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a.png": ["cat"]}))
    result = CliRunner().invoke(cli, ["--tiny", "tune", str(tmp_path), "--labels", str(labels)])
    assert result.exit_code == 1 and "no models in this test" in result.output
    assert seen == {"project": True, "tune": True}
    assert "OVSS_TINY" not in os.environ


def test_the_group_flag_reaches_serve(monkeypatch, tmp_path):
    import ovss_label.backend.server as server
    import ovss_label.commands.serve as serve_command

    seen = {}
    # No redacting filter on pytest's handlers (they outlive this test): tests/test_logs.py
    # needs a root handler that sees records unredacted.
    monkeypatch.setattr(serve_command, "configure_logging", lambda level: None)

    def engine(settings):
        seen["tiny"] = settings.tiny
        raise ValueError("no server in this test")

    monkeypatch.setattr(server, "Engine", engine)
    result = CliRunner().invoke(cli, ["--tiny", "serve", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no server in this test" in result.output
    assert seen == {"tiny": True} and "OVSS_TINY" not in os.environ
