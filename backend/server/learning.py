"""The server's learning loop, built from its settings (``serve --learn``)."""

from __future__ import annotations

import os

from ..learning.loop import LearningLoop
from ..learning.triggers import TriggerPolicy
from ..learning.worker import WorkerSettings
from ..store import events_path
from .settings import ServerSettings


def learning_loop(settings: ServerSettings) -> LearningLoop:
    """The loop of ``learning/loop.py`` for this server: jobs pull annotations and images from
    the Label Studio the server talks to; a project without a trained version is scored
    against the server's default method (the zero-shot baseline).

    Raises:
        ValueError: No Label Studio URL or key (a job could not read a project).
    """
    media = settings.media
    if not media.ls_url or not media.ls_token:
        raise ValueError(
            "--learn needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: training jobs read the "
            "projects' annotations and images from Label Studio"
        )
    url, token = media.ls_url, media.ls_token
    head = settings.fmbseg_head or os.environ.get("OVSS_FMBSEG_HEAD")  # what Engine.plan uses
    worker = WorkerSettings(settings.data_dir, url, token, zero_shot=settings.method,
                            zero_shot_head=head, tiny=settings.tiny,
                            train_options=settings.train_options, gate=settings.gate)  # fmt: skip
    policy = TriggerPolicy(min_new_annotations=settings.train_every,
                           schedule=settings.train_schedule)  # fmt: skip

    def client() -> object:
        from ovss_label.lsapi import make_client

        return make_client(url, token)

    return LearningLoop(events_path(settings.data_dir), worker, policy, client,
                        lease_seconds=settings.job_lease_seconds,
                        max_running=settings.max_training_jobs)  # fmt: skip
