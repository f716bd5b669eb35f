"""Server settings as an operator sets them: the documented defaults, the media policy from the
environment, and ``serve --learn``'s loop built from every option.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ovss_label.backend.server import MediaPolicy, ServerSettings

MEDIA_ENV = (
    "LABEL_STUDIO_URL",
    "LABEL_STUDIO_API_KEY",
    "OVSS_LOCAL_FILES_ROOT",
    "LOCAL_FILES_DOCUMENT_ROOT",
    "OVSS_ALLOW_PRIVATE_URLS",
    "OVSS_ALLOWED_NETWORKS",
    "OVSS_MAX_IMAGE_MB",
    "OVSS_DOWNLOAD_TIMEOUT",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in MEDIA_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_media_limits_default_to_the_readmes_numbers() -> None:
    # README, "Hardening": 5 s connect, 10 s between bytes, 20 s per download, 64 MB, 80 MP,
    # at most 3 redirects; private addresses refused; no token, no local files.
    policy = MediaPolicy()
    assert (policy.connect_timeout, policy.read_timeout, policy.download_timeout) == (5, 10, 20)
    assert policy.max_bytes == 64 * 1024 * 1024
    assert policy.max_pixels == 80_000_000
    assert policy.max_redirects == 3
    assert policy.decoded_cache_mb == 256
    assert (policy.ls_url, policy.ls_token, policy.local_root) == (None, None, None)
    assert policy.allow_private is False and policy.allowed_networks == ()
    assert "secret" not in repr(MediaPolicy(ls_token="secret"))


def test_server_defaults_are_the_documented_ones() -> None:
    # Values `serve` does not set from an option (README: a body over 100 MB gets 413) and the
    # defaults a library user gets.
    settings = ServerSettings()
    assert (settings.method, settings.sam_model, settings.device) == ("naclip", "sam_vit_b", "cpu")
    assert settings.tiny is False and settings.learn is False
    assert settings.data_dir == Path("ovss-data")
    assert (settings.workers, settings.cache_mb, settings.config_cache_mb) == (2, 1024, 32)
    assert settings.max_request_mb == 100
    assert (settings.train_every, settings.train_schedule, settings.train_options) == (10, None, ())
    assert (settings.job_lease_seconds, settings.max_training_jobs) == (120.0, 1)
    assert settings.basic_user is settings.basic_password is settings.webhook_token is None
    assert settings.fmbseg_head is None
    text = repr(ServerSettings(basic_password="pw-1", webhook_token="tok-2"))
    assert "pw-1" not in text and "tok-2" not in text


def test_media_policy_from_an_empty_environment_is_the_default(
    clean_env: pytest.MonkeyPatch,
) -> None:
    assert MediaPolicy.from_env() == MediaPolicy()
    for name in MEDIA_ENV:  # set but empty: unset
        clean_env.setenv(name, "")
    assert MediaPolicy.from_env() == MediaPolicy()


def test_media_policy_reads_every_variable(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("LABEL_STUDIO_URL", "http://ls:8080")
    clean_env.setenv("LABEL_STUDIO_API_KEY", "key-1")
    clean_env.setenv("OVSS_LOCAL_FILES_ROOT", str(tmp_path / "ovss"))
    clean_env.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "ls"))
    clean_env.setenv("OVSS_ALLOW_PRIVATE_URLS", "1")
    clean_env.setenv("OVSS_ALLOWED_NETWORKS", "10.1.2.0/24, 192.168.0.0/16,")
    clean_env.setenv("OVSS_MAX_IMAGE_MB", "8")
    clean_env.setenv("OVSS_DOWNLOAD_TIMEOUT", "7.5")
    policy = MediaPolicy.from_env()
    assert (policy.ls_url, policy.ls_token) == ("http://ls:8080", "key-1")
    assert policy.local_root == tmp_path / "ovss"  # ours wins over Label Studio's variable
    assert policy.allow_private is True
    assert policy.allowed_networks == ("10.1.2.0/24", "192.168.0.0/16")
    assert policy.max_bytes == 8 * 1024 * 1024
    assert policy.download_timeout == 7.5
    # Untouched by the environment:
    assert (policy.max_pixels, policy.max_redirects, policy.read_timeout) == (80_000_000, 3, 10)

    clean_env.delenv("OVSS_LOCAL_FILES_ROOT")  # Label Studio's own variable is the fallback
    assert MediaPolicy.from_env().local_root == tmp_path / "ls"


@pytest.mark.parametrize(
    ("value", "allowed"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True),
     ("0", False), ("false", False), ("no", False), ("off", False), ("2", False)],
)  # fmt: skip
def test_private_urls_are_allowed_only_by_a_yes(
    clean_env: pytest.MonkeyPatch, value: str, allowed: bool
) -> None:
    clean_env.setenv("OVSS_ALLOW_PRIVATE_URLS", value)
    assert MediaPolicy.from_env().allow_private is allowed


def _learning_settings(tmp_path: Path, **media: str | None) -> ServerSettings:
    from ovss_label.backend.learning.gate import GateConfig

    return ServerSettings(
        method="pnp_ovss", tiny=True, data_dir=tmp_path / "data", learn=True,
        train_every=4, train_schedule="nightly at 02:30", train_options=("--epochs", "2"),
        gate=GateConfig(min_held_out=3, margin=0.02), job_lease_seconds=45.0,
        max_training_jobs=2, media=MediaPolicy(**media), fmbseg_head=None,
    )  # fmt: skip


def test_serve_learn_builds_the_loop_from_every_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve --learn``: each option reaches the worker, the trigger policy and the loop."""
    from ovss_label import lsapi
    from ovss_label.backend.learning.gate import GateConfig
    from ovss_label.backend.server.learning import learning_loop
    from ovss_label.backend.store import events_path

    monkeypatch.setenv("OVSS_FMBSEG_HEAD", str(tmp_path / "env-head"))
    settings = _learning_settings(tmp_path, ls_url="http://ls:8080", ls_token="tok")
    loop = learning_loop(settings)
    worker = loop.settings
    assert (worker.data_dir, worker.ls_url, worker.api_key) == (
        tmp_path / "data",
        "http://ls:8080",
        "tok",
    )
    assert (worker.zero_shot, worker.tiny, worker.train_options) == (
        "pnp_ovss",
        True,
        ("--epochs", "2"),
    )
    assert worker.gate == GateConfig(min_held_out=3, margin=0.02)
    assert worker.zero_shot_head == str(tmp_path / "env-head")  # what Engine.plan uses
    assert (loop.policy.min_new_annotations, loop.policy.schedule) == (4, "nightly at 02:30")
    assert (loop.lease_seconds, loop.max_running) == (45.0, 2)
    assert loop.database == events_path(tmp_path / "data")

    made: list[tuple[str, str]] = []
    monkeypatch.setattr(lsapi, "make_client", lambda url, key: made.append((url, key)) or "client")
    assert loop.client_factory() == "client" and made == [("http://ls:8080", "tok")]

    with_head = learning_loop(ServerSettings(**{**settings.__dict__, "fmbseg_head": "run-7"}))
    assert with_head.settings.zero_shot_head == "run-7"  # the option wins over the variable


@pytest.mark.parametrize("media", [{"ls_url": "http://ls:8080"}, {"ls_token": "tok"}, {}])
def test_serve_learn_refuses_without_label_studio_url_and_key(
    tmp_path: Path, media: dict[str, str]
) -> None:
    from ovss_label.backend.server.learning import learning_loop

    with pytest.raises(ValueError, match="--learn needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        learning_loop(_learning_settings(tmp_path, **media))


def test_the_engine_sizes_its_caches_and_pools_from_the_settings(tmp_path) -> None:
    """Megabytes in the settings are MiB in the caches; ``workers`` task threads, two for the
    control work, one for clicks and one for webhook events (named, to read in a dump)."""
    from ovss_label.backend.server import Engine, ServerSettings

    settings = ServerSettings(tiny=True, data_dir=tmp_path, cache_mb=3, config_cache_mb=5,
                              workers=3, device="cpu")  # fmt: skip
    engine = Engine(settings)
    assert engine.cache.max_bytes == 3 << 20 and engine.projects.parsed.max_bytes == 5 << 20
    assert engine.media.decoded.max_bytes == engine.settings.media.decoded_cache_mb << 20
    assert engine.pool.device == "cpu"
    pools = [engine.tasks, engine.control, engine.clicks, engine.webhooks]
    assert [p._max_workers for p in pools] == [3, 2, 1, 1]
    assert [p._thread_name_prefix for p in pools] == [
        "ovss-task", "ovss-control", "ovss-click", "ovss-events"]  # fmt: skip
    engine.close()
