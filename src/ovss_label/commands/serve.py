"""``ovss-label serve``: the Label Studio ML backend."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from ovss_label.methods import METHODS


@click.command("serve")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=9090, show_default=True, type=int)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="naclip",
    show_default=True,
    help="Default method; a project picks another with ovss_method on its control.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="ovss-data",
    show_default=True,
    envvar="OVSS_DATA_DIR",
    help="Event database (and checkpoints).",
)
@click.option("--workers", default=2, show_default=True, help="Tasks predicted in parallel.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--basic-auth-user", envvar="BASIC_AUTH_USER", help="Require HTTP basic auth.")
@click.option("--basic-auth-pass", envvar="BASIC_AUTH_PASS", help="Its password.")
@click.option(
    "--webhook-token",
    envvar="OVSS_WEBHOOK_TOKEN",
    help="Token Label Studio's webhook URL may carry as ?token= (with basic auth on).",
)
@click.option("--tiny", is_flag=True, envvar="OVSS_TINY", help="Tiny random models (plumbing).")
@click.option("--log-level", default="info", show_default=True)
def serve(host, port, method, data_dir, workers, device, basic_auth_user, basic_auth_pass,
          webhook_token, tiny, log_level) -> None:  # fmt: skip
    """Serve Label Studio's ML-backend protocol (/health, /setup, /predict, /webhook).

    Task media: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for uploads and cloud storage,
    OVSS_LOCAL_FILES_ROOT for /data/local-files/, OVSS_ALLOW_PRIVATE_URLS=1 to download from
    private addresses other than Label Studio's.
    """
    import uvicorn

    from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings, create_app

    if tiny:
        os.environ["OVSS_TINY"] = "1"
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = ServerSettings(
        method=method, tiny=tiny, device=device, data_dir=data_dir, workers=workers,
        basic_user=basic_auth_user, basic_password=basic_auth_pass, webhook_token=webhook_token,
        media=MediaPolicy.from_env(),
    )  # fmt: skip
    # One process: models load once and are shared by threads (no fork after CUDA init).
    uvicorn.run(create_app(Engine(settings)), host=host, port=port, log_level=log_level,
                access_log=False)  # fmt: skip
