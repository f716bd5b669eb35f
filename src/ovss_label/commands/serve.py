"""``ovss-label serve``: the Label Studio ML backend."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from click.core import ParameterSource

from ovss_label.commands.options import tiny_option
from ovss_label.logs import LEVELS, configure_logging
from ovss_label.methods import METHODS, SAM_MODELS


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
    "--sam-model",
    type=click.Choice(SAM_MODELS),
    default="sam_vit_b",
    show_default=True,
    help="SAM for interactive clicks and the +sam methods.",
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
@click.option(
    "--head",
    envvar="OVSS_FMBSEG_HEAD",
    help="The trained head of the fmbseg methods (a `train` run folder), or OVSS_FMBSEG_HEAD.",
)
@click.option("--basic-auth-user", envvar="BASIC_AUTH_USER", help="Require HTTP basic auth.")
@click.option(
    "--basic-auth-pass",
    envvar="BASIC_AUTH_PASS",
    help="Its password; prefer the BASIC_AUTH_PASS variable or --basic-auth-pass-file (a "
    "command-line password is visible to every local user in the process list).",
)
@click.option(
    "--basic-auth-pass-file",
    envvar="BASIC_AUTH_PASS_FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the basic-auth password from this file (first line).",
)
@click.option(
    "--webhook-token",
    envvar="OVSS_WEBHOOK_TOKEN",
    help="Token Label Studio's webhook URL may carry as ?token= (with basic auth on).",
)
@click.option("--learn", is_flag=True, envvar="OVSS_LEARN",
              help="Train on the projects' annotations in the background and promote better "
              "versions (README: Train on your labels).")  # fmt: skip
@click.option("--train-every", default=10, show_default=True,
              help="With --learn: new accepted annotations that start a training job.")  # fmt: skip
@click.option("--train-schedule", help='With --learn: e.g. "nightly at 02:00" (UTC).')
@click.option("--train-option", "train_options", multiple=True,
              help="With --learn: an option for the jobs' `ovss-label train`, e.g. "
              "--train-option=--epochs=5 (repeatable).")  # fmt: skip
@click.option("--gate-min-held-out", default=5, show_default=True,
              help="With --learn: held-out tasks a candidate is scored on, at least.")  # fmt: skip
@click.option("--gate-margin", default=0.01, show_default=True,
              help="With --learn: mIoU a candidate must gain over the active version.")  # fmt: skip
@click.option("--gate-zero-shot/--no-gate-zero-shot", default=True, show_default=True,
              help="With --learn: a first version must beat the zero-shot method.")  # fmt: skip
@click.option("--job-lease", default=120.0, show_default=True,
              help="With --learn: seconds a job stays claimed without a heartbeat (after a "
              "crash it is re-queued once this has passed).")  # fmt: skip
@click.option("--max-training-jobs", default=1, show_default=True, type=click.IntRange(1),
              help="With --learn: training jobs running at once across every replica that "
              "shares --data-dir.")  # fmt: skip
@tiny_option
@click.option(
    "--log-level",
    type=click.Choice(LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="Query strings, tokens and auth headers are redacted at every level.",
)
def serve(
    host, port, method, sam_model, data_dir, workers, device, head, basic_auth_user,
    basic_auth_pass, basic_auth_pass_file, webhook_token, learn, train_every, train_schedule,
    train_options, gate_min_held_out, gate_margin, gate_zero_shot, job_lease, max_training_jobs,
    tiny, log_level,
) -> None:  # fmt: skip
    """Serve Label Studio's ML-backend protocol (/health, /setup, /predict, /webhook).

    Task media: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for uploads and cloud storage,
    OVSS_LOCAL_FILES_ROOT for /data/local-files/, OVSS_ALLOW_PRIVATE_URLS=1 (or
    OVSS_ALLOWED_NETWORKS=10.0.0.0/8,...) to download from private addresses other than Label
    Studio's, OVSS_DOWNLOAD_TIMEOUT for the budget of one download (20 s).
    """
    import uvicorn

    from ovss_label.backend.learning.gate import GateConfig
    from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings, create_app

    configure_logging(log_level)
    for name in ("basic_auth_pass", "webhook_token"):
        if click.get_current_context().get_parameter_source(name) is ParameterSource.COMMANDLINE:
            logging.getLogger(__name__).warning(
                "--%s on the command line is visible in the process list; use its environment "
                "variable or a file instead",
                name.replace("_", "-"),
            )
    if basic_auth_pass_file is not None:
        basic_auth_pass = (basic_auth_pass_file.read_text(encoding="utf-8").splitlines() or [""])[0]
    if basic_auth_user and not basic_auth_pass:
        raise click.UsageError("--basic-auth-user needs a password (BASIC_AUTH_PASS or a file)")
    try:
        media = MediaPolicy.from_env()
        settings = ServerSettings(
            method=method, sam_model=sam_model, tiny=tiny, device=device, data_dir=data_dir,
            workers=workers, fmbseg_head=head, learn=learn, train_every=train_every,
            train_schedule=train_schedule, train_options=tuple(train_options),
            gate=GateConfig(min_held_out=gate_min_held_out, margin=gate_margin,
                            compare_zero_shot=gate_zero_shot),
            job_lease_seconds=job_lease, max_training_jobs=max_training_jobs,
            basic_user=basic_auth_user, basic_password=basic_auth_pass,
            webhook_token=webhook_token, media=media,
        )  # fmt: skip
        engine = Engine(settings)
        if learn:
            from ovss_label.backend.server.learning import learning_loop

            engine.learning = learning_loop(settings)
    except ValueError as exc:  # e.g. OVSS_ALLOWED_NETWORKS that is not a network
        raise click.ClickException(str(exc)) from exc
    # Hash the weight files now (once per machine and file): /setup has 3 s to answer.
    engine.warm(METHODS)
    # One process: models load once and are shared by threads (no fork after CUDA init).
    # log_config=None: uvicorn's loggers propagate to the root handlers and their redaction.
    if engine.learning is not None:
        engine.learning.start()  # a daemon thread: jobs run in subprocesses (learning/loop.py)
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level,
                    log_config=None, access_log=False)  # fmt: skip
    finally:
        if engine.learning is not None:
            engine.learning.stop()
