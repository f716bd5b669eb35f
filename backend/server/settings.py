"""Server settings: one frozen object, from CLI options and environment variables.

Weight paths come from here only (server configuration), never from a labeling config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..learning.gate import GateConfig


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class MediaPolicy:
    """What task media the server may download or read, and how much.

    Attributes:
        ls_url: Label Studio's base URL (``LABEL_STUDIO_URL``); its host always passes the
            private-address policy (Label Studio often runs on a private address) and is the
            only host that receives the token.
        ls_token: ``LABEL_STUDIO_API_KEY``: a legacy token or a personal access token.
        local_root: ``/data/local-files/`` paths are read under this folder only; None refuses.
        allow_private: Allow other hosts on private, loopback or link-local addresses.
        allowed_networks: Networks (CIDR) allowed although private, e.g. a NAS subnet.
        max_bytes: Largest download.
        max_pixels: Largest decoded image (decompression bombs).
        connect_timeout: Seconds to connect.
        read_timeout: Seconds between bytes.
        download_timeout: Seconds for a whole download, redirects included: a server that
            trickles bytes cannot hold a worker longer (Label Studio waits 100 s for a whole
            ``/predict`` request).
        max_redirects: Redirects followed per download.
        decoded_cache_mb: Decoded images kept for repeated requests (interactive clicks).
    """

    ls_url: str | None = None
    ls_token: str | None = field(default=None, repr=False)
    local_root: Path | None = None
    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    max_bytes: int = 64 << 20
    max_pixels: int = 80_000_000
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    download_timeout: float = 20.0
    max_redirects: int = 3
    decoded_cache_mb: int = 256

    @classmethod
    def from_env(cls) -> MediaPolicy:
        """From ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, ``OVSS_LOCAL_FILES_ROOT``
        (or ``LOCAL_FILES_DOCUMENT_ROOT``), ``OVSS_ALLOW_PRIVATE_URLS``,
        ``OVSS_ALLOWED_NETWORKS`` (comma-separated CIDRs), ``OVSS_MAX_IMAGE_MB`` and
        ``OVSS_DOWNLOAD_TIMEOUT`` (seconds)."""
        root = os.environ.get("OVSS_LOCAL_FILES_ROOT") or os.environ.get(
            "LOCAL_FILES_DOCUMENT_ROOT"
        )
        return cls(
            ls_url=os.environ.get("LABEL_STUDIO_URL") or None,
            ls_token=os.environ.get("LABEL_STUDIO_API_KEY") or None,
            local_root=Path(root) if root else None,
            allow_private=_env_bool("OVSS_ALLOW_PRIVATE_URLS"),
            allowed_networks=tuple(
                n.strip() for n in os.environ.get("OVSS_ALLOWED_NETWORKS", "").split(",") if n
            ),
            max_bytes=_env_int("OVSS_MAX_IMAGE_MB", 64) << 20,
            download_timeout=float(os.environ.get("OVSS_DOWNLOAD_TIMEOUT") or 20.0),
        )


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``ovss-label serve`` is configured with.

    Attributes:
        method: Default method for projects whose labeling config names none.
        sam_model: SAM for interactive prompts and the +sam methods.
        tiny: Tiny random models (plumbing tests).
        device: Torch device.
        data_dir: SQLite event store and (later) checkpoints.
        workers: Tasks predicted in parallel (bounded executor).
        cache_mb: Feature-cache budget shared by all projects.
        config_cache_mb: Budget of the parsed labeling configs kept (by config size).
        max_request_mb: Largest request body accepted (413 above).
        basic_user: HTTP basic-auth user (None: no auth).
        basic_password: Its password.
        webhook_token: Shared token Label Studio's webhook may carry as ``?token=``.
        media: Media download policy.
        fmbseg_head: The trained head ``fmbseg`` methods use (a ``train`` run folder or its
            ``head.safetensors``); None: ``OVSS_FMBSEG_HEAD``.
        learn: Train on the projects' annotations in the background (``learning/loop.py``):
            webhooks queue jobs, a worker trains and promotes versions. Off by default: training
            DINOv2-L features on a CPU takes hours, and an operator turns it on knowingly.
        train_every: Accepted annotations that trigger a job (debounced), with ``learn``.
        train_schedule: ``"nightly at HH:MM"`` (UTC): a job then if there are new annotations.
        train_options: Extra ``ovss-label train`` options for the jobs (``--epochs 5``).
        gate: The promotion gate (``learning/gate.py``: held-out tasks needed, margin, ...).
        job_lease_seconds: How long a training job stays claimed without a heartbeat (one a
            second while it runs); after a crash the job is re-queued once its lease expires.
        max_training_jobs: Training jobs running at once across every server sharing the data
            directory (replicas): each takes the cores or the GPU of its host.
    """

    method: str = "naclip"
    sam_model: str = "sam_vit_b"
    tiny: bool = False
    device: str = "cpu"
    data_dir: Path = Path("ovss-data")
    workers: int = 2
    cache_mb: int = 1024
    config_cache_mb: int = 32
    max_request_mb: int = 100
    basic_user: str | None = None
    basic_password: str | None = field(default=None, repr=False)
    webhook_token: str | None = field(default=None, repr=False)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    fmbseg_head: str | None = None
    learn: bool = False
    train_every: int = 10
    train_schedule: str | None = None
    train_options: tuple[str, ...] = ()
    gate: GateConfig = field(default_factory=GateConfig)
    job_lease_seconds: float = 120.0
    max_training_jobs: int = 1
