"""Click options that several commands share, declared once (as datasette's ``cli.py`` does):
one decorator per option group, so a flag has one name, one variable and one help text.

- :func:`label_studio_options`: ``--url`` (``LABEL_STUDIO_URL``) and ``--api-key``
  (``LABEL_STUDIO_API_KEY``), for the commands that talk to a live Label Studio.
- :func:`tiny_option`: ``--tiny`` (``OVSS_TINY``), on the ``ovss-label`` group and on each
  command that loads models. The flag is read, never written to the environment: a command's
  ``tiny`` is True when given to it, to the group (``ovss-label --tiny predict``), or by
  ``OVSS_TINY=1``, and the command passes it to the backend explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def label_studio_options(command: F) -> F:
    """Adds ``--url`` and ``--api-key`` (parameters ``url``, ``api_key``; None when unset)."""
    url = click.option(
        "--url",
        envvar="LABEL_STUDIO_URL",
        help="Label Studio URL, for --project (or LABEL_STUDIO_URL).",
    )
    api_key = click.option(
        "--api-key",
        envvar="LABEL_STUDIO_API_KEY",
        help="Legacy token or personal access token (or LABEL_STUDIO_API_KEY; a key on the "
        "command line is visible in the process list).",
    )
    return url(api_key(command))


def tiny_option(command: F) -> F:
    """Adds ``--tiny`` (parameter ``tiny``: a bool that also follows the group's flag)."""
    return click.option(
        "--tiny",
        is_flag=True,
        envvar="OVSS_TINY",
        callback=_with_group_flag,
        help="Swap every model for its tiny random twin (meaningless output; plumbing tests). "
        "Or OVSS_TINY=1.",
    )(command)


def _with_group_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """The command's ``--tiny``, or the ``ovss-label`` group's: ``ovss-label --tiny predict``
    reaches ``predict`` through click's context, not through ``os.environ``."""
    root = ctx.find_root()
    return bool(value) or (root is not ctx and bool(root.params.get(param.name or "tiny")))


def data_dir_option(command: F) -> F:
    """Adds ``--data-dir`` (parameter ``data_dir``): a server's data directory, read by the
    commands that show or change what ``serve`` keeps there (jobs, versions)."""
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default="ovss-data",
        show_default=True,
        envvar="OVSS_DATA_DIR",
        help="The server's data directory (serve --data-dir).",
    )(command)


def server_database(data_dir: Path) -> Path:
    """The data directory's SQLite file; a ClickException when it holds no server data (a
    typo must not create an empty ``ovss-data/``)."""
    from ovss_label.backend.store import events_path

    path = events_path(data_dir)
    if not path.exists():
        raise click.ClickException(f"no server data in {data_dir} (serve --data-dir)")
    return path
